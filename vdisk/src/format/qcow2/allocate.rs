//! Making guest ranges writable: in-place targets and new allocations with their
//! copy-on-write regions (`prepare`), then linking (`commit_alloc`) or giving back
//! (`abort_alloc`). The generic data path ([`crate::format::datapath::write`]) does the
//! data I/O in between, without the metadata lock.
//!
//! Concurrency: everything here runs under the metadata mutex. A request first waits
//! for allocations in flight on its first cluster (then reads the mapping again: the
//! allocation it waited for may have changed it); an allocation registers its guest
//! clusters in `Meta::inflight` until committed or aborted; an in-place write registers
//! its clusters in `Meta::direct` so that a discard or zero write cannot release (and a
//! later allocation reuse) their host clusters while the data goes down.
//!
//! Crash rules: new clusters get their refcount in cache at allocation; `commit_alloc`
//! links them with `Meta::link`, which marks the metadata as needing a barrier, so the
//! write-back (see `tables`) makes refcounts and data durable before any L2 table
//! pointing at them. Frees of what the entries referenced before are deferred.

use super::header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY};
use super::l2entry::L2Entry;
use super::subcluster::owns_clusters;
use super::{Meta, Qcow2};
use crate::error::{Corruption, Problem, Result, Structure};
use crate::format::datapath::Waiters;
use crate::format::mapping::{
    Allocation, Cow, GuestOffset, HostOffset, InPlaceGuard, ReleaseInPlace, Store, WriteTarget,
};
use std::sync::MutexGuard;

/// Most bytes one allocating request reserves at once.
pub(super) const MAX_ALLOC_BYTES: u64 = 32 << 20;

/// `Allocation::token` bit: the host cluster is the entry's own preallocated zero
/// cluster, written in place, or an external data file's cluster (nothing to give
/// back on abort).
const REUSED: u64 = 1;

impl Meta {
    /// With lazy refcounts, marks the image dirty before its first allocating write.
    pub(crate) fn before_alloc(&mut self) -> Result<()> {
        if self.hdr.compatible & COMPAT_LAZY_REFCOUNTS != 0
            && self.hdr.incompatible & INCOMPAT_DIRTY == 0
        {
            self.hdr.incompatible |= INCOMPAT_DIRTY;
            // Durable (the header write flushes) before anything is counted lazily;
            // if it fails, nothing may be.
            if let Err(e) = self.write_header() {
                self.hdr.incompatible &= !INCOMPAT_DIRTY;
                return Err(e);
            }
            self.set_dirty = true;
        }
        Ok(())
    }
}

/// Host offset of guest cluster `gc` (clusters of `cs` bytes).
fn start_of(gc: u64, cs: u64) -> u64 {
    gc * cs
}

/// A preallocated zero cluster with refcount one: QEMU writes it in place.
fn reusable_zero(e: &L2Entry) -> Option<HostOffset> {
    match *e {
        L2Entry::Normal {
            host: Some(h),
            copied: true,
            ..
        } if e.is_zero() => Some(h),
        _ => None,
    }
}

/// The L1 index of guest cluster `gc`, refused past the end of the L1 table.
pub(super) fn l1_index(m: &Meta, gc: u64) -> Result<usize> {
    let l1i = (gc >> m.g.l2_bits) as usize;
    if l1i >= m.l1.len() {
        return Err(Corruption::new(
            Structure::L1Table,
            Problem::BeyondL1 {
                guest_cluster: gc,
                entries: Some(m.l1.len() as u64),
            },
        )
        .into());
    }
    Ok(l1i)
}

impl Qcow2 {
    /// Blocks until an allocation or in-place write finishes (see [`Waiters`]).
    pub(crate) fn wait_alloc_done<'a>(&'a self, m: MutexGuard<'a, Meta>) -> MutexGuard<'a, Meta> {
        Waiters::wait(&self.alloc_done, m, |m| &mut m.waiters)
    }

    /// Wakes requests waiting on an allocation; `m` is the guard under which the
    /// in-flight state just changed.
    pub(crate) fn wake_alloc_waiters(&self, m: &Meta) {
        m.waiters.wake(&self.alloc_done);
    }

