//! Crash simulation of VM state writes (`Image::save_vmstate`, qemu-io `write -b`) that
//! grow the L1 table: each run is cut at every crash point with none, all or a random
//! subset of its unflushed writes. At every point the image opens, `check` finds
//! nothing but leaks, the guest disk reads exactly as before, each VM state byte reads
//! as its old or its new value, and once the flush is done every new byte is there.

mod crash_util;
use crash_util::{open_qcow2_bytes as open_bytes, read_all};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use vdisk::format::report::FindingKind;
use vdisk::format::{qcow2, CreateSpec, DriverOptions};
use vdisk::storage::trace::TraceStorage;
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Format, Image, Repair};

const SIZE: u64 = 128 << 10;
/// VM state writes: (position, length, byte). The later ones sit far enough out that
/// a 512-byte-cluster image grows its L1 table for each.
const WRITES: &[(u64, usize, u8)] = &[(1024, 3000, 7), (40 << 20, 5000, 8), (200 << 20, 700, 9)];

fn vmstate(img: &Image) -> Vec<Vec<u8>> {
    WRITES
        .iter()
        .map(|&(pos, len, _)| {
            let mut v = vec![0u8; len];
            img.load_vmstate(&mut v, pos).unwrap();
            v
        })
        .collect()
}

fn run(cs: &str, seed: u64) {
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
    img.write_at(&vec![3u8; 50_000], 7_000).unwrap();
    img.save_vmstate(&vec![5u8; 10_000], 0).unwrap();
    img.close().unwrap();
    drop(img);
    let mut start = vec![0u8; mem.len().unwrap() as usize];
    mem.read_at(&mut start, 0).unwrap();
    let (guest0, old) = {
        let img = open_bytes(start.clone(), false);
        (read_all(&img), vmstate(&img))
    };

    let ts = Arc::new(TraceStorage::new(start));
    let st: Arc<dyn Storage> = ts.clone();
    let img = Image::open_storage(st, Format::Qcow2, &DriverOptions::default()).unwrap();
    for &(pos, len, b) in WRITES {
        img.save_vmstate(&vec![b; len], pos).unwrap();
    }
    img.flush().unwrap();
    let flushed = ts.point();
    let new = vmstate(&img);
    img.close().unwrap();
    drop(img);
    let trace = ts.trace();
    let mut checked = 0;
    for k in 0..trace.points() {
        for variant in 0..3u64 {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ (k as u64) << 8 ^ variant);
            let bytes = trace.crash_image(k, |_| match variant {
                0 => false,
                1 => true,
                _ => r.gen_bool(0.5),
            });
            let what = format!("cs {cs} crash point {k} variant {variant}");
            let img = open_bytes(bytes.clone(), false);
            let rep = img.check(Repair::default()).unwrap();
            for f in &rep.findings {
                assert!(
                    matches!(f.kind, FindingKind::LeakedCluster),
                    "{what}: {f:?}"
                );
            }
            assert_eq!(read_all(&img), guest0, "{what}: the guest disk changed");
            for (i, got) in vmstate(&img).iter().enumerate() {
                for (j, &g) in got.iter().enumerate() {
                    let (o, n) = (old[i][j], new[i][j]);
                    assert!(g == o || g == n, "{what}: write {i} byte {j} is {g}");
                    if k >= flushed {
                        assert_eq!(g, n, "{what}: write {i} byte {j} lost after the flush");
                    }
                }
            }
            drop(img);
            let img = open_bytes(bytes, true);
            img.check(Repair {
                leaks: true,
                errors: true,
            })
            .unwrap();
            let rep = img.check(Repair::default()).unwrap();
            assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{what}: after repair");
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} crash images");
}

#[test]
fn vm_state_writes_growing_l1_survive_every_crash_point_512() {
    run("512", 3);
}

#[test]
fn vm_state_writes_survive_every_crash_point_64k() {
    run("65536", 4);
}
