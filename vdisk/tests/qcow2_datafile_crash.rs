//! Crash simulation of qcow2 images with an external data file (`data_file`, with and
//! without `data_file_raw`, with and without lazy refcounts): the image file and the
//! data file are two traced storages with one global order of operations; a crash at
//! any point keeps, per file, what that file's own flushes made durable plus none, all
//! or a random subset of the rest. Every crash image must open, rebuild if dirty,
//! check clean and hold every write completed before the last flush.

use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};
use vdisk::format::registry::{self, OpenArgs};
use vdisk::format::{BackingSpec, CreateSpec, DriverOptions};
use vdisk::storage::trace::TraceStorage;
use vdisk::storage::{MemStorage, Storage, StorageResult};
use vdisk::{Format, Image, Repair, ZeroFlags};

mod crash_util;
use crash_util::{assert_intact, assert_zero_or_new, discard_model, old_then_zeroed, Flushed};

/// One of the two traced files, logging its id into the shared global order for each
/// operation its trace records.
#[derive(Debug)]
struct Seq {
    inner: Arc<TraceStorage>,
    id: usize,
    log: Arc<Mutex<Vec<usize>>>,
}

impl Seq {
    /// File `id` of `traces`, logging into `log`.
    fn of(
        traces: &[Arc<TraceStorage>; 2],
        id: usize,
        log: &Arc<Mutex<Vec<usize>>>,
    ) -> Arc<dyn Storage> {
        Arc::new(Seq {
            inner: traces[id].clone(),
            id,
            log: log.clone(),
        })
    }

    fn op<T>(&self, f: impl FnOnce(&TraceStorage) -> StorageResult<T>) -> StorageResult<T> {
        let mut log = self.log.lock().unwrap();
        let before = self.inner.point();
        let r = f(&self.inner);
        for _ in before..self.inner.point() {
            log.push(self.id);
        }
        r
    }
}

impl Storage for Seq {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        self.op(|s| s.write_at(buf, offset))
    }
    fn flush(&self) -> StorageResult<()> {
        self.op(|s| s.flush())
    }
    fn len(&self) -> StorageResult<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> StorageResult<()> {
        self.op(|s| s.set_len(len))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.op(|s| s.punch_hole(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.op(|s| s.write_zeroes(offset, len))
    }
    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.op(|s| s.allocate(offset, len))
    }
}

/// How many operations of each file come before global point `k` of `order`.
fn per_file(order: &[usize], k: usize) -> [usize; 2] {
    let mut kf = [0usize; 2];
    for &id in &order[..k] {
        kf[id] += 1;
    }
    kf
}

/// Both files crashed after their first `kf` operations, keeping none (variant 0),
/// all (1) or a random subset (others) of what their flushes had not made durable.
fn crash_pair(
    tr: &[vdisk::storage::trace::Trace; 2],
    kf: [usize; 2],
    variant: u64,
    r: &mut rand::rngs::StdRng,
) -> (Vec<u8>, Vec<u8>) {
    let mut crash = |t: &vdisk::storage::trace::Trace, n: usize| {
        t.crash_image(n, |_| match variant {
            0 => false,
            1 => true,
            _ => r.gen_bool(0.5),
        })
    };
    (crash(&tr[0], kf[0]), crash(&tr[1], kf[1]))
}

fn bytes_of(st: &dyn Storage) -> Vec<u8> {
    let mut v = vec![0u8; st.len().unwrap() as usize];
    st.read_at(&mut v, 0).unwrap();
    v
}

fn open(meta: Arc<dyn Storage>, data: Arc<dyn Storage>, rw: bool) -> vdisk::Result<Image> {
    let opts = DriverOptions {
        read_only: !rw,
        ..DriverOptions::default()
    };
    let d = registry::open_with(
        Format::Qcow2,
        OpenArgs {
            meta,
            data,
            opts: &opts,
            backing: &mut |_s: &BackingSpec| Err(vdisk::Error::ReadOnly),
            files: None,
            data_files: None,
        },
    )?;
    Ok(Image::from_driver(d, "<crash>"))
}

