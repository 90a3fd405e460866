//! `vdisk io` beside `qemu-io` for the commands and options beyond reading and writing:
//! `reopen`, `-s`/`open -s` (temporary overlay), `-C`/`open -C` (copy-on-read),
//! `sigraise`, `abort`, the zone and breakpoint commands, `help COMMAND`, `-T`, and the
//! names failed vectored requests report. Each case runs both tools on copies of one
//! image and compares stdout, stderr (tool name aside), exit status and the image left
//! behind (`qemu-img map`, `check`, `compare`).

mod cli_support;

use cli_support::*;
use std::path::Path;
use std::process::Command;

/// One tool's run: exit status (None: killed by a signal), stdout, stderr.
struct Io {
    code: Option<i32>,
    signal: Option<i32>,
    out: String,
    err: String,
}

fn io(tool: &str, dir: &Path, args: &[&str]) -> Io {
    use std::os::unix::process::ExitStatusExt;
    let mut c = if tool == "vdisk" {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vdisk"));
        c.arg("io");
        c
    } else {
        Command::new("qemu-io")
    };
    let o = c
        .args(args)
        .current_dir(dir)
        .env("TMPDIR", dir)
        .output()
        .expect("run the io tool");
    Io {
        code: o.status.code(),
        signal: o.status.signal(),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        // The messages name their tool.
        err: String::from_utf8_lossy(&o.stderr).replace("vdisk: ", "qemu-io: "),
    }
}

/// Drops the timing part of report lines ("512 bytes, 1 ops; 00.00 sec (…)").
fn untimed(s: &str) -> String {
    s.lines()
        .map(|l| match l.find(" ops; ") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A 4 MiB qcow2 base with data in the first MiB and a zero cluster at 2 MiB, made by
/// qemu-io.
fn base(dir: &Path) {
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]),
        "create base",
    );
    qemu_io(
        dir,
        "qcow2",
        "base.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -z 2M 64k",
            "write -P 0x22 3M 4k",
        ],
    );
}

/// Runs `args` (ending with the image name `top.qcow2`) with both tools, each on a fresh
/// overlay of the base, and asserts equal output, status and resulting image. Returns
/// the two directories' paths for more checks.
fn side_by_side(args: &[&str]) -> (tempfile::TempDir, tempfile::TempDir) {
    let dirs = (tmp(), tmp());
    let mut runs = Vec::new();
    for (tool, d) in [("vdisk", &dirs.0), ("qemu-io", &dirs.1)] {
        base(d.path());
        qemu_overlay(d.path(), "qcow2", "base.qcow2", "qcow2", "top.qcow2");
        runs.push(io(tool, d.path(), args));
    }
    let (v, q) = (&runs[0], &runs[1]);
    assert_eq!(untimed(&v.out), untimed(&q.out), "stdout of {args:?}");
    assert_eq!(v.err, q.err, "stderr of {args:?}");
    assert_eq!((v.code, v.signal), (q.code, q.signal), "status of {args:?}");
    let maps: Vec<String> = [&dirs.0, &dirs.1]
        .iter()
        .map(|d| {
            ok(
                qemu_img(d.path(), &["map", "--output=json", "top.qcow2"]),
                "map",
            )
        })
        .collect();
    assert_eq!(maps[0], maps[1], "qemu-img map after {args:?}");
    ok(
        qemu_img(dirs.0.path(), &["check", "top.qcow2"]),
        "check vdisk's image",
    );
    let a = dirs.0.path().join("top.qcow2");
    let b = dirs.1.path().join("top.qcow2");
    ok(
        qemu_img(
            dirs.0.path(),
            &["compare", a.to_str().unwrap(), b.to_str().unwrap()],
        ),
        "compare",
    );
    (dirs.0, dirs.1)
}

#[test]
fn copy_on_read_copies_whole_clusters_like_qemu_io() {
    side_by_side(&[
        "-C",
        "-c",
        "read -P 0x11 100k 4k",
        "-c",
        "read 2M 4k",
        "-c",
        "read -P 0x22 3M 512",
        "-c",
        "readv 3900k 100k 24k",
        "-c",
        "read 3968k 64k",
        "top.qcow2",
    ]);
    // The copies are real data in the top image: it reads the same without its base.
    let (v, _q) = side_by_side(&["-c", "open -C top.qcow2", "-c", "read 0 1M"]);
    std::fs::copy(v.path().join("top.qcow2"), v.path().join("alone.qcow2")).unwrap();
    ok(
        qemu_img(v.path(), &["rebase", "-u", "-b", "", "alone.qcow2"]),
        "detach the base",
    );
    qemu_io(v.path(), "qcow2", "alone.qcow2", &["read -P 0x11 0 1M"]);
}

