//! Consistency check and repair, with the counts `qemu-img check` reports for QED.
//!
//! Walks L1, then every L2 table, a page at a time: every offset must be cluster
//! aligned, after the header, outside the L1 table and inside the file (tables
//! entirely), and every cluster referenced at most once. Leaks are only counted when
//! every table could be read. Memory: one bit per file cluster plus a page.
//!
//! Repair (`errors`, and as in QEMU any repair at all: `leaks` too) zeroes invalid
//! entries and writes the fixed tables back, as QEMU does. Repair (`leaks`) goes further than QEMU, which never reclaims leaked clusters:
//! data clusters at the end of the file are moved down into leaked holes (copy, flush,
//! remap, flush) and the file is truncated after the last cluster still in use, so the
//! image is left with no leaks. After a repair the image is checked again and the
//! report describes the result (with the `*_fixed` counts of the repair), which is what
//! `qemu-img check -r` prints.

use super::header::{cluster_offset_valid, table_offset_valid, Header};
use super::need_check;
use super::table::{self, UNALLOCATED, ZERO_CLUSTER};
use super::Inner;
use crate::error::{Result, Structure, Unsupported};
use crate::format::{CheckReport, Finding, FindingKind as K, Repair, MAX_QED_FINDINGS};
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

/// Most file clusters check tracks (one bit each: 512 MiB of bitmap at the limit);
/// larger files are refused before anything is allocated.
const MAX_CHECK_CLUSTERS: u64 = 1 << 32;

/// Bytes copied at a time when leak reclaim moves a cluster or a table.
const COPY_CHUNK: u64 = 1 << 20;

/// Most clusters leak reclaim rearranges (its bookkeeping is 12 bytes per cluster from
/// the first leak to the last cluster in use); beyond that only trailing leaks are
/// reclaimed, by truncation.
const MAX_RECLAIM_WINDOW: u64 = 1 << 22;

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
    /// Clusters in `[from, n)` not marked.
    fn count_free(&self, from: u64) -> u64 {
        let mut free = 0u64;
        let mut i = from;
        while i < self.n {
            if i.is_multiple_of(64) && i + 64 <= self.n {
                free += self.bits[(i / 64) as usize].count_zeros() as u64;
                i += 64;
            } else {
                free += !self.test(i) as u64;
                i += 1;
            }
        }
        free
    }
    /// One past the highest marked cluster (0 if none).
    fn end(&self) -> u64 {
        for (w, &word) in self.bits.iter().enumerate().rev() {
            if word != 0 {
                return (w as u64 * 64 + 64 - word.leading_zeros() as u64).min(self.n);
            }
        }
        0
    }
}

/// Records a finding within the QED cap (QEMU only counts these problems).
fn note(r: &mut CheckReport, f: Finding) {
    r.push_capped(f, MAX_QED_FINDINGS);
}

struct Walk {
    report: CheckReport,
    used: Used,
}

/// Called before the first repair write of a walk (makes NEED_CHECK durable).
type BeforeFix<'a> = &'a mut dyn FnMut() -> Result<()>;

