//! Zero writes to images with extended L2 entries, per subcluster, as QEMU does them
//! (the block layer's split on the subcluster alignment, `qcow2_co_pwrite_zeroes`,
//! `qcow2_subcluster_zeroize`):
//! - the request is cut into an unaligned head (inside one subcluster), the aligned
//!   middle and an unaligned tail (none at the end of the image);
//! - an unaligned piece sets the zero bit of its subcluster when the rest of that
//!   subcluster reads as zeroes through the chain (block status, no data read) and the
//!   subcluster is unallocated or already zero; otherwise zero bytes are written;
//! - the aligned middle sets the zero bits of partial clusters' subclusters (a
//!   compressed cluster cannot be split: the piece is written as zero bytes), and whole
//!   clusters get an all-zero bitmap, dropping the host cluster only when it is
//!   compressed or unmapping is allowed (`zero::set_clusters`).
//!
//! Concurrency and crash rules as in `zero`: bitmap changes are made under the metadata
//! mutex once allocations and in-place writes in flight on the cluster are done; a
//! bitmap update is an L2 update (written back behind the usual barrier).

use super::l2entry::{L2Entry, SubState};
use super::zero::Mode;
use super::Qcow2;
use crate::error::{Result, Unsupported, ZeroLimit};
use crate::format::{datapath, Driver, ZeroFlags};

impl Qcow2 {
    /// Zero write of guest `[offset, offset + len)` (`len > 0`, inside the image).
    pub(super) fn zero_ext(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if flags.fast {
            // Refuse before changing anything.
            self.zero_ext_pass(offset, len, flags, true)?;
        }
        self.zero_ext_pass(offset, len, flags, false)
    }

    fn zero_ext_pass(&self, offset: u64, len: u64, flags: ZeroFlags, dry: bool) -> Result<()> {
        let scs = self.g.subcluster();
        let end = offset + len;
        let mut a = offset;
        while a < end {
            // The block layer's fragments: up to the next subcluster boundary when
            // unaligned, else the aligned part, then the unaligned rest.
            let b = if !a.is_multiple_of(scs) {
                end.min(a.next_multiple_of(scs))
            } else if !end.is_multiple_of(scs) && end - a > scs {
                end / scs * scs
            } else {
                end
            };
            self.zero_fragment(a, b, flags, dry)?;
            a = b;
        }
        Ok(())
    }

    /// One fragment: inside one subcluster when unaligned, aligned otherwise.
    fn zero_fragment(&self, a: u64, b: u64, flags: ZeroFlags, dry: bool) -> Result<()> {
        let scs = self.g.subcluster();
        let size = self.size();
        let head = a % scs;
        let tail = if b >= size {
            0
        } else {
            b.next_multiple_of(scs) - b
        };
        let done = if head != 0 || tail != 0 {
            let s0 = a - head;
            let s1 = (b + tail).min(size);
            datapath::is_zero(self, s0, head)?
                && datapath::is_zero(self, b, tail)?
                && self.zero_subclusters(s0, s1, true, dry)?
        } else {
            self.zeroize(a, b, flags, dry)?
        };
        if done {
            return Ok(());
        }
        if flags.fast || dry {
            if flags.fast {
                return Err(Unsupported::ZeroesNeedData(ZeroLimit::Qcow2PartialCluster).into());
            }
            return Ok(());
        }
        self.write_zero_bytes(a, b - a)
    }

    /// `[a, b)` (subcluster aligned, or `b` the end of the image) as zero subclusters;
    /// false (nothing changed) when a compressed cluster would have to be split.
    fn zeroize(&self, a: u64, b: u64, flags: ZeroFlags, dry: bool) -> Result<bool> {
        let cs = self.g.cs;
        let size = self.size();
        let head_end = b.min(a.next_multiple_of(cs));
        let mut mid = a;
        if !a.is_multiple_of(cs) {
            if !self.zero_subclusters(a, head_end, false, dry)? {
                return Ok(false);
            }
            mid = head_end;
        }
        let tail_start = if b >= size { b } else { mid.max(b / cs * cs) };
        if mid < tail_start && !dry {
            let mode = if flags.may_unmap {
                Mode::ZeroUnmap
            } else {
                Mode::ZeroKeep
            };
            self.set_clusters(mid / cs, tail_start.div_ceil(cs), mode)?;
        }
        if tail_start < b && !self.zero_subclusters(tail_start, b, false, dry)? {
            return Ok(false);
        }
        Ok(true)
    }

    /// Sets the zero bits of the subclusters `[a, b)` of one cluster (`a` subcluster
    /// aligned; `b` rounded up). False, with nothing changed, when the cluster is
    /// compressed or (`only_free`) the first subcluster holds data.
    fn zero_subclusters(&self, a: u64, b: u64, only_free: bool, dry: bool) -> Result<bool> {
        let cs = self.g.cs;
        let scs = self.g.subcluster();
        let gc = a / cs;
        let c0 = gc * cs;
        let (sa, sb) = (
            ((a - c0) / scs) as u32,
            (b - c0).div_ceil(scs).min(32) as u32,
        );
        let l1i = (gc >> self.g.l2_bits) as usize;
        let mut m = self.lock();
        m.check_writable()?;
        while m.inflight.contains(gc) || m.direct.contains(gc) {
            m = self.wait_alloc_done(m);
        }
        let e = m.entry_of(gc)?;
        let (host, copied, sub) = match e {
            L2Entry::Compressed { .. } => return Ok(false),
            L2Entry::Normal { host, copied, sub } => (host, copied, sub),
        };
        if only_free && sub.state(sa) == SubState::Allocated {
            return Ok(false);
        }
        let new = sub.with_zero(sa, sb);
        if dry || new == sub {
            return Ok(true);
        }
        m.before_alloc()?;
        m.set_l2(
            l1i,
            gc,
            &L2Entry::Normal {
                host,
                copied,
                sub: new,
            },
        )?;
        if let (true, Some(h)) = (m.data_raw, host) {
            // A raw data file must read as the guest does: its bytes under the
            // subclusters now reading as zeroes are zeroed too (QEMU zeroes the data
            // file first). Under the lock, so no write lands there meanwhile.
            let from = u64::from(sa) * scs;
            let to = (u64::from(sb) * scs).min(self.size().saturating_sub(c0));
            if to > from {
                m.data.write_zeroes(h.get() + from, to - from)?;
                m.unflushed = true;
            }
        }
        m.maybe_writeback()?;
        Ok(true)
    }
}
