//! Hostile QED headers and tables: clear errors, never a panic or a hang.

mod qed_util;

use proptest::prelude::*;
use qed_util::*;
use std::sync::Arc;
use vdisk::format::qed::Qed;
use vdisk::format::{BackingSpec, Driver, DriverOptions, Format, ZeroFlags};
use vdisk::storage::{MemStorage, Storage};
use vdisk::Repair;

/// A small valid image with data in two L2 tables.
fn base() -> Vec<u8> {
    let st = mem_qed(
        8 << 20,
        &[("cluster_size", "4k"), ("table_size", "1")],
        None,
    );
    {
        let dyn_st: Arc<dyn Storage> = st.clone();
        let d = open_mem(dyn_st, &DriverOptions::default(), None).expect("open");
        d.write_at(&[1u8; 10000], 3000).expect("write");
        d.write_at(&[2u8; 5000], 5 << 20).expect("write");
        d.close().expect("close");
    }
    st.to_vec()
}

fn patch(img: &mut [u8], off: usize, bytes: &[u8]) {
    img[off..off + bytes.len()].copy_from_slice(bytes);
}

fn open_bytes(img: Vec<u8>, read_only: bool) -> vdisk::Result<Qed> {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
    Qed::open(
        st,
        &DriverOptions {
            read_only,
            ..DriverOptions::default()
        },
        &mut |_s: &BackingSpec| Err(vdisk::error::Invalid::BackingDisabled.into()),
    )
}

fn expect_err(img: Vec<u8>, what: &str, needle: &str) {
    match open_bytes(img, true) {
        Ok(_) => panic!("{what}: opened"),
        Err(e) => assert!(
            e.to_string().contains(needle),
            "{what}: error {e:?} should mention {needle:?}"
        ),
    }
}

#[test]
fn hostile_headers_are_refused_clearly() {
    let good = base();
    let u32b = |v: u32| v.to_le_bytes().to_vec();
    let u64b = |v: u64| v.to_le_bytes().to_vec();
    let cases: Vec<(&str, usize, Vec<u8>, &str)> = vec![
        ("magic", 0, b"QEE\0".to_vec(), "not in QED format"),
        ("cluster 0", 4, u32b(0), "cluster size"),
        ("cluster 1000", 4, u32b(1000), "cluster size"),
        ("cluster 2k", 4, u32b(2048), "cluster size"),
        ("cluster 128M", 4, u32b(128 << 20), "cluster size"),
        ("cluster max", 4, u32b(u32::MAX), "cluster size"),
        ("table 0", 8, u32b(0), "table size"),
        ("table 3", 8, u32b(3), "table size"),
        ("table 32", 8, u32b(32), "table size"),
        ("header 0", 12, u32b(0), "header_size"),
        ("header huge", 12, u32b(u32::MAX), "header_size"),
        ("features", 16, u64b(0x8), "Unsupported QED features: 0x8"),
        (
            "features high",
            16,
            u64b(1 << 63),
            "Unsupported QED features",
        ),
        ("l1 zero", 40, u64b(0), "L1 table offset"),
        ("l1 misaligned", 40, u64b(4097), "L1 table offset"),
        ("l1 past eof", 40, u64b(1 << 30), "L1 table offset"),
        ("l1 max", 40, u64b(!4095), "L1 table offset"),
        ("size odd", 48, u64b(1000), "image size"),
        ("size huge", 48, u64b(u64::MAX - 511), "image size"),
        (
            "size over max",
            48,
            u64b((512u64 * 512 * 4096) + 512),
            "image size",
        ),
    ];
    for (what, off, bytes, needle) in cases {
        let mut img = good.clone();
        patch(&mut img, off, &bytes);
        expect_err(img, what, needle);
    }
    // Backing file name outside the header cluster, or absurdly long.
    for (o, n) in [
        (4000u32, 200u32),
        (64, 5000),
        (u32::MAX, 10),
        (64, u32::MAX),
    ] {
        let mut img = good.clone();
        patch(&mut img, 16, &1u64.to_le_bytes());
        patch(&mut img, 56, &o.to_le_bytes());
        patch(&mut img, 60, &n.to_le_bytes());
        expect_err(img, "backing name", "backing file name");
    }
    // Too short to hold a header at all.
    expect_err(good[..40].to_vec(), "short", "not in QED format");
    expect_err(Vec::new(), "empty", "not in QED format");
}

