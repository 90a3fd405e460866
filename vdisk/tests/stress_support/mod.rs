//! The deterministic concurrency stress shared by `vdisk/tests/stress.rs` (the engine,
//! one image shared by the threads) and `vdisk-cli/tests/nbd_stress.rs` (the same
//! plans over many NBD connections to `vdisk serve`): seeded plans, their execution,
//! and the verification through vdisk, `qemu-img check` and `qemu-img convert`.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use vdisk::{Image, OpenOptions, ZeroFlags};

pub const SIZE: u64 = 1 << 20;
const SECTOR: u64 = 512;
const CLUSTER: u64 = 4096;
pub const THREADS: usize = 4;
const OPS_PER_THREAD: usize = 48;
const BACKING_BYTE: u8 = 0x5a;
/// The seeds CI runs for each configuration.
pub const SEEDS: u64 = 24;

/// splitmix64: a small deterministic generator (no dependency, stable across versions).
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub name: &'static str,
    pub fmt: &'static str,
    pub opts: &'static str,
    pub backing: bool,
    pub compressed: bool,
    /// One more thread grows the disk while the others write (where the transport
    /// can resize: not over NBD).
    pub grow: bool,
}

pub const CONFIGS: &[Config] = &[
    Config {
        name: "qcow2",
        fmt: "qcow2",
        opts: "cluster_size=4096",
        backing: false,
        compressed: false,
        grow: false,
    },
    Config {
        name: "qcow2-backing",
        fmt: "qcow2",
        opts: "cluster_size=4096",
        backing: true,
        compressed: false,
        grow: false,
    },
    Config {
        name: "qcow2-compressed",
        fmt: "qcow2",
        opts: "cluster_size=4096",
        backing: false,
        compressed: true,
        grow: false,
    },
    Config {
        name: "qed",
        fmt: "qed",
        opts: "cluster_size=4096,table_size=2",
        backing: false,
        compressed: false,
        grow: false,
    },
    Config {
        name: "qed-backing",
        fmt: "qed",
        opts: "cluster_size=4096,table_size=2",
        backing: true,
        compressed: false,
        grow: false,
    },
    Config {
        name: "qcow2-grow",
        fmt: "qcow2",
        opts: "cluster_size=4096",
        backing: false,
        compressed: false,
        grow: true,
    },
    Config {
        name: "qcow2-extl2",
        fmt: "qcow2",
        opts: "cluster_size=16384,extended_l2=on",
        backing: false,
        compressed: false,
        grow: false,
    },
    Config {
        name: "qcow2-extl2-backing-grow",
        fmt: "qcow2",
        opts: "cluster_size=16384,extended_l2=on",
        backing: true,
        compressed: false,
        grow: true,
    },
    Config {
        name: "qed-grow",
        fmt: "qed",
        opts: "cluster_size=4096,table_size=2",
        backing: false,
        compressed: false,
        grow: true,
    },
];

#[derive(Clone, Copy, Debug)]
pub enum Op {
    Write(u8),
    Zero(bool),
    Discard,
    Compressed(u8),
    Read,
    Flush,
}

/// One thread's plan: (run index, op) pairs.
pub type Plan = Vec<(usize, Op)>;

/// Runs as (offset, len) and their owners, and each thread's plan, from the seed.
pub fn plan(seed: u64, c: Config) -> (Vec<(u64, u64)>, Vec<usize>, Vec<Plan>) {
    plan_for(seed, c, THREADS)
}

