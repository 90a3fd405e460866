//! Replays the NBD server fuzz seeds (`fuzz/corpus/nbd_server/`) and every crash
//! found (`fuzz/artifacts/nbd_server/`) as an ordinary test.

mod fuzz_support;

use std::path::Path;

#[test]
fn nbd_server_fuzz_corpus_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in fuzz_support::TARGETS {
        let mut seeds = 0;
        for sub in ["corpus", "artifacts"] {
            let Ok(rd) = std::fs::read_dir(root.join(sub).join(name)) else {
                assert_eq!(sub, "artifacts", "missing seed corpus for {name}");
                continue;
            };
            let mut files: Vec<_> = rd.map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files.iter().filter(|f| f.is_file()) {
                let data = std::fs::read(f).unwrap();
                let r = std::panic::catch_unwind(|| target(&data));
                assert!(r.is_ok(), "fuzz target {name} panics on {}", f.display());
                seeds += (sub == "corpus") as usize;
            }
        }
        assert!(seeds > 0, "no seeds for {name}");
    }
}