#[test]
fn unknown_compat_ignored_autoclear_cleared_read_write() {
    let mut img = base();
    patch(&mut img, 24, &0xF0u64.to_le_bytes());
    patch(&mut img, 32, &0x30u64.to_le_bytes());
    let st = Arc::new(MemStorage::from_vec(img.clone()));
    {
        let dyn_st: Arc<dyn Storage> = st.clone();
        let d = open_mem(
            dyn_st,
            &DriverOptions {
                read_only: true,
                ..DriverOptions::default()
            },
            None,
        )
        .expect("compat ignored");
        assert_eq!(d.header().autoclear_features, 0x30);
    }
    assert!(st.to_vec() == img, "read-only open changed the file");
    {
        let dyn_st: Arc<dyn Storage> = st.clone();
        let d = open_mem(dyn_st, &DriverOptions::default(), None).expect("rw");
        d.close().expect("close");
    }
    let after = st.to_vec();
    assert_eq!(u64::from_le_bytes(after[32..40].try_into().expect("8")), 0);
    assert_eq!(
        u64::from_le_bytes(after[24..32].try_into().expect("8")),
        0xF0
    );
}

#[test]
fn no_backing_never_calls_the_resolver() {
    let st = mem_qed(
        1 << 20,
        &[],
        Some(BackingSpec {
            name: "missing.raw".into(),
            format: Some(Format::Raw),
        }),
    );
    let dyn_st: Arc<dyn Storage> = st.clone();
    let d = Qed::open(
        dyn_st,
        &DriverOptions {
            no_backing: true,
            ..DriverOptions::default()
        },
        &mut |_s: &BackingSpec| panic!("resolver called despite no_backing"),
    )
    .expect("open");
    let mut b = vec![9u8; 4096];
    d.read_at(&mut b, 0).expect("read");
    assert!(b.iter().all(|x| *x == 0));
    assert_eq!(
        d.backing_spec(),
        Some(BackingSpec {
            name: "missing.raw".into(),
            format: Some(Format::Raw)
        })
    );
}

#[test]
fn hostile_table_entries_give_errors_naming_them() {
    let good = base();
    let l1 = 4096usize;
    let l2 = u64::from_le_bytes(good[l1..l1 + 8].try_into().expect("8")) as usize;
    // L2 entry 0 points into the header; entry 1 is misaligned; entry 2 past the end.
    let mut img = good.clone();
    patch(&mut img, l2, &2048u64.to_le_bytes());
    patch(&mut img, l2 + 8, &(l2 as u64 + 12).to_le_bytes());
    patch(&mut img, l2 + 16, &(1u64 << 50).to_le_bytes());
    let d = open_bytes(img.clone(), false).expect("open");
    for (i, off) in [(0, 0u64), (1, 4096), (2, 8192)] {
        let mut b = vec![0u8; 512];
        let e = d.read_at(&mut b, off).expect_err("bad entry");
        assert!(
            e.to_string().contains(&format!("entry {i} ")),
            "{e} should name entry {i}"
        );
        assert!(d.write_at(&b, off).is_err());
    }
    let r = d.check(Repair::default()).expect("check");
    assert_eq!(r.corruptions, 3, "{r:?}");
    let r = d
        .check(Repair {
            leaks: true,
            errors: true,
        })
        .expect("repair");
    assert_eq!(
        (r.corruptions, r.corruptions_fixed, r.leaks),
        (0, 3, 0),
        "{r:?}"
    );
    // After repair the guest can use the clusters again.
    d.write_at(&[7u8; 12288], 0).expect("write after repair");
    let mut b = vec![0u8; 12288];
    d.read_at(&mut b, 0).expect("read");
    assert!(b.iter().all(|x| *x == 7));
}

