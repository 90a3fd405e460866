//! Crash simulation for VMDK (monolithic sparse, with and without zeroed grains;
//! stream-optimized) and VHDX (dynamic, fixed): every crash point of a random
//! workload, with several choices of which unflushed writes reached the disk. The image
//! must reopen, `check` clean, and hold every write completed before a completed flush
//! (sectors may only hold a state between the last durable flush and the crash).

use std::sync::Arc;
use vdisk::format::{BackingSpec, CreateSpec, Driver, DriverOptions, Format, ZeroFlags};
use vdisk::storage::trace::TraceStorage;
use vdisk::storage::{MemStorage, Storage};
use vdisk::Repair;

const SECTOR: usize = 512;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n
    }
}

struct Recorded {
    snaps: Vec<Vec<u8>>,
    spans: Vec<(usize, usize, bool)>,
}

fn open(st: Arc<dyn Storage>, fmt: Format) -> vdisk::Result<Arc<dyn Driver>> {
    vdisk::format::open(
        fmt,
        st,
        &DriverOptions::default(),
        &mut |_: &BackingSpec| Err(vdisk::error::Invalid::BackingDisabled.into()),
    )
}

fn created(fmt: Format, size: u64, opts: &[(&str, &str)]) -> Vec<u8> {
    let m: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let spec = CreateSpec {
        size,
        backing: None,
        options: opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    vdisk::format::registry::create_named(fmt, &m, &spec, Some("x.img")).expect("create");
    let mut b = vec![0u8; m.len().unwrap() as usize];
    m.read_at(&mut b, 0).unwrap();
    b
}

/// Random writes (`unit`-sized pieces; whole distinct units when `once`), zero writes
/// (unless `once`) and flushes.
fn workload(drv: &dyn Driver, st: &TraceStorage, rng: &mut Rng, unit: u64, once: bool) -> Recorded {
    let size = drv.size();
    let mut model = vec![0u8; size as usize];
    let mut rec = Recorded {
        snaps: vec![model.clone()],
        spans: Vec::new(),
    };
    let mut used = std::collections::BTreeSet::new();
    for i in 0..18 {
        let start = st.point();
        let pat = (i as u8).wrapping_mul(37).wrapping_add(11) | 1;
        let mut flush = false;
        match rng.below(6) {
            0..=2 => {
                let (off, len) = if once {
                    let u = rng.below(size / unit);
                    if !used.insert(u) {
                        continue;
                    }
                    (u * unit, unit)
                } else {
                    let off = rng.below(size / SECTOR as u64) * SECTOR as u64;
                    (off, ((rng.below(2 * unit) / 512 + 1) * 512).min(size - off))
                };
                drv.write_at(&vec![pat; len as usize], off).expect("write");
                model[off as usize..(off + len) as usize].fill(pat);
            }
            3 if !once => {
                let u = rng.below(size / unit);
                drv.write_zeroes(u * unit, unit, ZeroFlags::default())
                    .expect("zeroes");
                model[(u * unit) as usize..((u + 1) * unit) as usize].fill(0);
            }
            _ => {
                drv.flush().expect("flush");
                flush = true;
            }
        }
        rec.spans.push((start, st.point(), flush));
        rec.snaps.push(model.clone());
    }
    rec
}

fn verify(got: &[u8], rec: &Recorded, k: usize, what: &str) {
    let (mut lo, mut hi) = (0, 0);
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
        assert!(
            (lo..=hi).any(|m| rec.snaps[m][r.clone()] == *sector),
            "{what}: crash point {k}: sector {si} holds {:?}.., no state between op {lo} and {hi}",
            &sector[..8]
        );
    }
}

fn crash_run(fmt: Format, opts: &[(&str, &str)], size: u64, unit: u64, once: bool, seed: u64) {
    let st = Arc::new(TraceStorage::new(created(fmt, size, opts)));
    let dyn_st: Arc<dyn Storage> = st.clone();
    let drv = open(dyn_st, fmt).expect("open");
    let rec = workload(&*drv, &st, &mut Rng(seed), unit, once);
    let trace = st.trace();
    let mut checked = 0;
    for k in (0..trace.points()).step_by(1 + trace.points() / 60) {
        for (name, keep) in [
            ("none", Box::new(|_| false) as Box<dyn Fn(usize) -> bool>),
            ("all", Box::new(|_| true)),
            ("even", Box::new(|i| i % 2 == 0)),
            ("odd", Box::new(|i| i % 2 == 1)),
        ] {
            let img = trace.crash_image(k, &keep);
            let what = format!("{fmt} {opts:?} seed {seed} keep {name}");
            let d = open(Arc::new(MemStorage::from_vec(img)), fmt)
                .unwrap_or_else(|e| panic!("{what}: reopen at point {k}: {e}"));
            let r = d.check(Repair::default()).expect("check");
            assert_eq!(r.corruptions, 0, "{what}: point {k}: {r:?}");
            let mut got = vec![0u8; size as usize];
            d.read_at(&mut got, 0).expect("read");
            verify(&got, &rec, k, &what);
            checked += 1;
        }
    }
    assert!(checked > 20, "too few crash points ({checked})");
}

#[test]
fn vmdk_sparse_crash_points() {
    for seed in [3, 17] {
        crash_run(Format::Vmdk, &[], 2 << 20, 64 << 10, false, seed);
        crash_run(
            Format::Vmdk,
            &[("zeroed_grain", "on")],
            2 << 20,
            64 << 10,
            false,
            seed + 1,
        );
    }
}

#[test]
fn vmdk_stream_crash_points() {
    for seed in [5, 29] {
        crash_run(
            Format::Vmdk,
            &[("subformat", "streamOptimized")],
            2 << 20,
            64 << 10,
            true,
            seed,
        );
    }
}

#[test]
fn vhdx_crash_points() {
    for seed in [7, 31] {
        crash_run(
            Format::Vhdx,
            &[("block_size", "1M")],
            4 << 20,
            256 << 10,
            false,
            seed,
        );
        crash_run(
            Format::Vhdx,
            &[
                ("block_size", "1M"),
                ("subformat", "fixed"),
                ("block_state_zero", "off"),
            ],
            4 << 20,
            256 << 10,
            false,
            seed + 1,
        );
    }
}
