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
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A temp path as the `&str` command lines want.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}
