//! Formats vdisk recognises but does not support (qcow v1, parallels, bochs, cloop,
//! dmg): every subcommand refuses them with a message naming the format and a non-zero
//! exit, whether probed, named with `-f`, or met as a backing file; `-f raw` still
//! opens them as raw, as qemu does. vpc, vdi, vmdk, vhdx and luks, once only
//! recognised, are now probed and opened (their behaviour is tested in
//! `cli_vpc_vdi.rs`, `cli_vmdk_vhdx.rs` and `cli_luks.rs`). Also: `-o help` is
//! qemu-img's, byte for byte, and formats vdisk cannot create are refused in
//! qemu-img's words.

mod cli_support;
use cli_support::*;
use std::path::Path;
use std::process::Command;

/// Runs `vdisk args...` under `timeout`, so that a server that wrongly starts serving
/// cannot hang the test.
fn vdisk_bounded(dir: &Path, args: &[&str]) -> Run {
    let o = Command::new("timeout")
        .arg("20")
        .arg(env!("CARGO_BIN_EXE_vdisk"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run timeout vdisk");
    Run {
        code: o.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// The format qemu-img itself detects for `file` (its `info` JSON), or its error.
fn qemu_detected(dir: &Path, file: &str) -> String {
    let r = qemu_img(dir, &["info", "--output=json", file]);
    if r.code != 0 {
        return r.err;
    }
    let v: serde_json::Value = serde_json::from_str(&r.out).expect("qemu-img info json");
    v["format"].as_str().unwrap_or_default().to_string()
}

/// Every subcommand refuses `file` naming `fmt`; `-f raw` opens it.
fn assert_refused_everywhere(dir: &Path, file: &str, fmt: &str) {
    let named = format!("the {fmt} format is not supported by vdisk");
    let out = format!("{file}.out");
    let sock = dir.join(format!("{file}.sock"));
    let sock = sock.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["info", file],
        vec!["info", "-f", fmt, file],
        vec!["check", file],
        vec!["map", file],
        vec!["compare", file, file],
        vec!["convert", "-O", "raw", file, &out],
        vec!["convert", "-O", "qcow2", "-f", fmt, file, &out],
        vec!["io", "-c", "read 0 512", file],
        vec!["io", "-r", "-c", "read 0 512", file],
        vec!["serve", "-k", sock, file],
        vec!["serve", "-r", "-k", sock, file],
        vec!["rebase", "-u", "-b", "", file],
        vec!["resize", file, "4M"],
        vec!["bench", "-c", "1", file],
    ];
    for args in &cases {
        let r = vdisk_bounded(dir, args);
        assert_ne!(r.code, 0, "vdisk {args:?} on {fmt} succeeded: {}", r.out);
        assert!(r.err.contains(&named), "vdisk {args:?}: {}", r.err);
        assert!(
            !dir.join(&out).exists(),
            "vdisk {args:?} left a target behind"
        );
    }

    // As a backing file: named in the overlay (qcow2), or probed (QED records no
    // format other than raw), opening the chain fails naming it.
    let top_q = format!("{file}.top.qcow2");
    let top_e = format!("{file}.top.qed");
    ok(
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", file, "-F", fmt, &top_q, "1M",
            ],
        ),
        "qcow2 overlay",
    );
    ok(
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qed", "-u", "-b", file, "-F", fmt, &top_e, "1M",
            ],
        ),
        "qed overlay",
    );
    for top in [&top_q, &top_e] {
        for args in [
            vec!["map", top.as_str()],
            vec!["convert", "-O", "raw", top.as_str(), out.as_str()],
            vec!["compare", top.as_str(), top.as_str()],
            vec!["io", "-r", "-c", "read 0 512", top.as_str()],
        ] {
            let r = vdisk_bounded(dir, &args);
            assert_ne!(r.code, 0, "vdisk {args:?} over a {fmt} backing file");
            assert!(r.err.contains(&named), "vdisk {args:?}: {}", r.err);
            assert!(!dir.join(&out).exists());
        }
    }
    let r = vdisk(
        dir,
        &["create", "-f", "qcow2", "-b", file, "-F", fmt, "new.qcow2"],
    );
    assert_ne!(r.code, 0);
    assert!(r.err.contains(&named), "create -b: {}", r.err);

    // Explicitly raw, it is just bytes (qemu agrees).
    let r = vdisk(dir, &["info", "-f", "raw", file]);
    assert_eq!(r.code, 0, "info -f raw {file}: {}", r.err);
    assert!(r.out.contains("file format: raw"), "{}", r.out);
    let r = vdisk(dir, &["convert", "-f", "raw", "-O", "raw", file, &out]);
    assert_eq!(r.code, 0, "convert -f raw {file}: {}", r.err);
    let len = std::fs::metadata(dir.join(file)).unwrap().len();
    assert_eq!(
        std::fs::metadata(dir.join(&out)).unwrap().len(),
        len.div_ceil(512) * 512
    );
    std::fs::remove_file(dir.join(&out)).unwrap();
}