#[test]
fn copy_on_read_refuses_read_only_like_qemu_io() {
    side_by_side(&["-C", "-r", "-c", "read 0 4k", "top.qcow2"]);
}

/// QEMU's `copy-on-read` filter node over the overlay (json: and --image-opts), with
/// and without `bottom` (a backing node named by `node-name`: ranges no layer down to
/// it allocates are not copied), and its errors, beside qemu-io.
#[test]
fn copy_on_read_filter_node_like_qemu_io() {
    let top = r#"{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"}}"#;
    let named = r#"{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"},"backing":{"node-name":"b","driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}}"#;
    let reads = [
        "-c",
        "read 100k 4k",
        "-c",
        "read 2M 4k",
        "-c",
        "read 3500k 600k",
    ];
    for j in [
        format!(r#"json:{{"driver":"copy-on-read","file":{top}}}"#),
        format!(r#"json:{{"driver":"copy-on-read","bottom":"b","file":{named}}}"#),
    ] {
        let mut a = reads.to_vec();
        a.push(&j);
        side_by_side(&a);
    }
    let mut a = reads.to_vec();
    a.extend([
        "--image-opts",
        "driver=copy-on-read,file.driver=qcow2,file.file.filename=top.qcow2",
    ]);
    side_by_side(&a);
    for bad in [
        r#"json:{"driver":"copy-on-read"}"#.to_string(),
        format!(r#"json:{{"driver":"copy-on-read","bottom":"nope","file":{named}}}"#),
        format!(r#"json:{{"driver":"copy-on-read","bogus":1,"file":{top}}}"#),
        r#"json:{"driver":"copy-on-read","file":"top.qcow2"}"#.to_string(),
    ] {
        side_by_side(&["-c", "read 0 4k", &bad]);
    }
    side_by_side(&[
        "-r",
        "-c",
        "read 0 4k",
        &format!(r#"json:{{"driver":"copy-on-read","file":{top}}}"#),
    ]);
}

#[test]
fn snapshot_mode_drops_writes_like_qemu_io() {
    side_by_side(&[
        "-s",
        "-c",
        "write -P 0x33 0 64k",
        "-c",
        "read -P 0x33 0 64k",
        "-c",
        "reopen -c writethrough",
        "-c",
        "read -P 0x33 0 64k",
        "top.qcow2",
    ]);
    side_by_side(&[
        "-c",
        "open -s top.qcow2",
        "-c",
        "write -P 0x44 64k 64k",
        "-c",
        "read -P 0x44 64k 64k",
        "-c",
        "close",
        "-c",
        "open top.qcow2",
        "-c",
        "read -P 0x11 64k 64k",
    ]);
}

#[test]
fn snapshot_mode_leaves_no_temporary_file() {
    let d = tmp();
    base(d.path());
    let before: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    let r = io(
        "vdisk",
        d.path(),
        &["-s", "-c", "write 0 4k", "-c", "reopen -r", "base.qcow2"],
    );
    assert_eq!(r.code, Some(0), "{}{}", r.out, r.err);
    let after: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(
        before.len(),
        after.len(),
        "the overlay in TMPDIR is removed"
    );
}

#[test]
fn reopen_like_qemu_io() {
    side_by_side(&[
        "-c",
        "reopen -r",
        "-c",
        "write 0 512",
        "-c",
        "reopen -w",
        "-c",
        "write -P 9 0 512",
        "-c",
        "reopen -o foo=bar",
        "-c",
        "reopen -o driver=raw",
        "-c",
        "reopen -c writethrough",
        "-c",
        "reopen -c bogus",
        "-c",
        "reopen -r -w",
        "-c",
        "reopen x",
        "-c",
        "reopen -o lazy-refcounts=off",
        "-c",
        "reopen -o l2-cache-size=1M,cache.direct=on",
        "-c",
        "reopen -o detect-zeroes=on,discard=unmap",
        "-c",
        "write -P 0 1M 64k",
        "-c",
        "read -P 9 0 512",
        "top.qcow2",
    ]);
    // Read-only and shared, then writable: the writer takes its own permissions.
    side_by_side(&[
        "-r",
        "-U",
        "-c",
        "reopen -w",
        "-c",
        "write -P 7 4k 4k",
        "top.qcow2",
    ]);
}

#[test]
fn signals_zones_and_breakpoints_like_qemu_io() {
    side_by_side(&[
        "-c",
        "sigraise 99",
        "-c",
        "sigraise x",
        "-c",
        "sigraise -1",
        "-c",
        "sigraise 0",
        "-c",
        "zone_report 0 1",
        "-c",
        "zap 0 512 512",
        "-c",
        "zone_open 0",
        "-c",
        "zrp x 1",
        "-c",
        "zone_reset 0 64k",
        "-c",
        "break l2_load a",
        "-c",
        "remove_break a",
        "-c",
        "resume a",
        "top.qcow2",
    ]);
    // SIGTERM ends both the same way, after what was printed before it.
    side_by_side(&[
        "-c",
        "write -P 5 0 4k",
        "-c",
        "sigraise 15",
        "-c",
        "read 0 512",
        "top.qcow2",
    ]);
}

#[test]
fn abort_crashes_without_writing_back() {
    let d = tmp();
    base(d.path());
    qemu_overlay(d.path(), "qcow2", "base.qcow2", "qcow2", "top.qcow2");
    let r = io(
        "vdisk",
        d.path(),
        &["-c", "write -P 5 0 4k", "-c", "abort", "top.qcow2"],
    );
    assert_eq!(r.signal, Some(libc::SIGABRT), "{}{}", r.out, r.err);
    // Killed mid-session: the image may leak, never be corrupt (as after qemu-io abort).
    let c = qemu_img(d.path(), &["check", "top.qcow2"]);
    assert!(c.code == 0 || c.code == 3, "{}{}", c.out, c.err);
}

#[test]
fn help_for_every_command_like_qemu_io() {
    let d = tmp();
    base(d.path());
    let all = io("qemu-io", d.path(), &["-c", "help", "base.qcow2"]);
    let names: Vec<String> = all
        .out
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(n, _)| n.to_string()))
        .filter(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    assert!(names.len() > 30, "qemu-io lists its commands: {}", all.out);
    for n in names {
        let cmd = format!("help {n}");
        let q = io("qemu-io", d.path(), &["-c", &cmd, "base.qcow2"]);
        let v = io("vdisk", d.path(), &["-c", &cmd, "base.qcow2"]);
        assert_eq!(v.out, q.out, "{cmd}");
    }
    let q = io("qemu-io", d.path(), &["-c", "help", "base.qcow2"]);
    let v = io("vdisk", d.path(), &["-c", "help", "base.qcow2"]);
    assert_eq!(v.out, q.out, "help");
}

#[test]
fn vectored_failures_name_their_command_like_qemu_io() {
    side_by_side(&[
        "-c",
        "readv 4M 512",
        "-c",
        "writev 4M 512",
        "-c",
        "aio_read 4M 512",
        "-c",
        "aio_write 4M 512",
        "-c",
        "aio_flush",
        "top.qcow2",
    ]);
}

#[test]
fn trace_option_is_accepted_like_qemu() {
    // An exact name no tool has: both warn the same way and go on.
    side_by_side(&["-T", "no_such_event", "-c", "read 0 512", "top.qcow2"]);
    let d = tmp();
    base(d.path());
    for t in [
        &["-T", "enable=no_such_event", "info", "base.qcow2"][..],
        &["-T", "bogus=1", "info", "base.qcow2"],
        &["--trace", "qcow2_*", "info", "base.qcow2"],
    ] {
        let v = vdisk(d.path(), t);
        let q = qemu_img(d.path(), t);
        assert_eq!((v.code, &v.out), (q.code, &q.out), "{t:?}");
        // qemu prints the events a pattern enables; vdisk has none to print.
        if !t[1].contains('*') {
            assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "{t:?}");
        }
    }
}
