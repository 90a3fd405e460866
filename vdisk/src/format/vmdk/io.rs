//! Guest reads, writes, zero writes and block status across a VMDK's extents, as
//! QEMU's `vmdk_co_preadv` / `vmdk_pwritev` / `vmdk_co_block_status` do them: flat
//! extents are plain file ranges; sparse extents go grain by grain through their
//! tables (runs of contiguous grains in one I/O).

use super::extent::{Extent, Grain, Layout, Sparse};
use super::header::{self, SECTOR};
use super::{stream, Vmdk};
use crate::error::{Corruption, Problem, Result, Structure, Unsupported, VmdkProblem, ZeroLimit};
use crate::format::{read_backing, Extent as BlockExtent, ExtentKind, ZeroFlags};
use flate2::read::ZlibDecoder;
use std::io::Read;
use std::sync::Arc;

/// Largest buffer built for a copy-on-write grain fill.
const MAX_GRAIN_BUF: u64 = 1 << 30;

/// Reads guest bytes (the range is inside the disk).
pub(super) fn read(v: &Vmdk, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let off = offset + pos as u64;
        let ei = v.extent_at(off)?;
        let e = &v.extents[ei];
        let rel = off - e.start;
        let n = ((e.len - rel) as usize).min(buf.len() - pos);
        match &e.layout {
            Layout::Flat(base) => e.storage.read_at(&mut buf[pos..pos + n], base + rel)?,
            Layout::Sparse(s) => read_sparse(v, ei, e, s, &mut buf[pos..pos + n], rel)?,
        }
        pos += n;
    }
    Ok(())
}

fn read_sparse(
    v: &Vmdk,
    ei: usize,
    e: &Extent,
    s: &Sparse,
    buf: &mut [u8],
    rel: u64,
) -> Result<()> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let r = rel + pos as u64;
        let in_g = r % s.grain;
        let piece = ((s.grain - in_g) as usize).min(buf.len() - pos);
        let out = &mut buf[pos..pos + piece];
        if s.compressed && stream::read_pending(v, ei, s, r, out) {
            pos += piece;
            continue;
        }
        match s.lookup(&*e.storage, r)? {
            Grain::Unallocated => read_backing(v.parent()?, out, e.start + r)?,
            Grain::Zero => out.fill(0),
            Grain::Data(h) => {
                // Extend over the following grains while they are contiguous.
                let mut n = piece;
                while pos + n < buf.len() {
                    let next = r + n as u64;
                    match s.lookup(&*e.storage, next)? {
                        Grain::Data(h2) if h2 == h + in_g + n as u64 => {
                            n = (n + s.grain as usize).min(buf.len() - pos)
                        }
                        _ => break,
                    }
                }
                e.storage.read_at(&mut buf[pos..pos + n], h + in_g)?;
                pos += n;
                continue;
            }
            Grain::Compressed(h) => {
                let g = grain_bytes(v, ei, e, s, h)?;
                let need = in_g as usize + piece;
                if g.len() < need {
                    return Err(Corruption::new(
                        Structure::CompressedCluster,
                        Problem::DecompressedTooShort {
                            got: g.len() as u64,
                            need: piece as u64,
                            skip: in_g,
                        },
                    )
                    .at(h)
                    .into());
                }
                out.copy_from_slice(&g[in_g as usize..need]);
            }
        }
        pos += piece;
    }
    Ok(())
}

/// The decompressed bytes of the compressed grain at `host` (cached: sequential reads
/// of one grain decompress it once).
fn grain_bytes(v: &Vmdk, ei: usize, e: &Extent, s: &Sparse, host: u64) -> Result<Arc<Vec<u8>>> {
    {
        let c = v.last_grain.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((i, h, g)) = c.as_ref() {
            if *i == ei && *h == host {
                return Ok(g.clone());
            }
        }
    }
    let g = Arc::new(decompress(e, s, host)?);
    *v.last_grain.lock().unwrap_or_else(|p| p.into_inner()) = Some((ei, host, g.clone()));
    Ok(g)
}

