//! `vdisk bench` behaviour (never timing): which requests were issued, with what data,
//! checked through `qemu-io read -P`; qemu-img's header lines and refusals; and that
//! concurrent writes at depth leave a clean image.

use std::path::{Path, PathBuf};
use std::process::Command;
use vdisk::{CreateOptions, Format, Image};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Out {
    let o = cmd.output().expect("spawn");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

fn bench(args: &[&str], path: &Path) -> Out {
    run(Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .arg("bench")
        .args(args)
        .arg(path))
}

fn qemu_bench(args: &[&str], path: &Path) -> Out {
    run(Command::new("qemu-img").arg("bench").args(args).arg(path))
}

fn create(dir: &Path, name: &str, fmt: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let o = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", fmt])
        .arg(&p)
        .arg(size));
    assert_eq!(o.code, 0, "{}", o.stderr);
    p
}

/// Whether the library can create `fmt` yet; prints why a test is skipped if not.
fn available(fmt: &str) -> bool {
    let d = tmpdir();
    let r = Image::create(
        d.path().join("probe"),
        &CreateOptions {
            format: Format::parse(fmt).expect("format"),
            size: Some(1 << 20),
            options: vec![],
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
        },
    );
    if let Err(e) = &r {
        eprintln!("SKIP {fmt}: vdisk cannot create it yet ({e})");
    }
    r.is_ok()
}

/// Runs `read -q -P` checks through qemu-io; returns the failing lines.
fn qemu_verify(fmt: &str, path: &Path, checks: &[(u8, u64, u64)]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt, "-r"]);
    for (p, off, len) in checks {
        c.arg("-c").arg(format!("read -q -P {p} {off} {len}"));
    }
    let o = run(c.arg(path));
    format!("{}{}", o.stdout, o.stderr)
}

fn header_and_result(fmt: &str) {
    let d = tmpdir();
    let img = create(d.path(), "a.img", fmt, "4M");
    // 100 requests of 4 KiB every 8 KiB from 64 KiB: leaves gaps and an untouched tail.
    let args = [
        "-w",
        "-f",
        fmt,
        "-c",
        "100",
        "-d",
        "8",
        "-s",
        "4k",
        "-S",
        "8k",
        "-o",
        "64k",
        "--pattern=0x5a",
    ];
    let o = bench(&args, &img);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(
        lines[0],
        "Sending 100 write requests, 4096 bytes each, 8 in parallel (starting at offset 65536, step size 8192)"
    );
    assert!(lines[1].starts_with("Run completed in "), "{}", o.stdout);
    let q = qemu_bench(&args, &create(d.path(), "b.img", fmt, "4M"));
    assert_eq!(q.stdout.lines().next(), Some(lines[0]));

    let mut checks = vec![(0u8, 0u64, 65536u64)];
    for i in 0..100u64 {
        let off = 65536 + i * 8192;
        checks.push((0x5a, off, 4096));
        checks.push((0, off + 4096, 4096));
    }
    // Exactly 100 requests: everything after the last one is untouched.
    let end = 65536 + 100 * 8192;
    checks.push((0, end, (4 << 20) - end));
    assert_eq!(qemu_verify(fmt, &img, &checks), "");
    if fmt != "raw" {
        let c = run(Command::new("qemu-img")
            .args(["check", "-f", fmt])
            .arg(&img));
        assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    }
}

#[test]
fn raw_write_requests_land_where_qemu_puts_them() {
    header_and_result("raw");
}

#[test]
fn qcow2_write_requests_land_where_qemu_puts_them() {
    if available("qcow2") {
        header_and_result("qcow2");
    }
}

#[test]
fn qed_write_requests_land_where_qemu_puts_them() {
    if available("qed") {
        header_and_result("qed");
    }
}

#[test]
fn offsets_wrap_at_the_end_of_the_disk() {
    let d = tmpdir();
    let img = create(d.path(), "a.raw", "raw", "1M");
    // 300 x 4 KiB over a 1 MiB disk: wraps once past the end and covers it all.
    let o = bench(&["-w", "-f", "raw", "-c", "300", "--pattern=7"], &img);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(qemu_verify("raw", &img, &[(7, 0, 1 << 20)]), "");
    // Starting 3 KiB in with 4 KiB steps, a request straddles the end: qemu fails it.
    let o = bench(&["-w", "-f", "raw", "-c", "300", "-o", "3k"], &img);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("Failed request: Input/output error"),
        "{}",
        o.stderr
    );
}

#[test]
fn flushes_and_no_drain_complete_every_request() {
    let d = tmpdir();
    let img = create(d.path(), "a.raw", "raw", "2M");
    for extra in [&[][..], &["--no-drain"][..]] {
        let mut args = vec![
            "-w",
            "-f",
            "raw",
            "-c",
            "256",
            "-d",
            "4",
            "--flush-interval=16",
            "--pattern=0x11",
        ];
        args.extend_from_slice(extra);
        let o = bench(&args, &img);
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert_eq!(
            o.stdout.lines().nth(1),
            Some("Sending flush every 16 requests")
        );
        assert_eq!(
            qemu_verify("raw", &img, &[(0x11, 0, 1 << 20), (0, 1 << 20, 1 << 20)]),
            ""
        );
    }
}

#[test]
fn refusals_match_qemu_img() {
    let d = tmpdir();
    let img = create(d.path(), "a.raw", "raw", "1M");
    for args in [
        &["--flush-interval=8", "-c", "1"][..],
        &["-w", "--flush-interval=8", "-c", "1"][..],
        &["-c", "0"][..],
        &["-d", "0"][..],
        &["-s", "0"][..],
        &["-w", "--pattern=256"][..],
        &["-t", "bogus", "-c", "1"][..],
    ] {
        let ours = bench(args, &img);
        let theirs = qemu_bench(args, &img);
        assert_eq!(ours.code, 1, "{args:?}");
        assert_eq!(theirs.code, 1, "{args:?}");
        assert_eq!(
            ours.stderr.trim_start_matches("vdisk: "),
            theirs.stderr.trim_start_matches("qemu-img: "),
            "{args:?}"
        );
    }
}

#[test]
fn read_bench_counts_match() {
    let d = tmpdir();
    let img = create(d.path(), "a.raw", "raw", "1M");
    let o = bench(&["-f", "raw", "-c", "1000", "-s", "512", "-U"], &img);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout.lines().next(),
        Some("Sending 1000 read requests, 512 bytes each, 64 in parallel (starting at offset 0, step size 512)")
    );
}
