//! A full disk (issue 14, part 5): images on a small size-limited tmpfs the test
//! mounts (it must run as root; without the mount it fails, it never skips). Allocating
//! writes through `vdisk io`, `vdisk convert`, and writes of NBD clients to `vdisk
//! serve` fill it up: ENOSPC reaches the caller (as ENOSPC over NBD too), every write
//! acknowledged before reads back, `qemu-img check` finds the image consistent, and
//! writing resumes once space is freed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");
const MIB: u64 = 1 << 20;

fn tool(prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(prog: &str, args: &[&str]) -> String {
    let o = tool(prog, args);
    assert!(o.status.success(), "{prog} {args:?}: {}", text(&o));
    text(&o)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tmpfs of `mib` MiB mounted for the test, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("small");
        std::fs::create_dir(&dir).unwrap();
        let o = tool(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                s(&dir),
            ],
        );
        assert!(
            o.status.success(),
            "the full-disk tests mount a size-limited tmpfs and must run as root: {}",
            text(&o)
        );
        Tmpfs {
            dir,
            _parent: parent,
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    /// Fills all but about `left` bytes with a file that `free` removes.
    fn fill(&self, left: u64) {
        let avail = free_bytes(&self.dir);
        let n = avail.saturating_sub(left);
        std::fs::write(self.path("filler"), vec![0xaa; n as usize]).unwrap();
    }
    fn free(&self) {
        std::fs::remove_file(self.path("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let o = tool("umount", &[s(&self.dir)]);
        if !o.status.success() {
            let _ = tool("umount", &["-l", s(&self.dir)]);
        }
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let out = ok("stat", &["-f", "-c", "%a %S", s(dir)]);
    let v: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    v[0] * v[1]
}

/// `qemu-img check`: no corruption; returns the leaked clusters.
fn check(img: &Path) -> u64 {
    let o = tool("qemu-img", &["check", "--output=json", s(img)]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("qemu-img check {}: {e}: {}", s(img), text(&o)));
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    assert_eq!(n("corruptions"), 0, "{}: {out}", s(img));
    assert_eq!(n("check-errors"), 0, "{}: {out}", s(img));
    n("leaks")
}

/// Runs `write -P pattern` commands of 1 MiB each (pattern i+1 at i MiB), then a
/// flush, with `prog ARGS` (vdisk io or qemu-io) on `target`; returns which writes were
/// acknowledged, asserting every failure is ENOSPC.
fn fill_writes(prog: &str, pre: &[&str], target: &str, n: u64) -> Vec<bool> {
    let mut args: Vec<String> = pre.iter().map(|s| s.to_string()).collect();
    for i in 0..n {
        args.push("-c".into());
        args.push(format!("write -P {} {} {MIB}", i + 1, i * MIB));
    }
    args.push("-c".into());
    args.push("flush".into());
    args.push(target.into());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = tool(prog, &a);
    let out = text(&o);
    let mut acked = Vec::new();
    for line in out.lines() {
        if line.starts_with("wrote ") {
            acked.push(true);
        } else if line.contains("write failed") {
            assert!(
                line.ends_with("write failed: No space left on device"),
                "{prog}: a write failed otherwise than ENOSPC: {out}"
            );
            acked.push(false);
        }
    }
    assert_eq!(acked.len() as u64, n, "{prog} {a:?}: {out}");
    acked
}

fn verify(img: &Path, fmt: &str, acked: &[bool]) {
    for (i, _) in acked.iter().enumerate().filter(|(_, a)| **a) {
        let c = format!("read -P {} {} {MIB}", i + 1, i as u64 * MIB);
        let out = ok("qemu-io", &["-f", fmt, "-r", "-c", &c, s(img)]);
        assert!(
            !out.contains("failed") && !out.contains("verification"),
            "acknowledged write {i} lost: {out}"
        );
    }
}

fn allocating_writes_fill_the_disk(fmt: &str) {
    let fs = Tmpfs::mount(12);
    let img = fs.path(&format!("d.{fmt}"));
    ok(VDISK, &["create", "-q", "-f", fmt, s(&img), "64M"]);
    fs.fill(3 * MIB);
    let acked = fill_writes(VDISK, &["io"], s(&img), 8);
    assert!(acked.iter().any(|a| *a), "no write fitted: {acked:?}");
    assert!(
        acked.iter().any(|a| !*a),
        "the disk never filled up: {acked:?}"
    );
    // qcow2 refuses a write it has no space for without leaking; QED grows the file
    // for each allocation and keeps the clusters a partly written refused write left
    // (qemu-io leaks them too).
    let leaks_ok = fmt == "qed";
    let leaks = check(&img);
    assert!(
        leaks == 0 || leaks_ok,
        "{fmt}: a write refused for lack of space leaked {leaks} clusters"
    );
    verify(&img, fmt, &acked);
    // Space freed: the refused writes go through, and the image stays consistent.
    fs.free();
    let again = fill_writes(VDISK, &["io"], s(&img), 8);
    assert!(
        again.iter().all(|a| *a),
        "writing did not resume: {again:?}"
    );
    assert!(check(&img) == 0 || leaks_ok);
    verify(&img, fmt, &again);
}

#[test]
fn qcow2_allocating_writes_on_a_full_disk() {
    allocating_writes_fill_the_disk("qcow2");
}

#[test]
fn qed_allocating_writes_on_a_full_disk() {
    allocating_writes_fill_the_disk("qed");
}

#[test]
fn convert_to_a_full_disk_fails_with_enospc_and_succeeds_after_freeing() {
    let fs = Tmpfs::mount(12);
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("src.raw");
    // Incompressible, so no format can make it small.
    let data: Vec<u8> = (0..6 * MIB).map(|_| rand::random::<u8>()).collect();
    std::fs::write(&src, &data).unwrap();
    fs.fill(3 * MIB);
    let dst = fs.path("dst.qcow2");
    let o = tool(VDISK, &["convert", "-O", "qcow2", s(&src), s(&dst)]);
    assert!(!o.status.success(), "convert fitted 6 MiB into 3");
    assert!(
        text(&o).contains("No space left on device"),
        "convert did not report ENOSPC: {}",
        text(&o)
    );
    // What was written is a consistent image (leaks allowed: the copy stopped).
    check(&dst);
    fs.free();
    ok(VDISK, &["convert", "-O", "qcow2", s(&src), s(&dst)]);
    assert_eq!(check(&dst), 0);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&dst)],
    );
}

/// A running `vdisk serve` on a Unix socket, killed on drop.
struct Server(Child, PathBuf);

impl Server {
    fn start(dir: &Path, img: &Path, fmt: &str) -> Server {
        let sock = dir.join("nbd.sock");
        let pid = dir.join("serve.pid");
        let child = Command::new(VDISK)
            .args([
                "serve",
                "-t",
                "-f",
                fmt,
                "-k",
                s(&sock),
                "--pid-file",
                s(&pid),
                s(img),
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn vdisk serve");
        let until = Instant::now() + Duration::from_secs(20);
        while !pid.exists() {
            assert!(Instant::now() < until, "vdisk serve did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Server(child, sock)
    }
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", s(&self.1))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: the server flushes and closes the image.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nbd_clients_see_enospc_and_resume_after_freeing() {
    let fs = Tmpfs::mount(12);
    let sock_dir = tempfile::tempdir().unwrap();
    let img = fs.path("n.qcow2");
    ok(VDISK, &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    fs.fill(3 * MIB);
    let acked;
    {
        let srv = Server::start(sock_dir.path(), &img, "qcow2");
        acked = fill_writes("qemu-io", &["-f", "raw"], &srv.uri(), 8);
        assert!(
            acked.iter().any(|a| *a) && acked.iter().any(|a| !*a),
            "{acked:?}"
        );
        fs.free();
        let again = fill_writes("qemu-io", &["-f", "raw"], &srv.uri(), 8);
        assert!(
            again.iter().all(|a| *a),
            "writing over NBD did not resume: {again:?}"
        );
    }
    assert_eq!(check(&img), 0);
    verify(&img, "qcow2", &[true; 8]);
}