/// [`plan`] for `threads` threads.
pub fn plan_for(seed: u64, c: Config, threads: usize) -> (Vec<(u64, u64)>, Vec<usize>, Vec<Plan>) {
    let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x1234);
    let mut runs = Vec::new();
    let mut off = 0;
    // Compressed writes take whole clusters: those runs are whole clusters.
    let unit = if c.compressed { CLUSTER } else { SECTOR };
    while off < SIZE {
        let max = if c.compressed { 1 } else { 16 };
        let len = ((1 + rng.below(max)) * unit).min(SIZE - off);
        runs.push((off, len));
        off += len;
    }
    let owners: Vec<usize> = runs
        .iter()
        .map(|_| rng.below(threads as u64) as usize)
        .collect();
    let mut plans = vec![Vec::new(); threads];
    for (t, p) in plans.iter_mut().enumerate() {
        let mine: Vec<usize> = (0..runs.len()).filter(|&i| owners[i] == t).collect();
        if mine.is_empty() {
            continue;
        }
        for k in 0..OPS_PER_THREAD {
            let r = mine[rng.below(mine.len() as u64) as usize];
            let pat = (1 + (t * OPS_PER_THREAD + k) % 250) as u8;
            let op = match rng.below(16) {
                0..=6 => Op::Write(pat),
                7 | 8 => Op::Zero(rng.below(2) == 0),
                9 | 10 => Op::Discard,
                11 | 12 if c.compressed => Op::Compressed(pat),
                11 | 12 => Op::Write(pat),
                13 | 14 => Op::Read,
                _ => Op::Flush,
            };
            p.push((r, op));
        }
    }
    (runs, owners, plans)
}

/// What each run may read as at the end: one value, or any of several after a
/// discard that was not overwritten.
pub fn expected(c: Config, runs: usize, plans: &[Plan]) -> Vec<Vec<u8>> {
    let base = if c.backing { BACKING_BYTE } else { 0 };
    let mut exp = vec![vec![base]; runs];
    for p in plans {
        for &(r, op) in p {
            match op {
                Op::Write(v) | Op::Compressed(v) => exp[r] = vec![v],
                Op::Zero(_) => exp[r] = vec![0],
                Op::Discard => {
                    for v in [0, base] {
                        if !exp[r].contains(&v) {
                            exp[r].push(v);
                        }
                    }
                }
                Op::Read | Op::Flush => {}
            }
        }
    }
    exp
}

