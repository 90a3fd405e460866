//! Consistency check and repair (`qemu-img check`), and the refcount rebuild used for
//! dirty images (lazy refcounts) and `check -r all`.
//!
//! References are counted in memory, one counter per cluster of the file (bounded by
//! the file size), exactly as QEMU does: header, active L1 and its L2 tables and data
//! (with fragmentation statistics), snapshot L1 tables and their L2 tables, the snapshot
//! table, the refcount table and the refcount blocks.

use super::header::{EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::tables::entry;
use super::{
    Meta, COMPRESSED, COPIED, L1E_RESERVED, L2E_STD_RESERVED, OFFSET_MASK, REFT_OFFSET_MASK,
};
use crate::error::{Corruption, NoSpace, Problem, Result, Structure, Unsupported};
use crate::format::qcow2::refcount::set_entry;
use crate::format::{CheckAborted, CheckReport, Finding, FindingKind as K, Repair};

/// Most clusters a check handles (the in-memory array is 4 bytes per cluster, so at
/// most 1 GiB; that is a 16 TiB file with 64 KiB clusters).
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

struct Counter {
    refs: Vec<u32>,
    cs: u64,
}

impl Counter {
    /// Counts one reference to `[off, off + size)`, a region of `what`.
    fn inc(&mut self, rep: &mut CheckReport, what: Structure, off: u64, size: u64) {
        if size == 0 {
            return;
        }
        // A hostile size (a bitmap table's, say) may run past the end of the
        // offset space: that is a reference past the end of the file too.
        let Some(end) = off.checked_add(size - 1) else {
            rep.push(Finding::new(K::ReferencePastEnd, what).at(off).length(size));
            rep.corruptions += 1;
            return;
        };
        let first = off / self.cs;
        let last = end / self.cs;
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    rep.push(Finding::new(K::ReferencePastEnd, what).at(off).length(size));
                    rep.corruptions += 1;
                    return;
                }
            }
        }
    }
}

fn read_table(m: &Meta, off: u64, entries: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; (entries * 8) as usize];
    m.st.read_at(&mut raw, off)?;
    Ok((0..entries as usize).map(|i| entry(&raw, i)).collect())
}

/// Entries to rewrite without their reserved bits: (file offset of the entry, value).
type ReservedFixes = Vec<(u64, u64)>;

/// Reports an L1/L2 entry with reserved bits set, or queues its repair (the reserved
/// bits cleared, the mapping kept) when `fixes` is given. `f` names the entry.
fn reserved(
    rep: &mut CheckReport,
    fixes: Option<&mut ReservedFixes>,
    f: Finding,
    at: u64,
    e: u64,
    mask: u64,
) {
    rep.push(f.value(e).repairing(fixes.is_some()));
    match fixes {
        Some(f) => {
            rep.corruptions_fixed += 1;
            f.push((at, e & !mask));
        }
        None => rep.corruptions += 1,
    }
}

