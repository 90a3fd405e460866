//! Writes to images with extended L2 entries (subclusters): which subclusters a write
//! allocates, its copy-on-write regions, and the bitmap update when it is linked.
//!
//! QEMU's rules (`calculate_l2_meta`, `qcow2_alloc_cluster_link_l2`), which decide what
//! `qemu-img map` prints afterwards:
//! - a write into a cluster without a host cluster allocates one but writes only the
//!   subclusters it touches; untouched subclusters keep their state (unallocated ones
//!   keep reading through the backing file); copy-on-write fills only the parts of the
//!   first and last touched subclusters the request does not cover;
//! - a write into a cluster with its own host cluster (COPIED) goes in place where the
//!   subclusters are allocated, and elsewhere writes the touched subclusters (with the
//!   same partial-subcluster COW) into the existing host cluster, then sets their bits;
//! - a compressed cluster is copied whole into a new cluster (all subclusters
//!   allocated); a shared cluster (snapshot, COPIED clear) is copied from its first to
//!   its last allocated subcluster (or the written ones, whichever reach further);
//! - with an external data file, the host cluster of a cluster without one is the
//!   data file's at the guest offset (no refcount, no image cluster), and its bits are
//!   set as above; compressed and shared clusters do not exist there.
//!
//! Concurrency: under the metadata mutex, like `allocate`: an allocation registers its
//! guest clusters in `Meta::inflight` (whole clusters, as QEMU's dependency check), so a
//! second writer of the same cluster waits and then sees the bits the first one set;
//! bits are ORed into the entry read at commit time, under the lock, so no bit is lost.
//!
//! Crash rules: the bitmap update is an L2 update like any other (`set_l2`): it marks
//! the metadata as needing a barrier, so the subclusters' data (and a new host
//! cluster's refcount) are durable before the L2 table that marks them allocated.

use super::allocate::{l1_index, MAX_ALLOC_BYTES};
use super::l2entry::{L2Entry, SubState, Subclusters};
use super::{Meta, Qcow2};
use crate::error::{Corruption, Problem, Result, Structure, Unsupported};
use crate::format::datapath;
use crate::format::mapping::{Allocation, Cow, GuestOffset, HostOffset, Store, WriteTarget};
use std::io::IoSliceMut;
use std::sync::MutexGuard;

/// `Allocation::token` bit: the host cluster is the entry's own (COPIED) cluster; only
/// bits change, nothing to give back on abort.
pub(super) const KEEP_HOST: u64 = 1;

/// `Allocation::token` bit: the host clusters are an external data file's, at the
/// guest offsets (the spec's rule); they take no refcounts, so nothing is given back
/// on abort.
pub(super) const DATA_FILE: u64 = 2;

/// Whether an allocation with `token` holds image clusters to give back when it fails.
pub(super) fn owns_clusters(token: u64) -> bool {
    token & (KEEP_HOST | DATA_FILE) == 0
}

/// Subclusters per cluster.
const SC: u32 = 32;

/// Bits `[a, b)` of a 32-bit subcluster mask.
pub(super) fn range_mask(a: u32, b: u32) -> u32 {
    debug_assert!(a <= b && b <= SC);
    if b - a == SC {
        u32::MAX
    } else {
        ((1u32 << (b - a)) - 1) << a
    }
}

impl Subclusters {
    /// These states with `[a, b)` allocated (their zero bits cleared).
    pub(super) fn with_allocated(self, a: u32, b: u32) -> Subclusters {
        let m = range_mask(a, b);
        Subclusters::from_masks(self.alloc_mask() | m, self.zero_mask() & !m)
    }

    /// These states with `[a, b)` reading as zeroes (their allocation bits cleared).
    pub(super) fn with_zero(self, a: u32, b: u32) -> Subclusters {
        let m = range_mask(a, b);
        Subclusters::from_masks(self.alloc_mask() & !m, self.zero_mask() | m)
    }
}

