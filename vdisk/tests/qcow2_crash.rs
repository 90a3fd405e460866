//! Crash simulation: every prefix of the storage operations (and random subsets of the
//! unflushed ones) must leave an image that opens, has no corruption (leaks are
//! allowed) and still holds everything written before the last completed flush.

use rand::{Rng, SeedableRng};
use std::sync::Arc;
use vdisk::format::{qcow2, CreateSpec, DriverOptions};
use vdisk::storage::trace::TraceStorage;
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Format, Image, Repair, ZeroFlags};

mod crash_util;
use crash_util::{assert_intact, discard_model, Flushed};

fn created(size: u64, opts: &[(&str, &str)]) -> Vec<u8> {
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    qcow2::create(
        &mem,
        &CreateSpec {
            size,
            backing: None,
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
    )
    .unwrap();
    let mut v = vec![0u8; mem.len().unwrap() as usize];
    mem.read_at(&mut v, 0).unwrap();
    v
}

fn open_bytes(bytes: Vec<u8>, rw: bool) -> vdisk::Result<Image> {
    Image::open_storage(
        Arc::new(MemStorage::from_vec(bytes)),
        Format::Qcow2,
        &DriverOptions {
            read_only: !rw,
            ..DriverOptions::default()
        },
    )
}

#[allow(clippy::too_many_arguments)]
fn run(
    opts: &[(&str, &str)],
    size: u64,
    cs: u64,
    seed: u64,
    nops: usize,
    prefill: u64,
    max_len: u64,
) -> (Vec<u8>, Vec<u8>) {
    let span = size - prefill;
    let mut initial = created(size, opts);
    if prefill > 0 {
        let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(initial));
        let img =
            Image::open_storage(mem.clone(), Format::Qcow2, &DriverOptions::default()).unwrap();
        img.write_at(&vec![0xee; prefill as usize], size - prefill)
            .unwrap();
        img.close().unwrap();
        drop(img);
        initial = vec![0u8; mem.len().unwrap() as usize];
        mem.read_at(&mut initial, 0).unwrap();
    }
    let first = initial.clone();
    let ts = Arc::new(TraceStorage::new(initial));
    let st: Arc<dyn Storage> = ts.clone();
    let img = Image::open_storage(st, Format::Qcow2, &DriverOptions::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; size as usize];
    model[(size - prefill) as usize..].fill(0xee);
    let mut flushes = vec![Flushed {
        point: 0,
        data: model.clone(),
        later: vec![],
    }];
    for i in 0..nops {
        let off = if rng.gen_bool(0.5) {
            rng.gen_range(0..span / cs) * cs
        } else {
            rng.gen_range(0..span)
        };
        let len = rng.gen_range(1..=(size - off).min(max_len));
        let start_point = ts.point();
        match rng.gen_range(0..11) {
            10 => {
                let c = off / cs * cs;
                let n = cs.min(size - c);
                let v = (i as u8).wrapping_mul(13) | 1;
                img.write_compressed(&vec![v; n as usize], c).unwrap();
                model[c as usize..(c + n) as usize].fill(v);
                if let Some(f) = flushes.last_mut() {
                    f.later.push((start_point, c, n));
                }
                continue;
            }
            0..=5 => {
                let v = (i as u8).wrapping_mul(37) | 1;
                img.write_at(&vec![v; len as usize], off).unwrap();
                model[off as usize..(off + len) as usize].fill(v);
            }
            6 => {
                img.write_zeroes(
                    off,
                    len,
                    ZeroFlags {
                        may_unmap: rng.gen_bool(0.5),
                        fast: false,
                    },
                )
                .unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            7 => {
                img.discard(off, len).unwrap();
                discard_model(&mut model, off, len, cs);
            }
            _ => {
                img.flush().unwrap();
                flushes.push(Flushed {
                    point: ts.point(),
                    data: model.clone(),
                    later: vec![],
                });
                continue;
            }
        }
        if let Some(f) = flushes.last_mut() {
            f.later.push((start_point, off, len));
        }
    }
    img.close().unwrap();
    drop(img);
    let trace = ts.trace();
    let points = trace.points();
    let mut checked = 0;
    for k in 0..points {
        let f = flushes.iter().rev().find(|f| f.point <= k).unwrap();
        for variant in 0..4u64 {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ (k as u64) << 8 ^ variant);
            let bytes = trace.crash_image(k, |_| match variant {
                0 => false,
                1 => true,
                _ => r.gen_bool(0.5),
            });
            let img = open_bytes(bytes.clone(), false)
                .unwrap_or_else(|e| panic!("crash point {k} variant {variant}: open failed: {e}"));
            let rep = img.check(Repair::default()).unwrap();
            // With lazy refcounts the refcounts on disk may lag behind the tables, and
            // a read-only check reports that (as qemu-img's does) -- but only on an
            // image marked dirty: the dirty bit must be durable before the first
            // lazily counted mapping, so that a read-write open rebuilds them.
            let dirty = img.is_dirty();
            assert!(
                rep.corruptions == 0 || dirty,
                "crash point {k} variant {variant}: refcounts lag behind the tables but \
                 the image is not marked dirty: {:?}",
                rep.findings
            );
            let intact =
                |img: &Image, what: &str| assert_intact(img, f, k, &format!("{variant}, {what}"));
            intact(&img, "read-only");
            drop(img);
            if variant == 2 || dirty {
                // Read-write open (repairs dirty images), then a clean check.
                let img = open_bytes(bytes, true)
                    .unwrap_or_else(|e| panic!("crash point {k}: rw open failed: {e}"));
                let rep = img
                    .check(Repair {
                        leaks: true,
                        errors: false,
                    })
                    .unwrap();
                assert_eq!(rep.corruptions, 0, "crash point {k} rw: {:?}", rep.findings);
                assert_eq!(rep.leaks, 0, "crash point {k} rw: leaks not repaired");
                assert!(!img.is_dirty(), "crash point {k} rw: still dirty");
                intact(&img, "rebuilt");
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "too few crash points ({checked})");
    (first, ts.contents())
}

#[test]
fn crash_points_4k_clusters() {
    run(
        &[("cluster_size", "4096")],
        1 << 20,
        4096,
        1,
        40,
        0,
        3 * 4096 + 100,
    );
}

#[test]
fn crash_points_tiny_clusters_refcount_growth() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB and the
    // first refcount table 2 MiB, so blocks and the table itself get allocated.
    // The image is prefilled up to just below that so the traced workload crosses it.
    let (before, after) = run(
        &[("cluster_size", "512"), ("refcount_bits", "64")],
        2 << 20,
        512,
        2,
        40,
        (2 << 20) - (128 << 10),
        8192,
    );
    assert_ne!(
        before[48..56],
        after[48..56],
        "refcount table should have moved"
    );
}

#[test]
fn crash_points_lazy_refcounts() {
    run(
        &[("cluster_size", "4096"), ("lazy_refcounts", "on")],
        1 << 20,
        4096,
        3,
        30,
        0,
        3 * 4096 + 100,
    );
}
