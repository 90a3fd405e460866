//! Extended L2 entries (subclusters): read-only support.

mod qcow2_util;
use qcow2_util::*;
use vdisk::ExtentKind;

/// Per-512-byte-sector (data, zero) as qemu-img map reports them.
fn qemu_map(f: &std::path::Path, size: usize) -> Vec<(bool, bool)> {
    let out = run("qemu-img", &["map", "--output=json", p(f)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut m = vec![(false, false); size / 512];
    for e in v.as_array().unwrap() {
        let s = e["start"].as_u64().unwrap() as usize / 512;
        let l = e["length"].as_u64().unwrap() as usize / 512;
        for x in &mut m[s..s + l] {
            *x = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        }
    }
    m
}

fn vdisk_map(img: &vdisk::Image) -> Vec<(bool, bool)> {
    let size = img.size();
    let mut m = Vec::new();
    let mut off = 0;
    while off < size {
        let e = img.block_status(off, size - off).unwrap();
        let flags = match e.kind {
            ExtentKind::Data => (true, false),
            ExtentKind::Zero => (false, true),
            ExtentKind::Unallocated => (false, true),
        };
        for _ in 0..e.len / 512 {
            m.push(flags);
        }
        off += e.len;
    }
    m
}

#[test]
fn subclusters_read_and_map() {
    let d = tmp();
    let base = path(&d, "base.qcow2");
    qemu_create(&base, "", "4M");
    qemu_io(&base, &["write -P 0x61 0 4M"]);
    let f = path(&d, "e.qcow2");
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
            "extended_l2=on,cluster_size=64k",
            p(&f),
        ],
    );
    qemu_io(
        &f,
        &[
            "write -P 1 0 2k",
            "write -P 2 6k 4k",
            "write -z 70k 8k",
            "write -P 3 1M 200k",
            "write -z 2M 64k",
            "discard 1M 64k",
            "write -c -P 4 3M 64k",
            "write -P 5 3200k 1k",
        ],
    );
    let img = open(&f, false);
    let want = qemu_raw(&f);
    assert_same(&read_all(&img), &want, "extended L2 read");
    // Partial reads inside subclusters.
    let mut b = vec![0u8; 3000];
    img.read_at(&mut b, 1500).unwrap();
    assert_same(&b, &want[1500..4500], "partial");
    // Status, sector by sector, except where QEMU reports the backing file's data.
    let q = qemu_map(&f, 4 << 20);
    let v = vdisk_map(&img);
    let bimg = open(&base, false);
    let _ = bimg;
    assert_eq!(q.len(), v.len());
    // Compare only allocation in this layer: data sectors must agree where vdisk says
    // this layer has data.
    for (i, (a, b)) in q.iter().zip(&v).enumerate() {
        if b.0 {
            assert!(a.0, "sector {i}: vdisk data, qemu not");
        }
    }
    let r = img.check(Default::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.findings);
    let (_, qc) = qemu_check(&f);
    assert_eq!(
        r.allocated_clusters.unwrap(),
        qc["allocated-clusters"].as_u64().unwrap()
    );
    assert_eq!(
        r.image_end_offset.unwrap(),
        qc["image-end-offset"].as_u64().unwrap()
    );
    // Writable opens are refused with a clear error.
    let e = open_with(&f, true, Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("extended L2"), "{e}");
}
