//! Consistency check and repair, with the counts `qemu-img check` reports for QED.
//!
//! Walks L1, then every L2 table: every offset must be cluster aligned, after the
//! header and inside the file (tables entirely), and every cluster referenced at most
//! once. Repair zeroes invalid entries and writes the fixed tables back; leaked clusters
//! at the end of the file are reclaimed by truncating it (QEMU never reclaims them).
//! Leaks are only counted when every table could be read.

use super::header::{cluster_offset_valid, table_offset_valid};
use super::need_check;
use super::table::{self, UNALLOCATED, ZERO_CLUSTER};
use super::Inner;
use crate::error::Result;
use crate::format::{CheckReport, Repair};
use std::sync::atomic::Ordering;
use std::sync::Arc;

struct Used {
    bits: Vec<u64>,
    n: u64,
}

impl Used {
    fn new(n: u64) -> Used {
        Used {
            bits: vec![0; n.div_ceil(64) as usize],
            n,
        }
    }
    fn test(&self, i: u64) -> bool {
        i < self.n && self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    /// Marks `count` clusters from `first`; returns how many were already marked.
    fn mark(&mut self, first: u64, count: u64) -> u64 {
        let mut dup = 0;
        for i in first..first + count {
            if i >= self.n {
                continue;
            }
            if self.test(i) {
                dup += 1;
            }
            self.bits[(i / 64) as usize] |= 1 << (i % 64);
        }
        dup
    }
}

/// Checks the image and repairs what `repair` asks for.
pub(crate) fn check(inner: &Arc<Inner>, repair: Repair) -> Result<CheckReport> {
    let fix = repair.errors;
    let any_fix = repair.errors || repair.leaks;
    if any_fix {
        inner.writable()?;
    }
    let _q = inner.quiesce_exclusive();
    let h = inner.header();
    let cs = inner.cluster_size;
    let file_size = inner.file_size();
    let nclusters = file_size / cs;
    let mut used = Used::new(nclusters);
    let mut r = CheckReport {
        total_clusters: Some(h.image_size.div_ceil(cs)),
        allocated_clusters: Some(0),
        fragmented_clusters: Some(0),
        compressed_clusters: Some(0),
        ..CheckReport::default()
    };
    let mut allocated = 0u64;
    let mut fragmented = 0u64;

    r.corruptions += used.mark(h.l1_table_offset / cs, inner.table_clusters);
    let mut l1 = inner.l1_read().clone();
    let mut l1_dirty = false;
    // Fixed L2 tables, written back only after the walk (and after NEED_CHECK is set).
    let mut fixed_l2: Vec<(u64, Vec<u64>)> = Vec::new();
    for i in 0..l1.len() {
        let off = l1[i];
        if off == UNALLOCATED {
            continue;
        }
        if !table_offset_valid(&h, off, file_size) {
            if fix {
                l1[i] = 0;
                l1_dirty = true;
                r.corruptions_fixed += 1;
            } else {
                r.corruptions += 1;
            }
            continue;
        }
        let dup = used.mark(off / cs, inner.table_clusters);
        if dup > 0 {
            // A table sharing clusters with another structure: skip it.
            r.corruptions += dup;
            continue;
        }
        let mut t = match table::read_table(&*inner.storage, off, inner.nelems) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("QED check: reading L2 table at {off:#x}: {e}");
                r.check_errors += 1;
                continue;
            }
        };
        let mut t_dirty = false;
        let mut last = 0u64;
        for e in t.iter_mut() {
            let v = *e;
            if v == UNALLOCATED || v == ZERO_CLUSTER {
                continue;
            }
            allocated += 1;
            if last != 0 && v != last.wrapping_add(cs) {
                fragmented += 1;
            }
            last = v;
            if !cluster_offset_valid(&h, v, file_size) {
                if fix {
                    *e = 0;
                    t_dirty = true;
                    r.corruptions_fixed += 1;
                } else {
                    r.corruptions += 1;
                }
                continue;
            }
            r.corruptions += used.mark(v / cs, 1);
        }
        if t_dirty {
            fixed_l2.push((off, t));
        }
    }
    r.allocated_clusters = Some(allocated);
    r.fragmented_clusters = Some(fragmented);
    if r.check_errors == 0 {
        r.leaks = (h.header_size as u64..nclusters)
            .filter(|&c| !used.test(c))
            .count() as u64;
    }
    if !any_fix {
        return Ok(r);
    }

    // Repairs. Count the trailing leaks we can give back by truncating.
    let mut trailing = 0u64;
    if r.check_errors == 0 {
        let mut c = nclusters;
        while c > h.header_size as u64 && !used.test(c - 1) {
            trailing += 1;
            c -= 1;
        }
    }
    let file_len = inner.storage.len()?;
    let modifies = !fixed_l2.is_empty() || l1_dirty || trailing > 0 || file_len > file_size;
    if modifies {
        let _g = need_check::begin(inner)?;
        for (off, t) in &fixed_l2 {
            if let Err(e) = inner.storage.write_at(&table::encode(t), *off) {
                tracing::warn!("QED repair: writing L2 table at {off:#x}: {e}");
                r.check_errors += 1;
            }
        }
        if l1_dirty {
            match inner
                .storage
                .write_at(&table::encode(&l1), h.l1_table_offset)
            {
                Ok(()) => *inner.l1_write_lock() = l1,
                Err(e) => {
                    tracing::warn!("QED repair: writing the L1 table: {e}");
                    r.check_errors += 1;
                }
            }
        }
        inner.l2.clear();
        if repair.leaks && r.check_errors == 0 && (trailing > 0 || file_len > file_size) {
            // Fixed tables must be durable before the clusters they no longer name go.
            inner.storage.flush()?;
            let new_size = file_size - trailing * cs;
            inner.storage.set_len(new_size)?;
            inner.file_size.store(new_size, Ordering::Release);
            r.leaks -= trailing;
            r.leaks_fixed += trailing;
        }
        inner.storage.flush()?;
    }
    if r.corruptions == 0 && r.check_errors == 0 {
        need_check::set_verified(inner, true);
        need_check::mark_clean(inner)?;
    }
    Ok(r)
}
