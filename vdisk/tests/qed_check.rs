//! `check` on damaged QED images: the same counts as `qemu-img check --output=json`,
//! repairs that leave images QEMU finds clean, and leak repair QEMU cannot do.

mod qed_util;

use qed_util::*;
use std::path::Path;
use vdisk::format::DriverOptions;
use vdisk::{CheckReport, OpenOptions, Repair};

fn qemu_create(path: &Path, size: &str, opts: &str) {
    run(
        "qemu-img",
        &["create", "-q", "-f", "qed", "-o", opts, p(path), size],
    );
}

fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qed"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(path));
    run("qemu-io", &args);
}

fn read_u64(path: &Path, off: u64) -> u64 {
    let b = std::fs::read(path).expect("read");
    u64::from_le_bytes(b[off as usize..off as usize + 8].try_into().expect("8"))
}

fn write_u64(path: &Path, off: u64, v: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.write_all_at(&v.to_le_bytes(), off).expect("patch");
}

fn grow_file(path: &Path, by: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    let len = f.metadata().expect("meta").len();
    f.set_len(len + by).expect("grow");
}

fn vdisk_check(path: &Path, repair: Repair) -> CheckReport {
    let ro = !(repair.leaks || repair.errors);
    let img = open_with(
        path,
        &OpenOptions {
            read_only: ro,
            driver: DriverOptions {
                skip_repair: true,
                ..DriverOptions::default()
            },
            ..OpenOptions::default()
        },
    );
    let r = img.check(repair).expect("check");
    img.close().expect("close");
    r
}

fn assert_same(r: &CheckReport, q: &serde_json::Value, what: &str) {
    let get = |k: &str| q[k].as_u64().unwrap_or(0);
    assert_eq!(
        r.corruptions,
        get("corruptions"),
        "{what}: corruptions {r:?} vs {q}"
    );
    assert_eq!(r.leaks, get("leaks"), "{what}: leaks {r:?} vs {q}");
    assert_eq!(r.check_errors, get("check-errors"), "{what}: {r:?} vs {q}");
    assert_eq!(
        r.corruptions_fixed,
        get("corruptions-fixed"),
        "{what}: {r:?} vs {q}"
    );
    // qemu-img leaves zero counts out of its JSON.
    assert_eq!(
        r.allocated_clusters,
        Some(get("allocated-clusters")),
        "{what}: {r:?} vs {q}"
    );
    assert_eq!(
        r.fragmented_clusters,
        Some(get("fragmented-clusters")),
        "{what}: {r:?} vs {q}"
    );
    assert_eq!(
        r.total_clusters,
        q["total-clusters"].as_u64(),
        "{what}: {r:?} vs {q}"
    );
    assert_eq!(r.image_end_offset, q["image-end-offset"].as_u64(), "{what}");
}

/// A 4 KiB-cluster image with data in the first L2 table; returns the L2 offset.
fn damaged_base(path: &Path) -> u64 {
    qemu_create(path, "16M", "cluster_size=4k,table_size=2");
    qemu_io(
        path,
        &["write -P 1 0 12k", "write -P 2 5M 8k", "write -z 40k 4k"],
    );
    read_u64(path, 4096)
}

