//! Guest writes: in place to allocated clusters, or allocating (new clusters at the end
//! of the file, filled from the backing file or with zeroes where the guest does not
//! write them) with the L2/L1 update.
//!
//! Concurrency: in-place writes take no lock. An allocating write holds its L2 table's
//! [`TableSync`] mutex only to plan, reserve clusters and register them in flight, and
//! again to update the table; data and fills are written with no lock held, so
//! allocations in different tables, and of different clusters of one table, overlap.
//! Two allocations of the same guest cluster are ordered by the in-flight list (the
//! second waits, then plans again and finds the cluster allocated).
//! Crash rules: NEED_CHECK is durable before the first allocating write
//! (`need_check::begin`); the new clusters are complete (data + fills) before the L2
//! entry points at them, and over backing data a flush (shared, [`super::flush`])
//! separates the two; a new L2 table is complete on disk before the L1 entry points at
//! it.

use super::map::Run;
use super::need_check;
use super::paging::Update;
use super::table::Entry;
use super::Inner;
use crate::error::Result;
use crate::format::{check_range, read_backing};
use std::sync::Arc;

/// Largest fill (parts of a new cluster the guest does not write) built in memory at
/// once.
pub(super) const FILL_CHUNK: u64 = 1 << 20;

/// Writes guest bytes.
pub(crate) fn write_at(inner: &Arc<Inner>, buf: &[u8], offset: u64) -> Result<()> {
    inner.writable()?;
    check_range(offset, buf.len() as u64, inner.image_size())?;
    let _q = inner.quiesce_shared();
    write_locked(inner, buf, offset)
}

/// Writes with the quiesce lock already held (shared).
pub(super) fn write_locked(inner: &Arc<Inner>, buf: &[u8], offset: u64) -> Result<()> {
    let span = inner.nelems * inner.cluster_size;
    let mut pos = 0usize;
    while pos < buf.len() {
        let guest = offset + pos as u64;
        let seg = ((span - guest % span) as usize).min(buf.len() - pos);
        write_segment(inner, &buf[pos..pos + seg], guest)?;
        pos += seg;
    }
    Ok(())
}

/// Per-L2-table synchronisation: the mutex orders every change of the table (entry
/// updates, its creation) and guards the list of guest clusters whose allocation is in
/// flight; the condvar wakes requests waiting for one of those to finish.
#[derive(Debug, Default)]
pub(crate) struct TableSync {
    inflight: std::sync::Mutex<Vec<(u64, u64)>>,
    pub(super) cv: std::sync::Condvar,
}

impl TableSync {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) fn overlaps(list: &[(u64, u64)], first: u64, count: u64) -> bool {
    list.iter()
        .any(|&(f, n)| f < first + count && first < f + n)
}

/// Removes a request's clusters from the in-flight list when it ends (even by error).
struct InflightGuard<'a> {
    sync: &'a TableSync,
    ranges: Vec<(u64, u64)>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.ranges.is_empty() {
            return;
        }
        let mut l = self.sync.lock();
        l.retain(|r| !self.ranges.contains(r));
        drop(l);
        self.sync.cv.notify_all();
    }
}

/// Writes a range lying inside one L2 table.
fn write_segment(inner: &Arc<Inner>, buf: &[u8], guest: u64) -> Result<()> {
    // Fast path: every cluster already allocated, write in place with no lock.
    if try_in_place(inner, buf, guest)? {
        return Ok(());
    }
    let (l1i, _) = inner.split(guest);
    let sync = inner.table_lock(l1i);
    let _g = need_check::begin(inner)?;
    allocating_write(inner, &sync, buf, guest, l1i)
}

/// Writes `buf` in place if every cluster it touches is allocated; false otherwise
/// (nothing written).
fn try_in_place(inner: &Inner, buf: &[u8], guest: u64) -> Result<bool> {
    let mut runs = Vec::new();
    let mut pos = 0u64;
    while pos < buf.len() as u64 {
        let run = inner.map(guest + pos, buf.len() as u64 - pos)?;
        if !matches!(run.kind, Entry::Data(_)) {
            return Ok(false);
        }
        runs.push((pos as usize, run));
        pos += run.len;
    }
    for (_, run) in &runs {
        inner.guard_data_write(run.host, run.len)?;
    }
    for (p, run) in runs {
        inner
            .storage
            .write_at(&buf[p..p + run.len as usize], run.host)?;
    }
    Ok(true)
}