fn exercise(d: &Qed) {
    let size = d.size();
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded: a hostile header may claim a huge guest size.
    let starts = [0, size.saturating_sub(1 << 20) / 512 * 512];
    for start in starts {
        let mut off = start;
        while off < size && off < start + (2 << 20) {
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = d.read_at(&mut buf[..n], off);
            off += n as u64;
        }
    }
    let _ = d.block_status(0, size.clamp(1, 1 << 20));
    if size >= 8192 {
        let _ = d.write_at(&[3u8; 5000], 1000);
        let _ = d.write_zeroes(4096, 4096, ZeroFlags::default());
        let _ = d.discard(0, 8192);
    }
    let _ = d.check(Repair::default());
    let _ = d.check(Repair {
        leaks: true,
        errors: true,
    });
    let _ = d.resize(size / 2 / 512 * 512, true);
    let _ = d.close();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random byte corruption of the header, L1 and L2 areas never panics or hangs.
    #[test]
    fn fuzzed_metadata_never_panics(
        edits in prop::collection::vec((0usize..20480, any::<u8>()), 1..24),
        read_only in any::<bool>(),
    ) {
        let mut img = base();
        let len = img.len();
        for (off, b) in edits {
            let off = off % len;
            img[off] = b;
        }
        if let Ok(d) = open_bytes(img, read_only) {
            exercise(&d);
        }
    }

    /// Entirely random headers (valid magic) are refused or handled, never a panic.
    #[test]
    fn random_headers_never_panic(header in prop::collection::vec(any::<u8>(), 64)) {
        let mut img = base();
        img[..64].copy_from_slice(&header);
        img[..4].copy_from_slice(b"QED\0");
        if let Ok(d) = open_bytes(img, true) {
            exercise(&d);
        }
    }
}

/// Table entries pointing at the L1 table itself (an L1 entry naming the L1 as an L2
/// table, or an L2 entry naming an L1 cluster as data) are refused on reads and writes,
/// never written through, reported by check and zeroed by repair.
#[test]
fn entries_pointing_at_the_l1_table_are_refused_and_repaired() {
    // table_size 2 (QEMU refuses table_size 1), so qemu-img can judge the result.
    let good = {
        let st = mem_qed(
            8 << 20,
            &[("cluster_size", "4k"), ("table_size", "2")],
            None,
        );
        let dyn_st: Arc<dyn Storage> = st.clone();
        let d = open_mem(dyn_st, &DriverOptions::default(), None).expect("open");
        d.write_at(&[1u8; 10000], 3000).expect("write");
        d.write_at(&[2u8; 5000], 5 << 20).expect("write");
        d.close().expect("close");
        drop(d);
        st.to_vec()
    };
    let l1 = 4096usize;
    let l2 = u64::from_le_bytes(good[l1..l1 + 8].try_into().expect("8")) as usize;
    // (what, patch offset, guest offset of the affected cluster, needle)
    let cases = [
        ("L1 entry 0 -> L1", l1, 0u64, "L1 entry 0"),
        ("L2 entry 2 -> L1", l2 + 16, 8192u64, "entry 2 "),
        (
            "L2 entry 3 -> L1's 2nd cluster",
            l2 + 24,
            12288u64,
            "entry 3 ",
        ),
    ];
    for (what, at, guest, needle) in cases {
        let mut img = good.clone();
        let target = if what.contains("2nd") { 8192u64 } else { 4096 };
        patch(&mut img, at, &target.to_le_bytes());
        let st = Arc::new(MemStorage::from_vec(img));
        let dyn_st: Arc<dyn Storage> = st.clone();
        let d = open_mem(dyn_st, &DriverOptions::default(), None).expect("open");
        let l1_before = st.to_vec()[l1..l1 + 8192].to_vec();
        let mut b = vec![0u8; 4096];
        let e = d.read_at(&mut b, guest).expect_err(what);
        assert!(e.to_string().contains(needle), "{what}: {e}");
        assert!(
            e.to_string().contains(&format!("{target:#x}")),
            "{what}: {e} names the offset"
        );
        let e = d.write_at(&[3u8; 4096], guest).expect_err(what);
        assert!(e.to_string().contains(needle), "{what}: {e}");
        let e = d
            .write_at(&[3u8; 65536], guest)
            .expect_err("longer write too");
        assert!(e.to_string().contains(needle), "{what}: {e}");
        assert!(
            st.to_vec()[l1..l1 + 8192] == l1_before[..],
            "{what}: the L1 table was written through"
        );
        let r = d.check(Repair::default()).expect("check");
        assert!(r.corruptions >= 1, "{what}: {r:?}");
        let r = d
            .check(Repair {
                leaks: true,
                errors: true,
            })
            .expect("repair");
        assert_eq!((r.corruptions, r.check_errors), (0, 0), "{what}: {r:?}");
        assert!(r.corruptions_fixed >= 1, "{what}: {r:?}");
        d.write_at(&[5u8; 4096], guest).expect("write after repair");
        d.read_at(&mut b, guest).expect("read after repair");
        assert!(b.iter().all(|x| *x == 5), "{what}");
        d.close().expect("close");
        drop(d);
        let dir = tmp();
        let path = path_in(&dir, "img.qed");
        std::fs::write(&path, st.to_vec()).expect("write file");
        assert_qemu_clean(&path);
    }
}

