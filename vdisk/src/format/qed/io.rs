//! Guest I/O: reads, writes (in place or allocating), zeroes, discard, block status.

use super::need_check;
use super::paging::Update;
pub(crate) use super::table::Entry;
use super::table::{InvalidOffset, ZERO_CLUSTER};
use super::Inner;
use crate::error::{Error, Result};
use crate::format::{check_range, read_backing, Extent, ExtentKind, ZeroFlags};
use std::sync::Arc;

/// Largest fill (parts of a new cluster the guest does not write) built in memory at
/// once.
const FILL_CHUNK: u64 = 1 << 20;

/// How many L2 table offsets [`Inner::note_table`] remembers at most.
const MAX_KNOWN_TABLES: usize = 4096;

/// A run of guest bytes with one mapping.
#[derive(Clone, Copy, Debug)]
struct Run {
    kind: Entry,
    /// Host offset of the run's first byte (for `Data`).
    host: u64,
    len: u64,
}

impl Inner {
    fn split(&self, guest: u64) -> (u64, u64) {
        let cluster = guest / self.cluster_size;
        (cluster / self.nelems, cluster % self.nelems)
    }

    fn classify(&self, value: u64, l1i: u64, l2i: u64, l2_off: u64) -> Result<Entry> {
        Entry::decode(value, &self.geo, self.file_size()).map_err(|InvalidOffset(v)| {
            Error::corrupt(format!(
                "QED: L2 table at {l2_off:#x} (L1 index {l1i}) entry {l2i} holds an \
                 invalid cluster offset {v:#x} (misaligned, inside the header or the L1 \
                 table, or past the end of the file)"
            ))
        })
    }

