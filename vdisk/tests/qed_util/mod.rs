//! Helpers shared by the QED tests: running qemu tools, making images, RNG.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use vdisk::format::qed::Qed;
use vdisk::format::{BackingSpec, Driver, DriverOptions, Format};
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Image, OpenOptions};

#[path = "../oracle/mod.rs"]
mod oracle;
pub use oracle::{p, run, run_status};

/// `qemu-img check --output=json` parsed, and its exit code.
pub fn qemu_check(path: &Path) -> (i32, serde_json::Value) {
    let (code, out, err) = run_status(
        "qemu-img",
        &["check", "--output=json", "-f", "qed", p(path)],
    );
    let v = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("qemu-img check output {out:?} {err}: {e}"));
    (code, v)
}

/// Asserts qemu-img check finds no errors and no leaks.
pub fn assert_qemu_clean(path: &Path) {
    let (code, out, err) = run_status("qemu-img", &["check", "-f", "qed", p(path)]);
    assert_eq!(code, 0, "qemu-img check {}: {out}{err}", path.display());
}

/// The raw guest contents according to qemu-img convert.
pub fn qemu_raw(path: &Path, fmt: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.raw");
    run(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", p(path), p(&out)],
    );
    std::fs::read(&out).expect("read converted")
}

/// Opens a file image read-write (or read-only) with vdisk.
///
/// Retries briefly on lock conflicts: a qemu tool spawned by a parallel test holds
/// inherited descriptors (and so their OFD locks) between fork and exec.
pub fn open(path: &Path, read_only: bool) -> Image {
    open_with(
        path,
        &OpenOptions {
            read_only,
            ..OpenOptions::default()
        },
    )
}

/// [`open`] with explicit options.
pub fn open_with(path: &Path, opts: &OpenOptions) -> Image {
    let mut tries = 0;
    loop {
        match Image::open(path, opts) {
            Ok(i) => return i,
            Err(e) if tries < 50 && e.to_string().contains("lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("vdisk open {}: {e}", path.display()),
        }
    }
}

/// Reads a whole image through vdisk.
pub fn vdisk_read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).expect("vdisk read");
    buf
}

/// Header feature bits of a QED file.
pub fn features(path: &Path) -> u64 {
    let b = std::fs::read(path).expect("read image");
    u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"))
}

/// A small deterministic PRNG (xorshift) so failures reproduce from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Creates a QED image in memory with vdisk and returns the storage.
pub fn mem_qed(size: u64, opts: &[(&str, &str)], backing: Option<BackingSpec>) -> Arc<MemStorage> {
    let st = Arc::new(MemStorage::new());
    let dyn_st: Arc<dyn Storage> = st.clone();
    vdisk::format::qed::create(
        &dyn_st,
        &vdisk::format::CreateSpec {
            size,
            backing,
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
    )
    .expect("create qed");
    st
}

/// Opens a QED driver on a storage, resolving any backing name to `backing`.
pub fn open_mem(
    st: Arc<dyn Storage>,
    opts: &DriverOptions,
    backing: Option<Arc<dyn Driver>>,
) -> vdisk::Result<Qed> {
    Qed::open(st, opts, &mut |_s: &BackingSpec| {
        backing
            .clone()
            .ok_or_else(|| vdisk::Error::from(vdisk::error::Invalid::BackingDisabled))
    })
}

/// A raw in-memory image usable as a backing driver.
pub fn raw_backing(data: Vec<u8>) -> Arc<dyn Driver> {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(data));
    vdisk::format::open(
        Format::Raw,
        st,
        &DriverOptions::default(),
        &mut |_s: &BackingSpec| Err(vdisk::error::Invalid::BackingDisabled.into()),
    )
    .expect("open raw backing")
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn path_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}
