//! Bitmaps on disk: reading them at open, loading their bits, writing them back, and
//! rewriting the directory (see the crash rules in `mod.rs`).

use super::dir::{self, DirEntry, FLAG_IN_USE};
use super::ext::BitmapsExt;
use super::table::{table_entries, TableEntry};
use super::{Entry, State};
use crate::error::{BitmapError, Result};
use crate::format::bitmap::{DirtyBitmap, MAX_BITMAP_BYTES};
use crate::format::qcow2::header::{Header, EXT_BITMAPS};
use crate::format::qcow2::Meta;
use std::sync::Arc;

/// Autoclear bit 0: the bitmaps extension is consistent.
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1;

fn set_ext(hdr: &mut Header, ext: Option<BitmapsExt>) {
    hdr.other_exts.retain(|(t, _)| *t != EXT_BITMAPS);
    match ext {
        Some(e) => {
            hdr.other_exts.push((EXT_BITMAPS, e.encode().to_vec()));
            hdr.autoclear |= AUTOCLEAR_BITMAPS;
        }
        None => hdr.autoclear &= !AUTOCLEAR_BITMAPS,
    }
}

/// Reads the bitmaps extension and directory at open (untrusted input, validated) and,
/// read-write, loads the enabled bitmaps that are not in use. Returns whether the header
/// must be rewritten: a read-write open drops an extension whose autoclear bit a program
/// without bitmap support cleared (its bitmaps are stale; QEMU does the same and their
/// clusters become leaks), and clears a bit without an extension.
pub(crate) fn open(m: &mut Meta) -> Result<bool> {
    let ext = m
        .hdr
        .other_exts
        .iter()
        .find(|(t, _)| *t == EXT_BITMAPS)
        .map(|(_, d)| d.clone());
    let bit = m.hdr.autoclear & AUTOCLEAR_BITMAPS != 0;
    let (Some(data), true) = (&ext, bit) else {
        if m.read_only || (ext.is_none() && !bit) {
            return Ok(false);
        }
        if ext.is_some() {
            tracing::warn!(
                "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
            );
        }
        set_ext(&mut m.hdr, None);
        return Ok(true);
    };
    let cs = m.cs();
    let file_len = m.file_end;
    let e = BitmapsExt::parse(data, cs, file_len)?;
    let mut raw = vec![0u8; e.dir_size as usize];
    m.st.read_at(&mut raw, e.dir_offset)?;
    let entries = dir::parse(&raw, e.nb_bitmaps, e.dir_offset, cs, m.hdr.size, file_len)?;
    m.bm = State {
        dir_offset: e.dir_offset,
        dir_size: e.dir_size,
        entries: entries
            .into_iter()
            .map(|dir| Entry {
                dir,
                mem: None,
                owned: false,
            })
            .collect(),
    };
    if !m.read_only {
        for i in 0..m.bm.entries.len() {
            let d = &m.bm.entries[i].dir;
            if d.auto() && !d.in_use() && !d.has_unknown_extra() {
                let b = load(m, i)?;
                m.bm.entries[i].mem = Some(Arc::new(b));
            }
        }
    }
    Ok(false)
}

/// The decoded on-disk table of bitmap `i`.
pub(crate) fn read_table(m: &Meta, i: usize) -> Result<Vec<TableEntry>> {
    let d = &m.bm.entries[i].dir;
    let n = u64::from(d.table_size);
    let mut raw = vec![0u8; (n * 8) as usize];
    m.st.read_at(&mut raw, d.table_offset)?;
    let cs = m.cs();
    raw.chunks_exact(8)
        .enumerate()
        .map(|(k, c)| {
            let v = u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
            TableEntry::decode(v, i as u64, k as u64, cs, m.file_end)
        })
        .collect()
}

/// Loads the bits of bitmap `i` from disk (bounded: at most [`MAX_BITMAP_BYTES`]).
pub(crate) fn load(m: &Meta, i: usize) -> Result<DirtyBitmap> {
    let d = &m.bm.entries[i].dir;
    let gran = 1u64 << d.granularity_bits;
    let bytes = m.hdr.size.div_ceil(gran).div_ceil(8);
    if bytes > MAX_BITMAP_BYTES {
        return Err(BitmapError::TooLarge {
            name: d.name(),
            bytes,
            max: MAX_BITMAP_BYTES,
        }
        .into());
    }
    let b = DirtyBitmap::new(gran, m.hdr.size);
    let cs = m.cs();
    let per = cs * 8;
    let nbits = b.bits();
    let mut buf = vec![0u8; cs as usize];
    for (k, te) in read_table(m, i)?.into_iter().enumerate() {
        let first = k as u64 * per;
        if first >= nbits {
            break;
        }
        match te {
            TableEntry::Zeroes => {}
            TableEntry::Ones => {
                buf.fill(0xff);
                b.load_chunk(first, &buf);
            }
            TableEntry::Data(off) => {
                m.st.read_at(&mut buf, off)?;
                b.load_chunk(first, &buf);
            }
        }
    }
    Ok(b)
}

