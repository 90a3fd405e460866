//! `check` reports what `qemu-img check` reports, and repairs what it repairs.

mod qcow2_util;
use qcow2_util::*;
use vdisk::error::Structure;
use vdisk::format::{DriverOptions, Finding, FindingKind, Outcome};
use vdisk::Repair;

/// Whether `f` reports a refcount mismatch of host cluster `c` (found, not repaired).
fn mismatch(f: &Finding, kind: FindingKind, c: u64, refcount: u64, references: u64) -> bool {
    f.kind == kind
        && f.outcome == Outcome::Found
        && f.cluster == Some(c)
        && f.refcount == Some(refcount)
        && f.references == Some(references)
}

fn field(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k).and_then(|x| x.as_u64()).unwrap_or(0)
}

/// Compares vdisk's report with qemu-img's for one image.
fn same_as_qemu(f: &std::path::Path) {
    let (_, q) = qemu_check(f);
    let img = open(f, false);
    let r = img.check(Repair::default()).unwrap();
    let what = format!("{}: qemu {q} vdisk {r:?}", f.display());
    assert_eq!(r.corruptions, field(&q, "corruptions"), "{what}");
    assert_eq!(r.leaks, field(&q, "leaks"), "{what}");
    assert_eq!(
        r.image_end_offset,
        Some(field(&q, "image-end-offset")),
        "{what}"
    );
    assert_eq!(
        r.total_clusters,
        Some(field(&q, "total-clusters")),
        "{what}"
    );
    assert_eq!(
        r.allocated_clusters.unwrap_or(0),
        field(&q, "allocated-clusters"),
        "{what}"
    );
    assert_eq!(
        r.fragmented_clusters.unwrap_or(0),
        field(&q, "fragmented-clusters"),
        "{what}"
    );
    assert_eq!(
        r.compressed_clusters.unwrap_or(0),
        field(&q, "compressed-clusters"),
        "{what}"
    );
}

#[test]
fn statistics_match_qemu() {
    let d = tmp();
    // Fragmented writes over several L2 tables.
    let a = path(&d, "a.qcow2");
    qemu_create(&a, "cluster_size=4096", "8M");
    qemu_io(
        &a,
        &[
            "write -P 1 3M 64k",
            "write -P 2 0 8k",
            "write -P 3 5M 1M",
            "write -P 4 1M 4k",
            "write -z 6M 64k",
            "discard 5M 8k",
        ],
    );
    same_as_qemu(&a);
    // Compressed.
    let c = path(&d, "c.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&a),
            p(&c),
        ],
    );
    same_as_qemu(&c);
    // Preallocated, v2, small refcounts.
    let m = path(&d, "m.qcow2");
    qemu_create(
        &m,
        "preallocation=metadata,compat=0.10,cluster_size=512",
        "1M",
    );
    same_as_qemu(&m);
    let r = path(&d, "r.qcow2");
    qemu_create(&r, "refcount_bits=1,cluster_size=1024", "2M");
    qemu_io(&r, &["write -P 9 0 2M"]);
    same_as_qemu(&r);
    // Snapshots: shared clusters, snapshot L1 tables.
    let s = path(&d, "s.qcow2");
    qemu_create(&s, "cluster_size=4096", "4M");
    qemu_io(&s, &["write -P 1 0 1M"]);
    run("qemu-img", &["snapshot", "-c", "snap1", p(&s)]);
    qemu_io(&s, &["write -P 2 512k 1M"]);
    run("qemu-img", &["snapshot", "-c", "snap2", p(&s)]);
    qemu_io(&s, &["write -P 3 100k 10k"]);
    same_as_qemu(&s);
    // Images written by vdisk.
    let v = path(&d, "v.qcow2");
    vdisk_create(&v, 4 << 20, &[("cluster_size", "4096")], None);
    {
        let img = open(&v, true);
        img.write_at(&vec![7u8; 300_000], 12345).unwrap();
        img.write_at(&vec![8u8; 5000], 3 << 20).unwrap();
        img.write_compressed(&vec![0u8; 4096], 2 << 20).unwrap();
        img.write_compressed(&[5u8; 4096], (2 << 20) + 4096)
            .unwrap();
    }
    same_as_qemu(&v);
}

