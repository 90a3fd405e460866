//! L2 entry updates: pointing guest clusters at new host clusters and releasing what
//! the entries referenced before.
//!
//! Concurrency: called under the metadata mutex. Crash rules: an update only changes
//! the cached L2 table and sets `Meta::unflushed`, so the table is written only after a
//! barrier has made the new data and refcounts durable (see `tables::writeback`); the
//! host clusters the old entries referenced are queued in `pending_frees`, released
//! only once the new mapping is durable.

use super::l2entry::{L2Entry, Subclusters};
use super::tables::{entry, set};
use super::{Meta, COMPRESSED, OFFSET_MASK};
use crate::error::{Invalid, Result};
use crate::format::mapping::HostOffset;

impl Meta {
    /// Queues the release of whatever host clusters an old entry referenced.
    pub(crate) fn free_entry(&mut self, e: &L2Entry) {
        if self.ext_data {
            // Data clusters in an external data file have no refcounts.
            return;
        }
        match *e {
            L2Entry::Normal { host: Some(h), .. } => self.defer_free(h.get()),
            L2Entry::Normal { host: None, .. } => {}
            L2Entry::Compressed { host, sectors } => {
                // Every host cluster the compressed stream's sectors touch.
                let cs = self.cs();
                let start = host.get() & !511;
                let end = start + sectors * 512;
                let mut c = start / cs;
                while c * cs < end {
                    self.defer_free(c * cs);
                    c += 1;
                }
            }
        }
    }

    /// Points guest clusters `gc..gc+k` at the new host run (data already written)
    /// and releases what they referenced before.
    pub(crate) fn link(&mut self, l1i: usize, gc: u64, k: u64, host: u64) -> Result<()> {
        let cs = self.cs();
        for i in 0..k {
            let e = L2Entry::Normal {
                host: Some(HostOffset(host + i * cs)),
                copied: true,
                sub: Subclusters::ALLOCATED,
            };
            self.set_l2(l1i, gc + i, &e)?;
        }
        Ok(())
    }

    /// Sets one L2 entry to `e` (encoded for this image, with its subcluster bitmap
    /// when the image has extended L2 entries), releasing the old one's clusters.
    pub(crate) fn set_l2(&mut self, l1i: usize, gc: u64, e: &L2Entry) -> Result<()> {
        let (word, bitmap) = match e.encode(&self.entry_format()) {
            Ok(pair) => pair,
            Err(_) => {
                return Err(Invalid::UnencodableL2Entry {
                    guest_cluster: gc,
                    entry: format!("{e:?}"),
                }
                .into())
            }
        };
        self.set_words(l1i, gc, word, self.g.ext_l2.then_some(bitmap))
    }

    /// Sets one L2 entry word (an extended entry keeps its bitmap), releasing the old
    /// one's clusters.
    pub(crate) fn set_entry(&mut self, l1i: usize, gc: u64, new: u64) -> Result<()> {
        self.set_words(l1i, gc, new, None)
    }

    /// Sets one L2 entry word and, if given, its subcluster bitmap, releasing the old
    /// entry's clusters.
    pub(crate) fn set_words(
        &mut self,
        l1i: usize,
        gc: u64,
        new: u64,
        bitmap: Option<u64>,
    ) -> Result<()> {
        let s = self.l2_for_write(l1i)?;
        let idx = self.g.l2_word((gc & (self.g.l2_entries - 1)) as usize);
        let old = entry(&self.l2.slot(s).data, idx);
        let old_bitmap = if self.g.ext_l2 {
            entry(&self.l2.slot(s).data, idx + 1)
        } else {
            0
        };
        set(&mut self.l2.slot_mut(s).data, idx, new);
        if let (true, Some(b)) = (self.g.ext_l2, bitmap) {
            set(&mut self.l2.slot_mut(s).data, idx + 1, b);
        }
        self.l2_dirty(s);
        // New data (or refcounts) must be durable before this table is written.
        self.unflushed = true;
        let e = self.decode(old, old_bitmap, gc)?;
        let kept = new & COMPRESSED == 0 && e.host().is_some_and(|h| h.get() == new & OFFSET_MASK);
        // A host cluster that stays in use (zero cluster written in place) is kept.
        if !kept {
            self.free_entry(&e);
        }
        Ok(())
    }
}
