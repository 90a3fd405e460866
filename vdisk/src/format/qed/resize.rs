//! Guest size changes and backing file changes (`resize`, `rebase -u`).

use super::header::{self, cluster_offset_valid, table_offset_valid, F_BACKING_FORMAT_NO_PROBE};
use super::need_check;
use super::table::{self, UNALLOCATED, ZERO_CLUSTER};
use super::Inner;
use crate::error::{Error, Result};
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
        return Err(Error::invalid(format!(
            "Invalid image size specified: {new_size} (must be a multiple of 512 and at most {} \
             bytes for this cluster and table size)",
            header::max_image_size(cs, h.table_size as u64)
        )));
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
        return Err(Error::invalid(
            "Use the --shrink option to perform a shrink operation.",
        ));
    }
    let _g = need_check::begin(inner)?;
    // The guest loses access first; a crash after this leaves at worst leaks, which the
    // check that NEED_CHECK forces will reclaim.
    write_size(inner, new_size)?;
    release_past(inner, new_size, cur)
}

/// Releases the clusters of `[new_size, old_size)`: the tail of a kept partial cluster
/// is zeroed, released clusters at the end of the file are unmapped and truncated away,
/// the others keep their mapping with their host space punched (no leaks either way).
fn release_past(inner: &Arc<Inner>, new_size: u64, old_size: u64) -> Result<()> {
    let cs = inner.cluster_size;
    let h = inner.header();
    let file_size = inner.file_size();
    let first_gone = new_size.div_ceil(cs);
    let last = old_size.div_ceil(cs);
    // Tail of the partial cluster that stays: later growth must read zeroes there.
    if new_size % cs != 0 {
        let (l1i, l2i) = (
            (new_size / cs) / inner.nelems,
            (new_size / cs) % inner.nelems,
        );
        if let Some((_, t)) = inner.l2_table(l1i)? {
            let v = t.read().unwrap_or_else(|p| p.into_inner())[l2i as usize];
            if v != UNALLOCATED && v != ZERO_CLUSTER && cluster_offset_valid(&h, v, file_size) {
                let within = new_size % cs;
                inner.storage.write_zeroes(v + within, cs - within)?;
            }
        }
    }
    // Which clusters stay referenced (tables, and data below the new end)?
    let ncl = file_size / cs;
    let mut used = vec![false; ncl as usize];
    let mark = |used: &mut Vec<bool>, off: u64, n: u64| {
        for c in off / cs..off / cs + n {
            if let Some(u) = used.get_mut(c as usize) {
                *u = true;
            }
        }
    };
    for c in 0..h.header_size as u64 {
        mark(&mut used, c * cs, 1);
    }
    mark(&mut used, h.l1_table_offset, inner.table_clusters);
    let l1 = inner.l1_read().clone();
    let mut released: Vec<(u64, u64, u64)> = Vec::new(); // (l1i, l2i, host)
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    for (l1i, &off) in l1.iter().enumerate() {
        let l1i = l1i as u64;
        if off == UNALLOCATED || !table_offset_valid(&h, off, file_size) {
            continue;
        }
        mark(&mut used, off, inner.table_clusters);
        let Some((_, t)) = inner.l2_table(l1i)? else {
            continue;
        };
        let t = t.read().unwrap_or_else(|p| p.into_inner());
        for (l2i, &v) in t.iter().enumerate() {
            let guest_cluster = l1i * inner.nelems + l2i as u64;
            let gone = guest_cluster >= first_gone && guest_cluster < last.max(first_gone);
            if v == UNALLOCATED {
                continue;
            }
            if v == ZERO_CLUSTER {
                if gone {
                    zeros.push((l1i, l2i as u64));
                }
                continue;
            }
            if !cluster_offset_valid(&h, v, file_size) {
                continue;
            }
            if gone {
                released.push((l1i, l2i as u64, v));
            } else {
                mark(&mut used, v, 1);
            }
        }
    }
    let keep_end = used.iter().rposition(|u| *u).map_or(0, |i| i as u64 + 1) * cs;
    // Unmap what will be truncated away and zero entries past the end; punch the rest.
    let mut edits: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for &(l1i, l2i) in &zeros {
        edits.entry(l1i).or_default().push(l2i);
    }
    for &(l1i, l2i, host) in &released {
        if host >= keep_end {
            edits.entry(l1i).or_default().push(l2i);
        } else {
            inner.storage.punch_hole(host, cs)?;
        }
    }
    for (l1i, idx) in edits {
        if let Some((off, t)) = inner.l2_table(l1i)? {
            let mut g = t.write().unwrap_or_else(|p| p.into_inner());
            for &i in &idx {
                g[i as usize] = UNALLOCATED;
            }
            inner.l2.modified();
            inner.storage.write_at(&table::encode(&g), off)?;
        }
    }
    if keep_end < file_size || inner.storage.len()? > file_size {
        // Entries naming the clusters must be gone on disk before the clusters are.
        inner.storage.flush()?;
        inner.storage.set_len(keep_end.min(file_size))?;
        inner
            .file_size
            .store(keep_end.min(file_size), Ordering::Release);
    }
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
