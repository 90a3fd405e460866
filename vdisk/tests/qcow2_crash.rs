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
use crash_util::{assert_zero_or_new, old_then_zeroed};

struct Flushed {
    point: usize,
    data: Vec<u8>,
    /// Bytes written after this flush, by the time of each later point: (point, range,
    /// the byte the request wrote there).
    later: Vec<(usize, u64, u64, u8)>,
}

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
        let value = match rng.gen_range(0..11) {
            10 => {
                let c = off / cs * cs;
                let n = cs.min(size - c);
                let v = (i as u8).wrapping_mul(13) | 1;
                img.write_compressed(&vec![v; n as usize], c).unwrap();
                model[c as usize..(c + n) as usize].fill(v);
                if let Some(f) = flushes.last_mut() {
                    f.later.push((start_point, c, n, v));
                }
                continue;
            }
            0..=5 => {
                let v = (i as u8).wrapping_mul(37) | 1;
                img.write_at(&vec![v; len as usize], off).unwrap();
                model[off as usize..(off + len) as usize].fill(v);
                v
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
                0
            }
            7 => {
                img.discard(off, len).unwrap();
                let first = off.div_ceil(cs);
                let last = if off + len == size {
                    size.div_ceil(cs)
                } else {
                    (off + len) / cs
                };
                for c in first..last {
                    let e = ((c + 1) * cs).min(size);
                    model[(c * cs) as usize..e as usize].fill(0);
                }
                0
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
        };
        if let Some(f) = flushes.last_mut() {
            f.later.push((start_point, off, len, value));
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
            // Bytes not written since the last completed flush must be intact; a byte
            // written since may hold its flushed value or what one of those writes
            // put there, never anything else (stale host data under a new mapping).
            let intact = |img: &Image, what: &str| {
                let mut got = vec![0u8; size as usize];
                img.read_at(&mut got, 0).unwrap();
                let want = &f.data;
                for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                    if g == w {
                        continue;
                    }
                    let i64 = i as u64;
                    let later = f
                        .later
                        .iter()
                        .filter(|&&(p, off, len, _)| p < k && off <= i64 && i64 < off + len)
                        .collect::<Vec<_>>();
                    if later.is_empty() {
                        panic!(
                            "crash point {k} variant {variant} ({what}): byte {i} is {g} but {w} was flushed"
                        );
                    }
                    assert!(
                        later.iter().any(|&&(_, _, _, v)| v == g),
                        "crash point {k} variant {variant} ({what}): byte {i} is {g}: neither the flushed {w} nor written since"
                    );
                }
            };
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

#[test]
fn crash_points_subclusters() {
    // Extended L2 entries at the smallest cluster size they allow: small unaligned
    // writes allocate single subclusters (partial-subcluster COW), later writes set
    // more bits in clusters that already have a host cluster.
    run(
        &[("cluster_size", "16384"), ("extended_l2", "on")],
        1 << 20,
        16384,
        4,
        40,
        0,
        3000,
    );
}

#[test]
fn crash_points_subclusters_multi_cluster_lazy() {
    // Writes spanning clusters (one host run, bits of the first and last cluster
    // partial), with lazy refcounts.
    run(
        &[
            ("cluster_size", "16384"),
            ("extended_l2", "on"),
            ("lazy_refcounts", "on"),
        ],
        1 << 20,
        16384,
        5,
        30,
        0,
        3 * 16384 + 700,
    );
}

/// A write into unallocated subclusters of a cluster that keeps its host cluster (after
/// a zero write that kept it): the host bytes there still hold old data, so the bitmap
/// must not reach the disk before the new data. At every crash point of that write
/// (none, all or random subsets of the unflushed writes) the subcluster reads as the
/// flushed zeroes or the new data, never the old data.
#[test]
fn crash_points_subcluster_bits_after_data() {
    let cs = 65536u64;
    let size = 1u64 << 20;
    let initial = created(size, &[("cluster_size", "65536"), ("extended_l2", "on")]);
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(initial));
    let img = Image::open_storage(mem.clone(), Format::Qcow2, &DriverOptions::default()).unwrap();
    old_then_zeroed(img, cs);
    let mut start = vec![0u8; mem.len().unwrap() as usize];
    mem.read_at(&mut start, 0).unwrap();
    let ts = Arc::new(TraceStorage::new(start));
    let st: Arc<dyn Storage> = ts.clone();
    let img = Image::open_storage(st, Format::Qcow2, &DriverOptions::default()).unwrap();
    // Whole subclusters and partial ones (COW of zeroes inside the subcluster).
    img.write_at(&[0x22; 4096], 3 * 2048).unwrap();
    img.write_at(&[0x33; 100], cs + 5000).unwrap();
    img.flush().unwrap();
    img.close().unwrap();
    drop(img);
    let trace = ts.trace();
    for k in 0..trace.points() {
        for variant in 0..6u64 {
            let mut r = rand::rngs::StdRng::seed_from_u64((k as u64) << 8 ^ variant);
            let bytes = trace.crash_image(k, |_| match variant {
                0 => false,
                1 => true,
                _ => r.gen_bool(0.5),
            });
            let img = open_bytes(bytes, false)
                .unwrap_or_else(|e| panic!("crash point {k} variant {variant}: {e}"));
            assert_zero_or_new(&img, cs, k, variant);
        }
    }
}
