//! Guest reads through a [`Mapper`]: one mapping lookup per run, data read straight
//! into the caller's buffers with one vectored storage call per run.
//!
//! Concurrency: no lock is held here; the driver's `map` takes what it needs. A run
//! read while a concurrent write changes its mapping returns the old or the new data,
//! as for any unordered pair of requests.

use super::iov::{total_mut, with_pieces_mut};
use crate::error::{Corruption, Invalid, Problem, Result, Structure};
use crate::format::mapping::{GuestOffset, Mapper, Mapping};
use crate::format::read_backing;
use std::io::IoSliceMut;

/// Reads `bufs` (consecutive guest bytes) from guest `offset`. The range must lie inside
/// the guest size (the driver's entry point checks it).
pub fn read_vectored<M: Mapper + ?Sized>(
    m: &M,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> Result<()> {
    let total = total_mut(bufs);
    let mut pos = 0u64;
    while pos < total {
        let guest = GuestOffset(offset + pos);
        let want = total - pos;
        let run = m.map(guest, want)?;
        if run.len == 0 || run.len > want {
            return Err(Invalid::BadMapping {
                guest: guest.0,
                len: run.len,
                want,
            }
            .into());
        }
        read_run(m, bufs, pos, run.len, guest, run.mapping)?;
        pos += run.len;
    }
    Ok(())
}

/// Reads `len` bytes mapped as `mapping` into bytes `[pos, pos + len)` of `bufs`.
fn read_run<M: Mapper + ?Sized>(
    m: &M,
    bufs: &mut [IoSliceMut<'_>],
    pos: u64,
    len: u64,
    guest: GuestOffset,
    mapping: Mapping,
) -> Result<()> {
    with_pieces_mut(bufs, pos, len, |pieces| -> Result<()> {
        match mapping {
            Mapping::Data { store, host, .. } => {
                m.store(store).read_vectored_at(pieces, host.get())?;
            }
            Mapping::Zero { .. } => pieces.iter_mut().for_each(|p| p.fill(0)),
            Mapping::Unallocated => {
                let mut g = guest.get();
                for p in pieces.iter_mut() {
                    read_backing(m.backing_image(), p, g)?;
                    g += p.len() as u64;
                }
            }
            Mapping::Compressed { .. } => {
                let mut skip = 0u64;
                for p in pieces.iter_mut() {
                    read_source(m, mapping.advance(skip), guest.add(skip), p)?;
                    skip += p.len() as u64;
                }
            }
        }
        Ok(())
    })
}

/// Fills `out` with what guest `guest..` reads as under `source` (a mapping positioned
/// at `guest`): the copy-on-write source of allocations, and compressed reads. Bytes
/// past the guest size read as zeroes (never copied from a larger backing image).
pub(super) fn read_source<M: Mapper + ?Sized>(
    m: &M,
    source: Mapping,
    guest: GuestOffset,
    out: &mut [u8],
) -> Result<()> {
    match source {
        Mapping::Data { store, host, .. } => m.store(store).read_at(out, host.get())?,
        Mapping::Zero { .. } => out.fill(0),
        Mapping::Unallocated => {
            let n = m
                .guest_size()
                .saturating_sub(guest.get())
                .min(out.len() as u64) as usize;
            read_backing(m.backing_image(), &mut out[..n], guest.get())?;
            out[n..].fill(0);
        }
        Mapping::Compressed {
            store,
            host,
            len,
            algorithm,
            skip,
        } => {
            let data = m.decompress(store, host, len, algorithm)?;
            let piece = usize::try_from(skip)
                .ok()
                .and_then(|s| data.get(s..s.checked_add(out.len())?));
            match piece {
                Some(p) => out.copy_from_slice(p),
                None => {
                    return Err(Corruption::new(
                        Structure::CompressedCluster,
                        Problem::DecompressedTooShort {
                            got: data.len() as u64,
                            need: out.len() as u64,
                            skip,
                        },
                    )
                    .at(host.0)
                    .into())
                }
            }
        }
    }
    Ok(())
}
