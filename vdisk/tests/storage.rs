//! Storage layer: file I/O semantics, O_DIRECT bounce paths, holes, QEMU lock interop,
//! and the crash-trace replayer.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use vdisk::storage::trace::{TraceOp, TraceStorage};
use vdisk::storage::{CacheMode, FileStorage, LockMode, OpenFileOptions, Storage, StorageError};

fn opts(read_only: bool, cache: CacheMode, lock: LockMode) -> OpenFileOptions {
    OpenFileOptions {
        read_only,
        cache,
        lock,
        create: false,
    }
}

fn new_file(dir: &tempfile::TempDir, name: &str, len: u64) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p
}

#[test]
fn reads_past_eof_are_zero_and_writes_extend() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(&dir, "a.raw", 1000);
    let s = FileStorage::open(&p, &opts(false, CacheMode::Writeback, LockMode::Off)).unwrap();
    s.write_at(&[7u8; 100], 950).unwrap();
    assert_eq!(s.len().unwrap(), 1050);
    let mut buf = [1u8; 200];
    s.read_at(&mut buf, 1000).unwrap();
    assert!(buf[..50].iter().all(|&b| b == 7));
    assert!(buf[50..].iter().all(|&b| b == 0));
}

#[test]
fn direct_io_handles_unaligned_requests() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(&dir, "d.raw", 0);
    let s = match FileStorage::open(&p, &opts(false, CacheMode::None, LockMode::Off)) {
        Ok(s) => s,
        Err(e) => panic!("O_DIRECT open failed on {}: {e}", p.display()),
    };
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    s.write_at(&data, 123).unwrap();
    assert_eq!(
        s.len().unwrap(),
        10_123,
        "aligned padding must not extend the file"
    );
    s.write_at(&[0xee; 10], 5000).unwrap();
    let mut back = vec![0u8; 10_000];
    s.read_at(&mut back, 123).unwrap();
    let mut expect = data.clone();
    expect[5000 - 123..5010 - 123].fill(0xee);
    assert_eq!(back, expect);
    s.flush().unwrap();
}

