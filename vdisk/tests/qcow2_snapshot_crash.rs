//! Crash simulation of internal snapshot create, apply and delete: at every crash
//! point (with none, all or random subsets of the unflushed writes) the image opens,
//! `check` finds nothing but leaks and harmless COPIED flags (those a crash before
//! the header update leaves, as QEMU's), the image is exactly the state before or
//! after the operation in progress (snapshot list, active disk, every snapshot's
//! contents), writes over the whole active disk never change a snapshot, and
//! `check -r all` leaves a clean image.

use rand::{Rng, SeedableRng};
use std::sync::Arc;
use vdisk::format::report::FindingKind;
use vdisk::format::{qcow2, CreateSpec, DriverOptions, SnapshotInfo};
use vdisk::storage::trace::TraceStorage;
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Format, Image, Repair};

const SIZE: u64 = 96 << 10;

#[derive(Clone, Debug, PartialEq)]
struct State {
    /// (id, name, contents) of every snapshot, in table order.
    snaps: Vec<(String, String, Vec<u8>)>,
    active: Vec<u8>,
}

fn open_bytes(bytes: Vec<u8>, rw: bool) -> Image {
    Image::open_storage(
        Arc::new(MemStorage::from_vec(bytes)),
        Format::Qcow2,
        &DriverOptions {
            read_only: !rw,
            ..DriverOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("open failed: {e}"))
}

fn contents(st: &Arc<dyn Storage>) -> Vec<u8> {
    let mut v = vec![0u8; st.len().unwrap() as usize];
    st.read_at(&mut v, 0).unwrap();
    v
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

fn snap(name: &str) -> SnapshotInfo {
    SnapshotInfo {
        id: String::new(),
        name: name.into(),
        vm_state_size: 0,
        date_sec: 1,
        date_nsec: 0,
        vm_clock_nsec: 0,
        icount: Some(0),
    }
}

/// The whole state of an image file: each snapshot read by applying it on a copy.
fn state_of(bytes: &[u8]) -> State {
    let img = open_bytes(bytes.to_vec(), false);
    let active = read_all(&img);
    let list = img.snapshots();
    drop(img);
    let snaps = list
        .iter()
        .map(|s| {
            let copy = open_bytes(bytes.to_vec(), true);
            copy.snapshot_apply(&s.id).unwrap();
            let c = read_all(&copy);
            (s.id.clone(), s.name.clone(), c)
        })
        .collect();
    State { snaps, active }
}

enum Op {
    Create(&'static str),
    Apply(&'static str),
    Delete(&'static str),
    Write(u64, u64, u8),
}

fn run(cluster_size: &str, seed: u64) {
    // The starting image: data, a compressed cluster, zeroes and one snapshot.
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    qcow2::create(
        &mem,
        &CreateSpec {
            size: SIZE,
            backing: None,
            options: vec![("cluster_size".into(), cluster_size.into())],
        },
    )
    .unwrap();
    {
        let img =
            Image::open_storage(mem.clone(), Format::Qcow2, &DriverOptions::default()).unwrap();
        img.write_at(&vec![1u8; 40 << 10], 0).unwrap();
        let cs = img.cluster_size().unwrap();
        img.write_compressed(&vec![7u8; cs as usize], 48 << 10)
            .unwrap();
        img.snapshot_create(&snap("base")).unwrap();
        img.write_at(&vec![2u8; 10_000], 20_000).unwrap();
        img.close().unwrap();
    }
    let initial = contents(&mem);
    let ts = Arc::new(TraceStorage::new(initial.clone()));
    let st: Arc<dyn Storage> = ts.clone();
    let img = Image::open_storage(st, Format::Qcow2, &DriverOptions::default()).unwrap();
    let ops = [
        Op::Create("a"),
        Op::Write(1000, 30_000, 3),
        Op::Create("b"),
        Op::Write(60_000, 9000, 4),
        Op::Apply("a"),
        Op::Write(0, 5000, 5),
        Op::Delete("b"),
        Op::Apply("base"),
        Op::Delete("a"),
        Op::Delete("base"),
    ];
    // (first point, last point, state after) of each operation.
    let mut states = vec![(0usize, 0usize, state_of(&initial))];
    for op in &ops {
        let start = ts.point();
        match op {
            Op::Create(n) => {
                img.snapshot_create(&snap(n)).unwrap();
            }
            Op::Apply(n) => {
                let id = img
                    .snapshots()
                    .into_iter()
                    .find(|s| s.name == *n)
                    .unwrap()
                    .id;
                img.snapshot_apply(&id).unwrap();
            }
            Op::Delete(n) => {
                img.snapshot_delete(None, Some(n)).unwrap();
            }
            Op::Write(off, len, v) => {
                img.write_at(&vec![*v; *len as usize], *off).unwrap();
                img.flush().unwrap();
            }
        }
        let end = ts.point();
        states.push((start, end, state_of(&ts.contents())));
    }
    img.close().unwrap();
    drop(img);
    let trace = ts.trace();
    let mut checked = 0;
    for k in 0..trace.points() {
        // The last operation complete by point k, and the one in progress.
        let done = states.iter().rposition(|s| s.1 <= k).unwrap();
        let mut allowed = vec![&states[done].2];
        if let Some(next) = states.get(done + 1) {
            if next.0 < k {
                allowed.push(&next.2);
            }
        }
        for variant in 0..3u64 {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ (k as u64) << 8 ^ variant);
            let bytes = trace.crash_image(k, |_| match variant {
                0 => false,
                1 => true,
                _ => r.gen_bool(0.5),
            });
            let what = format!("cs {cluster_size} crash point {k} variant {variant}");
            let img = open_bytes(bytes.clone(), false);
            let rep = img.check(Repair::default()).unwrap();
            for f in &rep.findings {
                assert!(
                    matches!(f.kind, FindingKind::LeakedCluster | FindingKind::CopiedFlag),
                    "{what}: {f:?}"
                );
            }
            drop(img);
            let got = state_of(&bytes);
            assert!(
                allowed.contains(&&got),
                "{what}: state matches neither side of operation {done}: snapshots {:?}",
                got.snaps
                    .iter()
                    .map(|s| (s.0.clone(), s.1.clone()))
                    .collect::<Vec<_>>()
            );
            // Writes over the whole active disk leave every snapshot as it was.
            let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes.clone()));
            let img =
                Image::open_storage(st.clone(), Format::Qcow2, &DriverOptions::default()).unwrap();
            img.write_at(&vec![0x5a; img.size() as usize], 0).unwrap();
            img.close().unwrap();
            drop(img);
            let after = state_of(&contents(&st));
            assert!(
                after.snaps == got.snaps,
                "{what}: a write over the active disk changed a snapshot"
            );
            // Full repair gives a clean image.
            let img = open_bytes(bytes, true);
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
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} crash images");
}

#[test]
fn snapshot_operations_survive_every_crash_point_512() {
    run("512", 1);
}

#[test]
fn snapshot_operations_survive_every_crash_point_4k() {
    run("4096", 2);
}

/// `make_empty` (commit's last step) crashed at every point: the image opens, has
/// nothing but leaks, and every cluster reads its old data or as unallocated (the
/// backing file's view, zeroes here), never anything else.
#[test]
fn make_empty_survives_every_crash_point() {
    for cs in ["512", "65536"] {
        let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
        qcow2::create(
            &mem,
            &CreateSpec {
                size: SIZE * 4,
                backing: None,
                options: vec![("cluster_size".into(), cs.into())],
            },
        )
        .unwrap();
        {
            let img =
                Image::open_storage(mem.clone(), Format::Qcow2, &DriverOptions::default()).unwrap();
            img.write_at(&vec![9u8; (SIZE * 3) as usize], 1000).unwrap();
            img.close().unwrap();
        }
        let initial = contents(&mem);
        let before = read_all(&open_bytes(initial.clone(), false));
        let ts = Arc::new(TraceStorage::new(initial));
        let st: Arc<dyn Storage> = ts.clone();
        let img = Image::open_storage(st, Format::Qcow2, &DriverOptions::default()).unwrap();
        img.make_empty().unwrap();
        assert!(read_all(&img).iter().all(|&b| b == 0));
        img.close().unwrap();
        drop(img);
        let trace = ts.trace();
        let c = cs.parse::<usize>().unwrap();
        for k in 0..trace.points() {
            for variant in 0..3u64 {
                let mut r = rand::rngs::StdRng::seed_from_u64((k as u64) << 8 ^ variant);
                let bytes = trace.crash_image(k, |_| match variant {
                    0 => false,
                    1 => true,
                    _ => r.gen_bool(0.5),
                });
                let img = open_bytes(bytes, false);
                let rep = img.check(Repair::default()).unwrap();
                assert_eq!(rep.corruptions, 0, "cs {cs} point {k}: {:?}", rep.findings);
                let got = read_all(&img);
                for (i, (g, b)) in got.chunks(c).zip(before.chunks(c)).enumerate() {
                    assert!(
                        g == b || g.iter().all(|&x| x == 0),
                        "cs {cs} point {k} variant {variant}: cluster {i} is neither"
                    );
                }
            }
        }
    }
}
