//! `aio=io_uring` against `aio=threads`: the same workload through either engine makes
//! the same image, bit for bit as qemu-io's, and both pass `qemu-img check`, with the
//! page cache and with O_DIRECT. (The fallback to threads when the kernel refuses
//! io_uring is `aio_fallback.rs`: it changes the environment of its process.)

mod qcow2_util;

use qcow2_util::*;
use std::io::{IoSlice, IoSliceMut};
use vdisk::storage::{CacheMode, FileStorage, LockMode, OpenFileOptions, Storage};
use vdisk::{Image, OpenOptions};

/// (offset, length, byte): allocating, in-place, unaligned, multi-cluster writes.
const WRITES: &[(u64, u64, u8)] = &[
    (0, 4096, 0x11),
    (65536 + 32768, 4096, 0x22),
    (5 * 65536 + 1000, 512, 0x44),
    (7 * 65536 + 100, 3, 0x55),
    (9 * 65536 - 8192, 16384, 0x66),
    (20 * 65536 + 4096, 3 << 20, 0x77),
    (4096, 4096, 0x88),
    (900 * 65536 + 12288, 4096, 0xaa),
];

fn json_name(path: &std::path::Path, aio: &str) -> String {
    format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}","aio":"{aio}"}}}}"#,
        p(path)
    )
}

fn workload(path: &std::path::Path, aio: &str, cache: CacheMode) {
    let img = Image::open(
        json_name(path, aio),
        &OpenOptions {
            cache,
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {aio} {cache:?}: {e}"));
    for &(o, l, b) in WRITES {
        let data = vec![b; l as usize];
        let cut = (l / 2) as usize;
        img.write_vectored(&[IoSlice::new(&data[..cut]), IoSlice::new(&data[cut..])], o)
            .unwrap();
        // Read back through the same engine, in two pieces.
        let mut x = vec![0u8; cut];
        let mut y = vec![0u8; l as usize - cut];
        img.read_vectored(&mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)], o)
            .unwrap();
        assert!(
            x.iter().chain(y.iter()).all(|&v| v == b),
            "{aio}: read back at {o}"
        );
    }
    img.flush().unwrap();
    img.close().unwrap();
}

#[test]
fn io_uring_and_threads_make_identical_images() {
    let d = tmp();
    let want = path(&d, "qemu.qcow2");
    qemu_create(&want, "", "64M");
    let cmds: Vec<String> = WRITES
        .iter()
        .map(|(o, l, b)| format!("write -P {b} {o} {l}"))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(&want, &refs);
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let mut made = Vec::new();
        for aio in ["threads", "io_uring"] {
            let img = path(&d, &format!("{aio}-{cache:?}.qcow2"));
            qemu_create(&img, "", "64M");
            workload(&img, aio, cache);
            assert_clean(&img);
            made.push(img);
        }
        for img in &made {
            let (code, out, err) = run_status("qemu-img", &["compare", p(&want), p(img)]);
            assert_eq!(code, 0, "compare {}: {out}{err}", p(img));
        }
        let (code, out, err) = run_status("qemu-img", &["compare", p(&made[0]), p(&made[1])]);
        assert_eq!(code, 0, "threads vs io_uring: {out}{err}");
    }
}

#[test]
fn io_uring_is_used_where_the_kernel_allows_it() {
    // This machine's kernel allows io_uring: the engine must really be in use (a test
    // that fell back silently would prove nothing about io_uring).
    let d = tmp();
    let f = path(&d, "u.raw");
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let st = FileStorage::open(
            &f,
            &OpenFileOptions {
                read_only: false,
                cache,
                lock: LockMode::for_open(false, false),
                create: true,
            },
        )
        .unwrap();
        let (st, on) = st.with_io_uring();
        assert!(
            on,
            "io_uring refused by this kernel: the io_uring tests cannot run"
        );
        assert!(st.uses_io_uring());
        let mut buf = vdisk::storage::pool::get(8192);
        buf.fill(0x5c);
        st.write_at(&buf, 4096).unwrap();
        st.write_at(b"tail", 4096 + 8192).unwrap();
        st.flush().unwrap();
        let mut back = vec![0u8; 8192 + 4096 + 100];
        st.read_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..4096 + 8192].iter().all(|&b| b == 0x5c));
        assert_eq!(&back[4096 + 8192..4096 + 8196], b"tail");
        assert!(
            back[4096 + 8196..].iter().all(|&b| b == 0),
            "past the end reads zero"
        );
        assert_eq!(st.len().unwrap(), 4096 + 8196);
        // A long iovec list (more entries than one submission entry takes).
        let pieces: Vec<Vec<u8>> = (0..3000).map(|i| vec![(i % 251) as u8; 512]).collect();
        let refs: Vec<&[u8]> = pieces.iter().map(|v| v.as_slice()).collect();
        st.write_vectored_at(&refs, 1 << 20).unwrap();
        let mut got = vec![0u8; 3000 * 512];
        st.read_at(&mut got, 1 << 20).unwrap();
        assert!(got == pieces.concat());
        drop(st);
        std::fs::remove_file(&f).unwrap();
    }
}

