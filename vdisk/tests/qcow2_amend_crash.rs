//! Crash simulation of `amend`: a refcount width change (new structure written and
//! flushed, then one header write) and a downgrade to compat=0.10 (zero clusters
//! expanded first), at every crash point: the image opens, `check` finds nothing but
//! leaks, and the guest disk reads exactly as before.

use rand::{Rng, SeedableRng};
use std::sync::Arc;
use vdisk::format::{qcow2, CreateSpec, DriverOptions, SnapshotInfo};
use vdisk::storage::trace::TraceStorage;
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Format, Image, Repair, ZeroFlags};

const SIZE: u64 = 256 << 10;

fn contents(st: &Arc<dyn Storage>) -> Vec<u8> {
    let mut v = vec![0u8; st.len().unwrap() as usize];
    st.read_at(&mut v, 0).unwrap();
    v
}

fn open_bytes(bytes: Vec<u8>) -> Image {
    Image::open_storage(
        Arc::new(MemStorage::from_vec(bytes)),
        Format::Qcow2,
        &DriverOptions {
            read_only: true,
            ..DriverOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("open failed: {e}"))
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

fn run(cs: &str, amend: &[(&str, &str)], snapshot: bool) {
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
    {
        let img =
            Image::open_storage(mem.clone(), Format::Qcow2, &DriverOptions::default()).unwrap();
        img.write_at(&vec![3u8; 100_000], 5000).unwrap();
        let c = img.cluster_size().unwrap();
        img.write_compressed(&vec![4u8; c as usize], 128 << 10)
            .unwrap();
        img.write_zeroes(
            20_000,
            30_000,
            ZeroFlags {
                may_unmap: false,
                fast: false,
            },
        )
        .unwrap();
        if snapshot {
            img.snapshot_create(&SnapshotInfo {
                id: String::new(),
                name: "s".into(),
                vm_state_size: 0,
                date_sec: 0,
                date_nsec: 0,
                vm_clock_nsec: 0,
                icount: None,
            })
            .unwrap();
            img.write_at(&vec![5u8; 9000], 60_000).unwrap();
        }
        img.close().unwrap();
    }
    let initial = contents(&mem);
    let before = read_all(&open_bytes(initial.clone()));
    let ts = Arc::new(TraceStorage::new(initial));
    let st: Arc<dyn Storage> = ts.clone();
    let img = Image::open_storage(st, Format::Qcow2, &DriverOptions::default()).unwrap();
    let pairs: Vec<(String, String)> = amend
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    img.amend(&pairs).unwrap();
    img.close().unwrap();
    drop(img);
    let trace = ts.trace();
    let mut checked = 0;
    for k in 0..trace.points() {
        for variant in 0..3u64 {
            let mut r = rand::rngs::StdRng::seed_from_u64((k as u64) << 8 ^ variant);
            let bytes = trace.crash_image(k, |_| match variant {
                0 => false,
                1 => true,
                _ => r.gen_bool(0.5),
            });
            let what = format!("cs {cs} {amend:?} point {k} variant {variant}");
            let img = open_bytes(bytes);
            let rep = img.check(Repair::default()).unwrap();
            assert_eq!(rep.corruptions, 0, "{what}: {:?}", rep.findings);
            assert!(read_all(&img) == before, "{what}: the guest disk changed");
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} crash images");
}

#[test]
fn refcount_width_change_survives_every_crash_point() {
    for cs in ["512", "65536"] {
        for bits in ["1", "4", "64"] {
            run(cs, &[("refcount_bits", bits)], false);
        }
        run(cs, &[("refcount_bits", "8")], true);
    }
}

#[test]
fn downgrade_survives_every_crash_point() {
    for cs in ["512", "65536"] {
        run(cs, &[("compat", "0.10")], false);
        run(cs, &[("compat", "0.10")], true);
    }
}