pub fn must(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// How the threads reach the image: one shared `Image`, or one NBD connection each.
pub trait Transport {
    /// Opens what thread `t` of `threads` uses on `img` (`fmt`); the guard (a server)
    /// lives until the run is verified locally.
    fn connect(
        &self,
        img: &Path,
        fmt: &str,
        threads: usize,
    ) -> (Vec<Arc<Image>>, Box<dyn std::any::Any>);
    /// How many writer threads the plans have.
    fn threads(&self) -> usize {
        THREADS
    }
}

/// Every thread shares one open image (the engine's own concurrency).
pub struct Shared;

impl Transport for Shared {
    fn connect(
        &self,
        img: &Path,
        _fmt: &str,
        threads: usize,
    ) -> (Vec<Arc<Image>>, Box<dyn std::any::Any>) {
        let image = Arc::new(
            Image::open(
                img,
                &OpenOptions {
                    locking: false,
                    ..OpenOptions::default()
                },
            )
            .unwrap(),
        );
        (vec![image; threads], Box::new(()))
    }
}

/// The grower's steps: the disk grows by 64 KiB at a time, to this many steps.
pub const GROW_STEPS: u64 = 8;
const GROW_STEP: u64 = 64 << 10;

pub fn run_seed(dir: &Path, c: Config, seed: u64, transport: &dyn Transport) {
    let ctx = format!("{} seed {seed} (VDISK_STRESS_SEED={seed})", c.name);
    let img = dir.join(format!("s.{}", c.fmt));
    let _ = std::fs::remove_file(&img);
    let mut o = c.opts.to_string();
    if c.backing {
        let back = dir.join("back.qcow2");
        if !back.exists() {
            must("qemu-img", &["create", "-q", "-f", "qcow2", s(&back), "1M"]);
            must(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("write -P {BACKING_BYTE} 0 1M"),
                    s(&back),
                ],
            );
        }
        o = format!("{o},backing_file={},backing_fmt=qcow2", s(&back));
    }
    must(
        "qemu-img",
        &["create", "-q", "-f", c.fmt, "-o", &o, s(&img), "1M"],
    );
    let (runs, _owners, plans) = plan_for(seed, c, transport.threads());
    let (images, guard) = transport.connect(&img, c.fmt, plans.len());
    std::thread::scope(|sc| {
        if c.grow {
            let image = &images[0];
            let ctx = &ctx;
            sc.spawn(move || {
                for k in 1..=GROW_STEPS {
                    image
                        .resize(SIZE + k * GROW_STEP, false)
                        .unwrap_or_else(|e| panic!("{ctx}: grow step {k}: {e}"));
                    if k % 3 == 0 {
                        image.flush().unwrap();
                    }
                    std::thread::yield_now();
                }
            });
        }
        for (p, image) in plans.iter().zip(&images) {
            let runs = &runs;
            let ctx = &ctx;
            sc.spawn(move || {
                // What this thread last wrote to each of its runs (None: unknown).
                let mut mine: std::collections::HashMap<usize, u8> = Default::default();
                for &(r, op) in p {
                    let (off, len) = runs[r];
                    match op {
                        Op::Write(v) => {
                            image.write_at(&vec![v; len as usize], off).unwrap();
                            mine.insert(r, v);
                        }
                        Op::Compressed(v) => {
                            image.write_compressed(&vec![v; len as usize], off).unwrap();
                            mine.insert(r, v);
                        }
                        Op::Zero(unmap) => {
                            let f = ZeroFlags {
                                may_unmap: unmap,
                                fast: false,
                            };
                            image.write_zeroes(off, len, f).unwrap();
                            mine.insert(r, 0);
                        }
                        Op::Discard => {
                            image.discard(off, len).unwrap();
                            mine.remove(&r);
                        }
                        Op::Read => {
                            let mut b = vec![0u8; len as usize];
                            image.read_at(&mut b, off).unwrap();
                            if let Some(&v) = mine.get(&r) {
                                assert!(
                                    b.iter().all(|&x| x == v),
                                    "{ctx}: run {off}+{len} read back wrong while others wrote"
                                );
                            }
                        }
                        Op::Flush => image.flush().unwrap(),
                    }
                }
            });
        }
    });
    for image in &images {
        image.flush().unwrap();
    }
    drop(images);
    drop(guard);
    let size = if c.grow {
        SIZE + GROW_STEPS * GROW_STEP
    } else {
        SIZE
    };
    let exp = expected(c, runs.len(), &plans);
    // A run reads as one value; after a discard (which may drop whole clusters and
    // keep partial ones) each sector reads as one of the allowed values. Grown space
    // reads as zeroes (past the backing file's end too).
    let verify = |data: &[u8], who: &str| {
        assert_eq!(data.len() as u64, size, "{ctx}: {who} size");
        for (i, &(off, len)) in runs.iter().enumerate() {
            let got = &data[off as usize..(off + len) as usize];
            let unit = if exp[i].len() == 1 { len } else { SECTOR } as usize;
            for (k, sec) in got.chunks(unit).enumerate() {
                let v = sec[0];
                assert!(
                    sec.iter().all(|&x| x == v) && exp[i].contains(&v),
                    "{ctx}: {who} reads run {off}+{len} at +{} as {v:#x}..., expected one of {:?}",
                    k * unit,
                    exp[i]
                );
            }
        }
        if let Some(i) = data[SIZE as usize..].iter().position(|&b| b != 0) {
            panic!(
                "{ctx}: {who} reads grown byte {} as {:#x}",
                SIZE as usize + i,
                data[SIZE as usize + i]
            );
        }
    };
    // Unlocked: the tests run in parallel and spawn processes all the time; a lock
    // taken here could be held a moment longer by a child between fork and exec.
    let image = Image::open(
        &img,
        &OpenOptions {
            locking: false,
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let mut data = vec![0u8; image.size() as usize];
    image.read_at(&mut data, 0).unwrap();
    verify(&data, "vdisk");
    drop(image);
    let o = Command::new("qemu-img")
        .args(["check", s(&img)])
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "{ctx}: qemu-img check: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let raw = dir.join("s.raw");
    must("qemu-img", &["convert", "-O", "raw", s(&img), s(&raw)]);
    verify(&std::fs::read(&raw).unwrap(), "qemu-img");
}

/// The seeds to run: `VDISK_STRESS_SEED=S` one, `VDISK_STRESS_SEEDS=N` 0..N, else
/// `default` of them (CI's fixed set).
pub fn seeds(default: u64) -> Vec<u64> {
    if let Some(s) = std::env::var("VDISK_STRESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return vec![s];
    }
    let n = std::env::var("VDISK_STRESS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    (0..n).collect()
}
