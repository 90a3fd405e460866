//! Guest I/O: read, write (with copy-on-write and the in-flight allocation list),
//! zeroes, discard, block status, compressed writes and resize.

use super::compress;
use super::header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY};
use super::tables::{entry, set};
use super::{Meta, Qcow2, COMPRESSED, COPIED, L2E_STD_RESERVED, OFFSET_MASK, ZERO};
use crate::error::{Error, Result};
use crate::format::{read_backing, Driver, Extent, ExtentKind, ZeroFlags};

/// What an L2 entry says about one guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cl {
    /// Not allocated here: backing file (or zeroes).
    Unalloc,
    /// Zero flag without a host cluster.
    Zero,
    /// Zero flag with a preallocated host cluster.
    ZeroAlloc(u64, bool),
    /// Data at a host offset; `copied`: refcount is exactly 1 (writable in place).
    Data(u64, bool),
    /// Compressed: host byte offset and the length to read.
    Compressed(u64, u64),
}

/// Most clusters one allocating request reserves at once.
const MAX_ALLOC_BYTES: u64 = 32 << 20;

impl Meta {
    /// Decodes an L2 entry of guest cluster `gc`.
    pub(crate) fn classify(&mut self, e: u64, gc: u64) -> Result<Cl> {
        if e & COMPRESSED != 0 {
            let shift = self.g.csize_shift();
            let off = e & ((1u64 << shift) - 1);
            let nsec = (e >> shift) & ((1u64 << (62 - shift)) - 1);
            let len = (nsec + 1) * 512 - (off & 511);
            return Ok(Cl::Compressed(off, len));
        }
        if e & L2E_STD_RESERVED != 0 {
            return Err(self.mark_corrupt(format!(
                "L2 entry {e:#x} of guest cluster {gc} has reserved bits set"
            )));
        }
        let off = e & OFFSET_MASK;
        let copied = e & COPIED != 0;
        if off != 0 && off & (self.cs() - 1) != 0 {
            return Err(self.mark_corrupt(format!(
                "L2 entry of guest cluster {gc} points to unaligned host offset {off:#x}"
            )));
        }
        if self.g.version >= 3 && !self.g.ext_l2 && e & ZERO != 0 {
            return Ok(if off == 0 {
                Cl::Zero
            } else {
                Cl::ZeroAlloc(off, copied)
            });
        }
        if off == 0 {
            return Ok(Cl::Unalloc);
        }
        Ok(Cl::Data(off, copied))
    }

    /// Queues the release of whatever host clusters an old entry referenced.
    pub(crate) fn free_entry(&mut self, cl: Cl) {
        match cl {
            Cl::Data(h, _) | Cl::ZeroAlloc(h, _) => self.defer_free(h),
            Cl::Compressed(off, len) => {
                let cs = self.cs();
                let start = off & !511;
                let end = start + (len + (off & 511)).div_ceil(512) * 512;
                let mut c = start / cs;
                while c * cs < end {
                    self.defer_free(c * cs);
                    c += 1;
                }
            }
            Cl::Unalloc | Cl::Zero => {}
        }
    }

    /// Subcluster state of subcluster `k` (extended L2): 2 allocated, 1 zero,
    /// 0 unallocated.
    fn sc_state(bitmap: u64, k: u64) -> u8 {
        if bitmap >> k & 1 != 0 {
            2
        } else if bitmap >> (32 + k) & 1 != 0 {
            1
        } else {
            0
        }
    }

    /// From byte `q` of a cluster (extended L2), the subcluster index and the number of
    /// bytes up to `end` sharing its state.
    pub(crate) fn subcluster_run(&self, bitmap: u64, q: u64, end: u64) -> (u64, u64) {
        let scs = self.g.subcluster();
        let k = q / scs;
        let st = Self::sc_state(bitmap, k);
        let mut e = (k + 1) * scs;
        while e < end && Self::sc_state(bitmap, e / scs) == st {
            e += scs;
        }
        (k, e.min(end) - q)
    }

    /// Where byte `q` of guest cluster `gc` (in subcluster `k`) reads from.
    fn subcluster_src(&mut self, e: u64, bitmap: u64, gc: u64, k: u64, q: u64) -> Result<Src> {
        let host = e & OFFSET_MASK;
        Ok(match Self::sc_state(bitmap, k) {
            2 if host == 0 || bitmap & (bitmap >> 32) & 0xffff_ffff != 0 => {
                return Err(self.mark_corrupt(format!(
                    "extended L2 entry of guest cluster {gc} has an invalid subcluster bitmap {bitmap:#x}"
                )))
            }
            2 => Src::Host(host + q),
            1 => Src::Zero,
            _ => Src::Backing(gc * self.cs() + q),
        })
    }

