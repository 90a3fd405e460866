//! Crash simulation of `commit` (the library's [`vdisk::commit::commit_into`], which
//! `vdisk commit` runs, then [`Image::make_empty`] on the top): the base is recorded
//! while the layer above is copied into it, then the top while it is emptied, and
//! each is cut at every crash point with none, all or a random subset of its
//! unflushed writes. At every point: both images open, `check` finds no corruption
//! (leaks only, what `qemu-img check` also calls leaks), the chain (top over base)
//! reads exactly as before the commit, the base alone reads each byte as its old or
//! its committed value, and once the commit's flush is done the base holds every
//! committed byte. `check -r all` then leaves each image clean.

mod crash_util;
use crash_util::{open_qcow2_bytes as open_bytes, read_all};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use vdisk::format::report::FindingKind;
use vdisk::format::{qcow2, CreateSpec, DriverOptions};
use vdisk::storage::trace::{Trace, TraceStorage};
use vdisk::storage::{MemStorage, Storage};
use vdisk::{ExtentKind, Format, Image, Repair, ZeroFlags};

const SIZE: u64 = 256 << 10;

fn new_image(cs: &str, fill: impl Fn(&Image)) -> Vec<u8> {
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    qcow2::create(
        &mem,
        &CreateSpec {
            size: SIZE,
            backing: None,
            options: vec![("cluster_size".into(), cs.into())],
        },
    )
    .unwrap();
    let img = Image::open_storage(mem.clone(), Format::Qcow2, &DriverOptions::default()).unwrap();
    fill(&img);
    img.close().unwrap();
    let mut v = vec![0u8; mem.len().unwrap() as usize];
    mem.read_at(&mut v, 0).unwrap();
    v
}

/// What the chain top-over-base reads: the top where it holds the range, else the
/// base.
fn chain_view(top: &Image, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    v.resize(top.size() as usize, 0);
    let mut off = 0;
    while off < top.size() {
        let e = top.layer_block_status(off, top.size() - off).unwrap();
        let n = e.len.max(1).min(top.size() - off);
        if e.kind != ExtentKind::Unallocated {
            top.read_at(&mut v[off as usize..(off + n) as usize], off)
                .unwrap();
        }
        off += n;
    }
    v
}

/// Opens a crash image: no corruption, only leaks; then repairs it clean.
fn assert_sound(bytes: &[u8], what: &str) -> Vec<u8> {
    let img = open_bytes(bytes.to_vec(), false);
    let rep = img.check(Repair::default()).unwrap();
    for f in &rep.findings {
        assert!(
            matches!(f.kind, FindingKind::LeakedCluster),
            "{what}: {f:?}"
        );
    }
    assert_eq!(rep.corruptions, 0, "{what}: {:?}", rep.findings);
    let data = read_all(&img);
    drop(img);
    let img = open_bytes(bytes.to_vec(), true);
    img.check(Repair {
        leaks: true,
        errors: true,
    })
    .unwrap();
    let rep = img.check(Repair::default()).unwrap();
    assert_eq!(
        (rep.corruptions, rep.leaks),
        (0, 0),
        "{what}: after repair {:?}",
        rep.findings
    );
    data
}

/// Panics at the first byte where `got` differs from `want`.
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: byte {i} is {} instead of {}", got[i], want[i]);
    }
}

fn crash_images(trace: &Trace, k: usize, seed: u64) -> Vec<Vec<u8>> {
    (0..3u64)
        .map(|variant| {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ (k as u64) << 8 ^ variant);
            trace.crash_image(k, |_| match variant {
                0 => false,
                1 => true,
                _ => r.gen_bool(0.5),
            })
        })
        .collect()
}

fn run(cs: &str, seed: u64) {
    let base0 = new_image(cs, |b| {
        b.write_at(&vec![1u8; 100_000], 10_000).unwrap();
        b.write_at(&vec![6u8; 20_000], 200_000).unwrap();
    });
    let top0 = new_image(cs, |t| {
        t.write_at(&vec![3u8; 30_000], 5_000).unwrap();
        t.write_at(&vec![4u8; 7_000], 150_000).unwrap();
        let c = t.cluster_size().unwrap();
        // A zeroed range over base data (whole clusters), and a compressed cluster.
        t.write_zeroes(
            (60_000u64).div_ceil(c) * c,
            c,
            ZeroFlags {
                may_unmap: false,
                fast: false,
            },
        )
        .unwrap();
        t.write_compressed(&vec![8u8; c as usize], (SIZE / c - 1) * c)
            .unwrap();
    });
    let before = {
        let base = read_all(&open_bytes(base0.clone(), false));
        chain_view(&open_bytes(top0.clone(), false), &base)
    };
    let old_base = read_all(&open_bytes(base0.clone(), false));

    // Phase 1: the copy into the base (the top only read).
    let ts = Arc::new(TraceStorage::new(base0));
    let st: Arc<dyn Storage> = ts.clone();
    let base = Image::open_storage(st, Format::Qcow2, &DriverOptions::default()).unwrap();
    let top = open_bytes(top0.clone(), false);
    vdisk::commit::commit_into(std::slice::from_ref(&top), &base, SIZE, &mut |_, _| {}).unwrap();
    let flushed = ts.point();
    base.close().unwrap();
    drop(base);
    let trace = ts.trace();
    let mut checked = 0;
    for k in 0..trace.points() {
        for (v, bytes) in crash_images(&trace, k, seed).into_iter().enumerate() {
            let what = format!("cs {cs} base crash point {k} variant {v}");
            let got = assert_sound(&bytes, &what);
            same(
                &chain_view(&top, &got),
                &before,
                &format!("{what}: the chain"),
            );
            if k >= flushed {
                same(&got, &before, &format!("{what}: the base after the flush"));
            } else if let Some(i) =
                (0..got.len()).find(|&i| got[i] != old_base[i] && got[i] != before[i])
            {
                panic!("{what}: byte {i} is {} (neither old nor committed)", got[i]);
            }
            checked += 1;
        }
    }
    drop(top);
    let base_done = trace.crash_image(trace.points() - 1, |_| true);
    let base_data = read_all(&open_bytes(base_done, false));
    same(&base_data, &before, "the committed base");

    // Phase 2: emptying the top, the base durable.
    let ts = Arc::new(TraceStorage::new(top0));
    let st: Arc<dyn Storage> = ts.clone();
    let top = Image::open_storage(st, Format::Qcow2, &DriverOptions::default()).unwrap();
    top.make_empty().unwrap();
    top.close().unwrap();
    drop(top);
    let trace = ts.trace();
    for k in 0..trace.points() {
        for (v, bytes) in crash_images(&trace, k, seed ^ 0x55).into_iter().enumerate() {
            let what = format!("cs {cs} top crash point {k} variant {v}");
            assert_sound(&bytes, &what);
            let top = open_bytes(bytes, false);
            same(
                &chain_view(&top, &base_data),
                &before,
                &format!("{what}: the chain"),
            );
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} crash images");
}

#[test]
fn commit_survives_every_crash_point_512() {
    run("512", 11);
}

#[test]
fn commit_survives_every_crash_point_4k() {
    run("4096", 12);
}

#[test]
fn commit_survives_every_crash_point_64k() {
    run("65536", 13);
}
