//! The multi-call binary: a shell script written for qemu-img and qemu-io, run with
//! `vdisk` linked as `qemu-img`/`qemu-io`/`qemu-nbd` first in `PATH`, prints exactly
//! what it prints with QEMU's tools (messages carry the tool's name, `--version`
//! starts like QEMU's).

mod cli_support;
use cli_support::*;
use std::path::Path;
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/qemu_tools.sh");

fn run_script(dir: &Path, path_prefix: Option<&Path>) -> String {
    let mut path = std::env::var("PATH").unwrap_or_default();
    if let Some(p) = path_prefix {
        path = format!("{}:{path}", p.display());
    }
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("sh {SCRIPT} 2>&1"))
        .current_dir(dir)
        .env("PATH", path)
        .output()
        .expect("sh");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn qemu_script_through_the_links_prints_qemus_output() {
    let d = tmp();
    let links = d.path().join("bin");
    let (mine, theirs) = (d.path().join("v"), d.path().join("q"));
    for p in [&links, &mine, &theirs] {
        std::fs::create_dir(p).unwrap();
    }
    for t in ["qemu-img", "qemu-io", "qemu-nbd"] {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vdisk"), links.join(t)).unwrap();
    }
    let v = run_script(&mine, Some(&links));
    let q = run_script(&theirs, None);
    assert!(q.contains("Image committed."), "the script ran: {q}");
    assert_eq!(v, q);
}

#[test]
fn versions_name_the_tool_and_vdisk() {
    let d = tmp();
    for (t, first) in [
        ("qemu-img", "qemu-img version 10.0.2 (vdisk "),
        ("qemu-io", "qemu-io version 10.0.2 (vdisk "),
        ("qemu-nbd", "qemu-nbd 10.0.2 (vdisk "),
    ] {
        let l = d.path().join(t);
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vdisk"), &l).unwrap();
        let o = Command::new(&l).arg("--version").output().unwrap();
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(s.starts_with(first), "{t}: {s}");
        assert!(
            s.lines().nth(1).is_some_and(|l| l.starts_with("vdisk ")),
            "{t}: {s}"
        );
    }
    // As vdisk, the version line stays vdisk's own.
    let v = vdisk(d.path(), &["--version"]);
    assert!(v.out.starts_with("vdisk "), "{}", v.out);
}

#[test]
fn an_option_given_twice_is_no_error_the_last_wins() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]),
        "create",
    );
    for args in [
        &[
            "io",
            "-f",
            "qed",
            "-f",
            "qcow2",
            "-c",
            "read -q 0 512",
            "a.qcow2",
        ][..],
        &[
            "io",
            "-t",
            "none",
            "-t",
            "writeback",
            "-c",
            "read -q 0 512",
            "a.qcow2",
        ][..],
        &["info", "-f", "raw", "-f", "qcow2", "a.qcow2"][..],
        &["check", "--output=json", "--output=human", "a.qcow2"][..],
        &[
            "map",
            "-f",
            "raw",
            "-f",
            "qcow2",
            "--output=json",
            "a.qcow2",
        ][..],
    ] {
        let v = vdisk(dir, args);
        let (prog, rest) = if args[0] == "io" {
            ("qemu-io", &args[1..])
        } else {
            ("qemu-img", args)
        };
        let q = if prog == "qemu-io" {
            qemu_io_run(dir, rest)
        } else {
            qemu_img(dir, rest)
        };
        assert_eq!((v.code, v.out), (q.code, q.out), "{args:?}: {}", v.err);
    }
}

#[test]
fn hex_sizes_like_qemu() {
    let d = tmp();
    let dir = d.path();
    for (i, size) in ["0x100000", "0x1B", "0X1b", "0x2M", "0x1Bk"]
        .iter()
        .enumerate()
    {
        let (v, q) = (format!("v{i}.qcow2"), format!("q{i}.qcow2"));
        let rv = vdisk(dir, &["create", "-f", "qcow2", &v, size]);
        let rq = qemu_img(dir, &["create", "-f", "qcow2", &q, size]);
        assert_eq!(
            (rv.code, rv.out.replace(&v, &q)),
            (rq.code, rq.out),
            "{size}: {}",
            rv.err
        );
        let rv = vdisk(dir, &["resize", &v, "0x300000"]);
        let rq = qemu_img(dir, &["resize", &q, "0x300000"]);
        assert_eq!((rv.code, rv.out), (rq.code, rq.out), "{size}: {}", rv.err);
        let m = ["measure", "-O", "qcow2", "--size", size];
        assert_eq!(vdisk(dir, &m).out, qemu_img(dir, &m).out, "{size}");
    }
}
