//! A connection's io_uring: reads and writes that the image hands out as direct ranges
//! ([`vdisk::Image::direct`], O_DIRECT files) are submitted and completed by the
//! connection's reader itself, with no worker-pool hop.
//!
//! Why: with O_DIRECT a request waits for the device, so the reader cannot run it
//! synchronously (it would serve one request at a time), and handing it to a worker
//! costs a queue wake-up, a limiter wake-up and a reply `writev` per request. On the
//! ring the reader only queues an entry (one `io_uring_enter` for all the requests it
//! read in one go) and the kernel keeps them all in flight. When the reader would wait
//! for the client, it waits on the ring instead, for the socket (a poll entry) or a
//! completion, whichever comes first, and answers every completion it finds in one
//! `writev`. One thread submits and completes, so a completion wakes one thread (the
//! kernel runs a completion's work on the submitting thread: with a separate completion
//! thread every batch woke the reader first, then the completer, which cost most under
//! CPU contention).
//!
//! Small requests use slots of one registered buffer (`READ_FIXED`/`WRITE_FIXED`: no
//! page pinning per request), the image's files are registered too (fixed files: no
//! descriptor lookup per request). Everything else (bigger requests stay on the ring
//! with pooled buffers; flushes, FUA and allocating writes, holes, TLS connections go
//! to the worker pool, which is also the whole path when the kernel refuses io_uring).

use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use vdisk::storage::pool::{self, AlignedBuf};

/// Submission queue entries (the completion queue gets twice as many). More than the
/// requests a connection admits ([`crate::transmission::MAX_IN_FLIGHT`]) plus the stop
/// entry, so neither queue can overflow.
const ENTRIES: u32 = 64;
/// Slots in the registered buffer: one per request a connection admits.
pub const SLOTS: usize = 32;
/// Bytes per slot: requests up to this size use a registered slot (the small random
/// I/O where per-request page pinning shows); larger ones a pooled aligned buffer.
/// Registering pins the whole slab, so it is resident for the connection's life: at
/// 4 KiB a slot it is 128 KiB (8 KiB slots made a server under fio hold 128 KiB more
/// than qemu-nbd, which only allocates per request).
pub const SLOT_BYTES: usize = 4 << 10;
/// Registered files: the image's data file and a few more (an external data file).
const FILES: u32 = 8;
/// User data of the poll entry on the client's socket (never the address of an
/// operation: those are boxes, aligned to 8).
pub const POLL: u64 = 1;
/// User data of the entry that cancels the poll when the connection ends.
pub const CANCEL: u64 = 2;
/// How long a submission that the kernel keeps refusing for lack of resources is
/// retried before the process gives up (entries queued on the ring point at buffers
/// that cannot be taken back).
const SUBMIT_PATIENCE: Duration = Duration::from_secs(30);

/// The ring of one connection, used by its reader thread.
pub struct Ring {
    ring: IoUring,
    /// The registered buffer, `SLOTS * SLOT_BYTES` bytes, 4 KiB aligned.
    _slab: AlignedBuf,
    /// Its address, taken once: slots are handed out by index and reached through it.
    base: *mut u8,
    /// Free slots, one bit each.
    free: AtomicU64,
    /// Descriptors registered as fixed files, by index (the reader's).
    files: Mutex<Vec<RawFd>>,
    /// Entries queued and not yet completed (the poll included).
    outstanding: AtomicUsize,
    /// A poll entry on the socket is queued and not completed.
    polling: AtomicBool,
}

// SAFETY: `base` points into `slab`, which the ring owns and never moves; each slot is
// used by one request at a time (the `free` bit is its ownership), and the queues are
// used by the reader thread alone.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