    /// [`Self::prepare`] when the first cluster is overwritten in place: one lock and
    /// one L2 lookup; `None` (nothing changed) where the write allocates.
    pub(crate) fn prepare_in_place_only(
        &self,
        guest: GuestOffset,
        len: u64,
    ) -> Result<Option<WriteTarget<'_>>> {
        if self.g.ext_l2 {
            // Subclusters: the general rule (map, then prepare).
            return crate::format::datapath::direct::in_place_by_map(self, guest, len);
        }
        let cs = self.g.cs;
        let cur = guest.get();
        let gc = cur / cs;
        let mut m = self.lock();
        m.check_writable()?;
        while m.inflight.contains(gc) {
            m = self.wait_alloc_done(m);
        }
        match m.entry_of(gc)?.in_place() {
            Some(host) => self.in_place(m, gc, cur % cs, len, host).map(Some),
            None => Ok(None),
        }
    }

    /// The write target for the start of guest `[guest, guest + len)`.
    pub(crate) fn prepare(&self, guest: GuestOffset, len: u64) -> Result<WriteTarget<'_>> {
        let cs = self.g.cs;
        let cur = guest.get();
        let gc = cur / cs;
        let in_off = cur % cs;
        let mut m = self.lock();
        m.check_writable()?;
        while m.inflight.contains(gc) {
            m = self.wait_alloc_done(m);
        }
        if self.g.ext_l2 {
            return self.prepare_ext(m, guest, len);
        }
        let e = m.entry_of(gc)?;
        if let Some(host) = e.in_place() {
            return self.in_place(m, gc, in_off, len, host);
        }
        // Allocating run: clusters needing a new host cluster, inside one L2 table.
        let l1i = l1_index(&m, gc)?;
        let table_end = ((l1i as u64) + 1) << self.g.l2_bits;
        let last = (cur + len - 1) / cs;
        let max_k = (MAX_ALLOC_BYTES / cs).max(1);
        // A zero cluster that keeps its own host cluster (refcount 1) is written in
        // place, like QEMU does; it gets a run of its own.
        // (In an external data file no image metadata can be in the way.)
        let reuse = reusable_zero(&e).filter(|h| {
            m.ext_data || (h.get() < m.file_end && m.overlaps_metadata(h.get() / cs, 1).is_none())
        });
        let mut last_e = e;
        let mut g2 = gc + 1;
        while reuse.is_none() && g2 <= last && g2 < table_end && g2 - gc < max_k {
            if m.inflight.contains(g2) {
                break;
            }
            let e2 = m.entry_of(g2)?;
            if e2.in_place().is_some() || reusable_zero(&e2).is_some() {
                break;
            }
            last_e = e2;
            g2 += 1;
        }
        let k = g2 - gc;
        m.before_alloc()?;
        m.l2_for_write(l1i)?;
        let host = match reuse {
            Some(h) => h,
            // An external data file holds each guest cluster at its own offset (the
            // spec's rule) and takes no refcounts.
            None if m.ext_data => HostOffset(start_of(gc, cs)),
            None => HostOffset(m.alloc(k)?),
        };
        m.inflight.insert(gc, gc + k);
        let start = gc * cs;
        let run_end = (gc + k) * cs;
        let data_end = (cur + len).min(run_end);
        let tail = run_end - data_end;
        let a = Allocation {
            guest: GuestOffset(start),
            len: k * cs,
            store: Store::Data,
            host,
            head: Cow {
                guest: GuestOffset(start),
                len: in_off,
                source: m.source_at(&e, 0),
            },
            tail: Cow {
                guest: GuestOffset(data_end),
                len: tail,
                source: m.source_at(&last_e, cs - tail),
            },
            token: if reuse.is_some() || m.ext_data {
                REUSED
            } else {
                0
            },
        };
        Ok(WriteTarget::Allocate(a))
    }

    /// In-place target from guest cluster `gc` (host cluster `host`), extended over the
    /// following clusters contiguous on the host.
    pub(super) fn in_place<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        gc: u64,
        in_off: u64,
        len: u64,
        host: HostOffset,
    ) -> Result<WriteTarget<'a>> {
        let cs = self.g.cs;
        let h = host.get();
        if m.ext_data {
            // Data file clusters: no image metadata there, and no end to check (a
            // shorter data file reads as zeroes and grows as it is written).
            let n = self.in_place_run(&mut m, gc, in_off, len, h)?;
            m.direct.insert(gc, n.1);
            drop(m);
            return Ok(WriteTarget::InPlace {
                store: Store::Data,
                host: host.add(in_off),
                len: n.0,
                guard: InPlaceGuard::new(self, (gc, n.1)),
            });
        }
        if h >= m.file_end {
            return Err(m.mark_corrupt(Corruption::new(
                Structure::L2Table,
                Problem::HostPastEnd {
                    guest_cluster: gc,
                    host: h,
                },
            )));
        }
        let (n, g2) = self.in_place_run(&mut m, gc, in_off, len, h)?;
        if let Some(with) = m.overlaps_metadata(h / cs, (in_off + n).div_ceil(cs)) {
            return Err(m.mark_corrupt(Corruption::new(
                Structure::DataCluster,
                Problem::WriteOverlapsMetadata {
                    guest_cluster: gc,
                    host: h,
                    with,
                },
            )));
        }
        m.direct.insert(gc, g2);
        drop(m);
        Ok(WriteTarget::InPlace {
            store: Store::Data,
            host: host.add(in_off),
            len: n,
            guard: InPlaceGuard::new(self, (gc, g2)),
        })
    }

    /// The bytes (from `in_off` in guest cluster `gc`, at most `len`) and the end
    /// cluster of the run of in-place clusters contiguous on the host from `h`.
    fn in_place_run(
        &self,
        m: &mut Meta,
        gc: u64,
        in_off: u64,
        len: u64,
        h: u64,
    ) -> Result<(u64, u64)> {
        let cs = self.g.cs;
        let mut n = (cs - in_off).min(len);
        let mut next = h + cs;
        let mut g2 = gc + 1;
        while n < len {
            match m.entry_of(g2)?.in_place() {
                Some(h2) if h2.get() == next && (m.ext_data || next < m.file_end) => {
                    n += cs.min(len - n);
                    next += cs;
                    g2 += 1;
                }
                _ => break,
            }
        }
        Ok((n, g2))
    }

    /// Links a written allocation into the L2 table and ends its in-flight entry.
    pub(crate) fn commit_alloc(&self, a: Allocation) -> Result<()> {
        if self.g.ext_l2 {
            let (gc, end) = self.ext_clusters(&a);
            let mut m = self.lock();
            m.inflight.remove(gc, end);
            let r = self.commit_ext(&mut m, &a);
            if r.is_err() && owns_clusters(a.token) {
                let base = a.host.get() - a.guest.get() % self.g.cs;
                let _ = m.unalloc(base, end - gc);
            }
            self.wake_alloc_waiters(&m);
            r?;
            return m.maybe_writeback();
        }
        let cs = self.g.cs;
        let gc = a.guest.get() / cs;
        let k = a.len / cs;
        let l1i = (gc >> self.g.l2_bits) as usize;
        let mut m = self.lock();
        m.inflight.remove(gc, gc + k);
        let r = m.link(l1i, gc, k, a.host.get());
        if r.is_err() && a.token & REUSED == 0 {
            let _ = m.unalloc(a.host.get(), k);
        }
        self.wake_alloc_waiters(&m);
        r?;
        m.maybe_writeback()
    }

    /// Gives back an allocation whose data write failed (nothing points at it).
    pub(crate) fn abort_alloc(&self, a: Allocation) {
        if self.g.ext_l2 {
            let (gc, end) = self.ext_clusters(&a);
            let mut m = self.lock();
            m.inflight.remove(gc, end);
            if owns_clusters(a.token) {
                let base = a.host.get() - a.guest.get() % self.g.cs;
                if let Err(e) = m.unalloc(base, end - gc) {
                    tracing::warn!("qcow2: giving back clusters of a failed write: {e}");
                }
            }
            self.wake_alloc_waiters(&m);
            return;
        }
        let cs = self.g.cs;
        let gc = a.guest.get() / cs;
        let k = a.len / cs;
        let mut m = self.lock();
        m.inflight.remove(gc, gc + k);
        if a.token & REUSED == 0 {
            if let Err(e) = m.unalloc(a.host.get(), k) {
                tracing::warn!("qcow2: giving back clusters of a failed write: {e}");
            }
        }
        self.wake_alloc_waiters(&m);
    }
}

impl ReleaseInPlace for Qcow2 {
    fn release_in_place(&self, (start, end): (u64, u64)) {
        let mut m = self.lock();
        m.direct.remove(start, end);
        self.wake_alloc_waiters(&m);
    }
}
