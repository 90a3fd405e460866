//! `vdisk serve --fuse`: the image as one regular file, checked from the host with
//! plain system calls and against qemu-img/qemu-io on the image afterwards.

mod cli_support;

use cli_support::{ok, qemu_img};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

struct Mounted {
    child: Child,
    mp: PathBuf,
}

impl Mounted {
    /// `vdisk serve --fuse MP ARGS IMAGE`; waits until the file shows `size`.
    fn start(mp: &Path, args: &[&str], image: &Path, size: u64) -> Mounted {
        std::fs::write(mp, b"").unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .args(["serve", "--fuse", s(mp)])
            .args(args)
            .arg(image)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut m = Mounted {
            child,
            mp: mp.to_path_buf(),
        };
        let until = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(mp).map(|m| m.len()).unwrap_or(0) != size {
            if let Ok(Some(st)) = m.child.try_wait() {
                panic!("vdisk serve --fuse exited ({st}) before mounting");
            }
            assert!(Instant::now() < until, "never mounted");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }
    fn stop(mut self) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let st = self.child.wait().unwrap();
        assert!(st.success(), "vdisk serve --fuse: {st}");
        assert_eq!(
            std::fs::metadata(&self.mp).unwrap().len(),
            0,
            "still mounted"
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lseek(fd: i32, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: lseek on a descriptor we own.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

fn fallocate(fd: i32, mode: i32, off: i64, len: i64) -> Result<(), i32> {
    // SAFETY: fallocate on a descriptor we own.
    let r = unsafe { libc::fallocate(fd, mode, off, len) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

#[test]
fn fuse_file_reads_writes_punches_zeroes_and_seeks() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "t.qcow2", "16M"]),
        "create",
    );
    let img = dir.join("t.qcow2");
    let mp = dir.join("mp");
    let m = Mounted::start(&mp, &["-f", "qcow2", "--discard=unmap"], &img, 16 << 20);
    let f = OpenOptions::new().read(true).write(true).open(&mp).unwrap();
    let fd = f.as_raw_fd();
    // Empty image: no data at all.
    assert_eq!(lseek(fd, 0, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(lseek(fd, 0, libc::SEEK_HOLE), Ok(0));
    let pat: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&pat, 1 << 20).unwrap();
    f.sync_all().unwrap();
    assert_eq!(lseek(fd, 0, libc::SEEK_DATA), Ok(1 << 20));
    assert_eq!(lseek(fd, 1 << 20, libc::SEEK_HOLE), Ok(4 << 20));
    assert_eq!(lseek(fd, 16 << 20, libc::SEEK_DATA), Err(libc::ENXIO));
    // Punch a hole (discard) and zero a range.
    fallocate(
        fd,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        2 << 20,
        1 << 20,
    )
    .unwrap();
    fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, (3 << 20) + 4096, 8192).unwrap();
    f.sync_all().unwrap();
    assert_eq!(lseek(fd, 2 << 20, libc::SEEK_DATA), Ok(3 << 20));
    let mut back = vec![0u8; 3 << 20];
    f.read_exact_at(&mut back, 1 << 20).unwrap();
    let mut want = pat.clone();
    want[1 << 20..2 << 20].fill(0);
    want[(2 << 20) + 4096..(2 << 20) + 4096 + 8192].fill(0);
    assert!(back == want, "contents after punch and zero range");
    // Not growable: a write past the end fails, one across the end is cut.
    assert!(f.write_at(b"x", 16 << 20).is_err());
    assert_eq!(f.write_at(&[7u8; 100], (16 << 20) - 10).unwrap(), 10);
    // Truncation is refused.
    assert!(f.set_len(1 << 20).is_err());
    drop(f);
    m.stop();
    // The image: clean, and the same bytes as the host saw.
    let r = qemu_img(dir, &["check", s(&img)]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    let raw = dir.join("want.raw");
    let mut full = vec![0u8; 16 << 20];
    full[1 << 20..4 << 20].copy_from_slice(&want);
    full[(16 << 20) - 10..].fill(7);
    std::fs::write(&raw, &full).unwrap();
    let r = qemu_img(
        dir,
        &["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&raw)],
    );
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    // The punched MiB is deallocated in the qcow2 file.
    let map = ok(qemu_img(dir, &["map", "--output=json", s(&img)]), "map");
    assert!(
        map.contains("\"start\": 2097152, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"),
        "{map}"
    );
}

#[test]
fn fuse_read_only_growable_and_bad_mountpoint() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]),
        "create",
    );
    let img = dir.join("r.raw");
    let mp = dir.join("mp");
    let m = Mounted::start(&mp, &["-f", "raw", "-r"], &img, 1 << 20);
    assert!(OpenOptions::new().write(true).open(&mp).is_err());
    let f = OpenOptions::new().read(true).open(&mp).unwrap();
    let mut b = [1u8; 512];
    f.read_exact_at(&mut b, 4096).unwrap();
    assert_eq!(b, [0u8; 512]);
    drop(f);
    m.stop();

    // Growable: a write past the end grows the image.
    let m = Mounted::start(&mp, &["-f", "raw", "--growable"], &img, 1 << 20);
    let f = OpenOptions::new().read(true).write(true).open(&mp).unwrap();
    f.write_all_at(b"tail", 3 << 20).unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), (3 << 20) + 4);
    drop(f);
    m.stop();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), (3 << 20) + 4);

    // A directory is not a mount point for this export.
    let out = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["serve", "--fuse", s(dir), "-f", "raw", s(&img)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a regular file"), "{err}");
}
