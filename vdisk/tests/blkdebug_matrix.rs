//! Fault injection at every metadata event (issue 14, part 1), QEMU iotests 026-style.
//!
//! For every event × errno (EIO, ENOSPC) × once/always, over one allocating workload
//! (partial-cluster writes with COW, a write across an L2 boundary, a multi-cluster
//! write needing new refcount blocks, zero writes, discards, overwrites in place,
//! flushes) on qcow2 and QED, with and without a backing file, through
//! `blkdebug:CONFIG:IMAGE`:
//! - every failing request fails with the injected errno (never anything else);
//! - the image opens afterwards and `qemu-img check` finds no corruption, and leaks
//!   only where qemu-io running the same workload under the same config leaks too;
//! - every write acknowledged and then flushed reads back (a failed request's sectors
//!   may hold old or new data, and with no successful flush after it neither may an
//!   acknowledged write's);
//! - the events whose step both engines have make a request fail in both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use vdisk::{Image, OpenOptions, ZeroFlags};

const SIZE: u64 = 8 << 20;
const SECTOR: u64 = 512;
const BACKING_BYTE: u8 = 0x33;

/// The events the matrix runs: the list and every event either engine
/// announces on this workload.
const EVENTS: &[&str] = &[
    "l1_update",
    "l2_load",
    "l2_update",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "write_aio",
    "cow_read",
    "cow_write",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "cluster_alloc",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "none",
];

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    Read(u64, u64),
    Zero(u64, u64),
    Discard(u64, u64),
    Flush,
}

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

/// The workload (all offsets sector-aligned, one pattern per write).
const WORKLOAD: &[Op] = &[
    Op::Write(4 * KIB + 512, KIB, 0x11),
    Op::Write(2 * MIB - 2 * KIB, 4 * KIB, 0x12),
    Op::Read(0, 64 * KIB),
    Op::Flush,
    Op::Write(4 * MIB, 2 * MIB + 512 * KIB, 0x13),
    Op::Zero(MIB, 64 * KIB),
    Op::Discard(4 * MIB + 64 * KIB, 64 * KIB),
    Op::Write(4 * KIB, 512, 0x14),
    Op::Read(2 * MIB - 4 * KIB, 8 * KIB),
    Op::Flush,
    Op::Write(7 * MIB, 8 * KIB, 0x15),
];

