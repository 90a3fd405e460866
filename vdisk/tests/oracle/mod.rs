//! Running the qemu tools that serve as test oracles. Shared by the format test helpers.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs a command, panicking with its output if it fails; returns its stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let (code, out, err) = run_status(cmd, args);
    assert!(code == 0, "{cmd} {args:?} failed: {out}{err}");
    out
}

/// Runs a command and returns (exit code, stdout, stderr).
///
/// A QEMU tool refused an image lock is run again for up to a second: a test that
/// closed its `Image` a moment ago may still have its lock held by a child that
/// another test thread of the same binary is forking (the child holds a copy of every
/// descriptor, and so the open file description and its OFD locks, until its `exec`
/// closes them). No test here expects a lock refusal from this runner.
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let mut tries = 0;
    loop {
        let out = Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
        let r = (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        let refused = r.0 != 0 && r.2.contains("Failed to get") && r.2.contains("lock");
        if !refused || tries >= 50 {
            return r;
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A temp path as the `&str` command lines want.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}
