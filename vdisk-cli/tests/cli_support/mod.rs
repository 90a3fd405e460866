//! Helpers for the CLI tests: run `vdisk` and the qemu tools side by side.
#![allow(dead_code)]

pub mod garage;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Output of one command.
pub struct Run {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub out: String,
    /// Standard error.
    pub err: String,
}

/// A finished process's status and output.
pub fn collect(o: Output) -> Run {
    Run {
        code: o.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs `vdisk args...` in `dir`.
pub fn vdisk(dir: &Path, args: &[&str]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run vdisk");
    collect(o)
}

/// Runs `prog args` in `dir` under `timeout 60` with no input (a hang fails the
/// test: exit 124, or 137 when it had to be killed).
pub fn run_limited(dir: &Path, prog: &str, args: &[&str]) -> Run {
    // KILL 10 s after the TERM: a process stuck in a request may not end on TERM.
    let o = Command::new("timeout")
        .args(["-k", "10", "60"])
        .arg(prog)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"));
    collect(o)
}

/// Runs `qemu-img args...` in `dir`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Run {
    let o = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run qemu-img");
    collect(o)
}

/// Runs `qemu-io args...` in `dir`, whatever its outcome.
pub fn qemu_io_run(dir: &Path, args: &[&str]) -> Run {
    let o = Command::new("qemu-io")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run qemu-io");
    collect(o)
}

/// Runs `qemu-io` with `-c` commands on an image in `dir`; panics when it fails.
pub fn qemu_io(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(file);
    let r = collect(c.output().expect("run qemu-io"));
    assert_eq!(r.code, 0, "qemu-io {cmds:?} on {file}: {}{}", r.out, r.err);
    assert!(
        !r.out.contains("failed") && !r.err.contains("failed"),
        "qemu-io {cmds:?}: {}{}",
        r.out,
        r.err
    );
}

/// A fresh temporary directory.
/// `qemu-img create -q -f FMT -b BASE -F BASE_FMT TOP` in `dir`, which must succeed.
pub fn qemu_overlay(dir: &Path, fmt: &str, base: &str, base_fmt: &str, top: &str) {
    ok(
        qemu_img(
            dir,
            &["create", "-q", "-f", fmt, "-b", base, "-F", base_fmt, top],
        ),
        "create overlay",
    );
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// `dir/name`.
pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Asserts a command succeeded and returns its stdout.
pub fn ok(r: Run, what: &str) -> String {
    assert_eq!(
        r.code, 0,
        "{what} failed: stdout={} stderr={}",
        r.out, r.err
    );
    r.out
}

/// Parses JSON output.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// Removes the keys that legitimately differ between two runs on the same image
/// (allocation on the host can change between the two commands).
pub fn strip_keys(v: &mut serde_json::Value, keys: &[&str]) {
    match v {
        serde_json::Value::Object(m) => {
            for k in keys {
                m.remove(*k);
            }
            for (_, x) in m.iter_mut() {
                strip_keys(x, keys);
            }
        }
        serde_json::Value::Array(a) => {
            for x in a {
                strip_keys(x, keys);
            }
        }
        _ => {}
    }
}

/// Writes a deterministic pattern file of `len` bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2654435761).rotate_left(7) as u8) ^ seed)
        .collect()
}

/// `top.qcow2` over the (remote) `backing` created and written (`writes`, qemu-io
/// commands) by vdisk, and `ref.qcow2` over `local_backing`, the same image as a local
/// file, given the same writes by qemu-io: the two must then read the same.
pub fn remote_overlay(dir: &Path, backing: &str, local_backing: &str, writes: &[&str]) {
    ok(
        vdisk(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                backing,
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        ),
        "create overlay over a remote backing",
    );
    let mut a = vec!["io"];
    for w in writes {
        a.push("-c");
        a.push(w);
    }
    a.push("top.qcow2");
    let out = ok(vdisk(dir, &a), "write the overlay");
    assert!(!out.contains("failed"), "{out}");
    qemu_overlay(dir, "qcow2", local_backing, "qcow2", "ref.qcow2");
    qemu_io(dir, "qcow2", "ref.qcow2", writes);
}

/// `qemu-io` holding `file` open (read-write unless `ro`) until dropped.
pub struct Holder(std::process::Child);

impl Holder {
    pub fn new(dir: &std::path::Path, fmt: &str, file: &str, ro: bool) -> Holder {
        Holder::spawn("qemu-io", dir, fmt, file, ro)
    }

    /// `vdisk io` holding the image, for the other direction.
    pub fn vdisk(dir: &std::path::Path, fmt: &str, file: &str, ro: bool) -> Holder {
        Holder::spawn(env!("CARGO_BIN_EXE_vdisk"), dir, fmt, file, ro)
    }

    fn spawn(prog: &str, dir: &std::path::Path, fmt: &str, file: &str, ro: bool) -> Holder {
        let mut c = std::process::Command::new(prog);
        if prog != "qemu-io" {
            c.arg("io");
        }
        c.current_dir(dir).args(["-f", fmt]);
        if ro {
            c.arg("-r");
        }
        let mut child = c
            .arg(file)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        // A command round trip proves the image is open (and locked).
        use std::io::{BufRead, BufReader, Write};
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(b"length\n").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        while !line.contains("MiB") && !line.contains("KiB") && !line.contains("bytes") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "qemu-io exited");
        }
        // Keep stdout drained in the background.
        std::thread::spawn(move || for _ in out.lines() {});
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
