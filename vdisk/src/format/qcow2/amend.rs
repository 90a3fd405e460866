//! `amend`: changing the options of an existing image, in QEMU 10's order: the data
//! file's name and raw mode (checked first, written at once), upgrade
//! (compat=1.1) first, then the refcount width, the backing file check, lazy
//! refcounts, the size, and downgrade (compat=0.10) last.
//!
//! Crash rules: a width change builds the new refcount structure completely (and
//! flushes it) before one header write switches offset, size and width together; an
//! upgrade or downgrade is one header write after everything it depends on is durable
//! (a downgrade first turns every zero cluster of the active disk into something a v2
//! reader understands, through the normal allocation ordering). After a change of
//! version or width, the open image refuses further writes: it must be reopened.

use super::header::{
    Header, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, EXT_BITMAPS, INCOMPAT_COMPRESSION,
    INCOMPAT_DIRTY, V3_HEADER_LEN,
};
use super::snapshot::{self, encode_entry};
use super::{check, Meta, Qcow2, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::error::{Invalid, Result, Unsupported, V3Feature};
use crate::format::options::OptionValues;
use crate::format::Driver;

/// What an `amend` asks, read from its options.
struct Request {
    version: Option<u32>,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    lazy: Option<bool>,
    refcount_bits: Option<u64>,
    /// A new external data file name (`data_file`).
    data_file: Option<String>,
    /// `data_file_raw`.
    data_raw: Option<bool>,
    /// Key-slot options (`encrypt.state`, …) were given.
    encrypt: bool,
}

/// Reads the request; `crypt_method` is the image's (QEMU refuses encryption options
/// on an image without LUKS at the option's turn).
fn request(o: &OptionValues, crypt_method: u32) -> Result<Request> {
    let mut r = Request {
        version: None,
        size: None,
        backing_file: None,
        backing_fmt: None,
        lazy: None,
        refcount_bits: None,
        data_file: None,
        data_raw: None,
        encrypt: false,
    };
    for g in o.given() {
        match g.desc.name {
            "compat" => {
                r.version = Some(match g.raw.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    v => return Err(Invalid::UnknownCompat(v.to_string()).into()),
                })
            }
            "size" => r.size = o.size("size"),
            "backing_file" => r.backing_file = Some(g.raw.clone()),
            "backing_fmt" => r.backing_fmt = Some(g.raw.clone()),
            "lazy_refcounts" => r.lazy = o.bool("lazy_refcounts"),
            "refcount_bits" => {
                let n = o.number("refcount_bits").unwrap_or(0);
                if n == 0 || n > 64 || !n.is_power_of_two() {
                    return Err(Invalid::RefcountWidth.into());
                }
                r.refcount_bits = Some(n);
            }
            k if k.starts_with("encrypt.") => match crypt_method {
                super::crypto::CRYPT_NONE => return Err(Invalid::AmendEncryption.into()),
                super::crypto::CRYPT_LUKS => r.encrypt = true,
                _ => return Err(Invalid::AmendOnlyLuks.into()),
            },
            "data_file" => r.data_file = Some(g.raw.clone()),
            "data_file_raw" => r.data_raw = o.bool("data_file_raw"),
            k => return Err(Unsupported::CreateOption(k.to_string()).into()),
        }
    }
    Ok(r)
}

/// The operations of one `amend` that report progress, as QEMU's qcow2 driver counts
/// them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Upgrade,
    /// Key slots (reports no progress of its own, but counts as an operation).
    Encryption,
    RefcountOrder,
    Downgrade,
}

/// Folds the progress of each operation into one report over the whole amend, the
/// way QEMU's qcow2 driver does (so `amend -p` prints the same lines): the work of
/// the operations done so far, plus this one's, plus a projection for those still to
/// come (each assumed as long as the average so far).
struct Status<'a> {
    cb: &'a dyn Fn(u64, u64),
    total_ops: u64,
    current: Option<Op>,
    last: Option<Op>,
    ops_done: u64,
    offset_done: u64,
    last_work: u64,
}

