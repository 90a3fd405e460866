//! Zero writes and discard.
//!
//! Concurrency: whole clusters already allocated are zeroed (or punched) in place with
//! no lock; zero entries are written under the L2 table's [`TableSync`] mutex after
//! waiting for any allocation in flight over the same clusters (a zero entry written
//! under it would be overwritten by its commit), re-mapping under that lock.
//! Crash rules: no cluster is ever released (QED has no refcounts: a released cluster
//! would be a leak or, if reused, a double reference); NEED_CHECK is durable before a
//! zero entry is written.
//!
//! [`TableSync`]: super::write::TableSync

use super::map::entry_of;
use super::need_check;
use super::paging::Update;
use super::table::{Entry, ZERO_CLUSTER};
use super::write::{set_entries, write_locked, FILL_CHUNK};
use super::Inner;
use crate::error::{Result, Unsupported, ZeroLimit};
use crate::format::{check_range, ZeroFlags};
use std::io::IoSlice;
use std::sync::Arc;

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
                return Err(Unsupported::ZeroesNeedData(ZeroLimit::QedPartialCluster).into());
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
                write_locked(inner, &[IoSlice::new(&zeroes[..n as usize])], g)?;
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
        let run = inner.map_range(guest + pos, len - pos)?;
        let zero = match entry_of(&run)? {
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
        let run = inner.map_range(g, end - g)?;
        let n = run.len.div_ceil(cs) * cs;
        match entry_of(&run)? {
            Entry::Data(host) => zero_host(inner, host, n, flags)?,
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
    let mut st = sync.lock();
    // A zero entry written under an allocation in flight would be overwritten by it.
    while st.inflight.overlaps(start / cs, end.div_ceil(cs)) {
        st = sync.wait(st);
    }
    // Under the table lock: clusters allocated meanwhile are zeroed in place, the rest
    // become zero entries.
    let mut g = start;
    let mut to_mark: Vec<(u64, u64)> = Vec::new();
    while g < end {
        let run = inner.map_range(g, end - g)?;
        match entry_of(&run)? {
            Entry::Data(host) => {
                // Allocated since the first pass (already zeroed ones are harmless to redo).
                zero_host(inner, host, run.len, flags)?
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
        inner.data.punch_hole(host, len)?;
    } else {
        inner.data.write_zeroes(host, len)?;
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
        let run = inner.map_range(g, end - g)?;
        if let Entry::Data(host) = entry_of(&run)? {
            let n = run.len.div_ceil(cs) * cs;
            inner.guard_data_write(host, n)?;
            inner.data.punch_hole(host, n)?;
        }
        g += run.len;
    }
    Ok(())
}