/// Reads and inflates one compressed grain (QEMU reads two grains' worth: marker and
/// deflate stream must fit in them).
pub(super) fn decompress(e: &Extent, s: &Sparse, host: u64) -> Result<Vec<u8>> {
    let file_len = e.storage.len()?;
    let avail = file_len.saturating_sub(host).min(2 * s.grain);
    let mut raw = vec![0u8; avail as usize];
    e.storage.read_at(&mut raw, host)?;
    let data: &[u8] = if s.markers {
        let Some((_lba, size)) = header::parse_grain_marker(&raw) else {
            return Err(marker_error(host, 0));
        };
        let size = size as usize;
        if size == 0 || size > raw.len() - header::GRAIN_MARKER_LEN {
            return Err(marker_error(host, size as u64));
        }
        &raw[header::GRAIN_MARKER_LEN..header::GRAIN_MARKER_LEN + size]
    } else {
        &raw
    };
    let mut out = Vec::with_capacity(s.grain as usize);
    ZlibDecoder::new(data)
        .take(s.grain)
        .read_to_end(&mut out)
        .map_err(|err| {
            crate::Error::from(
                Corruption::new(
                    Structure::CompressedCluster,
                    Problem::Undecompressable {
                        library: err.to_string(),
                    },
                )
                .at(host),
            )
        })?;
    Ok(out)
}

fn marker_error(host: u64, size: u64) -> crate::Error {
    Corruption::new(
        Structure::VmdkGrain,
        Problem::Vmdk(VmdkProblem::BadGrainMarker { size }),
    )
    .at(host)
    .into()
}

/// Writes guest bytes (inside the disk, image writable).
pub(super) fn write(v: &Vmdk, buf: &[u8], offset: u64) -> Result<()> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let off = offset + pos as u64;
        let ei = v.extent_at(off)?;
        let e = &v.extents[ei];
        let rel = off - e.start;
        let n = ((e.len - rel) as usize).min(buf.len() - pos);
        let part = &buf[pos..pos + n];
        match &e.layout {
            Layout::Flat(base) => e.storage.write_at(part, base + rel)?,
            Layout::Sparse(s) if s.compressed => stream::write(v, ei, e, s, part, rel)?,
            Layout::Sparse(s) => write_sparse(v, e, s, part, rel)?,
        }
        pos += n;
    }
    Ok(())
}

fn write_sparse(v: &Vmdk, e: &Extent, s: &Sparse, buf: &[u8], rel: u64) -> Result<()> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let r = rel + pos as u64;
        let in_g = r % s.grain;
        let piece = ((s.grain - in_g) as usize).min(buf.len() - pos);
        let data = &buf[pos..pos + piece];
        if let Grain::Data(h) = s.lookup(&*e.storage, r)? {
            e.storage.write_at(data, h + in_g)?;
        } else {
            allocate(v, e, s, r, data)?;
        }
        pos += piece;
    }
    Ok(())
}

/// Allocates the grain holding extent byte `r` and writes `data` there, the rest of
/// the grain filled from the parent (or zeroes); the table entry is set in the cache.
fn allocate(v: &Vmdk, e: &Extent, s: &Sparse, r: u64, data: &[u8]) -> Result<()> {
    let _a = v.alloc.lock().unwrap_or_else(|p| p.into_inner());
    let old = s.lookup(&*e.storage, r)?;
    let in_g = r % s.grain;
    if let Grain::Data(h) = old {
        // Allocated meanwhile.
        e.storage.write_at(data, h + in_g)?;
        return Ok(());
    }
    let mut next = s.next.lock().unwrap_or_else(|p| p.into_inner());
    let host = *next;
    if (host + s.grain) / SECTOR > u32::MAX as u64 {
        return Err(
            Corruption::new(Structure::VmdkGrain, Problem::Vmdk(VmdkProblem::ExtentFull)).into(),
        );
    }
    let grain_start = r - in_g;
    if data.len() as u64 == s.grain {
        e.storage.write_at(data, host)?;
    } else {
        if s.grain > MAX_GRAIN_BUF {
            return Err(Corruption::new(
                Structure::VmdkHeader,
                Problem::Vmdk(VmdkProblem::Granularity),
            )
            .into());
        }
        let mut g = vec![0u8; s.grain as usize];
        if old == Grain::Unallocated {
            read_backing(v.parent()?, &mut g, e.start + grain_start)?;
        }
        g[in_g as usize..in_g as usize + data.len()].copy_from_slice(data);
        e.storage.write_at(&g, host)?;
    }
    *next = host + s.grain;
    s.set_entry(&*e.storage, r, (host / SECTOR) as u32)
}

