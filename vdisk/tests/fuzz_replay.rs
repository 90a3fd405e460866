//! Replays every fuzz seed and every crash the fuzzers found for the image targets,
//! so `cargo test` on the stable toolchain covers them without libFuzzer.

mod fuzz_replay_support;
mod fuzz_support;

#[test]
fn fuzz_corpora_and_crashes_replay_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    fuzz_replay_support::replay(&root, fuzz_support::TARGETS);
}

/// The table and LUKS seeds reach what they are for (else the fuzzer starts blind).
#[test]
fn table_and_luks_seeds_reach_their_parsers() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let read = |p: &str| std::fs::read(root.join(p)).unwrap();
    let snap = fuzz_support::snapshot_table_counts;
    assert_eq!(snap(&read("qcow2_snapshot_table/two")), (2, 0));
    assert_eq!(snap(&read("qcow2_snapshot_table/one")), (1, 0));
    assert_eq!(snap(&read("qcow2_snapshot_table/none")), (0, 0));
    let bm = fuzz_support::bitmap_directory_counts;
    assert_eq!(bm(&read("qcow2_bitmap_directory/two")), (0, 2));
    assert_eq!(bm(&read("qcow2_bitmap_directory/one")), (0, 1));
    assert!(fuzz_support::luks_unlocks(&read("luks_header/xts_slot0")));
    assert!(fuzz_support::luks_unlocks(&read(
        "luks_header/cbc_essiv_slot0"
    )));
    assert!(!fuzz_support::luks_unlocks(&read("luks_header/xts_header")));
    // Recorded replies answer the whole session again, with no server behind them.
    for seed in [
        "qemu_nbd_qcow2",
        "qemu_nbd_depth",
        "nbdkit_memory",
        "nbdkit_no_sr",
    ] {
        let data = read(&format!("nbd_client/{seed}"));
        assert!(fuzz_support::nbd_client_session_ok(&data), "{seed}");
    }
    assert!(!fuzz_support::nbd_client_session_ok(&read(
        "nbd_client/qemu_nbd_readonly"
    )));
}

/// Not a test: records an `nbd_client` seed from a real server (run by
/// `fuzz/nbd_client_seeds.sh` with VDISK_NBD_UPSTREAM=SOCKET VDISK_SEED_OUT=FILE).
#[test]
#[ignore]
fn record_nbd_client_seed() {
    let up = std::env::var("VDISK_NBD_UPSTREAM").expect("VDISK_NBD_UPSTREAM");
    let out = std::env::var("VDISK_SEED_OUT").expect("VDISK_SEED_OUT");
    let got = fuzz_support::nbd_client_record(std::path::Path::new(&up));
    assert!(got.len() > 16, "the server sent {} bytes", got.len());
    std::fs::write(out, got).unwrap();
}

/// The VMDK/VHD/VHDX/VDI seeds are sparse encodings (fuzz/seed.sh) of real qemu-img
/// images: each must decode and open (a descriptor alone cannot: its extents are
/// other files), or the fuzzer would start from garbage.
#[test]
fn sparse_seeds_open() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, format) in fuzz_support::SPARSE_TARGETS {
        let mut n = 0;
        for e in std::fs::read_dir(root.join(name)).unwrap() {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap();
            let r = fuzz_support::open_sparse(*format, &data);
            if p.to_string_lossy().ends_with("-descriptor") {
                assert!(r.is_err(), "{} opens without its extents", p.display());
            } else {
                let img = r.unwrap_or_else(|e| panic!("seed {} does not open: {e}", p.display()));
                assert!(img.size() >= 64 << 10, "{}", p.display()); // VHD rounds to CHS
                n += 1;
            }
        }
        assert!(n >= 2, "too few {name} seeds");
    }
}
