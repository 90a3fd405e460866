//! Deterministic concurrency stress (issue 14, part 3).
//!
//! A seed splits a small image into runs of 1..16 sectors, gives each run to one of
//! several threads (so neighbouring sub-cluster ranges of one cluster, and of one L2
//! table and refcount block, belong to different threads), and gives each thread a
//! sequence of writes, zero writes (with and without unmap), discards, reads of what
//! it wrote and flushes on its own runs. Whatever order the threads run in, the final
//! contents are fixed by the seed (a discarded run may read as before, zero, or the
//! backing data until it is written again): every byte is verified through vdisk and
//! through `qemu-img convert`, and `qemu-img check` must find no corruption and no
//! leak. Configurations: qcow2 (standard L2), qcow2 over a backing file, qcow2 with
//! compressed whole-cluster writes, QED, QED over a backing file.
//!
//! CI runs a fixed seed set (`SEEDS`); `VDISK_STRESS_SEEDS=N` runs seeds 0..N instead
//! (the long mode), `VDISK_STRESS_SEED=S` one seed (to replay a failure).

mod stress_support;
use stress_support::*;

fn stress(name: &str) {
    let c = *CONFIGS.iter().find(|c| c.name == name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for seed in seeds(SEEDS) {
        run_seed(dir.path(), c, seed, &Shared);
    }
}

#[test]
fn plans_are_deterministic() {
    for c in CONFIGS {
        let a = plan(7, *c);
        let b = plan(7, *c);
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        assert_eq!(format!("{:?}", a.2), format!("{:?}", b.2));
        // Runs tile the image and several threads share clusters.
        assert_eq!(a.0.iter().map(|r| r.1).sum::<u64>(), SIZE);
    }
}

#[test]
fn stress_qcow2() {
    stress("qcow2");
}

#[test]
fn stress_qcow2_backing() {
    stress("qcow2-backing");
}

#[test]
fn stress_qcow2_compressed() {
    stress("qcow2-compressed");
}

#[test]
fn stress_qed() {
    stress("qed");
}

#[test]
fn stress_qed_backing() {
    stress("qed-backing");
}

#[test]
fn stress_qcow2_grow() {
    stress("qcow2-grow");
}

#[test]
fn stress_qcow2_extended_l2() {
    stress("qcow2-extl2");
}

#[test]
fn stress_qcow2_extended_l2_backing_grow() {
    stress("qcow2-extl2-backing-grow");
}

#[test]
fn stress_qed_grow() {
    stress("qed-grow");
}
