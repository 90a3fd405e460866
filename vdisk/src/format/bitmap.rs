//! Persistent dirty bitmaps: the contract between a format that stores them (qcow2) and
//! the layers above ([`crate::hook`]'s tracker, [`crate::Image`]'s bitmap methods).
//!
//! - [`DirtyBitmap`]: one bitmap in memory (one bit per `granularity` bytes of guest
//!   disk, lock-free marking from any thread).
//! - [`BitmapInfo`]: what `info` shows of a bitmap.
//! - [`PersistentBitmaps`]: what a format offers (list, add, remove, enable/disable,
//!   clear, merge, load; the write-tracking entry points the hook calls).
//!
//! Memory: a loaded bitmap costs `ceil(size / granularity) / 8` bytes (a 1 TiB disk at
//! the default 64 KiB granularity: 2 MiB; at the finest, 512 bytes: 256 MiB). A format
//! refuses to load a bitmap whose data would exceed [`MAX_BITMAP_BYTES`] (QEMU's own
//! limit on a qcow2 bitmap's stored size), so memory is bounded by that per bitmap.

use crate::error::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Largest bitmap (bytes of bit data) a format loads: QEMU's limit on a qcow2 bitmap.
pub const MAX_BITMAP_BYTES: u64 = 512 << 20;
/// Finest granularity (bytes per bit).
pub const MIN_GRANULARITY: u64 = 512;
/// Coarsest granularity (bytes per bit).
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// Longest bitmap name (bytes).
pub const MAX_NAME_LEN: usize = 1023;

/// A bitmap as `info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
    /// Records guest writes (qcow2 `auto` flag).
    pub enabled: bool,
    /// Marked in use: inconsistent (a writer did not close the image cleanly), or being
    /// recorded by this open image.
    pub in_use: bool,
}

impl BitmapInfo {
    /// The flags as qemu-img names them, in its order (`in-use`, `auto`).
    pub fn flags(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.in_use {
            f.push("in-use");
        }
        if self.enabled {
            f.push("auto");
        }
        f
    }
}

/// One dirty bitmap in memory: bit `i` covers guest bytes
/// `[i * granularity, (i + 1) * granularity)`. Marking is lock-free (atomic words);
/// only a resize takes the write lock.
#[derive(Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    shift: u32,
    inner: RwLock<Bits>,
}

#[derive(Debug)]
struct Bits {
    /// Guest size covered.
    size: u64,
    /// Number of bits (`ceil(size / granularity)`).
    nbits: u64,
    words: Vec<AtomicU64>,
}