impl Ring {
    /// A ring with its buffer and file tables registered; fails where the kernel
    /// refuses io_uring (or [`vdisk::storage::IO_URING_REFUSE_ENV`] is set, which
    /// simulates that): the connection then uses its worker pool for everything.
    pub fn new() -> io::Result<Ring> {
        if std::env::var_os(vdisk::storage::IO_URING_REFUSE_ENV).is_some() {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        // Cooperative task running: a completion's work waits for the reader's next
        // system call instead of interrupting it with an inter-processor interrupt
        // (costly in a VM). The reader enters the kernel between any two batches it
        // handles and waits on the ring itself, so nothing waits longer. Kernels before
        // 5.19 refuse the flag: then a plain ring.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(ENTRIES)
            .or_else(|_| IoUring::new(ENTRIES))?;
        let mut slab = pool::get(SLOTS * SLOT_BYTES);
        let base = slab.as_mut_ptr();
        let iov = libc::iovec {
            iov_base: base.cast(),
            iov_len: SLOTS * SLOT_BYTES,
        };
        // SAFETY: the slab lives as long as the ring (both fields of `Ring`; the
        // buffers are unregistered in `drop` before the slab is freed).
        unsafe { ring.submitter().register_buffers(&[iov])? };
        ring.submitter().register_files_sparse(FILES)?;
        Ok(Ring {
            ring,
            _slab: slab,
            base,
            free: AtomicU64::new((1u64 << SLOTS) - 1),
            files: Mutex::new(Vec::new()),
            outstanding: AtomicUsize::new(0),
            polling: AtomicBool::new(false),
        })
    }

    /// A free registered slot for a request of `len` bytes, if it fits one.
    pub fn take_slot(&self, len: usize) -> Option<usize> {
        if len > SLOT_BYTES {
            return None;
        }
        let mut cur = self.free.load(Ordering::Acquire);
        loop {
            if cur == 0 {
                return None;
            }
            let i = cur.trailing_zeros() as usize;
            match self.free.compare_exchange_weak(
                cur,
                cur & !(1 << i),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(i),
                Err(now) => cur = now,
            }
        }
    }

    /// Gives a slot back.
    pub fn put_slot(&self, i: usize) {
        self.free.fetch_or(1 << i, Ordering::AcqRel);
    }

    /// The first `len` bytes of slot `i`.
    ///
    /// # Safety
    /// The caller owns slot `i` (took it and has not put it back) and no other
    /// reference to it is alive, nor an I/O in flight on it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot(&self, i: usize, len: usize) -> &mut [u8] {
        debug_assert!(i < SLOTS && len <= SLOT_BYTES);
        // SAFETY: inside the slab (i < SLOTS, len <= SLOT_BYTES); exclusive by the
        // caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(i * SLOT_BYTES), len) }
    }

    /// The fixed-file index of `fd`, registering it on first use (`None` when the
    /// table is full: the entry then names the descriptor itself). Reader only.
    fn file(&self, fd: RawFd) -> Option<u32> {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = files.iter().position(|&f| f == fd) {
            return Some(i as u32);
        }
        let i = files.len() as u32;
        if i >= FILES {
            return None;
        }
        match self.ring.submitter().register_files_update(i, &[fd]) {
            Ok(1) => {
                files.push(fd);
                Some(i)
            }
            _ => None,
        }
    }

