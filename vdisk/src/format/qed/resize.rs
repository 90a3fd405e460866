//! Guest size changes and backing file changes (`resize`, `rebase -u`).

use super::header::{self, cluster_offset_valid, table_offset_valid, F_BACKING_FORMAT_NO_PROBE};
use super::need_check;
use super::table::{self, UNALLOCATED, ZERO_CLUSTER};
use super::Inner;
use crate::error::{Invalid, Result};
use crate::format::{BackingSpec, Format};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn write_size(inner: &Inner, new_size: u64) -> Result<()> {
    let mut d = inner.dirty_lock();
    let mut h = d.header.clone();
    h.image_size = new_size;
    inner.write_header(&h)?;
    inner.storage.flush()?;
    d.header = h;
    inner.image_size.store(new_size, Ordering::Release);
    Ok(())
}

/// Grows, or (with `shrink`) shrinks, the guest size.
pub(crate) fn resize(inner: &Arc<Inner>, new_size: u64, shrink: bool) -> Result<()> {
    inner.writable()?;
    let h = inner.header();
    let cs = inner.cluster_size;
    if !header::image_size_valid(new_size, cs, h.table_size as u64) {
        return Err(Invalid::ResizeSize {
            size: new_size,
            max: header::max_image_size(cs, h.table_size as u64),
        }
        .into());
    }
    let _q = inner.quiesce_exclusive();
    let cur = inner.image_size();
    if new_size == cur {
        return Ok(());
    }
    if new_size > cur {
        return write_size(inner, new_size);
    }
    if !shrink {
        return Err(Invalid::ShrinkNeedsFlag.into());
    }
    let _g = need_check::begin(inner)?;
    // The guest loses access first; a crash after this leaves at worst leaks, which the
    // check that NEED_CHECK forces will reclaim.
    write_size(inner, new_size)?;
    release_past(inner, new_size, cur)
}

/// Releases the clusters of `[new_size, old_size)`: the tail of a kept partial cluster
/// is zeroed, entries (and whole L2 tables) past the end are cleared, then the clusters
/// they named are reclaimed by compacting the file, so nothing leaks.
fn release_past(inner: &Arc<Inner>, new_size: u64, old_size: u64) -> Result<()> {
    let cs = inner.cluster_size;
    let h = inner.header();
    let file_size = inner.file_size();
    let first_gone = new_size.div_ceil(cs);
    let last = old_size.div_ceil(cs);
    // Tail of the partial cluster that stays: later growth must read zeroes there.
    if !new_size.is_multiple_of(cs) {
        let (l1i, l2i) = (
            (new_size / cs) / inner.nelems,
            (new_size / cs) % inner.nelems,
        );
        if let Some(off) = inner.l2_table(l1i)? {
            let v = inner.l2_entry(off, l2i)?;
            if v != UNALLOCATED && v != ZERO_CLUSTER && cluster_offset_valid(&h, v, file_size) {
                let within = new_size % cs;
                inner.storage.write_zeroes(v + within, cs - within)?;
            }
        }
    }
    // Only the tables covering the released range are visited, a page at a time.
    let pe = inner.page_entries;
    let first_table = first_gone / inner.nelems;
    let end_table = last.div_ceil(inner.nelems).min(inner.nelems);
    for l1i in first_table..end_table {
        let off = inner.l1_entry(l1i)?;
        if off == UNALLOCATED || !table_offset_valid(&h, off, file_size) {
            continue;
        }
        let first = l1i * inner.nelems;
        if first >= first_gone {
            // The whole table lies past the new end.
            inner.l1_set(l1i, UNALLOCATED)?;
            continue;
        }
        let mut idx = first_gone - first;
        while idx < inner.nelems {
            if idx.is_multiple_of(pe) {
                // Pages that are holes in the file hold no entries to clear.
                let at = inner.page_of(off, idx).0;
                let skip =
                    table::hole_pages(&*inner.storage, at, pe * 8, (inner.nelems - idx) / pe);
                if skip > 0 {
                    idx += skip * pe;
                    continue;
                }
            }
            let (page, i) = inner.l2_page(off, idx)?;
            let (page_off, _) = inner.page_of(off, idx);
            let mut g = page.write().unwrap_or_else(|p| p.into_inner());
            if g[i..].iter().any(|v| *v != UNALLOCATED) {
                g[i..].fill(UNALLOCATED);
                inner.l2.modified();
                let n = g.len() - i;
                table::write_entries(&*inner.storage, page_off, &g, i, n)?;
            }
            idx += pe - idx % pe;
        }
    }
    // The cleared entries must be durable before their clusters are reused.
    inner.storage.flush()?;
    inner.forget_tables();
    super::check::compact_locked(inner)?;
    inner.storage.flush()?;
    Ok(())
}

/// Rewrites the backing file name (and raw-format flag) in the header.
pub(crate) fn set_backing_spec(inner: &Arc<Inner>, spec: Option<&BackingSpec>) -> Result<()> {
    inner.writable()?;
    let _q = inner.quiesce_exclusive();
    let mut d = inner.dirty_lock();
    let mut h = d.header.clone();
    let mut bytes = header::header_with_name(&mut h, spec.map(|s| s.name.as_str()))?;
    if spec.is_some_and(|s| s.format == Some(Format::Raw)) {
        h.features |= F_BACKING_FORMAT_NO_PROBE;
    }
    bytes[..header::HEADER_LEN].copy_from_slice(&h.to_bytes());
    // One write: fixed fields and name together.
    inner.storage.write_at(&bytes, 0)?;
    inner.storage.flush()?;
    d.header = h;
    // QED records only "raw" (no probing) or nothing (probe).
    d.backing = spec.map(|s| BackingSpec {
        name: s.name.clone(),
        format: s.format.filter(|f| *f == Format::Raw),
    });
    Ok(())
}
