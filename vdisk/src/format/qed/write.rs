//! Guest writes, through the generic data path ([`datapath::write_vectored`]): QED's
//! side of the mapping contract ([`Mapper`]). A write target is either in place (an
//! allocated cluster) or an [`Allocation`] of new clusters at the end of the file whose
//! COW regions (the parts the guest does not write) the data path fills from the
//! backing file or with zeroes, in the same vectored write as the guest bytes.
//!
//! Concurrency: in-place writes take no lock (QED never frees or moves a data cluster
//! while requests run: shrink, check and repair hold the quiesce lock exclusively, and
//! discard only punches clusters that stay mapped, so [`InPlaceGuard::none`] is enough).
//! An allocation holds its L2 table's [`TableSync`] mutex only to plan, reserve
//! clusters and register them in the table's in-flight list, and again in `commit` to
//! update the table; data and fills are written with no lock held, so allocations in
//! different tables, and of different clusters of one table, overlap. Two allocations
//! of the same guest cluster are ordered by that list (the second waits, then maps
//! again and finds the cluster allocated). This per-table ordering is QED's own: the
//! contract leaves the list's place and lock to the driver.
//!
//! Crash rules: NEED_CHECK is durable before the first allocation (`need_check::begin`
//! in `prepare_write`); the new clusters are complete (data + COW) before the L2 entry
//! points at them (the data path calls `commit` only after the data write returned),
//! and over backing data a flush (shared, [`super::flush`]) separates the two in
//! `commit`; a new L2 table is complete on disk before the L1 entry points at it. An
//! aborted allocation leaves its clusters unreferenced (a leak the check reclaims; the
//! image is marked NEED_CHECK).

use super::need_check;
use super::paging::Update;
use super::Inner;
use crate::error::Result;
use crate::format::datapath::{self, InFlight, Waiters};
use crate::format::mapping::{
    Allocation, Cow, GuestOffset, HostOffset, InPlaceGuard, Mapper, Mapping, Run, Store,
    WriteTarget,
};
use crate::format::{check_range, Driver};
use crate::storage::Storage;
use std::io::IoSlice;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Largest piece of zeroes built in memory at once (partial-cluster zero writes).
pub(super) const FILL_CHUNK: u64 = 1 << 20;

/// Largest COW region (head and tail together) the data path builds in memory for one
/// allocation; beyond it fills go a bounded piece of this size at a time. QED's clusters
/// reach 64 MiB, and no single I/O of the driver exceeds 1 MiB.
const COW_BUFFER: u64 = FILL_CHUNK;

/// [`Allocation::token`] bit: the new clusters replace backing data, so `commit` makes
/// them durable before linking them (else a crash could turn backing data into zeroes).
const TOKEN_FLUSH: u64 = 1;

/// Per-L2-table synchronisation: the mutex orders every change of the table (entry
/// updates, its creation) and guards the guest clusters whose allocation is in flight;
/// the condvar wakes requests waiting for one of those to finish.
#[derive(Debug, Default)]
pub(crate) struct TableSync {
    state: Mutex<TableState>,
    cv: Condvar,
}

/// What a [`TableSync`] mutex guards.
#[derive(Debug, Default)]
pub(crate) struct TableState {
    /// Guest clusters `[start, end)` being allocated.
    pub inflight: InFlight,
    waiters: Waiters,
}

impl TableSync {
    pub(super) fn lock(&self) -> MutexGuard<'_, TableState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until some in-flight allocation of the table ends.
    pub(super) fn wait<'a>(&self, g: MutexGuard<'a, TableState>) -> MutexGuard<'a, TableState> {
        Waiters::wait(&self.cv, g, |s| &mut s.waiters)
    }

    /// Whether an allocation is registered (its table lock must then outlive every
    /// request holding it: see [`Inner::table_lock`]).
    pub(super) fn busy(&self) -> bool {
        !self.lock().inflight.is_empty()
    }

    /// Ends the in-flight registration of clusters `[start, end)`.
    fn finish(&self, start: u64, end: u64) {
        let mut st = self.lock();
        st.inflight.remove(start, end);
        st.waiters.wake(&self.cv);
    }
}

/// Writes guest bytes.
pub(crate) fn write_vectored(inner: &Arc<Inner>, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
    inner.writable()?;
    let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    check_range(offset, total, inner.image_size())?;
    let _q = inner.quiesce_shared();
    write_locked(inner, bufs, offset)
}

/// Writes with the quiesce lock already held (shared).
pub(super) fn write_locked(inner: &Arc<Inner>, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
    datapath::write_vectored(inner, bufs, offset)
}