impl Bits {
    fn new(size: u64, shift: u32) -> Bits {
        let nbits = size.div_ceil(1 << shift);
        Bits {
            size,
            nbits,
            words: (0..nbits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn set_bits(&self, first: u64, end: u64) {
        let end = end.min(self.nbits);
        let mut b = first;
        while b < end {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let n = (64 - lo).min(end - b);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            if let Some(word) = self.words.get(w) {
                // Skip the atomic read-modify-write when the bits are already set (the
                // common case for repeated writes to the same region).
                if word.load(Ordering::Relaxed) & mask != mask {
                    word.fetch_or(mask, Ordering::Relaxed);
                }
            }
            b += n;
        }
    }
    fn get(&self, bit: u64) -> bool {
        self.words
            .get((bit / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }
}

impl DirtyBitmap {
    /// An empty (all clean) bitmap for a disk of `size` bytes. `granularity` must be a
    /// power of two (callers validate it).
    pub fn new(granularity: u64, size: u64) -> DirtyBitmap {
        let shift = granularity.max(1).trailing_zeros();
        DirtyBitmap {
            granularity: 1 << shift,
            shift,
            inner: RwLock::new(Bits::new(size, shift)),
        }
    }
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Bits> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }
    /// Bytes of guest disk per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }
    /// Guest size covered.
    pub fn size(&self) -> u64 {
        self.read().size
    }
    /// Number of bits.
    pub fn bits(&self) -> u64 {
        self.read().nbits
    }
    /// Marks guest bytes `[offset, offset + len)` dirty (every bit they touch).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.shift;
        let end = ((offset.saturating_add(len) - 1) >> self.shift) + 1;
        self.read().set_bits(first, end);
    }
    /// Marks every bit dirty.
    pub fn mark_all(&self) {
        let b = self.read();
        b.set_bits(0, b.nbits);
    }
    /// Clears every bit.
    pub fn clear(&self) {
        for w in &self.read().words {
            w.store(0, Ordering::Relaxed);
        }
    }
    /// Whether bit `bit` is set.
    pub fn get(&self, bit: u64) -> bool {
        self.read().get(bit)
    }
    /// Number of dirty bytes (set bits times granularity, the last bit clipped to the
    /// disk size), as QEMU's `count`.
    pub fn dirty_bytes(&self) -> u64 {
        self.extents(0, u64::MAX)
            .iter()
            .filter(|e| e.2)
            .map(|e| e.1)
            .sum()
    }
    /// Whether no bit is set.
    pub fn is_clear(&self) -> bool {
        self.read()
            .words
            .iter()
            .all(|w| w.load(Ordering::Relaxed) == 0)
    }
    /// Changes the disk size: bits past the new end are dropped; new bits are clean.
    pub fn resize(&self, size: u64) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let new = Bits::new(size, self.shift);
        let keep = new.nbits.min(g.nbits);
        for (i, w) in new.words.iter().enumerate() {
            if let Some(old) = g.words.get(i) {
                let mut v = old.load(Ordering::Relaxed);
                let lo = i as u64 * 64;
                if lo + 64 > keep {
                    let n = keep.saturating_sub(lo);
                    v &= if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
                }
                w.store(v, Ordering::Relaxed);
            }
        }
        *g = new;
    }
    /// ORs `other` into this bitmap: every guest byte dirty in `other` becomes dirty here
    /// (granularities may differ; the sizes should match).
    pub fn merge_from(&self, other: &DirtyBitmap) {
        for (off, len, dirty) in other.extents(0, u64::MAX) {
            if dirty {
                self.mark(off, len);
            }
        }
    }
    /// The runs of `[offset, offset + len)` (clipped to the disk size): `(offset, length,
    /// dirty)`, consecutive, alternating. Bounded by the bitmap's size.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        self.extents_max(offset, len, usize::MAX)
    }
    /// [`DirtyBitmap::extents`], stopping after `max` runs (the last run then ends where
    /// the bits change).
    pub fn extents_max(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, u64, bool)> {
        let b = self.read();
        let end = offset.saturating_add(len).min(b.size);
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let bit = pos >> self.shift;
            let dirty = b.get(bit);
            // Skip whole words of the same value quickly.
            let mut nb = bit + 1;
            while nb < b.nbits && (nb << self.shift) < end {
                if nb.is_multiple_of(64) {
                    let w = b.words[(nb / 64) as usize].load(Ordering::Relaxed);
                    if (dirty && w == u64::MAX) || (!dirty && w == 0) {
                        nb += 64;
                        continue;
                    }
                }
                if b.get(nb) != dirty {
                    break;
                }
                nb += 1;
            }
            let run_end = (nb << self.shift).min(end);
            let n = out.len();
            match out.last_mut() {
                Some(l) if l.2 == dirty => l.1 += run_end - pos,
                _ if n >= max => break,
                _ => out.push((pos, run_end - pos, dirty)),
            }
            pos = run_end;
        }
        out
    }
    /// The bits `[first_bit, first_bit + bytes * 8)` in the on-disk layout (byte `k` holds
    /// bits `8k..8k+8`, least significant bit first); bits past the end read as 0.
    pub fn chunk(&self, first_bit: u64, bytes: usize) -> Vec<u8> {
        let b = self.read();
        let mut out = vec![0u8; bytes];
        if first_bit.is_multiple_of(64) {
            let w0 = (first_bit / 64) as usize;
            for (i, c) in out.chunks_mut(8).enumerate() {
                if let Some(w) = b.words.get(w0 + i) {
                    let v = w.load(Ordering::Relaxed).to_le_bytes();
                    c.copy_from_slice(&v[..c.len()]);
                }
            }
        } else {
            for i in 0..bytes as u64 * 8 {
                if b.get(first_bit + i) {
                    out[(i / 8) as usize] |= 1 << (i % 8);
                }
            }
        }
        out
    }
    /// ORs on-disk bit data (layout of [`DirtyBitmap::chunk`]) in at `first_bit`; bits
    /// past the end are ignored.
    pub fn load_chunk(&self, first_bit: u64, data: &[u8]) {
        let b = self.read();
        if first_bit.is_multiple_of(64) {
            let w0 = (first_bit / 64) as usize;
            for (i, c) in data.chunks(8).enumerate() {
                let mut a = [0u8; 8];
                a[..c.len()].copy_from_slice(c);
                let v = u64::from_le_bytes(a);
                if v == 0 {
                    continue;
                }
                let lo = (w0 + i) as u64 * 64;
                let n = b.nbits.saturating_sub(lo);
                if n == 0 {
                    break;
                }
                let v = if n >= 64 { v } else { v & ((1u64 << n) - 1) };
                if let Some(w) = b.words.get(w0 + i) {
                    w.fetch_or(v, Ordering::Relaxed);
                }
            }
        } else {
            for (i, &byte) in data.iter().enumerate() {
                for k in 0..8 {
                    if byte & (1 << k) != 0 {
                        let bit = first_bit + i as u64 * 8 + k;
                        b.set_bits(bit, bit + 1);
                    }
                }
            }
        }
    }
    /// A copy (for an export frozen while writes go on).
    pub fn snapshot(&self) -> DirtyBitmap {
        let b = self.read();
        let c = DirtyBitmap::new(self.granularity, b.size);
        {
            let cb = c.read();
            for (d, s) in cb.words.iter().zip(b.words.iter()) {
                d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        c
    }
}

/// What a format that stores persistent dirty bitmaps offers. Names are unique; every
/// method validates its arguments and refuses what the image cannot hold.
pub trait PersistentBitmaps: Send + Sync + std::fmt::Debug {
    /// The bitmaps, in directory order.
    fn list(&self) -> Vec<BitmapInfo>;
    /// Called before every guest change: on the first one, marks the enabled bitmaps
    /// in use on disk (durably), so a crash leaves them inconsistent, never stale.
    fn before_change(&self) -> Result<()>;
    /// Records a changed guest range in every enabled bitmap (in memory).
    fn mark(&self, offset: u64, len: u64);
    /// Adds a bitmap (all clean).
    fn add(&self, name: &str, granularity: u64, enabled: bool) -> Result<()>;
    /// Removes a bitmap and frees its clusters.
    fn remove(&self, name: &str) -> Result<()>;
    /// Starts or stops recording writes.
    fn set_enabled(&self, name: &str, enabled: bool) -> Result<()>;
    /// Clears every bit.
    fn clear(&self, name: &str) -> Result<()>;
    /// ORs `src` into bitmap `name`.
    fn merge(&self, name: &str, src: &DirtyBitmap) -> Result<()>;
    /// The contents of bitmap `name` (a copy; refused for an in-use bitmap that this
    /// image is not recording, whose contents are inconsistent).
    fn get(&self, name: &str) -> Result<DirtyBitmap>;
    /// Writes every changed bitmap back and clears their in-use flags (close).
    fn store(&self) -> Result<()>;
    /// The bitmap `name` itself, shared: an enabled bitmap of a read-write image keeps
    /// recording writes in it (NBD exports read it live). A bitmap not loaded is read
    /// from disk.
    fn view(&self, name: &str) -> Result<std::sync::Arc<DirtyBitmap>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_sets_every_touched_bit_and_extents_report_them() {
        let b = DirtyBitmap::new(65536, 10 * 65536 + 100);
        assert_eq!(b.bits(), 11);
        b.mark(65536 * 2 + 1, 1);
        b.mark(65536 * 4 - 1, 2);
        b.mark(65536 * 10, 100);
        assert_eq!(
            b.extents(0, u64::MAX),
            vec![
                (0, 2 * 65536, false),
                (2 * 65536, 65536, true),
                (3 * 65536, 2 * 65536, true),
                (5 * 65536, 5 * 65536, false),
                (10 * 65536, 100, true),
            ]
            .into_iter()
            .fold(Vec::<(u64, u64, bool)>::new(), |mut v, e| {
                match v.last_mut() {
                    Some(l) if l.2 == e.2 => l.1 += e.1,
                    _ => v.push(e),
                }
                v
            })
        );
        assert_eq!(b.dirty_bytes(), 3 * 65536 + 100);
        b.clear();
        assert!(b.is_clear());
    }

    #[test]
    fn chunk_layout_is_lsb_first_and_round_trips() {
        let b = DirtyBitmap::new(512, 512 * 200);
        b.mark(3 * 512, 1);
        b.mark(9 * 512, 512);
        b.mark(199 * 512, 512);
        let c = b.chunk(0, 32);
        assert_eq!(c[0], 0x08);
        assert_eq!(c[1], 0x02);
        assert_eq!(c[24], 0x80);
        let d = DirtyBitmap::new(512, 512 * 200);
        d.load_chunk(0, &c);
        assert_eq!(d.chunk(0, 32), c);
        // Unaligned starts take the bit-by-bit path.
        let e = DirtyBitmap::new(512, 512 * 200);
        e.load_chunk(8, &c[1..]);
        assert!(e.get(9) && !e.get(3));
        assert_eq!(b.chunk(8, 1), vec![0x02]);
        // Bits past the end are ignored on load and read as zero.
        let f = DirtyBitmap::new(512, 512 * 3);
        f.load_chunk(0, &[0xff, 0xff]);
        assert_eq!(f.chunk(0, 2), vec![0x07, 0]);
    }

    #[test]
    fn resize_keeps_bits_inside_and_drops_the_rest() {
        let b = DirtyBitmap::new(1024, 1024 * 130);
        b.mark_all();
        b.resize(1024 * 70);
        assert_eq!(b.bits(), 70);
        b.resize(1024 * 200);
        assert_eq!(
            b.extents(0, u64::MAX),
            vec![(0, 70 * 1024, true), (70 * 1024, 130 * 1024, false)]
        );
    }

    #[test]
    fn merge_across_granularities() {
        let a = DirtyBitmap::new(4096, 1 << 20);
        a.mark(5000, 10);
        let b = DirtyBitmap::new(65536, 1 << 20);
        b.merge_from(&a);
        assert_eq!(b.extents(0, u64::MAX)[0], (0, 65536, true));
        let s = b.snapshot();
        b.clear();
        assert!(s.get(0) && !b.get(0));
    }

    #[test]
    fn flags_in_qemu_order() {
        let i = BitmapInfo {
            name: "a".into(),
            granularity: 65536,
            enabled: true,
            in_use: true,
        };
        assert_eq!(i.flags(), vec!["in-use", "auto"]);
    }
}
