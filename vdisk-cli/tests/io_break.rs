//! qemu-io's breakpoint commands (`break`, `wait_break`, `resume`, `remove_break`) with
//! asynchronous requests held at blkdebug events, beside qemu-io 10 on the same
//! scripts: the same lines (blkdebug's "Suspended"/"Resuming" too), the same exit
//! code, and images qemu-img finds clean with the data each request wrote.

mod cli_support;

use cli_support::*;
use std::path::Path;
use std::process::Command;

/// Runs `cmds` on `blkdebug::FILE` with one tool; the lines with timing and the
/// tool's name made neutral, and the exit code. A script that would hang qemu-io is
/// cut by `timeout` (and then fails the comparison loudly).
fn script(dir: &Path, vdisk: bool, file: &str, cmds: &[&str]) -> (Vec<String>, i32) {
    let mut c = Command::new("timeout");
    c.arg("120");
    if vdisk {
        c.arg(env!("CARGO_BIN_EXE_vdisk")).arg("io");
    } else {
        c.arg("qemu-io");
    }
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c
        .arg(format!("blkdebug::{file}"))
        .current_dir(dir)
        .output()
        .expect("run the tool");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    let lines = text
        .lines()
        .map(|l| match l.find(", 1 ops; ") {
            Some(i) => l[..i].to_string(),
            None => l.replace("qemu-io:", "TOOL:").replace("vdisk:", "TOOL:"),
        })
        .collect();
    (lines, o.status.code().unwrap_or(-1))
}

/// Makes `top.qcow2` (over `base.qcow2` holding 0x03 in its first cluster when
/// `backing`) fresh in `dir`.
fn fresh(dir: &Path, backing: bool) {
    for f in ["base.qcow2", "top.qcow2"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    if backing {
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]),
            "base",
        );
        qemu_io(dir, "qcow2", "base.qcow2", &["write -P 3 0 64k"]);
        qemu_overlay(dir, "qcow2", "base.qcow2", "qcow2", "top.qcow2");
    } else {
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", "top.qcow2", "1M"]),
            "top",
        );
    }
}

/// The script on a fresh image with each tool: same output and exit code, clean
/// images, equal contents.
fn same_as_qemu(backing: bool, cmds: &[&str]) {
    let d = tmp();
    let dir = d.path();
    fresh(dir, backing);
    let theirs = script(dir, false, "top.qcow2", cmds);
    ok(qemu_img(dir, &["check", "top.qcow2"]), "check qemu's image");
    std::fs::rename(dir.join("top.qcow2"), dir.join("qemu.qcow2")).expect("rename");
    fresh(dir, backing);
    let ours = script(dir, true, "top.qcow2", cmds);
    assert_eq!(ours, theirs, "vdisk io vs qemu-io: {cmds:?}");
    ok(
        qemu_img(dir, &["check", "top.qcow2"]),
        "check vdisk's image",
    );
    ok(
        qemu_img(dir, &["compare", "top.qcow2", "qemu.qcow2"]),
        "compare",
    );
}

#[test]
fn break_resume_and_errors_as_qemu_io() {
    same_as_qemu(
        false,
        &[
            "break foo A",
            "resume A",
            "remove_break A",
            "break write_aio A",
            "aio_write -P 1 0 4k",
            "wait_break A",
            "write -P 2 64k 4k",
            "resume A",
            "aio_flush",
            "read -P 1 0 4k",
            "read -P 2 64k 4k",
            "break write_aio B",
            "remove_break B",
        ],
    );
}

#[test]
fn remove_break_resumes_and_aio_read_stops_at_read_aio() {
    same_as_qemu(
        false,
        &[
            "break write_aio A",
            "aio_write -P 1 0 4k",
            "wait_break A",
            "remove_break A",
            "aio_flush",
            "break read_aio A",
            "aio_read -P 1 0 4k",
            "wait_break A",
            "resume A",
            "aio_flush",
            "resume A",
        ],
    );
}

#[test]
fn a_second_allocation_of_the_held_cluster_waits_for_the_first() {
    same_as_qemu(
        false,
        &[
            "break write_aio A",
            "aio_write -P 1 0 4k",
            "wait_break A",
            "aio_write -P 5 8k 4k",
            "resume A",
            "aio_flush",
            "read -P 5 8k 4k",
            "read -P 1 0 4k",
            "read -P 0 4k 4k",
        ],
    );
}

#[test]
fn copy_on_write_from_the_backing_file_held_at_cow_read() {
    same_as_qemu(
        true,
        &[
            "break cow_read A",
            "aio_write -P 9 4k 4k",
            "wait_break A",
            "resume A",
            "aio_flush",
            "read -P 9 4k 4k",
            "read -P 3 0 4k",
            "read -P 3 8k 56k",
            "break read_aio B",
            "aio_read -P 7 0 4k",
            "wait_break B",
            "resume B",
            "aio_flush",
        ],
    );
}

/// qemu-io never exits while a request is held (it waits for it forever); vdisk lets
/// held requests go at close, so the write lands and the image is clean.
#[test]
fn closing_lets_a_held_request_finish() {
    let d = tmp();
    let dir = d.path();
    fresh(dir, false);
    let (lines, code) = script(
        dir,
        true,
        "top.qcow2",
        &["break write_aio A", "aio_write -P 4 0 4k", "wait_break A"],
    );
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(
        lines,
        [
            "blkdebug: Suspended request 'A'",
            "wrote 4096/4096 bytes at offset 0",
            "4 KiB",
        ]
    );
    ok(qemu_img(dir, &["check", "top.qcow2"]), "check");
    qemu_io(dir, "qcow2", "top.qcow2", &["read -P 4 0 4k"]);
}