fn qemu_io_cmd(op: Op) -> String {
    match op {
        Op::Write(o, l, p) => format!("write -P {p} {o} {l}"),
        Op::Read(o, l) => format!("read {o} {l}"),
        Op::Zero(o, l) => format!("write -z {o} {l}"),
        Op::Discard(o, l) => format!("discard {o} {l}"),
        Op::Flush => "flush".into(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fmt {
    Qcow2,
    Qed,
}

impl Fmt {
    fn name(self) -> &'static str {
        match self {
            Fmt::Qcow2 => "qcow2",
            Fmt::Qed => "qed",
        }
    }
    /// Small clusters and tables so the workload crosses L2 tables and (qcow2, 64-bit
    /// refcounts: one 4 KiB block covers 2 MiB) allocates refcount blocks.
    fn opts(self) -> &'static str {
        match self {
            Fmt::Qcow2 => "cluster_size=4096,refcount_bits=64",
            Fmt::Qed => "cluster_size=4096,table_size=2",
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (qemu-utils 10 is the oracle): {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn must(cmd: &str, args: &[&str]) {
    let (code, out, err) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?}: {out}{err}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The base images of one format: (without backing, with backing).
fn bases(dir: &Path, f: Fmt) -> (PathBuf, PathBuf) {
    let plain = dir.join(format!("plain.{}", f.name()));
    must(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            f.name(),
            "-o",
            f.opts(),
            s(&plain),
            "8M",
        ],
    );
    let back = dir.join(format!("back.{}", f.name()));
    must("qemu-img", &["create", "-q", "-f", "qcow2", s(&back), "8M"]);
    must(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {BACKING_BYTE} 0 8M"),
            s(&back),
        ],
    );
    let over = dir.join(format!("over.{}", f.name()));
    let o = format!("{},backing_file={},backing_fmt=qcow2", f.opts(), s(&back));
    must(
        "qemu-img",
        &["create", "-q", "-f", f.name(), "-o", &o, s(&over)],
    );
    (plain, over)
}

/// What each sector may read as.
#[derive(Clone)]
struct Model {
    /// If every acknowledged request reached the disk.
    acked: Vec<Vec<u8>>,
    /// Everything possible since the last successful flush.
    pending: Vec<Vec<u8>>,
    backing: bool,
}

impl Model {
    fn new(backing: bool) -> Model {
        let init = vec![if backing { BACKING_BYTE } else { 0 }];
        let n = (SIZE / SECTOR) as usize;
        Model {
            acked: vec![init.clone(); n],
            pending: vec![init; n],
            backing,
        }
    }
    fn sectors(o: u64, l: u64) -> std::ops::Range<usize> {
        (o / SECTOR) as usize..((o + l) / SECTOR) as usize
    }
    fn add(set: &mut Vec<u8>, v: u8) {
        if !set.contains(&v) {
            set.push(v);
        }
    }
    fn apply(&mut self, op: Op, ok: bool) {
        let (range, vals): (_, Vec<u8>) = match op {
            Op::Write(o, l, p) => (Self::sectors(o, l), vec![p]),
            Op::Zero(o, l) => (Self::sectors(o, l), vec![0]),
            Op::Discard(o, l) => (
                Self::sectors(o, l),
                if self.backing {
                    vec![0, BACKING_BYTE]
                } else {
                    vec![0]
                },
            ),
            Op::Read(..) => return,
            Op::Flush => {
                if ok {
                    self.pending = self.acked.clone();
                }
                return;
            }
        };
        let discard = matches!(op, Op::Discard(..));
        for i in range {
            for &v in &vals {
                Self::add(&mut self.pending[i], v);
            }
            if ok && !discard {
                self.acked[i] = vals.clone();
            } else {
                // A failed request may have landed or not; a discard may leave the data.
                for &v in &vals {
                    Self::add(&mut self.acked[i], v);
                }
            }
        }
    }
    /// The first sector whose contents are not allowed.
    fn verify(&self, data: &[u8], flushed: bool) -> Result<(), String> {
        let allowed = if flushed { &self.acked } else { &self.pending };
        for (i, sec) in data.chunks(SECTOR as usize).enumerate() {
            let v = sec[0];
            if !sec.iter().all(|&b| b == v) || !allowed[i].contains(&v) {
                return Err(format!(
                    "sector {i} (offset {}) reads {:?}..., allowed {:?}",
                    i as u64 * SECTOR,
                    &sec[..4],
                    allowed[i]
                ));
            }
        }
        Ok(())
    }
}

#[derive(Default, Debug)]
struct Outcome {
    /// Requests that failed (step index, errno); `usize::MAX` is the open, `len` the close.
    failed: Vec<(usize, i32)>,
}

fn config(dir: &Path, event: &str, errno: i32, once: bool) -> PathBuf {
    let p = dir.join("rule.cfg");
    std::fs::write(
        &p,
        format!(
            "[inject-error]\nevent = \"{event}\"\nerrno = \"{errno}\"\nonce = \"{}\"\nimmediately = \"off\"\n",
            if once { "on" } else { "off" }
        ),
    )
    .unwrap();
    p
}

/// Runs the workload with vdisk through blkdebug; returns what failed and the model.
fn run_vdisk(img: &Path, cfg: &Path, backing: bool) -> (Outcome, Model, bool) {
    let mut model = Model::new(backing);
    let mut out = Outcome::default();
    let name = format!("blkdebug:{}:{}", s(cfg), s(img));
    let opts = OpenOptions {
        locking: false,
        ..OpenOptions::default()
    };
    let image = match Image::open(&name, &opts) {
        Ok(i) => i,
        Err(e) => {
            out.failed.push((usize::MAX, e.errno()));
            return (out, model, true);
        }
    };
    for (k, &op) in WORKLOAD.iter().enumerate() {
        let r = match op {
            Op::Write(o, l, p) => image.write_at(&vec![p; l as usize], o),
            Op::Read(o, l) => image.read_at(&mut vec![0; l as usize], o),
            Op::Zero(o, l) => image.write_zeroes(o, l, ZeroFlags::default()),
            Op::Discard(o, l) => image.discard(o, l),
            Op::Flush => image.flush(),
        };
        if let Err(e) = &r {
            out.failed.push((k, e.errno()));
        }
        model.apply(op, r.is_ok());
    }
    let closed = image.close();
    if let Err(e) = &closed {
        out.failed.push((WORKLOAD.len(), e.errno()));
    }
    drop(image);
    (out, model, closed.is_ok())
}

/// Runs the workload with qemu-io through blkdebug; whether any request failed.
fn run_qemu(img: &Path, cfg: &Path) -> bool {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    args.clear();
    for op in WORKLOAD {
        args.push("-c".into());
        args.push(qemu_io_cmd(*op));
    }
    args.push(format!("blkdebug:{}:{}", s(cfg), s(img)));
    let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    let (code, out, err) = run("qemu-io", &a);
    code != 0 || out.contains("failed") || err.contains("failed") || err.contains("can't open")
}

/// `qemu-img check --output=json`: (corruptions, leaks), or why it could not check.
fn check(img: &Path) -> Result<(u64, u64), String> {
    let (code, out, err) = run("qemu-img", &["check", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| format!("qemu-img check ({code}): {e}: {out}{err}"))?;
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    if n("check-errors") != 0 {
        return Err(format!("qemu-img check errors: {out}"));
    }
    Ok((n("corruptions"), n("leaks")))
}

fn read_all(img: &Path) -> Result<Vec<u8>, String> {
    let i = Image::open(
        img,
        &OpenOptions {
            read_only: true,
            locking: false,
            ..OpenOptions::default()
        },
    )
    .map_err(|e| format!("does not open after the fault: {e}"))?;
    let mut v = vec![0; SIZE as usize];
    i.read_at(&mut v, 0)
        .map_err(|e| format!("does not read after the fault: {e}"))?;
    Ok(v)
}

/// Where vdisk leaks and qemu-io does not, and why that is the safe side. Leaks are
/// clusters counted but unreferenced: harmless (`check -r leaks` reclaims them) and
/// never a loss of data; each case here is explained, anything else fails.
fn leak_divergence(f: Fmt, event: &str, once: bool) -> Option<&'static str> {
    match (f, event, once) {
        // vdisk keeps new L2 tables and entries in its cache until a flush, after the
        // refcounts (crash rule: counted before referenced). When every later write
        // fails, the counted clusters can never be referenced. qemu-io writes a new
        // L2 table at once, and its failure there comes before its refcount write.
        (Fmt::Qcow2, "l2_update" | "write_aio", false) => Some("deferred L2 write-back"),
        // Discarded clusters are released after the L2 update is durable; when every
        // later write fails, the decrements never reach the disk.
        (Fmt::Qcow2, "cluster_free", false) => Some("deferred frees"),
        // A new refcount block whose write fails gives its counted cluster back in
        // the cache, after the count reached the disk; every later write fails.
        (Fmt::Qcow2, "refblock_alloc_write", false) => Some("undone in cache only"),
        // The refcount table entry may have reached the disk although its write
        // failed: the new block's cluster stays counted rather than risk being reused
        // while the entry points at it.
        (Fmt::Qcow2, "refblock_alloc_hookup", true) => Some("failed hookup keeps its block"),
        _ => None,
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Fired {
    vdisk: bool,
    qemu: bool,
}

fn matrix(f: Fmt) -> BTreeMap<(String, bool), Fired> {
    let dir = tempfile::tempdir().unwrap();
    let (plain, over) = bases(dir.path(), f);
    let mut fired: BTreeMap<(String, bool), Fired> = BTreeMap::new();
    let mut failures = Vec::new();
    for event in EVENTS {
        for errno in [libc::EIO, libc::ENOSPC] {
            for once in [true, false] {
                for (backing, base) in [(false, &plain), (true, &over)] {
                    let case = format!(
                        "{} {event} errno={errno} once={once} backing={backing}",
                        f.name()
                    );
                    let cfg = config(dir.path(), event, errno, once);
                    let img = dir.path().join("v.img");
                    std::fs::copy(base, &img).unwrap();
                    let (out, model, closed) = run_vdisk(&img, &cfg, backing);
                    for &(step, e) in &out.failed {
                        if e != errno {
                            failures.push(format!("{case}: step {step} failed with errno {e}"));
                        }
                    }
                    let (corrupt, leaks) = match check(&img) {
                        Ok(c) => c,
                        Err(e) => {
                            failures.push(format!("{case}: {e}"));
                            continue;
                        }
                    };
                    match read_all(&img) {
                        Ok(data) => {
                            if let Err(e) = model.verify(&data, closed) {
                                failures.push(format!("{case}: {e}"));
                            }
                        }
                        Err(e) => failures.push(format!("{case}: {e}")),
                    }
                    let q = dir.path().join("q.img");
                    std::fs::copy(base, &q).unwrap();
                    let qemu_failed = run_qemu(&q, &cfg);
                    let qleaks = check(&q).map(|c| c.1).unwrap_or(0);
                    if corrupt > 0 {
                        failures.push(format!("{case}: {corrupt} corruptions"));
                    }
                    if leaks > 0 && qleaks == 0 && leak_divergence(f, event, once).is_none() {
                        failures.push(format!(
                            "{case}: {leaks} leaked clusters where qemu-io leaks none"
                        ));
                    }
                    let e = fired.entry((event.to_string(), backing)).or_default();
                    e.vdisk |= !out.failed.is_empty();
                    e.qemu |= qemu_failed;
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    fired
}

fn assert_fires(f: Fmt, fired: &BTreeMap<(String, bool), Fired>, both: &[&str]) {
    let table: Vec<String> = fired
        .iter()
        .map(|((e, b), x)| format!("{e} backing={b}: vdisk={} qemu={}", x.vdisk, x.qemu))
        .collect();
    eprintln!("{} events fired:\n{}", f.name(), table.join("\n"));
    for e in both {
        for b in [false, true] {
            let x = fired[&(e.to_string(), b)];
            assert!(
                x.vdisk && x.qemu,
                "{} {e} backing={b}: vdisk fired {} qemu fired {}",
                f.name(),
                x.vdisk,
                x.qemu
            );
        }
    }
}

#[test]
fn qcow2_event_matrix() {
    let fired = matrix(Fmt::Qcow2);
    assert_fires(
        Fmt::Qcow2,
        &fired,
        &[
            "l1_update",
            "l2_update",
            "l2_alloc_write",
            "write_aio",
            "refblock_load",
            "refblock_update_part",
            "cluster_alloc",
            "flush_to_os",
            "flush_to_disk",
            "pwritev",
            "pwritev_done",
            "none",
        ],
    );
}

#[test]
fn qed_event_matrix() {
    let fired = matrix(Fmt::Qed);
    assert_fires(
        Fmt::Qed,
        &fired,
        &[
            "l1_update",
            "l2_update",
            "write_aio",
            "flush_to_os",
            "flush_to_disk",
            "pwritev",
            "pwritev_done",
            "none",
        ],
    );
}
