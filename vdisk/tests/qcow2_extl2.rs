//! Extended L2 entries (subclusters): reads of qemu-made images, and writes from many
//! threads into different subclusters of the same clusters.

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
    // Writable now: a write keeps the image clean for qemu-img.
    drop(img);
    let img = open(&f, true);
    img.write_at(&[9u8; 100], 3 << 20).unwrap();
    img.close().unwrap();
    drop(img);
    assert_clean(&f);
}

/// Threads writing different subclusters of the same clusters (over a backing file):
/// every bit set by one writer survives the others (bitmaps are ORed under the lock),
/// every byte reads back, and qemu-img agrees.
#[test]
fn threads_writing_subclusters_of_shared_clusters() {
    for (cs, threads) in [(65536u64, 8u64), (16384, 4)] {
        let d = tmp();
        let f = path(&d, "t.qcow2");
        let base = path(&d, "base.qcow2");
        let size = 4u64 << 20;
        qemu_create(&base, "cluster_size=65536", "4M");
        qemu_io(&base, &["write -P 0x77 0 4M"]);
        vdisk_create(
            &f,
            size,
            &[("cluster_size", &cs.to_string()), ("extended_l2", "on")],
            Some(("base.qcow2", "qcow2")),
        );
        let img = std::sync::Arc::new(open(&f, true));
        let sc = cs / 32;
        // Thread t owns subclusters k with k % threads == t; writes cover part of a
        // subcluster (partial COW from the backing file) or all of it, three rounds.
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let img = img.clone();
                std::thread::spawn(move || {
                    for round in 0..3u64 {
                        for k in (t..size / sc).step_by((threads * 5) as usize) {
                            let v = (t * 16 + round + 1) as u8;
                            let (off, len) = if round == 1 {
                                (k * sc + sc / 4, sc / 2)
                            } else {
                                (k * sc, sc)
                            };
                            img.write_at(&vec![v; len as usize], off).unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut want = vec![0x77u8; size as usize];
        for t in 0..threads {
            for k in (t..size / sc).step_by((threads * 5) as usize) {
                want[(k * sc) as usize..((k + 1) * sc) as usize].fill((t * 16 + 3) as u8);
            }
        }
        assert_same(&read_all(&img), &want, "after concurrent subcluster writes");
        // Untouched subclusters are still unallocated in this layer.
        let mut off = 0;
        let mut data = 0u64;
        let top = &img.layers()[0];
        while off < size {
            let e = top.block_status(off, size - off).unwrap();
            if e.kind == ExtentKind::Data {
                data += e.len;
            }
            off += e.len;
        }
        let owned = (0..threads)
            .map(|t| (t..size / sc).step_by((threads * 5) as usize).count() as u64)
            .sum::<u64>();
        assert_eq!(
            data,
            owned * sc,
            "cs {cs}: only written subclusters allocated"
        );
        let img = std::sync::Arc::try_unwrap(img).unwrap();
        img.close().unwrap();
        drop(img);
        assert_clean(&f);
        assert_same(&qemu_raw(&f), &want, "qemu view");
    }
}
