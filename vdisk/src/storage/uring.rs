//! The io_uring engine of a host file (`aio=io_uring`, as QEMU's `--aio io_uring`).
//!
//! Every data transfer and flush of a [`super::FileStorage`] opened with it is one
//! submission queue entry on a ring, the file registered with the ring (a fixed file:
//! no descriptor lookup per request). Callers are synchronous (`&self` I/O from many
//! threads), so each request borrows a ring from a small per-file set (one per thread
//! at a time, created on demand, at most [`MAX_IDLE_RINGS`] kept), submits and waits in
//! one `io_uring_enter`, and gives the ring back. A vectored request (a COW head, the
//! guest's data and a tail) is one `READV`/`WRITEV` entry.
//!
//! The kernel may refuse io_uring (too old, `kernel.io_uring_disabled`, a seccomp
//! filter): [`Uring::new`] then fails and the file uses the threaded engine (plain
//! `preadv`/`pwritev` on the caller's thread), which is what QEMU's `threads` does.

use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::RawFd;
use std::sync::{Mutex, PoisonError};

/// Entries per ring: one request is in flight per ring at a time (a long iovec list
/// is cut into a few entries submitted together).
const RING_ENTRIES: u32 = 8;
/// Rings kept for reuse per file (more are created while more threads do I/O at once).
const MAX_IDLE_RINGS: usize = 16;
/// iovecs per entry (the kernel's UIO_MAXIOV).
const IOV_PER_ENTRY: usize = 1024;

/// Set in the environment (to anything), makes ring creation fail as a kernel refusing
/// io_uring would: the fallback to the threaded engine is testable on any kernel.
pub const REFUSE_ENV: &str = "VDISK_TEST_REFUSE_IO_URING";

/// The rings of one file.
pub(super) struct Uring {
    fd: RawFd,
    idle: Mutex<Vec<IoUring>>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").field("fd", &self.fd).finish()
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // A ring is torn down asynchronously after its descriptor is closed, and its
        // registered file (with the QEMU-compatible OFD locks on it) would outlive
        // this storage for a moment: another opener right after us would find the
        // image locked. Unregistering drops the ring's reference synchronously.
        let idle = self.idle.get_mut().unwrap_or_else(PoisonError::into_inner);
        for ring in idle.drain(..) {
            let _ = ring.submitter().unregister_files();
        }
    }
}

fn new_ring(fd: RawFd) -> io::Result<IoUring> {
    if std::env::var_os(REFUSE_ENV).is_some() {
        return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    }
    let ring = IoUring::new(RING_ENTRIES)?;
    ring.submitter().register_files(&[fd])?;
    Ok(ring)
}

impl Uring {
    /// Sets up the engine for `fd` (which must stay open as long as the engine);
    /// fails when the kernel refuses io_uring.
    pub(super) fn new(fd: RawFd) -> io::Result<Uring> {
        let first = new_ring(fd)?;
        Ok(Uring {
            fd,
            idle: Mutex::new(vec![first]),
        })
    }

    fn with_ring<R>(&self, f: impl FnOnce(&mut IoUring) -> io::Result<R>) -> io::Result<R> {
        let popped = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut ring = match popped {
            Some(r) => r,
            None => new_ring(self.fd)?,
        };
        let r = f(&mut ring);
        // After an error the ring may hold entries it never submitted: drop it (a new
        // one is made on demand). After success nothing is left in it.
        if r.is_ok() {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE_RINGS {
                idle.push(ring);
                return r;
            }
        }
        let _ = ring.submitter().unregister_files();
        r
    }

    /// Submits `entries` in one call and waits for all of them; returns each result
    /// (bytes transferred, or the error of the entry).
    ///
    /// # Safety
    /// Every buffer and iovec the entries point at must stay valid (and, for reads,
    /// exclusively borrowed) until this returns.
    unsafe fn run(
        ring: &mut IoUring,
        entries: &[io_uring::squeue::Entry],
    ) -> io::Result<Vec<io::Result<usize>>> {
        {
            let mut sq = ring.submission();
            for (i, e) in entries.iter().enumerate() {
                // SAFETY: the caller keeps what the entry points at alive until all
                // completions are reaped below.
                unsafe { sq.push(&e.clone().user_data(i as u64)) }
                    .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
            }
        }
        let mut results: Vec<Option<io::Result<usize>>> =
            (0..entries.len()).map(|_| None).collect();
        let mut left = entries.len();
        let mut submitted = false;
        let mut failures = 0u32;
        while left > 0 {
            match ring.submit_and_wait(left) {
                Ok(_) => submitted = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The kernel took none of the entries: nothing points at the caller's
                // buffers. The ring (its queue still holding them) is not reused.
                Err(e) if !submitted => return Err(e),
                Err(e) => {
                    // Entries are in flight and will write into the caller's buffers:
                    // returning now would let those be freed under the kernel. Wait
                    // (reaping below); a ring that keeps failing cannot be left safely.
                    failures += 1;
                    if failures > 1000 {
                        eprintln!(
                            "vdisk: io_uring wait keeps failing with requests in flight: {e}"
                        );
                        std::process::abort();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            for cqe in ring.completion() {
                let i = cqe.user_data() as usize;
                if let Some(slot) = results.get_mut(i) {
                    if slot.is_none() {
                        left -= 1;
                    }
                    let r = cqe.result();
                    *slot = Some(if r < 0 {
                        Err(io::Error::from_raw_os_error(-r))
                    } else {
                        Ok(r as usize)
                    });
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(io::Error::from_raw_os_error(libc::EIO))))
            .collect())
    }

    /// One `preadv`/`pwritev` of `iov` at `offset`, as the system call would: the bytes
    /// transferred (short at the end of the file), or the error. Lists longer than
    /// the kernel's iovec limit go as several entries in one submission.
    pub(super) fn rw(&self, write: bool, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
        self.with_ring(|ring| {
            let mut entries = Vec::with_capacity(iov.len().div_ceil(IOV_PER_ENTRY).min(8));
            let mut off = offset;
            for chunk in iov.chunks(IOV_PER_ENTRY).take(RING_ENTRIES as usize) {
                let n = chunk.len() as u32;
                let e = if write {
                    opcode::Writev::new(types::Fixed(0), chunk.as_ptr(), n)
                        .offset(off)
                        .build()
                } else {
                    opcode::Readv::new(types::Fixed(0), chunk.as_ptr(), n)
                        .offset(off)
                        .build()
                };
                entries.push(e);
                off += chunk.iter().map(|v| v.iov_len as u64).sum::<u64>();
            }
            // SAFETY: `iov` and the buffers it points at are borrowed by our caller for
            // the whole call (see FileStorage::iov_loop); run waits for every entry.
            let results = unsafe { Self::run(ring, &entries)? };
            // Like one system call: bytes up to the first short or failed entry.
            let mut done = 0usize;
            for (r, chunk) in results.into_iter().zip(iov.chunks(IOV_PER_ENTRY)) {
                let want: usize = chunk.iter().map(|v| v.iov_len).sum();
                match r {
                    Ok(n) => {
                        done += n;
                        if n < want {
                            break;
                        }
                    }
                    Err(e) if done == 0 => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(done)
        })
    }

    /// `fdatasync` through the ring.
    pub(super) fn fdatasync(&self) -> io::Result<()> {
        self.with_ring(|ring| {
            let e = opcode::Fsync::new(types::Fixed(0))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            // SAFETY: the entry points at no memory.
            let r = unsafe { Self::run(ring, &[e])? };
            r.into_iter().next().unwrap_or(Ok(0)).map(|_| ())
        })
    }
}