/// A run of clusters of one table that need allocating, with what each read as before.
struct NewRun {
    /// Guest offset of the first byte the guest writes.
    guest: u64,
    /// Bytes of `buf` it covers.
    buf_pos: usize,
    len: usize,
    /// First cluster's previous state (decides where its head fill comes from).
    head_kind: Entry,
    /// Last cluster's previous state.
    tail_kind: Entry,
    /// Whether any cluster of the run was unallocated (read the backing file).
    any_unallocated: bool,
}

impl NewRun {
    fn clusters(&self, cs: u64) -> (u64, u64) {
        let first = self.guest / cs;
        let last = (self.guest + self.len as u64 - 1) / cs;
        (first, last - first + 1)
    }
}

/// Runs already allocated, as (position in the request's buffer, run).
type InPlace = Vec<(usize, Run)>;

/// Splits a range of one table into runs already allocated and runs needing new
/// clusters.
fn plan(inner: &Inner, buf_len: usize, guest: u64) -> Result<(InPlace, Vec<NewRun>)> {
    let mut in_place = Vec::new();
    let mut new_runs: Vec<NewRun> = Vec::new();
    let mut pos = 0u64;
    while pos < buf_len as u64 {
        let g = guest + pos;
        let run = inner.map(g, buf_len as u64 - pos)?;
        match run.kind {
            Entry::Data(_) => in_place.push((pos as usize, run)),
            kind => match new_runs.last_mut() {
                Some(r) if r.buf_pos + r.len == pos as usize => {
                    r.len += run.len as usize;
                    r.tail_kind = kind;
                    r.any_unallocated |= kind == Entry::Unallocated;
                }
                _ => new_runs.push(NewRun {
                    guest: g,
                    buf_pos: pos as usize,
                    len: run.len as usize,
                    head_kind: kind,
                    tail_kind: kind,
                    any_unallocated: kind == Entry::Unallocated,
                }),
            },
        }
        pos += run.len;
    }
    Ok((in_place, new_runs))
}

