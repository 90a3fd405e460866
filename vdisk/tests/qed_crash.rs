//! Crash simulation: every crash point of random allocating workloads (with and without
//! a backing file), with several choices of which unflushed writes reached the disk.
//! After a read-write reopen (which repairs), the image must have no corruption, every
//! write completed before a completed flush must be there, and backing data under
//! partially written clusters must never turn into anything else.

mod qed_util;

use qed_util::*;
use std::sync::Arc;
use vdisk::format::{BackingSpec, Driver, DriverOptions, ExtentKind, Format, ZeroFlags};
use vdisk::storage::trace::TraceStorage;
use vdisk::storage::{MemStorage, Storage};
use vdisk::Repair;

const SECTOR: usize = 512;

struct Recorded {
    /// Model contents after each op (index 0 = before any op).
    snaps: Vec<Vec<u8>>,
    /// Trace points before/after each op, and whether it was a flush.
    spans: Vec<(usize, usize, bool)>,
}

/// A named choice of which unflushed writes survive a crash.
type Selector = (&'static str, Box<dyn Fn(usize) -> bool>);

fn workload(
    drv: &dyn Driver,
    st: &TraceStorage,
    model0: Vec<u8>,
    rng: &mut Rng,
    nops: usize,
) -> Recorded {
    let size = drv.size();
    let cs = drv.cluster_size().expect("cluster size");
    let mut model = model0;
    let mut rec = Recorded {
        snaps: vec![model.clone()],
        spans: Vec::new(),
    };
    for i in 0..nops {
        let start = st.point();
        let mut is_flush = false;
        let pat = (i as u8).wrapping_mul(37).wrapping_add(11) | 1;
        match rng.below(10) {
            0..=4 => {
                let off = rng.below(size / SECTOR as u64) * SECTOR as u64;
                let len = ((rng.below(3 * cs) / 512 + 1) * 512).min(size - off);
                let buf = vec![pat; len as usize];
                drv.write_at(&buf, off).expect("write");
                model[off as usize..(off + len) as usize].fill(pat);
            }
            5 => {
                let c = rng.below(size / cs);
                let k = (rng.below(3) + 1).min(size / cs - c);
                let buf = vec![pat; (k * cs) as usize];
                drv.write_at(&buf, c * cs).expect("write");
                model[(c * cs) as usize..((c + k) * cs) as usize].fill(pat);
            }
            6 => {
                let off = rng.below(size / SECTOR as u64) * SECTOR as u64;
                let len = ((rng.below(3 * cs) / 512 + 1) * 512).min(size - off);
                let unmap = rng.below(2) == 0;
                drv.write_zeroes(
                    off,
                    len,
                    ZeroFlags {
                        may_unmap: unmap,
                        fast: false,
                    },
                )
                .expect("zeroes");
                model[off as usize..(off + len) as usize].fill(0);
            }
            7 => {
                // Discard: whole clusters that are allocated here read zeroes afterwards.
                let c = rng.below(size / cs);
                let k = (rng.below(2) + 1).min(size / cs - c);
                for j in c..c + k {
                    let e = drv.block_status(j * cs, cs).expect("status");
                    if e.kind == ExtentKind::Data {
                        model[(j * cs) as usize..((j + 1) * cs) as usize].fill(0);
                    }
                }
                drv.discard(c * cs, k * cs).expect("discard");
            }
            _ => {
                drv.flush().expect("flush");
                is_flush = true;
            }
        }
        rec.spans.push((start, st.point(), is_flush));
        rec.snaps.push(model.clone());
    }
    rec
}

fn verify(got: &[u8], rec: &Recorded, k: usize, what: &str) {
    // Snapshot index after the last completed flush, and after the last op started.
    let mut lo = 0;
    let mut hi = 0;
    for (m, &(s, e, f)) in rec.spans.iter().enumerate() {
        if f && e <= k {
            lo = m + 1;
        }
        if s < k || (s == k && e == k) {
            hi = m + 1;
        }
    }
    let hi = hi.max(lo);
    for (si, sector) in got.chunks(SECTOR).enumerate() {
        let r = si * SECTOR..si * SECTOR + sector.len();
        if !(lo..=hi).any(|m| rec.snaps[m][r.clone()] == *sector) {
            panic!(
                "{what}: crash point {k}: sector {si} (guest offset {}) holds {:?}.. which no \
                 state between op {lo} and {hi} had (durable state has {:?}..)",
                si * SECTOR,
                &sector[..8],
                &rec.snaps[lo][r.start..r.start + 8]
            );
        }
    }
}

fn crash_run(seed: u64, with_backing: bool, geometry: (&str, &str)) {
    let mut rng = Rng(seed);
    let size: u64 = 4 << 20;
    // Backing smaller than the image, with recognisable data.
    let backing_len = 3 << 20;
    let backing_data: Vec<u8> = (0..backing_len)
        .map(|i| ((i / 512) % 251 + 1) as u8)
        .collect();
    let backing = with_backing.then(|| raw_backing(backing_data.clone()));
    let spec = with_backing.then(|| BackingSpec {
        name: "base.raw".into(),
        format: Some(Format::Raw),
    });
    let created = mem_qed(
        size,
        &[("cluster_size", geometry.0), ("table_size", geometry.1)],
        spec,
    );
    let initial = created.to_vec();
    let st = Arc::new(TraceStorage::new(initial));
    let dyn_st: Arc<dyn Storage> = st.clone();
    let drv = open_mem(dyn_st, &DriverOptions::default(), backing.clone()).expect("open");
    let mut model0 = vec![0u8; size as usize];
    if with_backing {
        model0[..backing_len].copy_from_slice(&backing_data);
    }
    let rec = workload(&drv, &st, model0, &mut rng, 24);
    let trace = st.trace();
    let points = trace.points();
    let mut checked = 0;
    for k in 0..points {
        let selectors: Vec<Selector> = vec![
            ("none", Box::new(|_| false)),
            ("all", Box::new(|_| true)),
            ("even", Box::new(|i| i % 2 == 0)),
            ("odd", Box::new(|i| i % 2 == 1)),
            (
                "hash",
                Box::new(move |i| !(i as u64 * 2654435761 + seed).is_multiple_of(3)),
            ),
        ];
        for (name, keep) in selectors {
            let img = trace.crash_image(k, &keep);
            let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
            let what = format!("seed {seed} backing {with_backing} keep {name}");
            let d = open_mem(mem, &DriverOptions::default(), backing.clone())
                .unwrap_or_else(|e| panic!("{what}: reopen at crash point {k}: {e}"));
            assert!(
                !d.is_dirty(),
                "{what}: still dirty after repair at point {k}"
            );
            let r = d.check(Repair::default()).expect("check");
            assert_eq!(r.corruptions, 0, "{what}: point {k}: {r:?}");
            assert_eq!(r.check_errors, 0, "{what}: point {k}: {r:?}");
            // The repair on open reclaimed every cluster the crash leaked.
            assert_eq!(r.leaks, 0, "{what}: point {k}: {r:?}");
            let mut got = vec![0u8; size as usize];
            d.read_at(&mut got, 0).expect("read");
            verify(&got, &rec, k, &what);
            checked += 1;
        }
    }
    assert!(checked > 50, "too few crash points ({checked})");
    drop(drv);
}

/// The repair itself (which moves clusters to reclaim leaks) survives a crash at any
/// point: reopening again repairs to the same contents with no corruption.
#[test]
fn crash_during_repair() {
    let size: u64 = 4 << 20;
    let created = mem_qed(size, &[("cluster_size", "4k"), ("table_size", "1")], None);
    let st = Arc::new(TraceStorage::new(created.to_vec()));
    let dyn_st: Arc<dyn Storage> = st.clone();
    let drv = open_mem(dyn_st, &DriverOptions::default(), None).expect("open");
    let mut rng = Rng(77);
    let rec = workload(&drv, &st, vec![0u8; size as usize], &mut rng, 30);
    let trace = st.trace();
    let mut repaired = 0;
    // Crash images that need leak reclaim: keep only some unflushed writes.
    for k in (1..trace.points()).step_by(3) {
        let img = trace.crash_image(k, |i| i % 3 != 1);
        // What the image reads as once repaired without interruption.
        let want = {
            let m: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
            let d = open_mem(m, &DriverOptions::default(), None).expect("reopen");
            let mut b = vec![0u8; size as usize];
            d.read_at(&mut b, 0).expect("read");
            b
        };
        let rst = Arc::new(TraceStorage::new(img));
        let dyn_r: Arc<dyn Storage> = rst.clone();
        let d = open_mem(dyn_r, &DriverOptions::default(), None).expect("repairing open");
        std::mem::forget(d); // no clean-up writes: we crash during the repair only
        let rtrace = rst.trace();
        if rtrace.ops.len() < 4 {
            continue;
        }
        repaired += 1;
        for j in 0..rtrace.points() {
            for keep in [0u64, 1, 2] {
                let img2 =
                    rtrace.crash_image(j, |i| (i as u64 + keep).is_multiple_of(2) || keep == 1);
                let m: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img2));
                let d2 = open_mem(m, &DriverOptions::default(), None)
                    .unwrap_or_else(|e| panic!("point {k}/{j}: {e}"));
                let r = d2.check(Repair::default()).expect("check");
                assert_eq!((r.corruptions, r.leaks), (0, 0), "point {k}/{j}: {r:?}");
                let mut b = vec![0u8; size as usize];
                d2.read_at(&mut b, 0).expect("read");
                assert!(b == want, "repair crash at {k}/{j} changed contents");
            }
        }
    }
    assert!(repaired > 3, "too few images needed repair ({repaired})");
    let _ = rec;
}

#[test]
fn crash_points_without_backing() {
    for seed in [3, 17, 99] {
        crash_run(seed, false, ("4k", "1"));
    }
    crash_run(41, false, ("64k", "2"));
}

#[test]
fn crash_points_with_backing() {
    for seed in [5, 23, 101] {
        crash_run(seed, true, ("4k", "1"));
    }
    crash_run(43, true, ("64k", "2"));
}
