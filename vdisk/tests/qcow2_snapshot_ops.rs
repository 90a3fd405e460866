//! Internal snapshots taken, applied and deleted by vdisk, checked against qemu-img:
//! qemu-img lists vdisk's snapshots and reads them (`convert -l`), vdisk applies and
//! deletes qemu's, every image passes `qemu-img check`, and the contents match what
//! qemu-img's own snapshot operations produce on a copy.

mod qcow2_util;
use qcow2_util::*;
use vdisk::format::SnapshotInfo;
use vdisk::{Error, SnapshotError};

fn snapshot_raw(f: &std::path::Path, name: &str) -> Vec<u8> {
    let out = f.with_extension(format!("{name}.raw"));
    run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-l",
            &format!("snapshot.name={name}"),
            "-O",
            "raw",
            p(f),
            p(&out),
        ],
    );
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

fn new_snap(name: &str) -> SnapshotInfo {
    SnapshotInfo {
        id: String::new(),
        name: name.into(),
        vm_state_size: 0,
        date_sec: 1_700_000_000,
        date_nsec: 5_000,
        vm_clock_nsec: 0,
        icount: Some(0),
    }
}

/// (id, name) pairs as qemu-img lists them.
fn qemu_list(f: &std::path::Path) -> Vec<(String, String)> {
    let out = run("qemu-img", &["info", "-U", "--output=json", p(f)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap().to_string(),
                        s["name"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn vdisk_snapshots_read_by_qemu() {
    for cs in ["512", "4096", "65536"] {
        for rb in ["16", "64"] {
            let d = tmp();
            let f = path(&d, "s.qcow2");
            qemu_create(&f, &format!("cluster_size={cs},refcount_bits={rb}"), "3M");
            qemu_io(
                &f,
                &[
                    "write -P 1 0 1M",
                    "write -c -P 7 1M 64k",
                    "write -z 2M 128k",
                ],
            );
            let one = qemu_raw(&f);
            {
                let img = open(&f, true);
                let s = img.snapshot_create(&new_snap("one")).unwrap();
                assert_eq!((s.id.as_str(), s.name.as_str()), ("1", "one"));
                img.write_at(&[2u8; 300_000], 100_000).unwrap();
                let r = img.check(Default::default()).unwrap();
                assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.findings);
            }
            assert_clean(&f);
            let two = qemu_raw(&f);
            {
                let img = open(&f, true);
                let s = img.snapshot_create(&new_snap("two")).unwrap();
                assert_eq!(s.id, "2");
                img.write_at(&[3u8; 4096], 0).unwrap();
            }
            assert_clean(&f);
            assert_eq!(
                qemu_list(&f),
                vec![("1".into(), "one".into()), ("2".into(), "two".into())]
            );
            assert_same(&snapshot_raw(&f, "one"), &one, "snapshot one");
            assert_same(&snapshot_raw(&f, "two"), &two, "snapshot two");
            // Apply one, then delete it: the active disk keeps its contents.
            {
                let img = open(&f, true);
                img.snapshot_apply("one").unwrap();
                assert_same(&read_all(&img), &one, "applied one");
                img.write_at(&[4u8; 1000], 5000).unwrap();
            }
            assert_clean(&f);
            let mut active = one.clone();
            active[5000..6000].fill(4);
            assert_same(&qemu_raw(&f), &active, "after apply + write");
            {
                let img = open(&f, true);
                img.snapshot_delete(Some("1"), Some("one")).unwrap();
                let r = img.check(Default::default()).unwrap();
                assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.findings);
            }
            assert_clean(&f);
            assert_eq!(qemu_list(&f), vec![("2".into(), "two".into())]);
            assert_same(&qemu_raw(&f), &active, "after delete");
            assert_same(&snapshot_raw(&f, "two"), &two, "two after delete");
            {
                let img = open(&f, true);
                img.snapshot_delete(None, Some("two")).unwrap();
            }
            assert_clean(&f);
            assert!(qemu_list(&f).is_empty());
            // With no snapshot left every cluster is owned again: a write goes in
            // place and qemu's check (COPIED flags included) is clean.
            qemu_io(&f, &["write -P 9 0 64k"]);
            assert_clean(&f);
        }
    }
}

#[test]
fn qemu_snapshots_applied_and_deleted_by_vdisk() {
    let d = tmp();
    let f = path(&d, "q.qcow2");
    qemu_create(&f, "cluster_size=4096", "2M");
    qemu_io(&f, &["write -P 1 0 512k", "write -c -P 5 1M 8k"]);
    run("qemu-img", &["snapshot", "-c", "a", p(&f)]);
    let a = qemu_raw(&f);
    qemu_io(&f, &["write -P 2 64k 640k"]);
    run("qemu-img", &["snapshot", "-c", "b", p(&f)]);
    let b = qemu_raw(&f);
    qemu_io(&f, &["write -P 3 0 4k"]);
    // The same operations by qemu-img on a copy, to compare with.
    let g = path(&d, "ref.qcow2");
    std::fs::copy(&f, &g).unwrap();
    run("qemu-img", &["snapshot", "-a", "a", p(&g)]);
    run("qemu-img", &["snapshot", "-d", "b", p(&g)]);
    {
        let img = open(&f, true);
        img.snapshot_apply("a").unwrap();
        assert_same(&read_all(&img), &a, "applied a");
        img.snapshot_delete(None, Some("b")).unwrap();
    }
    assert_clean(&f);
    run("qemu-img", &["compare", "-U", p(&f), p(&g)]);
    assert_eq!(qemu_list(&f), vec![("1".into(), "a".into())]);
    assert_same(&snapshot_raw(&f, "a"), &a, "a kept");
    let _ = b;
}

#[test]
fn apply_restores_the_snapshot_disk_size() {
    let d = tmp();
    let f = path(&d, "r.qcow2");
    qemu_create(&f, "cluster_size=512", "64k");
    qemu_io(&f, &["write -P 1 0 64k"]);
    {
        let img = open(&f, true);
        img.snapshot_create(&new_snap("small")).unwrap();
        img.resize(1 << 20, false).unwrap();
        img.write_at(&[2u8; 512], (1 << 20) - 512).unwrap();
        img.snapshot_create(&new_snap("big")).unwrap();
        img.snapshot_apply("small").unwrap();
        assert_eq!(img.size(), 64 << 10);
        assert!(read_all(&img).iter().all(|&x| x == 1));
    }
    assert_clean(&f);
    assert_eq!(qemu_raw(&f).len(), 64 << 10);
    {
        let img = open(&f, true);
        assert_eq!(img.size(), 64 << 10);
        img.snapshot_apply("big").unwrap();
        assert_eq!(img.size(), 1 << 20);
    }
    assert_clean(&f);
    let raw = qemu_raw(&f);
    assert_eq!(raw.len(), 1 << 20);
    assert!(raw[(1 << 20) - 512..].iter().all(|&x| x == 2));
}

#[test]
fn ids_names_and_refusals_as_qemu() {
    let d = tmp();
    let f = path(&d, "n.qcow2");
    qemu_create(&f, "", "1M");
    run("qemu-img", &["snapshot", "-c", "x", p(&f)]);
    {
        let img = open(&f, true);
        // Duplicate names are allowed (QEMU 10 too); IDs go on from the largest.
        assert_eq!(img.snapshot_create(&new_snap("x")).unwrap().id, "2");
        let mut s = new_snap("y");
        s.id = "2".into();
        match img.snapshot_create(&s) {
            Err(Error::Snapshot(SnapshotError::IdExists(i))) => assert_eq!(i, "2"),
            r => panic!("duplicate id accepted: {r:?}"),
        }
        s.id = "10".into();
        assert_eq!(img.snapshot_create(&s).unwrap().id, "10");
        assert_eq!(img.snapshot_create(&new_snap("")).unwrap().id, "11");
        match img.snapshot_apply("nosuch") {
            Err(e) => assert_eq!(e.errno(), libc::ENOENT),
            Ok(_) => panic!("applied a missing snapshot"),
        }
        assert!(img.snapshot_delete(Some("2"), Some("y")).is_err());
    }
    assert_clean(&f);
    assert_eq!(
        qemu_list(&f),
        vec![
            ("1".into(), "x".into()),
            ("2".into(), "x".into()),
            ("10".into(), "y".into()),
            ("11".into(), "".into())
        ]
    );
    // Formats without snapshots refuse.
    let r = path(&d, "r.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&r), "1M"]);
    let img = open(&r, true);
    match img.snapshot_create(&new_snap("x")) {
        Err(e) => assert_eq!(e.errno(), libc::ENOTSUP),
        Ok(_) => panic!("raw took a snapshot"),
    }
    // Refcounts one bit wide cannot share a cluster.
    let o = path(&d, "o.qcow2");
    qemu_create(&o, "refcount_bits=1", "1M");
    qemu_io(&o, &["write 0 4k"]);
    {
        let img = open(&o, true);
        match img.snapshot_create(&new_snap("x")) {
            Err(e) => assert_eq!(e.errno(), libc::EINVAL),
            Ok(_) => panic!("snapshot with 1-bit refcounts"),
        }
        img.write_at(&[1u8; 4096], 8192).unwrap();
    }
    assert_clean(&o);
}

#[test]
fn many_snapshots_grow_the_table_and_refcounts() {
    let d = tmp();
    let f = path(&d, "m.qcow2");
    qemu_create(&f, "cluster_size=512", "256k");
    let mut want = Vec::new();
    {
        let img = open(&f, true);
        for i in 0..40u8 {
            img.write_at(&[i; 700], u64::from(i) * 3000).unwrap();
            img.snapshot_create(&new_snap(&format!("s{i}"))).unwrap();
            want.push(read_all(&img));
        }
        for i in (0..40u8).step_by(3) {
            img.snapshot_delete(None, Some(&format!("s{i}"))).unwrap();
        }
        img.snapshot_apply("s10").unwrap();
        assert_same(&read_all(&img), &want[10], "applied s10");
    }
    assert_clean(&f);
    for i in [1u8, 10, 20, 38] {
        assert_same(
            &snapshot_raw(&f, &format!("s{i}")),
            &want[i as usize],
            &format!("s{i}"),
        );
    }
}

#[test]
fn shrink_with_snapshots_like_qemu_10() {
    let d = tmp();
    let f = path(&d, "s.qcow2");
    qemu_create(&f, "cluster_size=4096", "2M");
    qemu_io(&f, &["write -P 1 0 1536k", "write -c -P 2 1536k 64k"]);
    run("qemu-img", &["snapshot", "-c", "s", p(&f)]);
    let snap = snapshot_raw(&f, "s");
    // The same shrink by qemu-img on a copy.
    let g = path(&d, "ref.qcow2");
    std::fs::copy(&f, &g).unwrap();
    run("qemu-img", &["resize", "--shrink", "-q", p(&g), "1M"]);
    {
        let img = open(&f, true);
        img.resize(1 << 20, true).unwrap();
        assert_eq!(img.size(), 1 << 20);
        let r = img.check(Default::default()).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.findings);
    }
    assert_clean(&f);
    run("qemu-img", &["compare", "-U", p(&f), p(&g)]);
    // qemu-img reads a snapshot at the active disk's size (as `bdrv_snapshot_load_tmp`).
    assert_same(
        &snapshot_raw(&f, "s"),
        &snap[..1 << 20],
        "snapshot after shrink",
    );
    // Applying the snapshot brings its size and data back.
    {
        let img = open(&f, true);
        img.snapshot_apply("s").unwrap();
        assert_eq!(img.size(), 2 << 20);
        assert_same(&read_all(&img), &snap, "applied after shrink");
    }
    assert_clean(&f);
    // v2 images with snapshots still refuse any resize, as QEMU does.
    let v2 = path(&d, "v2.qcow2");
    qemu_create(&v2, "compat=0.10", "1M");
    run("qemu-img", &["snapshot", "-c", "s", p(&v2)]);
    let img = open(&v2, true);
    assert!(img.resize(2 << 20, false).is_err());
    assert!(img.resize(512 << 10, true).is_err());
}
