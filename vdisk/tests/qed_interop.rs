//! QED interoperability with QEMU: images qemu-img/qemu-io write read identically here,
//! images written here pass `qemu-img check` and compare equal to qemu-io's result.

mod qed_util;

use qed_util::*;
use std::path::Path;
use vdisk::format::Format;
use vdisk::{CreateOptions, Image, ZeroFlags};

fn qemu_create(path: &Path, size: &str, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "qed"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(p(path));
    args.push(size);
    run("qemu-img", &args);
}

fn qemu_io(path: &Path, fmt: &str, cmds: &[String]) {
    let mut args: Vec<&str> = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(path));
    run("qemu-io", &args);
}

/// Images written by qemu-io at several geometries read bit-exact.
#[test]
fn qemu_written_images_read_identically() {
    let dir = tmp();
    for (i, (cs, ts)) in [("4k", 2), ("64k", 4), ("16k", 16), ("4k", 8), ("1M", 2)]
        .iter()
        .enumerate()
    {
        let img = path_in(&dir, &format!("q{i}.qed"));
        qemu_create(&img, "24M", &format!("cluster_size={cs},table_size={ts}"));
        let mut rng = Rng(0x1234 + i as u64);
        let mut cmds = Vec::new();
        for _ in 0..30 {
            let off = rng.below(24 << 20) / 512 * 512;
            let len = (rng.below(200_000) / 512 * 512 + 512).min((24 << 20) - off);
            match rng.below(4) {
                0 => cmds.push(format!("write -z {off} {len}")),
                _ => cmds.push(format!("write -P {} {off} {len}", rng.below(255) + 1)),
            }
        }
        qemu_io(&img, "qed", &cmds);
        let want = qemu_raw(&img, "qed");
        let v = open(&img, true);
        assert_eq!(v.format(), Format::Qed);
        assert!(vdisk_read_all(&v) == want, "contents differ for {cs}/{ts}");
    }
}

