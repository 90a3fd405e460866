//! Entry-level access to the L1 and L2 tables through the bounded page cache.
//!
//! Only the page holding a wanted entry is read; updates change one page in memory and
//! write back just the write units they touched.

use super::header::table_offset_valid;
use super::table::{self, SharedPage};
use super::Inner;
use crate::error::{Corruption, Error, Problem, Result, Structure};
use crate::storage::BlkEvent;

/// Pages of L1 read at a read-write open to learn where the L2 tables are.
const OPEN_SCAN_PAGES: u64 = 64;

/// One run of L2 entries to set: entry `first + k` becomes `value + k * step`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Update {
    /// Index of the first entry in its table.
    pub first: u64,
    /// Number of entries.
    pub count: u64,
    /// Value of the first entry.
    pub value: u64,
    /// Increment per entry (cluster size for data runs, 0 for zero entries).
    pub step: u64,
}

impl Inner {
    /// File offset of the page holding entry `idx` of the table at `table`, and the
    /// entry's index in that page.
    pub(crate) fn page_of(&self, table: u64, idx: u64) -> (u64, usize) {
        let pe = self.page_entries;
        (table + idx / pe * pe * 8, (idx % pe) as usize)
    }

    fn l1_page(&self, l1i: u64) -> Result<(SharedPage, usize)> {
        if l1i >= self.nelems {
            return Err(Corruption::new(
                Structure::QedL1Table,
                Problem::IndexOutOfRange {
                    entries: self.nelems,
                },
            )
            .entry(l1i)
            .into());
        }
        let (off, i) = self.page_of(self.l1_offset, l1i);
        let pe = self.page_entries;
        let storage = &*self.storage;
        let page = self.l1.get(off, || table::read_entries(storage, off, pe))?;
        Ok((page, i))
    }

    /// L1 entry `l1i` (unvalidated).
    pub(crate) fn l1_entry(&self, l1i: u64) -> Result<u64> {
        let (page, i) = self.l1_page(l1i)?;
        let g = page.read().unwrap_or_else(|p| p.into_inner());
        Ok(g[i])
    }

    /// How many L1 entries from `l1i` on (within its page, at most `want`, at least one:
    /// `l1i`'s own) are unallocated, so a sparse image is mapped a page of L1 at a time.
    pub(crate) fn l1_unallocated_run(&self, l1i: u64, want: u64) -> Result<u64> {
        let (page, i) = self.l1_page(l1i)?;
        let g = page.read().unwrap_or_else(|p| p.into_inner());
        let want = want.clamp(1, (g.len() - i) as u64) as usize;
        Ok(g[i..i + want]
            .iter()
            .take_while(|v| **v == 0)
            .count()
            .max(1) as u64)
    }

    /// Sets L1 entry `l1i` and writes its write unit back.
    pub(crate) fn l1_set(&self, l1i: u64, value: u64) -> Result<()> {
        let _w = self.l1_write.lock().unwrap_or_else(|p| p.into_inner());
        let (page, i) = self.l1_page(l1i)?;
        let (page_off, _) = self.page_of(self.l1_offset, l1i);
        let (start, bytes) = {
            let mut g = page.write().unwrap_or_else(|p| p.into_inner());
            g[i] = value;
            self.l1.modified();
            let (s, e) = table::write_unit_range(&*self.storage, g.len(), i, 1);
            (s, table::encode(&g[s..e]))
        };
        self.storage.event(BlkEvent::L1Update);
        self.storage.write_at(&bytes, page_off + start as u64 * 8)?;
        Ok(())
    }

    /// The validated offset of the L2 table at L1 index `l1i`, if allocated.
    pub(crate) fn l2_table(&self, l1i: u64) -> Result<Option<u64>> {
        let value = self.l1_entry(l1i)?;
        let off = table::decode_l1(value, &self.geo, self.file_size()).map_err(
            |table::InvalidOffset(off)| {
                Error::from(
                    Corruption::new(
                        Structure::QedL1Table,
                        Problem::BadOffset {
                            index: None,
                            value: off,
                        },
                    )
                    .entry(l1i),
                )
            },
        )?;
        if let Some(off) = off {
            self.note_table(off);
        }
        Ok(off)
    }

    /// Remembers where the L2 tables are, so the double-reference guard also covers
    /// tables no request has looked up yet. Bounded: at most [`OPEN_SCAN_PAGES`] pages of
    /// L1 are read (holes skipped), which covers the whole L1 of usual geometries.
    pub(crate) fn note_tables_at_open(&self) -> Result<()> {
        let pe = self.page_entries;
        let file_size = self.file_size();
        let mut l1i = 0;
        let mut pages = 0;
        while l1i < self.nelems && pages < OPEN_SCAN_PAGES {
            let at = self.l1_offset + l1i * 8;
            let skip = table::hole_pages(&*self.storage, at, pe * 8, (self.nelems - l1i) / pe);
            if skip > 0 {
                l1i += skip * pe;
                continue;
            }
            let (page, _) = self.l1_page(l1i)?;
            let g = page.read().unwrap_or_else(|p| p.into_inner());
            for &off in g.iter() {
                if off != 0 && table_offset_valid(&self.geo, off, file_size) {
                    self.note_table(off);
                }
            }
            l1i += pe;
            pages += 1;
        }
        Ok(())
    }