/// An in-place target for `run` if it is allocated (refusing host ranges that hold an
/// L2 table: a cluster referenced twice).
fn in_place(inner: &Inner, run: &Run) -> Result<Option<WriteTarget<'static>>> {
    let Mapping::Data { store, host, .. } = run.mapping else {
        return Ok(None);
    };
    inner.guard_data_write(host.get(), run.len)?;
    Ok(Some(WriteTarget::InPlace {
        store,
        host,
        len: run.len,
        guard: InPlaceGuard::none(),
    }))
}

/// The unallocated or zero clusters at the start of a write, found by mapping.
struct Plan {
    /// First guest cluster.
    first: u64,
    /// Clusters.
    count: u64,
    /// End of the guest bytes the request writes into them.
    data_end: u64,
    /// What the first cluster read as before (the head's COW source).
    head: Mapping,
    /// What the last cluster read as before (the tail's COW source).
    tail: Mapping,
    /// Whether some cluster read the backing file.
    any_unallocated: bool,
}

/// Plans the allocation of the non-allocated clusters from `guest` on (at most `len`
/// bytes), `first` being the mapping at `guest` (not data).
fn plan(inner: &Inner, guest: u64, len: u64, first: Run) -> Result<Plan> {
    let cs = inner.cluster_size;
    let end = guest + len;
    let mut p = Plan {
        first: guest / cs,
        count: 0,
        data_end: guest + first.len,
        head: first.mapping,
        tail: first.mapping,
        any_unallocated: first.mapping == Mapping::Unallocated,
    };
    while p.data_end < end {
        let run = inner.map_range(p.data_end, end - p.data_end)?;
        if matches!(run.mapping, Mapping::Data { .. }) {
            break;
        }
        p.tail = run.mapping;
        p.any_unallocated |= run.mapping == Mapping::Unallocated;
        p.data_end += run.len;
    }
    p.count = p.data_end.div_ceil(cs) - p.first;
    Ok(p)
}

impl Mapper for Arc<Inner> {
    fn guest_size(&self) -> u64 {
        self.image_size()
    }

    fn store(&self, which: Store) -> &Arc<dyn Storage> {
        match which {
            Store::Metadata => &self.storage,
            Store::Data => &self.data,
        }
    }

    fn backing_image(&self) -> Option<&Arc<dyn Driver>> {
        self.backing.as_ref()
    }

    fn map(&self, guest: GuestOffset, len: u64) -> Result<Run> {
        self.map_range(guest.get(), len)
    }

    fn cow_buffer_limit(&self) -> u64 {
        COW_BUFFER
    }

