//! Replays the vhost_user fuzz seeds and every crash found as an ordinary test.

#[path = "../../vdisk/tests/fuzz_replay_support/mod.rs"]
mod fuzz_replay_support;
mod fuzz_support;

#[test]
fn vhost_user_fuzz_corpus_replays_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    fuzz_replay_support::replay(&root, fuzz_support::TARGETS);
}

/// The seeds reach the image: a write then the status byte says OK, a read of what a
/// write left, an unsupported type says UNSUPP.
#[test]
fn vhost_user_seeds_reach_the_request_path() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vhost_user");
    let run = |n: &str| fuzz_support::vhost_user_used(&std::fs::read(root.join(n)).unwrap());
    assert_eq!(run("write"), Some((1, 0)));
    assert_eq!(run("read"), Some((513, 0)));
    assert_eq!(run("get_id"), Some((21, 0)));
    assert_eq!(run("discard"), Some((1, 0)));
    assert_eq!(run("unsupported"), Some((1, 2)));
    assert_eq!(run("no_status"), Some((0, 0xaa)));
}
