//! Block status of this layer, derived from the mapping runs (`mapping::map_run`): one
//! walk for standard and extended L2 entries.
//!
//! Concurrency: under the metadata mutex, bounded work per call (callers loop). No
//! metadata is written.

use super::{Meta, Qcow2};
use crate::error::Result;
use crate::format::mapping::Mapping;
use crate::format::Extent;

/// Mapping lookups one status call may merge (runs of data that differ only in what
/// block status does not report, such as COPIED).
const MAX_MERGED_RUNS: usize = 16;

impl Qcow2 {
    pub(crate) fn do_block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let mut m = self.lock();
        let first = m.map_run(offset, len)?;
        let mut ext = first.extent();
        if let Mapping::Data { .. } = first.mapping {
            let mut runs = 1;
            while ext.len < len && runs < MAX_MERGED_RUNS {
                let next = m.map_run(offset + ext.len, len - ext.len)?.extent();
                if next.kind != ext.kind
                    || next.compressed
                    || ext.offset.map(|o| o + ext.len) != next.offset
                {
                    break;
                }
                ext.len += next.len;
                runs += 1;
            }
        }
        if self.g.ext_l2 && first.mapping == Mapping::Unallocated {
            m.unallocated_host(offset, &mut ext)?;
        }
        if self.crypto.is_some() {
            // As QEMU: no host offset for encrypted data (it is not the guest's bytes).
            ext.offset = None;
        }
        Ok(ext)
    }
}

impl Meta {
    /// With subclusters, unallocated subclusters of a cluster that has a host cluster
    /// report their host offset, as QEMU does (`QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC`):
    /// the unallocated extent at `offset` is cut where clusters change between having a
    /// host cluster and not, or stop being host contiguous, and gets the offset.
    fn unallocated_host(&mut self, offset: u64, ext: &mut Extent) -> Result<()> {
        let cs = self.g.cs;
        let end = offset + ext.len;
        let gc = offset / cs;
        let host = self.entry_of(gc)?.host();
        let mut next = host.map(|h| h.get() + cs);
        let mut g = gc + 1;
        // Bounded by the extent, itself bounded by the mapping walk.
        while g * cs < end {
            let h = self.entry_of(g)?.host().map(|h| h.get());
            if h != next || (host.is_none() && h.is_some()) {
                break;
            }
            next = next.map(|n| n + cs);
            g += 1;
        }
        ext.len = ext.len.min(g * cs - offset);
        ext.offset = host.map(|h| h.get() + offset % cs);
        Ok(())
    }
}
