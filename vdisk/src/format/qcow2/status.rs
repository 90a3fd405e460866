//! Block status of this layer, derived from the mapping runs (`mapping::map_run`): one
//! walk for standard and extended L2 entries.
//!
//! Concurrency: under the metadata mutex, bounded work per call (callers loop). No
//! metadata is written.

use super::Qcow2;
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
        if self.crypto.is_some() {
            // As QEMU: no host offset for encrypted data (it is not the guest's bytes).
            ext.offset = None;
        }
        Ok(ext)
    }
}
