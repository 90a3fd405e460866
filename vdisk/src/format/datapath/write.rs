//! Guest writes through a [`Mapper`]: in place behind the driver's guard, or into a new
//! allocation whose copy-on-write head and tail go down with the guest bytes in ONE
//! vectored write, then commit (or abort on an I/O error).
//!
//! Crash rules are the driver's: `commit` is called only once the data write returned,
//! so the driver can make the data durable (its barrier) before linking the mapping.
//! Ordering of overlapping allocations is the driver's too (`prepare_write` waits).

use super::iov::{total, with_pieces};
use super::read::read_source;
use crate::crypto::{DataCipher, SECTOR_SIZE};
use crate::error::{Error, Invalid, Result};
use crate::format::mapping::{Allocation, Cow, GuestOffset, Mapper, Mapping, Store, WriteTarget};
use crate::storage::{BlkEvent, Storage};
use std::io::{IoSlice, IoSliceMut};

/// Copy-on-write regions up to this size (head and tail together) are built in memory
/// and written with the data in one call; larger ones (QED's 64 MiB clusters) are filled
/// a bounded piece at a time. The default of [`Mapper::cow_buffer_limit`].
pub const MAX_COW_BUFFER: u64 = 4 << 20;

/// Writes `bufs` (consecutive guest bytes) at guest `offset`. The range must lie inside
/// the guest size and the image must be writable (the driver's entry point checks).
pub fn write_vectored<M: Mapper + ?Sized>(m: &M, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
    let Some(c) = m.data_cipher() else {
        return write_plain(m, bufs, offset);
    };
    let total = total(bufs);
    let end = offset + total;
    if offset.is_multiple_of(SECTOR_SIZE) && end.is_multiple_of(SECTOR_SIZE) {
        let _shared = c.rmw.read().unwrap_or_else(|p| p.into_inner());
        return write_plain(m, bufs, offset);
    }
    // Partial sectors: read the whole sectors (decrypted), patch, write them back.
    // A sector reaching past the guest size (an unaligned size) is cut there; past
    // the disk (VM state) nothing is cut.
    let _alone = c.rmw.write().unwrap_or_else(|p| p.into_inner());
    let size = m.guest_size();
    let a = offset / SECTOR_SIZE * SECTOR_SIZE;
    let e = end.div_ceil(SECTOR_SIZE).saturating_mul(SECTOR_SIZE);
    let e = if end <= size { e.min(size) } else { e };
    let mut buf = vec![0u8; (e - a) as usize];
    let first_end = (a + SECTOR_SIZE).min(e);
    if offset > a || end < first_end {
        let n = (first_end - a) as usize;
        super::read::read_vectored(m, &mut [IoSliceMut::new(&mut buf[..n])], a)?;
    }
    let last = (e - 1) / SECTOR_SIZE * SECTOR_SIZE;
    if last > a && end < e {
        let at = (last - a) as usize;
        super::read::read_vectored(m, &mut [IoSliceMut::new(&mut buf[at..])], last)?;
    }
    let mut at = (offset - a) as usize;
    for b in bufs {
        buf[at..at + b.len()].copy_from_slice(b);
        at += b.len();
    }
    write_plain(m, &[IoSlice::new(&buf)], a)
}

/// [`write_vectored`] once the request is whole sectors (or the image unencrypted).
fn write_plain<M: Mapper + ?Sized>(m: &M, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
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
                m.store(store).event(BlkEvent::WriteAio);
                let r = match m.data_cipher() {
                    None => with_pieces(bufs, pos, len, &[], &[], |p| {
                        m.store(store).write_vectored_at(p, host.get())
                    })
                    .map_err(Error::from),
                    Some(c) => {
                        write_encrypted(m, c, bufs, pos, len, &[], &[], guest, store, host.get())
                    }
                };
                drop(guard);
                r?;
                pos += len;
            }
            WriteTarget::Allocate(a) => {
                let n = a.data_len();
                let bad = n == 0 || n > want || a.data_guest() != guest;
                // An error return (or a panic) before the commit drops `pending`,
                // which aborts the allocation.
                let mut pending = Pending { m, alloc: Some(a) };
                if bad {
                    return Err(bad_target(guest, n, want));
                }
                if let Some(a) = &pending.alloc {
                    write_allocation(m, bufs, pos, a)?;
                }
                if let Some(a) = pending.alloc.take() {
                    m.commit(a)?;
                }
                pos += n;
            }
        }
    }
    Ok(())
}

