//! Images written by QEMU read back bit-exact through vdisk.

mod qcow2_util;
use qcow2_util::*;

/// A write pattern touching partial clusters, several L2 tables and the last byte.
fn qemu_pattern(img: &std::path::Path, size: u64) {
    let s = size;
    let cmds = [
        "write -P 0x11 0 4096".to_string(),
        "write -P 0x22 1000 3000".to_string(),
        format!("write -P 0x33 {} 70000", s / 2 - 1234),
        format!("write -P 0x44 {} 512", s - 512),
        format!("write -z {} 65536", s / 4),
        format!("write -P 0x55 {} 200000", s / 3),
    ];
    let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(img, &refs);
}

fn roundtrip(opts: &str, size: u64) {
    let d = tmp();
    let f = path(&d, "a.qcow2");
    qemu_create(&f, opts, &size.to_string());
    qemu_pattern(&f, size);
    let want = qemu_raw(&f);
    let img = open(&f, false);
    assert_eq!(img.size(), size);
    let got = read_all(&img);
    assert_same(&got, &want, opts);
}

#[test]
fn cluster_sizes_and_compat() {
    for cs in ["512", "4096", "65536", "2097152"] {
        for compat in ["0.10", "1.1"] {
            roundtrip(&format!("cluster_size={cs},compat={compat}"), 6 << 20);
        }
    }
}

#[test]
fn refcount_widths() {
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        roundtrip(&format!("refcount_bits={bits},cluster_size=4096"), 3 << 20);
    }
}

#[test]
fn preallocation_and_lazy() {
    for p in ["metadata", "falloc", "full"] {
        roundtrip(&format!("preallocation={p},cluster_size=4096"), 2 << 20);
    }
    roundtrip("lazy_refcounts=on", 4 << 20);
}

#[test]
fn compressed_zlib_and_zstd() {
    for ct in ["zlib", "zstd"] {
        for cs in ["4096", "65536"] {
            let d = tmp();
            let src = path(&d, "src.qcow2");
            qemu_create(&src, "", "3M");
            qemu_pattern(&src, 3 << 20);
            let dst = path(&d, "c.qcow2");
            run(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &format!("compression_type={ct},cluster_size={cs}"),
                    p(&src),
                    p(&dst),
                ],
            );
            let want = qemu_raw(&src);
            let img = open(&dst, false);
            let st = img.block_status(0, 4096).unwrap();
            assert!(st.compressed, "first cluster should be compressed");
            assert_same(&read_all(&img), &want, ct);
        }
    }
}

#[test]
fn backing_chain() {
    let d = tmp();
    let base = path(&d, "base.qcow2");
    qemu_create(&base, "cluster_size=4096", "4M");
    qemu_io(&base, &["write -P 0xaa 0 4M"]);
    let mid = path(&d, "mid.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=65536",
            p(&mid),
        ],
    );
    qemu_io(
        &mid,
        &[
            "write -P 0xbb 5000 70000",
            "write -z 1M 64k",
            "discard 2M 128k",
        ],
    );
    let top = path(&d, "top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=512",
            p(&top),
            "6M",
        ],
    );
    qemu_io(
        &top,
        &[
            "write -P 0xcc 100 1000",
            "write -P 0xdd 3M 1M",
            "write -P 0xee 5M 100",
        ],
    );
    for f in [&mid, &top] {
        let want = qemu_raw(f);
        let img = open(f, false);
        assert_same(&read_all(&img), &want, "chain");
    }
}

/// Block status answers a run of unallocated L1 entries (a sparse disk of any size) in
/// one call, and still stops exactly where data starts.
#[test]
fn block_status_sparse_disk_in_one_call() {
    use vdisk::format::ExtentKind;
    let d = tmp();
    let f = path(&d, "s.qcow2");
    qemu_create(&f, "", "64T");
    let size = 64u64 << 40;
    let img = open(&f, false);
    let e = img.layer_block_status(0, size).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Unallocated, size));
    let e = img
        .layer_block_status(12345 << 20, size - (12345 << 20))
        .unwrap();
    assert_eq!(
        (e.kind, e.len),
        (ExtentKind::Unallocated, size - (12345 << 20))
    );
    drop(img);
    qemu_io(&f, &["write -P 1 60T 64k", "write -P 2 1G 64k"]);
    let img = open(&f, false);
    let e = img.layer_block_status(0, size).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Unallocated, 1 << 30));
    let e = img
        .layer_block_status((1 << 30) + 65536, size - (1 << 30) - 65536)
        .unwrap();
    assert_eq!(
        (e.kind, e.len),
        (ExtentKind::Unallocated, (60u64 << 40) - (1 << 30) - 65536)
    );
    let e = img.layer_block_status(60 << 40, 1 << 20).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Data, 65536));
}