#[test]
fn invalid_double_and_misaligned_entries() {
    let dir = tmp();
    let a = path_in(&dir, "a.qed");
    let l2 = damaged_base(&a);
    write_u64(&a, l2 + 8, 1 << 30); // past the end of the file
    write_u64(&a, l2 + 16, 4096); // the L1 table's cluster: a double reference
    write_u64(&a, l2 + 24, l2 + 100); // misaligned
    grow_file(&a, 8192); // two leaked clusters
    let b = path_in(&dir, "b.qed");
    std::fs::copy(&a, &b).expect("copy");

    let (code, q) = qemu_check(&a);
    assert_eq!(code, 2);
    assert_same(&vdisk_check(&a, Repair::default()), &q, "plain check");

    // Repair: QEMU's -r all cannot fix the entry naming the L1 table (it only sees a
    // double reference); ours treats it as an invalid entry, zeroes it and reclaims the
    // leaks, leaving an image qemu-img finds clean.
    let r = vdisk_check(
        &a,
        Repair {
            leaks: true,
            errors: true,
        },
    );
    let (code, _, _) = run_status("qemu-img", &["check", "-r", "all", "--output=json", p(&b)]);
    assert_eq!(code, 2);
    assert_eq!(
        (r.corruptions, r.corruptions_fixed, r.leaks, r.check_errors),
        (0, 3, 0, 0),
        "{r:?}"
    );
    assert_qemu_clean(&a);
    assert_eq!(features(&a) & 2, 0, "a repaired image is marked clean");
}

/// Each bad entry is a finding naming its table, entry, value and guest offset.
#[test]
fn findings_name_the_bad_entries() {
    use vdisk::error::Structure;
    use vdisk::format::{FindingKind, Outcome};
    let dir = tmp();
    let a = path_in(&dir, "a.qed");
    let l2 = damaged_base(&a);
    write_u64(&a, l2 + 8, 1 << 30);
    write_u64(&a, l2 + 16, 4096);
    write_u64(&a, l2 + 24, l2 + 100);
    let r = vdisk_check(&a, Repair::default());
    let bad: Vec<_> = r
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::InvalidOffset)
        .map(|f| {
            (
                f.structure,
                f.entry,
                f.entry_value,
                f.host_offset,
                f.guest_offset,
                f.outcome,
            )
        })
        .collect();
    let want: Vec<_> = [(1u64, 1u64 << 30), (2, 4096), (3, l2 + 100)]
        .iter()
        .map(|&(i, v)| {
            (
                Structure::QedL2Table,
                Some(i),
                Some(v),
                Some(l2 + i * 8),
                Some(i * 4096),
                Outcome::Found,
            )
        })
        .collect();
    assert_eq!(bad, want, "{:?}", r.findings);
    assert_eq!(r.corruptions, 3, "{r:?}");
}

#[test]
fn invalid_l1_entry_repaired() {
    let dir = tmp();
    let a = path_in(&dir, "a.qed");
    damaged_base(&a);
    write_u64(&a, 4096 + 8, 0x7000_0000); // second L1 entry past the end of the file
    let (code, q) = qemu_check(&a);
    assert_eq!(code, 2);
    assert_same(&vdisk_check(&a, Repair::default()), &q, "plain");
    // Reading through the bad entry is an error naming it, not a panic.
    let img = open(&a, true);
    let mut buf = vec![0u8; 4096];
    let e = img.read_at(&mut buf, 5 << 20).expect_err("bad L1 entry");
    assert!(e.to_string().contains("L1 entry 1"), "{e}");
    drop(img);
    let r = vdisk_check(
        &a,
        Repair {
            leaks: true,
            errors: true,
        },
    );
    assert_eq!(
        (r.corruptions, r.corruptions_fixed, r.leaks),
        (0, 1, 0),
        "{r:?}"
    );
    assert_qemu_clean(&a);
    assert_eq!(features(&a) & 2, 0);
}

