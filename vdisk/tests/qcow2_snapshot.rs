//! Images with internal snapshots: the active L1 reads right, writes copy shared
//! clusters and tables first, and snapshots stay intact.

mod qcow2_util;
use qcow2_util::*;
use vdisk::ZeroFlags;

fn snapshot_raw(f: &std::path::Path, name: &str) -> Vec<u8> {
    let out = f.with_extension(format!("{name}.raw"));
    run(
        "qemu-img",
        &[
            "convert",
            "-l",
            &format!("snapshot.name={name}"),
            "-O",
            "raw",
            p(f),
            p(&out),
        ],
    );
    std::fs::read(&out).unwrap()
}

#[test]
fn writes_after_snapshot_copy_first() {
    for cs in ["512", "4096", "65536"] {
        let d = tmp();
        let f = path(&d, "s.qcow2");
        qemu_create(&f, &format!("cluster_size={cs}"), "2M");
        qemu_io(&f, &["write -P 1 0 1M", "write -c -P 7 1M 64k"]);
        run("qemu-img", &["snapshot", "-c", "one", p(&f)]);
        qemu_io(&f, &["write -P 2 256k 256k"]);
        run("qemu-img", &["snapshot", "-c", "two", p(&f)]);
        let snap_one = snapshot_raw(&f, "one");
        let snap_two = snapshot_raw(&f, "two");
        let mut model = qemu_raw(&f);
        {
            let img = open(&f, true);
            assert_same(&read_all(&img), &model, "active before");
            let w = |off: usize, len: usize, v: u8, model: &mut Vec<u8>| {
                img.write_at(&vec![v; len], off as u64).unwrap();
                model[off..off + len].fill(v);
            };
            w(1000, 100, 9, &mut model);
            w(300_000, 200_000, 10, &mut model);
            w((1 << 20) + 10, 10, 11, &mut model);
            img.write_zeroes(
                600_000,
                70_000,
                ZeroFlags {
                    may_unmap: true,
                    fast: false,
                },
            )
            .unwrap();
            model[600_000..670_000].fill(0);
            img.discard(0, 1 << 20).unwrap();
            let c = img.cluster_size().unwrap() as usize;
            let first = 0usize;
            let last = (1 << 20) / c * c;
            model[first..last].fill(0);
            w(5, 5, 12, &mut model);
            assert_same(&read_all(&img), &model, "active after");
            let r = img.check(Default::default()).unwrap();
            assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.findings);
        }
        assert_clean(&f);
        assert_same(&qemu_raw(&f), &model, "qemu view of active");
        assert_same(&snapshot_raw(&f, "one"), &snap_one, "snapshot one");
        assert_same(&snapshot_raw(&f, "two"), &snap_two, "snapshot two");
    }
}

#[test]
fn grow_with_snapshots() {
    let d = tmp();
    let f = path(&d, "g.qcow2");
    qemu_create(&f, "cluster_size=512", "64k");
    qemu_io(&f, &["write -P 1 0 64k"]);
    run("qemu-img", &["snapshot", "-c", "s", p(&f)]);
    {
        let img = open(&f, true);
        img.resize(1 << 20, false).unwrap();
        img.write_at(&[2u8; 1000], (1 << 20) - 1000).unwrap();
    }
    assert_clean(&f);
    let raw = qemu_raw(&f);
    assert_eq!(raw.len(), 1 << 20);
    assert!(raw[..65536].iter().all(|&b| b == 1));
    assert!(raw[(1 << 20) - 1000..].iter().all(|&b| b == 2));
    let snap = snapshot_raw(&f, "s");
    assert!(snap[..65536].iter().all(|&b| b == 1));
    assert!(snap[65536..].iter().all(|&b| b == 0));
}
