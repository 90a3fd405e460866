//! The bitmap library API on in-memory images: add/list/enable/disable/clear/merge/
//! remove, dirty extents, the backup helper, and hostile bitmap metadata refused
//! with errors naming the structure (never a panic).

use std::sync::Arc;
use vdisk::format::{qcow2, CreateSpec, DriverOptions};
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Format, Image, Repair, ZeroFlags};

fn fresh(size: u64) -> Arc<dyn Storage> {
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    qcow2::create(
        &mem,
        &CreateSpec {
            size,
            backing: None,
            options: vec![],
        },
    )
    .unwrap();
    mem
}

fn open(st: &Arc<dyn Storage>, rw: bool) -> vdisk::Result<Image> {
    Image::open_storage(
        st.clone(),
        Format::Qcow2,
        &DriverOptions {
            read_only: !rw,
            ..DriverOptions::default()
        },
    )
}

fn bytes(st: &Arc<dyn Storage>) -> Vec<u8> {
    let mut v = vec![0u8; st.len().unwrap() as usize];
    st.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn api_round_trip_and_backup() {
    let size = 8 << 20;
    let st = fresh(size);
    let img = open(&st, true).unwrap();
    img.write_at(&[7; 4096], 0).unwrap();
    img.add_bitmap("a", None, true).unwrap();
    img.add_bitmap("b", Some(4096), false).unwrap();
    assert!(img.add_bitmap("a", None, true).is_err());
    assert!(img.add_bitmap("c", Some(1000), true).is_err());
    let names: Vec<(String, u64, bool)> = img
        .bitmaps()
        .into_iter()
        .map(|b| (b.name, b.granularity, b.enabled))
        .collect();
    assert_eq!(
        names,
        vec![("a".into(), 65536, true), ("b".into(), 4096, false)]
    );
    // A full backup now; then changes recorded by "a" only.
    let full: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes(&st)));
    img.write_at(&[1; 100], 70000).unwrap();
    img.write_zeroes(1 << 20, 65536, ZeroFlags::default())
        .unwrap();
    img.discard(3 << 20, 65536).unwrap();
    assert_eq!(
        img.dirty_extents("a", 0, size).unwrap(),
        vec![
            (0, 65536, false),
            (65536, 65536, true),
            (131072, (1 << 20) - 131072, false),
            (1 << 20, 65536, true),
            ((1 << 20) + 65536, (2 << 20) - 65536, false),
            (3 << 20, 65536, true),
            ((3 << 20) + 65536, size - (3 << 20) - 65536, false),
        ]
    );
    assert!(img.bitmap("b").unwrap().is_clear());
    img.merge_bitmap("b", &img, "a").unwrap();
    assert_eq!(img.bitmap("b").unwrap().dirty_bytes(), 3 * 65536);
    // Incremental backup into the full copy gives the live image.
    let target = Image::open_storage(full, Format::Qcow2, &DriverOptions::default()).unwrap();
    // The target's own copy of "a" would record the backup writes: disable it first.
    target.set_bitmap_enabled("a", false).unwrap();
    let copied = img.backup_dirty("a", &target).unwrap();
    assert_eq!(copied, 3 * 65536);
    let mut x = vec![0u8; size as usize];
    let mut y = vec![0u8; size as usize];
    img.read_at(&mut x, 0).unwrap();
    target.read_at(&mut y, 0).unwrap();
    assert!(x == y, "restored image differs");
    img.clear_bitmap("a").unwrap();
    assert!(img.bitmap("a").unwrap().is_clear());
    img.remove_bitmap("b").unwrap();
    img.close().unwrap();
    drop(img);
    let img = open(&st, false).unwrap();
    assert_eq!(img.bitmaps().len(), 1);
    assert!(!img.bitmaps()[0].in_use);
    let rep = img.check(Repair::default()).unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.findings);
    // Read-only images refuse changes; raw images have no bitmaps.
    assert!(img.add_bitmap("z", None, true).is_err());
}

/// Byte offset of the bitmaps extension's data in cluster 0.
fn ext_at(b: &[u8]) -> usize {
    let mut o = u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize;
    loop {
        let t = u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
        let l = u32::from_be_bytes(b[o + 4..o + 8].try_into().unwrap()) as usize;
        assert_ne!(t, 0, "no bitmaps extension");
        if t == 0x2385_2875 {
            return o + 8;
        }
        o += 8 + l.div_ceil(8) * 8;
    }
}

#[test]
fn hostile_bitmap_metadata_is_refused_by_name() {
    let st = fresh(8 << 20);
    let img = open(&st, true).unwrap();
    img.add_bitmap("a", None, true).unwrap();
    img.write_at(&[1; 512], 0).unwrap();
    img.close().unwrap();
    drop(img);
    let good = bytes(&st);
    let e = ext_at(&good);
    let dir = u64::from_be_bytes(good[e + 16..e + 24].try_into().unwrap()) as usize;
    let table = u64::from_be_bytes(good[dir..dir + 8].try_into().unwrap()) as usize;
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch)> = vec![
        (
            "zero bitmaps",
            Box::new(move |b| b[e..e + 4].copy_from_slice(&0u32.to_be_bytes())),
        ),
        ("reserved", Box::new(move |b| b[e + 4] = 1)),
        (
            "dir past end",
            Box::new(move |b| b[e + 16..e + 24].copy_from_slice(&(1u64 << 40).to_be_bytes())),
        ),
        ("dir unaligned", Box::new(move |b| b[e + 23] |= 8)),
        (
            "huge dir",
            Box::new(move |b| b[e + 8..e + 16].copy_from_slice(&(1u64 << 30).to_be_bytes())),
        ),
        ("granularity", Box::new(move |b| b[dir + 17] = 40)),
        ("type", Box::new(move |b| b[dir + 16] = 9)),
        ("flags", Box::new(move |b| b[dir + 12] = 0x80)),
        (
            "table size",
            Box::new(move |b| b[dir + 8..dir + 12].copy_from_slice(&u32::MAX.to_be_bytes())),
        ),
        (
            "name size",
            Box::new(move |b| b[dir + 18..dir + 20].copy_from_slice(&u16::MAX.to_be_bytes())),
        ),
        ("table entry", Box::new(move |b| b[table + 7] = 0x03)),
        (
            "table entry past end",
            Box::new(move |b| b[table..table + 8].copy_from_slice(&(1u64 << 50).to_be_bytes())),
        ),
    ];
    for (what, f) in cases {
        let mut b = good.clone();
        f(&mut b);
        let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(b));
        // Read-write opens load the enabled bitmap (tables included); read-only opens
        // read the directory; both fail cleanly.
        let rw = open(&st, true);
        let ro = open(&st, false).and_then(|i| i.bitmap("a").map(|_| ()));
        let msg = match (rw, ro) {
            (Err(e), _) | (Ok(_), Err(e)) => e.to_string(),
            (Ok(_), Ok(())) => panic!("{what}: hostile bitmap metadata accepted"),
        };
        assert!(msg.contains("bitmap"), "{what}: {msg}");
    }
}