/// Patches a refcount entry (16-bit refcounts) of `cluster` in the image file.
fn poke_refcount(f: &std::path::Path, cluster: u64, value: u16) {
    let mut b = std::fs::read(f).unwrap();
    let rt = u64::from_be_bytes(b[48..56].try_into().unwrap()) as usize;
    let cs = 1usize << u32::from_be_bytes(b[20..24].try_into().unwrap());
    let per = cs / 2;
    let bi = cluster as usize / per;
    let rb = u64::from_be_bytes(b[rt + 8 * bi..rt + 8 * bi + 8].try_into().unwrap()) as usize;
    let at = rb + 2 * (cluster as usize % per);
    b[at..at + 2].copy_from_slice(&value.to_be_bytes());
    std::fs::write(f, b).unwrap();
}

#[test]
fn leaks_and_corruptions_reported_and_repaired() {
    let d = tmp();
    let f = path(&d, "x.qcow2");
    qemu_create(&f, "cluster_size=4096", "1M");
    qemu_io(&f, &["write -P 1 0 64k"]);
    // Cluster 0 (header) counted twice: a leak. Cluster 5 (data) counted zero times.
    poke_refcount(&f, 0, 2);
    same_as_qemu(&f);
    {
        let img = open(&f, false);
        let r = img.check(Repair::default()).unwrap();
        assert_eq!(r.leaks, 1);
        assert!(
            r.findings
                .iter()
                .any(|f| mismatch(f, FindingKind::LeakedCluster, 0, 2, 1)),
            "{:?}",
            r.findings
        );
    }
    {
        let img = open(&f, true);
        let r = img
            .check(Repair {
                leaks: true,
                errors: false,
            })
            .unwrap();
        assert_eq!((r.leaks, r.leaks_fixed), (0, 1), "{:?}", r.findings);
    }
    assert_clean(&f);
    // A data cluster with refcount 1 -> 2: leak plus COPIED errors... set a data cluster
    // to 0: a corruption that needs a rebuild.
    let (_, q) = qemu_check(&f);
    let end = field(&q, "image-end-offset") / 4096;
    poke_refcount(&f, end - 1, 0);
    same_as_qemu(&f);
    {
        let img = open(&f, false);
        let r = img.check(Repair::default()).unwrap();
        assert!(r.corruptions >= 1);
        assert!(
            r.findings
                .iter()
                .any(|f| mismatch(f, FindingKind::RefcountTooLow, end - 1, 0, 1)),
            "{:?}",
            r.findings
        );
    }
    {
        let img = open(&f, true);
        let r = img
            .check(Repair {
                leaks: true,
                errors: true,
            })
            .unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.findings);
        assert!(r.corruptions_fixed >= 1);
    }
    assert_clean(&f);
    let want = qemu_raw(&f);
    assert!(want[..65536].iter().all(|&b| b == 1));
}

#[test]
fn dirty_lazy_image_is_repaired_on_open() {
    let d = tmp();
    let f = path(&d, "l.qcow2");
    qemu_create(&f, "lazy_refcounts=on,cluster_size=4096", "2M");
    qemu_io(&f, &["write -P 3 0 100k"]);
    // Simulate a crash after allocation with lazy refcounts: dirty bit set and a
    // refcount lost.
    let mut b = std::fs::read(&f).unwrap();
    b[79] |= 1;
    std::fs::write(&f, &b).unwrap();
    poke_refcount(&f, 6, 0);
    {
        let img = open(&f, false);
        assert!(img.is_dirty());
        let r = img.check(Repair::default()).unwrap();
        assert!(r.corruptions > 0);
    }
    {
        let img = open(&f, true);
        assert!(!img.is_dirty());
    }
    assert_clean(&f);
    let (_, q) = qemu_check(&f);
    assert_eq!(field(&q, "corruptions") + field(&q, "leaks"), 0);
}

