//! Replays every fuzz seed and every crash the fuzzers found for the image targets,
//! so `cargo test` on the stable toolchain covers them without libFuzzer.

mod fuzz_replay_support;
mod fuzz_support;

#[test]
fn fuzz_corpora_and_crashes_replay_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    fuzz_replay_support::replay(&root, fuzz_support::TARGETS);
}
