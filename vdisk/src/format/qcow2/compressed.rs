//! Compressed writes: one whole cluster compressed (without any lock, so callers can use
//! every core), packed with others into shared host clusters.
//!
//! Concurrency: the cluster is registered in flight while its compressed bytes go down,
//! after waiting for other allocations and in-place writes on it. Crash rules: as for
//! any allocation, the L2 entry is set in cache only after the data write returned, and
//! written back behind a barrier; each host cluster the stream touches holds one
//! refcount per compressed cluster using it.

use super::l2entry::L2Entry;
use super::{compress, Meta, Qcow2};
use crate::error::{Invalid, Result};
use crate::format::mapping::HostOffset;
use crate::format::{datapath, Driver};
use std::io::IoSlice;

impl Meta {
    /// Reserves room for `len` bytes of compressed data and returns its host offset.
    /// Several compressed clusters share a host cluster; each counts once per host
    /// cluster it touches.
    pub(crate) fn alloc_compressed(&mut self, len: u64) -> Result<u64> {
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

impl Qcow2 {
    pub(crate) fn do_write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let cs = self.g.cs;
        let size = self.size();
        if !offset.is_multiple_of(cs) || offset >= size {
            return Err(Invalid::CompressedWriteUnaligned { offset }.into());
        }
        let want = cs.min(size - offset);
        if buf.len() as u64 != want {
            return Err(Invalid::CompressedWriteLength {
                want,
                got: buf.len() as u64,
            }
            .into());
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
            return datapath::write_vectored(self, &[IoSlice::new(buf)], offset);
        };
        let gc = offset / cs;
        let l1i = (gc >> self.g.l2_bits) as usize;
        let mut m = self.lock();
        m.check_writable()?;
        while m.inflight.overlaps(gc, gc + 1) || m.direct.overlaps(gc, gc + 1) {
            m = self.wait_alloc_done(m);
        }
        m.before_alloc()?;
        m.l2_for_write(l1i)?;
        let host = m.alloc_compressed(comp.len() as u64)?;
        m.inflight.insert(gc, gc + 1);
        drop(m);
        self.data.event(crate::storage::BlkEvent::WriteCompressed);
        let res = self.data.write_at(&comp, host);
        let mut m = self.lock();
        m.inflight.remove(gc, gc + 1);
        let r = match res {
            Ok(()) => {
                let nsec = ((host + comp.len() as u64 - 1) >> 9) - (host >> 9);
                let ent = L2Entry::Compressed {
                    host: HostOffset(host),
                    sectors: nsec + 1,
                };
                m.set_l2(l1i, gc, &ent)
            }
            Err(e) => Err(e.into()),
        };
        self.wake_alloc_waiters(&m);
        r?;
        m.maybe_writeback()
    }
}
