//! Zero writes and discards: whole clusters get zero flags or are deallocated in the
//! L2 tables; partial clusters follow QEMU's rule (zero flag when the rest of the
//! cluster already reads as zeroes through the chain, zero bytes otherwise).
//!
//! Concurrency: L2 updates run under the metadata mutex, one table at a time, after
//! waiting for allocations in flight and in-place writes on the same clusters (their
//! host clusters must not be released under them). A decision taken without the lock
//! (partial clusters) is re-checked under it and retried a few times before falling
//! back to zero bytes.
//!
//! Crash rules: the host clusters dropped from the mapping are released through the
//! deferred frees (`pending_frees`), i.e. only once the updated L2 tables are durable;
//! the mapping is removed before the refcount drops.

use super::l2entry::{L2Entry, Subclusters};
use super::tables::set;
use super::{Qcow2, OFFSET_MASK, ZERO};
use crate::error::{Corruption, Problem, Result, Structure, Unsupported, ZeroLimit};
use crate::format::{datapath, Driver, ZeroFlags};
use std::io::IoSlice;

impl Qcow2 {
    pub(crate) fn do_write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.g.ext_l2 {
            return self.zero_ext(offset, len, flags);
        }
        let cs = self.g.cs;
        let end = offset + len;
        let first_full = offset.div_ceil(cs);
        // The final partial cluster of the image counts as whole.
        let size = self.size();
        let last_full = if end == size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if first_full >= last_full {
            return self.zero_partial(offset, len, flags);
        }
        let whole_end = (last_full * cs).min(end);
        if flags.fast {
            if offset < first_full * cs {
                self.zero_partial_pass(offset, first_full * cs - offset, true, flags)?;
            }
            if whole_end < end {
                self.zero_partial_pass(whole_end, end - whole_end, true, flags)?;
            }
            if self.g.version < 3 && self.lock().has_backing {
                return Err(Unsupported::ZeroesNeedData(ZeroLimit::Qcow2V2Backing).into());
            }
        }
        if offset < first_full * cs {
            self.zero_partial(offset, first_full * cs - offset, flags)?;
        }
        if whole_end < end {
            self.zero_partial(whole_end, end - whole_end, flags)?;
        }
        if self.g.version < 3 {
            let has_backing = self.lock().has_backing;
            if has_backing {
                if flags.fast {
                    return Err(Unsupported::ZeroesNeedData(ZeroLimit::Qcow2V2Backing).into());
                }
                return self.write_zero_bytes(first_full * cs, whole_end - first_full * cs);
            }
            return self.set_clusters(first_full, last_full, Mode::Dealloc);
        }
        self.set_clusters(
            first_full,
            last_full,
            if flags.may_unmap {
                Mode::ZeroUnmap
            } else {
                Mode::ZeroKeep
            },
        )
    }

    pub(super) fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        while offset < end {
            let n = (end - offset).min(chunk.len() as u64) as usize;
            datapath::write_vectored(self, &[IoSlice::new(&chunk[..n])], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Zeroes a range that does not cover whole clusters, cluster by cluster, as QEMU
    /// does: a v3 cluster that is unallocated or already zero, and whose bytes outside
    /// the range read as zeroes (block status, through the backing chain), gets the
    /// zero flag; other clusters that do not already read as zeroes get zero bytes.
    fn zero_partial(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if flags.fast {
            // Refuse before changing anything.
            self.zero_partial_pass(offset, len, true, flags)?;
        }
        self.zero_partial_pass(offset, len, false, flags)
    }

    /// Whether `[off, off+len)` reads as zeroes according to block status through the
    /// chain (never by reading data): QEMU's `is_zero`.
    fn status_zero(&self, off: u64, len: u64) -> Result<bool> {
        datapath::is_zero(self, off, len)
    }

    fn zero_partial_pass(&self, offset: u64, len: u64, dry: bool, flags: ZeroFlags) -> Result<()> {
        let cs = self.g.cs;
        let end = offset + len;
        let size = self.size();
        let v3 = self.g.version >= 3;
        let mut off = offset;
        // Each cluster is retried at most a few times when a concurrent write changes
        // it between the look and the update; then it gets zero bytes.
        let mut tries = 0;
        while off < end {
            let n = (cs - off % cs).min(end - off);
            let gc = off / cs;
            let cl = self.lock().entry_of(gc)?;
            let no_backing = self.backing.is_none() && !self.lock().has_backing;
            let flag_ok = v3
                && tries < 3
                && (cl.is_unallocated() || cl.is_zero())
                && self.status_zero(gc * cs, off - gc * cs)?
                && self.status_zero(off + n, ((gc + 1) * cs).min(size).saturating_sub(off + n))?;
            if flag_ok && dry {
                // Possible without writing data: nothing to refuse.
            } else if flag_ok {
                let mode = if flags.may_unmap {
                    Mode::ZeroUnmap
                } else {
                    Mode::ZeroKeep
                };
                let same = |c: &L2Entry| c.is_unallocated() || c.is_zero();
                if !self.set_clusters_if(gc, gc + 1, mode, Some(&same))? {
                    tries += 1;
                    continue;
                }
            } else {
                let already = cl.is_zero() || (cl.is_unallocated() && no_backing);
                if !already {
                    if dry {
                        return Err(
                            Unsupported::ZeroesNeedData(ZeroLimit::Qcow2PartialCluster).into()
                        );
                    }
                    self.write_zero_bytes(off, n)?;
                }
            }
            tries = 0;
            off += n;
        }
        Ok(())
    }

    pub(crate) fn do_discard(&self, offset: u64, len: u64) -> Result<()> {
        let cs = self.g.cs;
        let end = offset + len;
        let first = offset.div_ceil(cs);
        let last = if end == self.size() {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if first >= last {
            return Ok(());
        }
        let has_backing = self.lock().has_backing;
        let mode = if self.g.version >= 3 {
            Mode::Discard
        } else if has_backing {
            // v2 cannot say "zeroes": deallocating would expose the backing file, so
            // (like QEMU) the discard does nothing.
            return Ok(());
        } else {
            Mode::Dealloc
        };
        self.set_clusters(first, last, mode)
    }

    /// Rewrites the L2 entries of guest clusters `[first, last)` (zero flag or
    /// deallocation), releasing the host clusters they referenced.
    pub(crate) fn set_clusters(&self, first: u64, last: u64, mode: Mode) -> Result<()> {
        self.set_clusters_if(first, last, mode, None).map(|_| ())
    }

    /// [`Self::set_clusters`], stopping (returning false) at the first cluster whose
    /// current state fails `only` (checked under the lock, so a decision taken before
    /// it was held cannot be applied to a cluster that changed meanwhile).
    fn set_clusters_if(
        &self,
        first: u64,
        last: u64,
        mode: Mode,
        only: Option<&dyn Fn(&L2Entry) -> bool>,
    ) -> Result<bool> {
        let mut gc = first;
        let mut data_ops: Vec<(u64, u64, bool)> = Vec::new();
        while gc < last {
            let l1i = (gc >> self.g.l2_bits) as usize;
            let table_end = (((l1i as u64) + 1) << self.g.l2_bits).min(last);
            let mut m = self.lock();
            m.check_writable()?;
            // Allocations in flight and in-place writes still running on these
            // clusters must finish before their host clusters can be released.
            while m.inflight.overlaps(gc, table_end) || m.direct.overlaps(gc, table_end) {
                m = self.wait_alloc_done(m);
            }
            if l1i >= m.l1.len() {
                return Err(Corruption::new(
                    Structure::L1Table,
                    Problem::BeyondL1 {
                        guest_cluster: gc,
                        entries: None,
                    },
                )
                .into());
            }
            let unalloc_table = m.l1[l1i] & OFFSET_MASK == 0;
            let backing_visible = m.has_backing;
            // Nothing to deallocate in a missing table; zero writes do allocate it (to
            // set zero flags), as QEMU does.
            if unalloc_table
                && (mode == Mode::Dealloc || (mode == Mode::Discard && !backing_visible))
            {
                gc = table_end;
                continue;
            }
            let mut prepared = false;
            let mask = self.g.l2_entries - 1;
            for g in gc..table_end {
                let e = m.l2_entry(g)?;
                let cl = m.entry_of(g)?;
                if only.is_some_and(|f| !f(&cl)) {
                    m.maybe_writeback()?;
                    return Ok(false);
                }
                // QEMU's rules (zero_in_l2_slice / discard_in_l2_slice): zero writes
                // set the zero flag everywhere, dropping the host cluster only when it
                // is compressed or unmapping is allowed; a discard makes allocated
                // clusters (and, over a backing file, every cluster) read as zeroes.
                let old_bitmap = m.l2_bitmap(g)?;
                let (new, new_bitmap) = if m.g.ext_l2 {
                    ext_clusters_rule(mode, e, old_bitmap, &cl, backing_visible)
                } else {
                    (std_clusters_rule(mode, e, &cl, backing_visible), old_bitmap)
                };
                if new == e && new_bitmap == old_bitmap {
                    continue;
                }
                if !prepared {
                    m.before_alloc()?;
                    prepared = true;
                }
                let s = m.l2_for_write(l1i)?;
                let w = m.g.l2_word((g & mask) as usize);
                set(&mut m.l2.slot_mut(s).data, w, new);
                if m.g.ext_l2 {
                    set(&mut m.l2.slot_mut(s).data, w + 1, new_bitmap);
                }
                m.l2_dirty(s);
                let kept = new & OFFSET_MASK;
                if m.ext_data {
                    // (Offset 0 with COPIED is data file offset 0, see `decode`.)
                    let keeps_host = kept != 0 || new & super::COPIED != 0;
                    // Data file clusters have no refcounts: what the entry gives up is
                    // released in the data file itself (QEMU: discarded; zeroed when
                    // the data file is raw, which must keep reading as the guest does).
                    if let Some(h) = cl.host() {
                        let len = self.g.cs.min(self.size().saturating_sub(g * self.g.cs));
                        if !keeps_host {
                            data_ops.push((h.get(), len, true));
                        } else if m.data_raw {
                            data_ops.push((h.get(), len, false));
                        }
                    }
                } else if cl.host().is_none_or(|h| h.get() != kept) {
                    m.free_entry(&cl);
                }
            }
            // Under the lock, so that no write can allocate these guest clusters again
            // (at the same data file offsets) before they are released. Releasing them
            // before the new entries are durable is harmless: the guest asked for
            // zeroes (or no data) there.
            for (h, len, unmap) in data_ops.drain(..) {
                if len == 0 {
                    continue;
                }
                let r = if unmap {
                    m.data.punch_hole(h, len)
                } else {
                    m.data.write_zeroes(h, len)
                };
                match r {
                    Ok(()) => m.unflushed = true,
                    // Best effort, like a discard, unless the raw file must read zeroes.
                    Err(e) if !m.data_raw => tracing::debug!("qcow2: releasing data: {e}"),
                    Err(e) => return Err(e.into()),
                }
            }
            m.maybe_writeback()?;
            drop(m);
            gc = table_end;
        }
        Ok(true)
    }
}

/// QEMU's rules for one standard entry (`zero_in_l2_slice` / `discard_in_l2_slice`):
/// zero writes set the zero flag everywhere, dropping the host cluster only when it is
/// compressed or unmapping is allowed; a discard makes allocated clusters (and, over a
/// backing file, every cluster) read as zeroes.
fn std_clusters_rule(mode: Mode, e: u64, cl: &L2Entry, backing_visible: bool) -> u64 {
    let allocated = cl.is_allocated();
    let standard_host = cl.host().is_some();
    match mode {
        Mode::Dealloc => 0,
        Mode::Discard if backing_visible || allocated => ZERO,
        Mode::Discard => e,
        Mode::ZeroKeep if standard_host => e | ZERO,
        Mode::ZeroKeep | Mode::ZeroUnmap if cl.is_zero() && !standard_host => e,
        _ => ZERO,
    }
}

/// The same rules for an extended entry (word, bitmap): a zeroed cluster gets an
/// all-zero bitmap and keeps its host cluster unless it is compressed or unmapping is
/// allowed; a discarded one loses its host cluster and reads as zeroes.
fn ext_clusters_rule(
    mode: Mode,
    e: u64,
    bitmap: u64,
    cl: &L2Entry,
    backing_visible: bool,
) -> (u64, u64) {
    let all_zero = Subclusters::ZERO.bitmap();
    let allocated = cl.is_allocated();
    let compressed = matches!(cl, L2Entry::Compressed { .. });
    match mode {
        Mode::Dealloc => (0, 0),
        Mode::Discard if backing_visible || allocated => (0, all_zero),
        Mode::Discard => (e, bitmap),
        Mode::ZeroUnmap if allocated => (0, all_zero),
        Mode::ZeroKeep if compressed => (0, all_zero),
        Mode::ZeroKeep | Mode::ZeroUnmap => (e, all_zero),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Entries cleared (reads fall through to the backing file).
    Dealloc,
    /// v3 discard: reads as zeroes afterwards, host clusters released.
    Discard,
    /// Zero flag, host clusters released.
    ZeroUnmap,
    /// Zero flag, host clusters (other than compressed ones) kept.
    ZeroKeep,
}