    /// In place when the start of the range is allocated data (one lookup; nothing
    /// reserved otherwise): what a direct range writes to.
    fn prepare_in_place(&self, guest: GuestOffset, len: u64) -> Result<Option<WriteTarget<'_>>> {
        in_place(self, &self.map_range(guest.get(), len)?)
    }

    /// In place if the first cluster is allocated; otherwise an allocation of the run
    /// of unallocated/zero clusters from `guest`, inside one L2 table.
    fn prepare_write(&self, guest: GuestOffset, len: u64) -> Result<WriteTarget<'_>> {
        let inner: &Inner = self;
        let cs = inner.cluster_size;
        let g = guest.get();
        // One L2 table at a time: its lock orders the allocation.
        let span = inner.nelems * cs;
        let len = len.min(span - g % span);
        // Fast path: an allocated cluster is written in place with no lock.
        if let Some(t) = in_place(inner, &inner.map_range(g, len)?)? {
            return Ok(t);
        }
        let (l1i, _) = inner.split(g);
        let sync = inner.table_lock(l1i);
        let dirty = need_check::begin(self)?;
        let mut st = sync.lock();
        let p = loop {
            // Under the table lock the mapping cannot change but by an allocation in
            // flight, and those we wait for.
            let run = inner.map_range(g, len)?;
            if let Some(t) = in_place(inner, &run)? {
                return Ok(t);
            }
            let p = plan(inner, g, len, run)?;
            if !st.inflight.overlaps(p.first, p.first + p.count) {
                break p;
            }
            st = sync.wait(st);
        };
        let host = inner.alloc_clusters(p.count)?;
        st.inflight.insert(p.first, p.first + p.count);
        drop(st);
        // Ended by commit or abort.
        dirty.detach();
        let start = p.first * cs;
        let alloc_len = p.count * cs;
        // Clusters that read backing data before must not lose it to a crash: neither
        // the copied COW nor (for whole-cluster writes) the old contents may turn into
        // zeroes. Clusters past the backing file's end read zeroes either way.
        let flush = p.any_unallocated && !inner.backing_is_zero(start);
        Ok(WriteTarget::Allocate(Allocation {
            guest: GuestOffset(start),
            len: alloc_len,
            store: Store::Data,
            host: HostOffset(host),
            head: Cow {
                guest: GuestOffset(start),
                len: g - start,
                source: p.head,
            },
            tail: Cow {
                guest: GuestOffset(p.data_end),
                len: start + alloc_len - p.data_end,
                source: p.tail,
            },
            token: if flush { TOKEN_FLUSH } else { 0 },
        }))
    }

    /// Flushes over backing data, then points the L2 entries (and, for a new table, the
    /// L1 entry) at the new clusters under the table's lock.
    fn commit(&self, a: Allocation) -> Result<()> {
        let inner: &Inner = self;
        let cs = inner.cluster_size;
        let (first, end) = (a.guest.get() / cs, (a.guest.get() + a.len) / cs);
        let (l1i, _) = inner.split(a.guest.get());
        let sync = inner.table_lock(l1i);
        // With a backing file, the copied backing data must be durable before anything
        // points at it.
        let flushed = if a.token & TOKEN_FLUSH != 0 {
            inner.flush_gate.flush(&*inner.data)
        } else {
            Ok(())
        };
        // Every change of the table is ordered by its lock.
        let mut st = sync.lock();
        let r = flushed.and_then(|()| {
            let update = Update {
                first: first - l1i * inner.nelems,
                count: end - first,
                value: a.host.get(),
                step: cs,
            };
            set_entries(self, l1i, &[update])
        });
        st.inflight.remove(first, end);
        st.waiters.wake(&sync.cv);
        drop(st);
        need_check::end(inner);
        r
    }

    /// Unregisters the allocation; its clusters stay unreferenced (a leak) unless they
    /// are still the last ones allocated, which are given back.
    fn abort(&self, a: Allocation) {
        let end = a.host.get() + a.len;
        let _ = self.file_size.compare_exchange(
            end,
            a.host.get(),
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
        let cs = self.cluster_size;
        let (first, end) = (a.guest.get() / cs, (a.guest.get() + a.len) / cs);
        let (l1i, _) = self.split(a.guest.get());
        self.table_lock(l1i).finish(first, end);
        need_check::end(self);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::qed::Qed;
    use crate::format::{BackingSpec, CreateSpec, DriverOptions, Format, ZeroFlags};
    use crate::storage::MemStorage;
    use std::sync::atomic::{AtomicBool, Ordering};

    const CS: u64 = 4096;
    /// 4 KiB clusters, 1-cluster tables: 512 clusters (2 MiB) per L2 table.
    const SPAN: u64 = 512 * CS;

    /// A new 8 MiB image in memory, over a raw backing file of `backing` bytes of 0x11
    /// (none if 0).
    fn image(backing: usize) -> Qed {
        let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let spec = CreateSpec {
            size: 8 << 20,
            backing: (backing > 0).then(|| BackingSpec {
                name: "base.raw".into(),
                format: Some(Format::Raw),
            }),
            options: vec![
                ("cluster_size".into(), "4096".into()),
                ("table_size".into(), "1".into()),
            ],
        };
        crate::format::qed::create(&st, &spec).unwrap();
        let base: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![0x11; backing]));
        Qed::open(st, &DriverOptions::default(), &mut |_s: &BackingSpec| {
            crate::format::open(
                Format::Raw,
                base.clone(),
                &DriverOptions::default(),
                &mut |_| Err(crate::error::Invalid::BackingDisabled.into()),
            )
        })
        .unwrap()
    }

    fn alloc(t: WriteTarget<'_>) -> Allocation {
        match t {
            WriteTarget::Allocate(a) => a,
            WriteTarget::InPlace { host, len, .. } => panic!("in place at {host} ({len})"),
        }
    }

    #[test]
    fn allocation_layout_and_commit() {
        let q = image(0);
        let m = &q.inner;
        let a = alloc(m.prepare_write(GuestOffset(CS + 512), 1000).unwrap());
        assert_eq!(
            (a.guest, a.len, a.store),
            (GuestOffset(CS), CS, Store::Data)
        );
        assert_eq!((a.head.guest, a.head.len), (GuestOffset(CS), 512));
        assert_eq!(
            (a.tail.guest, a.tail.len),
            (GuestOffset(CS + 1512), CS - 1512)
        );
        assert_eq!(a.head.source, Mapping::Unallocated);
        assert_eq!(a.tail.source, Mapping::Unallocated);
        assert_eq!(
            (a.data_guest(), a.data_len()),
            (GuestOffset(CS + 512), 1000)
        );
        // No backing file: nothing to make durable before the L2 update.
        assert_eq!(a.token & TOKEN_FLUSH, 0);
        // NEED_CHECK is durable before the allocation is handed out.
        assert!(q.is_dirty());
        let host = a.host;
        m.commit(a).unwrap();
        let run = m.map(GuestOffset(CS + 100), 10 * CS).unwrap();
        assert_eq!(run.len, CS - 100);
        assert_eq!(
            run.mapping,
            Mapping::Data {
                store: Store::Data,
                host: host.add(100),
                in_place: true
            }
        );
        // Now written in place.
        match m.prepare_write(GuestOffset(CS + 8), 3 * CS).unwrap() {
            WriteTarget::InPlace { host: h, len, .. } => {
                assert_eq!((h, len), (host.add(8), CS - 8));
            }
            WriteTarget::Allocate(a) => panic!("allocated again: {a:?}"),
        };
    }

    #[test]
    fn allocations_stay_inside_one_table_and_stop_at_data() {
        let q = image(0);
        let m = &q.inner;
        // From the last cluster of the first table: clipped at the table's end.
        let a = alloc(m.prepare_write(GuestOffset(SPAN - CS), 3 * CS).unwrap());
        assert_eq!(
            (a.guest, a.len, a.data_len()),
            (GuestOffset(SPAN - CS), CS, CS)
        );
        m.commit(a).unwrap();
        // Clusters 2..5 then data at 5: the run stops there, the rest is a later call.
        let d = alloc(m.prepare_write(GuestOffset(5 * CS), CS).unwrap());
        m.commit(d).unwrap();
        let a = alloc(m.prepare_write(GuestOffset(2 * CS), 8 * CS).unwrap());
        assert_eq!(
            (a.guest, a.len, a.data_len()),
            (GuestOffset(2 * CS), 3 * CS, 3 * CS)
        );
        assert_eq!((a.head.len, a.tail.len), (0, 0));
        m.abort(a);
        // Aborted: nothing points at it, the clusters can be allocated again at once.
        assert_eq!(
            m.map(GuestOffset(2 * CS), CS).unwrap().mapping,
            Mapping::Unallocated
        );
        let again = alloc(m.prepare_write(GuestOffset(2 * CS), CS).unwrap());
        m.abort(again);
    }

    #[test]
    fn cow_sources_over_backing_and_zero_clusters() {
        let q = image(3 * CS as usize);
        let m = &q.inner;
        // Cluster 1 becomes a zero cluster (a backing file would show through otherwise).
        q.write_zeroes(CS, CS, ZeroFlags::default()).unwrap();
        assert_eq!(
            m.map(GuestOffset(CS), CS).unwrap().mapping,
            Mapping::Zero { host: None }
        );
        let a = alloc(m.prepare_write(GuestOffset(CS / 2), CS).unwrap());
        assert_eq!((a.guest, a.len), (GuestOffset(0), 2 * CS));
        assert_eq!((a.head.len, a.head.source), (CS / 2, Mapping::Unallocated));
        assert_eq!(
            (a.tail.guest, a.tail.len, a.tail.source),
            (
                GuestOffset(CS + CS / 2),
                CS / 2,
                Mapping::Zero { host: None }
            )
        );
        // Backing data under the new clusters: commit flushes before linking them.
        assert_eq!(a.token & TOKEN_FLUSH, TOKEN_FLUSH);
        m.abort(a);
        // Past the backing file's end, unallocated clusters read zeroes: no flush.
        let a = alloc(m.prepare_write(GuestOffset(4 * CS), 10).unwrap());
        assert_eq!(a.token & TOKEN_FLUSH, 0);
        m.abort(a);
    }

    #[test]
    fn overlapping_allocations_wait_for_commit() {
        let q = image(0);
        let m = &q.inner;
        let a = alloc(m.prepare_write(GuestOffset(7 * CS), 100).unwrap());
        let host = a.host;
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let second = s.spawn(|| {
                let t = m.prepare_write(GuestOffset(7 * CS + 200), 100).unwrap();
                done.store(true, Ordering::SeqCst);
                match t {
                    WriteTarget::InPlace { host, len, .. } => (host, len),
                    WriteTarget::Allocate(a) => panic!("second allocation: {a:?}"),
                }
            });
            // Another cluster of the same table is not held up.
            let other = alloc(m.prepare_write(GuestOffset(9 * CS), 100).unwrap());
            m.abort(other);
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(!done.load(Ordering::SeqCst), "second request did not wait");
            m.commit(a).unwrap();
            // Once the first is linked, the second finds the cluster allocated.
            assert_eq!(second.join().unwrap(), (host.add(200), 100));
        });
    }
}