#[test]
fn persistent_bitmaps_counted_like_qemu() {
    let d = tmp();
    let f = path(&d, "bm.qcow2");
    qemu_create(&f, "cluster_size=4096", "8M");
    run("qemu-img", &["bitmap", "--add", p(&f), "b0"]);
    run("qemu-img", &["bitmap", "--add", "-g", "512", p(&f), "b1"]);
    qemu_io(&f, &["write -P 1 0 1M"]);
    // Consistent bitmaps: their clusters are in use, not leaks.
    same_as_qemu(&f);
    {
        let img = open(&f, false);
        assert_eq!(img.check(Repair::default()).unwrap().leaks, 0);
    }
    // A vdisk read-write session keeps them consistent (it records its writes).
    {
        let img = open(&f, true);
        img.write_at(&[1u8; 10], 3 << 20).unwrap();
    }
    same_as_qemu(&f);
    let (code, _, err) = run_status("qemu-img", &["check", p(&f)]);
    assert_eq!(code, 0, "{err}");
    // A writer without bitmap support clears the autoclear bit: QEMU then considers
    // the bitmaps stale and their clusters leaked; so do we.
    let mut b = std::fs::read(&f).unwrap();
    b[95] &= !1;
    std::fs::write(&f, &b).unwrap();
    same_as_qemu(&f);
    let (code, _, err) = run_status("qemu-img", &["check", p(&f)]);
    assert_eq!(code, 3, "{err}");
    // A read-write open drops the stale extension (as QEMU does); the leaks remain.
    {
        let img = open(&f, true);
        img.write_at(&[2u8; 10], 4 << 20).unwrap();
        assert!(img.bitmaps().is_empty());
    }
    same_as_qemu(&f);
    let (code, _, err) = run_status("qemu-img", &["check", p(&f)]);
    assert_eq!(code, 3, "{err}");
}

#[test]
fn read_only_never_writes_and_lazy_dirty_bit_lifecycle() {
    let d = tmp();
    let f = path(&d, "ro.qcow2");
    qemu_create(&f, "lazy_refcounts=on,cluster_size=4096", "2M");
    qemu_io(&f, &["write -P 3 0 100k"]);
    // Dirty + unknown autoclear bit: a read-only open must change neither.
    let mut b = std::fs::read(&f).unwrap();
    b[79] |= 1;
    b[95] |= 0x80;
    std::fs::write(&f, &b).unwrap();
    {
        let img = open(&f, false);
        assert!(img.is_dirty());
        let _ = read_all(&img);
        let _ = img.check(Repair::default()).unwrap();
        assert!(matches!(img.write_at(&[1], 0), Err(vdisk::Error::ReadOnly)));
        assert!(img
            .check(Repair {
                leaks: true,
                errors: false
            })
            .is_err());
        img.flush().unwrap();
        img.close().unwrap();
    }
    assert_eq!(
        std::fs::read(&f).unwrap(),
        b,
        "read-only open modified the file"
    );
    // Read-write: repaired and cleaned on open; our own lazy writes set the bit again
    // until close.
    {
        let img = open(&f, true);
        assert!(!img.is_dirty());
        img.write_at(&[1u8; 5000], 300_000).unwrap();
        assert!(img.is_dirty());
        let on_disk = std::fs::read(&f).unwrap();
        assert_eq!(
            on_disk[79] & 1,
            1,
            "dirty bit must be on disk before allocating writes land"
        );
        img.close().unwrap();
        assert!(!img.is_dirty());
    }
    let v: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", p(&f)])).unwrap();
    assert_eq!(v["dirty-flag"], false);
    assert_clean(&f);
}

fn corrupt_bit(f: &std::path::Path) -> bool {
    std::fs::read(f).unwrap()[79] & 2 != 0
}