/// An allocation between `prepare_write` and `commit`: dropped still holding it (on an
/// error return, or while unwinding from a panic) it is aborted, so its clusters leave
/// the driver's in-flight list and later requests for them do not wait forever.
struct Pending<'m, M: Mapper + ?Sized> {
    m: &'m M,
    alloc: Option<Allocation>,
}

impl<M: Mapper + ?Sized> Drop for Pending<'_, M> {
    fn drop(&mut self) {
        if let Some(a) = self.alloc.take() {
            self.m.abort(a);
        }
    }
}

fn bad_target(guest: GuestOffset, len: u64, want: u64) -> Error {
    Invalid::BadWriteTarget {
        guest: guest.0,
        len,
        want,
    }
    .into()
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
    let cow = a.head.len + a.tail.len > 0;
    if cow {
        st.event(BlkEvent::CowRead);
    }
    if let Some(c) = m.data_cipher() {
        // Encrypted: head, data and tail are encrypted together in one buffer (COW
        // sources were read as plaintext), whatever their size.
        let head = cow_bytes(m, &a.head)?;
        let tail = cow_bytes(m, &a.tail)?;
        return write_encrypted(
            m,
            c,
            bufs,
            pos,
            n,
            &head,
            &tail,
            a.head.guest,
            a.store,
            a.host.get(),
        );
    }
    if (a.head.len > 0 || a.tail.len > 0)
        && cow_is_zero(m, &a.head)
        && cow_is_zero(m, &a.tail)
        && st.zero_fresh(a.host.get(), a.head.len + n + a.tail.len)?
    {
        // The COW regions read as zeroes and the storage made the new run read as
        // zeroes without writing any (fresh space past the end of the file reserved,
        // or a zero-range fallocate): only the guest's bytes go down, announced as
        // QEMU announces every guest data write (blkdebug breaks and rules on it).
        st.event(BlkEvent::WriteAio);
        with_pieces(bufs, pos, n, &[], &[], |p| {
            st.write_vectored_at(p, a.host.get() + a.head.len)
        })?;
        return Ok(());
    }
    if a.head.len + a.tail.len <= m.cow_buffer_limit() {
        let head = cow_bytes(m, &a.head)?;
        let tail = cow_bytes(m, &a.tail)?;
        // Merged with its COW the data goes out as QEMU's merged COW write.
        st.event(if cow {
            BlkEvent::CowWrite
        } else {
            BlkEvent::WriteAio
        });
        with_pieces(bufs, pos, n, &head, &tail, |p| {
            st.write_vectored_at(p, a.host.get())
        })?;
        return Ok(());
    }
    st.event(BlkEvent::CowWrite);
    fill(m, &**st, a.head, a.host.get())?;
    st.event(BlkEvent::WriteAio);
    with_pieces(bufs, pos, n, &[], &[], |p| {
        st.write_vectored_at(p, a.host.get() + a.head.len)
    })?;
    fill(m, &**st, a.tail, a.host.get() + a.head.len + n)
}

