//! `vdisk storage-daemon`: several exports in one process, checked with qemu-io over
//! NBD and plain reads of a FUSE export; SIGTERM stops them all.

mod cli_support;

use cli_support::{ok, qemu_img, qemu_io_run};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < until, "{what} never happened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the daemon if the test fails half-way.
struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn nbd_and_fuse_exports_of_two_images_in_one_process() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "8M"]),
        "create a",
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "b.raw", "4M"]),
        "create b",
    );
    let r = qemu_io_run(dir, &["-f", "raw", "-c", "write -P 0x5b 0 64k", "b.raw"]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    let (a, b) = (dir.join("a.qcow2"), dir.join("b.raw"));
    let (na, nb, mp) = (dir.join("a.nbd"), dir.join("b.nbd"), dir.join("a.view"));
    std::fs::write(&mp, b"").unwrap();
    let mut child = Kill(
        Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .arg("storage-daemon")
            .args([
                "--export",
                &format!(
                    "type=nbd,image={},addr.path={},writable=on,format=qcow2,id=a",
                    s(&a),
                    s(&na)
                ),
                "--export",
                &format!("type=fuse,image={},mountpoint={}", s(&a), s(&mp)),
                "--export",
                &format!(
                    "type=nbd,image={},addr.path={},name=bee,format=raw",
                    s(&b),
                    s(&nb)
                ),
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("listening and mounted", || {
        na.exists()
            && nb.exists()
            && std::fs::metadata(&mp).map(|m| m.len()).unwrap_or(0) == 8 << 20
    });
    // Write image a over NBD (several clients may come and go: the export persists).
    let ua = format!("nbd+unix:///a?socket={}", s(&na));
    for _ in 0..2 {
        let r = qemu_io_run(dir, &["-f", "raw", "-c", "write -P 0xa1 1M 64k", &ua]);
        assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    }
    // ... and see it through the FUSE export of the same open image.
    let view = std::fs::read(&mp).unwrap();
    assert!(view[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0xa1));
    assert!(view[..1 << 20].iter().all(|&x| x == 0));
    // The FUSE export is read-only (writable=off by default).
    assert!(std::fs::OpenOptions::new().write(true).open(&mp).is_err());
    // Image b, read-only over NBD under its own name.
    let ub = format!("nbd+unix:///bee?socket={}", s(&nb));
    let r = qemu_io_run(dir, &["-r", "-f", "raw", "-c", "read -P 0x5b 0 64k", &ub]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    assert!(!r.out.contains("fail"), "{}", r.out);
    let r = qemu_io_run(dir, &["-f", "raw", "-c", "write 0 4k", &ub]);
    assert!(
        r.code != 0
            || r.out.contains("fail")
            || r.err.contains("read-only")
            || r.err.contains("Read-only")
            || r.out.contains("denied"),
        "{}{}",
        r.out,
        r.err
    );
    // SIGTERM stops every export.
    // SAFETY: kill(2) on our own unreaped child.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGTERM);
    }
    let st = child.0.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(!na.exists() && !nb.exists(), "sockets left behind");
    assert_eq!(std::fs::metadata(&mp).unwrap().len(), 0, "still mounted");
    let r = qemu_img(dir, &["check", s(&a)]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    let r = qemu_io_run(dir, &["-f", "qcow2", "-c", "read -P 0xa1 1M 64k", s(&a)]);
    assert!(!r.out.contains("fail"), "{}", r.out);
}

#[test]
fn bad_export_options_are_refused() {
    let d = tempfile::tempdir().unwrap();
    for (args, msg) in [
        (
            vec!["--export", "type=nbd,addr.path=/x"],
            "'image' is missing",
        ),
        (vec!["--export", "type=ftp,image=x"], "unknown export type"),
        (
            vec!["--export", "type=nbd,image=x,addr.path=/s,colour=red"],
            "Invalid parameter 'colour'",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .arg("storage-daemon")
            .args(&args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}