impl<'a> Status<'a> {
    fn new(cb: &'a dyn Fn(u64, u64), total_ops: u64) -> Status<'a> {
        Status {
            cb,
            total_ops,
            current: None,
            last: None,
            ops_done: 0,
            offset_done: 0,
            last_work: 0,
        }
    }

    /// Operation `current` has done `off` of its `work` units.
    fn report(&mut self, off: u64, work: u64) {
        if self.current != self.last {
            if self.last.is_some() {
                self.offset_done = self.offset_done.saturating_add(self.last_work);
                self.ops_done += 1;
            }
            self.last = self.current;
        }
        // QEMU asserts these; an operation it does not count reports nothing here.
        if self.total_ops == 0 || self.ops_done >= self.total_ops {
            return;
        }
        self.last_work = work;
        let cur = self.offset_done.saturating_add(work);
        let projected =
            cur.saturating_mul(self.total_ops - self.ops_done - 1) / (self.ops_done + 1);
        (self.cb)(
            self.offset_done.saturating_add(off),
            cur.saturating_add(projected),
        );
    }

    /// QEMU's refcount-width change walks the old refcount table three times (two
    /// allocating walks and the writing one), reporting each entry of each walk;
    /// vdisk rebuilds from one count, so it reports walk `walk` of the three at once.
    fn reftable_walk(&mut self, walk: u64, entries: u64) {
        let total = 3 * entries;
        for i in 0..entries {
            self.report(walk * entries + i, total);
        }
        self.report((walk + 1) * entries, total);
    }
}

impl Meta {
    /// Marks a lazy-refcounts image clean: everything written back and durable, then
    /// the dirty bit cleared.
    fn mark_clean(&mut self) -> Result<()> {
        self.writeback()?;
        self.unflushed = true;
        self.barrier()?;
        if self.hdr.incompatible & INCOMPAT_DIRTY != 0 {
            self.hdr.incompatible &= !INCOMPAT_DIRTY;
            self.write_header()?;
        }
        self.set_dirty = false;
        Ok(())
    }

    /// compat=1.1: the v3 header fields, and snapshot entries given the extra data
    /// v3 requires (their disk size).
    fn upgrade(&mut self, size: u64, st: &mut Status) -> Result<()> {
        st.report(0, 2);
        let short: Vec<usize> = (0..self.snapshots.len())
            .filter(|&i| self.snapshots[i].disk_size.is_none())
            .collect();
        if !short.is_empty() {
            let mut snaps = self.snapshots.clone();
            for i in short {
                let s = &snaps[i];
                let h = &s.raw;
                let id_len = u16::from_be_bytes([h[12], h[13]]) as usize;
                let extra = u32::from_be_bytes([h[36], h[37], h[38], h[39]]) as usize;
                let id = &h[40 + extra..40 + extra + id_len];
                let name = &h[40 + extra + id_len..];
                let raw = encode_entry(s.l1_offset, s.l1_size, &s.info, id, name, size);
                if let Some(n) = snapshot::decode_entry(raw) {
                    snaps[i] = n;
                }
            }
            self.replace_snapshot_table(snaps)?;
        }
        st.report(1, 2);
        self.hdr.version = 3;
        self.hdr.header_length = V3_HEADER_LEN;
        self.hdr.tail = vec![0u8; (V3_HEADER_LEN - 105) as usize];
        self.hdr.compression_type = 0;
        if self.g.cs >= 16384 {
            self.hdr.features = Header::default_features();
        }
        self.g.version = 3;
        self.write_header()?;
        st.report(2, 2);
        Ok(())
    }

    /// compat=0.10: refused for what v2 cannot hold; zero clusters of the active disk
    /// become unallocated (no backing file) or allocated zeroes, then the v2 header.
    fn downgrade(&mut self, size: u64, st: &mut Status) -> Result<()> {
        if self.g.rc_order != 4 {
            return Err(Invalid::DowngradeRefcountWidth.into());
        }
        if self
            .snapshots
            .iter()
            .any(|s| s.info.vm_state_size > u64::from(u32::MAX) || s.disk_size != Some(size))
        {
            return Err(Invalid::DowngradeSnapshots.into());
        }
        self.mark_clean()?;
        if self.hdr.incompatible & INCOMPAT_COMPRESSION != 0 {
            // zstd can go only when no cluster is compressed with it.
            if self.any_compressed()? {
                return Err(Invalid::DowngradeZstd.into());
            }
            self.hdr.incompatible &= !INCOMPAT_COMPRESSION;
            self.hdr.compression_type = 0;
        }
        let incompat = self.hdr.incompatible & !INCOMPAT_DIRTY;
        if incompat != 0 {
            return Err(Invalid::DowngradeFeatures(incompat).into());
        }
        self.expand_zero_clusters(st)?;
        self.writeback()?;
        self.unflushed = true;
        self.barrier()?;
        self.hdr.version = 2;
        self.hdr.compatible = 0;
        self.hdr.autoclear = 0;
        self.hdr.incompatible = 0;
        self.hdr.features.clear();
        self.hdr.other_exts.retain(|(t, _)| *t != EXT_BITMAPS);
        self.g.version = 2;
        self.write_header()
    }

