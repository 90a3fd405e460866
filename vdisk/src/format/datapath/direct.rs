//! Direct ranges ([`DirectRange`]) through a [`Mapper`]: a guest range a front-end can
//! transfer itself, asynchronously, because it is one allocated host run.
//!
//! The lookups are the ones the synchronous data path makes (`map` for a read,
//! `prepare_write` restricted to in-place targets for a write), so the ordering rules
//! are the same: a write gets the driver's in-place guard, and an allocating write is
//! never done this way (the driver orders overlapping allocations in the ordinary
//! path).

use crate::error::Result;
use crate::format::mapping::{
    DirectRange, GuestOffset, InPlaceGuard, Mapper, Mapping, WriteTarget,
};

/// [`direct`] behind [`crate::format::direct_gate`] (inside the guest size; a write
/// only where `writable`, the driver's answer for writes, is `Ok`). Whatever else a
/// transfer needs held (QED's quiesce gate) is the driver's to add.
pub fn gated<M: Mapper + ?Sized>(
    m: &M,
    writable: Result<()>,
    offset: u64,
    len: u64,
    write: bool,
) -> Option<DirectRange<'_>> {
    if !crate::format::direct_gate(write, writable, offset, len, m.guest_size()) {
        return None;
    }
    direct(m, offset, len, write)
}

/// The direct range for `[offset, offset + len)` (inside the guest size, checked by the
/// driver), or `None` when any part of it needs the ordinary path.
pub fn direct<M: Mapper + ?Sized>(
    m: &M,
    offset: u64,
    len: u64,
    write: bool,
) -> Option<DirectRange<'_>> {
    if len == 0 || m.data_cipher().is_some() {
        return None;
    }
    let guest = GuestOffset(offset);
    if write {
        return match m.prepare_in_place(guest, len).ok()?? {
            WriteTarget::InPlace {
                store,
                host,
                len: n,
                guard,
            } if n == len => {
                let fd = m.store(store).direct_fd(host.get(), len, true)?;
                Some(DirectRange::new(fd, host.get(), len, guard))
            }
            WriteTarget::InPlace { .. } => None,
            // Not what prepare_in_place returns; nothing is written through it.
            WriteTarget::Allocate(a) => {
                m.abort(a);
                None
            }
        };
    }
    let run = m.map(guest, len).ok()?;
    match run.mapping {
        Mapping::Data { store, host, .. } if run.len == len => {
            let fd = m.store(store).direct_fd(host.get(), len, false)?;
            Some(DirectRange::new(fd, host.get(), len, InPlaceGuard::none()))
        }
        _ => None,
    }
}

/// The default of [`Mapper::prepare_in_place`]: `map` says whether the start of the
/// range is data that can be overwritten in place, and only then is `prepare_write`
/// asked (an allocation it still returns, the mapping having changed meanwhile, is
/// given back: nothing was written to it).
pub fn in_place_by_map<M: Mapper + ?Sized>(
    m: &M,
    guest: GuestOffset,
    len: u64,
) -> Result<Option<WriteTarget<'_>>> {
    let run = m.map(guest, len)?;
    if !matches!(run.mapping, Mapping::Data { in_place: true, .. }) {
        // A hole, zeroes, compressed, or shared with a snapshot: the write allocates.
        return Ok(None);
    }
    match m.prepare_write(guest, len)? {
        t @ WriteTarget::InPlace { .. } => Ok(Some(t)),
        WriteTarget::Allocate(a) => {
            m.abort(a);
            Ok(None)
        }
    }
}
