//! Consistency check and repair, with the counts `qemu-img check` reports for QED.
//!
//! Walks L1, then every L2 table: every offset must be cluster aligned, after the
//! header and inside the file (tables entirely), and every cluster referenced at most
//! once. Leaks are only counted when every table could be read.
//!
//! Repair (`errors`) zeroes invalid entries and writes the fixed tables back, as QEMU
//! does. Repair (`leaks`) goes further than QEMU, which never reclaims leaked clusters:
//! data clusters at the end of the file are moved down into leaked holes (copy, flush,
//! remap, flush) and the file is truncated after the last cluster still in use, so the
//! image is left with no leaks. After a repair the image is checked again and the
//! report describes the result (with the `*_fixed` counts of the repair), which is what
//! `qemu-img check -r` prints.

use super::header::{cluster_offset_valid, table_offset_valid, Header};
use super::need_check;
use super::table::{self, Table, UNALLOCATED, ZERO_CLUSTER};
use super::Inner;
use crate::error::Result;
use crate::format::{CheckReport, Repair};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Who references a file cluster (only built for leak reclaim, on a consistent image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Free,
    /// Header or L1: never moved.
    Fixed,
    /// Part of the L2 table named by L1 entry `l1i`.
    Table {
        l1i: u32,
    },
    /// Data cluster named by L2 entry `l2i` of the table at L1 index `l1i`.
    Data {
        l1i: u32,
        l2i: u32,
    },
}

/// One bit per file cluster: referenced or not.
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
        for i in first..first.saturating_add(count).min(self.n) {
            if self.test(i) {
                dup += 1;
            }
            self.bits[(i / 64) as usize] |= 1 << (i % 64);
        }
        dup
    }
}

struct Walk {
    report: CheckReport,
    used: Used,
    l1: Table,
    l1_dirty: bool,
    fixed_l2: Vec<(u64, Table)>,
}