/// Makes a range read as zeroes: zeroed grain entries where the extent has them and
/// whole grains are covered; unallocated grains with nothing under them are left
/// alone; the rest is written as zero bytes (unless `fast`).
pub(super) fn write_zeroes(v: &Vmdk, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
    let end = offset + len;
    let mut off = offset;
    while off < end {
        let ei = v.extent_at(off)?;
        let e = &v.extents[ei];
        let rel = off - e.start;
        let n = (e.len - rel).min(end - off);
        match &e.layout {
            Layout::Flat(_) => {
                if flags.fast {
                    return Err(Unsupported::ZeroesNeedData(ZeroLimit::VmdkGrain).into());
                }
                zero_bytes(v, off, n)?;
            }
            Layout::Sparse(s) => {
                let mut p = 0u64;
                while p < n {
                    let r = rel + p;
                    let in_g = r % s.grain;
                    let piece = (s.grain - in_g).min(n - p);
                    let whole = in_g == 0 && (piece == s.grain || r + piece == e.len);
                    let g = if s.compressed && stream::is_pending(v, ei, s, r) {
                        Grain::Data(0)
                    } else {
                        s.lookup(&*e.storage, r)?
                    };
                    let below_zero = match (&g, v.backing.as_ref()) {
                        (Grain::Zero, _) => true,
                        (Grain::Unallocated, None) => true,
                        (Grain::Unallocated, Some(b)) => e.start + r >= b.size(),
                        _ => false,
                    };
                    if below_zero {
                        // Already reads as zeroes.
                    } else if s.zero_grain && whole && !matches!(g, Grain::Compressed(_)) {
                        let _a = v.alloc.lock().unwrap_or_else(|p| p.into_inner());
                        s.set_entry(&*e.storage, r, header::GTE_ZEROED)?;
                    } else if flags.fast {
                        return Err(Unsupported::ZeroesNeedData(ZeroLimit::VmdkGrain).into());
                    } else {
                        zero_bytes(v, e.start + r, piece)?;
                    }
                    p += piece;
                }
            }
        }
        off += n;
    }
    Ok(())
}

fn zero_bytes(v: &Vmdk, mut off: u64, len: u64) -> Result<()> {
    let end = off + len;
    let z = vec![0u8; len.min(1 << 20) as usize];
    while off < end {
        let n = (end - off).min(z.len() as u64) as usize;
        write(v, &z[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Status of the range at `offset` in this image only.
pub(super) fn block_status(v: &Vmdk, offset: u64, len: u64) -> Result<BlockExtent> {
    let ei = v.extent_at(offset)?;
    let e = &v.extents[ei];
    let rel = offset - e.start;
    let max = len.min(e.len - rel);
    let s = match &e.layout {
        Layout::Flat(base) => {
            return Ok(BlockExtent {
                len: max,
                kind: ExtentKind::Data,
                offset: Some(base + rel),
                compressed: false,
            })
        }
        Layout::Sparse(s) => s,
    };
    let status = |g: Grain, in_g: u64| -> (ExtentKind, Option<u64>, bool) {
        match g {
            Grain::Unallocated => (ExtentKind::Unallocated, None, false),
            Grain::Zero => (ExtentKind::Zero, None, false),
            Grain::Data(h) => (ExtentKind::Data, Some(h + in_g), false),
            Grain::Compressed(_) => (ExtentKind::Data, None, true),
        }
    };
    let in_g = rel % s.grain;
    let first = if s.compressed && stream::is_pending(v, ei, s, rel) {
        (ExtentKind::Data, None, true)
    } else {
        status(s.lookup(&*e.storage, rel)?, in_g)
    };
    let mut n = (s.grain - in_g).min(max);
    // Merge following grains of the same kind (contiguous for data), a bounded number.
    let mut steps = 0;
    while n < max && steps < 4096 {
        let r = rel + n;
        if s.compressed && stream::is_pending(v, ei, s, r) {
            break;
        }
        let st = status(s.lookup(&*e.storage, r)?, 0);
        let same = match (first, st) {
            ((ExtentKind::Data, Some(a), _), (ExtentKind::Data, Some(b), _)) => b == a + n,
            ((k1, None, c1), (k2, None, c2)) => k1 == k2 && c1 == c2 && !c1,
            _ => false,
        };
        if !same {
            break;
        }
        n = (n + s.grain).min(max);
        steps += 1;
    }
    Ok(BlockExtent {
        len: n,
        kind: first.0,
        offset: first.1,
        compressed: first.2,
    })
}