/// Counts the references of one L1 table and everything below it. With `fixes`,
/// entries with reserved bits set are queued for repair instead of reported.
#[allow(clippy::too_many_arguments)]
fn count_l1(
    m: &Meta,
    cnt: &mut Counter,
    rep: &mut CheckReport,
    l1: &[u64],
    l1_off: u64,
    active: bool,
    mut fixes: Option<&mut ReservedFixes>,
) -> Result<()> {
    let cs = m.g.cs;
    let l1_kind = if active {
        Structure::L1Table
    } else {
        Structure::SnapshotL1Table
    };
    cnt.inc(rep, l1_kind, l1_off, l1.len() as u64 * 8);
    let shift = m.g.csize_shift();
    for (i, &l1e) in l1.iter().enumerate() {
        let i = i as u64;
        if l1e & L1E_RESERVED != 0 {
            let at = l1_off + i * 8;
            let f = Finding::new(K::ReservedBits, l1_kind).entry(i).at(at);
            reserved(rep, fixes.as_deref_mut(), f, at, l1e, L1E_RESERVED);
        }
        let l2off = l1e & OFFSET_MASK;
        if l2off == 0 {
            continue;
        }
        cnt.inc(rep, Structure::L2Table, l2off, cs);
        if !l2off.is_multiple_of(cs) {
            rep.push(
                Finding::new(K::Unaligned, Structure::L2Table)
                    .entry(i)
                    .value(l1e)
                    .at(l2off),
            );
            rep.corruptions += 1;
            continue;
        }
        let l2 = read_table(m, l2off, cs / 8)?;
        let mut next_contiguous = 0u64;
        for j in 0..m.g.l2_entries as usize {
            let e = l2[m.g.l2_word(j)];
            let guest = (i * m.g.l2_entries + j as u64) * cs;
            let at = l2off + m.g.l2_word(j) as u64 * 8;
            if e & COMPRESSED != 0 {
                if e & COPIED != 0 {
                    rep.push(
                        Finding::new(K::CompressedCopied, Structure::CompressedCluster)
                            .entry(j as u64)
                            .value(e)
                            .guest(guest)
                            .cluster((e & !COPIED) >> m.g.cluster_bits),
                    );
                    rep.corruptions += 1;
                }
                if m.g.ext_l2 && l2[m.g.l2_word(j) + 1] != 0 {
                    // As qemu-img: reported, and its data not counted (a leak).
                    rep.push(
                        Finding::new(K::SubclusterBitmap, Structure::CompressedCluster)
                            .entry(j as u64)
                            .value(e & !COPIED)
                            .guest(guest),
                    );
                    rep.corruptions += 1;
                    continue;
                }
                let e = e & !COPIED;
                let nsec = ((e >> shift) & ((1u64 << (62 - shift)) - 1)) + 1;
                let coff = e & ((1u64 << shift) - 1);
                cnt.inc(rep, Structure::CompressedCluster, coff & !511, nsec * 512);
                if active {
                    rep.allocated_clusters = Some(rep.allocated_clusters.unwrap_or(0) + 1);
                    rep.compressed_clusters = Some(rep.compressed_clusters.unwrap_or(0) + 1);
                    rep.fragmented_clusters = Some(rep.fragmented_clusters.unwrap_or(0) + 1);
                }
                continue;
            }
            if e & L2E_STD_RESERVED != 0 {
                let f = Finding::new(K::ReservedBits, Structure::L2Table)
                    .entry(j as u64)
                    .at(at)
                    .guest(guest);
                reserved(rep, fixes.as_deref_mut(), f, at, e, L2E_STD_RESERVED);
            }
            let off = e & OFFSET_MASK;
            let bitmap = if m.g.ext_l2 {
                l2[m.g.l2_word(j) + 1]
            } else {
                0
            };
            // With an external data file, offset 0 with COPIED (and no zero flag) is
            // guest cluster 0's data at data file offset 0.
            let at_zero = m.ext_data && e & COPIED != 0 && e & super::ZERO == 0;
            if off == 0 && !at_zero {
                if bitmap & 0xffff_ffff != 0 {
                    rep.push(
                        Finding::new(K::SubclusterBitmap, Structure::L2Table)
                            .entry(j as u64)
                            .value(e)
                            .guest(guest),
                    );
                    rep.corruptions += 1;
                }
                continue;
            }
            if (bitmap >> 32) & bitmap != 0 {
                rep.push(
                    Finding::new(K::SubclusterBitmap, Structure::DataCluster)
                        .entry(j as u64)
                        .value(e)
                        .at(off)
                        .guest(guest),
                );
                rep.corruptions += 1;
            }
            if active {
                rep.allocated_clusters = Some(rep.allocated_clusters.unwrap_or(0) + 1);
                if next_contiguous != 0 && off != next_contiguous {
                    rep.fragmented_clusters = Some(rep.fragmented_clusters.unwrap_or(0) + 1);
                }
                next_contiguous = off + cs;
            }
            if m.ext_data {
                // Clusters of an external data file are not refcounted (the spec).
                continue;
            }
            cnt.inc(rep, Structure::DataCluster, off, cs);
            if !off.is_multiple_of(cs) {
                rep.push(
                    Finding::new(K::Unaligned, Structure::DataCluster)
                        .entry(j as u64)
                        .value(e)
                        .at(off)
                        .guest(guest),
                );
                rep.corruptions += 1;
            }
        }
    }
    Ok(())
}