impl Qcow2 {
    /// The write target for the start of `[guest, guest + len)` in an image with
    /// subclusters. Called with no allocation in flight on the first cluster.
    pub(super) fn prepare_ext<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        guest: GuestOffset,
        len: u64,
    ) -> Result<WriteTarget<'a>> {
        let cs = self.g.cs;
        let scs = self.g.subcluster();
        let cur = guest.get();
        let gc = cur / cs;
        let in_off = cur % cs;
        let end_in = (in_off + len).min(cs);
        let first = (in_off / scs) as u32;
        let last_end = end_in.div_ceil(scs) as u32;
        let l1i = l1_index(&m, gc)?;
        let e = m.entry_of(gc)?;
        match e {
            L2Entry::Normal {
                host: Some(h),
                copied: true,
                sub,
            } => {
                // (Data file clusters: no image end or metadata to check against.)
                if !m.ext_data && h.get() >= m.file_end {
                    return Err(m.mark_corrupt(Corruption::new(
                        Structure::L2Table,
                        Problem::HostPastEnd {
                            guest_cluster: gc,
                            host: h.get(),
                        },
                    )));
                }
                if sub.state(first) == SubState::Allocated {
                    // In place over the allocated subclusters (and, when the whole
                    // cluster is allocated, the following host-contiguous clusters).
                    let n = if sub == Subclusters::ALLOCATED {
                        len
                    } else {
                        let run_end = u64::from(first + sub.run_from(first)) * scs;
                        run_end.min(end_in) - in_off
                    };
                    return self.in_place(m, gc, in_off, n, h);
                }
                // The touched subclusters up to the next allocated one: written into
                // the cluster's own host cluster, then marked allocated.
                let mut stop = first + 1;
                while stop < last_end && sub.state(stop) != SubState::Allocated {
                    stop += 1;
                }
                if let Some(with) = m.overlaps_metadata(h.get() / cs, 1).filter(|_| !m.ext_data) {
                    return Err(m.mark_corrupt(Corruption::new(
                        Structure::DataCluster,
                        Problem::WriteOverlapsMetadata {
                            guest_cluster: gc,
                            host: h.get(),
                            with,
                        },
                    )));
                }
                m.before_alloc()?;
                m.l2_for_write(l1i)?;
                m.inflight.insert(gc, gc + 1);
                let from = u64::from(first) * scs;
                let to = u64::from(stop) * scs;
                let data_end = (in_off + len).min(to);
                Ok(WriteTarget::Allocate(Allocation {
                    guest: GuestOffset(gc * cs + from),
                    len: to - from,
                    store: Store::Data,
                    host: h.add(from),
                    head: Cow {
                        guest: GuestOffset(gc * cs + from),
                        len: in_off - from,
                        source: m.cow_source(&e, from, in_off - from),
                    },
                    tail: Cow {
                        guest: GuestOffset(gc * cs + data_end),
                        len: to - data_end,
                        source: m.cow_source(&e, data_end, to - data_end),
                    },
                    token: KEEP_HOST,
                }))
            }
            L2Entry::Normal { host: None, .. } => {
                // New host clusters: this one and the following clusters without a
                // host cluster the request reaches, inside one L2 table.
                let table_end = ((l1i as u64) + 1) << self.g.l2_bits;
                let last = (cur + len - 1) / cs;
                let mut last_e = e;
                let mut g2 = gc + 1;
                let max_k = (MAX_ALLOC_BYTES / cs).max(1);
                while g2 <= last && g2 < table_end && g2 - gc < max_k {
                    if m.inflight.contains(g2) {
                        break;
                    }
                    let e2 = m.entry_of(g2)?;
                    if !matches!(e2, L2Entry::Normal { host: None, .. }) {
                        break;
                    }
                    last_e = e2;
                    g2 += 1;
                }
                let k = g2 - gc;
                m.before_alloc()?;
                m.l2_for_write(l1i)?;
                // An external data file holds each guest cluster at its own offset
                // and takes no refcounts (as the standard path in `allocate`).
                let base = if m.ext_data { gc * cs } else { m.alloc(k)? };
                m.inflight.insert(gc, gc + k);
                let from = u64::from(first) * scs;
                let run_start = gc * cs + from;
                let req_end = (cur + len).min((gc + k) * cs);
                let to = req_end.div_ceil(scs) * scs;
                let to = to.min((gc + k) * cs);
                let q = req_end - (gc + k - 1) * cs;
                Ok(WriteTarget::Allocate(Allocation {
                    guest: GuestOffset(run_start),
                    len: to - run_start,
                    store: Store::Data,
                    host: HostOffset(base + from),
                    head: Cow {
                        guest: GuestOffset(run_start),
                        len: in_off - from,
                        source: m.cow_source(&e, from, in_off - from),
                    },
                    tail: Cow {
                        guest: GuestOffset(req_end),
                        len: to - req_end,
                        source: m.cow_source(&last_e, q, to - req_end),
                    },
                    token: if m.ext_data { DATA_FILE } else { 0 },
                }))
            }
            // Neither compressed nor shared clusters exist with an external data file
            // (QEMU refuses compressed writes and snapshots there): not written.
            L2Entry::Compressed { .. } | L2Entry::Normal { copied: false, .. } if m.ext_data => {
                Err(Unsupported::ExternalDataFile.into())
            }
            L2Entry::Compressed { .. } => {
                // Copied whole, as QEMU does: every subcluster allocated.
                m.before_alloc()?;
                m.l2_for_write(l1i)?;
                let base = m.alloc(1)?;
                m.inflight.insert(gc, gc + 1);
                let data_end = in_off + (len.min(cs - in_off));
                Ok(WriteTarget::Allocate(Allocation {
                    guest: GuestOffset(gc * cs),
                    len: cs,
                    store: Store::Data,
                    host: HostOffset(base),
                    head: Cow {
                        guest: GuestOffset(gc * cs),
                        len: in_off,
                        source: m.source_at(&e, 0),
                    },
                    tail: Cow {
                        guest: GuestOffset(gc * cs + data_end),
                        len: cs - data_end,
                        source: m.source_at(&e, data_end),
                    },
                    token: 0,
                }))
            }
            L2Entry::Normal {
                host: Some(_),
                copied: false,
                sub,
            } => self.prepare_shared(m, gc, in_off, len, first, last_end, sub),
        }
    }

    /// A write into a cluster shared with a snapshot: a new cluster gets the old one's
    /// subclusters from the first allocated (or written) one to the last, as QEMU
    /// copies them. The copied range may mix states (data, zeroes, backing), which one
    /// COW source cannot describe, so it is copied here (through the guest view, with
    /// the cluster registered in flight and the lock released) and the COW regions then
    /// read it back from the new cluster.
    #[allow(clippy::too_many_arguments)]
    fn prepare_shared<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        gc: u64,
        in_off: u64,
        len: u64,
        first: u32,
        last_end: u32,
        sub: Subclusters,
    ) -> Result<WriteTarget<'a>> {
        if self.crypto.is_some() {
            return Err(Unsupported::ExtendedL2SharedEncrypted.into());
        }
        let cs = self.g.cs;
        let scs = self.g.subcluster();
        let l1i = (gc >> self.g.l2_bits) as usize;
        let alloc = sub.alloc_mask();
        let lo = first.min(alloc.trailing_zeros());
        let hi = last_end.max(SC - alloc.leading_zeros());
        m.before_alloc()?;
        m.l2_for_write(l1i)?;
        let base = m.alloc(1)?;
        m.inflight.insert(gc, gc + 1);
        drop(m);
        let from = u64::from(lo) * scs;
        let to = u64::from(hi) * scs;
        let data_end = (in_off + len).min(to);
        let copy = |a: u64, b: u64| -> Result<()> {
            if a >= b {
                return Ok(());
            }
            let mut buf = vec![0u8; (b - a) as usize];
            datapath::read_vectored(self, &mut [IoSliceMut::new(&mut buf)], gc * cs + a)?;
            self.data.write_at(&buf, base + a)?;
            Ok(())
        };
        let r = copy(from, in_off).and_then(|()| copy(data_end, to));
        if let Err(e) = r {
            let mut m = self.lock();
            m.inflight.remove(gc, gc + 1);
            let _ = m.unalloc(base, 1);
            self.wake_alloc_waiters(&m);
            return Err(e);
        }
        let src = |q: u64| crate::format::mapping::Mapping::Data {
            store: Store::Data,
            host: HostOffset(base + q),
            in_place: false,
        };
        Ok(WriteTarget::Allocate(Allocation {
            guest: GuestOffset(gc * cs + from),
            len: to - from,
            store: Store::Data,
            host: HostOffset(base + from),
            head: Cow {
                guest: GuestOffset(gc * cs + from),
                len: in_off - from,
                source: src(from),
            },
            tail: Cow {
                guest: GuestOffset(gc * cs + data_end),
                len: to - data_end,
                source: src(data_end),
            },
            token: 0,
        }))
    }
}

