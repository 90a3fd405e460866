//! `vdisk info` against `qemu-img info` on the same images: identical text, human and
//! JSON, except the host allocation (`actual-size` / `disk size`).

mod cli_support;
use cli_support::*;
use std::path::Path;

/// Drops the lines that depend on host allocation at the moment of the call.
fn stable(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains("\"actual-size\"") && !l.contains("disk size:"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn same_info(dir: &Path, args: &[&str]) {
    for out in ["human", "json"] {
        let o = format!("--output={out}");
        let mut a = vec!["info", o.as_str()];
        a.extend_from_slice(args);
        let q = ok(qemu_img(dir, &a), "qemu-img info");
        let v = ok(vdisk(dir, &a), "vdisk info");
        assert_eq!(stable(&v), stable(&q), "info {a:?}");
        if out == "json" {
            // Also valid JSON with the same structure.
            let mut jq = json(&q);
            let mut jv = json(&v);
            strip_keys(&mut jq, &["actual-size"]);
            strip_keys(&mut jv, &["actual-size"]);
            assert_eq!(jv, jq);
        }
    }
}

#[test]
fn raw_info_matches_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "a.raw", "3M"]),
        "create",
    );
    qemu_io(dir, "raw", "a.raw", &["write -P 7 64k 64k"]);
    same_info(dir, &["a.raw"]);
    same_info(dir, &["-f", "raw", "a.raw"]);
    // Empty file and an odd size.
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "e.raw", "0"]),
        "create",
    );
    same_info(dir, &["e.raw"]);
    std::fs::write(dir.join("odd.raw"), vec![1u8; 12345]).unwrap();
    same_info(dir, &["odd.raw"]);
}

#[test]
fn actual_size_is_host_allocation() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "a.raw", "8M"]),
        "create",
    );
    qemu_io(dir, "raw", "a.raw", &["write -P 1 1M 1M"]);
    let v = json(&ok(vdisk(dir, &["info", "--output=json", "a.raw"]), "info"));
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(dir.join("a.raw")).unwrap().blocks() * 512;
    assert_eq!(v["actual-size"].as_u64(), Some(blocks));
    assert!(((1 << 20)..(8 << 20)).contains(&blocks));
}

#[test]
fn qcow2_info_matches_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]),
        "create",
    );
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,cluster_size=4k",
                "v2.qcow2",
                "5M",
            ],
        ),
        "create v2",
    );
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "lazy_refcounts=on,refcount_bits=8,compression_type=zstd",
                "v3.qcow2",
                "1G",
            ],
        ),
        "create v3",
    );
    std::fs::create_dir(dir.join("sub")).unwrap();
    qemu_overlay(dir, "qcow2", "../base.qcow2", "qcow2", "sub/top.qcow2");
    qemu_io(dir, "qcow2", "base.qcow2", &["write -P 3 0 128k"]);
    same_info(dir, &["base.qcow2"]);
    same_info(dir, &["v2.qcow2"]);
    same_info(dir, &["v3.qcow2"]);
    same_info(dir, &["sub/top.qcow2"]);
    same_info(dir, &["--backing-chain", "sub/top.qcow2"]);
}

#[test]
fn qed_info_matches_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "base.raw", "4M"]),
        "create",
    );
    qemu_overlay(dir, "qed", "base.raw", "raw", "t.qed");
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qed",
                "-o",
                "cluster_size=16k",
                "s.qed",
                "10M",
            ],
        ),
        "create qed",
    );
    qemu_io(dir, "qed", "t.qed", &["write -P 5 0 4k"]);
    same_info(dir, &["t.qed"]);
    same_info(dir, &["s.qed"]);
    same_info(dir, &["--backing-chain", "t.qed"]);
}

#[test]
fn info_errors_like_qemu() {
    let d = tmp();
    let dir = d.path();
    let v = vdisk(dir, &["info", "missing.img"]);
    assert_eq!(v.code, 1);
    assert_eq!(
        v.err.trim(),
        "vdisk: Could not open 'missing.img': Could not open 'missing.img': No such file or directory"
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "a.raw", "1M"]),
        "create",
    );
    let v = vdisk(dir, &["info", "-f", "qcow2", "a.raw"]);
    assert_eq!(v.code, 1);
    let q = qemu_img(dir, &["info", "-f", "qcow2", "a.raw"]);
    assert_eq!(
        v.err.replacen("vdisk:", "", 1),
        q.err.replacen("qemu-img:", "", 1)
    );
}

