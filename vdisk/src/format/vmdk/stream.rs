//! Writes to stream-optimized (compressed) extents. A grain is stored once, compressed
//! (deflate in a zlib stream, behind a 12-byte marker: its first guest sector and the
//! compressed size), appended at the end of the file; QEMU refuses to write a grain
//! that already holds data, and so does this driver.
//!
//! Writes that cover part of a grain are gathered in memory (at most [`MAX_PENDING`]
//! grains, and about [`MAX_PENDING_BYTES`]) until the grain is whole, or until
//! [`flush_pending`] (a flush, close, or more pending grains than the bounds) stores it with its unwritten parts as they read
//! before (zeroes or the parent). So a converter writing a grain in pieces, or
//! skipping its zero parts, still produces one compressed grain.
//!
//! Concurrency: compression runs with no lock held (writers of different grains
//! compress in parallel); a grain being compressed stays readable from memory until
//! its table entry is set.

use super::extent::{Extent, Grain, Sparse};
use super::header::{self, SECTOR};
use super::Vmdk;
use crate::error::{Corruption, Error, Problem, Result, Structure, VmdkProblem};
use crate::format::read_backing;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Partial grains kept in memory at most.
pub const MAX_PENDING: usize = 64;
/// Bytes of partial grains kept in memory beyond the newest one: a header may declare
/// grains of up to 1 GiB (QEMU's bound), and 64 of those must not be held at once.
pub const MAX_PENDING_BYTES: usize = 64 << 20;

/// A grain of (extent, grain index).
type Key = (usize, u64);

/// A partially written grain.
#[derive(Debug)]
struct PendingGrain {
    data: Vec<u8>,
    /// Written byte ranges, sorted and merged.
    covered: Vec<(u64, u64)>,
}

impl PendingGrain {
    fn cover(&mut self, a: u64, b: u64) {
        self.covered.push((a, b));
        self.covered.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.covered.len());
        for &(s, e) in &self.covered {
            match out.last_mut() {
                Some(l) if s <= l.1 => l.1 = l.1.max(e),
                _ => out.push((s, e)),
            }
        }
        self.covered = out;
    }
    fn whole(&self) -> bool {
        self.covered.len() == 1 && self.covered[0] == (0, self.data.len() as u64)
    }
}

#[derive(Debug, Default)]
struct Inner {
    pending: BTreeMap<Key, PendingGrain>,
    /// Grains being compressed and appended.
    busy: HashMap<Key, Arc<Vec<u8>>>,
}

/// The stream state of an image.
#[derive(Debug, Default)]
pub struct StreamState(Mutex<Inner>);

impl StreamState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bytes of the grain starting at extent byte `start` (the last grain may be short).
fn grain_len(e: &Extent, s: &Sparse, start: u64) -> u64 {
    s.grain.min(e.len - start)
}

/// Copies the bytes of a pending or busy grain holding extent byte `r` into `out`;
/// false when the grain is neither.
pub(super) fn read_pending(v: &Vmdk, ei: usize, s: &Sparse, r: u64, out: &mut [u8]) -> bool {
    let key = (ei, r / s.grain);
    let in_g = (r % s.grain) as usize;
    let st = v.stream.lock();
    let data: &[u8] = match (st.pending.get(&key), st.busy.get(&key)) {
        (Some(p), _) => &p.data,
        (None, Some(b)) => b,
        _ => return false,
    };
    let n = out.len().min(data.len().saturating_sub(in_g));
    out[..n].copy_from_slice(&data[in_g..in_g + n]);
    out[n..].fill(0);
    true
}

/// Whether the grain holding extent byte `r` is pending or being stored.
pub(super) fn is_pending(v: &Vmdk, ei: usize, s: &Sparse, r: u64) -> bool {
    let key = (ei, r / s.grain);
    let st = v.stream.lock();
    st.pending.contains_key(&key) || st.busy.contains_key(&key)
}

