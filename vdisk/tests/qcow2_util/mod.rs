//! Shared helpers for the qcow2 tests: qemu-img / qemu-io oracles and image access.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use vdisk::format::DriverOptions;
use vdisk::{Image, OpenOptions};

#[path = "../oracle/mod.rs"]
mod oracle;
pub use oracle::{p, run, run_status};

/// `qemu-img create -f qcow2 -o <opts> path size`.
pub fn qemu_create(path: &Path, opts: &str, size: &str) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.push("-o");
        a.push(opts);
    }
    a.push(p(path));
    a.push(size);
    run("qemu-img", &a);
}

/// Runs qemu-io commands on an image.
pub fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut a = vec!["-f", "qcow2"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(p(path));
    run("qemu-io", &a);
}

/// The guest contents as qemu-img sees them.
pub fn qemu_raw(path: &Path) -> Vec<u8> {
    let out = path.with_extension("oracle.raw");
    run("qemu-img", &["convert", "-O", "raw", p(path), p(&out)]);
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

/// `qemu-img check --output=json` parsed, with its exit code.
pub fn qemu_check(path: &Path) -> (i32, serde_json::Value) {
    let (code, out, err) = check_status(&["check", "--output=json", p(path)]);
    let v = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("check output not json ({e}): {out} {err}"));
    (code, v)
}

/// Runs `qemu-img ARGS`, once more after a moment if the image's lock was taken: a
/// process another test thread is spawning holds the parent's descriptors (and so
/// their OFD locks) from fork until its exec closes them. A lock that stays is still
/// reported.
fn check_status(args: &[&str]) -> (i32, String, String) {
    let r = run_status("qemu-img", args);
    if r.0 != 0 && r.2.contains("lock") {
        std::thread::sleep(std::time::Duration::from_millis(200));
        return run_status("qemu-img", args);
    }
    r
}

/// Asserts `qemu-img check` finds no corruption and no leak.
pub fn assert_clean(path: &Path) {
    let (code, out, err) = check_status(&["check", p(path)]);
    assert_eq!(code, 0, "qemu-img check {}: {out}{err}", path.display());
}

/// Opens an image with vdisk.
pub fn open(path: &Path, rw: bool) -> Image {
    Image::open(
        path,
        &OpenOptions {
            read_only: !rw,
            locking: false,
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("vdisk open {}: {e}", path.display()))
}

/// Opens with specific driver options.
pub fn open_with(path: &Path, rw: bool, d: DriverOptions) -> vdisk::Result<Image> {
    Image::open(
        path,
        &OpenOptions {
            read_only: !rw,
            locking: false,
            driver: d,
            ..OpenOptions::default()
        },
    )
}

/// Reads the whole guest disk through vdisk.
pub fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    let chunk = 1 << 20;
    let mut off = 0;
    while off < v.len() {
        let n = chunk.min(v.len() - off);
        img.read_at(&mut v[off..off + n], off as u64).unwrap();
        off += n;
    }
    v
}

/// Creates an image with vdisk.
pub fn vdisk_create(path: &Path, size: u64, opts: &[(&str, &str)], backing: Option<(&str, &str)>) {
    Image::create(
        path,
        &vdisk::CreateOptions {
            format: vdisk::Format::Qcow2,
            size: Some(size),
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            backing_file: backing.map(|b| b.0.to_string()),
            backing_format: backing.map(|b| vdisk::Format::parse(b.1).unwrap()),
            unsafe_backing: false,
        },
    )
    .unwrap_or_else(|e| panic!("vdisk create {}: {e}", path.display()));
}

/// First differing offset of two buffers, for readable assertion messages.
pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!(
            "{what}: first difference at byte {i} (cluster-ish {:#x}): {} vs {}",
            i, a[i], b[i]
        );
    }
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path(d: &tempfile::TempDir, name: &str) -> PathBuf {
    d.path().join(name)
}