    /// Whether any L2 table (active or of a snapshot) has a compressed entry.
    fn any_compressed(&mut self) -> Result<bool> {
        let mut l1s = vec![self.l1.clone()];
        for sn in self.snapshots.clone() {
            let mut raw = vec![0u8; sn.l1_size as usize * 8];
            self.st.read_at(&mut raw, sn.l1_offset)?;
            l1s.push(
                (0..sn.l1_size as usize)
                    .map(|i| super::tables::entry(&raw, i))
                    .collect(),
            );
        }
        for l1 in l1s {
            for (i, e) in l1.iter().enumerate() {
                let off = e & OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                let s = self.l2_slot(off, i)?;
                let d = &self.l2.slot(s).data;
                if (0..self.g.l2_entries as usize)
                    .any(|j| super::tables::entry(d, j) & COMPRESSED != 0)
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Every zero-flagged entry of every L2 table (of the active disk and of the
    /// snapshots) becomes a v2 entry: nothing (no backing file), or a cluster holding
    /// zeroes: its own preallocated one, or a new one counted once per L1 table that
    /// reaches the L2 table (its refcount). Tables are changed in place (each entry
    /// reads zeroes before and after, so a torn write is harmless); data and refcounts
    /// are durable before any table write (the usual write-back barrier).
    ///
    /// Progress is QEMU's: one step per L1 entry visited (the active table's, then
    /// each snapshot's), an entry counting as visited once its L2 table is done.
    fn expand_zero_clusters(&mut self, st: &mut Status) -> Result<()> {
        let cs = self.cs();
        let zeroes = vec![0u8; cs as usize];
        // (L2 offset, L1 index, number of L1 entries visited once it is done).
        let mut tables: Vec<(u64, usize, u64)> = Vec::new();
        let mut l1s = vec![self.l1.clone()];
        for sn in self.snapshots.clone() {
            let mut raw = vec![0u8; sn.l1_size as usize * 8];
            self.st.read_at(&mut raw, sn.l1_offset)?;
            l1s.push(
                (0..sn.l1_size as usize)
                    .map(|i| super::tables::entry(&raw, i))
                    .collect(),
            );
        }
        let l1_entries: u64 = l1s.iter().map(|l| l.len() as u64).sum();
        let mut visited = 0u64;
        for l1 in &l1s {
            for (i, e) in l1.iter().enumerate() {
                visited += 1;
                let off = e & OFFSET_MASK;
                if off != 0 && !tables.iter().any(|t| t.0 == off) {
                    tables.push((off, i, visited));
                }
            }
        }
        let mut reported = 0u64;
        for (off, l1i, upto) in tables {
            // Entries before this table's (empty or already seen) are visited.
            while reported + 1 < upto {
                reported += 1;
                st.report(reported, l1_entries);
            }
            let l2_rc = self.rc_get(off / cs)?;
            let s = self.l2_slot(off, l1i)?;
            let zero: Vec<usize> = (0..self.g.l2_entries as usize)
                .filter(|&j| {
                    let e = super::tables::entry(&self.l2.slot(s).data, j);
                    e & COMPRESSED == 0 && e & ZERO != 0
                })
                .collect();
            for j in zero {
                let s = self.l2_slot(off, l1i)?;
                let e = super::tables::entry(&self.l2.slot(s).data, j);
                let host = e & OFFSET_MASK;
                // A preallocated zero cluster is zeroed in place only when every
                // reference to it comes through this table; one also referenced
                // elsewhere (a snapshot's copy of the table) keeps its data there.
                let own = host != 0 && self.rc_get(host / cs)? <= l2_rc;
                let new = if own {
                    self.data.write_at(&zeroes, host)?;
                    self.unflushed = true;
                    host | (e & COPIED)
                } else if host == 0 && !self.has_backing {
                    0
                } else {
                    for _ in 0..if host != 0 { l2_rc } else { 0 } {
                        self.defer_free(host);
                    }
                    let n = self.alloc(1)?;
                    if l2_rc > 1 {
                        self.rc_add(n / cs, l2_rc as i64 - 1)?;
                    }
                    self.data.write_at(&zeroes, n)?;
                    self.unflushed = true;
                    if l2_rc == 1 {
                        n | COPIED
                    } else {
                        n
                    }
                };
                // The cache slot may have moved while allocating.
                let s = self.l2_slot(off, l1i)?;
                super::tables::set(&mut self.l2.slot_mut(s).data, j, new);
                self.l2_dirty(s);
            }
            self.maybe_writeback()?;
            reported += 1;
            st.report(reported, l1_entries);
        }
        while reported < l1_entries {
            reported += 1;
            st.report(reported, l1_entries);
        }
        Ok(())
    }
}

impl Qcow2 {
    /// `amend -o …` on an open image (opened read-write).
    pub(crate) fn do_amend(
        &self,
        o: &OptionValues,
        force: bool,
        status: &dyn Fn(u64, u64),
    ) -> Result<()> {
        self.writable()?;
        let mut m = self.lock();
        let r = request(o, m.hdr.crypt_method)?;
        m.check_writable()?;
        while !m.inflight.is_empty() || !m.direct.is_empty() {
            m = self.wait_alloc_done(m);
        }
        let old_version = m.g.version;
        let new_version = r.version.unwrap_or(old_version);
        // QEMU counts the operations that report progress up front: a version change,
        // a width change and a key-slot update.
        let width_change = r.refcount_bits.is_some_and(|b| b != 1 << m.g.rc_order);
        let mut st = Status::new(
            status,
            u64::from(new_version != old_version) + u64::from(width_change) + u64::from(r.encrypt),
        );
        // QEMU's rules, checked before anything changes: a data file can be renamed
        // (the new name is not opened), raw mode only dropped.
        if r.data_file.is_some() && !m.ext_data {
            return Err(Invalid::DataFile(
                "data-file can only be set for images that use an external data file",
            )
            .into());
        }
        if r.data_raw == Some(true) && !m.data_raw {
            return Err(Invalid::DataFile("data-file-raw cannot be set on existing images").into());
        }
        if new_version < old_version && m.ext_data {
            return Err(Invalid::DataFile("Cannot downgrade an image with a data file").into());
        }
        let mut reopen = false;
        if r.data_file.is_some() || r.data_raw == Some(false) {
            let mut h = m.hdr.clone();
            if let Some(name) = &r.data_file {
                h.set_data_file_name(Some(name).filter(|n| !n.is_empty()).map(String::as_str));
            }
            if r.data_raw == Some(false) {
                h.autoclear &= !AUTOCLEAR_DATA_FILE_RAW;
            }
            // Fails (changing nothing) if the name does not fit in the header cluster.
            h.serialize()?;
            m.hdr = h;
            m.write_header()?;
            m.data_raw = m.hdr.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0;
        }
        if new_version > old_version {
            m.mark_clean()?;
            st.current = Some(Op::Upgrade);
            m.upgrade(self.size(), &mut st)?;
            reopen = true;
        }
        if r.encrypt {
            // After an upgrade, before a width change (QEMU's order). The key slots
            // live in the LUKS header area, which no other step moves.
            st.current = Some(Op::Encryption);
            self.amend_keys(o, force)?;
        }
        if let Some(bits) = r.refcount_bits {
            if bits != 1 << m.g.rc_order {
                if new_version < 3 && bits != 16 {
                    return Err(Invalid::AmendRefcountNeedsV3.into());
                }
                m.mark_clean()?;
                st.current = Some(Op::RefcountOrder);
                let entries = u64::from(m.hdr.refcount_table_clusters) * m.g.cs / 8;
                let covered = m.g.cs * m.g.rc_per_block;
                match check::change_refcount_order(&mut m, bits.trailing_zeros()) {
                    Ok(()) => (0..3).for_each(|w| st.reftable_walk(w, entries)),
                    Err(e) => {
                        // QEMU finds a refcount too wide for the new width in its
                        // first walk, at the table entry covering that cluster.
                        if let crate::Error::InvalidArgument(Invalid::RefcountNarrowing {
                            offset,
                            ..
                        }) = &e
                        {
                            for i in 0..=(offset / covered).min(entries.saturating_sub(1)) {
                                st.report(i, 3 * entries);
                            }
                        }
                        return Err(e);
                    }
                }
                reopen = true;
            }
        }
        if r.backing_file.is_some() || r.backing_fmt.is_some() {
            let cur_file = m.hdr.backing_file.clone();
            let cur_fmt = m.hdr.backing_format.clone();
            if r.backing_file != cur_file || r.backing_fmt != cur_fmt {
                return Err(Invalid::AmendBacking.into());
            }
        }
        if let Some(lazy) = r.lazy {
            let cur = m.hdr.compatible & COMPAT_LAZY_REFCOUNTS != 0;
            if lazy != cur {
                if lazy {
                    if new_version < 3 {
                        return Err(Invalid::NeedsV3Compat(V3Feature::LazyRefcounts).into());
                    }
                    m.hdr.compatible |= COMPAT_LAZY_REFCOUNTS;
                    m.write_header()?;
                } else {
                    m.mark_clean()?;
                    m.hdr.compatible &= !COMPAT_LAZY_REFCOUNTS;
                    m.write_header()?;
                }
            }
        }
        drop(m);
        if let Some(size) = r.size.filter(|&s| s != 0) {
            self.do_resize(size, true)?;
        }
        let mut m = self.lock();
        if new_version < old_version {
            st.current = Some(Op::Downgrade);
            m.downgrade(self.size(), &mut st)?;
            reopen = true;
        }
        m.writeback()?;
        m.unflushed = true;
        m.barrier()?;
        if reopen {
            // The driver's fixed geometry no longer matches the header.
            m.read_only = true;
        }
        Ok(())
    }
}