fn run(opts: &[(&str, &str)], seed: u64, nops: usize) {
    run_cs(opts, 4096, seed, nops)
}

/// Creates an image of `size` bytes with an external data file (options `opts` and
/// clusters of `cs` bytes): the image file's and the data file's bytes.
fn created(opts: &[(&str, &str)], cs: u64, size: u64) -> (Vec<u8>, Vec<u8>) {
    let (meta0, data0): (Arc<dyn Storage>, Arc<dyn Storage>) =
        (Arc::new(MemStorage::new()), Arc::new(MemStorage::new()));
    let mut o: Vec<(String, String)> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    o.push(("cluster_size".into(), cs.to_string()));
    o.push(("data_file".into(), "d.raw".into()));
    registry::create_with_data(
        Format::Qcow2,
        &meta0,
        &CreateSpec {
            size,
            backing: None,
            options: o,
        },
        None,
        Some(data0.clone()),
    )
    .unwrap();
    (bytes_of(&*meta0), bytes_of(&*data0))
}

fn run_cs(opts: &[(&str, &str)], cs: u64, seed: u64, nops: usize) {
    let size = 1u64 << 20;
    let (meta0, data0) = created(opts, cs, size);
    let log = Arc::new(Mutex::new(Vec::new()));
    let traces = [
        Arc::new(TraceStorage::new(meta0)),
        Arc::new(TraceStorage::new(data0)),
    ];
    let seq = |id: usize| Seq::of(&traces, id, &log);
    let img = open(seq(0), seq(1), true).unwrap();
    let point = || log.lock().unwrap().len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; size as usize];
    let mut flushes = vec![Flushed {
        point: 0,
        data: model.clone(),
        later: vec![],
    }];
    for i in 0..nops {
        let off = if rng.gen_bool(0.5) {
            rng.gen_range(0..size / cs) * cs
        } else {
            rng.gen_range(0..size)
        };
        let len = rng.gen_range(1..=(size - off).min(3 * cs + 100));
        let start = point();
        match rng.gen_range(0..10) {
            0..=5 => {
                let v = (i as u8).wrapping_mul(37) | 1;
                img.write_at(&vec![v; len as usize], off).unwrap();
                model[off as usize..(off + len) as usize].fill(v);
            }
            6 => {
                let may_unmap = rng.gen_bool(0.5);
                img.write_zeroes(
                    off,
                    len,
                    ZeroFlags {
                        may_unmap,
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
                    point: point(),
                    data: model.clone(),
                    later: vec![],
                });
                continue;
            }
        }
        if let Some(f) = flushes.last_mut() {
            f.later.push((start, off, len));
        }
    }
    img.close().unwrap();
    drop(img);
    let order = log.lock().unwrap().clone();
    let tr = [traces[0].trace(), traces[1].trace()];
    let mut checked = 0;
    for k in 0..=order.len() {
        let f = flushes.iter().rev().find(|f| f.point <= k).unwrap();
        // Ops of each file issued before global point k.
        let kf = per_file(&order, k);
        for variant in 0..3u64 {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ (k as u64) << 8 ^ variant);
            let (mb, db) = crash_pair(&tr, kf, variant, &mut r);
            let mem =
                |b: &Vec<u8>| -> Arc<dyn Storage> { Arc::new(MemStorage::from_vec(b.clone())) };
            let img = open(mem(&mb), mem(&db), true)
                .unwrap_or_else(|e| panic!("crash point {k} variant {variant}: open: {e}"));
            let rep = img
                .check(Repair {
                    leaks: true,
                    errors: false,
                })
                .unwrap();
            assert_eq!(
                rep.corruptions, 0,
                "crash point {k}/{variant}: {:?}",
                rep.findings
            );
            assert_eq!(rep.leaks, 0, "crash point {k}/{variant}: leaks left");
            assert_intact(&img, f, k, &format!("variant {variant}"));
            checked += 1;
        }
    }
    assert!(checked > 50, "too few crash points ({checked})");
}

