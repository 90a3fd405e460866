//! Guest reads through a [`Mapper`]: one mapping lookup per run, data read straight
//! into the caller's buffers with one vectored storage call per run.
//!
//! Concurrency: no lock is held here; the driver's `map` takes what it needs. A run
//! read while a concurrent write changes its mapping returns the old or the new data,
//! as for any unordered pair of requests.

use super::iov::{total_mut, with_pieces_mut};
use crate::crypto::{DataCipher, SECTOR_SIZE};
use crate::error::{Corruption, Invalid, Problem, Result, Structure};
use crate::format::mapping::{GuestOffset, Mapper, Mapping, Store};
use crate::format::read_backing;
use crate::storage::BlkEvent;
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
            Mapping::Data { store, host, .. } => match m.data_cipher() {
                None => {
                    m.store(store).event(BlkEvent::ReadAio);
                    m.store(store).read_vectored_at(pieces, host.get())?
                }
                Some(c) => {
                    let mut g = guest.get();
                    let mut h = host.get();
                    for p in pieces.iter_mut() {
                        read_decrypted(m, c, store, h, g, p)?;
                        g += p.len() as u64;
                        h += p.len() as u64;
                    }
                }
            },
            Mapping::Zero { .. } => pieces.iter_mut().for_each(|p| p.fill(0)),
            Mapping::Unallocated => {
                if m.backing_image().is_some() {
                    m.store(Store::Metadata).event(BlkEvent::ReadBackingAio);
                }
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

/// Reads the encrypted data at `host` (guest `guest`) into `out` as plaintext: the
/// whole sectors around it are read and decrypted (guest and host offsets share their
/// position in a sector, clusters being whole sectors).
fn read_decrypted<M: Mapper + ?Sized>(
    m: &M,
    c: &DataCipher,
    store: Store,
    host: u64,
    guest: u64,
    out: &mut [u8],
) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let head = host % SECTOR_SIZE;
    let start = host - head;
    let len = (head + out.len() as u64).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    if head == 0 && len == out.len() as u64 {
        m.store(store).read_at(out, start)?;
        c.cipher.decrypt(c.sector(guest, start), out)?;
        return Ok(());
    }
    let mut b = vec![0u8; len as usize];
    m.store(store).read_at(&mut b, start)?;
    c.cipher.decrypt(c.sector(guest - head, start), &mut b)?;
    out.copy_from_slice(&b[head as usize..head as usize + out.len()]);
    Ok(())
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
        Mapping::Data { store, host, .. } => match m.data_cipher() {
            None => m.store(store).read_at(out, host.get())?,
            Some(c) => read_decrypted(m, c, store, host.get(), guest.get(), out)?,
        },
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