/// Gathers `head`, bytes `[pos, pos + len)` of `bufs` and `tail` into one buffer,
/// encrypts it (its first byte is guest `guest`, host `host`) and writes it at `host`.
#[allow(clippy::too_many_arguments)]
fn write_encrypted<M: Mapper + ?Sized>(
    m: &M,
    c: &DataCipher,
    bufs: &[IoSlice<'_>],
    pos: u64,
    len: u64,
    head: &[u8],
    tail: &[u8],
    guest: GuestOffset,
    store: Store,
    host: u64,
) -> Result<()> {
    let mut buf = Vec::with_capacity(head.len() + len as usize + tail.len());
    buf.extend_from_slice(head);
    with_pieces(bufs, pos, len, &[], &[], |p| {
        for piece in p {
            buf.extend_from_slice(piece);
        }
    });
    buf.extend_from_slice(tail);
    c.cipher.encrypt(c.sector(guest.get(), host), &mut buf)?;
    m.store(store).write_at(&buf, host)?;
    Ok(())
}

/// Whether a COW region reads as zeroes without looking at data: an empty region, a
/// zero mapping, or an unallocated one with no backing bytes behind it.
fn cow_is_zero<M: Mapper + ?Sized>(m: &M, c: &Cow) -> bool {
    c.len == 0
        || match c.source {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => m.backing_image().is_none_or(|b| c.guest.get() >= b.size()),
            _ => false,
        }
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

#[cfg(test)]
mod tests {
    //! The generic path against a minimal mapper: one host cluster per guest cluster,
    //! allocated on first write, clusters large enough (8 MiB) that the COW regions
    //! take the bounded-fill path.
    use super::*;
    use crate::format::mapping::{HostOffset, InPlaceGuard, Run, Store};
    use crate::format::raw::Raw;
    use crate::format::{datapath, Driver, DriverOptions};
    use crate::storage::MemStorage;
    use std::io::IoSliceMut;
    use std::sync::{Arc, Mutex};

    const CS: u64 = 8 << 20;

    #[derive(Debug)]
    struct Mock {
        st: Arc<dyn Storage>,
        backing: Option<Arc<dyn Driver>>,
        table: Mutex<(Vec<Option<u64>>, u64)>,
        size: u64,
        aborted: Mutex<Vec<u64>>,
    }

    impl Mapper for Mock {
        fn guest_size(&self) -> u64 {
            self.size
        }
        fn store(&self, _: Store) -> &Arc<dyn Storage> {
            &self.st
        }
        fn backing_image(&self) -> Option<&Arc<dyn Driver>> {
            self.backing.as_ref()
        }
        fn map(&self, guest: GuestOffset, len: u64) -> Result<Run> {
            let c = (guest.get() / CS) as usize;
            let in_off = guest.in_cluster(CS);
            let len = (CS - in_off).min(len);
            let mapping = match self.table.lock().unwrap().0[c] {
                Some(h) => Mapping::Data {
                    store: Store::Data,
                    host: HostOffset(h + in_off),
                    in_place: true,
                },
                None => Mapping::Unallocated,
            };
            Ok(Run { len, mapping })
        }
        fn prepare_write(&self, guest: GuestOffset, len: u64) -> Result<WriteTarget<'_>> {
            let c = guest.get() / CS;
            let in_off = guest.in_cluster(CS);
            let n = (CS - in_off).min(len);
            let mut t = self.table.lock().unwrap();
            if let Some(h) = t.0[c as usize] {
                return Ok(WriteTarget::InPlace {
                    store: Store::Data,
                    host: HostOffset(h + in_off),
                    len: n,
                    guard: InPlaceGuard::none(),
                });
            }
            let host = t.1;
            t.1 += CS;
            let start = GuestOffset(c * CS);
            Ok(WriteTarget::Allocate(Allocation {
                guest: start,
                len: CS,
                store: Store::Data,
                host: HostOffset(host),
                head: Cow {
                    guest: start,
                    len: in_off,
                    source: Mapping::Unallocated,
                },
                tail: Cow {
                    guest: guest.add(n),
                    len: CS - in_off - n,
                    source: Mapping::Unallocated,
                },
                token: c,
            }))
        }
        fn commit(&self, a: Allocation) -> Result<()> {
            self.table.lock().unwrap().0[a.token as usize] = Some(a.host.get());
            Ok(())
        }
        fn abort(&self, a: Allocation) {
            self.aborted.lock().unwrap().push(a.token);
        }
    }

    fn mock(backing: Option<Vec<u8>>, size: u64) -> Mock {
        let backing = backing.map(|b| {
            let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
            st.write_at(&b, 0).unwrap();
            Arc::new(Raw::open(st, &DriverOptions::default()).unwrap()) as Arc<dyn Driver>
        });
        Mock {
            st: Arc::new(MemStorage::new()),
            backing,
            table: Mutex::new((vec![None; size.div_ceil(CS) as usize], 0)),
            size,
            aborted: Mutex::new(Vec::new()),
        }
    }

    fn read_all(m: &Mock) -> Vec<u8> {
        let mut out = vec![0xeeu8; m.size as usize];
        let (a, b) = out.split_at_mut(12345);
        datapath::read_vectored(m, &mut [IoSliceMut::new(a), IoSliceMut::new(b)], 0).unwrap();
        out
    }

    #[test]
    fn large_cow_from_backing_is_filled_in_pieces() {
        // The backing image is shorter than the guest: COW past its end is zeroes.
        let size = 3 * CS;
        let base: Vec<u8> = (0..(CS + CS / 2) as usize)
            .map(|i| (i % 253) as u8 + 1)
            .collect();
        let m = mock(Some(base.clone()), size);
        let mut model = base.clone();
        model.resize(size as usize, 0);
        assert_eq!(read_all(&m), model);
        let data = [0x5au8; 100];
        let off = CS + (3 << 20);
        write_vectored(
            &m,
            &[IoSlice::new(&data[..40]), IoSlice::new(&data[40..])],
            off,
        )
        .unwrap();
        model[off as usize..off as usize + 100].fill(0x5a);
        assert_eq!(read_all(&m), model);
        // A write across two clusters: one in place, one allocated.
        let data2 = vec![0x77u8; 4 << 20];
        let off2 = 2 * CS - (1 << 20);
        write_vectored(&m, &[IoSlice::new(&data2)], off2).unwrap();
        model[off2 as usize..off2 as usize + data2.len()].fill(0x77);
        assert_eq!(read_all(&m), model);
    }

    #[test]
    fn cow_without_backing_reads_zeroes() {
        let m = mock(None, CS);
        write_vectored(&m, &[IoSlice::new(b"abc")], 5).unwrap();
        let got = read_all(&m);
        assert_eq!(&got[..8], b"\0\0\0\0\0abc");
        assert!(got[8..].iter().all(|&b| b == 0));
    }

    /// A storage whose writes fail (`panic: false`) or panic.
    #[derive(Debug)]
    struct BadWrites {
        panic: bool,
    }

    impl Storage for BadWrites {
        fn read_at(&self, buf: &mut [u8], _: u64) -> crate::storage::StorageResult<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _: &[u8], offset: u64) -> crate::storage::StorageResult<()> {
            if self.panic {
                panic!("test storage panics on write");
            }
            Err(crate::storage::StorageError::op(
                crate::storage::StorageOp::Write,
                "test",
                Some(offset),
                std::io::Error::from_raw_os_error(libc::EIO),
            ))
        }
        fn flush(&self) -> crate::storage::StorageResult<()> {
            Ok(())
        }
        fn len(&self) -> crate::storage::StorageResult<u64> {
            Ok(0)
        }
        fn set_len(&self, _: u64) -> crate::storage::StorageResult<()> {
            Ok(())
        }
        fn punch_hole(&self, _: u64, _: u64) -> crate::storage::StorageResult<()> {
            Ok(())
        }
        fn allocate(&self, _: u64, _: u64) -> crate::storage::StorageResult<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_or_panicking_data_writes_abort_the_allocation() {
        for panic in [false, true] {
            let mut m = mock(None, 2 * CS);
            m.st = Arc::new(BadWrites { panic });
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write_vectored(&m, &[IoSlice::new(b"abc")], CS + 5)
            }));
            match r {
                Ok(res) => assert!(!panic && res.is_err()),
                Err(_) => assert!(panic),
            }
            // Aborted exactly once, never committed.
            assert_eq!(*m.aborted.lock().unwrap(), vec![1]);
            assert_eq!(m.table.lock().unwrap().0[1], None);
        }
    }
}