/// QED over raw and QED over QED backing files, including a backing file smaller than
/// the image, and a raw backing file whose first bytes look like a QED header.
#[test]
fn backing_files_read_identically() {
    let dir = tmp();
    let base = path_in(&dir, "base.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&base), "3M"]);
    qemu_io(
        &base,
        "raw",
        &["write -P 7 0 3M".into(), "write -P 9 1M 100k".into()],
    );
    let mid = path_in(&dir, "mid.qed");
    qemu_create(
        &mid,
        "6M",
        &format!("backing_file={},backing_fmt=raw,cluster_size=4k", p(&base)),
    );
    qemu_io(
        &mid,
        "qed",
        &["write -P 1 100k 10k".into(), "write -P 2 2900k 300k".into()],
    );
    let top = path_in(&dir, "top.qed");
    qemu_create(
        &top,
        "8M",
        &format!("backing_file={},backing_fmt=qed", p(&mid)),
    );
    qemu_io(
        &top,
        "qed",
        &[
            "write -P 3 64k 64k".into(),
            "write -P 4 5M 70k".into(),
            "write -z 1M 64k".into(),
        ],
    );
    for (img, fmt) in [(&mid, "qed"), (&top, "qed")] {
        let want = qemu_raw(img, fmt);
        let v = open(img, true);
        assert!(vdisk_read_all(&v) == want, "{} differs", img.display());
    }
    // vdisk writes into the chain: partial clusters are filled from the backing file.
    {
        let v = open(&top, false);
        v.write_at(&[0xAB; 3000], 2_950_000).expect("write");
        v.write_at(&[0xCD; 100], 7 * 1024 * 1024 + 5)
            .expect("write");
        v.close().expect("close");
    }
    assert_qemu_clean(&top);
    let want = qemu_raw(&top, "qed");
    let v = open(&top, true);
    assert!(vdisk_read_all(&v) == want);

    // A raw backing file starting with a QED header stays raw (BACKING_FORMAT_NO_PROBE).
    let fake = path_in(&dir, "fake.raw");
    qemu_create(&fake, "1M", "");
    let over = path_in(&dir, "over.qed");
    qemu_create(
        &over,
        "1M",
        &format!("backing_file={},backing_fmt=raw", p(&fake)),
    );
    let v = open(&over, true);
    let spec = v.backing_spec().expect("backing spec");
    assert_eq!(spec.format, Some(Format::Raw));
    let mut head = [0u8; 4];
    v.read_at(&mut head, 0).expect("read");
    assert_eq!(&head, b"QED\0");
}

/// Images created here have QEMU's layout byte for byte (header, L1 offset, size).
#[test]
fn create_matches_qemu_img() {
    let dir = tmp();
    let base = path_in(&dir, "b.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).expect("write base");
    qemu_create(&path_in(&dir, "b.qed"), "1M", "");
    for opts in [
        "",
        "cluster_size=4k,table_size=1",
        "cluster_size=1M,table_size=16",
        "backing_file=b.raw,backing_fmt=raw",
        "backing_file=b.qed,backing_fmt=qed",
    ] {
        let q = path_in(&dir, "q.qed");
        let v = path_in(&dir, "v.qed");
        let _ = std::fs::remove_file(&q);
        qemu_create(&q, "10M", opts);
        let mut options: Vec<(String, String)> = Vec::new();
        for kv in opts.split(',').filter(|s| !s.is_empty()) {
            let (k, val) = kv.split_once('=').expect("k=v");
            options.push((k.into(), val.into()));
        }
        let _ = std::fs::remove_file(&v);
        Image::create(
            &v,
            &CreateOptions {
                format: Format::Qed,
                size: Some(10 << 20),
                options,
                backing_file: None,
                backing_format: None,
                unsafe_backing: false,
            },
        )
        .unwrap_or_else(|e| panic!("create {opts}: {e}"));
        let a = std::fs::read(&q).expect("read");
        let b = std::fs::read(&v).expect("read");
        assert_eq!(a.len(), b.len(), "file size for {opts}");
        assert!(a == b, "bytes differ for {opts}");
    }
    // table_size=1: QEMU cannot open what it creates; we can, and write to it.
    let t1 = path_in(&dir, "t1.qed");
    qemu_create(&t1, "8M", "cluster_size=4k,table_size=1");
    let v = open(&t1, false);
    v.write_at(&[5u8; 10000], 1_000_000).expect("write");
    let mut b = vec![0u8; 10000];
    v.read_at(&mut b, 1_000_000).expect("read");
    assert!(b.iter().all(|x| *x == 5));
}

#[test]
fn create_rejects_bad_options() {
    let dir = tmp();
    let v = path_in(&dir, "v.qed");
    for (opts, msg) in [
        (vec![("foo", "1")], "Invalid parameter 'foo'"),
        (vec![("cluster_size", "1k")], "cluster size"),
        (vec![("cluster_size", "96k")], "cluster size"),
        (vec![("table_size", "3")], "table size"),
        (vec![("table_size", "32")], "table size"),
    ] {
        let e = Image::create(
            &v,
            &CreateOptions {
                format: Format::Qed,
                size: Some(1 << 20),
                options: opts
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                backing_file: None,
                backing_format: None,
                unsafe_backing: false,
            },
        )
        .expect_err("must fail");
        assert!(e.to_string().contains(msg), "{e} should mention {msg}");
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write(u8, u64, u64),
    Zero(u64, u64),
    Discard(u64, u64),
}

fn random_script(rng: &mut Rng, size: u64, cs: u64, n: usize, with_discard: bool) -> Vec<Op> {
    let mut ops = Vec::new();
    for _ in 0..n {
        let aligned = rng.below(2) == 0;
        let (off, len) = if aligned {
            let c = rng.below(size / cs);
            let k = (rng.below(4) + 1).min(size / cs - c);
            (c * cs, k * cs)
        } else {
            let off = rng.below(size) / 512 * 512;
            let len = (rng.below(3 * cs) / 512 * 512 + 512).min(size - off);
            (off, len)
        };
        match rng.below(if with_discard { 5 } else { 4 }) {
            0 => ops.push(Op::Zero(off, len)),
            4 => ops.push(Op::Discard(off, len)),
            _ => ops.push(Op::Write((rng.below(250) + 1) as u8, off, len)),
        }
    }
    ops
}

/// Random scripts applied by vdisk and by qemu-io end up with the same contents;
/// vdisk's image passes qemu-img check (no errors, no leaks) with NEED_CHECK clear.
#[test]
fn random_scripts_match_qemu_io() {
    let dir = tmp();
    let base = path_in(&dir, "base.raw");
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", p(&base), "1536k"],
    );
    qemu_io(&base, "raw", &["write -P 0x5a 0 1536k".into()]);
    for seed in 1..=6u64 {
        let mut rng = Rng(seed * 7919);
        let with_backing = seed % 2 == 0;
        let cs: u64 = [4096, 65536, 16384][(seed % 3) as usize];
        let size = 2u64 << 20;
        let opts = if with_backing {
            format!(
                "cluster_size={cs},table_size=2,backing_file={},backing_fmt=raw",
                p(&base)
            )
        } else {
            format!("cluster_size={cs},table_size=2")
        };
        let a = path_in(&dir, "a.qed");
        let b = path_in(&dir, "b.qed");
        let _ = std::fs::remove_file(&a);
        qemu_create(&a, "2M", &opts);
        std::fs::copy(&a, &b).expect("copy");
        // Discard is a no-op in QEMU's QED; here it makes whole allocated clusters read as
        // zeroes, which matches qemu-io's `write -z` of those clusters when there is no
        // backing file (unallocated clusters read zeroes too).
        let ops = random_script(&mut rng, size, cs, 40, !with_backing);
        let mut cmds = Vec::new();
        {
            let v = open(&a, false);
            for op in &ops {
                match *op {
                    Op::Write(pat, off, len) => {
                        v.write_at(&vec![pat; len as usize], off).expect("write");
                        cmds.push(format!("write -P {pat} {off} {len}"));
                    }
                    Op::Zero(off, len) => {
                        let unmap = rng.below(2) == 0;
                        v.write_zeroes(
                            off,
                            len,
                            ZeroFlags {
                                may_unmap: unmap,
                                fast: false,
                            },
                        )
                        .expect("zero");
                        cmds.push(format!(
                            "write -z {}{off} {len}",
                            if unmap { "-u " } else { "" }
                        ));
                    }
                    Op::Discard(off, len) => {
                        v.discard(off, len).expect("discard");
                        let s = off.div_ceil(cs) * cs;
                        let e = if off + len == size {
                            size
                        } else {
                            (off + len) / cs * cs
                        };
                        if e > s {
                            cmds.push(format!("write -z {s} {}", e - s));
                        }
                    }
                }
            }
            v.close().expect("close");
        }
        qemu_io(&b, "qed", &cmds);
        assert_eq!(features(&a) & 2, 0, "NEED_CHECK left set (seed {seed})");
        assert_qemu_clean(&a);
        let (code, out, err) = run_status(
            "qemu-img",
            &["compare", "-f", "qed", "-F", "qed", p(&a), p(&b)],
        );
        assert_eq!(
            code, 0,
            "seed {seed}: qemu-img compare: {out}{err}\nops {ops:?}"
        );
        // And vdisk reads what QEMU reads.
        let want = qemu_raw(&b, "qed");
        assert!(vdisk_read_all(&open(&a, true)) == want, "seed {seed}");
    }
}

/// The check report equals qemu-img check's JSON on the same images.
#[test]
fn check_report_matches_qemu() {
    let dir = tmp();
    let img = path_in(&dir, "c.qed");
    qemu_create(&img, "64M", "cluster_size=4k,table_size=2");
    qemu_io(
        &img,
        "qed",
        &[
            "write -P 1 0 8k".into(),
            "write -P 2 2M 4k".into(),
            "write -P 3 12k 4k".into(),
            "write -z 20k 4k".into(),
            "write -P 4 40M 64k".into(),
        ],
    );
    let (code, q) = qemu_check(&img);
    assert_eq!(code, 0);
    let v = open(&img, true);
    let r = v.check(vdisk::Repair::default()).expect("check");
    assert_eq!(r.total_clusters, q["total-clusters"].as_u64());
    assert_eq!(r.allocated_clusters, q["allocated-clusters"].as_u64());
    assert_eq!(r.fragmented_clusters, q["fragmented-clusters"].as_u64());
    assert_eq!(r.corruptions, q["corruptions"].as_u64().unwrap_or(0));
    assert_eq!(r.leaks, q["leaks"].as_u64().unwrap_or(0));
    assert_eq!(r.check_errors, q["check-errors"].as_u64().unwrap_or(0));
    assert_eq!(r.image_end_offset, q["image-end-offset"].as_u64());
}