#[test]
fn dirty_qcow2_info_and_check_match_qemu() {
    use std::io::{BufRead, BufReader, Write};
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "lazy_refcounts=on",
                "d.qcow2",
                "4M",
            ],
        ),
        "create",
    );
    // qemu-io killed after a write with lazy refcounts: the dirty bit stays set.
    let mut child = std::process::Command::new("qemu-io")
        .current_dir(dir)
        .args(["-f", "qcow2", "d.qcow2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"write -P 1 0 64k\n").unwrap();
    stdin.flush().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("wrote") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "qemu-io exited");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    same_info(dir, &["d.qcow2"]);
    let v = ok(vdisk(dir, &["info", "d.qcow2"]), "info");
    assert!(v.contains("cleanly shut down: no\n"), "{v}");
    let q = qemu_img(dir, &["check", "d.qcow2"]);
    let v = vdisk(dir, &["check", "d.qcow2"]);
    assert_eq!((v.code, v.out), (q.code, q.out));
}

#[test]
fn missing_backing_file_errors_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "gone.qcow2",
                "-F",
                "qcow2",
                "t.qcow2",
                "1M",
            ],
        ),
        "create",
    );
    // info alone does not need the backing file; everything else fails like qemu-img.
    same_info(dir, &["t.qcow2"]);
    let cases: &[&[&str]] = &[
        &["info", "--backing-chain", "t.qcow2"],
        &["map", "t.qcow2"],
        &["check", "t.qcow2"],
        &["compare", "t.qcow2", "t.qcow2"],
        &["convert", "-O", "raw", "t.qcow2", "o.raw"],
    ];
    for c in cases {
        let q = qemu_img(dir, c);
        let v = vdisk(dir, c);
        assert_eq!(v.code, q.code, "{c:?}");
        assert_eq!(v.out, q.out, "{c:?}");
        assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "{c:?}");
    }
}