    /// Maps up to `max` guest bytes at `guest`, stopping at the end of its L2 table page
    /// or where the mapping changes kind (or stops being contiguous in the file). Runs of
    /// unallocated L1 entries are mapped in one step, so a huge sparse image costs one
    /// lookup per L1 page, not per cluster or per table.
    fn map(&self, guest: u64, max: u64) -> Result<Run> {
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
                kind: Entry::Unallocated,
                host: 0,
                len: len.min(max),
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
        let host = match first {
            Entry::Data(h) => h + in_cluster,
            _ => 0,
        };
        Ok(Run {
            kind: first,
            host,
            len,
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
    fn guard_data_write(&self, host: u64, len: u64) -> Result<()> {
        let k = self.known_tables.lock().unwrap_or_else(|p| p.into_inner());
        let tb = self.geo.table_bytes();
        if let Some(&t) = k.range(..host.saturating_add(len)).next_back() {
            if t.saturating_add(tb) > host {
                return Err(Error::corrupt(format!(
                    "QED: refusing to write guest data to host offset {host:#x}: it overlaps \
                     the L2 table at {t:#x} (cluster referenced twice; run a repair)"
                )));
            }
        }
        Ok(())
    }

    /// Whether an unallocated guest range reads as zeroes (no backing data under it).
    fn backing_is_zero(&self, guest: u64) -> bool {
        match &self.backing {
            None => true,
            Some(b) => guest >= b.size(),
        }
    }
}

/// Reads guest bytes.
pub(crate) fn read_at(inner: &Arc<Inner>, buf: &mut [u8], offset: u64) -> Result<()> {
    check_range(offset, buf.len() as u64, inner.image_size())?;
    let _q = inner.quiesce_shared();
    let mut pos = 0usize;
    while pos < buf.len() {
        let guest = offset + pos as u64;
        let run = inner.map(guest, (buf.len() - pos) as u64)?;
        let n = run.len as usize;
        let dst = &mut buf[pos..pos + n];
        match run.kind {
            Entry::Data(_) => inner.storage.read_at(dst, run.host)?,
            Entry::Zero => dst.fill(0),
            Entry::Unallocated => read_backing(inner.backing.as_ref(), dst, guest)?,
        }
        pos += n;
    }
    Ok(())
}

/// Writes guest bytes.
pub(crate) fn write_at(inner: &Arc<Inner>, buf: &[u8], offset: u64) -> Result<()> {
    inner.writable()?;
    check_range(offset, buf.len() as u64, inner.image_size())?;
    let _q = inner.quiesce_shared();
    write_locked(inner, buf, offset)
}

/// Writes with the quiesce lock already held (shared).
fn write_locked(inner: &Arc<Inner>, buf: &[u8], offset: u64) -> Result<()> {
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
    cv: std::sync::Condvar,
}

impl TableSync {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn overlaps(list: &[(u64, u64)], first: u64, count: u64) -> bool {
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
fn set_entries(inner: &Arc<Inner>, l1i: u64, updates: &[Update]) -> Result<()> {
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

impl Inner {
    pub(crate) fn image_size(&self) -> u64 {
        self.image_size.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Makes a range read as zeroes without leaking clusters: whole clusters become zero
/// entries (unallocated/zero) or are zeroed in place (allocated: punched when
/// `may_unmap`); partial clusters are written with zero bytes unless they already read
/// as zeroes.
pub(crate) fn write_zeroes(
    inner: &Arc<Inner>,
    offset: u64,
    len: u64,
    flags: ZeroFlags,
) -> Result<()> {
    inner.writable()?;
    let size = inner.image_size();
    check_range(offset, len, size)?;
    if len == 0 {
        return Ok(());
    }
    let cs = inner.cluster_size;
    let end = offset + len;
    // The guest size need not be a cluster multiple: its last partial cluster counts
    // as whole.
    let aligned = |x: u64| x.is_multiple_of(cs) || x == size;
    let head_end = if aligned(offset) {
        offset
    } else {
        (offset.div_ceil(cs) * cs).min(end)
    };
    let tail_start = if aligned(end) {
        end
    } else {
        (end / cs * cs).max(head_end)
    };
    let _q = inner.quiesce_shared();
    if flags.fast {
        for (a, b) in [(offset, head_end), (tail_start, end)] {
            if b > a && !reads_zero(inner, a, b - a)? {
                return Err(Error::unsupported(
                    "QED: zeroing a partial cluster needs writing zero bytes",
                ));
            }
        }
    }
    for (a, b) in [(offset, head_end), (tail_start, end)] {
        if b > a && !reads_zero(inner, a, b - a)? {
            // Partial clusters can be 64 MiB: zero them a bounded piece at a time.
            let zeroes = vec![0u8; (b - a).min(FILL_CHUNK) as usize];
            let mut g = a;
            while g < b {
                let n = (b - g).min(FILL_CHUNK);
                write_locked(inner, &zeroes[..n as usize], g)?;
                g += n;
            }
        }
    }
    // Whole clusters, one L2 table at a time.
    let span = inner.nelems * cs;
    let mut g = head_end;
    while g < tail_start {
        let seg_end = ((g / span + 1) * span).min(tail_start);
        zero_clusters(inner, g, seg_end, flags)?;
        g = seg_end;
    }
    Ok(())
}

/// Whether `[guest, guest+len)` already reads as zeroes without looking at data.
fn reads_zero(inner: &Inner, guest: u64, len: u64) -> Result<bool> {
    let mut pos = 0;
    while pos < len {
        let run = inner.map(guest + pos, len - pos)?;
        let zero = match run.kind {
            Entry::Zero => true,
            Entry::Unallocated => {
                inner.backing_is_zero(guest + pos)
                    && inner.backing_is_zero(guest + pos + run.len - 1)
            }
            Entry::Data(_) => false,
        };
        if !zero {
            return Ok(false);
        }
        pos += run.len;
    }
    Ok(true)
}

/// Zeroes the whole clusters `[start, end)` of one L2 table.
fn zero_clusters(inner: &Arc<Inner>, start: u64, end: u64, flags: ZeroFlags) -> Result<()> {
    let cs = inner.cluster_size;
    let has_backing = inner.dirty_lock().backing.is_some();
    // Allocated clusters are zeroed in place; the rest need a zero entry only when a
    // backing file could otherwise show through.
    let mut need_entries = false;
    let mut g = start;
    while g < end {
        let run = inner.map(g, end - g)?;
        let n = run.len.div_ceil(cs) * cs;
        match run.kind {
            Entry::Data(_) => zero_host(inner, run.host, n, flags)?,
            Entry::Zero => {}
            Entry::Unallocated => need_entries |= has_backing,
        }
        g += run.len;
    }
    if !need_entries {
        return Ok(());
    }
    let (l1i, _) = inner.split(start);
    let sync = inner.table_lock(l1i);
    let _g = need_check::begin(inner)?;
    let mut list = sync.lock();
    // A zero entry written under an allocation in flight would be overwritten by it.
    while overlaps(&list, start / cs, (end - start).div_ceil(cs)) {
        list = sync.cv.wait(list).unwrap_or_else(|p| p.into_inner());
    }
    // Under the table lock: clusters allocated meanwhile are zeroed in place, the rest
    // become zero entries.
    let mut g = start;
    let mut to_mark: Vec<(u64, u64)> = Vec::new();
    while g < end {
        let run = inner.map(g, end - g)?;
        match run.kind {
            Entry::Data(_) => {
                // Allocated since the first pass (already zeroed ones are harmless to redo).
                zero_host(inner, run.host, run.len, flags)?
            }
            Entry::Zero => {}
            Entry::Unallocated => to_mark.push((g / cs, run.len.div_ceil(cs))),
        }
        g += run.len;
    }
    if to_mark.is_empty() {
        return Ok(());
    }
    let base = l1i * inner.nelems;
    let updates: Vec<Update> = to_mark
        .iter()
        .map(|&(c, n)| Update {
            first: c - base,
            count: n,
            value: ZERO_CLUSTER,
            step: 0,
        })
        .collect();
    set_entries(inner, l1i, &updates)
}

fn zero_host(inner: &Inner, host: u64, len: u64, flags: ZeroFlags) -> Result<()> {
    inner.guard_data_write(host, len)?;
    if flags.may_unmap {
        inner.storage.punch_hole(host, len)?;
    } else {
        inner.storage.write_zeroes(host, len)?;
    }
    Ok(())
}

/// Discards whole clusters: allocated ones have their host space released (they stay
/// mapped and read as zeroes, so nothing leaks); the rest are left alone.
pub(crate) fn discard(inner: &Arc<Inner>, offset: u64, len: u64) -> Result<()> {
    inner.writable()?;
    let size = inner.image_size();
    check_range(offset, len, size)?;
    let cs = inner.cluster_size;
    let start = offset.div_ceil(cs) * cs;
    let end = if offset + len == size {
        size
    } else {
        (offset + len) / cs * cs
    };
    let _q = inner.quiesce_shared();
    let mut g = start;
    while g < end {
        let run = inner.map(g, end - g)?;
        if let Entry::Data(_) = run.kind {
            inner.guard_data_write(run.host, run.len.div_ceil(cs) * cs)?;
            inner
                .storage
                .punch_hole(run.host, run.len.div_ceil(cs) * cs)?;
        }
        g += run.len;
    }
    Ok(())
}

/// Status of the range at `offset` in this image only.
pub(crate) fn block_status(inner: &Arc<Inner>, offset: u64, len: u64) -> Result<Extent> {
    check_range(offset, len, inner.image_size())?;
    if len == 0 {
        return Err(Error::invalid("block status of an empty range"));
    }
    let _q = inner.quiesce_shared();
    let run = inner.map(offset, len)?;
    Ok(match run.kind {
        Entry::Data(_) => Extent {
            len: run.len,
            kind: ExtentKind::Data,
            offset: Some(run.host),
            compressed: false,
        },
        Entry::Zero => Extent {
            len: run.len,
            kind: ExtentKind::Zero,
            offset: None,
            compressed: false,
        },
        Entry::Unallocated => Extent {
            len: run.len,
            kind: ExtentKind::Unallocated,
            offset: None,
            compressed: false,
        },
    })
}