/// Counts the clusters of persistent dirty bitmaps (directory, bitmap tables, bitmap
/// data), so a leak repair never frees them. Bounded by the extension's sizes.
fn count_bitmaps(m: &Meta, cnt: &mut Counter, rep: &mut CheckReport) -> Result<()> {
    // Without the autoclear bit the bitmaps are stale and QEMU ignores them (their
    // clusters are leaks), exactly like a program without bitmap support left them.
    if m.hdr.autoclear & 1 == 0 {
        return Ok(());
    }
    let Some((_, ext)) = m.hdr.other_exts.iter().find(|(t, _)| *t == EXT_BITMAPS) else {
        return Ok(());
    };
    if ext.len() < 24 {
        rep.push(
            Finding::new(K::BitmapExtensionTooShort, Structure::BitmapExtension)
                .length(ext.len() as u64),
        );
        rep.corruptions += 1;
        return Ok(());
    }
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let be64 = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_be_bytes(a)
    };
    let nb = be32(ext, 0);
    let dir_size = be64(ext, 8);
    let dir_off = be64(ext, 16);
    // QEMU's limits: 65535 bitmaps, a directory of at most 64 MiB.
    if nb == 0 || nb > 65535 || !(24..=(64 << 20)).contains(&dir_size) {
        rep.push(
            Finding::new(
                K::BitmapExtensionInvalid { bitmaps: nb },
                Structure::BitmapExtension,
            )
            .at(dir_off)
            .length(dir_size),
        );
        rep.corruptions += 1;
        return Ok(());
    }
    cnt.inc(rep, Structure::BitmapDirectory, dir_off, dir_size);
    let mut dir = vec![0u8; dir_size as usize];
    m.st.read_at(&mut dir, dir_off)?;
    let mut pos = 0usize;
    for i in 0..nb {
        if pos + 24 > dir.len() {
            rep.push(
                Finding::new(K::BitmapEntryPastDirectory, Structure::BitmapDirectory)
                    .entry(i.into())
                    .at(dir_off + pos as u64),
            );
            rep.corruptions += 1;
            break;
        }
        let table_off = be64(&dir, pos);
        let table_size = u64::from(be32(&dir, pos + 8));
        let name_size = u64::from(u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]));
        let extra = u64::from(be32(&dir, pos + 20));
        if table_size * 8 > (64 << 20) {
            rep.push(
                Finding::new(K::BitmapTableTooLarge, Structure::BitmapTable)
                    .entry(i.into())
                    .at(table_off)
                    .length(table_size),
            );
            rep.corruptions += 1;
        } else if table_size > 0 {
            cnt.inc(rep, Structure::BitmapTable, table_off, table_size * 8);
            let t = read_table(m, table_off, table_size)?;
            for e in t {
                let off = e & 0x00ff_ffff_ffff_fe00;
                if off != 0 {
                    cnt.inc(rep, Structure::BitmapTable, off, m.g.cs);
                }
            }
        }
        pos = (pos as u64 + 24 + extra + name_size).div_ceil(8) as usize * 8;
    }
    Ok(())
}