impl Meta {
    /// The COW source of a region of `len` bytes at byte `q` of a cluster with entry
    /// `e` (any mapping when the region is empty: `q` may then be the cluster's end).
    fn cow_source(&self, e: &L2Entry, q: u64, len: u64) -> crate::format::mapping::Mapping {
        if len == 0 {
            return crate::format::mapping::Mapping::Zero { host: None };
        }
        self.source_at(e, q)
    }
}

impl Qcow2 {
    /// Guest clusters `[first, end)` an allocation covers.
    pub(super) fn ext_clusters(&self, a: &Allocation) -> (u64, u64) {
        let cs = self.g.cs;
        let first = a.guest.get() / cs;
        (first, (a.guest.get() + a.len).div_ceil(cs))
    }

    /// Links a written subcluster allocation: each cluster's entry (read now, under
    /// the lock) gets the host cluster and the written subclusters' allocation bits.
    pub(super) fn commit_ext(&self, m: &mut Meta, a: &Allocation) -> Result<()> {
        let cs = self.g.cs;
        let scs = self.g.subcluster();
        let (first, end) = self.ext_clusters(a);
        let l1i = (first >> self.g.l2_bits) as usize;
        let base = a.host.get() - a.guest.get() % cs;
        let start = a.guest.get();
        let stop = start + a.len;
        for gc in first..end {
            let c0 = gc * cs;
            let from = start.max(c0) - c0;
            let to = stop.min(c0 + cs) - c0;
            let (a_sc, b_sc) = ((from / scs) as u32, to.div_ceil(scs) as u32);
            let old = m.entry_of(gc)?;
            let old_sub = match old {
                L2Entry::Normal { sub, .. } => sub,
                L2Entry::Compressed { .. } => Subclusters::UNALLOCATED,
            };
            let host = if a.token & KEEP_HOST != 0 {
                match old.host() {
                    Some(h) => h,
                    None => {
                        return Err(Corruption::new(
                            Structure::L2Table,
                            Problem::NoHostOffset { guest_cluster: gc },
                        )
                        .into())
                    }
                }
            } else {
                HostOffset(base + (gc - first) * cs)
            };
            let e = L2Entry::Normal {
                host: Some(host),
                copied: true,
                sub: old_sub.with_allocated(a_sc, b_sc),
            };
            m.set_l2(l1i, gc, &e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(range_mask(0, 32), u32::MAX);
        assert_eq!(range_mask(3, 5), 0b11000);
        assert_eq!(range_mask(4, 4), 0);
        let s = Subclusters::ZERO.with_allocated(1, 3);
        assert_eq!(s.bitmap(), 0xffff_fff9_0000_0006);
        assert_eq!(s.with_zero(0, 32), Subclusters::ZERO);
        assert_eq!(
            Subclusters::UNALLOCATED.with_allocated(0, 32),
            Subclusters::ALLOCATED
        );
    }
}