/// Creates `file` with qemu-img, checks qemu probes it as `fmt`, then checks vdisk.
fn qemu_made(fmt: &str, file: &str, extra: &[&str]) {
    let d = tmp();
    let dir = d.path();
    let mut args = vec!["create", "-q", "-f", fmt];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[file, "1M"]);
    ok(qemu_img(dir, &args), "qemu-img create");
    assert_eq!(qemu_detected(dir, file), fmt, "qemu's probe of {file}");
    assert_refused_everywhere(dir, file, fmt);
}

/// Creates `file` with qemu-img, checks qemu probes it as `fmt`, writes a pattern with
/// qemu-io, then checks vdisk reads it as qemu does: the same bytes, the same `info`.
fn qemu_made_reads(fmt: &str, file: &str, extra: &[&str]) {
    let d = tmp();
    let dir = d.path();
    let mut args = vec!["create", "-q", "-f", fmt];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[file, "3M"]);
    ok(qemu_img(dir, &args), "qemu-img create");
    assert_eq!(qemu_detected(dir, file), fmt, "qemu's probe of {file}");
    // Whole grains: qemu writes a stream-optimized VMDK only so.
    qemu_io(
        dir,
        fmt,
        file,
        &["write -P 0x5a 64k 1M", "write -P 0x17 2M 64k"],
    );
    ok(
        vdisk(dir, &["convert", "-O", "raw", file, "v.raw"]),
        "vdisk convert",
    );
    ok(
        qemu_img(dir, &["convert", "-O", "raw", file, "q.raw"]),
        "qemu convert",
    );
    assert_eq!(
        std::fs::read(dir.join("v.raw")).unwrap(),
        std::fs::read(dir.join("q.raw")).unwrap(),
        "{file} {extra:?}"
    );
    for out in ["--output=json", "--output=human"] {
        let v = ok(vdisk(dir, &["info", out, file]), "vdisk info");
        let q = ok(qemu_img(dir, &["info", out, file]), "qemu info");
        assert_eq!(v, q, "{file} {extra:?} {out}");
    }
    let v = vdisk(dir, &["check", file]);
    let q = qemu_img(dir, &["check", file]);
    assert_eq!((v.code, v.out), (q.code, q.out), "check {file}");
}

#[test]
fn vmdk_sparse() {
    qemu_made_reads("vmdk", "s.vmdk", &[]);
}

#[test]
fn vmdk_stream_optimized() {
    qemu_made_reads("vmdk", "so.vmdk", &["-o", "subformat=streamOptimized"]);
}

#[test]
fn vmdk_text_descriptors() {
    // Both have a text descriptor as the file the user names.
    qemu_made_reads("vmdk", "flat.vmdk", &["-o", "subformat=monolithicFlat"]);
    qemu_made_reads(
        "vmdk",
        "split.vmdk",
        &["-o", "subformat=twoGbMaxExtentSparse"],
    );
}

#[test]
fn vmdk_cowd() {
    // VMware 3 / ESX sparse extents start with "COWD" (qemu-img cannot make them): a
    // grain directory past the end of the file (and no descriptor) is refused by both.
    let d = tmp();
    let dir = d.path();
    let mut h = vec![0u8; 4096];
    h[..4].copy_from_slice(b"COWD");
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    h[12..16].copy_from_slice(&2048u32.to_le_bytes());
    h[16..20].copy_from_slice(&8u32.to_le_bytes());
    h[20..24].copy_from_slice(&100u32.to_le_bytes());
    h[24..28].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(dir.join("c.vmdk"), &h).unwrap();
    assert_ne!(qemu_detected(dir, "c.vmdk"), "raw");
    let v = vdisk(dir, &["info", "c.vmdk"]);
    let q = qemu_img(dir, &["info", "c.vmdk"]);
    assert_eq!((v.code, q.code), (1, 1), "{} / {}", v.err, q.err);
    assert!(v.err.contains("past the end of the file"), "{}", v.err);
}

#[test]
fn vhdx() {
    qemu_made_reads("vhdx", "x.vhdx", &[]);
    qemu_made_reads("vhdx", "f.vhdx", &["-o", "subformat=fixed"]);
}

/// Creates `file` with qemu-img; qemu and vdisk both probe it as `fmt` and open it.
fn qemu_made_supported(fmt: &str, file: &str) {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", fmt, file, "1M"]),
        "qemu-img create",
    );
    assert_eq!(qemu_detected(dir, file), fmt, "qemu's probe of {file}");
    let r = vdisk(dir, &["info", file]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains(&format!("file format: {fmt}")), "{}", r.out);
}