/// Counts every reference in the image. Returns the counters and whether the
/// refcount structure itself is broken (needs a rebuild). With `fix`, active L1/L2
/// entries with reserved bits set get those bits cleared.
fn calculate(m: &mut Meta, rep: &mut CheckReport, nb: u64, fix: bool) -> Result<(Counter, bool)> {
    let cs = m.g.cs;
    let mut cnt = Counter {
        refs: vec![0u32; nb as usize],
        cs,
    };
    let mut rebuild = false;
    cnt.inc(rep, Structure::Qcow2Header, 0, cs);
    let l1 = m.l1.clone();
    let mut fixes = ReservedFixes::new();
    let l1_off = m.hdr.l1_table_offset;
    count_l1(
        m,
        &mut cnt,
        rep,
        &l1,
        l1_off,
        true,
        fix.then_some(&mut fixes),
    )?;
    for sn in m.snapshots.clone() {
        let t = read_table(m, sn.l1_offset, u64::from(sn.l1_size))?;
        count_l1(m, &mut cnt, rep, &t, sn.l1_offset, false, None)?;
    }
    if !fixes.is_empty() {
        for &(at, v) in &fixes {
            m.st.write_at(&v.to_be_bytes(), at)?;
            if at >= l1_off && at < l1_off + l1.len() as u64 * 8 {
                m.l1[((at - l1_off) / 8) as usize] = v;
            } else {
                m.l2.forget(at & !(cs - 1));
            }
        }
        m.st.flush()?;
    }
    if m.hdr.nb_snapshots > 0 {
        let len = super::snapshot::table_len(&*m.st, &m.hdr)?;
        cnt.inc(rep, Structure::SnapshotTable, m.hdr.snapshots_offset, len);
    }
    count_bitmaps(m, &mut cnt, rep)?;
    if let Some((off, len)) = super::crypto::extent(&m.hdr)? {
        cnt.inc(rep, Structure::CryptoHeader, off, len);
    }
    if let Some(why) = &m.rc_broken {
        // Nothing to count: the structure must be rebuilt from the references. Reported
        // as QEMU does where it can be: no table at all adds no message of its own (the
        // refcount=0 errors say it), a table wholly past the end of the file is a
        // reference beyond the end of the file.
        let rt_off = m.hdr.refcount_table_offset;
        let clusters = u64::from(m.hdr.refcount_table_clusters);
        if clusters != 0 && rt_off != 0 && rt_off >= m.file_end {
            cnt.inc(rep, Structure::RefcountTable, rt_off, clusters * cs);
        } else if clusters != 0 {
            rep.push(
                Finding::new(
                    K::RefcountStructureUnusable(why.clone()),
                    Structure::RefcountTable,
                )
                .at(rt_off),
            );
            rep.corruptions += 1;
        }
        return Ok((cnt, true));
    }
    cnt.inc(
        rep,
        Structure::RefcountTable,
        m.hdr.refcount_table_offset,
        u64::from(m.hdr.refcount_table_clusters) * cs,
    );
    for (i, &e) in m.rc_table.iter().enumerate() {
        let i = i as u64;
        let off = e & REFT_OFFSET_MASK;
        let block = || {
            Finding::new(K::Unaligned, Structure::RefcountBlock)
                .entry(i)
                .value(e)
                .at(off)
        };
        if !e.is_multiple_of(cs) && off != 0 {
            rep.push(block());
            rep.corruptions += 1;
            rebuild = true;
            continue;
        }
        if off == 0 {
            continue;
        }
        let c = off / cs;
        if c >= nb {
            rep.push(Finding {
                kind: K::RefcountBlockOutsideImage,
                ..block()
            });
            rep.corruptions += 1;
            rebuild = true;
            continue;
        }
        cnt.inc(rep, Structure::RefcountBlock, off, cs);
        if cnt.refs[c as usize] != 1 {
            rep.push(
                Finding {
                    kind: K::RefcountBlockShared,
                    ..block()
                }
                .cluster(c)
                .counts(None, Some(u64::from(cnt.refs[c as usize]))),
            );
            rep.corruptions += 1;
            rebuild = true;
        }
    }
    Ok((cnt, rebuild))
}

/// On-disk refcount of `c`, or `None` when its block cannot be read.
fn disk_rc(m: &mut Meta, c: u64) -> Option<u64> {
    let bi = c >> m.g.rc_block_bits;
    let e = m.rc_table.get(bi as usize).copied().unwrap_or(0);
    let off = e & REFT_OFFSET_MASK;
    if off == 0 {
        return Some(0);
    }
    if !e.is_multiple_of(m.g.cs) || off >= m.file_end {
        return None;
    }
    m.rc_get(c).ok()
}

/// A refcount that disagrees with the references of host cluster `c`: a corruption
/// when too low, a leak when too high; `repairing` when this check fixes it.
fn mismatch(c: u64, cs: u64, refcount: u64, references: u64, repairing: bool) -> Finding {
    let kind = if refcount < references {
        K::RefcountTooLow
    } else {
        K::LeakedCluster
    };
    Finding::new(kind, Structure::HostCluster)
        .cluster(c)
        .at(c * cs)
        .counts(Some(refcount), Some(references))
        .repairing(repairing)
}