#[test]
fn crash_points_data_file() {
    run(&[], 1, 40);
}

#[test]
fn crash_points_data_file_raw() {
    run(&[("data_file_raw", "on")], 2, 40);
}

#[test]
fn crash_points_data_file_lazy_refcounts() {
    run(&[("lazy_refcounts", "on")], 3, 40);
}

#[test]
fn crash_points_data_file_subclusters() {
    // Extended L2 at the smallest cluster size it allows (512-byte subclusters):
    // unaligned writes allocate single subclusters at the guest offset in the data
    // file (partial-subcluster COW), zero writes and discards set zero bits.
    run_cs(&[("extended_l2", "on")], 16384, 4, 40);
}

#[test]
fn crash_points_data_file_raw_subclusters() {
    run_cs(
        &[("extended_l2", "on"), ("data_file_raw", "on")],
        16384,
        5,
        40,
    );
}

#[test]
fn crash_points_data_file_subclusters_lazy_refcounts() {
    run_cs(
        &[("extended_l2", "on"), ("lazy_refcounts", "on")],
        16384,
        6,
        40,
    );
}

/// A write into zero subclusters of data file clusters that keep their data file
/// clusters (after a zero write without unmap, which leaves the old bytes in a data
/// file that is not raw; guest cluster 0 is data file offset 0): the bitmap must not
/// reach the image file before the new data reaches the data file. At every point of
/// the one global order of both files (none, all or random subsets of each file's
/// unflushed writes) the subclusters read as the flushed zeroes or the new data,
/// never the old data. Fails if the data-before-bitmap flush is removed.
#[test]
fn crash_points_data_file_subcluster_bits_after_data() {
    let cs = 65536u64;
    let size = 1u64 << 20;
    let (meta0, data0) = created(&[("extended_l2", "on")], cs, size);
    let (meta, data): (Arc<dyn Storage>, Arc<dyn Storage>) = (
        Arc::new(MemStorage::from_vec(meta0)),
        Arc::new(MemStorage::from_vec(data0)),
    );
    let img = open(meta.clone(), data.clone(), true).unwrap();
    old_then_zeroed(img, cs);
    let log = Arc::new(Mutex::new(Vec::new()));
    let traces = [
        Arc::new(TraceStorage::new(bytes_of(&*meta))),
        Arc::new(TraceStorage::new(bytes_of(&*data))),
    ];
    // The old bytes are still in the data file: the test is meaningful.
    assert_eq!(bytes_of(&*data)[6144], 0x11);
    let seq = |id: usize| Seq::of(&traces, id, &log);
    let img = open(seq(0), seq(1), true).unwrap();
    // Whole subclusters and partial ones (COW of zeroes inside the subcluster).
    img.write_at(&[0x22; 4096], 3 * 2048).unwrap();
    img.write_at(&[0x33; 100], cs + 5000).unwrap();
    img.flush().unwrap();
    img.close().unwrap();
    drop(img);
    let order = log.lock().unwrap().clone();
    let tr = [traces[0].trace(), traces[1].trace()];
    for k in 0..=order.len() {
        let kf = per_file(&order, k);
        for variant in 0..6u64 {
            let mut r = rand::rngs::StdRng::seed_from_u64((k as u64) << 8 ^ variant);
            let (mb, db) = crash_pair(&tr, kf, variant, &mut r);
            let img = open(
                Arc::new(MemStorage::from_vec(mb)),
                Arc::new(MemStorage::from_vec(db)),
                false,
            )
            .unwrap_or_else(|e| panic!("crash point {k} variant {variant}: open: {e}"));
            assert_zero_or_new(&img, cs, k, variant);
        }
    }
}
