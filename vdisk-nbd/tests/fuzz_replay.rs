//! Replays the NBD server fuzz seeds and every crash found as an ordinary test.

#[path = "../../vdisk/tests/fuzz_replay_support/mod.rs"]
mod fuzz_replay_support;
mod fuzz_support;

#[test]
fn nbd_server_fuzz_corpus_replays_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    fuzz_replay_support::replay(&root, fuzz_support::TARGETS);
}
