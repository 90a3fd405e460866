//! Cluster allocation: free-cluster search from a hint, contiguous runs, and deferred
//! frees (a refcount only drops once the mapping that released it is durable).

use super::{Meta, MAX_HOST_OFFSET};
use crate::error::{Corruption, NoSpace, Problem, Result, Structure};
use crate::format::qcow2::refcount::get_entry;

/// Applying frees is also triggered when this many are waiting, bounding memory.
pub(crate) const MAX_PENDING_FREES: usize = 65536;

impl Meta {
    /// First cluster index of a run of `n` free clusters at or after the hint.
    /// Clusters without a refcount block are free. Does not reserve anything.
    pub(crate) fn find_free(&mut self, n: u64) -> Result<u64> {
        let per = self.g.rc_per_block;
        // Refcounts claiming clusters far past the end of the file can only come from a
        // corrupt table; bound the scan instead of walking 2^47 entries.
        let max_clusters = (MAX_HOST_OFFSET >> self.g.cluster_bits)
            .min((self.file_end >> self.g.cluster_bits) + n + (1 << 20))
            .max(self.free_hint.saturating_add(n));
        let mut c = self.free_hint;
        let mut run_start = c;
        let mut run = 0u64;
        let mut first_free: Option<u64> = None;
        while c < max_clusters {
            let bi = c / per;
            let off = self.rc_block_offset(bi);
            let block_end = (bi + 1) * per;
            if off == 0 {
                // A whole block of free clusters.
                if run == 0 {
                    run_start = c;
                }
                first_free.get_or_insert(c);
                let take = block_end - c;
                if run + take >= n {
                    break;
                }
                run += take;
                c = block_end;
                continue;
            }
            let i = self.rc_slot(off)?;
            let data = &self.rc.slot(i).data;
            let order = self.g.rc_order;
            while c < block_end {
                if get_entry(data, (c - bi * per) as usize, order) == 0 {
                    if run == 0 {
                        run_start = c;
                    }
                    first_free.get_or_insert(c);
                    run += 1;
                    if run == n {
                        break;
                    }
                } else {
                    run = 0;
                }
                c += 1;
            }
            if run == n {
                break;
            }
        }
        if c >= max_clusters {
            return Err(NoSpace::HostOffsets.into());
        }
        if let Some(f) = first_free {
            self.free_hint = f;
        }
        if let Some(with) = self.overlaps_metadata(run_start, n) {
            return Err(self.mark_corrupt(Corruption::new(
                Structure::HostCluster,
                Problem::AllocationOverlapsMetadata {
                    first: run_start,
                    end: run_start + n,
                    with,
                },
            )));
        }
        Ok(run_start)
    }

    /// Whether host clusters `[c, c+n)` overlap fixed metadata whose refcount must be
    /// nonzero (a cheap version of QEMU's overlap check, applied to allocations).
    pub(crate) fn overlaps_metadata(&self, c: u64, n: u64) -> Option<Structure> {
        let cs = self.cs();
        let (s, e) = (c * cs, (c + n) * cs);
        let hit = |off: u64, len: u64| len > 0 && off < e && s < off + len;
        if c == 0 {
            return Some(Structure::Qcow2Header);
        }
        if hit(self.hdr.l1_table_offset, u64::from(self.hdr.l1_size) * 8) {
            return Some(Structure::L1Table);
        }
        if hit(
            self.hdr.refcount_table_offset,
            u64::from(self.hdr.refcount_table_clusters) * cs,
        ) {
            return Some(Structure::RefcountTable);
        }
        if self.hdr.nb_snapshots > 0 && hit(self.hdr.snapshots_offset, 40) {
            return Some(Structure::SnapshotTable);
        }
        for sn in &self.snapshots {
            if hit(sn.l1_offset, u64::from(sn.l1_size) * 8) {
                return Some(Structure::SnapshotL1Table);
            }
        }
        None
    }

    /// Allocates `n` contiguous clusters (refcount 1 each, in cache) and returns the host
    /// offset of the first.
    pub(crate) fn alloc(&mut self, n: u64) -> Result<u64> {
        self.st.event(crate::storage::BlkEvent::ClusterAlloc);
        let per = self.g.rc_per_block;
        // Each retry creates the refcount blocks the candidate run lacks (all of them:
        // one per retry made a long run over fresh space quadratic, each rescan walking
        // the whole run; the fuzzer's 32 MiB snapshot L1 took seconds); the run may then
        // move past the new blocks. Bounded by the table size.
        for _ in 0..(1u64 << 20) {
            let c = self.find_free(n)?;
            let mut created = false;
            for bi in c / per..=(c + n - 1) / per {
                if self.rc_block_offset(bi) == 0 {
                    self.ensure_rc_block(bi)?;
                    created = true;
                }
            }
            if created {
                continue;
            }
            for k in 0..n {
                self.rc_add(c + k, 1)?;
            }
            if self.free_hint == c {
                self.free_hint = c + n;
            }
            let cs = self.cs();
            self.file_end = self.file_end.max((c + n) * cs);
            return Ok(c * cs);
        }
        Err(NoSpace::Clusters.into())
    }

    /// Gives back clusters that were allocated but never referenced (failed write).
    pub(crate) fn unalloc(&mut self, off: u64, n: u64) -> Result<()> {
        let c0 = off >> self.g.cluster_bits;
        for k in 0..n {
            self.rc_add(c0 + k, -1)?;
        }
        Ok(())
    }

    /// Queues one refcount decrement of the host cluster containing `off`, to be applied
    /// once the mapping change that released it is durable.
    pub(crate) fn defer_free(&mut self, off: u64) {
        let cs = self.cs();
        self.pending_frees.push(off & !(cs - 1));
    }

    /// Applies the queued decrements (the caller made the mappings durable) and punches
    /// holes into clusters that became free.
    pub(crate) fn apply_frees(&mut self) -> Result<()> {
        self.st.event(crate::storage::BlkEvent::ClusterFree);
        let mut frees = std::mem::take(&mut self.pending_frees);
        frees.sort_unstable();
        let cs = self.cs();
        let mut punch: Vec<(u64, u64)> = Vec::new();
        for off in frees {
            let c = off >> self.g.cluster_bits;
            if self.rc_add(c, -1)? == 0 {
                self.l2.forget(off);
                if self.compress_cursor != 0 && self.compress_cursor / cs == c {
                    self.compress_cursor = 0;
                }
                match punch.last_mut() {
                    Some((s, l)) if *s + *l == off => *l += cs,
                    _ => punch.push((off, cs)),
                }
            }
        }
        for (s, l) in punch {
            // Best effort: a filesystem without hole punching keeps the bytes.
            let _ = self.st.punch_hole(s, l);
            self.unflushed = true;
        }
        Ok(())
    }
}
