//! The VHD side of the mapping contract: runs (fixed: the guest offset is the host
//! offset; dynamic: through the BAT), in-place targets, and block allocation with the
//! crash order described in the module documentation of [`super`].

use super::bat::UNALLOCATED;
use super::{Dynamic, Vpc};
const FOOTER_LEN: u64 = super::footer::FOOTER_LEN as u64;
use crate::error::{NoSpace, Result};
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

impl Dynamic {
    fn bs(&self) -> u64 {
        self.header.block_size as u64
    }

    fn entry(&self, block: u64) -> u32 {
        let t = self.bat.read().unwrap_or_else(|p| p.into_inner());
        t.get(block as usize).copied().unwrap_or(UNALLOCATED)
    }

    /// Host offset of the data of block `block` (allocated at BAT value `e`).
    fn data_start(&self, e: u32) -> u64 {
        e as u64 * 512 + self.bitmap
    }
}

/// The run at `guest` (at most `len` bytes, inside the guest size).
pub(super) fn map_range(v: &Vpc, guest: u64, len: u64) -> Result<Run> {
    let Some(d) = &v.dynamic else {
        return Ok(Run {
            len,
            mapping: Mapping::Data {
                store: Store::Data,
                host: HostOffset(guest),
                in_place: true,
            },
        });
    };
    let bs = d.bs();
    let block = guest / bs;
    let in_block = guest % bs;
    let first = (bs - in_block).min(len);
    let e = d.entry(block);
    if e != UNALLOCATED {
        return Ok(Run {
            len: first,
            mapping: Mapping::Data {
                store: Store::Data,
                host: HostOffset(d.data_start(e) + in_block),
                in_place: true,
            },
        });
    }
    // Unallocated blocks read as zeroes (QEMU reports them as zero, not as "read the
    // backing file": vpc has none); consecutive ones make one run.
    let mut n = first;
    let mut b = block + 1;
    while n < len && d.entry(b) == UNALLOCATED {
        n = (n + bs).min(len);
        b += 1;
    }
    Ok(Run {
        len: n,
        mapping: Mapping::Zero { host: None },
    })
}

/// Zero writes: allocated bytes are zeroed in place; unallocated blocks already read
/// as zeroes and stay unallocated.
pub(super) fn write_zeroes(v: &Vpc, offset: u64, len: u64) -> Result<()> {
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

impl Mapper for Vpc {
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
        let Some(d) = &self.dynamic else {
            return Ok(WriteTarget::InPlace {
                store: Store::Data,
                host: HostOffset(g),
                len,
                guard: InPlaceGuard::none(),
            });
        };
        let bs = d.bs();
        let block = g / bs;
        let in_block = g % bs;
        let n = (bs - in_block).min(len);
        let in_place = |e: u32| WriteTarget::InPlace {
            store: Store::Data,
            host: HostOffset(d.data_start(e) + in_block),
            len: n,
            guard: InPlaceGuard::none(),
        };
        let e = d.entry(block);
        if e != UNALLOCATED {
            return Ok(in_place(e));
        }
        let mut st = d.alloc.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let e = d.entry(block);
            if e != UNALLOCATED {
                return Ok(in_place(e));
            }
            if !st.inflight.contains(block) {
                break;
            }
            st = Waiters::wait(&d.cv, st, |s| &mut s.waiters);
        }
        let start = st.free_offset;
        let data = start + d.bitmap;
        let next = data + bs;
        // BAT entries are sector numbers in 32 bits.
        if start / 512 >= UNALLOCATED as u64 {
            return Err(NoSpace::BlockTable("vpc").into());
        }
        // The new footer first (the file keeps ending in one), then the bitmap over the
        // old footer.
        self.storage.write_at(&self.footer, next)?;
        self.storage
            .write_at(&vec![0xff; d.bitmap as usize], start)?;
        st.free_offset = next;
        // Where the file may hold stale bytes, the block is written whole: below the
        // stale mark, and for blocks under 4 KiB, which have no bitmap sector to cover
        // the old footer.
        let whole = start < st.stale_end || d.bitmap < FOOTER_LEN;
        st.inflight.insert(block, block + 1);
        drop(st);
        let zero = Mapping::Zero { host: None };
        let block_guest = block * bs;
        let (ag, alen, host) = if whole {
            (block_guest, bs, data)
        } else {
            (g, n, data + in_block)
        };
        Ok(WriteTarget::Allocate(Allocation {
            guest: GuestOffset(ag),
            len: alen,
            store: Store::Data,
            host: HostOffset(host),
            head: Cow {
                guest: GuestOffset(ag),
                len: g - ag,
                source: zero,
            },
            tail: Cow {
                guest: GuestOffset(g + n),
                len: ag + alen - (g + n),
                source: zero,
            },
            token: block,
        }))
    }

    /// Data, bitmap and footer durable, then the BAT entry.
    fn commit(&self, a: Allocation) -> Result<()> {
        let Some(d) = &self.dynamic else {
            return Ok(());
        };
        let block = a.token;
        let e = ((a.host.get() - a.guest.get() % d.bs() - d.bitmap) / 512) as u32;
        let r = self.storage.flush().map_err(Into::into).and_then(|()| {
            let off = d.header.table_offset + block * 4;
            self.storage.write_at(&e.to_be_bytes(), off)?;
            Ok(())
        });
        if r.is_ok() {
            let mut t = d.bat.write().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = t.get_mut(block as usize) {
                *slot = e;
            }
        }
        let mut st = d.alloc.lock().unwrap_or_else(|p| p.into_inner());
        st.inflight.remove(block, block + 1);
        st.waiters.wake(&d.cv);
        r
    }

    /// The block stays unreferenced (a leak); its space is not reused this session.
    fn abort(&self, a: Allocation) {
        let Some(d) = &self.dynamic else {
            return;
        };
        let mut st = d.alloc.lock().unwrap_or_else(|p| p.into_inner());
        st.inflight.remove(a.token, a.token + 1);
        st.waiters.wake(&d.cv);
    }
}
