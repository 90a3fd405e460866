//! Mapping: what the L1/L2 tables say about a guest range, as the contract's typed
//! runs ([`Run`]), and block status derived from them.
//!
//! Concurrency: lookups take no lock beyond a cached page's read lock for the moment
//! of a lookup; an answer can be stale as soon as it is returned (a concurrent
//! allocation may fill an unallocated run). Writers that act on an answer re-map
//! under their L2 table's lock (see `write`), readers of a stale unallocated answer
//! read what the guest saw before the concurrent write, which is allowed.
//! Crash rules: none here (nothing is written), but every offset read from a table is
//! validated before use, and data writes are refused over known L2 tables
//! ([`Inner::guard_data_write`]): a corrupt image must not turn a guest write into
//! metadata damage.

use super::table::{Entry, InvalidOffset};
use super::Inner;
use crate::error::{Corruption, Error, Invalid, Problem, Result, Structure};
use crate::format::mapping::{HostOffset, Mapping, Run, Store};
use crate::format::{check_range, Extent};
use std::sync::Arc;

/// How many L2 table offsets [`Inner::note_table`] remembers at most.
const MAX_KNOWN_TABLES: usize = 4096;

/// The contract's mapping of QED entry `e`, positioned `in_cluster` bytes into its
/// cluster. QED data clusters are always writable in place (each is referenced once and
/// never shared), and the format has no compressed clusters.
fn mapping_of(e: Entry, in_cluster: u64) -> Mapping {
    match e {
        Entry::Data(h) => Mapping::Data {
            store: Store::Data,
            host: HostOffset(h + in_cluster),
            in_place: true,
        },
        Entry::Zero => Mapping::Zero { host: None },
        Entry::Unallocated => Mapping::Unallocated,
    }
}

/// A run produced by [`Inner::map_range`] as a QED entry kind (for data: the host offset
/// of the run's first byte), for the callers that act on clusters (zero writes,
/// discard). QED never maps a run compressed.
pub(super) fn entry_of(run: &Run) -> Result<Entry> {
    match run.mapping {
        Mapping::Data { host, .. } => Ok(Entry::Data(host.get())),
        Mapping::Zero { .. } => Ok(Entry::Zero),
        Mapping::Unallocated => Ok(Entry::Unallocated),
        Mapping::Compressed { .. } => {
            Err(Corruption::new(Structure::QedL2Table, Problem::CompressedMapping).into())
        }
    }
}

impl Inner {
    pub(super) fn split(&self, guest: u64) -> (u64, u64) {
        let cluster = guest / self.cluster_size;
        (cluster / self.nelems, cluster % self.nelems)
    }

    fn classify(&self, value: u64, l1i: u64, l2i: u64, l2_off: u64) -> Result<Entry> {
        Entry::decode(value, &self.geo, self.file_size()).map_err(|InvalidOffset(v)| {
            Error::from(
                Corruption::new(
                    Structure::QedL2Table,
                    Problem::BadOffset {
                        index: Some(l2i),
                        value: v,
                    },
                )
                .entry(l1i)
                .at(l2_off),
            )
        })
    }

    /// Maps up to `max` (> 0) guest bytes at `guest`, stopping at the end of its L2 table page
    /// or where the mapping changes kind (or stops being contiguous in the file). Runs of
    /// unallocated L1 entries are mapped in one step, so a huge sparse image costs one
    /// lookup per L1 page, not per cluster or per table.
    pub(super) fn map_range(&self, guest: u64, max: u64) -> Result<Run> {
        let cs = self.cluster_size;
        let (l1i, l2i) = self.split(guest);
        let in_cluster = guest % cs;
        let table_left = (self.nelems - l2i) * cs - in_cluster;
        let Some(l2_off) = self.l2_table(l1i)? else {
            let span = self.nelems.saturating_mul(cs);
            let want = 1 + max.saturating_sub(table_left).div_ceil(span);
            let free = self.l1_unallocated_run(l1i, want)?;
            let len = table_left.saturating_add((free - 1).saturating_mul(span));
            return Ok(Run {
                len: len.min(max),
                mapping: Mapping::Unallocated,
            });
        };
        let pe = self.page_entries;
        let page_left = (pe - l2i % pe) * cs - in_cluster;
        let max = max.min(table_left).min(page_left);
        let (page, pi) = self.l2_page(l2_off, l2i)?;
        let t = page.read().unwrap_or_else(|p| p.into_inner());
        let first = self.classify(t[pi], l1i, l2i, l2_off)?;
        let mut len = (cs - in_cluster).min(max);
        let mut i = l2i + 1;
        while len < max {
            let e = self.classify(t[pi + (i - l2i) as usize], l1i, i, l2_off)?;
            let same = match (first, e) {
                (Entry::Data(a), Entry::Data(b)) => b == a + (i - l2i) * cs,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            len = (len + cs).min(max);
            i += 1;
        }
        Ok(Run {
            len,
            mapping: mapping_of(first, in_cluster),
        })
    }

    /// Remembers that an L2 table lives at `off`.
    pub(crate) fn note_table(&self, off: u64) {
        let mut k = self.known_tables.lock().unwrap_or_else(|p| p.into_inner());
        if k.len() >= MAX_KNOWN_TABLES && !k.contains(&off) {
            // Bounded memory: start over (the tables in use get noted again).
            k.clear();
        }
        k.insert(off);
    }

    /// Refuses a data write to `[host, host+len)` that would overwrite a known L2 table
    /// (a cluster referenced twice, once as data and once as a table).
    pub(super) fn guard_data_write(&self, host: u64, len: u64) -> Result<()> {
        let k = self.known_tables.lock().unwrap_or_else(|p| p.into_inner());
        let tb = self.geo.table_bytes();
        if let Some(&t) = k.range(..host.saturating_add(len)).next_back() {
            if t.saturating_add(tb) > host {
                return Err(Corruption::new(
                    Structure::QedL2Table,
                    Problem::DataOverlapsTable { host },
                )
                .at(t)
                .into());
            }
        }
        Ok(())
    }

    /// Whether an unallocated guest range reads as zeroes (no backing data under it).
    pub(super) fn backing_is_zero(&self, guest: u64) -> bool {
        match &self.backing {
            None => true,
            Some(b) => guest >= b.size(),
        }
    }
}

impl Inner {
    pub(crate) fn image_size(&self) -> u64 {
        self.image_size.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Status of the range at `offset` in this image only: the mapping run, as an extent.
pub(crate) fn block_status(inner: &Arc<Inner>, offset: u64, len: u64) -> Result<Extent> {
    check_range(offset, len, inner.image_size())?;
    if len == 0 {
        return Err(Invalid::EmptyBlockStatus { offset }.into());
    }
    let _q = inner.quiesce_shared();
    Ok(inner.map_range(offset, len)?.extent())
}