/// Leaks anywhere in the file (orphaned data in the middle, junk at the end) are all
/// reclaimed: the data moves down, the file shrinks, contents stay the same.
#[test]
fn leaks_reclaimed_without_changing_contents() {
    let dir = tmp();
    let a = path_in(&dir, "a.qed");
    qemu_create(&a, "16M", "cluster_size=4k,table_size=2");
    qemu_io(
        &a,
        &[
            "write -P 1 0 4k",
            "write -P 2 4k 4k",
            "write -P 3 6M 4k",
            "write -P 4 12M 64k",
        ],
    );
    let l2 = read_u64(&a, 4096);
    write_u64(&a, l2 + 8, 0); // orphan guest cluster 1's data: a leak in the middle
    grow_file(&a, 3 * 4096 + 100); // junk at the end, not cluster aligned
    let want = qemu_raw(&a, "qed");
    let (code, q) = qemu_check(&a);
    assert_eq!(code, 3, "{q}");
    let r = vdisk_check(&a, Repair::default());
    assert_same(&r, &q, "plain");
    let before = std::fs::metadata(&a).expect("meta").len();
    let r = vdisk_check(
        &a,
        Repair {
            leaks: true,
            errors: false,
        },
    );
    assert_eq!(r.leaks, 0, "{r:?}");
    assert_eq!(r.leaks_fixed, q["leaks"].as_u64().expect("leaks"), "{r:?}");
    assert_qemu_clean(&a);
    let after = std::fs::metadata(&a).expect("meta").len();
    assert_eq!(before - after, 4 * 4096 + 100);
    assert!(
        qemu_raw(&a, "qed") == want,
        "contents changed by leak repair"
    );
}

/// A dirty image is repaired by the first read-write open; a read-only open leaves the
/// file untouched.
#[test]
fn dirty_image_repaired_on_open_and_untouched_read_only() {
    let dir = tmp();
    let a = path_in(&dir, "a.qed");
    let l2 = damaged_base(&a);
    write_u64(&a, l2 + 8, 1 << 40);
    grow_file(&a, 4096);
    write_u64(&a, 16, features(&a) | 2); // NEED_CHECK
    let bytes = std::fs::read(&a).expect("read");
    {
        let img = open(&a, true);
        assert!(img.is_dirty());
        let mut buf = vec![0u8; 4096];
        img.read_at(&mut buf, 0).expect("read works read-only");
        assert!(buf.iter().all(|b| *b == 1));
    }
    assert!(
        std::fs::read(&a).expect("read") == bytes,
        "read-only open modified the file"
    );
    {
        let img = open(&a, false);
        assert!(!img.is_dirty());
    }
    assert_eq!(features(&a) & 2, 0);
    assert_qemu_clean(&a);
}

/// Leak repair on randomly orphaned data clusters and whole L2 tables (4-cluster
/// tables, so tables must hop to move into holes they overlap): no leaks left, QEMU
/// finds the image clean, and the guest contents are unchanged.
#[test]
fn leak_repair_random_orphans() {
    let dir = tmp();
    for seed in 1..=4u64 {
        let mut rng = Rng(seed * 104729);
        let a = path_in(&dir, "r.qed");
        let _ = std::fs::remove_file(&a);
        qemu_create(&a, "12M", "cluster_size=4k,table_size=4");
        let mut cmds = Vec::new();
        for _ in 0..40 {
            let off = rng.below(12 << 20) / 4096 * 4096;
            let len = ((rng.below(6) + 1) * 4096).min((12 << 20) - off);
            cmds.push(format!("write -P {} {off} {len}", rng.below(200) + 1));
        }
        let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
        qemu_io(&a, &refs);
        // Orphan some data clusters and, sometimes, a whole table.
        let l1_off = 4096u64;
        for l1i in 0..6u64 {
            let l2 = read_u64(&a, l1_off + l1i * 8);
            if l2 == 0 {
                continue;
            }
            if rng.below(5) == 0 {
                write_u64(&a, l1_off + l1i * 8, 0);
                continue;
            }
            for _ in 0..rng.below(6) {
                let i = rng.below(2048);
                write_u64(&a, l2 + i * 8, 0);
            }
        }
        grow_file(&a, rng.below(5) * 4096);
        let want = qemu_raw(&a, "qed");
        let r = vdisk_check(
            &a,
            Repair {
                leaks: true,
                errors: true,
            },
        );
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "seed {seed}: {r:?}"
        );
        assert_qemu_clean(&a);
        assert!(
            qemu_raw(&a, "qed") == want,
            "seed {seed}: leak repair changed contents"
        );
    }
}
