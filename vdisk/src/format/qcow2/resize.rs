//! Guest size changes: growing the L1 table (written complete to a new place before
//! the header points at it), shrinking (clusters past the new end deallocated first).
//!
//! Concurrency: under the metadata mutex except for the deallocation of a shrink and the
//! zeroing of the old last cluster's tail, which take it themselves.
//!
//! Crash rules: the new L1 table is written and flushed (barrier) before the header
//! names it; the old table's clusters are released only after the header update; the
//! size in the header changes after every metadata change it depends on is durable.

use super::zero::Mode;
use super::{Meta, Qcow2};
use crate::error::{Invalid, Result, Unsupported};
use crate::format::{Driver, ZeroFlags};

impl Qcow2 {
    pub(crate) fn do_resize(&self, new_size: u64, shrink: bool) -> Result<()> {
        let cs = self.g.cs;
        let cur = self.size();
        if new_size == cur {
            return Ok(());
        }
        let mut m = self.lock();
        m.check_writable()?;
        // Snapshots record their own disk size (v3), so growing and shrinking are safe
        // (QEMU 10 allows both): a shrink drops the active disk's references past the
        // new end, and clusters a snapshot shares only lose that reference.
        if !m.snapshots.is_empty() && m.g.version < 3 {
            return Err(Unsupported::ResizeV2WithSnapshots.into());
        }
        if new_size < cur && !shrink {
            return Err(Invalid::ShrinkNeedsFlag.into());
        }
        // Bitmaps follow the disk: loaded, marked in use and resized before the size changes.
        self.bm_resize(&mut m, new_size)?;
        if new_size < cur {
            drop(m);
            let first = new_size.div_ceil(cs);
            let last = cur.div_ceil(cs);
            if first < last {
                self.set_clusters(first, last, Mode::Dealloc)?;
            }
            m = self.lock();
        } else {
            let need = m.g.l1_entries_for(new_size);
            if need * 8 > super::header::MAX_L1_BYTES {
                return Err(Invalid::L1TooLarge { size: new_size }.into());
            }
            if need > m.l1.len() as u64 {
                m.grow_l1(need, Some(new_size))?;
            }
        }
        m.writeback()?;
        m.barrier()?;
        if m.ext_data && new_size > cur {
            // As QEMU, the data file follows the disk's size (grown before the header
            // says so: a longer data file is harmless).
            m.data.set_len(new_size)?;
        }
        m.hdr.size = new_size;
        m.write_header()?;
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        if m.ext_data && new_size < cur {
            // Clusters past the new end are unmapped and durable: cut the data file.
            m.data.set_len(new_size)?;
        }
        if new_size < cur {
            // As QEMU: the file ends after its last cluster in use (the freed clusters
            // past it were only punched). The refcounts are durable; failing to
            // truncate leaves a longer file, not an inconsistent one.
            let file_len = m.st.len()?;
            let mut c = file_len.div_ceil(cs);
            while c > 0 && m.rc_get(c - 1)? == 0 {
                c -= 1;
            }
            if c * cs < file_len {
                if let Err(e) = m.st.set_len(c * cs) {
                    tracing::warn!("Failed to truncate the tail of the image: {e}");
                }
            }
        }
        drop(m);
        // Growing: bytes of the old last cluster past the old end may hold data from
        // before a shrink; the new part of the disk must read as zeroes.
        if new_size > cur && !cur.is_multiple_of(cs) {
            let tail_end = cur.div_ceil(cs) * cs;
            self.do_write_zeroes(cur, tail_end.min(new_size) - cur, ZeroFlags::default())?;
        }
        Ok(())
    }
}

impl Meta {
    /// Replaces the L1 table by one of `entries` entries (more than it has): written
    /// complete to new clusters and made durable before the header names it, the old
    /// table's clusters released after. `size`, if given, goes into the same header
    /// write (a resize's new guest size).
    pub(crate) fn grow_l1(&mut self, entries: u64, size: Option<u64>) -> Result<()> {
        let cs = self.g.cs;
        self.writeback()?;
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(cs);
        self.st.event(crate::storage::BlkEvent::L1GrowAllocTable);
        let new_off = self.alloc(clusters)?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let mut raw = Vec::with_capacity(bytes as usize);
        for e in &l1 {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        // Like QEMU, only the entries are written: the file may end inside the
        // table's last cluster.
        self.st.event(crate::storage::BlkEvent::L1GrowWriteTable);
        self.st.write_at(&raw, new_off)?;
        self.unflushed = true;
        self.barrier()?;
        let old_off = self.hdr.l1_table_offset;
        let old_clusters = (u64::from(self.hdr.l1_size) * 8).div_ceil(cs);
        self.hdr.l1_table_offset = new_off;
        self.hdr.l1_size = entries as u32;
        if let Some(size) = size {
            self.hdr.size = size;
        }
        self.l1 = l1;
        self.st.event(crate::storage::BlkEvent::L1GrowActivateTable);
        self.write_header()?;
        for i in 0..old_clusters {
            self.rc_add(old_off / cs + i, -1)?;
        }
        Ok(())
    }
}
