//! Crash simulation for dynamic VHD and VDI block allocation: at every crash point of
//! random allocating workloads, with several choices of which unflushed writes reached
//! the disk, the image reopens, every write completed before a completed flush is
//! there, no sector holds anything no state of the guest had (metadata never points at
//! data that is not on disk), and the next allocation after the crash reads back
//! exactly (space a crash left behind is never read as guest data). VDI's check finds
//! no shared or out-of-range blocks (a crash may leave only a counted, unused block).

use std::sync::Arc;
use vdisk::format::{CreateSpec, Driver, DriverOptions, FindingKind, Format, Repair, ZeroFlags};
use vdisk::storage::trace::TraceStorage;
use vdisk::storage::{MemStorage, Storage};

const SECTOR: usize = 512;

/// A named choice of which unflushed writes survive a crash.
type Selector = (&'static str, Box<dyn Fn(usize) -> bool>);

/// xorshift: reproducible without a dependency on the rand crate's algorithms.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn created(fmt: Format, size: u64) -> Vec<u8> {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
    vdisk::format::create(
        fmt,
        &st,
        &CreateSpec {
            size,
            backing: None,
            options: vec![],
        },
    )
    .expect("create");
    let mut b = vec![0u8; st.len().unwrap() as usize];
    st.read_at(&mut b, 0).unwrap();
    b
}

fn open(fmt: Format, st: Arc<dyn Storage>) -> Arc<dyn Driver> {
    vdisk::format::open(fmt, st, &DriverOptions::default(), &mut |_| {
        panic!("no backing file")
    })
    .unwrap_or_else(|e| panic!("reopen: {e}"))
}

struct Recorded {
    snaps: Vec<Vec<u8>>,
    spans: Vec<(usize, usize, bool)>,
}

fn workload(drv: &dyn Driver, st: &TraceStorage, rng: &mut Rng, nops: usize) -> Recorded {
    let size = drv.size();
    let bs = drv.cluster_size().unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rec = Recorded {
        snaps: vec![model.clone()],
        spans: Vec::new(),
    };
    for i in 0..nops {
        let start = st.point();
        let pat = (i as u8).wrapping_mul(37).wrapping_add(11) | 1;
        let mut flush = false;
        match rng.below(8) {
            0..=4 => {
                let off = rng.below(size / SECTOR as u64) * SECTOR as u64;
                let len = ((rng.below(bs + bs / 2) / 512 + 1) * 512).min(size - off);
                drv.write_at(&vec![pat; len as usize], off).expect("write");
                model[off as usize..(off + len) as usize].fill(pat);
            }
            5 => {
                let off = rng.below(size / SECTOR as u64) * SECTOR as u64;
                let len = ((rng.below(bs) / 512 + 1) * 512).min(size - off);
                drv.write_zeroes(off, len, ZeroFlags::default())
                    .expect("zeroes");
                model[off as usize..(off + len) as usize].fill(0);
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
        assert!(
            (lo..=hi).any(|m| rec.snaps[m][r.clone()] == *sector),
            "{what}: crash point {k}: sector {si} holds {:?}.. which no state between op {lo} and {hi} had",
            &sector[..8]
        );
    }
}

fn crash_run(fmt: Format, size: u64, seed: u64) {
    let mut rng = Rng(seed);
    let st = Arc::new(TraceStorage::new(created(fmt, size)));
    let dyn_st: Arc<dyn Storage> = st.clone();
    let drv = open(fmt, dyn_st);
    // VHD sizes are rounded up to a CHS geometry.
    let size = drv.size();
    let rec = workload(&*drv, &st, &mut rng, 16);
    let trace = st.trace();
    let mut checked = 0;
    for k in 0..trace.points() {
        let selectors: Vec<Selector> = vec![
            ("none", Box::new(|_| false)),
            ("all", Box::new(|_| true)),
            ("even", Box::new(|i| i % 2 == 0)),
            ("odd", Box::new(|i| i % 2 == 1)),
        ];
        for (name, keep) in selectors {
            let what = format!("{fmt} seed {seed} keep {name}");
            let img = trace.crash_image(k, &keep);
            let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
            let d = open(fmt, mem);
            let mut got = vec![0u8; size as usize];
            d.read_at(&mut got, 0).expect("read");
            verify(&got, &rec, k, &what);
            if fmt == Format::Vdi {
                let r = d.check(Repair::default()).expect("check");
                for f in &r.findings {
                    assert_eq!(f.kind, FindingKind::VdiAllocatedMismatch, "{what}: {r:?}");
                    assert!(f.refcount > f.references, "{what}: {r:?}");
                }
            }
            // The next allocation after the crash: a sector in every block, then the
            // whole guest must read as before plus those sectors.
            let bs = d.cluster_size().unwrap();
            let mut want = got.clone();
            for b in 0..size / bs {
                let off = b * bs + bs / 2;
                d.write_at(&[0xa5; SECTOR], off).expect("write after crash");
                want[off as usize..off as usize + SECTOR].fill(0xa5);
            }
            let mut again = vec![0u8; size as usize];
            d.read_at(&mut again, 0).expect("read");
            assert!(
                again == want,
                "{what}: point {k}: allocation after the crash"
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "too few crash points ({checked})");
}

#[test]
fn vhd_dynamic_allocation_survives_crashes() {
    crash_run(Format::Vpc, 6 << 20, 1);
}

#[test]
fn vdi_dynamic_allocation_survives_crashes() {
    crash_run(Format::Vdi, 3 << 20, 3);
}