/// Page-aligned buffers (a guest request of many pages) take one preadv/pwritev under
/// O_DIRECT; a read running past the end of the file still ends in zeroes.
#[test]
fn direct_io_vectored_aligned_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(&dir, "v.raw", 0);
    let s = FileStorage::open(&p, &opts(false, CacheMode::None, LockMode::Off)).unwrap();
    // One 4 KiB-aligned allocation cut into page buffers.
    let mut block = vec![0u8; 16 * 4096 + 4096];
    let off = block.as_ptr().align_offset(4096);
    let pages = &mut block[off..off + 16 * 4096];
    for (i, b) in pages.iter_mut().enumerate() {
        *b = (i / 4096) as u8 + 1;
    }
    let bufs: Vec<&[u8]> = pages.chunks(4096).collect();
    s.write_vectored_at(&bufs, 8192).unwrap();
    assert_eq!(s.len().unwrap(), 8192 + 16 * 4096);
    let mut back_block = vec![0u8; 20 * 4096 + 4096];
    let off = back_block.as_ptr().align_offset(4096);
    let back = &mut back_block[off..off + 20 * 4096];
    back.fill(0x77);
    {
        let mut bufs: Vec<&mut [u8]> = back.chunks_mut(4096).collect();
        // From 4096: one page before the data, 16 of data, 3 past the end of file.
        s.read_vectored_at(&mut bufs, 4096).unwrap();
    }
    assert!(back[..4096].iter().all(|&b| b == 0));
    for i in 0..16 {
        assert!(back[(i + 1) * 4096..(i + 2) * 4096]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
    assert!(
        back[17 * 4096..].iter().all(|&b| b == 0),
        "past EOF reads zeroes"
    );
}

#[test]
fn punch_hole_and_extent_map() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(&dir, "h.raw", 0);
    let s = FileStorage::open(&p, &opts(false, CacheMode::Writeback, LockMode::Off)).unwrap();
    s.write_at(&vec![0xaa; 1 << 20], 0).unwrap();
    s.punch_hole(256 << 10, 256 << 10).unwrap();
    let mut buf = vec![1u8; 256 << 10];
    s.read_at(&mut buf, 256 << 10).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(s.extent_at(0).unwrap(), (true, 256 << 10));
    assert_eq!(s.extent_at(256 << 10).unwrap(), (false, 256 << 10));
    assert_eq!(s.extent_at(512 << 10).unwrap(), (true, 512 << 10));
    s.write_zeroes(0, 4096).unwrap();
    s.read_at(&mut buf[..4096], 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert_eq!(s.len().unwrap(), 1 << 20);
}

/// A qemu-io process holding an image open until dropped.
struct QemuIo(Child);

impl QemuIo {
    fn hold(args: &[&str]) -> QemuIo {
        let mut c = Command::new("qemu-io")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io runs");
        // A command round trip proves the image is open (and locked) before we go on.
        let stdin = c.stdin.as_mut().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        let mut out = c.stdout.take().unwrap();
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        use std::io::Read;
        while !String::from_utf8_lossy(&got).contains("read 512/512") {
            if out.read(&mut byte).unwrap() == 0 {
                panic!("qemu-io exited: {}", String::from_utf8_lossy(&got));
            }
            got.push(byte[0]);
        }
        QemuIo(c)
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lock_err(r: Result<FileStorage, StorageError>) -> String {
    match r {
        Err(StorageError::Locked(m)) => m.to_string(),
        Err(e) => panic!("expected a lock conflict, got {e}"),
        Ok(_) => panic!("expected a lock conflict, open succeeded"),
    }
}

#[test]
fn qemu_writer_blocks_vdisk() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(&dir, "l.raw", 1 << 20);
    let _q = QemuIo::hold(&["-f", "raw", p.to_str().unwrap()]);
    let rw = lock_err(FileStorage::open(
        &p,
        &opts(
            false,
            CacheMode::Writeback,
            LockMode::for_open(false, false),
        ),
    ));
    assert!(
        rw.contains("Failed to get \"write\" lock")
            || rw.contains("Failed to get shared \"write\" lock"),
        "{rw}"
    );
    let ro = lock_err(FileStorage::open(
        &p,
        &opts(true, CacheMode::Writeback, LockMode::for_open(true, false)),
    ));
    assert!(ro.contains("Failed to get shared \"write\" lock"), "{ro}");
    assert!(ro.contains("Is another process using the image"), "{ro}");
    // -U shares everything: a reader may look.
    FileStorage::open(
        &p,
        &opts(true, CacheMode::Writeback, LockMode::for_open(true, true)),
    )
    .unwrap();
}

#[test]
fn vdisk_writer_blocks_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(&dir, "m.raw", 1 << 20);
    let ps = p.to_str().unwrap();
    let _s = FileStorage::open(
        &p,
        &opts(
            false,
            CacheMode::Writeback,
            LockMode::for_open(false, false),
        ),
    )
    .unwrap();
    // A reader that wants consistent data (convert) refuses to run under a writer...
    let out = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            ps,
            dir.path().join("out.raw").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    // ...unless it shares everything.
    let out = Command::new("qemu-img")
        .args([
            "convert",
            "-U",
            "-f",
            "raw",
            "-O",
            "raw",
            ps,
            dir.path().join("out.raw").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second writer is refused.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", ps])
        .output()
        .unwrap();
    let all =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(all.contains("Failed to get \"write\" lock"), "{all}");
}

#[test]
fn readers_share() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(&dir, "r.raw", 1 << 20);
    let _a = FileStorage::open(
        &p,
        &opts(true, CacheMode::Writeback, LockMode::for_open(true, false)),
    )
    .unwrap();
    let _b = FileStorage::open(
        &p,
        &opts(true, CacheMode::Writeback, LockMode::for_open(true, false)),
    )
    .unwrap();
    let out = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            p.to_str().unwrap(),
            dir.path().join("out.raw").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // But a writer is refused while consistent readers hold it.
    lock_err(FileStorage::open(
        &p,
        &opts(
            false,
            CacheMode::Writeback,
            LockMode::for_open(false, false),
        ),
    ));
}

#[test]
fn raw_reader_shares_with_a_qemu_writer_unless_consistent() {
    // Like qemu-io -r / qemu-img map on raw: plain readers share; convert's does not.
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(&dir, "n.raw", 1 << 20);
    let _q = QemuIo::hold(&["-f", "raw", p.to_str().unwrap()]);
    let o = vdisk::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let img = vdisk::Image::open(&p, &o).unwrap();
    assert_eq!(img.size(), 1 << 20);
    let o = vdisk::OpenOptions {
        read_only: true,
        consistent_read: true,
        ..Default::default()
    };
    let e = vdisk::Image::open(&p, &o).unwrap_err().to_string();
    assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
}
#[test]
fn trace_rebuilds_crash_images() {
    let s = Arc::new(TraceStorage::new(vec![0u8; 8]));
    s.write_at(&[1, 1], 0).unwrap();
    s.flush().unwrap();
    s.write_at(&[2, 2], 2).unwrap();
    s.write_at(&[3, 3], 4).unwrap();
    s.set_len(16).unwrap();
    let t = s.trace();
    assert!(matches!(t.ops[1], TraceOp::Flush));
    assert_eq!(t.points(), 6);
    // Before the flush nothing is guaranteed; with keep=false nothing survives.
    assert_eq!(t.crash_image(1, |_| false), vec![0u8; 8]);
    assert_eq!(t.crash_image(1, |_| true), vec![1, 1, 0, 0, 0, 0, 0, 0]);
    // After the flush the first write is durable; later ones come and go.
    assert_eq!(t.crash_image(4, |_| false), vec![1, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(t.crash_image(4, |i| i == 3), vec![1, 1, 0, 0, 3, 3, 0, 0]);
    assert_eq!(t.crash_image(5, |_| true).len(), 16);
    assert_eq!(s.contents(), t.crash_image(5, |_| true));
}

#[test]
fn vectored_reads_fill_every_buffer_and_zero_past_eof() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(&dir, "v.raw", 0);
    let s = FileStorage::open(&p, &opts(false, CacheMode::Writeback, LockMode::Off)).unwrap();
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    s.write_at(&data, 0).unwrap();
    let (mut a, mut b, mut c) = ([9u8; 3000], [9u8; 5000], [9u8; 4000]);
    {
        let mut bufs: [&mut [u8]; 3] = [&mut a, &mut b, &mut c];
        s.read_vectored_at(&mut bufs, 100).unwrap();
    }
    let mut got = a.to_vec();
    got.extend_from_slice(&b);
    got.extend_from_slice(&c);
    let mut want = data[100..].to_vec();
    want.resize(12_000, 0);
    assert_eq!(got, want);
}