#[test]
fn vpc() {
    qemu_made_supported("vpc", "x.vhd");
}

#[test]
fn vdi() {
    qemu_made_supported("vdi", "x.vdi");
}

#[test]
fn parallels() {
    qemu_made("parallels", "x.hdd", &[]);
}

#[test]
fn qcow_v1() {
    qemu_made("qcow", "x.qcow", &[]);
}

#[test]
fn bochs_crafted() {
    let d = tmp();
    let dir = d.path();
    let mut h = vec![0u8; 8192];
    h[..22].copy_from_slice(b"Bochs Virtual HD Image");
    h[32..39].copy_from_slice(b"Redolog");
    h[48..55].copy_from_slice(b"Growing");
    h[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
    h[68..72].copy_from_slice(&512u32.to_le_bytes());
    std::fs::write(dir.join("x.bochs"), &h).unwrap();
    assert_ne!(qemu_detected(dir, "x.bochs"), "raw");
    assert_refused_everywhere(dir, "x.bochs", "bochs");
}

#[test]
fn cloop_crafted() {
    let d = tmp();
    let dir = d.path();
    let mut h =
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
            .to_vec();
    h.resize(8192, 0);
    std::fs::write(dir.join("x.cloop"), &h).unwrap();
    assert_ne!(qemu_detected(dir, "x.cloop"), "raw");
    assert_refused_everywhere(dir, "x.cloop", "cloop");
}

#[test]
fn dmg_by_name() {
    // QEMU recognises dmg by the file name; the UDIF trailer ("koly") ends the file.
    let d = tmp();
    let dir = d.path();
    let mut h = vec![0u8; 8192];
    let n = h.len();
    h[n - 512..n - 508].copy_from_slice(b"koly");
    std::fs::write(dir.join("x.dmg"), &h).unwrap();
    assert_ne!(qemu_detected(dir, "x.dmg"), "raw");
    assert_refused_everywhere(dir, "x.dmg", "dmg");
    // Under another name it is raw, to qemu and to vdisk.
    std::fs::copy(dir.join("x.dmg"), dir.join("x.img")).unwrap();
    assert_eq!(qemu_detected(dir, "x.img"), "raw");
    let r = vdisk(dir, &["info", "x.img"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains("file format: raw"));
}

#[test]
fn uncreatable_formats_refused_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "src.raw", "1M"]),
        "src",
    );
    for f in ["bochs", "cloop", "dmg"] {
        // qemu-img cannot create these either: same words, same exit code.
        let q = qemu_img(dir, &["create", "-f", f, "n.img", "1M"]);
        let v = vdisk(dir, &["create", "-f", f, "n.img", "1M"]);
        assert_eq!(
            (v.code, v.err.replace("vdisk:", "qemu-img:")),
            (q.code, q.err)
        );
        let q = qemu_img(dir, &["convert", "-O", f, "src.raw", "n.img"]);
        let v = vdisk(dir, &["convert", "-O", f, "src.raw", "n.img"]);
        assert_eq!(
            (v.code, v.err.replace("vdisk:", "qemu-img:")),
            (q.code, q.err)
        );
    }
    for f in ["qcow", "parallels"] {
        let want = format!("Format driver '{f}' does not support image creation");
        let v = vdisk(dir, &["create", "-f", f, "n.img", "1M"]);
        assert_eq!(v.code, 1);
        assert_eq!(v.err.trim(), format!("vdisk: n.img: {want}"));
        let v = vdisk(dir, &["convert", "-O", f, "src.raw", "n.img"]);
        assert_eq!(v.code, 1);
        assert_eq!(v.err.trim(), format!("vdisk: {want}"));
        assert!(!dir.join("n.img").exists());
    }
}

#[test]
fn option_help_is_qemus() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "src.raw", "1M"]),
        "src",
    );
    for f in ["raw", "qcow2", "qed", "vmdk", "vhdx", "vpc", "vdi"] {
        for help in ["help", "?"] {
            let runs: [Vec<&str>; 4] = [
                vec!["create", "-f", f, "-o", help],
                vec!["create", "-f", f, "-o", help, "x.img", "1M"],
                vec!["convert", "-O", f, "-o", help],
                vec!["convert", "-O", f, "-o", help, "src.raw", "x.img"],
            ];
            for args in &runs {
                let q = qemu_img(dir, args);
                let v = vdisk(dir, args);
                assert_eq!(q.code, 0, "{args:?}: {}", q.err);
                assert_eq!(v.code, 0, "{args:?}: {}", v.err);
                assert_eq!(v.out, q.out, "{args:?}");
                assert!(!dir.join("x.img").exists());
            }
        }
    }
}

