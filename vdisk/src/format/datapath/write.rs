//! Guest writes through a [`Mapper`]: in place behind the driver's guard, or into a new
//! allocation whose copy-on-write head and tail go down with the guest bytes in ONE
//! vectored write, then commit (or abort on an I/O error).
//!
//! Crash rules are the driver's: `commit` is called only once the data write returned,
//! so the driver can make the data durable (its barrier) before linking the mapping.
//! Ordering of overlapping allocations is the driver's too (`prepare_write` waits).

use super::iov::{total, with_pieces};
use super::read::read_source;
use crate::error::{Error, Result};
use crate::format::mapping::{Allocation, Cow, GuestOffset, Mapper, Mapping, WriteTarget};
use crate::storage::Storage;
use std::io::IoSlice;

/// Copy-on-write regions up to this size (head and tail together) are built in memory
/// and written with the data in one call; larger ones (QED's 64 MiB clusters) are filled
/// a bounded piece at a time. The default of [`Mapper::cow_buffer_limit`].
pub const MAX_COW_BUFFER: u64 = 4 << 20;

/// Writes `bufs` (consecutive guest bytes) at guest `offset`. The range must lie inside
/// the guest size and the image must be writable (the driver's entry point checks).
pub fn write_vectored<M: Mapper + ?Sized>(m: &M, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
    let total = total(bufs);
    let mut pos = 0u64;
    while pos < total {
        let guest = GuestOffset(offset + pos);
        let want = total - pos;
        match m.prepare_write(guest, want)? {
            WriteTarget::InPlace {
                store,
                host,
                len,
                guard,
            } => {
                if len == 0 || len > want {
                    return Err(bad_target(guest, len, want));
                }
                let r = with_pieces(bufs, pos, len, &[], &[], |p| {
                    m.store(store).write_vectored_at(p, host.get())
                });
                drop(guard);
                r?;
                pos += len;
            }
            WriteTarget::Allocate(a) => {
                let n = a.data_len();
                if n == 0 || n > want || a.data_guest() != guest {
                    let e = bad_target(guest, n, want);
                    m.abort(a);
                    return Err(e);
                }
                match write_allocation(m, bufs, pos, &a) {
                    Ok(()) => m.commit(a)?,
                    Err(e) => {
                        m.abort(a);
                        return Err(e);
                    }
                }
                pos += n;
            }
        }
    }
    Ok(())
}

fn bad_target(guest: GuestOffset, len: u64, want: u64) -> Error {
    Error::invalid(format!(
        "format driver returned a write target of {len} bytes at {guest} for a request of {want}"
    ))
}

/// Writes the allocation's COW head, the request's bytes `[pos, pos + data_len)` of
/// `bufs`, and its COW tail to the new host run.
fn write_allocation<M: Mapper + ?Sized>(
    m: &M,
    bufs: &[IoSlice<'_>],
    pos: u64,
    a: &Allocation,
) -> Result<()> {
    let st = m.store(a.store);
    let n = a.data_len();
    if a.head.len + a.tail.len <= m.cow_buffer_limit() {
        let head = cow_bytes(m, &a.head)?;
        let tail = cow_bytes(m, &a.tail)?;
        with_pieces(bufs, pos, n, &head, &tail, |p| {
            st.write_vectored_at(p, a.host.get())
        })?;
        return Ok(());
    }
    fill(m, &**st, a.head, a.host.get())?;
    with_pieces(bufs, pos, n, &[], &[], |p| {
        st.write_vectored_at(p, a.host.get() + a.head.len)
    })?;
    fill(m, &**st, a.tail, a.host.get() + a.head.len + n)
}

/// The bytes of a COW region, in memory.
fn cow_bytes<M: Mapper + ?Sized>(m: &M, c: &Cow) -> Result<Vec<u8>> {
    let mut v = vec![0u8; c.len as usize];
    if c.len > 0 && c.source != (Mapping::Zero { host: None }) {
        read_source(m, c.source, c.guest, &mut v)?;
    }
    Ok(v)
}

/// Fills a large COW region at `host` of `st` a bounded piece at a time; zero sources
/// become storage zero writes.
fn fill<M: Mapper + ?Sized>(m: &M, st: &dyn Storage, c: Cow, host: u64) -> Result<()> {
    let mut buf = Vec::new();
    let mut done = 0u64;
    while done < c.len {
        let n = (c.len - done).min(m.cow_buffer_limit().max(1));
        let src = c.source.advance(done);
        let g = c.guest.add(done);
        let zero = match src {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => {
                g.get() >= m.guest_size() || m.backing_image().is_none_or(|b| g.get() >= b.size())
            }
            _ => false,
        };
        if zero {
            st.write_zeroes(host + done, n)?;
        } else {
            buf.resize(n as usize, 0);
            read_source(m, src, g, &mut buf)?;
            st.write_at(&buf, host + done)?;
        }
        done += n;
    }
    Ok(())
}
