//! L1/L2 tables: lookup, copy-on-write of shared L2 tables, and metadata write-back.
//!
//! Write-back order (crash rules): dirty refcount blocks and new clusters' data are
//! made durable by one flush (`barrier`) before any L2 table is written; L2 tables are
//! flushed before the L1 entries pointing at new ones; deferred frees are applied only
//! after all of that is durable. With lazy refcounts (dirty bit durable) refcount
//! blocks are not part of that order: a guest flush leaves them in cache, and a crash
//! rebuilds them from the tables on the next read-write open.

use super::header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY};
use super::{alloc::MAX_PENDING_FREES, Meta, COPIED, L1E_RESERVED, OFFSET_MASK};
use crate::error::{Corruption, Problem, Result, Structure};
use crate::storage::BlkEvent;

/// Reads big-endian entry `i` of a table held as bytes.
pub(crate) fn entry(data: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&data[i * 8..i * 8 + 8]);
    u64::from_be_bytes(a)
}

/// Writes big-endian entry `i`.
pub(crate) fn set(data: &mut [u8], i: usize, v: u64) {
    data[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

impl Meta {
    /// Flushes if anything was written since the last flush, so what follows cannot
    /// reach the disk before it.
    pub(crate) fn barrier(&mut self) -> Result<()> {
        // Lazy refcounts (dirty bit durable): refcounts need not reach the disk
        // before the mappings; they stay in cache until a full write-back.
        if !self.lazy_counting() {
            self.write_rc_blocks()?;
        }
        if self.unflushed {
            self.flush_storages()?;
            self.unflushed = false;
        }
        Ok(())
    }

    /// Cache slot of the L2 table at `off`, loading it if needed. Evicting a dirty table
    /// writes it back behind a barrier.
    pub(crate) fn l2_slot(&mut self, off: u64, l1_index: usize) -> Result<usize> {
        if let Some(i) = self.l2.lookup(off) {
            return Ok(i);
        }
        let cs = self.cs();
        if !off.is_multiple_of(cs) || off < cs || off >= self.file_end {
            return Err(self.mark_corrupt(
                Corruption::new(Structure::L2Table, Problem::Misplaced)
                    .entry(l1_index as u64)
                    .at(off),
            ));
        }
        if let Some(with) = self.overlaps_metadata(off / cs, 1) {
            return Err(self.mark_corrupt(
                Corruption::new(Structure::L2Table, Problem::OverlapsMetadata { with })
                    .entry(l1_index as u64)
                    .at(off),
            ));
        }
        self.make_room_l2()?;
        let mut data = vec![0u8; cs as usize];
        self.st.event(BlkEvent::L2Load);
        self.st.read_at(&mut data, off)?;
        Ok(self.l2.insert(off, data, false))
    }

    fn make_room_l2(&mut self) -> Result<()> {
        if self.l2.full() {
            if let Some(v) = self.l2.victim() {
                if self.l2.slot(v).dirty {
                    self.barrier()?;
                    let s = self.l2.slot(v);
                    self.st.event(BlkEvent::L2Update);
                    self.st.write_at(&s.data, s.offset)?;
                    self.unflushed = true;
                }
                self.l2.remove(v);
            }
        }
        Ok(())
    }

    /// L2 table offset of L1 entry `l1i` (0: none or beyond the table). An entry with
    /// reserved bits set is corrupt: it is never silently masked.
    pub(crate) fn l1_offset(&mut self, l1i: usize) -> Result<u64> {
        let Some(&l1e) = self.l1.get(l1i) else {
            return Ok(0);
        };
        if l1e & L1E_RESERVED != 0 {
            return Err(self.mark_corrupt(
                Corruption::new(
                    Structure::L1Table,
                    Problem::ReservedBits {
                        raw: l1e,
                        guest_cluster: None,
                    },
                )
                .entry(l1i as u64),
            ));
        }
        Ok(l1e & OFFSET_MASK)
    }

    /// The L2 entry of guest cluster `gc` (0 when its L2 table is unallocated).
    pub(crate) fn l2_entry(&mut self, gc: u64) -> Result<u64> {
        let l1i = (gc >> self.g.l2_bits) as usize;
        let off = self.l1_offset(l1i)?;
        if off == 0 {
            return Ok(0);
        }
        let s = self.l2_slot(off, l1i)?;
        Ok(entry(
            &self.l2.slot(s).data,
            self.g.l2_word((gc & (self.g.l2_entries - 1)) as usize),
        ))
    }

    /// The subcluster bitmap of guest cluster `gc` (0 without extended L2 entries or
    /// when its L2 table is unallocated).
    pub(crate) fn l2_bitmap(&mut self, gc: u64) -> Result<u64> {
        let l1i = (gc >> self.g.l2_bits) as usize;
        let off = self.l1_offset(l1i)?;
        if off == 0 || !self.g.ext_l2 {
            return Ok(0);
        }
        let s = self.l2_slot(off, l1i)?;
        Ok(entry(
            &self.l2.slot(s).data,
            self.g.l2_word((gc & (self.g.l2_entries - 1)) as usize) + 1,
        ))
    }

    fn mark_l1_dirty(&mut self, i: usize) {
        self.l1_dirty = Some(match self.l1_dirty {
            None => (i, i + 1),
            Some((lo, hi)) => (lo.min(i), hi.max(i + 1)),
        });
    }

    /// Cache slot of the L2 table for L1 index `l1i`, ready to be modified: allocated if
    /// missing, copied if shared with a snapshot (COPIED clear).
    pub(crate) fn l2_for_write(&mut self, l1i: usize) -> Result<usize> {
        let cs = self.cs();
        let off = self.l1_offset(l1i)?;
        let l1e = self.l1[l1i];
        if off != 0 && l1e & COPIED != 0 {
            return self.l2_slot(off, l1i);
        }
        if off != 0 {
            let rc = self.rc_get(off >> self.g.cluster_bits)?;
            if rc == 1 {
                // COPIED was just missing.
                self.l1[l1i] = off | COPIED;
                self.mark_l1_dirty(l1i);
                return self.l2_slot(off, l1i);
            }
        }
        let data = if off != 0 {
            self.st.event(BlkEvent::L2AllocCowRead);
            let s = self.l2_slot(off, l1i)?;
            let d = self.l2.slot(s).data.clone();
            self.defer_free(off);
            d
        } else {
            vec![0u8; cs as usize]
        };
        let new = self.alloc(1)?;
        // Written now, though the cache writes it again with its entries: the space is
        // taken here, so a full disk fails this request rather than a later flush
        // (which could then never write the table back). Nothing points at it yet.
        self.st.event(BlkEvent::L2AllocWrite);
        if let Err(e) = self.st.write_at(&data, new) {
            let _ = self.unalloc(new, 1);
            return Err(e.into());
        }
        self.unflushed = true;
        self.make_room_l2()?;
        let slot = self.l2.insert(new, data, true);
        self.l1[l1i] = new | COPIED;
        self.mark_l1_dirty(l1i);
        Ok(slot)
    }

    /// Marks an L2 slot modified.
    pub(crate) fn l2_dirty(&mut self, slot: usize) {
        self.l2.slot_mut(slot).dirty = true;
    }

    /// Whether refcount updates are counted lazily right now: lazy refcounts are on
    /// and the dirty bit is set on disk (`before_alloc` sets it durably before the
    /// first change), so a crash rebuilds the refcounts from the tables.
    pub(crate) fn lazy_counting(&self) -> bool {
        self.hdr.compatible & COMPAT_LAZY_REFCOUNTS != 0
            && self.hdr.incompatible & INCOMPAT_DIRTY != 0
            && !self.read_only
    }

    /// Writes every pending metadata change in crash-safe order (no final flush),
    /// refcount blocks included.
    pub(crate) fn writeback(&mut self) -> Result<()> {
        self.writeback_with(true)
    }

    /// The write-back of a guest flush: with lazy refcounts, dirty refcount blocks
    /// stay in cache (written on eviction, on close before the dirty bit is cleared,
    /// and by every other write-back).
    pub(crate) fn writeback_for_flush(&mut self) -> Result<()> {
        let rc = !self.lazy_counting();
        self.writeback_with(rc)
    }

    fn writeback_with(&mut self, refcounts: bool) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if refcounts {
            self.write_rc_blocks()?;
        }
        let dirty = self.l2.dirty();
        if !dirty.is_empty() || self.l1_dirty.is_some() || !self.pending_frees.is_empty() {
            self.barrier()?;
            for i in dirty {
                let s = self.l2.slot(i);
                self.st.event(BlkEvent::L2Update);
                self.st.write_at(&s.data, s.offset)?;
                self.l2.slot_mut(i).dirty = false;
                self.unflushed = true;
            }
            if let Some((lo, hi)) = self.l1_dirty {
                self.barrier()?;
                let mut raw = Vec::with_capacity((hi - lo) * 8);
                for e in &self.l1[lo..hi] {
                    raw.extend_from_slice(&e.to_be_bytes());
                }
                self.st.event(BlkEvent::L1Update);
                self.st
                    .write_at(&raw, self.hdr.l1_table_offset + lo as u64 * 8)?;
                self.l1_dirty = None;
                self.unflushed = true;
            }
            if !self.pending_frees.is_empty() {
                self.barrier()?;
                self.apply_frees()?;
                if refcounts {
                    self.write_rc_blocks()?;
                }
            }
        }
        Ok(())
    }

    /// Writes back when deferred frees pile up (bounds their memory).
    pub(crate) fn maybe_writeback(&mut self) -> Result<()> {
        if self.pending_frees.len() >= MAX_PENDING_FREES {
            self.writeback()?;
        }
        Ok(())
    }
}