    /// The cached page holding entry `l2i` of the L2 table at `table`, and the entry's
    /// index in it.
    pub(crate) fn l2_page(&self, table: u64, l2i: u64) -> Result<(SharedPage, usize)> {
        let (off, i) = self.page_of(table, l2i);
        let pe = self.page_entries;
        let storage = &*self.storage;
        let page = self.l2.get(off, || {
            storage.event(BlkEvent::L2Load);
            table::read_entries(storage, off, pe)
        })?;
        Ok((page, i))
    }

    /// Entry `l2i` of the L2 table at `table` (unvalidated).
    pub(crate) fn l2_entry(&self, table: u64, l2i: u64) -> Result<u64> {
        let (page, i) = self.l2_page(table, l2i)?;
        let g = page.read().unwrap_or_else(|p| p.into_inner());
        Ok(g[i])
    }

    /// Applies `updates` to the L2 table at `table`, page by page, writing back the
    /// write units each page changed. Caller holds the table's sync lock.
    pub(crate) fn l2_apply(&self, table: u64, updates: &[Update]) -> Result<()> {
        let pe = self.page_entries;
        for u in updates {
            let mut k = 0;
            while k < u.count {
                let idx = u.first + k;
                let n = (pe - idx % pe).min(u.count - k);
                let (page, i) = self.l2_page(table, idx)?;
                let (page_off, _) = self.page_of(table, idx);
                let (start, bytes) = {
                    let mut g = page.write().unwrap_or_else(|p| p.into_inner());
                    for j in 0..n {
                        g[i + j as usize] = u.value + (k + j) * u.step;
                    }
                    self.l2.modified();
                    let (s, e) = table::write_unit_range(&*self.storage, g.len(), i, n as usize);
                    (s, table::encode(&g[s..e]))
                };
                self.storage.event(BlkEvent::L2Update);
                self.storage.write_at(&bytes, page_off + start as u64 * 8)?;
                k += n;
            }
        }
        Ok(())
    }

    /// Allocates a new L2 table holding `updates` (everything else unallocated) and
    /// returns its offset; the caller then points the L1 entry at it.
    ///
    /// The table is never written whole: its clusters are fresh space at the end of the
    /// file (punched first, in case the file held bytes past the allocation cursor), so
    /// they read as zeroes; only the touched pages' write units are written, plus the
    /// table's last write unit, so the file covers the whole table before the L1 entry
    /// (written after this returns) points at it.
    pub(crate) fn l2_create(&self, updates: &[Update]) -> Result<u64> {
        let off = self.alloc_clusters(self.table_clusters)?;
        let tb = self.geo.table_bytes();
        self.storage.punch_hole(off, tb)?;
        let pe = self.page_entries;
        let unit = table::unit_entries(&*self.storage, pe as usize) as u64;
        let last_unit = self.nelems - unit;
        let mut wrote_last = false;
        let mut pages: Vec<(u64, SharedPage)> = Vec::new();
        for u in updates {
            let mut k = 0;
            while k < u.count {
                let idx = u.first + k;
                let n = (pe - idx % pe).min(u.count - k);
                let (page_off, i) = self.page_of(off, idx);
                let page = match pages.iter().find(|(o, _)| *o == page_off) {
                    Some((_, p)) => p.clone(),
                    None => {
                        let p =
                            std::sync::Arc::new(std::sync::RwLock::new(vec![0u64; pe as usize]));
                        pages.push((page_off, p.clone()));
                        p
                    }
                };
                let (start, bytes) = {
                    let mut g = page.write().unwrap_or_else(|p| p.into_inner());
                    for j in 0..n {
                        g[i + j as usize] = u.value + (k + j) * u.step;
                    }
                    let (s, e) = table::write_unit_range(&*self.storage, g.len(), i, n as usize);
                    (s, table::encode(&g[s..e]))
                };
                let at = page_off + start as u64 * 8;
                if at + bytes.len() as u64 == off + tb {
                    wrote_last = true;
                }
                self.storage.event(BlkEvent::L2Update);
                self.storage.write_at(&bytes, at)?;
                k += n;
            }
        }
        if !wrote_last {
            self.storage
                .write_at(&vec![0u8; (unit * 8) as usize], off + last_unit * 8)?;
        }
        for (page_off, p) in pages {
            self.l2.insert(page_off, p);
        }
        self.l2.modified();
        self.note_table(off);
        Ok(off)
    }
}