/// The allocating write of a range inside the L2 table at `l1i`.
///
/// Under the table's lock: plan, wait for any in-flight allocation of the same clusters
/// (then re-plan: it may have allocated them), reserve host clusters and list ours as in
/// flight. Without any lock: write the data (one vectored write per run) and, over
/// backing data, flush (shared with concurrent requests). Under the lock again: update
/// the L2 entries (creating the table and then its L1 entry if needed).
fn allocating_write(
    inner: &Arc<Inner>,
    sync: &TableSync,
    buf: &[u8],
    guest: u64,
    l1i: u64,
) -> Result<()> {
    let cs = inner.cluster_size;
    let mut list = sync.lock();
    let (in_place, new_runs) = loop {
        let (in_place, new_runs) = plan(inner, buf.len(), guest)?;
        let busy = new_runs.iter().any(|r| {
            let (f, n) = r.clusters(cs);
            overlaps(&list, f, n)
        });
        if !busy {
            break (in_place, new_runs);
        }
        list = sync.cv.wait(list).unwrap_or_else(|p| p.into_inner());
    };
    let mut hosts = Vec::with_capacity(new_runs.len());
    for r in &new_runs {
        hosts.push(inner.alloc_clusters(r.clusters(cs).1)?);
    }
    let ranges: Vec<(u64, u64)> = new_runs.iter().map(|r| r.clusters(cs)).collect();
    list.extend_from_slice(&ranges);
    drop(list);
    // Created only once the list lock is released: its drop takes that lock.
    let _guard = InflightGuard { sync, ranges };

    for (_, run) in &in_place {
        inner.guard_data_write(run.host, run.len)?;
    }
    for (p, run) in in_place {
        inner
            .storage
            .write_at(&buf[p..p + run.len as usize], run.host)?;
    }
    if new_runs.is_empty() {
        return Ok(());
    }
    let size = inner.image_size();
    let mut need_flush = false;
    let mut updates: Vec<(u64, u64, u64)> = Vec::new(); // (first cluster, count, host)
    for (r, &host) in new_runs.iter().zip(&hosts) {
        let (first_cluster, count) = r.clusters(cs);
        let end = r.guest + r.len as u64;
        let head_len = (r.guest % cs) as usize;
        let tail_len = ((cs - end % cs) % cs) as usize;
        let head_start = first_cluster * cs;
        // Clusters that read backing data before must not lose it to a crash: neither
        // the copied fill nor (for whole-cluster writes) the old contents may turn into
        // zeroes. Clusters past the backing file's end read zeroes either way.
        need_flush |= r.any_unallocated && !inner.backing_is_zero(head_start);
        let data = &buf[r.buf_pos..r.buf_pos + r.len];
        if (head_len + tail_len) as u64 > FILL_CHUNK {
            // Huge clusters: fill in bounded pieces rather than one cluster-sized buffer.
            fill(inner, host, head_start, head_len as u64, r.head_kind, size)?;
            inner.storage.write_at(data, host + head_len as u64)?;
            let tail_host = host + head_len as u64 + r.len as u64;
            fill(inner, tail_host, end, tail_len as u64, r.tail_kind, size)?;
            updates.push((first_cluster, count, host));
            continue;
        }
        let mut head = vec![0u8; head_len];
        let mut tail = vec![0u8; tail_len];
        if head_len > 0 && r.head_kind == Entry::Unallocated {
            read_fill(inner, &mut head, head_start, size)?;
        }
        if tail_len > 0 && r.tail_kind == Entry::Unallocated {
            read_fill(inner, &mut tail, end, size)?;
        }
        let mut iov: Vec<&[u8]> = Vec::with_capacity(3);
        if head_len > 0 {
            iov.push(&head);
        }
        iov.push(data);
        if tail_len > 0 {
            iov.push(&tail);
        }
        inner.storage.write_vectored_at(&iov, host)?;
        updates.push((first_cluster, count, host));
    }
    // With a backing file, the copied backing data must be durable before anything
    // points at it, or a crash would lose it.
    if need_flush {
        inner.flush_gate.flush(&*inner.storage)?;
    }
    let _list = sync.lock();
    let base = l1i * inner.nelems;
    let updates: Vec<Update> = updates
        .iter()
        .map(|&(c, n, host)| Update {
            first: c - base,
            count: n,
            value: host,
            step: cs,
        })
        .collect();
    set_entries(inner, l1i, &updates)
}

/// Fills `len` bytes at `host` of a new cluster with what guest `guest..` read before
/// (`kind`): backing data where there is some, otherwise zeroes (written as zero
/// ranges), a bounded piece at a time.
fn fill(inner: &Inner, host: u64, guest: u64, len: u64, kind: Entry, size: u64) -> Result<()> {
    let mut buf = Vec::new();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(FILL_CHUNK);
        let g = guest + done;
        if kind == Entry::Unallocated && g < size && !inner.backing_is_zero(g) {
            buf.resize(n as usize, 0);
            read_fill(inner, &mut buf, g, size)?;
            inner.storage.write_at(&buf, host + done)?;
        } else {
            inner.storage.write_zeroes(host + done, n)?;
        }
        done += n;
    }
    Ok(())
}

/// Reads the fill for bytes the guest does not write in a new cluster: backing data,
/// zeroes past its end, and zeroes past the guest size.
fn read_fill(inner: &Inner, buf: &mut [u8], guest: u64, size: u64) -> Result<()> {
    let n = size.saturating_sub(guest).min(buf.len() as u64) as usize;
    read_backing(inner.backing.as_ref(), &mut buf[..n], guest)?;
    buf[n..].fill(0);
    Ok(())
}

/// Sets entries of the L2 table at `l1i` and writes them back; a missing table is
/// created (complete on disk) first, then the L1 entry is pointed at it. Caller holds
/// the table's sync lock and an alloc guard.
pub(super) fn set_entries(inner: &Arc<Inner>, l1i: u64, updates: &[Update]) -> Result<()> {
    if updates.iter().all(|u| u.count == 0) {
        return Ok(());
    }
    match inner.l2_table(l1i)? {
        Some(off) => inner.l2_apply(off, updates),
        None => {
            let off = inner.l2_create(updates)?;
            // L2 table complete on disk before the L1 entry points at it.
            inner.l1_set(l1i, off)
        }
    }
}
