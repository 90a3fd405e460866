//! A host file: pread/pwrite, fdatasync, fallocate, SEEK_DATA/SEEK_HOLE, QEMU locks.

use super::lock::{self, LockMode};
use super::options::{Node, SpecError, Value};
use super::pool;
use super::registry::{Protocol, ProtocolOpen};
use super::{AioMode, CacheMode, Storage, StorageError, StorageOp, StorageResult};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// How to open a [`FileStorage`].
#[derive(Clone, Debug)]
pub struct OpenFileOptions {
    /// Open without write access.
    pub read_only: bool,
    /// Host cache mode.
    pub cache: CacheMode,
    /// Image locks to take.
    pub lock: LockMode,
    /// Create the file (truncating it) instead of opening an existing one.
    pub create: bool,
}

impl Default for OpenFileOptions {
    fn default() -> Self {
        OpenFileOptions {
            read_only: false,
            cache: CacheMode::Writeback,
            lock: LockMode::for_open(false, false),
            create: false,
        }
    }
}

/// O_DIRECT needs buffers, offsets and lengths aligned; 4 KiB covers every device here.
const DIRECT_ALIGN: usize = pool::BUF_ALIGN;
/// Read-modify-write of unaligned O_DIRECT writes is serialised per stripe.
const RMW_STRIPES: usize = 64;

/// A host file used as image storage.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    cache: CacheMode,
    rmw: Vec<Mutex<()>>,
    /// O_DIRECT writes hold this shared; a padded write that must trim the file back
    /// to its intended end holds it exclusively, so reading the length, writing and
    /// trimming cannot interleave with another write extending the file (which the
    /// trim would cut off).
    extend: RwLock<()>,
    /// Opened with `locking=off`: later [`Storage::relock`] requests take no locks.
    unlocked: bool,
    /// The protocol it was opened as (`file`, or `host_device` for a device).
    protocol: &'static str,
    /// An upper bound of the file's length: set from fstat at open and by our own
    /// truncates, raised before every write or fallocate that may extend the file. The
    /// hot paths decide on it instead of an fstat per request (an O_DIRECT padded
    /// write, a fresh allocation past the end that needs no zeroing).
    known_len: AtomicU64,
    /// Whether nobody else can grow the file: opened writable with locks that refuse
    /// other writers and resizers. Only then does [`Self::known_len`] bound the length
    /// from above, which [`Storage::zero_fresh`] relies on.
    len_trusted: AtomicBool,
    /// A regular file opened writable: the length bound can be trusted once the locks
    /// exclude other writers.
    may_trust: bool,
    /// The io_uring engine (`aio=io_uring` where the kernel allows it); `None`: plain
    /// system calls on the caller's thread (the threaded engine).
    uring: Option<super::uring::Uring>,
    /// Buffered, writable and flushed: sequential streams get their writeback started
    /// early, so a flush after a bulk write does not wait for all of it (see
    /// [`super::writeback`]).
    ahead: Option<super::writeback::WritebackAhead>,
}

/// Holds [`FileStorage::extend`] for the length of one direct write.
enum ExtendGuard<'a> {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] std::sync::RwLockWriteGuard<'a, ()>),
}

/// Whether O_DIRECT can take these buffers in one vectored call: the offset, every
/// buffer's address and every length aligned.
fn direct_iov_ok(mut bufs: impl Iterator<Item = (*const u8, usize)>, offset: u64) -> bool {
    aligned(offset)
        && bufs.all(|(p, n)| (p as usize).is_multiple_of(DIRECT_ALIGN) && aligned(n as u64))
}

fn aligned(x: u64) -> bool {
    x.is_multiple_of(DIRECT_ALIGN as u64)
}