/// An image vdisk marked corrupt can be repaired by `check -r all` (opened for
/// repair with `skip_repair`), like `qemu-img check -r all` does; other read-write
/// opens are refused and guest writes stay refused until the repair succeeds.
#[test]
fn corrupt_image_repaired_and_corrupt_bit_cleared() {
    let d = tmp();
    let f = path(&d, "c.qcow2");
    qemu_create(&f, "cluster_size=4096", "1M");
    qemu_io(&f, &["write -P 1 0 8k"]);
    // Map guest cluster 1 onto the L1 table: vdisk's write there marks the image corrupt.
    let mut b = std::fs::read(&f).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap());
    let l2 = u64::from_be_bytes(b[l1 as usize..l1 as usize + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    let at = l2 as usize + 8;
    b[at..at + 8].copy_from_slice(&((1u64 << 63) | l1).to_be_bytes());
    std::fs::write(&f, &b).unwrap();
    {
        let img = open(&f, true);
        let e = img.write_at(&[9u8; 512], 4096).unwrap_err().to_string();
        assert!(e.contains("overlaps"), "{e}");
    }
    assert!(corrupt_bit(&f), "vdisk set the corrupt bit");
    let q = path(&d, "q.qcow2");
    std::fs::copy(&f, &q).unwrap();
    let e = match open_with(&f, true, DriverOptions::default()) {
        Ok(_) => panic!("normal read-write open of a corrupt image"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("Image is corrupt; cannot be opened read/write"),
        "{e}"
    );
    let for_check = DriverOptions {
        skip_repair: true,
        ..DriverOptions::default()
    };
    {
        let img = open_with(&f, true, for_check.clone()).unwrap();
        assert!(
            img.write_at(&[1u8; 512], 0).is_err(),
            "guest writes refused"
        );
        let r = img.check(Repair::default()).unwrap();
        assert!(r.corruptions > 0, "{:?}", r.findings);
        let r = img
            .check(Repair {
                leaks: true,
                errors: true,
            })
            .unwrap();
        assert_eq!((r.corruptions, r.check_errors), (0, 0), "{:?}", r.findings);
        assert!(r.corruptions_fixed > 0);
    }
    assert!(!corrupt_bit(&f), "repair cleared the corrupt bit");
    // qemu-img does the same on the copy.
    let (code, _, err) = run_status("qemu-img", &["check", "-r", "all", p(&q)]);
    assert_eq!(code, 0, "{err}");
    assert!(!corrupt_bit(&q));
    assert_clean(&f);
    {
        let img = open(&f, true);
        img.write_at(&[5u8; 512], 8192).unwrap();
    }
    assert_clean(&f);
    assert_same(
        &qemu_raw(&f)[..8192],
        &qemu_raw(&q)[..8192],
        "repaired contents",
    );
}

/// L1/L2 entries with reserved bits set are never silently masked: reads fail naming
/// the entry (and mark a writable image corrupt), check reports them with QEMU's
/// wording (same count as qemu-img check), and `-r all` clears the bits.
#[test]
fn reserved_bits_in_l1_and_l2_entries() {
    let d = tmp();
    for (table, bits, msg) in [
        (
            "l2",
            0x64u64,
            "ERROR found l2 entry with reserved bits set: ",
        ),
        (
            "l2",
            1u64 << 57,
            "ERROR found l2 entry with reserved bits set: ",
        ),
        (
            "L1",
            0x2u64,
            "ERROR found L1 entry with reserved bits set: ",
        ),
        (
            "L1",
            1u64 << 60,
            "ERROR found L1 entry with reserved bits set: ",
        ),
    ] {
        let f = path(&d, "r.qcow2");
        let _ = std::fs::remove_file(&f);
        qemu_create(&f, "", "1M");
        qemu_io(&f, &["write -P 1 0 128k"]);
        let mut b = std::fs::read(&f).unwrap();
        let get = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
        let l1 = get(&b, 40) as usize;
        let at = if table == "L1" {
            l1
        } else {
            (get(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize
        };
        let bad = get(&b, at) | bits;
        b[at..at + 8].copy_from_slice(&bad.to_be_bytes());
        std::fs::write(&f, &b).unwrap();
        let line = format!("{msg}{bad:x}");
        let (code, _, err) = run_status("qemu-img", &["check", p(&f)]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(&line), "qemu: {err}");
        let (_, q) = qemu_check(&f);
        {
            let img = open(&f, false);
            let mut buf = vec![0u8; 4096];
            let e = img.read_at(&mut buf, 0).unwrap_err().to_string();
            assert!(
                e.contains("reserved bits") && e.contains(&format!("{bad:#x}")),
                "{e}"
            );
            let r = img.check(Repair::default()).unwrap();
            // The finding behind qemu's line (the CLI test words it the same way).
            let structure = if table == "L1" {
                Structure::L1Table
            } else {
                Structure::L2Table
            };
            assert!(
                r.findings
                    .iter()
                    .any(|f| f.kind == FindingKind::ReservedBits
                        && f.structure == structure
                        && f.outcome == Outcome::Found
                        && f.entry_value == Some(bad)),
                "{:?}",
                r.findings
            );
            assert_eq!(r.corruptions, field(&q, "corruptions"), "{:?}", r.findings);
        }
        // A read-write user hitting it marks the image corrupt.
        {
            let img = open(&f, true);
            let mut buf = vec![0u8; 4096];
            assert!(img.read_at(&mut buf, 0).is_err());
        }
        assert!(corrupt_bit(&f), "{table} {bits:#x}");
        {
            let img = open_with(
                &f,
                true,
                DriverOptions {
                    skip_repair: true,
                    ..DriverOptions::default()
                },
            )
            .unwrap();
            let r = img
                .check(Repair {
                    leaks: true,
                    errors: true,
                })
                .unwrap();
            assert_eq!(r.corruptions, 0, "{:?}", r.findings);
            assert!(r.corruptions_fixed >= 1);
        }
        assert!(!corrupt_bit(&f));
        assert_clean(&f);
        let got = read_all(&open(&f, false));
        assert!(got[..128 << 10].iter().all(|&x| x == 1));
        assert!(got[128 << 10..].iter().all(|&x| x == 0));
    }
}

/// A missing or misplaced refcount table: refused for normal use, reported by check,
/// rebuilt by `check -r all` (as `qemu-img check -r all` does).
#[test]
fn broken_refcount_table_checked_and_rebuilt() {
    let d = tmp();
    let for_check = DriverOptions {
        skip_repair: true,
        ..DriverOptions::default()
    };
    for mode in ["clusters0", "past_eof", "offset0"] {
        let f = path(&d, "t.qcow2");
        let _ = std::fs::remove_file(&f);
        qemu_create(&f, "cluster_size=4096", "1M");
        qemu_io(&f, &["write -P 1 0 64k", "write -P 2 512k 4k"]);
        let mut b = std::fs::read(&f).unwrap();
        match mode {
            "clusters0" => b[56..60].copy_from_slice(&0u32.to_be_bytes()),
            "past_eof" => b[48..56].copy_from_slice(&(1u64 << 30).to_be_bytes()),
            _ => b[48..56].copy_from_slice(&0u64.to_be_bytes()),
        }
        std::fs::write(&f, &b).unwrap();
        let (qcode, q) = qemu_check(&f);
        assert_eq!(qcode, 2, "{mode}");
        for rw in [false, true] {
            let e = open_with(&f, rw, DriverOptions::default())
                .err()
                .unwrap_or_else(|| panic!("{mode}: opened for normal use"))
                .to_string();
            assert!(e.contains("eference count table"), "{mode}: {e}");
        }
        {
            let img = open_with(&f, false, for_check.clone()).unwrap();
            let r = img.check(Repair::default()).unwrap();
            assert!(r.corruptions > 0, "{mode}");
            if mode != "offset0" {
                // QEMU reads the header as the table there: its count is not comparable.
                assert_eq!(
                    r.corruptions,
                    field(&q, "corruptions"),
                    "{mode}: {:?}",
                    r.findings
                );
            }
        }
        {
            let img = open_with(&f, true, for_check.clone()).unwrap();
            assert!(
                img.write_at(&[3u8; 512], 0).is_err(),
                "{mode}: write refused"
            );
            let r = img
                .check(Repair {
                    leaks: true,
                    errors: true,
                })
                .unwrap();
            assert_eq!(
                (r.corruptions, r.check_errors),
                (0, 0),
                "{mode}: {:?}",
                r.findings
            );
            assert!(r.corruptions_fixed > 0);
            let r = img.check(Repair::default()).unwrap();
            assert_eq!((r.corruptions, r.leaks), (0, 0), "{mode}: {:?}", r.findings);
        }
        assert_clean(&f);
        let img = open(&f, true);
        img.write_at(&[4u8; 4096], 700 << 10).unwrap();
        let got = read_all(&img);
        drop(img);
        assert!(got[..64 << 10].iter().all(|&x| x == 1), "{mode}");
        assert!(got[512 << 10..516 << 10].iter().all(|&x| x == 2), "{mode}");
        assert!(got[700 << 10..704 << 10].iter().all(|&x| x == 4), "{mode}");
        assert_clean(&f);
    }
}
