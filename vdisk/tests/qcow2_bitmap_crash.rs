//! Crash simulation for persistent dirty bitmaps: at every crash point (with none, all
//! or random subsets of the unflushed writes) every enabled bitmap is either marked in
//! use (inconsistent, as QEMU treats it) or holds every change completed before the
//! crash; a disabled bitmap never changes; the image has no corruption. After a clean
//! close the bitmaps are consistent and hold exactly the changes made.

use rand::{Rng, SeedableRng};
use std::sync::Arc;
use vdisk::format::bitmap::BitmapInfo;
use vdisk::format::{qcow2, CreateSpec, DriverOptions};
use vdisk::storage::trace::TraceStorage;
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Format, Image, Repair, ZeroFlags};

const SIZE: u64 = 4 << 20;

fn bytes_of(mem: &Arc<dyn Storage>) -> Vec<u8> {
    let mut v = vec![0u8; mem.len().unwrap() as usize];
    mem.read_at(&mut v, 0).unwrap();
    v
}

/// A fresh image with bitmaps `e64` (64 KiB), `e4` (4 KiB, enabled) and `off`
/// (disabled, with one range already marked).
fn initial() -> Vec<u8> {
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    qcow2::create(
        &mem,
        &CreateSpec {
            size: SIZE,
            backing: None,
            options: vec![("cluster_size".into(), "4096".into())],
        },
    )
    .unwrap();
    let img = Image::open_storage(mem.clone(), Format::Qcow2, &DriverOptions::default()).unwrap();
    img.add_bitmap("off", Some(65536), true).unwrap();
    img.write_at(&[1; 100], 65536).unwrap();
    img.set_bitmap_enabled("off", false).unwrap();
    img.add_bitmap("e64", Some(65536), true).unwrap();
    img.add_bitmap("e4", Some(4096), true).unwrap();
    img.close().unwrap();
    drop(img);
    bytes_of(&mem)
}

fn open(bytes: Vec<u8>, rw: bool) -> Image {
    Image::open_storage(
        Arc::new(MemStorage::from_vec(bytes)),
        Format::Qcow2,
        &DriverOptions {
            read_only: !rw,
            ..DriverOptions::default()
        },
    )
    .unwrap()
}

/// Whether bit data of `name` covers every range of `ranges`.
fn covers(img: &Image, name: &str, ranges: &[(u64, u64)]) -> Result<(), String> {
    let b = img.bitmap(name).map_err(|e| e.to_string())?;
    for &(o, n) in ranges {
        let g = b.granularity();
        for bit in o / g..=(o + n - 1) / g {
            if !b.get(bit) {
                return Err(format!("{name}: range {o}+{n} not marked (bit {bit})"));
            }
        }
    }
    Ok(())
}

fn info(img: &Image, name: &str) -> BitmapInfo {
    img.bitmaps().into_iter().find(|b| b.name == name).unwrap()
}

#[test]
fn every_crash_point_leaves_bitmaps_in_use_or_complete() {
    for seed in 1..=2u64 {
        let init = initial();
        let ts = Arc::new(TraceStorage::new(init));
        let st: Arc<dyn Storage> = ts.clone();
        let img = Image::open_storage(st, Format::Qcow2, &DriverOptions::default()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // (point when the change completed, offset, length)
        let mut done: Vec<(usize, u64, u64)> = Vec::new();
        for i in 0..24 {
            let off = rng.gen_range(0..SIZE - 1);
            let len = rng.gen_range(1..=(SIZE - off).min(40000));
            match rng.gen_range(0..6) {
                0..=2 => img.write_at(&vec![i as u8 | 1; len as usize], off).unwrap(),
                3 => img
                    .write_zeroes(
                        off,
                        len,
                        ZeroFlags {
                            may_unmap: true,
                            fast: false,
                        },
                    )
                    .unwrap(),
                4 => img.discard(off, len).unwrap(),
                _ => {
                    img.flush().unwrap();
                    continue;
                }
            }
            done.push((ts.point(), off, len));
        }
        img.close().unwrap();
        drop(img);
        let trace = ts.trace();
        let all: Vec<(u64, u64)> = done.iter().map(|d| (d.1, d.2)).collect();
        let mut consistent_after_writes = 0;
        for k in 0..trace.points() {
            let completed: Vec<(u64, u64)> = done
                .iter()
                .filter(|d| d.0 <= k)
                .map(|d| (d.1, d.2))
                .collect();
            for variant in 0..3u64 {
                let mut r =
                    rand::rngs::StdRng::seed_from_u64(seed << 20 ^ (k as u64) << 4 ^ variant);
                let bytes = trace.crash_image(k, |_| match variant {
                    0 => false,
                    1 => true,
                    _ => r.gen_bool(0.5),
                });
                let img = open(bytes, false);
                let rep = img.check(Repair::default()).unwrap();
                assert_eq!(
                    rep.corruptions, 0,
                    "crash point {k}/{variant}: {:?}",
                    rep.findings
                );
                for name in ["e64", "e4"] {
                    let i = info(&img, name);
                    assert!(i.enabled, "{name} lost its auto flag at {k}");
                    if !i.in_use {
                        if let Err(e) = covers(&img, name, &completed) {
                            panic!("crash point {k}/{variant}: consistent bitmap is stale: {e}");
                        }
                        if !completed.is_empty() {
                            consistent_after_writes += 1;
                        }
                    }
                }
                let off = info(&img, "off");
                assert!(
                    !off.in_use && !off.enabled,
                    "disabled bitmap touched at {k}"
                );
                let b = img.bitmap("off").unwrap();
                assert_eq!(
                    b.extents(0, SIZE),
                    vec![
                        (0, 65536, false),
                        (65536, 65536, true),
                        (131072, SIZE - 131072, false)
                    ]
                );
            }
        }
        eprintln!(
            "seed {seed}: {} crash points, {consistent_after_writes} consistent after writes",
            trace.points()
        );
        // Only the complete write-back (at close) may make them consistent again.
        assert!(
            consistent_after_writes > 0,
            "no crash point after the write-back"
        );
        // The final image: consistent bitmaps holding exactly the changes.
        let img = open(ts.contents(), true);
        for name in ["e64", "e4"] {
            assert!(!info(&img, name).in_use);
            covers(&img, name, &all).unwrap();
            let b = img.bitmap(name).unwrap();
            let g = b.granularity();
            let mut want = vec![false; SIZE.div_ceil(g) as usize];
            for &(o, n) in &all {
                for bit in o / g..=(o + n - 1) / g {
                    want[bit as usize] = true;
                }
            }
            let got: Vec<bool> = (0..want.len() as u64).map(|i| b.get(i)).collect();
            assert_eq!(got, want, "{name}: exactly the changed ranges");
        }
        let rep = img.check(Repair::default()).unwrap();
        assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.findings);
    }
}