impl FileStorage {
    /// Opens (or creates) `path`.
    pub fn open(path: &Path, opts: &OpenFileOptions) -> StorageResult<FileStorage> {
        let name = path.display().to_string();
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.create {
            // Truncated only once the lock is ours: an image in use elsewhere must
            // survive a refused create.
            oo.create(true);
        }
        let mut flags = libc::O_CLOEXEC;
        if opts.cache.direct() {
            flags |= libc::O_DIRECT;
        }
        if opts.cache.write_through() && !opts.read_only {
            flags |= libc::O_DSYNC;
        }
        oo.custom_flags(flags);
        let file = oo
            .open(path)
            .map_err(|e| StorageError::op(StorageOp::Open, &name, None, e))?;
        lock::apply(file.as_raw_fd(), opts.lock, &name)?;
        if opts.create {
            file.set_len(0)
                .map_err(|e| StorageError::op(StorageOp::Truncate, &name, None, e))?;
        }
        let meta = file
            .metadata()
            .map_err(|e| StorageError::op(StorageOp::Stat, &name, None, e))?;
        let len = meta.len();
        // A device's st_size is 0: its length bound means nothing.
        let regular = meta.file_type().is_file();
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            cache: opts.cache,
            rmw: (0..RMW_STRIPES).map(|_| Mutex::new(())).collect(),
            extend: RwLock::new(()),
            unlocked: false,
            protocol: PROTOCOL.name,
            known_len: AtomicU64::new(len),
            len_trusted: AtomicBool::new(regular && !opts.read_only && excludes_writers(opts.lock)),
            may_trust: regular && !opts.read_only,
            uring: None,
            // O_DIRECT leaves nothing dirty; O_DSYNC writes through; cache=unsafe
            // never flushes, so writing back early would only add device writes.
            ahead: (!opts.read_only
                && !opts.cache.direct()
                && !opts.cache.write_through()
                && !opts.cache.ignore_flush())
            .then(Default::default),
        })
    }

    /// Applies the file protocol's creation hints to a file just created, as QEMU's
    /// file-posix does: `nocow` sets the no-copy-on-write attribute (btrfs; refused
    /// elsewhere, which is not an error), then a non-zero `extent_size_hint` is set as
    /// the file's extent size (XFS and ext4 keep it). Returns the extent hint's failure
    /// (the caller decides whether to warn: QEMU warns only when the hint was given).
    pub fn apply_create_hints(&self, nocow: bool, extent_size_hint: u64) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        if nocow {
            let mut attr: libc::c_int = 0;
            // SAFETY: FS_IOC_GETFLAGS/SETFLAGS read and write one int at the pointer,
            // which is valid for the duration of the calls.
            unsafe {
                if libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut attr) == 0 {
                    attr |= FS_NOCOW_FL;
                    libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &attr);
                }
            }
        }
        if extent_size_hint == 0 {
            return Ok(());
        }
        let extsize = u32::try_from(extent_size_hint)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut attr = FsXattr::default();
        // SAFETY: FS_IOC_FSGETXATTR/FSSETXATTR read and write a `struct fsxattr`, which
        // `FsXattr` is (repr(C), 28 bytes); the pointer is valid during each call.
        let r = unsafe {
            let mut r = libc::ioctl(fd, FS_IOC_FSGETXATTR, &mut attr);
            if r == 0 {
                attr.xflags |= FS_XFLAG_EXTSIZE;
                attr.extsize = extsize;
                r = libc::ioctl(fd, FS_IOC_FSSETXATTR, &attr);
            }
            r
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes this storage ignore lock changes (`locking=off`): it was opened without
    /// locks and stays so when the opener later adjusts the locks it wants.
    pub fn without_locking(mut self) -> FileStorage {
        self.unlocked = true;
        self.len_trusted.store(false, Ordering::Release);
        self
    }

    /// Runs data transfers and flushes on io_uring (QEMU's `aio=io_uring`) when the
    /// kernel allows it; keeps the threaded engine (plain system calls) when it refuses.
    /// Returns the storage and whether io_uring is in use.
    pub fn with_io_uring(mut self) -> (FileStorage, bool) {
        match super::uring::Uring::new(self.file.as_raw_fd()) {
            Ok(u) => {
                self.uring = Some(u);
                (self, true)
            }
            Err(e) => {
                tracing::debug!("io_uring refused ({e}): using the threaded engine");
                (self, false)
            }
        }
    }

    /// Whether requests go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.uring.is_some()
    }

    /// One `pread` (or its io_uring entry).
    fn read_some(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        match &self.uring {
            None => self.file.read_at(buf, offset),
            Some(u) => {
                let iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr() as *mut _,
                    iov_len: buf.len(),
                }];
                u.rw(false, &iov, offset)
            }
        }
    }

    /// One `pwrite` (or its io_uring entry).
    fn write_some(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
        match &self.uring {
            None => self.file.write_at(buf, offset),
            Some(u) => {
                let iov = [libc::iovec {
                    iov_base: buf.as_ptr() as *mut _,
                    iov_len: buf.len(),
                }];
                u.rw(true, &iov, offset)
            }
        }
    }

    /// The path the storage was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: impl Into<StorageOp>, offset: u64, e: std::io::Error) -> StorageError {
        StorageError::op(op.into(), self.path.display().to_string(), Some(offset), e)
    }

    /// Buffered (or fully aligned direct) read; zero-fills past EOF.
    fn pread_full(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_some(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(StorageOp::Read, offset + done as u64, e)),
            }
            if self.cache.direct() && done % DIRECT_ALIGN != 0 && done < buf.len() {
                // A short O_DIRECT read ends at EOF; anything after it is zero.
                buf[done..].fill(0);
                return Ok(());
            }
        }
        Ok(())
    }

    fn pwrite_full(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        self.note_end(offset + buf.len() as u64);
        let mut done = 0;
        while done < buf.len() {
            match self.write_some(&buf[done..], offset + done as u64) {
                Ok(0) => {
                    let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                    return Err(self.err(StorageOp::Write, offset + done as u64, e));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(StorageOp::Write, offset + done as u64, e)),
            }
        }
        Ok(())
    }

    /// After a buffered write: starts writeback of the settled part of a sequential
    /// stream. Only a hint to the kernel, so its failure is ignored (the flush that
    /// follows reports any real I/O error).
    fn wrote(&self, offset: u64, len: usize) {
        let Some((start, span)) = self
            .ahead
            .as_ref()
            .and_then(|a| a.wrote(offset, len as u64))
        else {
            return;
        };
        // SAFETY: sync_file_range reads no memory; the descriptor is ours and open.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start as libc::off64_t,
                span as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Raises the known length bound before a write or allocation reaching `end`
    /// (before, so a concurrent reader of the bound never sees it below the file).
    fn note_end(&self, end: u64) {
        self.known_len.fetch_max(end, Ordering::AcqRel);
    }

    /// The exact length (an fstat), which also refreshes the known bound.
    fn stat_len(&self) -> StorageResult<u64> {
        let len = self.file.metadata().map(|m| m.len()).map_err(|e| {
            StorageError::op(StorageOp::Stat, self.path.display().to_string(), None, e)
        })?;
        self.note_end(len);
        Ok(len)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            self.note_end(offset + len);
        }
        // SAFETY: plain syscall on an owned descriptor.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `op` (`preadv` or `pwritev`) over `iov` from `offset` until `total` bytes
    /// are done or it transfers nothing (end of file, for reads); returns the bytes done.
    /// The entries of `iov` must point into live slices the caller borrows (exclusively,
    /// for reads) for the whole call.
    fn iov_loop(
        &self,
        iov: &mut [libc::iovec],
        offset: u64,
        total: usize,
        what: StorageOp,
        op: unsafe extern "C" fn(
            libc::c_int,
            *const libc::iovec,
            libc::c_int,
            libc::off_t,
        ) -> libc::ssize_t,
    ) -> StorageResult<usize> {
        if matches!(what, StorageOp::Write) {
            self.note_end(offset + total as u64);
        }
        let mut done = 0usize;
        let mut first = 0usize;
        while done < total {
            let cnt = (iov.len() - first).min(1024);
            let at = offset + done as u64;
            let r = match &self.uring {
                Some(u) => match u.rw(
                    matches!(what, StorageOp::Write),
                    &iov[first..first + cnt],
                    at,
                ) {
                    Ok(n) => n as libc::ssize_t,
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(self.err(what, at, e));
                    }
                },
                // SAFETY: the entries point into live slices (see above); `cnt` of
                // them from `first` are in bounds.
                None => unsafe {
                    op(
                        self.file.as_raw_fd(),
                        iov[first..].as_ptr(),
                        cnt as i32,
                        at as libc::off_t,
                    )
                },
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.err(what, offset + done as u64, e));
            }
            if r == 0 {
                break;
            }
            let mut n = r as usize;
            done += n;
            while n > 0 && first < iov.len() {
                if n >= iov[first].iov_len {
                    n -= iov[first].iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same slice.
                    iov[first].iov_base =
                        unsafe { (iov[first].iov_base as *mut u8).add(n) } as *mut _;
                    iov[first].iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(done)
    }

    /// Whether the pieces together cover whole O_DIRECT blocks from an aligned offset
    /// and are small enough (4 MiB) to gather into one buffer.
    fn whole_blocks<B: std::ops::Deref<Target = [u8]>>(&self, bufs: &[B], offset: u64) -> bool {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        aligned(offset) && aligned(total) && total <= 4 << 20
    }

    fn direct_read(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        let start = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + buf.len() as u64).div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64;
        let mut bounce = pool::get((end - start) as usize);
        self.pread_full(&mut bounce, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn direct_write(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        let start = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + buf.len() as u64).div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64;
        let mut bounce = pool::get((end - start) as usize);
        let partial = start != offset || end != offset + buf.len() as u64;
        // Unaligned edges need read-modify-write; serialise it so two writers sharing an
        // edge block cannot lose each other's bytes. Both edge blocks count: one
        // writer's tail block can be the next writer's head block. Stripes are taken
        // in ascending order so two writers cannot deadlock.
        let head = (start / DIRECT_ALIGN as u64) as usize % RMW_STRIPES;
        let tail = ((end - DIRECT_ALIGN as u64) / DIRECT_ALIGN as u64) as usize % RMW_STRIPES;
        let lock = |i: usize| self.rmw[i].lock().unwrap_or_else(|p| p.into_inner());
        let _first = partial.then(|| lock(head.min(tail)));
        let _second = (partial && head != tail).then(|| lock(head.max(tail)));
        if partial {
            let b = &mut bounce[..];
            self.pread_full(&mut b[..DIRECT_ALIGN], start)?;
            let tail = b.len() - DIRECT_ALIGN;
            if tail > 0 {
                self.pread_full(&mut b[tail..], end - DIRECT_ALIGN as u64)?;
            }
        }
        let skip = (offset - start) as usize;
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        let new_end = offset + buf.len() as u64;
        // Files only grow under concurrent writers, so a padded end already inside the
        // file stays inside it; only a write padding past EOF needs the exclusive lock.
        // The known length is an upper bound of the file's (when others may grow the
        // file it can be low, which only sends us to the exact check below), so no
        // fstat is needed unless the padded end may lie past the end of the file.
        let may_trim = end > new_end && end > self.known_len.load(Ordering::Acquire);
        let _extend = if may_trim {
            ExtendGuard::Exclusive(self.extend.write().unwrap_or_else(|p| p.into_inner()))
        } else {
            ExtendGuard::Shared(self.extend.read().unwrap_or_else(|p| p.into_inner()))
        };
        let file_len = if may_trim { self.stat_len()? } else { 0 };
        self.pwrite_full(&bounce, start)?;
        if may_trim && end > file_len.max(new_end) {
            // The aligned write padded past the intended end of file: trim it back.
            self.file
                .set_len(file_len.max(new_end))
                .map_err(|e| self.err(StorageOp::Truncate, new_end, e))?;
            // Exclusive: nobody else is writing, so this is the length now.
            self.known_len
                .store(file_len.max(new_end), Ordering::Release);
        }
        Ok(())
    }
}

/// Whether these locks keep every other opener from writing or resizing the file.
fn excludes_writers(mode: LockMode) -> bool {
    use super::lock::Perm;
    match mode {
        LockMode::Off => false,
        LockMode::On { shared, .. } => shared.0 & (Perm::WRITE.0 | Perm::RESIZE.0) == 0,
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        if self.cache.direct()
            && !(aligned(offset)
                && aligned(buf.len() as u64)
                && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN))
        {
            return self.direct_read(buf, offset);
        }
        self.pread_full(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        if self.cache.direct()
            && !(aligned(offset)
                && aligned(buf.len() as u64)
                && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN))
        {
            return self.direct_write(buf, offset);
        }
        let _extend = self
            .cache
            .direct()
            .then(|| self.extend.read().unwrap_or_else(|p| p.into_inner()));
        self.pwrite_full(buf, offset)?;
        self.wrote(offset, buf.len());
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> StorageResult<()> {
        if self.cache.direct()
            && bufs.len() > 1
            && direct_iov_ok(bufs.iter().map(|b| (b.as_ptr(), b.len())), offset)
        {
            // One preadv for a whole guest request (a vhost-user or NBD read of many
            // pages); anything unusual (a short read at the end of the file) is redone
            // buffer by buffer below.
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let mut iov: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr() as *mut _,
                    iov_len: b.len(),
                })
                .collect();
            let r = self.iov_loop(&mut iov, offset, total, StorageOp::Read, libc::preadv);
            drop(iov);
            if matches!(r, Ok(done) if done == total) {
                return Ok(());
            }
        } else if self.cache.direct() && bufs.len() > 1 && self.whole_blocks(bufs, offset) {
            // Whole blocks into unaligned pieces: one aligned read, then scatter.
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let mut one = pool::get(total);
            self.pread_full(&mut one, offset)?;
            let mut at = 0;
            for b in bufs.iter_mut() {
                b.copy_from_slice(&one[at..at + b.len()]);
                at += b.len();
            }
            return Ok(());
        }
        if self.cache.direct() || bufs.len() == 1 {
            let mut off = offset;
            for b in bufs.iter_mut() {
                self.read_at(b, off)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut _,
                iov_len: b.len(),
            })
            .collect();
        let done = self.iov_loop(&mut iov, offset, total, StorageOp::Read, libc::preadv)?;
        drop(iov);
        // Past the end of the file reads as zeroes.
        let mut skip = done;
        for b in bufs.iter_mut() {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            b[skip..].fill(0);
            skip = 0;
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> StorageResult<()> {
        if self.cache.direct()
            && bufs.len() > 1
            && direct_iov_ok(bufs.iter().map(|b| (b.as_ptr(), b.len())), offset)
        {
            // One pwritev for the whole request, under the same shared extend lock as
            // an aligned direct write; a failure is redone buffer by buffer below.
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let mut iov: Vec<libc::iovec> = bufs
                .iter()
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr() as *mut _,
                    iov_len: b.len(),
                })
                .collect();
            let _extend = self.extend.read().unwrap_or_else(|p| p.into_inner());
            let r = self.iov_loop(&mut iov, offset, total, StorageOp::Write, libc::pwritev);
            if matches!(r, Ok(done) if done == total) {
                return Ok(());
            }
        } else if self.cache.direct() && bufs.len() > 1 && self.whole_blocks(bufs, offset) {
            // The request covers whole blocks but its pieces are not aligned (a COW
            // head or tail beside the guest's bytes): gather them into one aligned
            // buffer and write it in one call, with no read-modify-write.
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let mut one = pool::get(total);
            let mut at = 0;
            for b in bufs {
                one[at..at + b.len()].copy_from_slice(b);
                at += b.len();
            }
            let _extend = self.extend.read().unwrap_or_else(|p| p.into_inner());
            return self.pwrite_full(&one, offset);
        }
        if self.cache.direct() || bufs.len() == 1 {
            let mut off = offset;
            for b in bufs {
                self.write_at(b, off)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            })
            .collect();
        let done = self.iov_loop(&mut iov, offset, total, StorageOp::Write, libc::pwritev)?;
        if done < total {
            let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
            return Err(self.err(StorageOp::Write, offset + done as u64, e));
        }
        self.wrote(offset, total);
        Ok(())
    }

    fn flush(&self) -> StorageResult<()> {
        if self.cache.ignore_flush() {
            return Ok(());
        }
        match &self.uring {
            Some(u) => u.fdatasync(),
            None => self.file.sync_data(),
        }
        .map_err(|e| StorageError::op(StorageOp::Flush, self.path.display().to_string(), None, e))
    }

    fn len(&self) -> StorageResult<u64> {
        self.stat_len()
    }

    fn set_len(&self, len: u64) -> StorageResult<()> {
        let was_empty = len > 0 && self.len()? == 0;
        // Raised first (a grow), lowered only once the shrink is done: the bound never
        // drops below the file.
        self.note_end(len);
        self.file
            .set_len(len)
            .map_err(|e| self.err(StorageOp::Truncate, len, e))?;
        self.known_len.store(len, Ordering::Release);
        if was_empty {
            // Growing an empty file writes its first block, as QEMU's file driver
            // does (so O_DIRECT alignment probing finds data): the file takes the
            // same space as qemu-img's (`info`'s "disk size").
            let first = vec![0u8; len.min(4096) as usize];
            self.write_at(&first, 0)?;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()> {
        let end = (offset + len).min(self.len()?);
        if end <= offset {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            end - offset,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // No hole punching on this file system: zeroes read the same.
                Storage::write_zeroes(self, offset, end - offset)
            }
            Err(e) => Err(self.err(StorageOp::PunchHole, offset, e)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) =>
            {
                let chunk = pool::get_zeroed(len.min(1 << 20) as usize);
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(chunk.len() as u64) as usize;
                    self.write_at(&chunk[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(self.err(StorageOp::WriteZeroes, offset, e)),
        }
    }

    fn zero_fresh(&self, offset: u64, len: u64) -> StorageResult<bool> {
        if len == 0 {
            return Ok(true);
        }
        // Past the end of a file nobody else writes, the range already reads as
        // zeroes: reserving it (which also extends the file to whole clusters, as
        // formats that allocate at the end of the file expect) is all it needs. Inside
        // the file, stale bytes are zeroed by the file system without writing any.
        let past_end = self.len_trusted.load(Ordering::Acquire)
            && offset >= self.known_len.load(Ordering::Acquire);
        let mode = if past_end {
            0
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(true),
            // Not on this file system (or file type): the caller writes zeroes.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err(StorageOp::WriteZeroes, offset, e)),
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()> {
        match self.fallocate(0, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let cur = self.len()?;
                if offset + len > cur {
                    self.set_len(offset + len)?;
                }
                Ok(())
            }
            Err(e) => Err(self.err(StorageOp::Allocate, offset, e)),
        }
    }

    fn extent_at(&self, offset: u64) -> StorageResult<(bool, u64)> {
        // No fstat on the common paths (this runs once per block-status query): a data
        // offset SEEK_DATA finds lies below the end of the file, and SEEK_HOLE never
        // goes past it (the end counts as a hole). The length is needed only when a
        // seek fails, which includes every offset at or past the end.
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on an owned descriptor; we never use the file position elsewhere.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            let len = self.len()?;
            if offset >= len {
                return Ok((false, 0));
            }
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok((false, len - offset)),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok((true, len - offset)),
                _ => Err(self.err(StorageOp::SeekData, offset, e)),
            };
        }
        let data = data as u64;
        if data > offset {
            return Ok((false, data - offset));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            let len = self.len()?;
            return Ok((true, len.saturating_sub(offset).max(1)));
        }
        Ok((true, (hole as u64).max(offset + 1) - offset))
    }

    fn relock(&self, mode: LockMode) -> StorageResult<()> {
        if self.unlocked {
            return Ok(());
        }
        self.len_trusted.store(false, Ordering::Release);
        lock::release(self.file.as_raw_fd())?;
        lock::apply(
            self.file.as_raw_fd(),
            mode,
            &self.path.display().to_string(),
        )?;
        if self.may_trust && excludes_writers(mode) {
            // Nobody else can grow the file from now on: one fstat makes the bound
            // cover whatever they did before.
            self.stat_len()?;
            self.len_trusted.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn alignment(&self) -> usize {
        if self.cache.direct() {
            DIRECT_ALIGN
        } else {
            1
        }
    }

    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn direct_fd(&self, offset: u64, len: u64, write: bool) -> Option<std::os::fd::RawFd> {
        // Buffered files keep the page-cache paths (and the NBD server's inline
        // serving); write-through needs a flush after each write, which a caller's
        // own write would skip.
        if !self.cache.direct() || (write && self.cache.write_through()) || len == 0 {
            return None;
        }
        let align = DIRECT_ALIGN as u64;
        let end = offset.checked_add(len)?;
        // Inside the file: no extension (so no `extend` lock is needed against a
        // padded write trimming the file back) and no short read to fill.
        if !offset.is_multiple_of(align)
            || !len.is_multiple_of(align)
            || end > self.known_len.load(Ordering::Acquire)
        {
            return None;
        }
        Some(self.file.as_raw_fd())
    }

    fn protocol_name(&self) -> &'static str {
        self.protocol
    }

    fn copy_range_to(
        &self,
        offset: u64,
        dst: &dyn Storage,
        dst_offset: u64,
        len: u64,
    ) -> StorageResult<u64> {
        let Some(out_fd) = dst.host_fd() else {
            return Ok(0);
        };
        let mut done = 0u64;
        while done < len {
            let mut off_in = (offset + done) as libc::loff_t;
            let mut off_out = (dst_offset + done) as libc::loff_t;
            // Bounded per call so one request never holds the kernel for long.
            let n = (len - done).min(1 << 30) as usize;
            // SAFETY: both descriptors are open for the life of the call; the offset
            // pointers are valid locals; copy_file_range touches no user memory else.
            let r = unsafe {
                libc::copy_file_range(
                    self.file.as_raw_fd(),
                    &mut off_in,
                    out_fd,
                    &mut off_out,
                    n,
                    0,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Offload impossible here: the caller falls back to read + write.
                    Some(
                        libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL | libc::EBADF,
                    ) => return Ok(done),
                    _ => return Err(self.err(StorageOp::Write, dst_offset + done, e)),
                }
            }
            if r == 0 {
                // The end of this file: what is left reads as zeroes.
                return Ok(done);
            }
            done += r as u64;
        }
        Ok(done)
    }
}

/// `FS_NOCOW_FL` of `<linux/fs.h>` (inode flag: no copy-on-write).
const FS_NOCOW_FL: libc::c_int = 0x0080_0000;
/// `FS_XFLAG_EXTSIZE` of `<linux/fs.h>` (the extent size hint is set).
const FS_XFLAG_EXTSIZE: u32 = 0x0000_0800;
/// `_IOR('X', 31, struct fsxattr)`.
const FS_IOC_FSGETXATTR: libc::Ioctl = 0x801c_581f;
/// `_IOW('X', 32, struct fsxattr)`.
const FS_IOC_FSSETXATTR: libc::Ioctl = 0x401c_5820;

/// `struct fsxattr` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// The `file` protocol: a host file (QEMU's `file` driver, keys `filename`, `locking`,
/// `aio`). Plain names and `file:NAME` mean it.
pub static PROTOCOL: Protocol = Protocol {
    name: "file",
    schemes: &["file"],
    options: FILE_OPTIONS,
    parse_filename,
    open: Some(open_protocol),
};

/// The `host_device` protocol: a host block or character device, otherwise the `file`
/// protocol (QEMU's `host_device` driver; `/dev/…` volumes, LVM, NBD devices).
pub static HOST_DEVICE: Protocol = Protocol {
    name: "host_device",
    schemes: &["host_device"],
    options: FILE_OPTIONS,
    parse_filename: parse_device_filename,
    open: Some(open_device),
};

const FILE_OPTIONS: &[&str] = &["filename", "locking", "aio"];

/// `file:NAME` → `filename=NAME` (the prefix is stripped once; `file:a:b` is `a:b`).
fn parse_filename(name: &str, node: &mut Node) -> Result<(), SpecError> {
    let name = name.strip_prefix("file:").unwrap_or(name);
    node.insert_str("filename", name)
}

/// `host_device:NAME` → `filename=NAME`.
fn parse_device_filename(name: &str, node: &mut Node) -> Result<(), SpecError> {
    let name = name.strip_prefix("host_device:").unwrap_or(name);
    node.insert_str("filename", name)
}

fn open_device(node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(Value::Str(f)) = node.get("filename") {
        // QEMU checks the type before opening; a missing file fails in the open below.
        if let Ok(m) = std::fs::metadata(f) {
            let t = m.file_type();
            if !t.is_block_device() && !t.is_char_device() {
                return Err(SpecError::NotADevice(f.clone()).into());
            }
        }
    }
    open_with(node, ctx, HOST_DEVICE.name)
}

fn open_protocol(node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>> {
    open_with(node, ctx, PROTOCOL.name)
}

/// QEMU's `aio` modes; returns whether io_uring was asked for. `threads` (the default)
/// and `native` run requests as plain system calls on the caller's threads (`native`
/// is accepted where QEMU accepts it); `io_uring` submits them to io_uring, falling
/// back to `threads` where the kernel refuses it.
/// The node's own `aio` key wins over the mode the whole open asked for (`-i`).
fn check_aio(node: &mut Node, ctx: &ProtocolOpen) -> Result<bool, SpecError> {
    let mode = match node.take_str("aio")? {
        None => ctx.aio,
        Some(s) => AioMode::parse(&s).ok_or(SpecError::BadValue(s))?,
    };
    match mode {
        AioMode::Threads => Ok(false),
        AioMode::IoUring => Ok(true),
        AioMode::Native if ctx.cache.direct() => Ok(false),
        AioMode::Native => Err(SpecError::AioNativeNeedsDirect),
    }
}

fn open_with(
    mut node: Node,
    ctx: &ProtocolOpen,
    name: &'static str,
) -> StorageResult<Arc<dyn Storage>> {
    let filename = node
        .take_str("filename")?
        .filter(|f| !f.is_empty())
        .ok_or_else(|| {
            SpecError::Missing(format!("The '{name}' block driver requires a file name"))
        })?;
    // QEMU's locking is on/off/auto (auto = on where OFD locks exist, as on Linux).
    let locking = match node.take("locking") {
        None => true,
        Some(Value::Bool(b)) => b,
        Some(Value::Str(s)) => match s.as_str() {
            "on" | "auto" => true,
            "off" => false,
            _ => return Err(SpecError::BadValue(s).into()),
        },
        Some(_) => {
            return Err(SpecError::Type {
                key: node.key_path("locking"),
                expected: "string",
            }
            .into())
        }
    };
    let uring = check_aio(&mut node, ctx)?;
    node.finish(|key| SpecError::ProtocolOption {
        protocol: name.into(),
        key,
    })?;
    let fo = OpenFileOptions {
        read_only: ctx.read_only,
        cache: ctx.cache,
        lock: if locking { ctx.lock } else { LockMode::Off },
        create: false,
    };
    let mut f = FileStorage::open(Path::new(&filename), &fo)?;
    f.protocol = name;
    if uring {
        f = f.with_io_uring().0;
    }
    Ok(Arc::new(if locking { f } else { f.without_locking() }))
}