/// Walks every table; with `fix`, invalid entries are cleared in the returned copies
/// (nothing is written). Memory: one bit per file cluster, plus one table at a time.
fn walk(inner: &Inner, h: &Header, fix: bool) -> Walk {
    let cs = inner.cluster_size;
    let file_size = inner.file_size();
    let nclusters = file_size / cs;
    let mut used = Used::new(nclusters);
    let mut r = CheckReport {
        total_clusters: Some(h.image_size.div_ceil(cs)),
        compressed_clusters: Some(0),
        ..CheckReport::default()
    };
    let mut allocated = 0u64;
    let mut fragmented = 0u64;
    used.mark(0, h.header_size as u64);
    r.corruptions += used.mark(h.l1_table_offset / cs, inner.table_clusters);
    let mut l1 = inner.l1_read().clone();
    let mut l1_dirty = false;
    let mut fixed_l2 = Vec::new();
    for slot in l1.iter_mut() {
        let off = *slot;
        if off == UNALLOCATED {
            continue;
        }
        if !table_offset_valid(h, off, file_size) {
            if fix {
                *slot = 0;
                l1_dirty = true;
                r.corruptions_fixed += 1;
            } else {
                r.corruptions += 1;
            }
            continue;
        }
        let dup = used.mark(off / cs, inner.table_clusters);
        if dup > 0 {
            // The table shares clusters with another structure: skip it.
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
            if !cluster_offset_valid(h, v, file_size) {
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
    Walk {
        report: r,
        used,
        l1,
        l1_dirty,
        fixed_l2,
    }
}

/// Checks the image and repairs what `repair` asks for.
pub(crate) fn check(inner: &Arc<Inner>, repair: Repair) -> Result<CheckReport> {
    let any_fix = repair.errors || repair.leaks;
    if any_fix {
        inner.writable()?;
    }
    let _q = inner.quiesce_exclusive();
    let h = inner.header();
    let first = walk(inner, &h, repair.errors);
    if !any_fix {
        if first.report.corruptions > 0 || first.report.check_errors > 0 {
            // Never mark this image clean in this session.
            need_check::set_verified(inner, false);
        }
        return Ok(first.report);
    }
    let mut r = first.report.clone();
    let file_len = inner.storage.len()?;
    let fixes_tables = !first.fixed_l2.is_empty() || first.l1_dirty;
    let reclaim = repair.leaks
        && r.check_errors == 0
        && r.corruptions == 0
        && (r.leaks > 0 || file_len > inner.file_size());
    if fixes_tables || reclaim {
        let _g = need_check::begin(inner)?;
        for (off, t) in &first.fixed_l2 {
            if let Err(e) = inner.storage.write_at(&table::encode(t), *off) {
                tracing::warn!("QED repair: writing L2 table at {off:#x}: {e}");
                r.check_errors += 1;
            }
        }
        if first.l1_dirty {
            match inner
                .storage
                .write_at(&table::encode(&first.l1), h.l1_table_offset)
            {
                Ok(()) => *inner.l1_write_lock() = first.l1.clone(),
                Err(e) => {
                    tracing::warn!("QED repair: writing the L1 table: {e}");
                    r.check_errors += 1;
                }
            }
        }
        inner.l2.clear();
        let mut leaks_fixed = 0;
        if reclaim && r.check_errors == 0 {
            leaks_fixed = reclaim_leaks(inner, &h, &first.used)?;
        }
        inner.l2.clear();
        inner.storage.flush()?;
        // Report the state the repair left, with what it fixed.
        let after = walk(inner, &h, false);
        r = CheckReport {
            corruptions_fixed: first.report.corruptions_fixed,
            leaks_fixed,
            check_errors: after.report.check_errors + r.check_errors,
            ..after.report
        };
    }
    if r.corruptions == 0 && r.check_errors == 0 {
        need_check::set_verified(inner, true);
        need_check::mark_clean(inner)?;
    } else {
        need_check::set_verified(inner, false);
    }
    Ok(r)
}

/// Reclaims every leaked cluster (caller holds the quiesce lock exclusively and an
/// alloc guard); does nothing on an image with corruptions.
pub(crate) fn compact_locked(inner: &Inner) -> Result<u64> {
    let h = inner.header();
    let w = walk(inner, &h, false);
    if w.report.corruptions > 0 || w.report.check_errors > 0 {
        return Ok(0);
    }
    let n = reclaim_leaks(inner, &h, &w.used)?;
    inner.l2.clear();
    Ok(n)
}

/// One planned move of a data cluster or an L2 table.
#[derive(Clone, Copy, Debug)]
enum Move {
    Data {
        from: u64,
        to: u64,
        l1i: u32,
        l2i: u32,
    },
    Table {
        to: u64,
        l1i: u32,
    },
}

fn is_free(o: Owner) -> bool {
    o == Owner::Free
}

/// Plans one round of moves. Targets are free at the start of the round; `vacated`
/// marks this round's sources, reusable only once the round's new references are
/// durable. Linear in the file's clusters: the lowest hole only moves up, the highest
/// used cluster and the next data cluster to bring down only move down.
fn plan_round(
    owners: &mut Vec<Owner>,
    vacated: &mut Vec<bool>,
    l1: &mut [u64],
    base: u64,
    tc: usize,
    cs: u64,
) -> Vec<Move> {
    let start = 0;
    let mut moves = Vec::new();
    let mut lo = start;
    let mut top = owners.len();
    let mut data_ptr = owners.len();
    loop {
        while top > 0 && (is_free(owners[top - 1]) || vacated[top - 1]) {
            top -= 1;
        }
        let Some(hi) = top.checked_sub(1) else {
            break;
        };
        while lo < hi && !(is_free(owners[lo]) && !vacated[lo]) {
            lo += 1;
        }
        if lo >= hi {
            break;
        }
        match owners[hi] {
            Owner::Data { l1i, l2i } => {
                moves.push(Move::Data {
                    from: hi as u64,
                    to: lo as u64,
                    l1i,
                    l2i,
                });
                owners[lo] = owners[hi];
                owners[hi] = Owner::Free;
                vacated[hi] = true;
            }
            Owner::Table { l1i } => {
                // Window index of the table's first cluster (a table straddling the
                // window's start never moves).
                let Some(s) = (l1[l1i as usize] / cs).checked_sub(base) else {
                    break;
                };
                let s = s as usize;
                if s + tc != hi + 1 {
                    break;
                }
                // Lowest run of `tc` cells, each free or part of this table.
                let fits = |i: usize| {
                    (i..i + tc).all(|c| {
                        !vacated[c] && (is_free(owners[c]) || owners[c] == Owner::Table { l1i })
                    })
                };
                if let Some(i) = (lo..s).find(|&i| fits(i)) {
                    let to = if i + tc <= s {
                        i
                    } else {
                        // Overlaps itself: hop past the end first; the next round brings
                        // it down into the run (its old cells free by then).
                        owners.extend(std::iter::repeat_n(Owner::Free, tc));
                        vacated.extend(std::iter::repeat_n(false, tc));
                        owners.len() - tc
                    };
                    for c in 0..tc {
                        owners[s + c] = Owner::Free;
                        vacated[s + c] = true;
                    }
                    for c in 0..tc {
                        owners[to + c] = Owner::Table { l1i };
                    }
                    l1[l1i as usize] = (base + to as u64) * cs;
                    moves.push(Move::Table { to: to as u64, l1i });
                    if to >= s {
                        break;
                    }
                    continue;
                }
                // Make room next to the table: bring the highest data cluster below it
                // down into the lowest hole.
                data_ptr = data_ptr.min(s);
                while data_ptr > lo + 1
                    && !(matches!(owners[data_ptr - 1], Owner::Data { .. })
                        && !vacated[data_ptr - 1])
                {
                    data_ptr -= 1;
                }
                if data_ptr <= lo + 1 {
                    break;
                }
                let d = data_ptr - 1;
                let Owner::Data { l1i, l2i } = owners[d] else {
                    break;
                };
                moves.push(Move::Data {
                    from: d as u64,
                    to: lo as u64,
                    l1i,
                    l2i,
                });
                owners[lo] = owners[d];
                owners[d] = Owner::Free;
                vacated[d] = true;
            }
            _ => break,
        }
    }
    moves
}

/// Who references each cluster from `base` to the end of the file (the window leak
/// reclaim may move things in; everything below `base` is in use and stays).
fn build_owners(inner: &Inner, h: &Header, base: u64, n: u64) -> Result<Vec<Owner>> {
    let cs = inner.cluster_size;
    let file_size = inner.file_size();
    let mut owners = vec![Owner::Free; (n - base) as usize];
    let mut set = |c: u64, o: Owner| {
        if c >= base && c < n {
            owners[(c - base) as usize] = o;
        }
    };
    for k in 0..inner.table_clusters {
        set(h.l1_table_offset / cs + k, Owner::Fixed);
    }
    let l1 = inner.l1_read().clone();
    for (l1i, &off) in l1.iter().enumerate() {
        if off == UNALLOCATED || !table_offset_valid(h, off, file_size) {
            continue;
        }
        let l1i = l1i as u32;
        for k in 0..inner.table_clusters {
            set(off / cs + k, Owner::Table { l1i });
        }
        let t = table::read_table(&*inner.storage, off, inner.nelems)?;
        for (l2i, &v) in t.iter().enumerate() {
            if v != UNALLOCATED && v != ZERO_CLUSTER && cluster_offset_valid(h, v, file_size) {
                set(
                    v / cs,
                    Owner::Data {
                        l1i,
                        l2i: l2i as u32,
                    },
                );
            }
        }
    }
    Ok(owners)
}

/// Moves data clusters and L2 tables from the end of the file into leaked clusters,
/// then truncates after the last cluster in use. Returns the number of leaked clusters
/// reclaimed. Every round is crash safe: copies go to clusters nothing references and
/// are flushed before references switch to them; sources are reused only in a later
/// round, after the switch is flushed. Memory is proportional to the clusters from the
/// first leak to the end of the file.
fn reclaim_leaks(inner: &Inner, h: &Header, used: &Used) -> Result<u64> {
    let cs = inner.cluster_size;
    let tc = inner.table_clusters as usize;
    let n = inner.file_size() / cs;
    let base = (h.header_size as u64..n)
        .find(|&c| !used.test(c))
        .unwrap_or(n);
    let mut owners = build_owners(inner, h, base, n)?;
    let count_free =
        |o: &[Owner], end: usize| o.iter().take(end).filter(|o| **o == Owner::Free).count() as u64;
    let leaks_before = count_free(&owners, owners.len());
    let disk_l1 = inner.l1_read().clone();
    let mut l1 = disk_l1.clone();
    let mut tables: BTreeMap<u32, Table> = BTreeMap::new();
    let mut buf = vec![0u8; cs as usize];
    // Each round lowers at least one unit (a hop is followed by a lower move), so this
    // bound is never reached on a consistent image; it only guards against surprises.
    let max_rounds = 2 * owners.len() + 8;
    for _ in 0..max_rounds {
        let mut vacated = vec![false; owners.len()];
        let before_l1 = l1.clone();
        let moves = plan_round(&mut owners, &mut vacated, &mut l1, base, tc, cs);
        if moves.is_empty() {
            break;
        }
        for m in &moves {
            let l1i = match *m {
                Move::Data { l1i, .. } | Move::Table { l1i, .. } => l1i,
            };
            if let std::collections::btree_map::Entry::Vacant(e) = tables.entry(l1i) {
                e.insert(table::read_table(
                    &*inner.storage,
                    before_l1[l1i as usize],
                    inner.nelems,
                )?);
            }
        }
        let mut touched: Vec<u32> = Vec::new();
        for m in &moves {
            if let Move::Data { from, to, l1i, l2i } = *m {
                inner.storage.read_at(&mut buf, (base + from) * cs)?;
                inner.storage.write_at(&buf, (base + to) * cs)?;
                if let Some(t) = tables.get_mut(&l1i) {
                    t[l2i as usize] = (base + to) * cs;
                }
                touched.push(l1i);
            }
        }
        let mut moved_tables = false;
        for m in &moves {
            if let Move::Table { to, l1i } = *m {
                if let Some(t) = tables.get(&l1i) {
                    inner
                        .storage
                        .write_at(&table::encode(t), (base + to) * cs)?;
                }
                moved_tables = true;
            }
        }
        inner.storage.flush()?;
        touched.sort_unstable();
        touched.dedup();
        for l1i in touched {
            let i = l1i as usize;
            if l1[i] == before_l1[i] {
                if let Some(t) = tables.get(&l1i) {
                    inner.storage.write_at(&table::encode(t), l1[i])?;
                }
            }
        }
        if moved_tables {
            inner
                .storage
                .write_at(&table::encode(&l1), h.l1_table_offset)?;
        }
        inner.storage.flush()?;
        *inner.l1_write_lock() = l1.clone();
    }
    let end_in_window = owners
        .iter()
        .rposition(|o| *o != Owner::Free)
        .map_or(0, |i| i + 1);
    let end = (base + end_in_window as u64).max(h.header_size as u64) * cs;
    inner.storage.set_len(end)?;
    inner.file_size.store(end, Ordering::Release);
    inner.storage.flush()?;
    let leaks_after = count_free(&owners, end_in_window);
    Ok(leaks_before.saturating_sub(leaks_after))
}
