//! The transmission phase of one connection.
//!
//! One thread reads requests (and write payloads) off the socket; a pool of workers
//! executes them against the shared image concurrently and answers each as soon as it
//! is done, so replies go out in completion order. Replies are written under a
//! per-connection lock so chunks of different replies never interleave mid-message.
//! A [`Limiter`] bounds the requests and bytes in flight, which bounds memory.
//!
//! Small reads and writes (up to [`Export::inline_max`], buffered images) skip the
//! hand-off: the reader executes them itself and collects their replies in a batch
//! that goes out in one `writev` before the reader could block on the socket (nothing
//! it owes the client waits behind a read that needs the client's next bytes). That
//! saves the queue's wake-ups and a reply write per request; bigger requests, flushes,
//! FUA writes and O_DIRECT images still go to the workers.
//!
//! On an O_DIRECT export ([`Export::async_io`]) reads and writes that the image hands
//! out as direct ranges (allocated data, overwritten in place) go to the connection's
//! io_uring instead ([`crate::uring`]): the reader queues them, and where it would wait
//! for the client it waits on the ring, answering each batch of completions in one
//! `writev`. A write is acknowledged only once
//! its completion arrived; a FLUSH (on the workers) therefore covers every write
//! acknowledged before it. Where the kernel refuses io_uring, the workers do it all.

use crate::export::{descriptors, Export, MetaContext};
use crate::handshake::Negotiated;
use crate::limiter::{Cost, Limiter};
use crate::proto::{self, Buf, HeaderError, Request};
use crate::queue::{BufPool, PoolBuf, WorkQueue};
use crate::stream::Stream;
use crate::uring::Ring;
use std::cell::{Cell, RefCell};
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use vdisk::chain::ChainExtent;
use vdisk::DirectIo;
use vdisk::{ExtentKind, ZeroFlags};

/// Requests executing at once per connection.
pub const WORKERS: usize = 16;
/// Requests admitted (executing or queued) per connection.
pub const MAX_IN_FLIGHT: usize = 32;
/// Read-buffer bytes admitted per connection on a buffered export (O_DIRECT:
/// [`MAX_READ_BYTES_DIRECT`]).
pub const MAX_IN_FLIGHT_BYTES: u64 = 128 << 20;
/// Write-payload bytes admitted per connection on a buffered export. A buffered write
/// is a copy into the page cache, done as soon as a worker takes it, so payloads read
/// ahead of the workers only wait and hold memory: with 128 MiB here, nbdcopy's four
/// connections of 256 KiB writes held the server at 25 MiB peak RSS (qemu-nbd: 16).
pub const MAX_WRITE_BYTES_BUFFERED: u64 = 2 << 20;
/// Write-payload bytes admitted per connection on an O_DIRECT export
/// ([`Export::async_io`]). No page cache absorbs those writes: every payload admitted
/// waits for the device, so the budget is the server's memory, and the device gains
/// nothing from more: with eight 256 KiB writes of nbdcopy per connection instead of 32
/// its writes got faster and the server's peak RSS fell from 26 MiB to 14 (qemu-nbd:
/// 16.8). A single larger request is still admitted alone.
pub const MAX_WRITE_BYTES_DIRECT: u64 = 2 << 20;
/// Read-buffer bytes admitted per connection on an O_DIRECT export: sixteen 256 KiB
/// reads, what the sixteen workers held at once before the ring (which takes every
/// admitted read at once); nbdcopy reads lost a fifth of their speed at 2 MiB.
pub const MAX_READ_BYTES_DIRECT: u64 = 4 << 20;
/// Status runs gathered for one BLOCK_STATUS or sparse READ.
const MAX_RUNS: usize = 16384;
/// Largest BLOCK_STATUS payload (effect length plus a few context ids).
const MAX_STATUS_PAYLOAD: u64 = 8 + 4 * 16;

/// Structured reads up to this length are answered with one data chunk, without
/// looking for holes.
const DENSE_READ_MAX: u64 = 4096;
/// Replies the reader batches before writing them out anyway.
const BATCH_MAX_BYTES: usize = 256 << 10;