/// Runs `prog args...` in `dir` with the time zone `tz`; returns stdout, panicking
/// on failure.
fn run_tz(prog: &str, dir: &Path, tz: &str, args: &[&str]) -> String {
    let o = std::process::Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env("TZ", tz)
        .output()
        .expect("run");
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Overwrites fields of snapshot `idx` in a qcow2 file, in place (sizes unchanged, so
/// the table layout stays valid): creation time, guest clock, 64-bit VM state size
/// and icount (both in the version 3 extra data, which qemu-img writes).
fn patch_snapshot(file: &Path, idx: u32, date: u32, clock_ns: u64, vm_state: u64, icount: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut h = [0u8; 72];
    f.read_exact_at(&mut h, 0).unwrap();
    let nb = u32::from_be_bytes(h[60..64].try_into().unwrap());
    let mut pos = u64::from_be_bytes(h[64..72].try_into().unwrap());
    assert!(idx < nb);
    for i in 0..=idx {
        let mut e = [0u8; 40];
        f.read_exact_at(&mut e, pos).unwrap();
        let id_len = u64::from(u16::from_be_bytes([e[12], e[13]]));
        let name_len = u64::from(u16::from_be_bytes([e[14], e[15]]));
        let extra = u64::from(u32::from_be_bytes(e[36..40].try_into().unwrap()));
        if i == idx {
            assert!(extra >= 24, "qemu-img wrote {extra} bytes of extra data");
            f.write_all_at(&date.to_be_bytes(), pos + 16).unwrap();
            f.write_all_at(&clock_ns.to_be_bytes(), pos + 24).unwrap();
            f.write_all_at(&vm_state.to_be_bytes(), pos + 40).unwrap();
            f.write_all_at(&icount.to_be_bytes(), pos + 56).unwrap();
        }
        pos = (pos + 40 + extra + id_len + name_len).div_ceil(8) * 8;
    }
}

/// Human output (in several time zones, one with daylight saving time) and JSON of
/// images with internal snapshots equal qemu-img's.
fn same_snapshot_info(dir: &Path, args: &[&str]) -> String {
    let vd = env!("CARGO_BIN_EXE_vdisk");
    let mut a = vec!["info"];
    a.extend_from_slice(args);
    let mut first = String::new();
    for tz in ["UTC", "America/New_York", "Asia/Kolkata"] {
        let q = run_tz("qemu-img", dir, tz, &a);
        let v = run_tz(vd, dir, tz, &a);
        assert_eq!(stable(&v), stable(&q), "TZ={tz} info {a:?}");
        if first.is_empty() {
            first = v;
        }
    }
    a.push("--output=json");
    let q = run_tz("qemu-img", dir, "UTC", &a);
    let v = run_tz(vd, dir, "UTC", &a);
    assert_eq!(stable(&v), stable(&q), "info {a:?}");
    first
}

#[test]
fn snapshot_list_matches_qemu() {
    let d = tmp();
    let dir = d.path();
    for (img, compat) in [("v3.qcow2", "1.1"), ("v2.qcow2", "0.10")] {
        let o = format!("compat={compat}");
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", &o, img, "16M"]),
            "create",
        );
        qemu_io(dir, "qcow2", img, &["write -P 3 0 128k"]);
        ok(qemu_img(dir, &["snapshot", "-c", "first", img]), "snapshot");
        qemu_io(dir, "qcow2", img, &["write -P 4 64k 64k"]);
        ok(
            qemu_img(
                dir,
                &["snapshot", "-c", "a name longer than sixteen ünïcödé", img],
            ),
            "snapshot",
        );
        ok(qemu_img(dir, &["snapshot", "-c", "third", img]), "snapshot");
        // 2024-07-01 12:00 UTC (summer time in New York), a 1h02m03.456789012s guest
        // clock and a 64-bit VM state size; then the epoch with a clock past 100 h
        // and an icount; then no icount recorded (all ones).
        patch_snapshot(
            &p(dir, img),
            0,
            1_719_835_200,
            3_723_456_789_012,
            1 << 32,
            7,
        );
        patch_snapshot(&p(dir, img), 1, 0, 400_000_123_000_000, 0, 123_456_789);
        patch_snapshot(&p(dir, img), 2, 1_000_000_000, 0, 1536, u64::MAX);
        let c = ok(qemu_img(dir, &["check", img]), "qemu-img check");
        assert!(c.contains("No errors were found"), "{c}");
        let human = same_snapshot_info(dir, &[img]);
        // Not vacuous: the table is there, with each kind of value.
        assert!(human.contains("Snapshot list:\nID      TAG "), "{human}");
        for want in [
            "0001:02:03.456",
            "0111:06:40.123",
            "2024-07-01 12:00:00",
            "4 GiB",
            "1.5 KiB",
            "123456789",
            "        --\n",
            "a name longer than sixteen ünïcödé",
        ] {
            assert!(human.contains(want), "{want:?} missing from\n{human}");
        }
        let v = json(&ok(vdisk(dir, &["info", "--output=json", img]), "info"));
        let s = v["snapshots"].as_array().expect("snapshots array");
        assert_eq!(s.len(), 3);
        assert_eq!(s[0]["vm-clock-sec"], 3723);
        assert_eq!(s[0]["vm-clock-nsec"], 456_789_012);
        assert_eq!(s[2]["id"], "3");
        assert!(s[2].get("icount").is_none());
    }
    // Through a backing chain, and the same commands with -U.
    qemu_overlay(dir, "qcow2", "v3.qcow2", "qcow2", "top.qcow2");
    ok(
        qemu_img(dir, &["snapshot", "-c", "t", "top.qcow2"]),
        "snapshot",
    );
    same_snapshot_info(dir, &["--backing-chain", "top.qcow2"]);
    same_snapshot_info(dir, &["-U", "top.qcow2"]);
    // No snapshots, no table.
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "none.qcow2", "1M"]),
        "create",
    );
    let h = same_snapshot_info(dir, &["none.qcow2"]);
    assert!(!h.contains("Snapshot list"));
}