#[test]
fn option_values_checked_like_qemu() {
    let d = tmp();
    let dir = d.path();
    let cases: &[(&str, &str)] = &[
        ("qcow2", "foo=1"),
        ("qcow2", "lazy_refcounts=maybe"),
        ("qcow2", "cluster_size=abc"),
        ("qcow2", "refcount_bits=x"),
        ("qcow2", "compat=9"),
        ("qcow2", "compression_type=lz"),
        ("qcow2", "preallocation=bogus"),
        ("qcow2", "nocow=x"),
        ("qcow2", "extent_size_hint=q"),
        ("qcow2", "size=abc"),
        ("qed", "preallocation=bogus"),
        ("qed", "foo=1"),
        ("qed", "table_size=x"),
        ("qed", "nocow=x"),
        ("raw", "preallocation=bogus"),
        ("raw", "foo=1"),
        ("raw", "backing_file=x"),
        ("raw", "nocow=x"),
        ("raw", "nocow=on,extent_size_hint=1M,preallocation=off"),
        ("qed", "nocow=on,extent_size_hint=1M,preallocation=off"),
        ("qcow2", "nocow=on,extent_size_hint=1M,preallocation=off"),
        ("vmdk", "subformat=foo"),
        ("vmdk", "adapter_type=foo"),
        ("vmdk", "compat6=on,hwversion=6"),
        ("vmdk", "compat6=x"),
        (
            "vmdk",
            "zeroed_grain=on,adapter_type=lsilogic,toolsversion=5",
        ),
        ("vmdk", "subformat=streamOptimized,hwversion=7"),
        ("vhdx", "subformat=foo"),
        ("vhdx", "block_size=3M"),
        ("vhdx", "log_size=x"),
        (
            "vhdx",
            "subformat=fixed,block_state_zero=off,block_size=2M,log_size=2M",
        ),
        ("vpc", "subformat=bogus"),
        ("vpc", "force_size=x"),
        ("vpc", "foo=1"),
        ("vpc", "preallocation=bogus"),
        ("vpc", "subformat=fixed,force_size=on,preallocation=off"),
        ("vdi", "static=maybe"),
        ("vdi", "cluster_size=1M"),
        ("vdi", "static=on,preallocation=off"),
    ];
    for (f, o) in cases {
        let q = qemu_img(dir, &["create", "-f", f, "-o", o, "x.img", "1M"]);
        let _ = std::fs::remove_file(dir.join("x.img"));
        let v = vdisk(dir, &["create", "-f", f, "-o", o, "x.img", "1M"]);
        let _ = std::fs::remove_file(dir.join("x.img"));
        assert_eq!(v.code, q.code, "{f} {o}: {} / {}", v.err, q.err);
        assert_eq!(v.out, q.out, "{f} {o}");
        assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "{f} {o}");
    }
}

#[test]
fn fixed_vhd_is_raw_like_qemu() {
    // A fixed VHD keeps its footer only at the end; QEMU's probe looks at the start, so
    // it reads such a file as raw unless told `-f vpc` — and so does vdisk.
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                "subformat=fixed",
                "f.vhd",
                "1M",
            ],
        ),
        "fixed vhd",
    );
    assert_eq!(qemu_detected(dir, "f.vhd"), "raw");
    let r = vdisk(dir, &["info", "f.vhd"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains("file format: raw"), "{}", r.out);
    // Named, it is a fixed VHD to both.
    let r = vdisk(dir, &["info", "-f", "vpc", "f.vhd"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let q = qemu_img(dir, &["info", "-f", "vpc", "f.vhd"]);
    assert_eq!(r.out, q.out);
}

#[test]
fn convert_option_values_checked_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "src.raw", "1M"]),
        "src",
    );
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "-o", "foo=1"],
        &["-O", "qcow2", "-o", "lazy_refcounts=x"],
        &["-O", "qcow2", "-o", "preallocation=x"],
        &["-O", "qcow2", "-o", "nocow=on,extent_size_hint=1M"],
        &["-O", "qed", "-o", "preallocation=x"],
        &["-O", "raw", "-o", "backing_file=x"],
        &["-O", "raw", "-B", "src.raw", "-F", "raw"],
        &["-O", "qed", "-c"],
    ];
    for c in cases {
        let mut args = vec!["convert"];
        args.extend_from_slice(c);
        args.extend_from_slice(&["src.raw", "o.img"]);
        let q = qemu_img(dir, &args);
        let _ = std::fs::remove_file(dir.join("o.img"));
        let v = vdisk(dir, &args);
        let _ = std::fs::remove_file(dir.join("o.img"));
        assert_eq!(v.code, q.code, "{c:?}: {} / {}", v.err, q.err);
        assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "{c:?}");
    }
}