/// Runs the check (and repairs) on an image whose caches were written back.
pub(crate) fn check(m: &mut Meta, vsize: u64, repair: Repair) -> Result<CheckReport> {
    let cs = m.g.cs;
    let file_len = m.st.len()?;
    let nb = file_len.div_ceil(cs);
    m.file_end = m.file_end.max(file_len);
    if nb > MAX_CHECK_CLUSTERS {
        return Err(Unsupported::TooLargeToCheck {
            file_len,
            repair: false,
        }
        .into());
    }
    let mut rep = CheckReport {
        total_clusters: Some(vsize.div_ceil(cs)),
        allocated_clusters: Some(0),
        fragmented_clusters: Some(0),
        compressed_clusters: Some(0),
        ..CheckReport::default()
    };
    let (mut cnt, rebuild) = calculate(m, &mut rep, nb, repair.errors && !m.read_only)?;
    let mut rebuild = rebuild;
    let mut highest = 0u64;
    // First pass, as QEMU's: every mismatch is reported ("ERROR"/"Leaked"), nothing is
    // fixed yet; a repair then reports what it does in a second pass.
    let mut mismatches: Vec<(u64, u64, u64)> = Vec::new();
    for c in 0..nb {
        let r2 = u64::from(cnt.refs[c as usize]);
        let Some(r1) = disk_rc(m, c) else {
            rep.push(
                Finding::new(K::RefcountUnreadable, Structure::HostCluster)
                    .cluster(c)
                    .at(c * cs),
            );
            rep.check_errors += 1;
            continue;
        };
        if r1 > 0 || r2 > 0 {
            highest = c;
        }
        if r1 != r2 {
            if r1 == 0 {
                rebuild = true;
            }
            rep.push(mismatch(c, cs, r1, r2, false));
            mismatches.push((c, r1, r2));
        }
    }
    let first_corruptions = mismatches.iter().filter(|(_, a, b)| a < b).count() as u64;
    let first_leaks = mismatches.iter().filter(|(_, a, b)| a > b).count() as u64;
    let writable = !m.read_only;
    if rebuild && repair.errors && writable {
        rep.push(Finding::new(K::RefcountRebuild, Structure::RefcountTable).repairing(true));
        let old_corruptions = rep.corruptions + first_corruptions;
        let released = rebuild_from(m, &mut cnt)?;
        // QEMU's new structure still counts the old one, which it then finds leaked
        // and repairs: report those clusters the same way (not counted as fixed).
        let mut released = released;
        released.sort_unstable_by_key(|&(c, _)| c);
        let mut i = 0;
        while i < released.len() {
            let (c, what) = released[i];
            let n = released[i..].iter().take_while(|&&(x, _)| x == c).count();
            let after = cnt.refs.get(c as usize).map_or(0, |&r| u64::from(r));
            rep.push(Finding {
                structure: what,
                ..mismatch(c, cs, after + n as u64, after, true)
            });
            i += n;
        }
        rep.corruptions = 0;
        rep.leaks = 0;
        rep.corruptions_fixed += old_corruptions;
        rep.leaks_fixed += first_leaks;
        highest = cnt
            .refs
            .iter()
            .rposition(|&r| r > 0)
            .map_or(0, |p| p as u64);
    } else if rebuild && (repair.errors || repair.leaks) {
        // As QEMU: a repair that would need a rebuild it may not do fails the check
        // (EIO) at this point, before the COPIED flags are looked at.
        rep.push(Finding::new(K::RebuildNeeded, Structure::RefcountTable));
        rep.check_errors += 1;
        rep.corruptions += first_corruptions;
        rep.leaks += first_leaks;
        rep.aborted = Some(CheckAborted::RebuildNeeded);
        return Ok(rep);
    } else if writable && (repair.leaks || repair.errors) {
        for (c, r1, r2) in mismatches {
            let fix = (r1 > r2 && repair.leaks) || (r1 < r2 && repair.errors);
            rep.push(mismatch(c, cs, r1, r2, fix));
            if fix && m.rc_set(c, r2).is_ok() {
                if r1 > r2 {
                    rep.leaks_fixed += 1;
                } else {
                    rep.corruptions_fixed += 1;
                }
                continue;
            }
            if r1 < r2 {
                rep.corruptions += 1;
            } else {
                rep.leaks += 1;
            }
        }
        m.write_rc_blocks()?;
        m.st.flush()?;
    } else {
        rep.corruptions += first_corruptions;
        rep.leaks += first_leaks;
    }
    check_copied(m, &mut rep, repair.errors && writable)?;
    rep.image_end_offset = Some((highest + 1) * cs);
    // As QEMU: a repair that leaves no corruption marks the image clean (dirty bit) and
    // consistent (corrupt bit) again.
    if writable
        && (repair.leaks || repair.errors)
        && rep.corruptions == 0
        && rep.check_errors == 0
        && m.hdr.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0
    {
        m.hdr.incompatible &= !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        m.set_dirty = false;
        m.corrupt = false;
        m.write_header()?;
    }
    Ok(rep)
}