/// Writes `buf` at extent byte `rel` of stream extent `ei`.
pub(super) fn write(
    v: &Vmdk,
    ei: usize,
    e: &Extent,
    s: &Sparse,
    buf: &[u8],
    rel: u64,
) -> Result<()> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let r = rel + pos as u64;
        let gi = r / s.grain;
        let start = gi * s.grain;
        let in_g = r - start;
        let glen = grain_len(e, s, start);
        let piece = ((glen - in_g) as usize).min(buf.len() - pos);
        let data = &buf[pos..pos + piece];
        let key = (ei, gi);
        let mut done = None;
        let mut evict = None;
        {
            let mut st = v.stream.lock();
            if st.busy.contains_key(&key) {
                return Err(rewrite());
            }
            if let Some(p) = st.pending.get_mut(&key) {
                p.data[in_g as usize..in_g as usize + piece].copy_from_slice(data);
                p.cover(in_g, in_g + piece as u64);
                if p.whole() {
                    done = st.pending.remove(&key).map(|p| p.data);
                }
            } else {
                let old = s.lookup(&*e.storage, r)?;
                if matches!(old, Grain::Data(_) | Grain::Compressed(_)) {
                    return Err(rewrite());
                }
                if piece as u64 == glen {
                    done = Some(data.to_vec());
                } else if glen > MAX_PENDING_BYTES as u64 {
                    // A grain this large (a hostile or odd header) is not gathered in
                    // memory: only whole-grain writes are taken.
                    return Err(Corruption::new(
                        Structure::VmdkGrain,
                        Problem::Vmdk(VmdkProblem::StreamPartialGrain),
                    )
                    .into());
                } else {
                    let mut g = vec![0u8; glen as usize];
                    if old == Grain::Unallocated {
                        read_backing(v.parent()?, &mut g, e.start + start)?;
                    }
                    g[in_g as usize..in_g as usize + piece].copy_from_slice(data);
                    let mut p = PendingGrain {
                        data: g,
                        covered: Vec::new(),
                    };
                    p.cover(in_g, in_g + piece as u64);
                    st.pending.insert(key, p);
                    let bytes: usize = st.pending.values().map(|p| p.data.len()).sum();
                    let over_bytes = st.pending.len() > 1 && bytes > MAX_PENDING_BYTES;
                    if st.pending.len() > MAX_PENDING || over_bytes {
                        if let Some((&k, _)) = st.pending.iter().next() {
                            evict = st.pending.remove(&k).map(|p| (k, p.data));
                        }
                    }
                }
            }
            if let Some(d) = done.take() {
                let d = Arc::new(d);
                st.busy.insert(key, d.clone());
                drop(st);
                store(v, key, d)?;
            }
        }
        if let Some((k, d)) = evict {
            let d = Arc::new(d);
            v.stream.lock().busy.insert(k, d.clone());
            store(v, k, d)?;
        }
        pos += piece;
    }
    Ok(())
}

fn rewrite() -> Error {
    Corruption::new(
        Structure::VmdkGrain,
        Problem::Vmdk(VmdkProblem::StreamRewrite),
    )
    .into()
}

/// Compresses the grain `key` (registered busy) and appends it; its table entry is set
/// in the cache, and the grain leaves the busy list either way.
fn store(v: &Vmdk, key: Key, data: Arc<Vec<u8>>) -> Result<()> {
    let r = store_inner(v, key, &data);
    v.stream.lock().busy.remove(&key);
    r
}

fn store_inner(v: &Vmdk, key: Key, data: &[u8]) -> Result<()> {
    let (ei, gi) = key;
    let e = &v.extents[ei];
    let super::extent::Layout::Sparse(s) = &e.layout else {
        return Ok(());
    };
    let start = gi * s.grain;
    let mut enc = ZlibEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        Compression::default(),
    );
    let compressed = enc
        .write_all(data)
        .and_then(|_| enc.finish())
        .map_err(|source| Error::Compress {
            zstd: false,
            source,
        })?;
    let lba = (e.start + start) / SECTOR;
    let mut rec = Vec::with_capacity(compressed.len() + 12 + 512);
    rec.extend_from_slice(&header::grain_marker(lba, compressed.len() as u32));
    rec.extend_from_slice(&compressed);
    rec.resize(
        (rec.len() as u64).div_ceil(SECTOR) as usize * SECTOR as usize,
        0,
    );
    let _a = v.alloc.lock().unwrap_or_else(|p| p.into_inner());
    let mut next = s.next.lock().unwrap_or_else(|p| p.into_inner());
    let host = *next;
    if (host + rec.len() as u64) / SECTOR > u32::MAX as u64 {
        return Err(
            Corruption::new(Structure::VmdkGrain, Problem::Vmdk(VmdkProblem::ExtentFull)).into(),
        );
    }
    e.storage.write_at(&rec, host)?;
    *next = host + rec.len() as u64;
    s.set_entry(&*e.storage, start, (host / SECTOR) as u32)?;
    // The grain is stored (and readable through its entry): forget the cached
    // decompressed copy of whatever lay there before.
    let mut lg = v.last_grain.lock().unwrap_or_else(|p| p.into_inner());
    if lg.as_ref().is_some_and(|(i, h, _)| *i == ei && *h == host) {
        *lg = None;
    }
    Ok(())
}

/// Stores every pending grain.
pub(super) fn flush_pending(v: &Vmdk) -> Result<()> {
    loop {
        let next = {
            let mut st = v.stream.lock();
            let Some((&k, _)) = st.pending.iter().next() else {
                return Ok(());
            };
            let d = st.pending.remove(&k).map(|p| Arc::new(p.data));
            if let Some(d) = &d {
                st.busy.insert(k, d.clone());
            }
            d.map(|d| (k, d))
        };
        if let Some((k, d)) = next {
            store(v, k, d)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges() {
        let mut p = PendingGrain {
            data: vec![0; 100],
            covered: Vec::new(),
        };
        p.cover(50, 100);
        assert!(!p.whole());
        p.cover(0, 20);
        p.cover(10, 50);
        assert!(p.whole());
    }
}
