//! The VDI side of the mapping contract: runs through the block map, in-place targets,
//! and allocation of whole blocks with the crash order described in [`super`].

use super::bmap::{is_allocated, UNALLOCATED};
use super::Vdi;
use crate::error::{Corruption, NoSpace, Problem, Result, Structure};
use crate::format::datapath::Waiters;
use crate::format::mapping::{
    Allocation, Cow, GuestOffset, HostOffset, InPlaceGuard, Mapper, Mapping, Run, Store,
    WriteTarget,
};
use crate::format::Driver;
use crate::storage::Storage;
use std::sync::Arc;

/// Largest piece of zeroes written at once by [`write_zeroes`] through the storage.
const ZERO_CHUNK: u64 = 1 << 30;

impl Vdi {
    fn bs(&self) -> u64 {
        self.geo.block_size as u64
    }

    fn entry(&self, block: u64) -> u32 {
        let t = self.bmap.read().unwrap_or_else(|p| p.into_inner());
        t.get(block as usize).copied().unwrap_or(UNALLOCATED)
    }

    /// Host offset of data block `e`, validated against the image's block count.
    fn data_start(&self, block: u64, e: u32) -> Result<u64> {
        if e >= self.geo.blocks_in_image {
            return Err(Corruption::new(
                Structure::VdiBlockMap,
                Problem::BadOffset {
                    index: Some(block),
                    value: e as u64,
                },
            )
            .at(self.geo.offset_bmap as u64)
            .into());
        }
        Ok(self.geo.offset_data as u64 + e as u64 * self.bs())
    }
}

/// The run at `guest` (at most `len` bytes, inside the guest size): data blocks
/// contiguous in the file make one run, as do consecutive unallocated blocks.
pub(super) fn map_range(v: &Vdi, guest: u64, len: u64) -> Result<Run> {
    let bs = v.bs();
    let block = guest / bs;
    let in_block = guest % bs;
    let mut n = (bs - in_block).min(len);
    let e = v.entry(block);
    let mut b = block + 1;
    if !is_allocated(e) {
        while n < len && !is_allocated(v.entry(b)) {
            n = (n + bs).min(len);
            b += 1;
        }
        return Ok(Run {
            len: n,
            mapping: Mapping::Zero { host: None },
        });
    }
    let host = v.data_start(block, e)?;
    while n < len {
        let f = v.entry(b);
        if !is_allocated(f) || f >= v.geo.blocks_in_image || f as u64 != e as u64 + (b - block) {
            break;
        }
        n = (n + bs).min(len);
        b += 1;
    }
    Ok(Run {
        len: n,
        mapping: Mapping::Data {
            store: Store::Data,
            host: HostOffset(host + in_block),
            in_place: true,
        },
    })
}

/// Zero writes: allocated bytes are zeroed in place; unallocated blocks already read
/// as zeroes and stay unallocated.
pub(super) fn write_zeroes(v: &Vdi, offset: u64, len: u64) -> Result<()> {
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let run = map_range(v, pos, (end - pos).min(ZERO_CHUNK))?;
        if let Mapping::Data { host, .. } = run.mapping {
            v.storage.write_zeroes(host.get(), run.len)?;
        }
        pos += run.len;
    }
    Ok(())
}

impl Mapper for Vdi {
    fn guest_size(&self) -> u64 {
        self.size
    }
    fn store(&self, _which: Store) -> &Arc<dyn Storage> {
        &self.storage
    }
    fn backing_image(&self) -> Option<&Arc<dyn Driver>> {
        None
    }
    fn map(&self, guest: GuestOffset, len: u64) -> Result<Run> {
        map_range(self, guest.get(), len)
    }

    fn prepare_write(&self, guest: GuestOffset, len: u64) -> Result<WriteTarget<'_>> {
        let g = guest.get();
        let bs = self.bs();
        let block = g / bs;
        let in_block = g % bs;
        let n = (bs - in_block).min(len);
        let in_place = |e: u32| -> Result<WriteTarget<'_>> {
            Ok(WriteTarget::InPlace {
                store: Store::Data,
                host: HostOffset(self.data_start(block, e)? + in_block),
                len: n,
                guard: InPlaceGuard::none(),
            })
        };
        let e = self.entry(block);
        if is_allocated(e) {
            return in_place(e);
        }
        let mut st = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let e = self.entry(block);
            if is_allocated(e) {
                return in_place(e);
            }
            if !st.inflight.contains(block) {
                break;
            }
            st = Waiters::wait(&self.cv, st, |s| &mut s.waiters);
        }
        let index = match st.free.pop() {
            Some(i) => i,
            None => {
                let Some(h) = st.header.as_mut() else {
                    return Err(NoSpace::BlockTable("vdi").into());
                };
                let index = h.blocks_allocated;
                if index >= h.blocks_in_image {
                    return Err(NoSpace::BlockTable("vdi").into());
                }
                h.blocks_allocated += 1;
                index
            }
        };
        st.inflight.insert(block, block + 1);
        drop(st);
        let zero = Mapping::Zero { host: None };
        let start = block * bs;
        Ok(WriteTarget::Allocate(Allocation {
            guest: GuestOffset(start),
            len: bs,
            store: Store::Data,
            host: HostOffset(self.geo.offset_data as u64 + index as u64 * bs),
            head: Cow {
                guest: GuestOffset(start),
                len: in_block,
                source: zero,
            },
            tail: Cow {
                guest: GuestOffset(g + n),
                len: bs - in_block - n,
                source: zero,
            },
            token: block,
        }))
    }

    /// Header (with the new block count) durable with the data, then the map entry.
    fn commit(&self, a: Allocation) -> Result<()> {
        let block = a.token;
        let index = ((a.host.get() - self.geo.offset_data as u64) / self.bs()) as u32;
        let mut st = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        let r = (|| -> Result<()> {
            let head = st.header.as_ref().map(|h| (h.encode(), h.blocks_allocated));
            if let Some((bytes, n)) = head {
                self.storage.write_at(&bytes, 0)?;
                st.disk_count = n;
            }
            self.storage.flush()?;
            let off = self.geo.offset_bmap as u64 + block * 4;
            self.storage.write_at(&index.to_le_bytes(), off)?;
            Ok(())
        })();
        if r.is_ok() {
            let mut t = self.bmap.write().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = t.get_mut(block as usize) {
                *slot = index;
            }
        }
        // On error, whether the entry reached the disk is unknown: the block is not
        // handed out again.
        st.inflight.remove(block, block + 1);
        st.waiters.wake(&self.cv);
        r
    }

    /// The reserved block goes back to the free list (it is written whole before any
    /// entry names it, so what the failed write left there is never read).
    fn abort(&self, a: Allocation) {
        let index = ((a.host.get() - self.geo.offset_data as u64) / self.bs()) as u32;
        let mut st = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        st.free.push(index);
        st.inflight.remove(a.token, a.token + 1);
        st.waiters.wake(&self.cv);
    }
}