/// The bytes of a direct range, read on its descriptor as the NBD server would.
fn read_range(r: &vdisk::image::DirectIo<'_>) -> vdisk::storage::pool::AlignedBuf {
    let mut b = vdisk::storage::pool::get(r.len() as usize);
    // SAFETY: pread into an owned, aligned buffer of the right length.
    let n = unsafe { libc::pread(r.fd(), b.as_mut_ptr().cast(), b.len(), r.host() as i64) };
    assert_eq!(n as u64, r.len());
    b
}

/// Direct ranges (`Image::direct`, what the NBD server submits to its own io_uring):
/// handed out only for allocated data on an O_DIRECT file, aligned, and a write's range
/// holds the in-place guard, so a discard of those clusters waits until it is dropped.
#[test]
fn direct_ranges_only_for_allocated_aligned_odirect_data() {
    let d = tmp();
    let f = path(&d, "d.qcow2");
    qemu_create(&f, "", "16M");
    qemu_io(&f, &["write -P 0x5a 0 256k"]);
    let open = |cache| {
        Image::open(
            &f,
            &OpenOptions {
                cache,
                ..OpenOptions::default()
            },
        )
        .unwrap()
    };
    {
        let img = open(CacheMode::Writeback);
        assert!(
            img.direct(0, 4096, false).is_none(),
            "page cache: ordinary path"
        );
    }
    let img = std::sync::Arc::new(open(CacheMode::None));
    let r = img
        .direct(4096, 8192, false)
        .expect("allocated, aligned read");
    assert_eq!(r.len(), 8192);
    assert!(r.host() >= 65536 && r.host().is_multiple_of(4096), "{r:?}");
    // The host bytes are the guest's: read them on the descriptor as the server would.
    assert!(read_range(&r).iter().all(|&x| x == 0x5a));
    r.finish(true);
    assert!(img.direct(1 << 20, 4096, false).is_none(), "unallocated");
    assert!(img.direct(512, 4096, false).is_none(), "unaligned offset");
    assert!(img.direct(0, 1000, false).is_none(), "unaligned length");
    assert!(
        img.direct(192 << 10, 128 << 10, false).is_none(),
        "partly unallocated"
    );
    assert!(img.direct(0, 4096, true).is_some(), "in-place write");
    assert!(
        img.direct(1 << 20, 4096, true).is_none(),
        "allocating write"
    );

    // A held write range keeps a discard of its cluster waiting.
    let w = img.direct(65536, 4096, true).expect("in-place write");
    let img2 = img.clone();
    let t = std::thread::spawn(move || img2.discard(65536, 65536).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!t.is_finished(), "discard waits for the in-place guard");
    w.finish(true);
    t.join().unwrap();
    assert!(img.direct(65536, 4096, false).is_none(), "discarded");
    img.close().unwrap();
    drop(img);
    assert_clean(&f);
}

/// QED hands out direct ranges too (allocated data on an O_DIRECT file), and a held
/// range keeps a shrinking resize, which moves clusters to compact the file, waiting
/// until it is dropped; while the resize waits, no new range starts (those requests
/// take the ordinary path). The data written through the ranges and the shrunk image
/// are what qemu-img sees.
#[test]
fn qed_direct_ranges_and_a_shrink_waiting_for_them() {
    let d = tmp();
    let f = path(&d, "d.qed");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "cluster_size=65536",
            p(&f),
            "16M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qed",
            "-c",
            "write -P 0x5a 0 256k",
            "-c",
            "write -P 0x6b 8M 64k",
            p(&f),
        ],
    );
    let img = std::sync::Arc::new(
        Image::open(
            &f,
            &OpenOptions {
                cache: CacheMode::None,
                ..OpenOptions::default()
            },
        )
        .unwrap(),
    );
    let r = img
        .direct(4096, 8192, false)
        .expect("allocated, aligned read");
    assert!(read_range(&r).iter().all(|&x| x == 0x5a));
    r.finish(true);
    assert!(img.direct(1 << 20, 4096, false).is_none(), "unallocated");
    assert!(
        img.direct(1 << 20, 4096, true).is_none(),
        "allocating write"
    );
    assert!(
        img.direct(192 << 10, 128 << 10, false).is_none(),
        "partly unallocated"
    );
    assert!(img.direct(512, 4096, false).is_none(), "unaligned offset");

    // An in-place write through a range, held while a shrink starts.
    let w = img.direct(65536, 4096, true).expect("in-place write");
    let mut data = vdisk::storage::pool::get(4096);
    data.fill(0x7c);
    // SAFETY: pwrite from an owned, aligned buffer of the right length.
    let n = unsafe { libc::pwrite(w.fd(), data.as_ptr().cast(), 4096, w.host() as i64) };
    assert_eq!(n, 4096);
    let img2 = img.clone();
    let t = std::thread::spawn(move || img2.resize(4 << 20, true).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!t.is_finished(), "the shrink waits for the direct range");
    assert!(
        img.direct(0, 4096, false).is_none(),
        "no range starts while it waits"
    );
    w.finish(true);
    t.join().unwrap();
    assert_eq!(img.size(), 4 << 20);
    let r = img.direct(0, 4096, false).expect("ranges start again");
    r.finish(true);
    img.flush().unwrap();
    img.close().unwrap();
    drop(img);
    run("qemu-img", &["check", "-q", "-f", "qed", p(&f)]);
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qed",
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "read -P 0x7c 64k 4k",
            "-c",
            "read -P 0x5a 68k 188k",
            "-c",
            "read -P 0 256k 3840k",
            p(&f),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
}