thread_local! {
    /// Set while a connection's reader executes a request itself: its replies go to
    /// that thread's batch instead of the socket.
    static INLINE: Cell<bool> = const { Cell::new(false) };
    /// The reader's reply batch (one reader per thread, so per connection).
    static BATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A request that failed: NBD error value and a message for structured replies.
struct Fail {
    errno: u32,
    msg: String,
}

fn fail(errno: u32, msg: impl Into<String>) -> Fail {
    Fail {
        errno,
        msg: msg.into(),
    }
}

impl From<vdisk::Error> for Fail {
    fn from(e: vdisk::Error) -> Fail {
        fail(proto::nbd_errno(e.errno()), e.to_string())
    }
}

/// A request ready to execute.
struct Job {
    req: Request,
    payload: PoolBuf,
    cost: Cost,
}

/// A request on the connection's ring, from queueing to its reply. Its address is the
/// entry's user data: the reader leaks the box into the ring and takes it back from the
/// completion.
struct RingOp<'a> {
    req: Request,
    buf: RingBuf,
    /// Finished once the transfer completed (a write's in-place guard, its bitmaps).
    range: DirectIo<'a>,
    cost: Cost,
}

/// A ring request's buffer: a registered slot, or a pooled aligned buffer.
enum RingBuf {
    Slot(usize, usize),
    Pool(PoolBuf),
}

impl RingBuf {
    /// The bytes and the slot.
    ///
    /// # Safety
    /// As [`Ring::slot`]: no I/O in flight on it and no other reference alive.
    unsafe fn bytes<'r>(&'r mut self, ring: &'r Ring) -> (&'r mut [u8], Option<usize>) {
        match self {
            // SAFETY: the caller's contract; the slot is this request's.
            RingBuf::Slot(i, len) => (unsafe { ring.slot(*i, *len) }, Some(*i)),
            RingBuf::Pool(b) => (&mut b[..], None),
        }
    }

    fn free(self, ring: &Ring) {
        if let RingBuf::Slot(i, _) = self {
            ring.put_slot(i);
        }
    }
}

/// Per-connection state shared by the reader and the workers.
struct Conn<'a> {
    export: &'a Export,
    neg: &'a Negotiated,
    out: Mutex<Stream>,
    dead: AtomicBool,
    pool: BufPool,
    /// Requests that went through the ring (logged at the end with `-v`).
    ring_ops: AtomicU64,
}

/// Serves requests until the client disconnects, breaks the protocol, or the socket is
/// shut down (server shutdown). Requests already read are finished and answered first.
pub fn serve(stream: Stream, export: &Export, neg: &Negotiated) -> io::Result<()> {
    let out = stream.try_clone()?;
    let conn = Conn {
        export,
        neg,
        out: Mutex::new(out),
        dead: AtomicBool::new(false),
        pool: BufPool,
        ring_ops: AtomicU64::new(0),
    };
    let (read_bytes, write_bytes) = if export.async_io {
        (MAX_READ_BYTES_DIRECT, MAX_WRITE_BYTES_DIRECT)
    } else {
        (MAX_IN_FLIGHT_BYTES, MAX_WRITE_BYTES_BUFFERED)
    };
    let limiter = Limiter::new(MAX_IN_FLIGHT, read_bytes, write_bytes);
    let queue: WorkQueue<Job> = WorkQueue::default();
    // TLS keeps plaintext the socket's readiness does not show: the ring's wait on the
    // socket could sleep on buffered requests. TLS connections use the workers.
    let sock = match &stream {
        Stream::Tcp(t) => Some(t.as_raw_fd()),
        Stream::Unix(u) => Some(u.as_raw_fd()),
        Stream::Tls(_) => None,
    };
    let ring = if export.async_io && sock.is_some() {
        match Ring::new() {
            Ok(r) => Some(r),
            Err(e) => {
                crate::vlog!("io_uring unavailable ({e}): the worker pool serves every request");
                None
            }
        }
    } else {
        None
    };
    let result = std::thread::scope(|sc| {
        // The workers start with the first request the reader hands them: a client
        // served inline or on the ring (random I/O on allocated clusters) never needs
        // them, and sixteen idle threads are 128 KiB of touched stacks per connection.
        let started = std::cell::Cell::new(false);
        let start_workers = || {
            if started.replace(true) {
                return;
            }
            for _ in 0..WORKERS {
                let (conn, limiter, queue) = (&conn, &limiter, &queue);
                sc.spawn(move || {
                    while let Some(job) = queue.pop() {
                        let cost = job.cost;
                        conn.execute(job);
                        limiter.release(cost);
                    }
                });
            }
        };
        let r = match stream.try_clone() {
            Ok(s) => {
                let mut rd = BufReader::with_capacity(64 * 1024, s);
                let ring = ring.as_ref().zip(sock);
                let r = conn.read_loop(&mut rd, &limiter, &queue, ring, &start_workers);
                // Whatever was served inline is answered before the connection ends.
                conn.flush_batch();
                r
            }
            Err(e) => Err(e),
        };
        // What is on the ring completes and is answered.
        if let Some(ring) = ring.as_ref() {
            ring.cancel_poll();
            while ring.outstanding() > 0 {
                conn.ring_step(ring, &limiter, true);
            }
            crate::vlog!(
                "{} requests went through io_uring",
                conn.ring_ops.load(Ordering::Relaxed)
            );
        }
        // Workers finish what was read, then stop.
        queue.close();
        r
    });
    // Every reply is out (or the client is gone): hang up.
    let _ = stream.shutdown(Shutdown::Both);
    result
}