/// Walks every table, a page at a time; with `fix`, invalid entries are zeroed and their
/// pages written back as the walk goes. Memory: one bit per file cluster (bounded by
/// [`MAX_CHECK_CLUSTERS`]) plus one page.
fn walk(inner: &Inner, h: &Header, mut fix: Option<BeforeFix<'_>>) -> Result<Walk> {
    let cs = inner.cluster_size;
    let file_size = inner.file_size();
    let nclusters = file_size / cs;
    if nclusters > MAX_CHECK_CLUSTERS {
        return Err(Unsupported::QedTooLargeToCheck {
            clusters: nclusters,
            cluster_size: cs,
            max: MAX_CHECK_CLUSTERS,
        }
        .into());
    }
    let mut used = Used::new(nclusters);
    let mut r = CheckReport {
        total_clusters: Some(h.image_size.div_ceil(cs)),
        compressed_clusters: Some(0),
        ..CheckReport::default()
    };
    let mut allocated = 0u64;
    let mut fragmented = 0u64;
    used.mark(0, h.header_size as u64);
    let dup = used.mark(h.l1_table_offset / cs, inner.table_clusters);
    if dup > 0 {
        note(
            &mut r,
            Finding::new(K::ReferencedTwice, Structure::QedL1Table)
                .at(h.l1_table_offset)
                .counts(None, Some(dup)),
        );
    }
    r.corruptions += dup;
    let pe = inner.page_entries;
    let storage = &*inner.storage;
    // Writes back a repaired page; a failed write is counted, not fatal.
    let write_back = |fix: &mut Option<BeforeFix<'_>>,
                      r: &mut CheckReport,
                      what: Structure,
                      at: u64,
                      page: &[u64]|
     -> Result<()> {
        if let Some(f) = fix.as_mut() {
            f()?;
        }
        if let Err(e) = storage.write_at(&table::encode(page), at) {
            tracing::warn!("QED repair: writing table entries at {at:#x}: {e}");
            note(r, Finding::new(K::WriteBackFailed, what).at(at));
            r.check_errors += 1;
        }
        Ok(())
    };
    let mut l1i = 0u64;
    while l1i < inner.nelems {
        let l1_at = h.l1_table_offset + l1i * 8;
        let skip = table::hole_pages(storage, l1_at, pe * 8, (inner.nelems - l1i) / pe);
        if skip > 0 {
            l1i += skip * pe;
            continue;
        }
        let mut l1_page = match table::read_entries(storage, l1_at, pe) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("QED check: reading the L1 table at {l1_at:#x}: {e}");
                note(
                    &mut r,
                    Finding::new(K::Unreadable, Structure::QedL1Table)
                        .entry(l1i)
                        .at(l1_at),
                );
                r.check_errors += 1;
                l1i += pe;
                continue;
            }
        };
        let mut l1_dirty = false;
        for (k, slot) in l1_page.iter_mut().enumerate() {
            let off = *slot;
            let l1e = l1i + k as u64;
            if off == UNALLOCATED {
                continue;
            }
            if !table_offset_valid(h, off, file_size) {
                note(
                    &mut r,
                    Finding::new(K::InvalidOffset, Structure::QedL1Table)
                        .entry(l1e)
                        .value(off)
                        .at(l1_at + k as u64 * 8)
                        .repairing(fix.is_some()),
                );
                if fix.is_some() {
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
                note(
                    &mut r,
                    Finding::new(K::ReferencedTwice, Structure::QedL2Table)
                        .entry(l1e)
                        .at(off)
                        .counts(None, Some(dup)),
                );
                r.corruptions += dup;
                continue;
            }
            let mut last = 0u64;
            let mut l2i = 0u64;
            while l2i < inner.nelems {
                let at = off + l2i * 8;
                let skip = table::hole_pages(storage, at, pe * 8, (inner.nelems - l2i) / pe);
                if skip > 0 {
                    l2i += skip * pe;
                    continue;
                }
                let page_first = l2i;
                l2i += pe;
                let mut t = match table::read_entries(storage, at, pe) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(
                            "QED check: reading L2 table at {off:#x} (L1 entry {l1e}): {e}"
                        );
                        note(
                            &mut r,
                            Finding::new(K::Unreadable, Structure::QedL2Table)
                                .entry(l1e)
                                .at(at),
                        );
                        r.check_errors += 1;
                        continue;
                    }
                };
                let mut t_dirty = false;
                for (j, e) in t.iter_mut().enumerate() {
                    let v = *e;
                    if v == UNALLOCATED || v == ZERO_CLUSTER {
                        continue;
                    }
                    let l2e = page_first + j as u64;
                    let guest = (l1e * inner.nelems + l2e) * cs;
                    allocated += 1;
                    if last != 0 && v != last.wrapping_add(cs) {
                        fragmented += 1;
                    }
                    last = v;
                    if !cluster_offset_valid(h, v, file_size) {
                        note(
                            &mut r,
                            Finding::new(K::InvalidOffset, Structure::QedL2Table)
                                .entry(l2e)
                                .value(v)
                                .at(at + j as u64 * 8)
                                .guest(guest)
                                .repairing(fix.is_some()),
                        );
                        if fix.is_some() {
                            *e = 0;
                            t_dirty = true;
                            r.corruptions_fixed += 1;
                        } else {
                            r.corruptions += 1;
                        }
                        continue;
                    }
                    let dup = used.mark(v / cs, 1);
                    if dup > 0 {
                        note(
                            &mut r,
                            Finding::new(K::ReferencedTwice, Structure::DataCluster)
                                .entry(l2e)
                                .at(v)
                                .guest(guest)
                                .counts(None, Some(dup)),
                        );
                    }
                    r.corruptions += dup;
                }
                if t_dirty {
                    write_back(&mut fix, &mut r, Structure::QedL2Table, at, &t)?;
                }
            }
        }
        if l1_dirty {
            write_back(&mut fix, &mut r, Structure::QedL1Table, l1_at, &l1_page)?;
        }
        l1i += pe;
    }
    r.allocated_clusters = Some(allocated);
    r.fragmented_clusters = Some(fragmented);
    if r.check_errors == 0 {
        r.leaks = used.count_free(h.header_size as u64);
    }
    Ok(Walk { report: r, used })
}