impl Meta {
    /// Rewrites the directory from `bm.entries`: in place when its length is unchanged
    /// (flags and table locations only), else to new clusters named by a new header
    /// (the old ones freed afterwards). Flushed when it returns.
    pub(crate) fn bm_write_dir(&mut self) -> Result<()> {
        let entries: Vec<DirEntry> = self.bm.entries.iter().map(|e| e.dir.clone()).collect();
        let bytes = dir::encode(&entries);
        if !entries.is_empty() && bytes.len() as u64 == self.bm.dir_size && self.bm.dir_offset != 0
        {
            self.st.write_at(&bytes, self.bm.dir_offset)?;
            self.flush_storages()?;
            self.unflushed = false;
            return Ok(());
        }
        let cs = self.cs();
        let (old_off, old_size) = (self.bm.dir_offset, self.bm.dir_size);
        if entries.is_empty() {
            set_ext(&mut self.hdr, None);
            self.write_header()?;
            self.bm.dir_offset = 0;
            self.bm.dir_size = 0;
        } else {
            let n = (bytes.len() as u64).div_ceil(cs);
            let off = self.alloc(n)?;
            self.st.write_at(&bytes, off)?;
            self.unflushed = true;
            // The new directory and its refcounts are durable before the header names it.
            self.barrier()?;
            set_ext(
                &mut self.hdr,
                Some(BitmapsExt {
                    nb_bitmaps: entries.len() as u32,
                    dir_size: bytes.len() as u64,
                    dir_offset: off,
                }),
            );
            self.write_header()?;
            self.bm.dir_offset = off;
            self.bm.dir_size = bytes.len() as u64;
        }
        if old_off != 0 {
            for k in 0..old_size.div_ceil(cs) {
                self.defer_free(old_off + k * cs);
            }
            self.writeback()?;
        }
        Ok(())
    }

    /// Queues the release of what bitmap entry `d` references on disk (its table and
    /// its data clusters), once the caller made the change that drops them durable.
    /// Only clusters whose refcount is exactly 1 are released (a bitmap owns its
    /// clusters alone; anything else is a corrupt table, left for `check`).
    pub(crate) fn bm_release(&mut self, d: &DirEntry, table: &[TableEntry]) -> Result<()> {
        let cs = self.cs();
        let mut offs: Vec<u64> = table
            .iter()
            .filter_map(|t| match t {
                TableEntry::Data(o) => Some(*o),
                _ => None,
            })
            .collect();
        for k in 0..(u64::from(d.table_size) * 8).div_ceil(cs) {
            offs.push(d.table_offset + k * cs);
        }
        for off in offs {
            let c = off / cs;
            if self.overlaps_metadata(c, 1).is_none() && self.rc_get(c)? == 1 {
                self.defer_free(off);
            }
        }
        Ok(())
    }

    /// Marks bitmaps `idx` in use on disk (durably) so their contents may change.
    pub(crate) fn bm_own(&mut self, idx: &[usize]) -> Result<()> {
        let mut changed = false;
        for &i in idx {
            let e = &mut self.bm.entries[i];
            if !e.owned {
                e.owned = true;
                if e.dir.flags & FLAG_IN_USE == 0 {
                    e.dir.flags |= FLAG_IN_USE;
                    changed = true;
                }
            }
        }
        if changed {
            self.bm_write_dir()?;
        }
        Ok(())
    }

    /// Writes every owned bitmap back to new clusters and clears its in-use flag (see
    /// the crash rules in `mod.rs`). Returns whether anything was written.
    pub(crate) fn bm_store(&mut self) -> Result<bool> {
        let owned: Vec<usize> = (0..self.bm.entries.len())
            .filter(|&i| self.bm.entries[i].owned && self.bm.entries[i].mem.is_some())
            .collect();
        if owned.is_empty() {
            return Ok(false);
        }
        let cs = self.cs();
        let per = cs * 8;
        let size = self.hdr.size;
        let mut old: Vec<(DirEntry, Vec<TableEntry>)> = Vec::new();
        for &i in &owned {
            // The old table is decoded before anything changes (a corrupt one is kept,
            // not released).
            let old_table = read_table(self, i).unwrap_or_default();
            let Some(mem) = self.bm.entries[i].mem.clone() else {
                continue;
            };
            let gbits = u32::from(self.bm.entries[i].dir.granularity_bits);
            let ts = table_entries(size, gbits, cs);
            let mut table = Vec::with_capacity((ts * 8) as usize);
            for k in 0..ts {
                let chunk = mem.chunk(k * per, cs as usize);
                let e = if chunk.iter().all(|&b| b == 0) {
                    TableEntry::Zeroes
                } else {
                    let off = self.alloc(1)?;
                    self.st.write_at(&chunk, off)?;
                    self.unflushed = true;
                    TableEntry::Data(off)
                };
                table.extend_from_slice(&e.encode().to_be_bytes());
            }
            let tclusters = (ts * 8).div_ceil(cs);
            let toff = self.alloc(tclusters)?;
            table.resize((tclusters * cs) as usize, 0);
            self.st.write_at(&table, toff)?;
            self.unflushed = true;
            let d = &mut self.bm.entries[i].dir;
            old.push((d.clone(), old_table));
            d.table_offset = toff;
            d.table_size = ts as u32;
        }
        // Data, tables and their refcounts durable before the directory names them.
        self.barrier()?;
        self.bm_write_dir()?;
        for &i in &owned {
            let e = &mut self.bm.entries[i];
            e.dir.flags &= !FLAG_IN_USE;
            e.owned = false;
        }
        self.bm_write_dir()?;
        for (d, t) in old {
            self.bm_release(&d, &t)?;
        }
        self.writeback()?;
        Ok(true)
    }
}