    /// Whether guest cluster `gc` is being allocated by another request.
    pub(crate) fn in_flight(&self, gc: u64) -> bool {
        self.inflight.iter().any(|&(s, e)| gc >= s && gc < e)
    }

    fn in_flight_range(&self, s: u64, e: u64) -> bool {
        self.inflight.iter().any(|&(a, b)| a < e && s < b)
    }

    fn direct_range(&self, s: u64, e: u64) -> bool {
        self.direct.iter().any(|&(a, b)| a < e && s < b)
    }

    /// With lazy refcounts, marks the image dirty before its first allocating write.
    pub(crate) fn before_alloc(&mut self) -> Result<()> {
        if self.hdr.compatible & COMPAT_LAZY_REFCOUNTS != 0
            && self.hdr.incompatible & INCOMPAT_DIRTY == 0
        {
            self.hdr.incompatible |= INCOMPAT_DIRTY;
            self.write_header()?;
            self.set_dirty = true;
        }
        Ok(())
    }

    /// Reserves room for `len` bytes of compressed data and returns its host offset.
    /// Several compressed clusters share a host cluster; each counts once per host
    /// cluster it touches.
    fn alloc_compressed(&mut self, len: u64) -> Result<u64> {
        let cs = self.cs();
        let mut cur = self.compress_cursor;
        // A cluster whose refcount is saturated (e.g. 1-bit refcounts) takes no more.
        if cur != 0 && self.rc_get(cur / cs)? >= self.g.rc_max() {
            cur = 0;
        }
        let (off, end) = if cur != 0 && len <= cs - cur % cs {
            self.rc_add(cur / cs, 1)?;
            (cur, cur + len)
        } else {
            let new = self.alloc(1)?;
            if cur != 0 && new == (cur / cs + 1) * cs {
                // The next cluster was free: let the data span into it.
                self.rc_add(cur / cs, 1)?;
                (cur, cur + len)
            } else {
                (new, new + len)
            }
        };
        self.compress_cursor = if end.is_multiple_of(cs) { 0 } else { end };
        Ok(off)
    }
}

/// A piece of a read.
pub(crate) enum Src {
    Backing(u64),
    Zero,
    Host(u64),
    Compressed(u64, u64, usize),
}

