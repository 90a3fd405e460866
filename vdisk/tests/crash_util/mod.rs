//! Shared pieces of the crash simulations: the model of what each flush made durable,
//! and the check that a crash image still holds it.
#![allow(dead_code)]

use std::sync::Arc;
use vdisk::format::DriverOptions;
use vdisk::storage::MemStorage;
use vdisk::{Format, Image};

/// Opens qcow2 image bytes (a crash image) in memory.
pub fn open_qcow2_bytes(bytes: Vec<u8>, rw: bool) -> Image {
    Image::open_storage(
        Arc::new(MemStorage::from_vec(bytes)),
        Format::Qcow2,
        &DriverOptions {
            read_only: !rw,
            ..DriverOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("open failed: {e}"))
}

/// The whole guest disk.
pub fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

/// The guest contents at one completed flush.
pub struct Flushed {
    /// Crash point of the flush (ops recorded before it).
    pub point: usize,
    /// Guest bytes as of the flush.
    pub data: Vec<u8>,
    /// Bytes written after this flush, with the crash point each started at:
    /// (point, offset, length); a crash after that point may have changed them.
    pub later: Vec<(usize, u64, u64)>,
}

/// What a v3 qcow2 discard of `[off, off+len)` leaves in `model`: whole clusters read
/// as zeroes (the image's partial last cluster counts as whole).
pub fn discard_model(model: &mut [u8], off: u64, len: u64, cs: u64) {
    let size = model.len() as u64;
    let last = if off + len == size {
        size.div_ceil(cs)
    } else {
        (off + len) / cs
    };
    for c in off.div_ceil(cs)..last {
        model[(c * cs) as usize..((c + 1) * cs).min(size) as usize].fill(0);
    }
}

/// Panics unless `img` reads as `f` says, apart from the bytes written after it that
/// had started before crash point `k`.
pub fn assert_intact(img: &Image, f: &Flushed, k: usize, what: &str) {
    let size = f.data.len();
    let mut got = vec![0u8; size];
    img.read_at(&mut got, 0).unwrap();
    let mut want = f.data.clone();
    for &(p, off, len) in &f.later {
        if p < k {
            let r = off as usize..(off + len) as usize;
            want[r.clone()].fill(0);
            got[r].fill(0);
        }
    }
    if got != want {
        let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "crash point {k} ({what}): byte {i} is {} but {} was flushed",
            got[i], want[i]
        );
    }
}

/// The check of the "bits after data" crash tests: a crashed image (opened) whose
/// first two clusters of `cs` bytes held flushed zeroes before two writes (0x22 at
/// 6144..10240, 0x33 at cs+5000..cs+5100) is clean, and every byte reads as zero or
/// as the new data, never as the old data still in the host cluster.
pub fn assert_zero_or_new(img: &Image, cs: u64, k: usize, variant: u64) {
    let rep = img.check(vdisk::Repair::default()).unwrap();
    assert_eq!(rep.corruptions, 0, "crash point {k}: {:?}", rep.findings);
    let mut got = vec![0u8; 2 * cs as usize];
    img.read_at(&mut got, 0).unwrap();
    for (i, &b) in got.iter().enumerate() {
        let i = i as u64;
        let new = if (6144..6144 + 4096).contains(&i) {
            0x22
        } else if (cs + 5000..cs + 5100).contains(&i) {
            0x33
        } else {
            0
        };
        assert!(
            b == 0 || b == new,
            "crash point {k} variant {variant}: byte {i} is {b:#x} (old data)"
        );
    }
}

/// The set-up of the "bits after data" crash tests: the first two clusters (of `cs`
/// bytes) written with 0x11, then zeroed without unmapping (the host clusters keep
/// the old bytes), and the image closed.
pub fn old_then_zeroed(img: Image, cs: u64) {
    img.write_at(&vec![0x11; 2 * cs as usize], 0).unwrap();
    img.write_zeroes(
        0,
        2 * cs,
        vdisk::ZeroFlags {
            may_unmap: false,
            fast: false,
        },
    )
    .unwrap();
    img.close().unwrap();
}
