//! Internal snapshots: create, apply (revert) and delete, as QEMU 10 does them.
//!
//! A snapshot is a copy of the active L1 table plus one more reference to every
//! cluster it reaches (L2 tables, data clusters, the host clusters of compressed
//! data); shared clusters have COPIED clear, so a later write copies them first.
//!
//! Concurrency: each operation holds the metadata mutex from start to end, after
//! waiting for every allocation in flight; cached metadata is written back first, so
//! the tables on disk are the tables in memory.
//!
//! Crash rules (the header is the commit point of each operation, and the two header
//! writes used — `nb_snapshots` + `snapshots_offset` at byte 60, and size + L1 size +
//! L1 offset at byte 24 — are single writes inside the first sector):
//! - **create**: refcounts of everything the active L1 reaches are raised and the
//!   COPIED flags of the active tables cleared, the L1 copy and the new snapshot table
//!   are written and all of it is flushed before the header names the new table; the
//!   old table is released after. A crash before the header update leaves the old
//!   snapshot list with higher refcounts (leaks) and possibly COPIED flags that are
//!   clear on clusters of refcount one or set on clusters whose extra reference is a
//!   leak: both harmless (a write copies, or writes a cluster nobody else uses), and
//!   `check -r all` repairs them, as for QEMU, which has the same window.
//! - **apply**: refcounts of everything the snapshot reaches are raised and a new
//!   active L1 table (a copy of the snapshot's) is written and flushed before the
//!   header switches to it (and to the snapshot's disk size); the old active tables
//!   lose their reference only afterwards. A crash before the switch leaks; after it,
//!   only leaks too.
//! - **delete**: the table without the entry is written and flushed, the header
//!   switched, and only then the snapshot's references are dropped (clusters reaching
//!   zero are freed) and the COPIED flags of active tables whose refcount became one
//!   set again, after the lower refcounts are durable.

use super::header::{MAX_L1_BYTES, MAX_SNAPSHOTS};
use super::snapshot::{self, encode_entry, encode_table, Snapshot};
use super::tables::{entry, set};
use super::{Meta, Qcow2, COMPRESSED, COPIED, L1E_RESERVED, MAX_HOST_OFFSET, OFFSET_MASK};
use crate::error::{Corruption, Error, NoSpace, Problem, Result, SnapshotError, Structure};
use crate::format::{Driver, SnapshotInfo};
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

/// Longest ID or name an entry can hold (16-bit lengths).
const MAX_TEXT: usize = u16::MAX as usize;

/// The ID QEMU gives a new snapshot: one more than the largest ID read as a number
/// (`strtoul`: leading blanks, a sign, digits; anything else counts as 0).
pub(crate) fn next_id(snaps: &[Snapshot]) -> String {
    let max = snaps.iter().map(|s| strtoul(&s.info.id)).max().unwrap_or(0);
    max.wrapping_add(1).to_string()
}

/// C's `strtoul(s, NULL, 10)` on a 64-bit system.
fn strtoul(s: &str) -> u64 {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let mut v: u64 = 0;
    let mut overflow = false;
    for c in t.bytes().take_while(u8::is_ascii_digit) {
        match v
            .checked_mul(10)
            .and_then(|x| x.checked_add(u64::from(c - b'0')))
        {
            Some(n) => v = n,
            None => overflow = true,
        }
    }
    if overflow {
        u64::MAX
    } else if neg {
        v.wrapping_neg()
    } else {
        v
    }
}

/// Index of the first snapshot with this ID and/or name (QEMU's
/// `find_snapshot_by_id_and_name`; both given: both must match).
pub(crate) fn find(snaps: &[Snapshot], id: Option<&str>, name: Option<&str>) -> Option<usize> {
    if id.is_none() && name.is_none() {
        return None;
    }
    snaps
        .iter()
        .position(|s| id.is_none_or(|i| s.info.id == i) && name.is_none_or(|n| s.info.name == n))
}

/// Index of the snapshot an ID or a name designates: the ID first (QEMU's
/// `find_snapshot_by_id_or_name`, used by apply).
pub(crate) fn find_id_or_name(snaps: &[Snapshot], s: &str) -> Option<usize> {
    find(snaps, Some(s), None).or_else(|| find(snaps, None, Some(s)))
}

