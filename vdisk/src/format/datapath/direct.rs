//! Direct ranges ([`DirectRange`]) through a [`Mapper`]: a guest range a front-end can
//! transfer itself, asynchronously, because it is one allocated host run.
//!
//! The lookups are the ones the synchronous data path makes (`map`, then for a write
//! `prepare_write`), so the ordering rules are the same: a write gets the driver's
//! in-place guard, and an allocating write is never done this way (the driver orders
//! overlapping allocations in the ordinary path).

use crate::format::mapping::{
    DirectRange, GuestOffset, InPlaceGuard, Mapper, Mapping, WriteTarget,
};

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
    let run = m.map(guest, len).ok()?;
    let Mapping::Data {
        store,
        host,
        in_place,
    } = run.mapping
    else {
        return None;
    };
    if run.len < len {
        return None;
    }
    if !write {
        let fd = m.store(store).direct_fd(host.get(), len, false)?;
        return Some(DirectRange::new(fd, host.get(), len, InPlaceGuard::none()));
    }
    if !in_place {
        // Shared with a snapshot: the write allocates.
        return None;
    }
    match m.prepare_write(guest, len).ok()? {
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
        WriteTarget::Allocate(a) => {
            // The mapping changed since `map` (a concurrent discard): nothing was
            // written, give the clusters back and let the ordinary path allocate.
            m.abort(a);
            None
        }
    }
}