/// Checks (and fixes) the COPIED flags of the active tables against refcounts.
fn check_copied(m: &mut Meta, rep: &mut CheckReport, fix: bool) -> Result<()> {
    let cs = m.g.cs;
    let mut l1_changed = false;
    for i in 0..m.l1.len() {
        let l1e = m.l1[i];
        let l2off = l1e & OFFSET_MASK;
        if l2off == 0 {
            continue;
        }
        let Some(rc) = disk_rc(m, l2off / cs) else {
            continue;
        };
        if (rc == 1) != (l1e & COPIED != 0) {
            rep.push(
                Finding::new(K::CopiedFlag, Structure::L2Table)
                    .entry(i as u64)
                    .value(l1e)
                    .at(l2off)
                    .counts(Some(rc), None)
                    .repairing(fix),
            );
            if fix {
                m.l1[i] = if rc == 1 { l1e | COPIED } else { l1e & !COPIED };
                l1_changed = true;
                rep.corruptions_fixed += 1;
            } else {
                rep.corruptions += 1;
            }
        }
        if !l2off.is_multiple_of(cs) {
            continue;
        }
        let mut raw = vec![0u8; cs as usize];
        m.st.read_at(&mut raw, l2off)?;
        let mut dirty = false;
        for j in 0..m.g.l2_entries as usize {
            let w = m.g.l2_word(j);
            let e = entry(&raw, w);
            if e & COMPRESSED != 0 {
                continue;
            }
            let off = e & OFFSET_MASK;
            if off == 0 || m.ext_data {
                // (External data file clusters have no refcounts to compare with.)
                continue;
            }
            let Some(rc) = disk_rc(m, off / cs) else {
                continue;
            };
            if (rc == 1) != (e & COPIED != 0) {
                rep.push(
                    Finding::new(K::CopiedFlag, Structure::DataCluster)
                        .entry(j as u64)
                        .value(e)
                        .at(off)
                        .guest((i as u64 * m.g.l2_entries + j as u64) * cs)
                        .counts(Some(rc), None)
                        .repairing(fix),
                );
                if fix {
                    let ne = if rc == 1 { e | COPIED } else { e & !COPIED };
                    raw[w * 8..w * 8 + 8].copy_from_slice(&ne.to_be_bytes());
                    dirty = true;
                    rep.corruptions_fixed += 1;
                } else {
                    rep.corruptions += 1;
                }
            }
        }
        if dirty {
            m.l2.forget(l2off);
            m.st.write_at(&raw, l2off)?;
        }
    }
    if l1_changed {
        let mut raw = Vec::with_capacity(m.l1.len() * 8);
        for e in &m.l1 {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        m.st.write_at(&raw, m.hdr.l1_table_offset)?;
    }
    if fix {
        m.st.flush()?;
    }
    Ok(())
}

/// Rebuilds the refcount structure from the references (dirty image on open).
pub(crate) fn rebuild_refcounts(m: &mut Meta) -> Result<()> {
    let cs = m.g.cs;
    let file_len = m.st.len()?;
    let nb = file_len.div_ceil(cs);
    if nb > MAX_CHECK_CLUSTERS {
        return Err(Unsupported::TooLargeToCheck {
            file_len,
            repair: true,
        }
        .into());
    }
    let mut rep = CheckReport::default();
    let (mut cnt, _) = calculate(m, &mut rep, nb, false)?;
    if rep.corruptions > 0 {
        // Named after the first problem found; the rest need `check`.
        let first = rep.findings.first();
        return Err(Corruption {
            structure: first.map_or(Structure::Image, |f| f.structure),
            entry: first.and_then(|f| f.entry),
            offset: first.and_then(|f| f.host_offset),
            problem: Problem::DirtyTablesCorrupt {
                corruptions: rep.corruptions,
            },
        }
        .into());
    }
    rebuild_from(m, &mut cnt).map(|_| ())
}

/// Writes a brand-new refcount structure (blocks + table, self-describing, placed
/// after the end of the file) from the counted references, then switches the header
/// to it. The old structure is not referenced anymore and becomes free space; its
/// clusters are returned (once per reference dropped, with the structure they held).
fn rebuild_from(m: &mut Meta, cnt: &mut Counter) -> Result<Vec<(u64, Structure)>> {
    rebuild_into(m, cnt, None)
}

/// Rebuilds the refcount structure at a new width (`amend -o refcount_bits=N`): the
/// references are counted, a new structure of the new width is written after the end
/// of the file and flushed, then the whole header (table offset, table size and
/// refcount order, all in its first sector) is switched in one write. Refused, with
/// nothing changed, when a cluster's refcount does not fit the new width.
pub(crate) fn change_refcount_order(m: &mut Meta, order: u32) -> Result<()> {
    let cs = m.g.cs;
    let file_len = m.st.len()?;
    let nb = file_len.div_ceil(cs);
    if nb > MAX_CHECK_CLUSTERS {
        return Err(Unsupported::TooLargeToCheck {
            file_len,
            repair: true,
        }
        .into());
    }
    let mut rep = CheckReport::default();
    let (mut cnt, _) = calculate(m, &mut rep, nb, false)?;
    if rep.corruptions > 0 {
        let first = rep.findings.first();
        return Err(Corruption {
            structure: first.map_or(Structure::Image, |f| f.structure),
            entry: first.and_then(|f| f.entry),
            offset: first.and_then(|f| f.host_offset),
            problem: Problem::DirtyTablesCorrupt {
                corruptions: rep.corruptions,
            },
        }
        .into());
    }
    let new_g = super::Geom::new(m.g.cluster_bits, order, m.g.version, m.g.ext_l2);
    let max = new_g.rc_max();
    if let Some((c, &r)) = cnt
        .refs
        .iter()
        .enumerate()
        .find(|(_, &r)| u64::from(r) > max)
    {
        return Err(crate::error::Invalid::RefcountNarrowing {
            bits: 1 << order,
            offset: c as u64 * cs,
            refcount: r.into(),
        }
        .into());
    }
    let old_g = m.g;
    m.g = new_g;
    let r = rebuild_into(m, &mut cnt, Some(order));
    if r.is_err() {
        m.g = old_g;
    }
    r.map(|_| ())
}

fn rebuild_into(
    m: &mut Meta,
    cnt: &mut Counter,
    new_order: Option<u32>,
) -> Result<Vec<(u64, Structure)>> {
    let cs = m.g.cs;
    let per = m.g.rc_per_block;
    let max = m.g.rc_max();
    let order = m.g.rc_order;
    // Forget the old structure's own clusters: the new one does not reference them.
    // (A broken table was never counted.)
    let rt_off = m.hdr.refcount_table_offset;
    let rt_clusters = if m.rc_broken.is_some() {
        0
    } else {
        u64::from(m.hdr.refcount_table_clusters)
    };
    let mut released = Vec::new();
    let mut release = |c: u64, what: Structure| {
        if let Some(r) = cnt.refs.get_mut(c as usize).filter(|r| **r > 0) {
            *r -= 1;
            released.push((c, what));
        }
    };
    for k in 0..rt_clusters {
        release(rt_off / cs + k, Structure::RefcountTable);
    }
    for &e in &m.rc_table {
        let off = e & REFT_OFFSET_MASK;
        if off != 0 && e.is_multiple_of(cs) {
            release(off / cs, Structure::RefcountBlock);
        }
    }
    let used_end = cnt
        .refs
        .iter()
        .rposition(|&r| r > 0)
        .map_or(1, |p| p as u64 + 1);
    let start = cnt.refs.len() as u64;
    // Fixpoint: blocks needed for [0, used_end) and for the new region itself.
    let mut nblocks = 0u64;
    let mut tclusters = 1u64;
    let (blocks, table_entries) = loop {
        let region_end = start + nblocks + tclusters;
        let mut bis: Vec<u64> = (0..used_end.div_ceil(per))
            .filter(|&bi| {
                let s = (bi * per) as usize;
                let e = (((bi + 1) * per) as usize).min(cnt.refs.len());
                s < e && cnt.refs[s..e].iter().any(|&r| r > 0)
            })
            .collect();
        for bi in start / per..=(region_end - 1) / per {
            if !bis.contains(&bi) {
                bis.push(bi);
            }
        }
        let last_bi = bis.iter().copied().max().unwrap_or(0);
        let entries = ((last_bi + 1) * 8).div_ceil(cs) * cs / 8;
        let tc = (entries * 8).div_ceil(cs);
        if bis.len() as u64 == nblocks && tc == tclusters {
            break (bis, entries);
        }
        nblocks = bis.len() as u64;
        tclusters = tc;
    };
    if table_entries * 8 > super::header::MAX_REFTABLE_BYTES {
        return Err(NoSpace::RebuiltRefcountTable(super::header::MAX_REFTABLE_BYTES).into());
    }
    let region_end = start + nblocks + tclusters;
    cnt.refs.resize(region_end as usize, 0);
    for c in start..region_end {
        cnt.refs[c as usize] = 1;
    }
    let mut table = vec![0u64; table_entries as usize];
    for (k, &bi) in blocks.iter().enumerate() {
        let off = (start + k as u64) * cs;
        table[bi as usize] = off;
        let mut data = vec![0u8; cs as usize];
        for i in 0..per {
            let c = bi * per + i;
            if let Some(&r) = cnt.refs.get(c as usize) {
                if r > 0 {
                    set_entry(&mut data, i as usize, order, u64::from(r).min(max));
                }
            }
        }
        m.st.write_at(&data, off)?;
    }
    let toff = (start + nblocks) * cs;
    let mut raw = Vec::with_capacity((tclusters * cs) as usize);
    for e in &table {
        raw.extend_from_slice(&e.to_be_bytes());
    }
    raw.resize((tclusters * cs) as usize, 0);
    m.st.write_at(&raw, toff)?;
    m.st.flush()?;
    if let Some(order) = new_order {
        // Offset, size and width change together: one write of the header.
        m.hdr.refcount_table_offset = toff;
        m.hdr.refcount_table_clusters = tclusters as u32;
        m.hdr.refcount_order = order;
        m.write_header()?;
    } else {
        let mut h = [0u8; 12];
        h[..8].copy_from_slice(&toff.to_be_bytes());
        h[8..].copy_from_slice(&(tclusters as u32).to_be_bytes());
        m.st.write_at(&h, 48)?;
        m.st.flush()?;
    }
    m.unflushed = false;
    m.hdr.refcount_table_offset = toff;
    m.hdr.refcount_table_clusters = tclusters as u32;
    m.rc_table = table;
    m.rc_broken = None;
    m.rc.clear();
    m.free_hint = 0;
    m.compress_cursor = 0;
    m.file_end = m.file_end.max(region_end * cs);
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_past_the_end_of_the_offset_space_are_found_not_wrapped() {
        let mut c = Counter {
            refs: vec![0; 4],
            cs: 512,
        };
        let mut rep = CheckReport::default();
        // Found by fuzzing (a bitmap table): offset + size overflows u64.
        c.inc(&mut rep, Structure::Qcow2Header, u64::MAX - 10, 100);
        assert_eq!(rep.corruptions, 1);
        assert_eq!(rep.findings[0].kind, K::ReferencePastEnd);
        // In range: counted, nothing reported.
        c.inc(&mut rep, Structure::Qcow2Header, 512, 1024);
        assert_eq!(c.refs, [0, 1, 1, 0]);
        assert_eq!(rep.corruptions, 1);
    }
}