/// Checks the image and repairs what `repair` asks for.
pub(crate) fn check(inner: &Arc<Inner>, repair: Repair) -> Result<CheckReport> {
    let any_fix = repair.errors || repair.leaks;
    if any_fix {
        inner.writable()?;
    }
    let _q = inner.quiesce_exclusive();
    let h = inner.header();
    let mut guard = None;
    let first = {
        let mut before_fix = || -> Result<()> {
            if guard.is_none() {
                guard = Some(need_check::begin(inner)?);
            }
            Ok(())
        };
        // As QEMU's QED driver: any repair asked for repairs the tables too.
        let fix: Option<BeforeFix<'_>> = if any_fix { Some(&mut before_fix) } else { None };
        let w = walk(inner, &h, fix);
        // Repairs bypassed the caches.
        inner.forget_tables();
        w?
    };
    if !any_fix {
        if first.report.corruptions > 0 || first.report.check_errors > 0 {
            // Never mark this image clean in this session.
            need_check::set_verified(inner, false);
        }
        return Ok(first.report);
    }
    let mut r = first.report.clone();
    let file_len = inner.storage.len()?;
    let fixed_tables = r.corruptions_fixed > 0;
    let reclaim = repair.leaks
        && r.check_errors == 0
        && r.corruptions == 0
        && (r.leaks > 0 || file_len > inner.file_size());
    if fixed_tables || reclaim {
        if guard.is_none() {
            guard = Some(need_check::begin(inner)?);
        }
        let mut leaks_fixed = 0;
        if reclaim && r.check_errors == 0 {
            leaks_fixed = reclaim_leaks(inner, &h, &first.used)?;
        }
        inner.forget_tables();
        inner.storage.flush()?;
        // Report the state the repair left, with what it fixed.
        let after = walk(inner, &h, None)?;
        r = CheckReport {
            corruptions_fixed: first.report.corruptions_fixed,
            leaks_fixed,
            check_errors: after.report.check_errors + r.check_errors,
            ..after.report
        };
    }
    drop(guard);
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
    let w = walk(inner, &h, None)?;
    if w.report.corruptions > 0 || w.report.check_errors > 0 {
        return Ok(0);
    }
    let n = reclaim_leaks(inner, &h, &w.used)?;
    inner.forget_tables();
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
        from: u64,
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
    l1: &mut BTreeMap<u32, u64>,
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
        while lo < hi && (!is_free(owners[lo]) || vacated[lo]) {
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
                let Some(s) = l1.get(&l1i).and_then(|o| (o / cs).checked_sub(base)) else {
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
                    l1.insert(l1i, (base + to as u64) * cs);
                    moves.push(Move::Table {
                        from: s as u64,
                        to: to as u64,
                        l1i,
                    });
                    if to >= s {
                        break;
                    }
                    continue;
                }
                // Make room next to the table: bring the highest data cluster below it
                // down into the lowest hole.
                data_ptr = data_ptr.min(s);
                while data_ptr > lo + 1
                    && (!matches!(owners[data_ptr - 1], Owner::Data { .. })
                        || vacated[data_ptr - 1])
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

/// Who references each cluster of `[base, n)` (the window leak reclaim may move things
/// in; everything below `base` is in use and stays, nothing at or past `n` is), and the
/// offset of every valid L2 table by L1 index. Tables are streamed a page at a time.
fn build_owners(
    inner: &Inner,
    h: &Header,
    base: u64,
    n: u64,
) -> Result<(Vec<Owner>, BTreeMap<u32, u64>)> {
    let cs = inner.cluster_size;
    let file_size = inner.file_size();
    let pe = inner.page_entries;
    let mut owners = vec![Owner::Free; (n - base) as usize];
    let mut set = |c: u64, o: Owner| {
        if c >= base && c < n {
            owners[(c - base) as usize] = o;
        }
    };
    for k in 0..inner.table_clusters {
        set(h.l1_table_offset / cs + k, Owner::Fixed);
    }
    let mut l1 = BTreeMap::new();
    let mut l1i = 0u64;
    let storage = &*inner.storage;
    while l1i < inner.nelems {
        let at = h.l1_table_offset + l1i * 8;
        let skip = table::hole_pages(storage, at, pe * 8, (inner.nelems - l1i) / pe);
        if skip > 0 {
            l1i += skip * pe;
            continue;
        }
        let page = table::read_entries(storage, at, pe)?;
        for (k, &off) in page.iter().enumerate() {
            if off == UNALLOCATED || !table_offset_valid(h, off, file_size) {
                continue;
            }
            let l1i = (l1i + k as u64) as u32;
            l1.insert(l1i, off);
            for c in 0..inner.table_clusters {
                set(off / cs + c, Owner::Table { l1i });
            }
            let mut l2i = 0u64;
            while l2i < inner.nelems {
                let at = off + l2i * 8;
                let skip = table::hole_pages(storage, at, pe * 8, (inner.nelems - l2i) / pe);
                if skip > 0 {
                    l2i += skip * pe;
                    continue;
                }
                let t = table::read_entries(storage, at, pe)?;
                for (j, &v) in t.iter().enumerate() {
                    if v != UNALLOCATED
                        && v != ZERO_CLUSTER
                        && cluster_offset_valid(h, v, file_size)
                    {
                        set(
                            v / cs,
                            Owner::Data {
                                l1i,
                                l2i: (l2i + j as u64) as u32,
                            },
                        );
                    }
                }
                l2i += pe;
            }
        }
        l1i += pe;
    }
    Ok((owners, l1))
}

/// Copies `len` bytes from `from` to `to` in bounded chunks.
fn copy_range(inner: &Inner, from: u64, to: u64, len: u64) -> Result<()> {
    let mut buf = vec![0u8; len.min(COPY_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        inner.storage.read_at(&mut buf[..n], from + done)?;
        inner.storage.write_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Moves data clusters and L2 tables from the end of the file into leaked clusters,
/// then truncates after the last cluster in use. Returns the number of leaked clusters
/// reclaimed. Every round is crash safe: copies go to clusters nothing references and
/// are flushed before references switch to them; sources are reused only in a later
/// round, after the switch is flushed. Memory is proportional to the clusters from the
/// first leak to the last cluster in use (bounded by [`MAX_RECLAIM_WINDOW`]); tables
/// are copied and updated in place, never loaded whole.
fn reclaim_leaks(inner: &Inner, h: &Header, used: &Used) -> Result<u64> {
    let cs = inner.cluster_size;
    let tc = inner.table_clusters as usize;
    let file_clusters = inner.file_size() / cs;
    let n = used.end().max(h.header_size as u64);
    let base = (h.header_size as u64..n)
        .find(|&c| !used.test(c))
        .unwrap_or(n);
    let trailing = file_clusters - n;
    if n - base > MAX_RECLAIM_WINDOW {
        // Too many clusters to rearrange with bounded memory: drop the trailing ones.
        let end = n * cs;
        inner.storage.set_len(end)?;
        inner.file_size.store(end, Ordering::Release);
        inner.storage.flush()?;
        return Ok(trailing);
    }
    let (mut owners, mut l1) = build_owners(inner, h, base, n)?;
    let count_free =
        |o: &[Owner], end: usize| o.iter().take(end).filter(|o| **o == Owner::Free).count() as u64;
    let leaks_before = count_free(&owners, owners.len()) + trailing;
    // Each round lowers at least one unit (a hop is followed by a lower move), so this
    // bound is never reached on a consistent image; it only guards against surprises.
    let max_rounds = 2 * owners.len() + 8;
    for _ in 0..max_rounds {
        let mut vacated = vec![false; owners.len()];
        let moves = plan_round(&mut owners, &mut vacated, &mut l1, base, tc, cs);
        if moves.is_empty() {
            break;
        }
        let moved: std::collections::BTreeSet<u32> = moves
            .iter()
            .filter_map(|m| match *m {
                Move::Table { l1i, .. } => Some(l1i),
                Move::Data { .. } => None,
            })
            .collect();
        // Copies into free clusters first (tables from their current place on disk).
        let mut entry_updates: Vec<(u32, u32, u64)> = Vec::new();
        for m in &moves {
            match *m {
                Move::Data { from, to, l1i, l2i } => {
                    copy_range(inner, (base + from) * cs, (base + to) * cs, cs)?;
                    entry_updates.push((l1i, l2i, (base + to) * cs));
                }
                Move::Table { from, to, .. } => {
                    copy_range(inner, (base + from) * cs, (base + to) * cs, tc as u64 * cs)?;
                }
            }
        }
        // Entries of tables moved this round are updated in their new (unreferenced)
        // copies before the flush.
        for &(l1i, l2i, v) in &entry_updates {
            if moved.contains(&l1i) {
                if let Some(&t) = l1.get(&l1i) {
                    table::write_one(&*inner.storage, t, inner.nelems, l2i as u64, v)?;
                }
            }
        }
        inner.storage.flush()?;
        for &(l1i, l2i, v) in &entry_updates {
            if !moved.contains(&l1i) {
                if let Some(&t) = l1.get(&l1i) {
                    table::write_one(&*inner.storage, t, inner.nelems, l2i as u64, v)?;
                }
            }
        }
        for &l1i in &moved {
            if let Some(&t) = l1.get(&l1i) {
                table::write_one(
                    &*inner.storage,
                    h.l1_table_offset,
                    inner.nelems,
                    l1i as u64,
                    t,
                )?;
            }
        }
        inner.storage.flush()?;
        inner.forget_tables();
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
