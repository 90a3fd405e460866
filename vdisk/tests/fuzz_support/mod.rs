//! The fuzz targets' bodies (issue 14, part 2), shared by the libFuzzer binaries in
//! `fuzz/` and by `tests/fuzz_replay.rs`, which replays every seed and every crash
//! found as an ordinary test (no nightly toolchain, no libFuzzer needed).
//!
//! A target must never panic, hang or allocate without bound on any input: every
//! error is a normal `Err`.
#![allow(dead_code)]

use std::sync::Arc;
use vdisk::format::DriverOptions;
use vdisk::storage::{LockMode, MemStorage, Storage, StorageError, StorageResult};
use vdisk::{Format, Image, Repair, ZeroFlags};

/// Largest file a target lets an image grow to (a corrupt table may point anywhere).
const CAP: u64 = 64 << 20;

/// An in-memory file that refuses to grow past [`CAP`] (ENOSPC), so hostile offsets
/// cannot make the target allocate gigabytes.
#[derive(Debug)]
struct Capped(MemStorage);

fn full() -> StorageError {
    std::io::Error::from_raw_os_error(libc::ENOSPC).into()
}

impl Storage for Capped {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        if offset.saturating_add(buf.len() as u64) > CAP {
            return Err(full());
        }
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> StorageResult<()> {
        self.0.flush()
    }
    fn len(&self) -> StorageResult<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> StorageResult<()> {
        if len > CAP {
            return Err(full());
        }
        self.0.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.0
            .punch_hole(offset, len.min(CAP.saturating_sub(offset)))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        if offset.saturating_add(len) > CAP {
            return Err(full());
        }
        self.0.write_zeroes(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()> {
        if offset.saturating_add(len) > CAP {
            return Err(full());
        }
        self.0.allocate(offset, len)
    }
    fn relock(&self, _mode: LockMode) -> StorageResult<()> {
        Ok(())
    }
}

/// Open the bytes as `format`, read, write, zero, discard, flush, check and repair;
/// every step may fail, none may panic.
fn image(format: Format, data: &[u8]) {
    let st: Arc<dyn Storage> = Arc::new(Capped(MemStorage::from_vec(data.to_vec())));
    let Ok(img) = Image::open_storage(st, format, &DriverOptions::default()) else {
        return;
    };
    let size = img.size();
    let mut buf = vec![0u8; 64 << 10];
    for off in [0, size / 3, size.saturating_sub(4096)] {
        let n = (buf.len() as u64).min(size.saturating_sub(off)) as usize;
        let _ = img.read_at(&mut buf[..n], off);
    }
    let _ = img.block_status(0, size.min(1 << 30));
    let w = vec![0xa5u8; 4096];
    for off in [0, 512, size / 2] {
        let n = (w.len() as u64).min(size.saturating_sub(off)) as usize;
        let _ = img.write_at(&w[..n], off);
    }
    let _ = img.write_zeroes(0, size.min(8192), ZeroFlags::default());
    let _ = img.discard(size / 4, size.min(65536).min(size - size / 4));
    let _ = img.flush();
    let _ = img.check(Repair::default());
    let _ = img.check(Repair {
        leaks: true,
        errors: true,
    });
    let n = buf.len().min(size as usize);
    let _ = img.read_at(&mut buf[..n], 0);
    let _ = img.close();
}

/// qcow2: header, extensions, L1/L2, refcounts, snapshot table, bitmap directory,
/// LUKS header, as they reach open + I/O + check.
pub fn qcow2(data: &[u8]) {
    image(Format::Qcow2, data);
}

/// QED: header, L1/L2, need-check repair on open.
pub fn qed(data: &[u8]) {
    image(Format::Qed, data);
}

/// VMDK: sparse header, grain directory and tables, streamOptimized markers and
/// deflate grains, the embedded or stand-alone descriptor (a descriptor's extent
/// files cannot be opened from memory, so its parser is what gets fuzzed there).
pub fn vmdk(data: &[u8]) {
    if let Some(file) = sparse_file(data) {
        image(Format::Vmdk, &file);
    }
}

/// VHD (vpc): footer, dynamic header, BAT, sector bitmaps.
pub fn vpc(data: &[u8]) {
    if let Some(file) = sparse_file(data) {
        image(Format::Vpc, &file);
    }
}

/// VDI: header, block map.
pub fn vdi(data: &[u8]) {
    if let Some(file) = sparse_file(data) {
        image(Format::Vdi, &file);
    }
}

/// VHDX: headers, region tables, log (replay on open), metadata region, BAT.
///
/// The files of these four formats are mostly zeros (a VHDX is several MiB), so
/// their targets' input is a sparse file, see [`sparse_file`].
pub fn vhdx(data: &[u8]) {
    if let Some(file) = sparse_file(data) {
        image(Format::Vhdx, &file);
    }
}

/// Expands a sparse-file encoding: a `u32` LE file length in 512-byte sectors (at most
/// [`CAP`]), then segments of `u32` LE byte offset, `u16` LE length and that many
/// bytes, written in order (clipped to the file). `fuzz/seed.sh` encodes the seeds.
pub fn sparse_file(data: &[u8]) -> Option<Vec<u8>> {
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let sectors = le32(data.get(..4)?) as u64;
    let len = sectors.checked_mul(512)?;
    if len > CAP {
        return None;
    }
    let mut file = vec![0u8; len as usize];
    let mut rest = &data[4..];
    while rest.len() >= 6 {
        let off = le32(rest) as usize;
        let n = u16::from_le_bytes([rest[4], rest[5]]) as usize;
        let bytes = &rest[6..(6 + n).min(rest.len())];
        rest = &rest[6 + bytes.len()..];
        if off < file.len() {
            let end = (off + bytes.len()).min(file.len());
            file[off..end].copy_from_slice(&bytes[..end - off]);
        }
    }
    Some(file)
}

/// The format of each sparse-encoded target, for the seed test.
pub const SPARSE_TARGETS: &[(&str, Format)] = &[
    ("vmdk", Format::Vmdk),
    ("vpc", Format::Vpc),
    ("vhdx", Format::Vhdx),
    ("vdi", Format::Vdi),
];

/// Opens a sparse-encoded seed as `format` (the seed test: seeds must be images).
pub fn open_sparse(format: Format, data: &[u8]) -> vdisk::Result<Image> {
    let file = sparse_file(data)
        .ok_or_else(|| vdisk::Error::from(std::io::Error::other("bad sparse-file encoding")))?;
    let st: Arc<dyn Storage> = Arc::new(Capped(MemStorage::from_vec(file)));
    Image::open_storage(st, format, &DriverOptions::default())
}

/// A target's body.
pub type Target = fn(&[u8]);

/// The targets by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[
    ("qcow2", qcow2),
    ("qed", qed),
    ("vmdk", vmdk),
    ("vpc", vpc),
    ("vhdx", vhdx),
    ("vdi", vdi),
];