impl Qcow2 {
    /// Blocks on `alloc_done`, counted in `Meta::waiters` so that finishing an
    /// allocation costs no wake-up syscall when nobody waits.
    fn wait_alloc_done<'a>(
        &'a self,
        mut m: std::sync::MutexGuard<'a, Meta>,
    ) -> std::sync::MutexGuard<'a, Meta> {
        m.waiters += 1;
        let mut m = self.alloc_done.wait(m).unwrap_or_else(|p| p.into_inner());
        m.waiters -= 1;
        m
    }

    /// Wakes the waiters of `alloc_done`, if any. `m` must be the guard under which
    /// the in-flight state was just changed: a request counted in `waiters` is then
    /// already blocked on the condvar, and one not yet counted will see the change
    /// before it would wait.
    fn wake_alloc_waiters(&self, m: &Meta) {
        if m.waiters > 0 {
            self.alloc_done.notify_all();
        }
    }

    fn wait_inflight<'a>(
        &'a self,
        mut m: std::sync::MutexGuard<'a, Meta>,
        s: u64,
        e: u64,
    ) -> std::sync::MutexGuard<'a, Meta> {
        while m.in_flight_range(s, e) {
            m = self.wait_alloc_done(m);
        }
        m
    }

    fn read_compressed(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        let mut src = vec![0u8; len as usize];
        self.storage.read_at(&mut src, off)?;
        compress::decompress(&src, self.g.cs as usize, self.zstd, off)
    }

    pub(crate) fn do_read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.g.cs;
        let span = cs * self.g.l2_entries;
        let len = buf.len() as u64;
        let mut pos = 0u64;
        while pos < len {
            let cur = offset + pos;
            let limit = (len - pos).min(span - cur % span) + pos;
            let mut segs: Vec<(usize, usize, Src)> = Vec::new();
            {
                let mut m = self.lock();
                // The whole piece lies in one L2 table: look it up once.
                let l1i = ((cur / cs) >> self.g.l2_bits) as usize;
                let l2off = m.l1_offset(l1i)?;
                let slot = match l2off {
                    0 => None,
                    off => Some(m.l2_slot(off, l1i)?),
                };
                let mask = self.g.l2_entries - 1;
                let mut p = pos;
                while p < limit {
                    let g = offset + p;
                    let gc = g / cs;
                    let in_off = g % cs;
                    let n = (cs - in_off).min(limit - p);
                    let (e, bitmap) = match slot {
                        None => (0, 0),
                        Some(s) => {
                            let d = &m.l2.slot(s).data;
                            let w = self.g.l2_word((gc & mask) as usize);
                            (entry(d, w), if self.g.ext_l2 { entry(d, w + 1) } else { 0 })
                        }
                    };
                    let cl = m.classify(e, gc)?;
                    let mut pieces: Vec<(u64, Src)> = Vec::with_capacity(1);
                    if m.g.ext_l2 && !matches!(cl, Cl::Compressed(..)) {
                        let mut q = in_off;
                        while q < in_off + n {
                            let (k, len) = m.subcluster_run(bitmap, q, in_off + n);
                            let src = m.subcluster_src(e, bitmap, gc, k, q)?;
                            pieces.push((len, src));
                            q += len;
                        }
                    } else {
                        let src = match cl {
                            Cl::Unalloc => Src::Backing(g),
                            Cl::Zero | Cl::ZeroAlloc(..) => Src::Zero,
                            Cl::Data(h, _) => Src::Host(h + in_off),
                            Cl::Compressed(o, l) => Src::Compressed(o, l, in_off as usize),
                        };
                        pieces.push((n, src));
                    }
                    let mut pp = p;
                    for (n, src) in pieces {
                        let merged = match (segs.last_mut(), &src) {
                            (Some((_, l, Src::Backing(b))), Src::Backing(x))
                                if *b + *l as u64 == *x =>
                            {
                                *l += n as usize;
                                true
                            }
                            (Some((_, l, Src::Zero)), Src::Zero) => {
                                *l += n as usize;
                                true
                            }
                            (Some((_, l, Src::Host(h))), Src::Host(x)) if *h + *l as u64 == *x => {
                                *l += n as usize;
                                true
                            }
                            _ => false,
                        };
                        if !merged {
                            segs.push((pp as usize, n as usize, src));
                        }
                        pp += n;
                    }
                    p += n;
                }
            }
            for (start, n, src) in segs {
                let out = &mut buf[start..start + n];
                match src {
                    Src::Zero => out.fill(0),
                    Src::Backing(g) => read_backing(self.backing.as_ref(), out, g)?,
                    Src::Host(h) => self.storage.read_at(out, h)?,
                    Src::Compressed(o, l, in_off) => {
                        let data = self.read_compressed(o, l)?;
                        out.copy_from_slice(&data[in_off..in_off + n]);
                    }
                }
            }
            pos = limit;
        }
        Ok(())
    }

    /// Bytes `[start, end)` of guest cluster `gc` as they read now (copy-on-write source).
    fn read_old(&self, cl: Cl, gc: u64, start: u64, out: &mut [u8]) -> Result<()> {
        let cs = self.g.cs;
        match cl {
            Cl::Unalloc => read_backing(self.backing.as_ref(), out, gc * cs + start),
            Cl::Zero | Cl::ZeroAlloc(..) => {
                out.fill(0);
                Ok(())
            }
            Cl::Data(h, _) => Ok(self.storage.read_at(out, h + start)?),
            Cl::Compressed(o, l) => {
                let d = self.read_compressed(o, l)?;
                out.copy_from_slice(&d[start as usize..start as usize + out.len()]);
                Ok(())
            }
        }
    }

    pub(crate) fn do_write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let cs = self.g.cs;
        let len = buf.len() as u64;
        let mut pos = 0u64;
        while pos < len {
            let cur = offset + pos;
            let gc = cur / cs;
            let in_off = cur % cs;
            let mut m = self.lock();
            m.check_writable()?;
            m = self.wait_inflight(m, gc, gc + 1);
            let e = m.l2_entry(gc)?;
            let cl = m.classify(e, gc)?;
            if let Cl::Data(host, true) = cl {
                if host >= m.file_end {
                    return Err(m.mark_corrupt(format!(
                        "L2 entry of guest cluster {gc} points past the end of the file (host offset {host:#x})"
                    )));
                }
                // In-place: extend over following clusters contiguous on the host.
                let mut n = (cs - in_off).min(len - pos);
                let mut next = host + cs;
                let mut g2 = gc + 1;
                while pos + n < len {
                    let e2 = m.l2_entry(g2)?;
                    match m.classify(e2, g2)? {
                        Cl::Data(h2, true) if h2 == next && h2 < m.file_end => {
                            n += cs.min(len - pos - n);
                            next += cs;
                            g2 += 1;
                        }
                        _ => break,
                    }
                }
                if let Some(what) = m.overlaps_metadata(host / cs, (in_off + n).div_ceil(cs)) {
                    return Err(m.mark_corrupt(format!(
                        "Preventing invalid write on metadata (overlaps with {what}): guest cluster {gc} maps to host offset {host:#x}"
                    )));
                }
                let range = (gc, g2);
                m.direct.push(range);
                drop(m);
                let r = self
                    .storage
                    .write_at(&buf[pos as usize..(pos + n) as usize], host + in_off);
                let mut m = self.lock();
                if let Some(i) = m.direct.iter().position(|&x| x == range) {
                    m.direct.swap_remove(i);
                }
                self.wake_alloc_waiters(&m);
                drop(m);
                r?;
                pos += n;
                continue;
            }
            // Allocating run: clusters needing a new host cluster, inside one L2 table.
            let l1i = (gc >> self.g.l2_bits) as usize;
            if l1i >= m.l1.len() {
                return Err(Error::corrupt(format!(
                    "guest cluster {gc} is beyond the L1 table ({} entries)",
                    m.l1.len()
                )));
            }
            let table_end = ((l1i as u64) + 1) << self.g.l2_bits;
            let last = (offset + len - 1) / cs;
            let max_k = (MAX_ALLOC_BYTES / cs).max(1);
            let mut olds = vec![cl];
            // A zero cluster that keeps its own host cluster (refcount 1) is written in
            // place, like QEMU does; it gets a run of its own.
            let reuse = match cl {
                Cl::ZeroAlloc(h, true)
                    if h < m.file_end && m.overlaps_metadata(h / cs, 1).is_none() =>
                {
                    Some(h)
                }
                _ => None,
            };
            let mut g2 = gc + 1;
            while reuse.is_none() && g2 <= last && g2 < table_end && (olds.len() as u64) < max_k {
                if m.in_flight(g2) {
                    break;
                }
                let e2 = m.l2_entry(g2)?;
                let c2 = m.classify(e2, g2)?;
                if let Cl::Data(_, true) | Cl::ZeroAlloc(_, true) = c2 {
                    break;
                }
                olds.push(c2);
                g2 += 1;
            }
            let k = olds.len() as u64;
            m.before_alloc()?;
            m.l2_for_write(l1i)?;
            let host = match reuse {
                Some(h) => h,
                None => m.alloc(k)?,
            };
            m.inflight.push((gc, gc + k));
            drop(m);
            let res = self.cow_write(buf, pos, offset, gc, k, host, &olds);
            let mut m = self.lock();
            if let Some(i) = m.inflight.iter().position(|&r| r == (gc, gc + k)) {
                m.inflight.swap_remove(i);
            }
            let done = match res {
                Ok(n) => m.link(l1i, gc, k, host).map(|_| n),
                Err(e) => Err(e),
            };
            if done.is_err() && reuse.is_none() {
                let _ = m.unalloc(host, k);
            }
            self.wake_alloc_waiters(&m);
            pos += done?;
            m.maybe_writeback()?;
        }
        Ok(())
    }

    /// Writes the data of an allocating run with its head/tail copy-on-write in one
    /// vectored write. Returns the guest bytes consumed.
    #[allow(clippy::too_many_arguments)]
    fn cow_write(
        &self,
        buf: &[u8],
        pos: u64,
        offset: u64,
        gc: u64,
        k: u64,
        host: u64,
        olds: &[Cl],
    ) -> Result<u64> {
        let cs = self.g.cs;
        let cur = offset + pos;
        let head = cur - gc * cs;
        let run_end = (gc + k) * cs;
        let data_end = (offset + buf.len() as u64).min(run_end);
        let n = data_end - cur;
        let tail = run_end - data_end;
        let mut hbuf = vec![0u8; head as usize];
        if head > 0 {
            self.read_old(olds[0], gc, 0, &mut hbuf)?;
        }
        let mut tbuf = vec![0u8; tail as usize];
        if tail > 0 {
            self.read_old(olds[(k - 1) as usize], gc + k - 1, cs - tail, &mut tbuf)?;
        }
        let data = &buf[pos as usize..(pos + n) as usize];
        let mut v: Vec<&[u8]> = Vec::with_capacity(3);
        if head > 0 {
            v.push(&hbuf);
        }
        v.push(data);
        if tail > 0 {
            v.push(&tbuf);
        }
        self.storage.write_vectored_at(&v, host)?;
        Ok(n)
    }

    pub(crate) fn do_write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if len == 0 {
            return Ok(());
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
                return Err(Error::unsupported(
                    "qcow2 v2 image with a backing file cannot write zeroes without writing data",
                ));
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
                    return Err(Error::unsupported(
                        "qcow2 v2 image with a backing file cannot write zeroes without writing data",
                    ));
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

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        while offset < end {
            let n = (end - offset).min(chunk.len() as u64) as usize;
            self.do_write(&chunk[..n], offset)?;
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

    /// Whether `[off, off+len)` reads as zeroes according to block status (never by
    /// reading data): QEMU's `is_zero`.
    fn status_zero(&self, mut off: u64, len: u64) -> Result<bool> {
        let end = (off + len).min(self.size());
        while off < end {
            let e = self.do_block_status(off, end - off)?;
            let mut n = e.len.clamp(1, end - off);
            let zero = match e.kind {
                ExtentKind::Zero => true,
                ExtentKind::Data => false,
                ExtentKind::Unallocated => match &self.backing {
                    Some(b) if off < b.size() => {
                        n = n.min(b.size() - off);
                        let ce = crate::chain::block_status(b, off, n)?;
                        n = ce.len.clamp(1, n);
                        ce.kind != ExtentKind::Data
                    }
                    _ => true,
                },
            };
            if !zero {
                return Ok(false);
            }
            off += n;
        }
        Ok(true)
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
            let cl = {
                let mut m = self.lock();
                let e = m.l2_entry(gc)?;
                m.classify(e, gc)?
            };
            let no_backing = self.backing.is_none() && !self.lock().has_backing;
            let flag_ok = v3
                && tries < 3
                && matches!(cl, Cl::Unalloc | Cl::Zero | Cl::ZeroAlloc(..))
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
                let same = |c: Cl| matches!(c, Cl::Unalloc | Cl::Zero | Cl::ZeroAlloc(..));
                if !self.set_clusters_if(gc, gc + 1, mode, Some(&same))? {
                    tries += 1;
                    continue;
                }
            } else {
                let already = match cl {
                    Cl::Zero | Cl::ZeroAlloc(..) => true,
                    Cl::Unalloc => no_backing,
                    _ => false,
                };
                if !already {
                    if dry {
                        return Err(Error::unsupported(
                            "writing zeroes to part of a qcow2 cluster needs writing data",
                        ));
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
    fn set_clusters(&self, first: u64, last: u64, mode: Mode) -> Result<()> {
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
        only: Option<&dyn Fn(Cl) -> bool>,
    ) -> Result<bool> {
        let mut gc = first;
        while gc < last {
            let l1i = (gc >> self.g.l2_bits) as usize;
            let table_end = (((l1i as u64) + 1) << self.g.l2_bits).min(last);
            let mut m = self.lock();
            m.check_writable()?;
            // Allocations in flight and in-place writes still running on these
            // clusters must finish before their host clusters can be released.
            while m.in_flight_range(gc, table_end) || m.direct_range(gc, table_end) {
                m = self.wait_alloc_done(m);
            }
            if l1i >= m.l1.len() {
                return Err(Error::corrupt(format!(
                    "guest cluster {gc} is beyond the L1 table"
                )));
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
                let cl = m.classify(e, g)?;
                if only.is_some_and(|f| !f(cl)) {
                    m.maybe_writeback()?;
                    return Ok(false);
                }
                // QEMU's rules (zero_in_l2_slice / discard_in_l2_slice): zero writes
                // set the zero flag everywhere, dropping the host cluster only when it
                // is compressed or unmapping is allowed; a discard makes allocated
                // clusters (and, over a backing file, every cluster) read as zeroes.
                let allocated = matches!(cl, Cl::Data(..) | Cl::ZeroAlloc(..) | Cl::Compressed(..));
                let new = match (mode, cl) {
                    (Mode::Dealloc, _) => 0,
                    (Mode::Discard, _) if backing_visible || allocated => ZERO,
                    (Mode::Discard, _) => e,
                    (Mode::ZeroKeep, Cl::Data(..) | Cl::ZeroAlloc(..)) => e | ZERO,
                    (Mode::ZeroKeep | Mode::ZeroUnmap, Cl::Zero) => e,
                    _ => ZERO,
                };
                if new == e {
                    continue;
                }
                if !prepared {
                    m.before_alloc()?;
                    prepared = true;
                }
                let s = m.l2_for_write(l1i)?;
                let w = m.g.l2_word((g & mask) as usize);
                set(&mut m.l2.slot_mut(s).data, w, new);
                m.l2_dirty(s);
                let kept = new & OFFSET_MASK;
                match cl {
                    Cl::Data(h, _) | Cl::ZeroAlloc(h, _) if h == kept => {}
                    _ => m.free_entry(cl),
                }
            }
            m.maybe_writeback()?;
            drop(m);
            gc = table_end;
        }
        Ok(true)
    }

    /// Block status with extended L2 entries: subcluster granularity.
    fn ext_block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let cs = self.g.cs;
        let mut m = self.lock();
        let end = offset + len;
        // (kind, next expected host offset, compressed)
        let mut cur: Option<(ExtentKind, Option<u64>, bool)> = None;
        let mut pos = offset;
        let max_clusters = 4 * self.g.l2_entries;
        let mut clusters = 0;
        'outer: while pos < end && clusters < max_clusters {
            clusters += 1;
            let gc = pos / cs;
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            let e = m.l2_entry(gc)?;
            let cl = m.classify(e, gc)?;
            let mut pieces: Vec<(u64, ExtentKind, Option<u64>, bool)> = Vec::new();
            if let Cl::Compressed(..) = cl {
                pieces.push((n, ExtentKind::Data, None, true));
            } else {
                let bitmap = m.l2_bitmap(gc)?;
                let mut q = in_off;
                while q < in_off + n {
                    let (k, l) = m.subcluster_run(bitmap, q, in_off + n);
                    let (kind, host) = match m.subcluster_src(e, bitmap, gc, k, q)? {
                        Src::Host(h) => (ExtentKind::Data, Some(h)),
                        Src::Zero => (ExtentKind::Zero, None),
                        _ => (ExtentKind::Unallocated, None),
                    };
                    pieces.push((l, kind, host, false));
                    q += l;
                }
            }
            for (l, kind, host, comp) in pieces {
                match cur {
                    None => cur = Some((kind, host.map(|h| h + l), comp)),
                    Some((k0, exp, c0)) if k0 == kind && c0 == comp && exp == host => {
                        cur = Some((k0, host.map(|h| h + l), c0));
                    }
                    Some(_) => break 'outer,
                }
                pos += l;
            }
        }
        let (kind, _, compressed) = cur.unwrap_or((ExtentKind::Unallocated, None, false));
        // The host offset of the first byte: recompute from the start.
        drop(m);
        let n = pos - offset;
        let first = {
            let mut m = self.lock();
            let gc = offset / cs;
            let e = m.l2_entry(gc)?;
            let bitmap = m.l2_bitmap(gc)?;
            match m.classify(e, gc)? {
                Cl::Compressed(..) => None,
                _ => {
                    let q = offset % cs;
                    let k = q / self.g.subcluster();
                    match m.subcluster_src(e, bitmap, gc, k, q)? {
                        Src::Host(h) => Some(h),
                        _ => None,
                    }
                }
            }
        };
        Ok(Extent {
            len: n.max(1).min(len),
            kind,
            offset: if kind == ExtentKind::Data && !compressed {
                first
            } else {
                None
            },
            compressed,
        })
    }

    pub(crate) fn do_block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        if self.g.ext_l2 {
            return self.ext_block_status(offset, len);
        }
        let cs = self.g.cs;
        let end = offset + len;
        let gc0 = offset / cs;
        let last_gc = (end - 1) / cs;
        let mask = self.g.l2_entries - 1;
        let mut m = self.lock();
        let e0 = m.l2_entry(gc0)?;
        let c0 = m.classify(e0, gc0)?;
        let in_off = offset % cs;
        let host_of = |c: Cl| match c {
            Cl::Data(h, _) | Cl::ZeroAlloc(h, _) => Some(h),
            _ => None,
        };
        let key = |c: Cl| match c {
            Cl::Unalloc => 0,
            Cl::Zero | Cl::ZeroAlloc(..) => 1,
            Cl::Data(..) => 2,
            Cl::Compressed(..) => 3,
        };
        let mut n = (cs - in_off).min(len);
        let mut gc = gc0 + 1;
        let mut expect = host_of(c0).map(|h| h + cs);
        // Entries looked at one by one are bounded per call (callers loop); runs of
        // unallocated L1 entries cost one comparison each, so a sparse disk of any size
        // is answered in one call.
        let max_entries = 4 * self.g.l2_entries;
        let mut examined = 0;
        'tables: while gc <= last_gc && examined < max_entries {
            let l1i = (gc >> self.g.l2_bits) as usize;
            let table_end = ((l1i as u64) + 1) << self.g.l2_bits;
            let l2off = m.l1_offset(l1i)?;
            if l2off == 0 {
                if c0 != Cl::Unalloc {
                    break;
                }
                n = (table_end * cs).min(end) - offset;
                gc = table_end;
                continue;
            }
            // One cache lookup per table, not per entry.
            let slot = m.l2_slot(l2off, l1i)?;
            let stop = table_end.min(last_gc + 1);
            while gc < stop && examined < max_entries {
                let e = entry(&m.l2.slot(slot).data, self.g.l2_word((gc & mask) as usize));
                let c = m.classify(e, gc)?;
                if key(c) != key(c0) || host_of(c) != expect {
                    break 'tables;
                }
                n = ((gc + 1) * cs).min(end) - offset;
                expect = expect.map(|h| h + cs);
                gc += 1;
                examined += 1;
            }
        }
        drop(m);
        let (kind, off, compressed) = match c0 {
            Cl::Unalloc => (ExtentKind::Unallocated, None, false),
            Cl::Zero => (ExtentKind::Zero, None, false),
            Cl::ZeroAlloc(h, _) => (ExtentKind::Zero, Some(h + in_off), false),
            Cl::Data(h, _) => (ExtentKind::Data, Some(h + in_off), false),
            Cl::Compressed(..) => (ExtentKind::Data, None, true),
        };
        Ok(Extent {
            len: n,
            kind,
            offset: off,
            compressed,
        })
    }

    pub(crate) fn do_write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let cs = self.g.cs;
        let size = self.size();
        if !offset.is_multiple_of(cs) || offset >= size {
            return Err(Error::invalid(format!(
                "compressed write at offset {offset} is not cluster aligned or past the end"
            )));
        }
        let want = cs.min(size - offset);
        if buf.len() as u64 != want {
            return Err(Error::invalid(format!(
                "compressed writes must cover one whole cluster ({want} bytes), got {}",
                buf.len()
            )));
        }
        let full;
        let input: &[u8] = if want < cs {
            let mut f = vec![0u8; cs as usize];
            f[..buf.len()].copy_from_slice(buf);
            full = f;
            &full
        } else {
            buf
        };
        // Compression runs without any lock so callers can use every core.
        let Some(comp) = compress::compress(input, self.zstd)? else {
            return self.do_write(buf, offset);
        };
        let gc = offset / cs;
        let l1i = (gc >> self.g.l2_bits) as usize;
        let mut m = self.lock();
        m.check_writable()?;
        while m.in_flight_range(gc, gc + 1) || m.direct_range(gc, gc + 1) {
            m = self.wait_alloc_done(m);
        }
        m.before_alloc()?;
        m.l2_for_write(l1i)?;
        let host = m.alloc_compressed(comp.len() as u64)?;
        m.inflight.push((gc, gc + 1));
        drop(m);
        let res = self.storage.write_at(&comp, host);
        let mut m = self.lock();
        if let Some(i) = m.inflight.iter().position(|&r| r == (gc, gc + 1)) {
            m.inflight.swap_remove(i);
        }
        let r = match res {
            Ok(()) => {
                let shift = m.g.csize_shift();
                let nsec = ((host + comp.len() as u64 - 1) >> 9) - (host >> 9);
                let ent = COMPRESSED | (nsec << shift) | host;
                m.set_entry(l1i, gc, ent)
            }
            Err(e) => Err(e.into()),
        };
        self.wake_alloc_waiters(&m);
        r?;
        m.maybe_writeback()
    }

    pub(crate) fn do_resize(&self, new_size: u64, shrink: bool) -> Result<()> {
        let cs = self.g.cs;
        let cur = self.size();
        if new_size == cur {
            return Ok(());
        }
        let mut m = self.lock();
        m.check_writable()?;
        // Snapshots record their own disk size (v3), so growing is safe; shrinking
        // would drop clusters they still need.
        if !m.snapshots.is_empty() && (m.g.version < 3 || new_size < cur) {
            return Err(Error::unsupported(if m.g.version < 3 {
                "Can't resize a v2 image which has snapshots"
            } else {
                "Can't shrink a qcow2 image with snapshots"
            }));
        }
        if new_size < cur {
            if !shrink {
                return Err(Error::invalid(
                    "Use the --shrink option to perform a shrink operation.",
                ));
            }
            drop(m);
            let first = new_size.div_ceil(cs);
            let last = cur.div_ceil(cs);
            if first < last {
                self.set_clusters(first, last, Mode::Dealloc)?;
            }
            m = self.lock();
        } else {
            let need = m.g.l1_entries_for(new_size);
            if need * 8 > super::header::MAX_L1_BYTES {
                return Err(Error::invalid(format!(
                    "qcow2 image size {new_size} needs an L1 table larger than 32 MiB"
                )));
            }
            if need > m.l1.len() as u64 {
                m.writeback()?;
                let bytes = need * 8;
                let clusters = bytes.div_ceil(cs);
                let new_off = m.alloc(clusters)?;
                let mut l1 = m.l1.clone();
                l1.resize(need as usize, 0);
                let mut raw = Vec::with_capacity((clusters * cs) as usize);
                for e in &l1 {
                    raw.extend_from_slice(&e.to_be_bytes());
                }
                // Like QEMU, only the entries are written: the file may end inside
                // the table's last cluster.
                m.st.write_at(&raw, new_off)?;
                m.unflushed = true;
                m.barrier()?;
                let old_off = m.hdr.l1_table_offset;
                let old_clusters = (u64::from(m.hdr.l1_size) * 8).div_ceil(cs);
                m.hdr.l1_table_offset = new_off;
                m.hdr.l1_size = need as u32;
                m.hdr.size = new_size;
                m.l1 = l1;
                m.write_header()?;
                for i in 0..old_clusters {
                    m.rc_add(old_off / cs + i, -1)?;
                }
            }
        }
        m.writeback()?;
        m.barrier()?;
        m.hdr.size = new_size;
        m.write_header()?;
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        drop(m);
        // Growing: bytes of the old last cluster past the old end may hold data from
        // before a shrink; the new part of the disk must read as zeroes.
        if new_size > cur && !cur.is_multiple_of(cs) {
            let tail_end = cur.div_ceil(cs) * cs;
            self.do_write_zeroes(cur, tail_end.min(new_size) - cur, ZeroFlags::default())?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Entries cleared (reads fall through to the backing file).
    Dealloc,
    /// v3 discard: reads as zeroes afterwards, host clusters released.
    Discard,
    /// Zero flag, host clusters released.
    ZeroUnmap,
    /// Zero flag, host clusters (other than compressed ones) kept.
    ZeroKeep,
}

impl Meta {
    /// Points guest clusters `gc..gc+k` at the new host run (data already written)
    /// and releases what they referenced before.
    pub(crate) fn link(&mut self, l1i: usize, gc: u64, k: u64, host: u64) -> Result<()> {
        let cs = self.cs();
        for i in 0..k {
            self.set_entry(l1i, gc + i, (host + i * cs) | COPIED)?;
        }
        Ok(())
    }

    /// Sets one L2 entry, releasing the old one's clusters.
    pub(crate) fn set_entry(&mut self, l1i: usize, gc: u64, new: u64) -> Result<()> {
        let s = self.l2_for_write(l1i)?;
        let idx = self.g.l2_word((gc & (self.g.l2_entries - 1)) as usize);
        let old = entry(&self.l2.slot(s).data, idx);
        set(&mut self.l2.slot_mut(s).data, idx, new);
        self.l2_dirty(s);
        // New data (or refcounts) must be durable before this table is written.
        self.unflushed = true;
        let cl = self.classify(old, gc)?;
        match cl {
            // The host cluster stays in use (zero cluster written in place).
            Cl::Data(h, _) | Cl::ZeroAlloc(h, _)
                if new & COMPRESSED == 0 && h == new & OFFSET_MASK => {}
            _ => self.free_entry(cl),
        }
        Ok(())
    }
}
