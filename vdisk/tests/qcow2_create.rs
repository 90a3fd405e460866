//! Images created by vdisk: QEMU's checks pass and `qemu-img info` shows the options.

mod qcow2_util;
use qcow2_util::*;
use std::sync::Arc;
use vdisk::format::{qcow2, BackingSpec, CreateSpec, FormatSpecific};
use vdisk::storage::{MemStorage, Storage};
use vdisk::Format;

fn info(f: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&run("qemu-img", &["info", "--output=json", p(f)])).unwrap()
}

/// Create options, then the expected compat, cluster size, lazy refcounts, refcount
/// bits and compression type.
type CreateCase<'a> = (&'a [(&'a str, &'a str)], &'a str, u64, bool, u64, &'a str);

#[test]
fn options_show_in_qemu_info() {
    let d = tmp();
    let cases: &[CreateCase] = &[
        (&[], "1.1", 65536, false, 16, "zlib"),
        (&[("compat", "0.10")], "0.10", 65536, false, 16, "zlib"),
        (
            &[("compat", "v2"), ("cluster_size", "512")],
            "0.10",
            512,
            false,
            16,
            "zlib",
        ),
        (
            &[("cluster_size", "2M"), ("refcount_bits", "64")],
            "1.1",
            2 << 20,
            false,
            64,
            "zlib",
        ),
        (
            &[
                ("cluster_size", "4k"),
                ("refcount_bits", "1"),
                ("lazy_refcounts", "on"),
            ],
            "1.1",
            4096,
            true,
            1,
            "zlib",
        ),
        (
            &[("compression_type", "zstd"), ("refcount_bits", "8")],
            "1.1",
            65536,
            false,
            8,
            "zstd",
        ),
        (
            &[("preallocation", "metadata"), ("cluster_size", "4096")],
            "1.1",
            4096,
            false,
            16,
            "zlib",
        ),
        (
            &[("preallocation", "falloc")],
            "1.1",
            65536,
            false,
            16,
            "zlib",
        ),
        (
            &[("preallocation", "full"), ("compat", "0.10")],
            "0.10",
            65536,
            false,
            16,
            "zlib",
        ),
    ];
    for (i, (opts, compat, cs, lazy, bits, ct)) in cases.iter().enumerate() {
        let f = path(&d, &format!("c{i}.qcow2"));
        vdisk_create(&f, 5 << 20, opts, None);
        assert_clean(&f);
        let v = info(&f);
        let what = format!("{opts:?}: {v}");
        assert_eq!(v["virtual-size"], 5 << 20, "{what}");
        assert_eq!(v["cluster-size"], *cs, "{what}");
        let fs = &v["format-specific"]["data"];
        assert_eq!(fs["compat"], *compat, "{what}");
        if *compat == "1.1" {
            assert_eq!(fs["lazy-refcounts"], *lazy, "{what}");
            assert_eq!(fs["compression-type"], *ct, "{what}");
        }
        assert_eq!(fs["refcount-bits"], *bits, "{what}");
        let img = open(&f, false);
        match img.format_specific() {
            FormatSpecific::Qcow2 {
                compat: c,
                refcount_bits,
                lazy_refcounts,
                compression_type,
                ..
            } => {
                assert_eq!(
                    (
                        c.as_str(),
                        u64::from(refcount_bits),
                        lazy_refcounts,
                        compression_type.as_str()
                    ),
                    (*compat, *bits, *lazy, *ct)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(read_all(&img).iter().all(|&b| b == 0));
        // Same layout as QEMU for the same options (file length and allocation stats).
        let q = path(&d, &format!("q{i}.qcow2"));
        let o: Vec<String> = opts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        qemu_create(&q, &o.join(","), "5M");
        assert_eq!(
            std::fs::metadata(&f).unwrap().len(),
            std::fs::metadata(&q).unwrap().len(),
            "{what}: file length differs from qemu-img's"
        );
        let (_, a) = qemu_check(&f);
        let (_, b) = qemu_check(&q);
        assert_eq!(a["image-end-offset"], b["image-end-offset"], "{what}");
        assert_eq!(a["allocated-clusters"], b["allocated-clusters"], "{what}");
    }
}

#[test]
fn backing_recorded() {
    let d = tmp();
    let base = path(&d, "base.qcow2");
    qemu_create(&base, "", "3M");
    qemu_io(&base, &["write -P 0x42 0 3M"]);
    let f = path(&d, "top.qcow2");
    vdisk_create(
        &f,
        3 << 20,
        &[("cluster_size", "4096")],
        Some(("base.qcow2", "qcow2")),
    );
    assert_clean(&f);
    let v = info(&f);
    assert_eq!(v["backing-filename"], "base.qcow2");
    assert_eq!(v["backing-filename-format"], "qcow2");
    let img = open(&f, true);
    assert_eq!(
        img.backing_spec(),
        Some(BackingSpec {
            name: "base.qcow2".into(),
            format: Some(Format::Qcow2)
        })
    );
    img.write_at(&[1u8; 100], 5000).unwrap();
    let mut want = vec![0x42u8; 3 << 20];
    want[5000..5100].fill(1);
    assert_same(&read_all(&img), &want, "through backing");
    // rebase -u: point somewhere else, then drop the backing file.
    img.set_backing(Some(BackingSpec {
        name: "other.raw".into(),
        format: Some(Format::Raw),
    }))
    .unwrap();
    drop(img);
    let v = info(&f);
    assert_eq!(v["backing-filename"], "other.raw");
    assert_eq!(v["backing-filename-format"], "raw");
    {
        let img = vdisk::Image::open(
            &f,
            &vdisk::OpenOptions {
                no_backing: true,
                locking: false,
                ..Default::default()
            },
        )
        .unwrap();
        img.set_backing(None).unwrap();
    }
    let v = info(&f);
    assert!(v.get("backing-filename").is_none(), "{v}");
    assert_clean(&f);
}

#[test]
fn bad_options() {
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let cases = [
        ("foo", "bar", "Invalid parameter 'foo'"),
        (
            "compat",
            "0.9",
            "Parameter 'version' does not accept value '0.9'",
        ),
        (
            "cluster_size",
            "1000",
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            "cluster_size",
            "4M",
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            "refcount_bits",
            "3",
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
        (
            "refcount_bits",
            "128",
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
        (
            "compression_type",
            "lz4",
            "Parameter 'compression-type' does not accept value 'lz4'",
        ),
        (
            "preallocation",
            "foo",
            "Parameter 'preallocation' does not accept value 'foo'",
        ),
        (
            "lazy_refcounts",
            "maybe",
            "Parameter 'lazy_refcounts' expects 'on' or 'off'",
        ),
    ];
    for (k, v, want) in cases {
        let e = qcow2::create(
            &mem,
            &CreateSpec {
                size: 1 << 20,
                backing: None,
                options: vec![(k.into(), v.into())],
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want), "{k}={v}: {e}");
    }
    let e = qcow2::create(
        &mem,
        &CreateSpec {
            size: 1 << 20,
            backing: None,
            options: vec![
                ("compat".into(), "0.10".into()),
                ("refcount_bits".into(), "8".into()),
            ],
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("require compatibility level 1.1"), "{e}");
    // Extended L2 entries need clusters of at least 16 KiB (qemu-img's wording).
    let e = qcow2::create(
        &mem,
        &CreateSpec {
            size: 1 << 20,
            backing: None,
            options: vec![
                ("extended_l2".into(), "on".into()),
                ("cluster_size".into(), "8192".into()),
            ],
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("at least 16384 bytes"), "{e}");
}

#[test]
fn resize_grow_and_shrink() {
    let d = tmp();
    let f = path(&d, "r.qcow2");
    // 512-byte clusters: an L2 table covers 32 KiB, so growing needs a bigger L1.
    vdisk_create(&f, 1 << 20, &[("cluster_size", "512")], None);
    {
        let img = open(&f, true);
        img.write_at(&[7u8; 3000], (1 << 20) - 3000).unwrap();
        img.resize(8 << 20, false).unwrap();
        assert_eq!(img.size(), 8 << 20);
        img.write_at(&[9u8; 5000], (8 << 20) - 5000).unwrap();
        let all = read_all(&img);
        assert!(all[(1 << 20) - 3000..1 << 20].iter().all(|&b| b == 7));
        assert!(all[(8 << 20) - 5000..].iter().all(|&b| b == 9));
        assert!(img.resize(4 << 20, false).is_err());
    }
    assert_clean(&f);
    assert_eq!(info(&f)["virtual-size"], 8 << 20);
    {
        let img = open(&f, true);
        img.resize(600_064, true).unwrap();
    }
    assert_clean(&f);
    let raw = qemu_raw(&f);
    assert_eq!(raw.len(), 600_064);
    assert!(raw.iter().all(|&b| b == 0));
}

#[test]
fn shrink_then_grow_reads_zeroes() {
    let d = tmp();
    let f = path(&d, "sg.qcow2");
    vdisk_create(&f, 1 << 20, &[("cluster_size", "65536")], None);
    let img = open(&f, true);
    img.write_at(&vec![5u8; 1 << 20], 0).unwrap();
    img.resize(100_352, true).unwrap();
    img.resize(1 << 20, false).unwrap();
    let all = read_all(&img);
    assert!(all[..100_352].iter().all(|&b| b == 5));
    assert!(
        all[100_352..].iter().all(|&b| b == 0),
        "grown area must read as zeroes"
    );
    drop(img);
    assert_clean(&f);
}

/// Sizes too large for the cluster size fail with qemu-img's exact message.
#[test]
fn too_large_message_matches_qemu() {
    let d = tmp();
    let f = path(&d, "big.qcow2");
    for (cs, size) in [
        ("512", "64T"),
        ("512", "1T"),
        ("65536", "300P"),
        ("2M", "6E"),
    ] {
        let opt = format!("cluster_size={cs}");
        let (code, _, err) = run_status(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &opt, p(&f), size],
        );
        assert_eq!(code, 1, "{err}");
        let prefix = format!("qemu-img: {}: ", p(&f));
        let want = err.trim().strip_prefix(&prefix).unwrap_or(err.trim());
        let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let got = qcow2::create(
            &mem,
            &CreateSpec {
                size: vdisk::format::parse_size(size).unwrap(),
                backing: None,
                options: vec![("cluster_size".into(), cs.into())],
            },
        )
        .unwrap_err()
        .to_string();
        assert_eq!(got, want, "cluster_size={cs} size={size}");
    }
}
