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
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "../base.qcow2",
                "-F",
                "qcow2",
                "sub/top.qcow2",
            ],
        ),
        "create top",
    );
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
    ok(
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "t.qed",
            ],
        ),
        "create qed",
    );
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
