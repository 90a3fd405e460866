//! Replays every fuzz seed (`fuzz/corpus/TARGET/`) and every crash the fuzzers found
//! (`fuzz/artifacts/TARGET/`) through the targets' bodies, so `cargo test` on the
//! stable toolchain covers them without libFuzzer. A target that panics fails here.

mod fuzz_support;

use std::path::Path;

#[test]
fn fuzz_corpora_and_crashes_replay_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut seen = 0;
    for (name, target) in fuzz_support::TARGETS {
        let mut seeds = 0;
        for sub in ["corpus", "artifacts"] {
            let dir = root.join(sub).join(name);
            let Ok(rd) = std::fs::read_dir(&dir) else {
                assert_eq!(sub, "artifacts", "missing seed corpus {}", dir.display());
                continue;
            };
            let mut files: Vec<_> = rd.map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files.iter().filter(|f| f.is_file()) {
                let data = std::fs::read(f).unwrap();
                let r = std::panic::catch_unwind(|| target(&data));
                assert!(r.is_ok(), "fuzz target {name} panics on {}", f.display());
                seeds += (sub == "corpus") as usize;
                seen += 1;
            }
        }
        assert!(seeds > 0, "no seeds for {name}");
    }
    assert!(seen > 0);
}