/// What one L2 table entry references: nothing, one host cluster, or the host
/// clusters `[first, last]` of compressed data.
fn entry_clusters(m: &Meta, e: u64) -> Option<(u64, u64)> {
    let cs = m.g.cs;
    if e & COMPRESSED != 0 {
        let shift = m.g.csize_shift();
        let e = e & !(COPIED | COMPRESSED);
        let nsec = ((e >> shift) & ((1u64 << (62 - shift)) - 1)) + 1;
        let start = (e & ((1u64 << shift) - 1)) & !511;
        return Some((start / cs, (start + nsec * 512 - 1) / cs));
    }
    let off = e & OFFSET_MASK;
    (off != 0).then_some((off / cs, off / cs))
}

impl Meta {
    /// The L2 table offsets an L1 table names, validated (reserved bits clear, cluster
    /// aligned, inside the file). `snap` is the snapshot index for the error.
    fn l2_offsets(&self, l1: &[u64], snap: Option<usize>) -> Result<Vec<(usize, u64)>> {
        let structure = if snap.is_some() {
            Structure::SnapshotL1Table
        } else {
            Structure::L1Table
        };
        let mut v = Vec::new();
        for (i, &e) in l1.iter().enumerate() {
            if e & L1E_RESERVED != 0 {
                return Err(Corruption::new(
                    structure,
                    Problem::ReservedBits {
                        raw: e,
                        guest_cluster: None,
                    },
                )
                .entry(i as u64)
                .into());
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(self.cs()) || off >= self.file_end {
                return Err(Corruption::new(Structure::L2Table, Problem::Misplaced)
                    .entry(i as u64)
                    .at(off)
                    .into());
            }
            v.push((i, off));
        }
        Ok(v)
    }

    /// A copy of the L2 table at `off` (through the cache, so a table shared with the
    /// active L1 reads as the active tables see it).
    fn l2_copy(&mut self, off: u64, l1i: usize) -> Result<Vec<u8>> {
        let s = self.l2_slot(off, l1i)?;
        Ok(self.l2.slot(s).data.clone())
    }

    /// Adds one reference to every cluster the L1 table `l1` reaches. On a refcount
    /// overflow nothing stays changed in memory (refcount blocks already written
    /// back only leak).
    fn raise_refs(&mut self, l1: &[u64], snap: Option<usize>) -> Result<()> {
        let r = self.raise_refs_inner(l1, snap);
        if r.is_err() {
            // The cache was clean when the walk began: forgetting it undoes it.
            self.rc.clear();
        }
        r
    }

    fn raise_refs_inner(&mut self, l1: &[u64], snap: Option<usize>) -> Result<()> {
        let max = self.g.rc_max();
        for (l1i, off) in self.l2_offsets(l1, snap)? {
            self.raise_one(off / self.cs(), max)?;
            let t = self.l2_copy(off, l1i)?;
            for j in 0..self.g.l2_entries as usize {
                let e = entry(&t, self.g.l2_word(j));
                if let Some((first, last)) = entry_clusters(self, e) {
                    if last >= MAX_HOST_OFFSET / self.cs() {
                        return Err(Corruption::new(Structure::DataCluster, Problem::Misplaced)
                            .entry(j as u64)
                            .at(first * self.cs())
                            .into());
                    }
                    for c in first..=last {
                        self.raise_one(c, max)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn raise_one(&mut self, c: u64, max: u64) -> Result<()> {
        match self.rc_add(c, 1) {
            Err(Error::NoSpace(NoSpace::RefcountOverflow { .. })) => {
                Err(SnapshotError::RefcountOverflow { cluster: c, max }.into())
            }
            r => r.map(|_| ()),
        }
    }

    /// Queues one refcount decrement for every cluster the L1 table `l1` reaches (and
    /// applies them in bounded batches: the caller made sure nothing references them
    /// through this table any more).
    fn drop_refs(&mut self, l1: &[u64], snap: Option<usize>) -> Result<()> {
        for (l1i, off) in self.l2_offsets(l1, snap)? {
            let t = self.l2_copy(off, l1i)?;
            self.defer_free(off);
            for j in 0..self.g.l2_entries as usize {
                let e = entry(&t, self.g.l2_word(j));
                if let Some((first, last)) = entry_clusters(self, e) {
                    for c in first..=last.min(first + self.g.l2_entries) {
                        self.defer_free(c * self.cs());
                    }
                }
            }
            if self.pending_frees.len() >= super::alloc::MAX_PENDING_FREES {
                self.apply_frees()?;
            }
        }
        self.apply_frees()
    }

    /// Sets the COPIED flags of the active L1 and L2 tables from the refcounts: set
    /// exactly where the refcount is one (in cache; written back by `writeback`).
    fn fix_copied(&mut self) -> Result<()> {
        for (l1i, off) in self.l2_offsets(&self.l1.clone(), None)? {
            let rc = self.rc_get(off / self.cs())?;
            let want = if rc == 1 {
                self.l1[l1i] | COPIED
            } else {
                self.l1[l1i] & !COPIED
            };
            if want != self.l1[l1i] {
                self.l1[l1i] = want;
                self.l1_dirty = Some(match self.l1_dirty {
                    None => (l1i, l1i + 1),
                    Some((lo, hi)) => (lo.min(l1i), hi.max(l1i + 1)),
                });
            }
            self.fix_copied_l2(off, l1i, rc == 1)?;
        }
        Ok(())
    }

    /// COPIED of the data entries of one L2 table: only cleared in a shared table,
    /// set or cleared by refcount in a table of refcount one.
    fn fix_copied_l2(&mut self, off: u64, l1i: usize, owned: bool) -> Result<()> {
        let mut t = self.l2_copy(off, l1i)?;
        let mut changed = false;
        for j in 0..self.g.l2_entries as usize {
            let w = self.g.l2_word(j);
            let e = entry(&t, w);
            if e & COMPRESSED != 0 || e & OFFSET_MASK == 0 {
                continue;
            }
            let rc = self.rc_get((e & OFFSET_MASK) / self.cs())?;
            let want = if rc == 1 && owned {
                e | COPIED
            } else {
                e & !COPIED
            };
            if want != e {
                set(&mut t, w, want);
                changed = true;
            }
        }
        if changed {
            let s = self.l2_slot(off, l1i)?;
            self.l2.slot_mut(s).data = t;
            self.l2_dirty(s);
        }
        Ok(())
    }

    /// Writes back everything cached and makes it durable.
    fn settle(&mut self) -> Result<()> {
        self.writeback()?;
        self.unflushed = true;
        self.barrier()
    }

    /// Writes `bytes` into newly allocated clusters and returns their offset (0 for
    /// nothing to write). The refcounts are in cache; the caller flushes.
    fn alloc_write(&mut self, bytes: &[u8]) -> Result<u64> {
        if bytes.is_empty() {
            return Ok(0);
        }
        let clusters = (bytes.len() as u64).div_ceil(self.cs());
        let off = self.alloc(clusters)?;
        self.st.write_at(bytes, off)?;
        self.unflushed = true;
        Ok(off)
    }

    /// Releases the clusters of `[off, off + len)` (a table the header stopped naming).
    fn free_region(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let cs = self.cs();
        for c in off / cs..=(off + len - 1) / cs {
            self.defer_free(c * cs);
        }
    }

    /// Points the header at a new snapshot table (one 12-byte write, then a flush).
    fn switch_snapshot_table(&mut self, snaps: Vec<Snapshot>, off: u64) -> Result<()> {
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&(snaps.len() as u32).to_be_bytes());
        h[4..].copy_from_slice(&off.to_be_bytes());
        self.st.write_at(&h, 60)?;
        self.st.flush()?;
        self.unflushed = false;
        self.hdr.nb_snapshots = snaps.len() as u32;
        self.hdr.snapshots_offset = off;
        self.snapshots = snaps;
        Ok(())
    }

    /// Writes the table for `snaps` to new clusters, makes it (and everything before)
    /// durable, switches the header to it and releases the old table.
    pub(crate) fn replace_snapshot_table(&mut self, snaps: Vec<Snapshot>) -> Result<()> {
        let old_off = self.hdr.snapshots_offset;
        let old_len = if self.hdr.nb_snapshots > 0 {
            snapshot::table_len(&*self.st, &self.hdr)?
        } else {
            0
        };
        let table = encode_table(&snaps);
        let off = self.alloc_write(&table)?;
        self.settle()?;
        self.switch_snapshot_table(snaps, off)?;
        self.free_region(old_off, old_len);
        Ok(())
    }
}

impl Qcow2 {
    /// The metadata, with no allocation in flight and every cached change written
    /// back and durable, ready for a snapshot operation.
    fn quiesced(&self) -> Result<MutexGuard<'_, Meta>> {
        self.writable()?;
        let mut m = self.lock();
        m.check_writable()?;
        // Bounded by the requests in flight, each of which finishes.
        while !m.inflight.is_empty() || !m.direct.is_empty() {
            m = self.wait_alloc_done(m);
        }
        m.settle()?;
        Ok(m)
    }

    /// `snapshot -c`: a new snapshot of the active state. `sn.id` empty picks the next
    /// free ID; the name is kept as given (QEMU allows duplicate names).
    pub(crate) fn do_snapshot_create(&self, sn: &SnapshotInfo) -> Result<SnapshotInfo> {
        let mut m = self.quiesced()?;
        if m.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(SnapshotError::TooMany(MAX_SNAPSHOTS).into());
        }
        let id = if sn.id.is_empty() {
            next_id(&m.snapshots)
        } else {
            if find(&m.snapshots, Some(&sn.id), None).is_some() {
                return Err(SnapshotError::IdExists(sn.id.clone()).into());
            }
            sn.id.clone()
        };
        for t in [&id, &sn.name] {
            if t.len() > MAX_TEXT {
                return Err(SnapshotError::TooLong(t.len()).into());
            }
        }
        let l1 = m.l1.clone();
        m.raise_refs(&l1, None)?;
        // Everything the active L1 reaches is now shared with the snapshot.
        for e in m.l1.iter_mut() {
            *e &= !COPIED;
        }
        if !m.l1.is_empty() {
            m.l1_dirty = Some((0, m.l1.len()));
        }
        for (l1i, off) in m.l2_offsets(&l1, None)? {
            m.fix_copied_l2(off, l1i, false)?;
        }
        let copy: Vec<u8> = m.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_off = m.alloc_write(&copy)?;
        let info = SnapshotInfo {
            id: id.clone(),
            ..sn.clone()
        };
        let raw = encode_entry(
            l1_off,
            m.l1.len() as u32,
            &info,
            id.as_bytes(),
            sn.name.as_bytes(),
            self.size(),
        );
        let new = snapshot::decode_entry(raw).ok_or_else(|| {
            Error::from(Corruption::new(
                Structure::SnapshotTable,
                Problem::Misplaced,
            ))
        })?;
        let info = new.info.clone();
        let mut snaps = m.snapshots.clone();
        snaps.push(new);
        m.replace_snapshot_table(snaps)?;
        m.settle()?;
        Ok(info)
    }

    /// `snapshot -a`: the active disk becomes the snapshot's (its contents and its
    /// size). `which` is an ID or, when no ID matches, a name.
    pub(crate) fn do_snapshot_apply(&self, which: &str) -> Result<SnapshotInfo> {
        let mut m = self.quiesced()?;
        let Some(idx) = find_id_or_name(&m.snapshots, which) else {
            return Err(SnapshotError::NotFound(which.to_string()).into());
        };
        let sn = m.snapshots[idx].clone();
        let new_size = sn.disk_size.unwrap_or(self.size());
        let need = m.g.l1_entries_for(new_size);
        let len = need.max(u64::from(sn.l1_size));
        if len * 8 > MAX_L1_BYTES {
            return Err(Corruption::new(
                Structure::SnapshotL1Table,
                Problem::TooLarge {
                    field: crate::error::Field::Entries,
                    value: len,
                    max: MAX_L1_BYTES / 8,
                },
            )
            .entry(idx as u64)
            .into());
        }
        let mut l1 = vec![0u64; len as usize];
        if sn.l1_size > 0 {
            let mut raw = vec![0u8; sn.l1_size as usize * 8];
            m.st.read_at(&mut raw, sn.l1_offset)?;
            for (i, e) in l1.iter_mut().take(sn.l1_size as usize).enumerate() {
                *e = entry(&raw, i) & !COPIED;
            }
        }
        m.raise_refs(&l1, Some(idx))?;
        // The snapshot's tables are shared now: no COPIED flag may stay set in them.
        for (l1i, off) in m.l2_offsets(&l1, Some(idx))? {
            m.fix_copied_l2(off, l1i, false)?;
        }
        let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let new_off = m.alloc_write(&bytes)?;
        m.settle()?;
        // The switch: size, L1 size and L1 offset in one write.
        let old_l1 = std::mem::replace(&mut m.l1, l1);
        let old_off = m.hdr.l1_table_offset;
        let old_bytes = u64::from(m.hdr.l1_size) * 8;
        let mut h = [0u8; 24];
        h[..8].copy_from_slice(&new_size.to_be_bytes());
        h[8..12].copy_from_slice(&m.hdr.crypt_method.to_be_bytes());
        h[12..16].copy_from_slice(&(len as u32).to_be_bytes());
        h[16..].copy_from_slice(&new_off.to_be_bytes());
        m.st.write_at(&h, 24)?;
        m.st.flush()?;
        m.unflushed = false;
        m.hdr.size = new_size;
        m.hdr.l1_size = len as u32;
        m.hdr.l1_table_offset = new_off;
        m.l1_dirty = None;
        self.size.store(new_size, Ordering::Release);
        // The old active state loses its references.
        m.drop_refs(&old_l1, None)?;
        if old_off != 0 {
            m.free_region(old_off, old_bytes);
        }
        m.apply_frees()?;
        m.settle()?;
        m.fix_copied()?;
        m.settle()?;
        m.compress_cursor = 0;
        Ok(sn.info)
    }

    /// `snapshot -d`: removes the first snapshot with this ID and/or name.
    pub(crate) fn do_snapshot_delete(
        &self,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<SnapshotInfo> {
        let mut m = self.quiesced()?;
        let Some(idx) = find(&m.snapshots, id, name) else {
            return Err(SnapshotError::NotFound(id.or(name).unwrap_or("").to_string()).into());
        };
        let mut snaps = m.snapshots.clone();
        let sn = snaps.remove(idx);
        let mut l1 = vec![0u64; sn.l1_size as usize];
        if sn.l1_size > 0 {
            let mut raw = vec![0u8; sn.l1_size as usize * 8];
            m.st.read_at(&mut raw, sn.l1_offset)?;
            for (i, e) in l1.iter_mut().enumerate() {
                *e = entry(&raw, i);
            }
        }
        // Validate before anything changes.
        m.l2_offsets(&l1, Some(idx))?;
        m.replace_snapshot_table(snaps)?;
        // Nothing names the snapshot any more: its references go.
        m.drop_refs(&l1, Some(idx))?;
        m.free_region(sn.l1_offset, u64::from(sn.l1_size) * 8);
        m.apply_frees()?;
        m.settle()?;
        m.fix_copied()?;
        m.settle()?;
        Ok(sn.info)
    }
}

impl Qcow2 {
    /// Reads the snapshot instead of the active disk from now on (QEMU's
    /// `bdrv_snapshot_load_tmp`, for `convert -l` and exports): the snapshot's L1
    /// table becomes the one lookups use; the guest size stays the image's. Only for
    /// images opened read-only; nothing is written.
    pub(crate) fn do_snapshot_load(
        &self,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<SnapshotInfo> {
        if !self.read_only {
            return Err(SnapshotError::NotReadOnly.into());
        }
        let mut m = self.lock();
        let Some(idx) = find(&m.snapshots, id, name) else {
            return Err(SnapshotError::NotFoundForLoad.into());
        };
        let sn = m.snapshots[idx].clone();
        let mut l1 = vec![0u64; sn.l1_size as usize];
        if sn.l1_size > 0 {
            let mut raw = vec![0u8; sn.l1_size as usize * 8];
            m.st.read_at(&mut raw, sn.l1_offset)?;
            for (i, e) in l1.iter_mut().enumerate() {
                *e = entry(&raw, i);
            }
        }
        m.l2_offsets(&l1, Some(idx))?;
        m.l1 = l1;
        Ok(sn.info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, name: &str) -> Snapshot {
        let info = SnapshotInfo {
            id: id.into(),
            name: name.into(),
            vm_state_size: 0,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            icount: None,
        };
        snapshot::decode_entry(encode_entry(
            0x1000,
            1,
            &info,
            id.as_bytes(),
            name.as_bytes(),
            0,
        ))
        .unwrap()
    }

    #[test]
    fn next_id_is_one_more_than_the_largest_number() {
        assert_eq!(next_id(&[]), "1");
        assert_eq!(
            next_id(&[snap("1", "a"), snap("7", "b"), snap("3", "c")]),
            "8"
        );
        // IDs that are not numbers count as 0; leading digits count.
        assert_eq!(next_id(&[snap("abc", "a")]), "1");
        assert_eq!(next_id(&[snap("12abc", "a"), snap(" 4", "b")]), "13");
        assert_eq!(strtoul("-1"), u64::MAX);
        assert_eq!(strtoul("+5"), 5);
        assert_eq!(strtoul("99999999999999999999999"), u64::MAX);
        assert_eq!(next_id(&[snap("18446744073709551615", "a")]), "0");
    }

    #[test]
    fn lookups_follow_qemu() {
        let v = [snap("1", "2"), snap("2", "x"), snap("3", "x")];
        // Apply: the ID first, then the name.
        assert_eq!(find_id_or_name(&v, "2"), Some(1));
        assert_eq!(find_id_or_name(&v, "x"), Some(1));
        assert_eq!(find_id_or_name(&v, "nosuch"), None);
        // Delete by both: both must match; the first match wins.
        assert_eq!(find(&v, Some("3"), Some("x")), Some(2));
        assert_eq!(find(&v, Some("1"), Some("x")), None);
        assert_eq!(find(&v, None, Some("x")), Some(1));
        assert_eq!(find(&v, None, None), None);
    }
}