    /// Queues one transfer of `len` bytes at `host` on `fd`, into (`write` false) or
    /// from `buf`, tagged `user_data`; `slot` is the registered slot `buf` lies in.
    /// Reader only. It is submitted by [`Ring::submit`] (or when the queue fills).
    ///
    /// # Safety
    /// `buf` (`len` bytes) must stay valid, and not be touched, until the completion
    /// tagged `user_data` has been reaped; `user_data` must not be [`POLL`] or [`CANCEL`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn queue(
        &self,
        write: bool,
        fd: RawFd,
        host: u64,
        buf: *mut u8,
        len: u32,
        slot: Option<usize>,
        user_data: u64,
    ) {
        // One opcode per kind of buffer (registered or not) and direction, on the
        // fixed file where the table has room, else on the descriptor itself.
        macro_rules! entry {
            ($fd:expr) => {
                match (slot.is_some(), write) {
                    (true, false) => opcode::ReadFixed::new($fd, buf, len, 0)
                        .offset(host)
                        .build(),
                    (true, true) => opcode::WriteFixed::new($fd, buf, len, 0)
                        .offset(host)
                        .build(),
                    (false, false) => opcode::Read::new($fd, buf, len).offset(host).build(),
                    (false, true) => opcode::Write::new($fd, buf, len).offset(host).build(),
                }
            };
        }
        let e = match self.file(fd) {
            Some(f) => entry!(types::Fixed(f)),
            None => entry!(types::Fd(fd)),
        };
        // SAFETY: the caller keeps the buffer valid until the completion.
        unsafe { self.push(e.user_data(user_data)) };
    }

    /// Queues a poll for the client's socket `fd` becoming readable (or hung up),
    /// unless one is queued already; its completion carries [`POLL`].
    pub fn poll_socket(&self, fd: RawFd) {
        if self.polling.swap(true, Ordering::AcqRel) {
            return;
        }
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(POLL);
        // SAFETY: a poll points at no memory.
        unsafe { self.push(e) };
    }

    /// Cancels a queued poll (the connection ends); its completion and the cancel's
    /// own ([`CANCEL`]) are reaped like the others.
    pub fn cancel_poll(&self) {
        if !self.polling.load(Ordering::Acquire) {
            return;
        }
        let e = opcode::AsyncCancel::new(POLL).build().user_data(CANCEL);
        // SAFETY: a cancel points at no memory.
        unsafe { self.push(e) };
        self.submit();
    }

    /// # Safety
    /// What `e` points at stays valid until its completion is reaped.
    unsafe fn push(&self, e: squeue::Entry) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        loop {
            // SAFETY: only the reader thread makes a submission queue.
            let mut sq = unsafe { self.ring.submission_shared() };
            // SAFETY: the caller's contract.
            if unsafe { sq.push(&e) }.is_ok() {
                return;
            }
            drop(sq);
            // Full (more entries than a connection admits never are, but be safe):
            // hand them to the kernel and retry.
            self.submit();
        }
    }

    /// Hands the queued entries to the kernel (no wait). Reader only. A kernel short
    /// of resources is retried; entries that cannot be taken back point at live
    /// buffers, so a ring that refuses for good ends the process.
    pub fn submit(&self) {
        let start = Instant::now();
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    // SAFETY: only the reader thread makes a submission queue.
                    if unsafe { self.ring.submission_shared() }.is_empty() {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) && start.elapsed() < SUBMIT_PATIENCE =>
                {
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => {
                    eprintln!("vdisk serve: io_uring refuses queued requests: {e}");
                    std::process::abort();
                }
            }
        }
    }

    /// Hands every completion available to `f` (user data, result: bytes or -errno);
    /// with `wait`, first submits what is queued and waits for at least one.
    pub fn reap(&self, wait: bool, mut f: impl FnMut(u64, i32)) {
        if wait {
            self.wait_one();
        }
        // SAFETY: only the reader thread makes a completion queue.
        let cq = unsafe { self.ring.completion_shared() };
        for c in cq {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            if c.user_data() == POLL {
                self.polling.store(false, Ordering::Release);
            }
            f(c.user_data(), c.result());
        }
    }

    /// Submits what is queued and waits for at least one completion.
    fn wait_one(&self) {
        loop {
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) => {
                    // Completions may still come; do not spin.
                    crate::vlog!("io_uring wait: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                    break;
                }
            }
        }
    }

    /// Entries queued and not yet reaped, the poll included.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Transfers queued and not yet reaped (the poll and its cancel not counted).
    pub fn transfers(&self) -> usize {
        self.outstanding()
            .saturating_sub(self.polling.load(Ordering::Acquire) as usize)
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("outstanding", &self.outstanding.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Normally the connection reaped everything first. If it did not (it is
        // unwinding from a panic), transfers may still write into their buffers:
        // wait for them, leaking their operations (and so the buffers) rather than
        // freeing memory the kernel still writes to.
        self.cancel_poll();
        while self.outstanding() > 0 {
            self.reap(true, |_, _| {});
        }
        // The ring is torn down asynchronously after its descriptor closes; its
        // registered files (with the image's locks) and pinned buffer would outlive the
        // connection for a moment. Unregistering drops them now. Nothing is in flight:
        // the connection reaped every completion before dropping the ring.
        let _ = self.ring.submitter().unregister_files();
        let _ = self.ring.submitter().unregister_buffers();
    }
}