/// An L2 entry naming its own L2 table as a data cluster (a double reference): guest
/// writes, zeroes and discards there are refused instead of overwriting the table.
#[test]
fn data_write_over_a_known_l2_table_is_refused() {
    let good = base();
    let l1 = 4096usize;
    let l2 = u64::from_le_bytes(good[l1..l1 + 8].try_into().expect("8"));
    let mut img = good.clone();
    patch(&mut img, l2 as usize + 16, &l2.to_le_bytes());
    let st = Arc::new(MemStorage::from_vec(img));
    let dyn_st: Arc<dyn Storage> = st.clone();
    let d = open_mem(dyn_st, &DriverOptions::default(), None).expect("open");
    let table_before = st.to_vec()[l2 as usize..l2 as usize + 4096].to_vec();
    let e = d
        .write_at(&[3u8; 4096], 8192)
        .expect_err("write over the table");
    assert!(e.to_string().contains("L2 table at"), "{e}");
    d.write_at(&[3u8; 3 * 4096], 4096)
        .expect_err("longer write over the table");
    d.write_zeroes(8192, 4096, ZeroFlags::default())
        .expect_err("zeroes over the table");
    d.discard(8192, 4096).expect_err("discard over the table");
    assert!(
        st.to_vec()[l2 as usize..l2 as usize + 4096] == table_before[..],
        "the L2 table was overwritten"
    );
    let r = d.check(Repair::default()).expect("check");
    assert!(r.corruptions >= 1, "{r:?}");
}

/// The double-reference guard forgets tables that shrink/compaction released: a data
/// cluster later allocated where such a table was is written normally.
#[test]
fn guard_forgets_released_tables() {
    let st = mem_qed(
        8 << 20,
        &[("cluster_size", "4k"), ("table_size", "1")],
        None,
    );
    let dyn_st: Arc<dyn Storage> = st.clone();
    let d = open_mem(dyn_st, &DriverOptions::default(), None).expect("open");
    d.write_at(&[1u8; 4096], 0).expect("write");
    // A second L2 table (and its data cluster) at the end of the file.
    d.write_at(&[2u8; 4096], 5 << 20).expect("write");
    let l2_second = u64::from_le_bytes(st.to_vec()[4096 + 16..4096 + 24].try_into().expect("8"));
    // Shrinking releases that table; compaction truncates the file before it.
    d.resize(4 << 20, true).expect("shrink");
    d.resize(8 << 20, false).expect("grow");
    let mut placed = false;
    for i in 1..4u64 {
        d.write_at(&[3u8; 4096], i * 4096)
            .expect("allocating write");
        // Rewrite in place: must not be mistaken for a write over an L2 table.
        d.write_at(&[4u8; 4096], i * 4096)
            .expect("in-place write where a released table was");
        let e = d.block_status(i * 4096, 4096).expect("status");
        placed |= e.offset == Some(l2_second);
    }
    assert!(
        placed,
        "no data cluster landed where the released table was"
    );
    let r = d.check(Repair::default()).expect("check");
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
}

/// An L2 entry naming another L2 table (one no request has used yet) as its data
/// cluster: the write is refused, the other table survives.
#[test]
fn data_write_over_another_l2_table_is_refused() {
    let good = base();
    let l1 = 4096usize;
    let entry = |img: &[u8], at: usize| u64::from_le_bytes(img[at..at + 8].try_into().expect("8"));
    let first = entry(&good, l1);
    // base() put data at 5 MiB: L1 index 2 with 4 KiB clusters and 512-entry tables.
    let second = entry(&good, l1 + 16);
    assert!(second != 0 && first != 0);
    let mut img = good.clone();
    patch(&mut img, first as usize + 16, &second.to_le_bytes());
    let st = Arc::new(MemStorage::from_vec(img));
    let dyn_st: Arc<dyn Storage> = st.clone();
    let d = open_mem(dyn_st, &DriverOptions::default(), None).expect("open");
    let before = st.to_vec()[second as usize..second as usize + 4096].to_vec();
    let e = d
        .write_at(&[3u8; 4096], 8192)
        .expect_err("write over the other table");
    assert!(
        e.to_string().contains(&format!("L2 table at {second:#x}")),
        "{e}"
    );
    assert!(st.to_vec()[second as usize..second as usize + 4096] == before[..]);
    let mut b = vec![0u8; 5000];
    d.read_at(&mut b, 5 << 20)
        .expect("the other table still maps its data");
    assert!(b.iter().all(|x| *x == 2));
}
