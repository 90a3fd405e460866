//! Replays fuzz inputs through target bodies: `fuzz/corpus/TARGET/` (the seeds, which
//! must exist) and `fuzz/artifacts/TARGET/` (every crash found, kept with its fix).
//! Shared by the replay tests of `vdisk` and `vdisk-nbd`.

use std::path::Path;

/// A fuzz target: its name (the corpus directory) and its body.
pub type Target<'a> = (&'a str, fn(&[u8]));

/// Runs every seed and artifact of each `(name, body)`; a panic fails, naming the file.
pub fn replay(fuzz_dir: &Path, targets: &[Target<'_>]) {
    for (name, target) in targets {
        let mut seeds = 0;
        for sub in ["corpus", "artifacts"] {
            let dir = fuzz_dir.join(sub).join(name);
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
            }
        }
        assert!(seeds > 0, "no seeds for {name}");
    }
}
