//! Replays every fuzz seed and every crash the fuzzers found for the image targets,
//! so `cargo test` on the stable toolchain covers them without libFuzzer.

mod fuzz_replay_support;
mod fuzz_support;

#[test]
fn fuzz_corpora_and_crashes_replay_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    fuzz_replay_support::replay(&root, fuzz_support::TARGETS);
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