impl Conn<'_> {
    fn read_loop<R: Read>(
        &self,
        rd: &mut BufReader<R>,
        limiter: &Limiter,
        queue: &WorkQueue<Job>,
        ring: Option<(&Ring, RawFd)>,
        start_workers: &dyn Fn(),
    ) -> io::Result<()> {
        let ext = self.neg.extended;
        let header_len = if ext { 32 } else { 28 };
        loop {
            if self.dead.load(Ordering::Acquire) {
                return Ok(());
            }
            if let Some((r, _)) = ring {
                // Answer what completed meanwhile (no system call when nothing did).
                if r.transfers() > 0 {
                    self.ring_step(r, limiter, false);
                }
            }
            if rd.buffer().len() < header_len {
                // The next header may need the socket: answer what was served first,
                // and wait on the ring while transfers are in flight.
                self.flush_batch();
                self.await_socket(ring, limiter);
            }
            let req = match proto::read_request(rd, ext) {
                Ok(r) => r,
                Err(HeaderError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(());
                }
                Err(HeaderError::Io(e)) => return Err(e),
                Err(HeaderError::BadMagic(m)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad request magic {m:#010x}: dropping the connection"),
                    ));
                }
            };
            if req.typ == proto::CMD_DISC {
                return Ok(());
            }
            // WRITE always carries its length as payload: the spec wants
            // PAYLOAD_LEN set on it with extended headers, but qemu's client leaves
            // it clear, and either way the bytes follow.
            let payload_len = if req.typ == proto::CMD_WRITE
                || (ext && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0)
            {
                req.length
            } else {
                0
            };
            let limit = match req.typ {
                proto::CMD_WRITE => proto::MAX_PAYLOAD as u64,
                proto::CMD_BLOCK_STATUS => MAX_STATUS_PAYLOAD,
                _ => 0,
            };
            if payload_len > limit {
                if payload_len > u32::MAX as u64 {
                    // Draining that much would take forever: the spec allows hanging up.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("request payload of {payload_len} bytes"),
                    ));
                }
                // Consume the payload so the stream stays in step, then refuse.
                proto::skip(rd, payload_len)?;
                let (errno, what) = if req.typ == proto::CMD_WRITE {
                    (proto::EINVAL, "write payload larger than 32 MiB")
                } else {
                    (proto::EINVAL, "unexpected payload for this command")
                };
                self.reply_error(&req, &fail(errno, what));
                continue;
            }
            let cost = match req.typ {
                proto::CMD_READ => Cost::read(req.length.min(proto::MAX_PAYLOAD as u64)),
                _ => Cost::write(payload_len),
            };
            if let Some(r) = ring {
                if self.try_ring(rd, r, limiter, &req, cost)? {
                    continue;
                }
            }
            if self.inline_ok(&req) {
                if rd.buffer().len() < payload_len as usize {
                    self.flush_batch();
                }
                let mut payload = self.pool.get(payload_len as usize);
                rd.read_exact(&mut payload)?;
                INLINE.with(|f| f.set(true));
                self.execute(Job {
                    req,
                    payload,
                    cost: Cost::default(),
                });
                INLINE.with(|f| f.set(false));
                continue;
            }
            if rd.buffer().len() < payload_len as usize {
                self.flush_batch();
                self.await_socket(ring, limiter);
            }
            self.admit(limiter, ring.map(|r| r.0), cost);
            let mut payload = self.pool.get(payload_len as usize);
            if let Err(e) = rd.read_exact(&mut payload) {
                // The client vanished mid-payload: nothing of it is acknowledged.
                limiter.release(cost);
                return Err(e);
            }
            start_workers();
            queue.push(Job { req, payload, cost });
        }
    }

    /// Queues a READ, or a WRITE without FUA (reading its payload), on the ring when the
    /// image hands its range out for a direct transfer; false (nothing consumed) when
    /// the request takes the ordinary path, which also answers every invalid request.
    fn try_ring<R: Read>(
        &self,
        rd: &mut BufReader<R>,
        (ring, sock): (&Ring, RawFd),
        limiter: &Limiter,
        req: &Request,
        cost: Cost,
    ) -> io::Result<bool> {
        let write = match req.typ {
            proto::CMD_READ => false,
            // FUA stays on the workers: a durable write of qcow2 data needs its
            // mapping durable too (the cluster may come from an allocation not yet
            // flushed), which the image's flush after the write provides.
            proto::CMD_WRITE if req.flags & proto::CMD_FLAG_FUA == 0 => true,
            _ => return Ok(false),
        };
        if req.length == 0 || req.length > proto::MAX_PAYLOAD as u64 || self.check(req).is_err() {
            return Ok(false);
        }
        let Some(range) = self.export.image.direct(req.offset, req.length, write) else {
            return Ok(false);
        };
        let len = req.length as usize;
        self.admit(limiter, Some(ring), cost);
        if write && rd.buffer().len() < len {
            // The payload needs the socket: answer and start what is on the ring first.
            self.await_socket(Some((ring, sock)), limiter);
        }
        let mut buf = match ring.take_slot(len) {
            Some(i) => RingBuf::Slot(i, len),
            None => RingBuf::Pool(self.pool.get(len)),
        };
        // SAFETY: the buffer is this request's and nothing is in flight on it yet.
        let (bytes, slot) = unsafe { buf.bytes(ring) };
        let ptr = bytes.as_mut_ptr();
        if write {
            if let Err(e) = rd.read_exact(bytes) {
                // The client vanished mid-payload: nothing of it is acknowledged.
                buf.free(ring);
                limiter.release(cost);
                return Err(e);
            }
        }
        let (fd, host) = (range.fd(), range.host());
        let op = Box::new(RingOp {
            req: *req,
            buf,
            range,
            cost,
        });
        let user_data = Box::into_raw(op) as u64;
        // SAFETY: the buffer lives in the boxed op, which the reader takes
        // back only when this entry's completion arrives; `ptr` (a slot, or a pooled
        // buffer's heap memory) does not move with the box. A box is never at address 1
        // or 2 (POLL, CANCEL): it is aligned to 8.
        unsafe { ring.queue(write, fd, host, ptr, len as u32, slot, user_data) };
        self.ring_ops.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Takes `cost` from the budget, waiting if it is spent: on the ring while it has
    /// transfers in flight (only their completions, which this thread reaps, give
    /// their share back), else for the workers.
    fn admit(&self, limiter: &Limiter, ring: Option<&Ring>, cost: Cost) {
        while !limiter.try_acquire(cost) {
            match ring {
                Some(r) if r.transfers() > 0 => {
                    self.ring_step(r, limiter, true);
                }
                _ => return limiter.acquire(cost),
            }
        }
    }

    /// Before a read that may wait for the client: submits what is queued and, while
    /// transfers are in flight, answers their completions until the socket is
    /// readable (the read then finds data, or the end of the stream).
    fn await_socket(&self, ring: Option<(&Ring, RawFd)>, limiter: &Limiter) {
        let Some((r, sock)) = ring else {
            return;
        };
        r.submit();
        while r.transfers() > 0 {
            r.poll_socket(sock);
            // A poll that completed before the reader last read may be stale: only a
            // socket readable now ends the wait (else the reader could sleep in its
            // read with completions unanswered that the client waits for).
            if self.ring_step(r, limiter, true) && readable_now(sock) {
                return;
            }
        }
    }

    /// Answers the ring's completions (`wait`: waiting for at least one); true when
    /// the socket's poll completed among them.
    fn ring_step(&self, ring: &Ring, limiter: &Limiter, wait: bool) -> bool {
        let mut readable = false;
        let mut done: Vec<(Box<RingOp<'_>>, i32)> = Vec::new();
        ring.reap(wait, |ud, res| match ud {
            crate::uring::POLL => readable = true,
            crate::uring::CANCEL => {}
            // SAFETY: every other entry's user data is a RingOp leaked by `try_ring`,
            // completed exactly once.
            _ => done.push((unsafe { Box::from_raw(ud as *mut RingOp<'_>) }, res)),
        });
        if !done.is_empty() {
            self.answer_ring(ring, limiter, &mut done);
        }
        readable
    }

    /// Answers completed ring requests: one `writev` for all their replies. A failed or
    /// short transfer is redone through the image (which reports the error, or
    /// finishes an odd case like a file shorter than its length bound).
    fn answer_ring(&self, ring: &Ring, limiter: &Limiter, done: &mut Vec<(Box<RingOp<'_>>, i32)>) {
        let mut hdrs = Buf::with_capacity(done.len() * 40);
        // Per request: end of its header in `hdrs`, and whether its data follows.
        let mut parts: Vec<(usize, bool)> = Vec::with_capacity(done.len());
        let mut kept: Vec<(Request, RingBuf)> = Vec::with_capacity(done.len());
        for (op, res) in done.drain(..) {
            let RingOp {
                req,
                mut buf,
                range,
                cost,
            } = *op;
            let full = res >= 0 && res as u64 == range.len();
            // The transfer is over: release the in-place guard before anything else
            // (a redo below takes it again).
            range.finish(full);
            limiter.release(cost);
            let write = req.typ == proto::CMD_WRITE;
            if !full {
                // SAFETY: the transfer completed; the buffer is ours alone.
                let (bytes, _) = unsafe { buf.bytes(ring) };
                let redo = if write {
                    self.export.image.write_at(bytes, req.offset)
                } else {
                    self.export.image.read_at(bytes, req.offset)
                };
                if let Err(e) = redo {
                    self.reply_error(&req, &Fail::from(e));
                    buf.free(ring);
                    continue;
                }
            }
            if write {
                if self.neg.extended {
                    proto::chunk_header(
                        &mut hdrs,
                        true,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_NONE,
                        req.cookie,
                        req.offset,
                        0,
                    );
                } else {
                    proto::simple_header(&mut hdrs, 0, req.cookie);
                }
                parts.push((hdrs.0.len(), false));
            } else {
                if self.neg.structured {
                    proto::chunk_header(
                        &mut hdrs,
                        self.neg.extended,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_OFFSET_DATA,
                        req.cookie,
                        req.offset,
                        8 + req.length,
                    );
                    hdrs.u64(req.offset);
                } else {
                    proto::simple_header(&mut hdrs, 0, req.cookie);
                }
                parts.push((hdrs.0.len(), true));
            }
            kept.push((req, buf));
        }
        {
            let mut slices: Vec<&[u8]> = Vec::with_capacity(parts.len() * 2);
            let mut at = 0;
            for (&(end, data), (_, buf)) in parts.iter().zip(kept.iter_mut()) {
                slices.push(&hdrs.0[at..end]);
                at = end;
                if data {
                    // SAFETY: the transfer completed; the buffer is ours alone until
                    // freed below.
                    let (bytes, _) = unsafe { buf.bytes(ring) };
                    slices.push(bytes);
                }
            }
            if !slices.is_empty() {
                self.write_out(&slices);
            }
        }
        for (_, buf) in kept {
            buf.free(ring);
        }
    }

    /// Whether the reader serves this request itself: a small read, or a small write
    /// without FUA, on an export that allows it.
    fn inline_ok(&self, r: &Request) -> bool {
        let max = self.export.inline_max;
        r.length <= max
            && match r.typ {
                proto::CMD_READ => true,
                proto::CMD_WRITE => r.flags & proto::CMD_FLAG_FUA == 0,
                _ => false,
            }
    }

    /// Writes out the replies the reader collected (one `writev`).
    fn flush_batch(&self) {
        BATCH.with(|b| {
            let mut b = b.borrow_mut();
            if !b.is_empty() {
                self.write_out(&[&b[..]]);
                b.clear();
                if b.capacity() > 2 * BATCH_MAX_BYTES {
                    b.shrink_to(BATCH_MAX_BYTES);
                }
            }
        });
    }

    /// Validates and runs one request, then answers it.
    fn execute(&self, job: Job) {
        let req = job.req;
        let r = self.check(&req).and_then(|()| match req.typ {
            proto::CMD_READ => self.read(&req).map(|()| None),
            proto::CMD_WRITE => self.write(&req, &job.payload).map(Some),
            proto::CMD_FLUSH => self.export.image.flush().map_err(Fail::from).map(Some),
            proto::CMD_TRIM => self.trim(&req).map(Some),
            proto::CMD_CACHE => self.cache(&req).map(Some),
            proto::CMD_WRITE_ZEROES => self.write_zeroes(&req).map(Some),
            proto::CMD_BLOCK_STATUS => self.block_status(&req, &job.payload).map(|()| None),
            other => Err(fail(proto::EINVAL, format!("unknown command {other}"))),
        });
        match r {
            Ok(Some(())) => self.reply_ok(&req),
            Ok(None) => {}
            Err(f) => self.reply_error(&req, &f),
        }
        self.pool.put(job.payload);
    }

    /// Flags, permissions and bounds common to every command.
    fn check(&self, r: &Request) -> Result<(), Fail> {
        let ext = self.neg.extended;
        let mut allowed = proto::CMD_FLAG_FUA;
        match r.typ {
            proto::CMD_READ if self.neg.structured => allowed |= proto::CMD_FLAG_DF,
            proto::CMD_WRITE if ext => allowed |= proto::CMD_FLAG_PAYLOAD_LEN,
            proto::CMD_WRITE_ZEROES => {
                allowed |= proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO
            }
            proto::CMD_BLOCK_STATUS => {
                allowed |= proto::CMD_FLAG_REQ_ONE;
                if ext {
                    allowed |= proto::CMD_FLAG_PAYLOAD_LEN;
                }
            }
            _ => {}
        }
        if r.flags & !allowed != 0 {
            return Err(fail(
                proto::EINVAL,
                format!(
                    "unsupported flags {:#x} for {}",
                    r.flags & !allowed,
                    proto::cmd_name(r.typ)
                ),
            ));
        }
        let writes = matches!(
            r.typ,
            proto::CMD_WRITE | proto::CMD_WRITE_ZEROES | proto::CMD_TRIM
        );
        if writes && self.export.cfg.read_only {
            return Err(fail(proto::EPERM, "export is read-only"));
        }
        if r.typ == proto::CMD_FLUSH {
            return Ok(());
        }
        // BLOCK_STATUS with a payload carries its effect length in the payload.
        if r.typ == proto::CMD_BLOCK_STATUS && r.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0 {
            return Ok(());
        }
        self.check_range(r.typ, r.offset, r.length)
    }

    fn check_range(&self, typ: u16, offset: u64, len: u64) -> Result<(), Fail> {
        let size = self.export.size();
        if offset > size || len > size - offset {
            // qemu-nbd answers EINVAL for every command (the spec allows ENOSPC for
            // writes; clients written against qemu-nbd see EINVAL).
            return Err(fail(
                proto::EINVAL,
                format!(
                    "{} at offset {offset} length {len} is past the end of the {size}-byte export",
                    proto::cmd_name(typ)
                ),
            ));
        }
        if typ == proto::CMD_READ && len > proto::MAX_PAYLOAD as u64 {
            let errno = if self.neg.structured {
                proto::EOVERFLOW
            } else {
                proto::EINVAL
            };
            return Err(fail(
                errno,
                format!("read of {len} bytes is larger than 32 MiB"),
            ));
        }
        Ok(())
    }

    fn fua(&self, r: &Request) -> Result<(), Fail> {
        if r.flags & proto::CMD_FLAG_FUA != 0 {
            self.export.image.flush()?;
        }
        Ok(())
    }

    fn write(&self, r: &Request, data: &[u8]) -> Result<(), Fail> {
        // Zero detection, when asked for, is a hook on the image.
        if !data.is_empty() {
            self.export.image.write_at(data, r.offset)?;
        }
        self.fua(r)
    }

    fn write_zeroes(&self, r: &Request) -> Result<(), Fail> {
        if r.length > 0 {
            let flags = ZeroFlags {
                may_unmap: r.flags & proto::CMD_FLAG_NO_HOLE == 0
                    && self.export.cfg.discard == crate::export::DiscardMode::Unmap,
                fast: r.flags & proto::CMD_FLAG_FAST_ZERO != 0,
            };
            self.export.image.write_zeroes(r.offset, r.length, flags)?;
        }
        self.fua(r)
    }

    fn trim(&self, r: &Request) -> Result<(), Fail> {
        // With --discard=ignore (qemu-nbd's default) a trim is a successful no-op.
        if r.length > 0 && self.export.cfg.discard == crate::export::DiscardMode::Unmap {
            self.export.image.discard(r.offset, r.length)?;
        }
        self.fua(r)
    }

    /// Prefetch: read (a bounded part of) the range so later reads find metadata and
    /// data cached. Failure here must not change semantics, so errors are reported
    /// but nothing else.
    fn cache(&self, r: &Request) -> Result<(), Fail> {
        let mut left = r.length.min(proto::MAX_PAYLOAD as u64);
        let mut off = r.offset;
        let mut buf = vec![0u8; left.min(1 << 20) as usize];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.export.image.read_at(&mut buf[..n], off)?;
            off += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    fn read(&self, r: &Request) -> Result<(), Fail> {
        let img = &self.export.image;
        let len = r.length as usize;
        if !self.neg.structured {
            let mut buf = self.pool.get(len);
            img.read_at(&mut buf, r.offset)?;
            let mut h = Buf::with_capacity(16);
            proto::simple_header(&mut h, 0, r.cookie);
            self.send(&[&h.0, &buf]);
            self.pool.put(buf);
            return Ok(());
        }
        if len == 0 {
            self.chunk(r, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, &[]);
            return Ok(());
        }
        if r.length <= DENSE_READ_MAX {
            // One page or less: a hole chunk would save the client almost nothing, and
            // looking for holes costs a block-status walk per request. The spec lets
            // the server send holes as data.
            let mut b = self.pool.get(len);
            img.read_at(&mut b, r.offset)?;
            let mut p = Buf::with_capacity(8);
            p.u64(r.offset);
            self.chunk(
                r,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                &[&p.0, &b],
            );
            return Ok(());
        }
        // Segments of the request: (offset, length, reads as zeroes).
        let mut segs: Vec<(u64, u64, bool)> = Vec::new();
        let end = r.offset + r.length;
        if r.flags & proto::CMD_FLAG_DF == 0 {
            if let Ok(runs) = self.export.status_runs(r.offset, r.length, MAX_RUNS) {
                let mut pos = r.offset;
                for e in runs {
                    let hole = e.kind != ExtentKind::Data;
                    match segs.last_mut() {
                        Some(last) if last.2 == hole => last.1 += e.len,
                        _ => segs.push((pos, e.len, hole)),
                    }
                    pos += e.len;
                }
            }
        }
        let covered: u64 = segs.iter().map(|s| s.1).sum();
        if covered < r.length {
            let pos = r.offset + covered;
            match segs.last_mut() {
                Some(last) if !last.2 => last.1 += end - pos,
                _ => segs.push((pos, end - pos, false)),
            }
        }
        // Read everything before sending anything, so an error is one clean chunk.
        let mut data: Vec<PoolBuf> = Vec::new();
        for &(off, n, hole) in &segs {
            if !hole {
                let mut b = self.pool.get(n as usize);
                if let Err(e) = img.read_at(&mut b, off) {
                    self.pool.put(b);
                    data.into_iter().for_each(|b| self.pool.put(b));
                    return Err(e.into());
                }
                data.push(b);
            }
        }
        let mut bufs = data.into_iter();
        let last = segs.len() - 1;
        for (i, &(off, n, hole)) in segs.iter().enumerate() {
            let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
            if hole {
                let mut p = Buf::with_capacity(12);
                p.u64(off).u32(n as u32);
                self.chunk(r, flags, proto::REPLY_TYPE_OFFSET_HOLE, &[&p.0]);
            } else {
                let b = bufs.next().unwrap_or_default();
                let mut p = Buf::with_capacity(8);
                p.u64(off);
                self.chunk(r, flags, proto::REPLY_TYPE_OFFSET_DATA, &[&p.0, &b]);
                self.pool.put(b);
            }
        }
        Ok(())
    }

    fn block_status(&self, r: &Request, payload: &[u8]) -> Result<(), Fail> {
        if !self.neg.structured || self.neg.contexts.is_empty() {
            return Err(fail(proto::EINVAL, "no metadata context was negotiated"));
        }
        let mut contexts: Vec<MetaContext> = self.neg.contexts.clone();
        let mut len = r.length;
        if r.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0 {
            if payload.len() < 8 || !(payload.len() - 8).is_multiple_of(4) {
                return Err(fail(proto::EINVAL, "malformed BLOCK_STATUS payload"));
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&payload[..8]);
            len = u64::from_be_bytes(a);
            let mut chosen = Vec::new();
            for id in payload[8..].chunks_exact(4) {
                let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
                match MetaContext::from_id(id) {
                    Some(c) if self.neg.contexts.contains(&c) && !chosen.contains(&c) => {
                        chosen.push(c)
                    }
                    _ => {
                        return Err(fail(
                            proto::EINVAL,
                            format!("unknown or repeated context id {id}"),
                        ))
                    }
                }
            }
            if !chosen.is_empty() {
                contexts = chosen;
            }
            self.check_range(r.typ, r.offset, len)?;
        }
        if len == 0 {
            return Err(fail(proto::EINVAL, "BLOCK_STATUS of length 0"));
        }
        let req_one = r.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let max = if req_one { 1 } else { MAX_RUNS };
        // The chain is only walked for the contexts that describe it.
        let runs: Vec<ChainExtent> = if contexts
            .iter()
            .any(|c| !matches!(c, MetaContext::DirtyBitmap(_)))
        {
            self.export.status_runs(r.offset, len, max)?
        } else {
            Vec::new()
        };
        let last = contexts.len() - 1;
        for (i, ctx) in contexts.iter().enumerate() {
            let mut d = match ctx {
                MetaContext::DirtyBitmap(b) => {
                    self.export.bitmap_descriptors(*b, r.offset, len, max)
                }
                c => descriptors(*c, &runs),
            };
            if req_one {
                d.truncate(1);
            }
            let mut p = Buf::with_capacity(8 + d.len() * 16);
            let typ = if self.neg.extended {
                p.u32(ctx.id()).u32(d.len() as u32);
                for (l, s) in &d {
                    p.u64(*l).u64(*s as u64);
                }
                proto::REPLY_TYPE_BLOCK_STATUS_EXT
            } else {
                p.u32(ctx.id());
                for (l, s) in &d {
                    // Compact requests have 32-bit lengths, so runs fit.
                    p.u32((*l).min(u32::MAX as u64) as u32).u32(*s);
                }
                proto::REPLY_TYPE_BLOCK_STATUS
            };
            let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
            self.chunk(r, flags, typ, &[&p.0]);
        }
        Ok(())
    }

    /// Success without payload.
    fn reply_ok(&self, r: &Request) {
        if self.neg.extended {
            self.chunk(r, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, &[]);
        } else {
            let mut h = Buf::with_capacity(16);
            proto::simple_header(&mut h, 0, r.cookie);
            self.send(&[&h.0]);
        }
    }

    /// Failure: an error chunk with a message when structured, else a simple reply.
    fn reply_error(&self, r: &Request, f: &Fail) {
        crate::vlog!(
            "{} offset {} length {}: {}",
            proto::cmd_name(r.typ),
            r.offset,
            r.length,
            f.msg
        );
        if self.neg.structured {
            let mut msg = f.msg.as_str();
            while msg.len() > proto::MAX_STRING {
                let mut cut = proto::MAX_STRING;
                while !msg.is_char_boundary(cut) {
                    cut -= 1;
                }
                msg = &msg[..cut];
            }
            let mut p = Buf::with_capacity(6 + msg.len());
            p.u32(f.errno).u16(msg.len() as u16).bytes(msg.as_bytes());
            self.chunk(r, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, &[&p.0]);
        } else {
            let mut h = Buf::with_capacity(16);
            proto::simple_header(&mut h, f.errno, r.cookie);
            self.send(&[&h.0]);
        }
    }

    /// One structured/extended chunk with its payload split in parts.
    fn chunk(&self, r: &Request, flags: u16, typ: u16, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut h = Buf::with_capacity(32);
        proto::chunk_header(
            &mut h,
            self.neg.extended,
            flags,
            typ,
            r.cookie,
            r.offset,
            len as u64,
        );
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(&h.0);
        all.extend_from_slice(parts);
        self.send(&all);
    }

    /// Sends one whole message: into the reader's batch when the reader is executing
    /// the request itself, else straight to the socket.
    fn send(&self, parts: &[&[u8]]) {
        if INLINE.with(|f| f.get()) {
            let full = BATCH.with(|b| {
                let mut b = b.borrow_mut();
                for p in parts {
                    b.extend_from_slice(p);
                }
                b.len() >= BATCH_MAX_BYTES
            });
            if full {
                self.flush_batch();
            }
            return;
        }
        self.write_out(parts);
    }

    /// Writes one whole message; on failure the connection is finished.
    fn write_out(&self, parts: &[&[u8]]) {
        if self.dead.load(Ordering::Acquire) {
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = write_all_parts(&mut *out, parts) {
            crate::vlog!("writing reply: {e}");
            self.dead.store(true, Ordering::Release);
            // Wake the reader so the connection winds down.
            let _ = out.shutdown(Shutdown::Both);
        }
    }
}

/// Whether `fd` has data (or its end) to read right now.
fn readable_now(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call; zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r != 0 && (r < 0 || p.revents != 0)
}

/// `write_all` over several buffers with as few system calls as possible.
fn write_all_parts(w: &mut impl Write, parts: &[&[u8]]) -> io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() - idx);
        slices.push(IoSlice::new(&parts[idx][off..]));
        for p in &parts[idx + 1..] {
            slices.push(IoSlice::new(p));
        }
        let mut n = w.write_vectored(&slices)?;
        if n == 0 && slices.iter().any(|s| !s.is_empty()) {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "socket closed"));
        }
        while idx < parts.len() && n >= parts[idx].len() - off {
            n -= parts[idx].len() - off;
            idx += 1;
            off = 0;
        }
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most 3 bytes per call.
    struct Trickle(Vec<u8>);
    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = b.len().min(3);
            self.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn vectored_writes_survive_short_writes() {
        let mut t = Trickle(Vec::new());
        write_all_parts(&mut t, &[b"hello", b"", b"wo", b"rld!"]).unwrap();
        assert_eq!(t.0, b"helloworld!");
    }
}
