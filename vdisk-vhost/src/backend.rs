//! The vhost-user-blk device: features, configuration space and the request loop of
//! each queue. One worker thread per queue (`queues_per_thread`) takes chains off its
//! ring and hands each to the device's I/O threads, which serve it and complete it on
//! their own: requests of every queue run in parallel in the engine, and each is
//! answered as soon as it is done.
//!
//! Guest memory and descriptor chains are untrusted: every address is resolved through
//! `vm-memory` (which refuses anything outside the guest's regions), chain length is
//! bounded by the queue size, and a malformed request gets `VIRTIO_BLK_S_IOERR` or
//! `VIRTIO_BLK_S_UNSUPP` in its status byte (or, without a writable status byte, is
//! only returned to the guest). Nothing a guest sends can panic the backend.

use crate::request::{
    byte_range, encode_config, encode_id, layout, Config, Desc, Header, Kind, Layout, Segment,
    Span, HEADER_LEN, MAX_SEGMENTS, MAX_SEGMENT_SECTORS, SEGMENT_LEN, SEGMENT_UNMAP,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use vdisk::storage::work::WorkQueue;
use vdisk::{Image, ZeroFlags};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// I/O threads of one device, shared by its queues. Each request is handed to one of
/// them and completed (used ring, guest signalled) as soon as it is done, so a slow
/// request holds up nobody and the guest's queue depth reaches the engine and the
/// disk: with O_DIRECT, in-flight requests, not CPU, bound IOPS. Idle threads sleep.
const IO_THREADS: usize = 16;

/// Guest memory as the daemon shares it with the vrings.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// How the device behaves.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    /// Refuse writes, discards and zero writes (and offer VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Request queues offered (the VMM may use fewer).
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// Discard really deallocates (`--discard=unmap`); else it succeeds doing nothing,
    /// and zero writes never deallocate.
    pub unmap: bool,
    /// The GET_ID answer (20 bytes at most are sent).
    pub serial: String,
    /// Logical block size reported to the guest.
    pub blk_size: u32,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            read_only: false,
            num_queues: 1,
            queue_size: 1024,
            unmap: false,
            serial: "vdisk".into(),
            blk_size: 512,
        }
    }
}

/// The device for one connection (a new one per VMM connection: no state survives a
/// reconnect except the image).
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

struct Inner {
    image: Arc<Image>,
    cfg: BlkConfig,
    mem: Memory,
    event_idx: AtomicBool,
    /// Hands requests to the I/O threads (closed, so they end, when this is dropped);
    /// `None` if no thread could be started. Started at the first request taken off a
    /// ring, so a device that never sees one (a fuzz input through `serve_chain`, a
    /// VMM that only probes) starts no thread.
    io: OnceLock<Option<Arc<WorkQueue<Job>>>>,
    /// Per queue, requests taken off its ring and not yet completed (atomic, so the
    /// hot path takes no lock), and the wake-up of those waiting for a count to reach
    /// zero ([`BlkBackend::wait_idle`], `stop_vring`; the mutex is taken only then).
    in_flight: Vec<AtomicUsize>,
    idle_lock: Mutex<()>,
    idle: Condvar,
}

/// One request on its way to an I/O thread: everything needed to serve and complete
/// it without the queue worker.
struct Job {
    queue: usize,
    head: u16,
    descs: Vec<Desc>,
    vring: VringRwLock,
    mem: GuestMemoryLoadGuard<GuestMemoryMmap<()>>,
    /// Keeps the device (image, configuration) alive while the request runs; the
    /// threads hold no reference of their own, so the last clone's drop stops them.
    backend: BlkBackend,
}

impl Job {
    /// Serves the request, puts it on the used ring and signals the guest if it asked.
    fn run(self) {
        let used = self.backend.serve(&self.mem, &self.descs);
        let mut st = self.vring.get_mut();
        // Fails only for a head index past the table (nothing to return) or a used
        // ring outside guest memory: the guest broke its own queue.
        let _ = st.add_used(self.head, used);
        // A failed signal (the VMM went away) ends nothing here: the daemon notices.
        let _ = signal(&mut st);
        drop(st);
        let inner = &self.backend.inner;
        if inner.in_flight[self.queue].fetch_sub(1, Ordering::AcqRel) == 1 {
            // Under the lock, so a waiter between its check and its wait can't miss it.
            let _g = inner
                .idle_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            inner.idle.notify_all();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Queued jobs hold the device, so none is left: the threads just stop.
        if let Some(Some(q)) = self.io.get() {
            q.close();
        }
    }
}

/// Starts `n` I/O threads taking jobs from one queue.
fn start_io_threads(n: usize) -> Option<Arc<WorkQueue<Job>>> {
    let q = Arc::new(WorkQueue::<Job>::default());
    let mut started = 0;
    for i in 0..n {
        let q = q.clone();
        let t = std::thread::Builder::new()
            .name(format!("vhost-blk-io-{i}"))
            .spawn(move || {
                while let Some(job) = q.pop() {
                    job.run();
                }
            });
        if t.is_ok() {
            started += 1;
        }
    }
    (started > 0).then_some(q)
}

impl BlkBackend {
    /// A device on `image`, reading guest memory through `mem` (the same object given to
    /// the daemon, which updates it on SET_MEM_TABLE).
    pub fn new(image: Arc<Image>, cfg: BlkConfig, mem: Memory) -> BlkBackend {
        let in_flight = (0..cfg.num_queues.max(1))
            .map(|_| AtomicUsize::new(0))
            .collect();
        BlkBackend {
            inner: Arc::new(Inner {
                image,
                cfg,
                mem,
                event_idx: AtomicBool::new(false),
                io: OnceLock::new(),
                in_flight,
                idle_lock: Mutex::new(()),
                idle: Condvar::new(),
            }),
        }
    }

    /// Serves one descriptor chain as a queue would hand it over (the used length is
    /// returned; the status byte is written into guest memory): the request path
    /// without a virtqueue, for tests and the `vhost_user` fuzz target.
    pub fn serve_chain(&self, descs: &[Desc]) -> u32 {
        let mem = self.inner.mem.memory();
        self.serve(&mem, descs)
    }

    fn size(&self) -> u64 {
        self.inner.image.size()
    }

    /// Waits until every request taken off a ring has completed: after the VMM's
    /// connection ends, nothing may still be writing to the image when it is flushed.
    pub fn wait_idle(&self) {
        self.wait_until(|n| n.iter().all(|q| q.load(Ordering::Acquire) == 0));
    }

    /// Sleeps until `done` holds of the in-flight counts (checked again at each
    /// count's drop to zero).
    fn wait_until(&self, done: impl Fn(&[AtomicUsize]) -> bool) {
        let inner = &self.inner;
        let mut g = inner
            .idle_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while !done(&inner.in_flight) {
            g = inner.idle.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Serves every available chain of one queue, then signals the guest.
    fn process_queue(&self, vring: &VringRwLock, queue: usize) -> io::Result<()> {
        let event_idx = self.inner.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                vring.disable_notification().map_err(queue_err)?;
            }
            self.drain(vring, queue)?;
            // With EVENT_IDX, re-enabling tells whether the guest added more meanwhile.
            if !event_idx || !vring.enable_notification().map_err(queue_err)? {
                return Ok(());
            }
        }
    }

    /// Takes every available chain off the ring and hands each to an I/O thread
    /// (served here only if no thread could be started).
    fn drain(&self, vring: &VringRwLock, queue: usize) -> io::Result<()> {
        let mem = self.inner.mem.memory();
        let Some(count) = self.inner.in_flight.get(queue) else {
            return Ok(());
        };
        let chains: Vec<_> = {
            let mut st = vring.get_mut();
            // A stopped ring (GET_VRING_BASE) is not read again: its base is out.
            if !st.get_queue().ready() {
                return Ok(());
            }
            let chains: Vec<_> = match st.get_queue_mut().iter(mem.clone()) {
                Ok(it) => it.collect(),
                // A broken avail ring (index too far ahead): nothing on it can be trusted.
                Err(_) => return Ok(()),
            };
            // Counted under the ring's lock, so `stop_vring` (which runs after the
            // ring is marked stopped, under the same lock) sees every chain taken.
            count.fetch_add(chains.len(), Ordering::AcqRel);
            chains
        };
        for chain in chains {
            let head = chain.head_index();
            let descs = chain
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    write: d.is_write_only(),
                })
                .collect();
            let job = Job {
                queue,
                head,
                descs,
                vring: vring.clone(),
                mem: mem.clone(),
                backend: self.clone(),
            };
            match self.inner.io.get_or_init(|| start_io_threads(IO_THREADS)) {
                Some(q) => q.push(job),
                None => job.run(),
            }
        }
        Ok(())
    }

    /// Serves one request; returns the bytes written into guest memory (the used
    /// length).
    fn serve(&self, mem: &GuestMemoryLoadGuard<GuestMemoryMmap<()>>, descs: &[Desc]) -> u32 {
        let l = match layout(descs) {
            Ok(l) => l,
            Err(crate::request::ChainError::NoStatus) => return 0,
            Err(_) => {
                // A status byte exists at the end whenever the last descriptor is
                // writable: answer IOERR there.
                if let Some(last) = descs.iter().rev().find(|d| d.len > 0) {
                    if last.write {
                        let at = last.addr.saturating_add(u64::from(last.len) - 1);
                        let _ = mem.write_obj(VIRTIO_BLK_S_IOERR as u8, GuestAddress(at));
                        return 1;
                    }
                }
                return 0;
            }
        };
        let (status, written) = self.execute(mem, &l);
        let _ = mem.write_obj(status as u8, GuestAddress(l.status));
        written.saturating_add(1)
    }

    fn execute(&self, mem: &GuestMemoryMmap<()>, l: &Layout) -> (u32, u32) {
        let mut hb = [0u8; HEADER_LEN];
        if gather(mem, &l.header, &mut hb).is_none() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let h = Header::decode(&hb);
        let img = &self.inner.image;
        let ro = self.inner.cfg.read_only;
        match h.kind {
            Kind::In => {
                let len = l.writable_len();
                let Some((off, _)) = byte_range(h.sector, len, self.size()) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let Some(mut bufs) = slices_mut(mem, &l.writable) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match img.read_vectored(&mut bufs, off) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            Kind::Out => {
                if ro {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = l.readable_len();
                let Some((off, _)) = byte_range(h.sector, len, self.size()) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let Some(bufs) = slices(mem, &l.readable) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                ok_or_ioerr(img.write_vectored(&bufs, off))
            }
            Kind::Flush => ok_or_ioerr(img.flush()),
            Kind::GetId => {
                let id = encode_id(&self.inner.cfg.serial);
                let n = (l.writable_len() as usize).min(id.len());
                match scatter(mem, &l.writable, &id[..n]) {
                    Some(()) => (VIRTIO_BLK_S_OK, n as u32),
                    None => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            Kind::Discard | Kind::WriteZeroes => {
                if ro {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                self.segments(mem, l, h.kind == Kind::WriteZeroes)
            }
            Kind::Other(_) => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    fn segments(&self, mem: &GuestMemoryMmap<()>, l: &Layout, zeroes: bool) -> (u32, u32) {
        let len = l.readable_len();
        if len == 0
            || !len.is_multiple_of(SEGMENT_LEN as u64)
            || len / SEGMENT_LEN as u64 > u64::from(MAX_SEGMENTS)
        {
            return (VIRTIO_BLK_S_UNSUPP, 0);
        }
        let mut buf = vec![0u8; len as usize];
        if gather(mem, &l.readable, &mut buf).is_none() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let size = self.size();
        let unmap = self.inner.cfg.unmap;
        for raw in buf.chunks_exact(SEGMENT_LEN) {
            let s = Segment::decode(raw);
            let allowed = if zeroes { SEGMENT_UNMAP } else { 0 };
            if s.sectors > MAX_SEGMENT_SECTORS || s.flags & !allowed != 0 {
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
            let Some((off, n)) = byte_range(s.sector, u64::from(s.sectors) * 512, size) else {
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            let r = if zeroes {
                let flags = ZeroFlags {
                    may_unmap: unmap && s.flags & SEGMENT_UNMAP != 0,
                    fast: false,
                };
                self.inner.image.write_zeroes(off, n, flags)
            } else if unmap {
                self.inner.image.discard(off, n)
            } else {
                Ok(())
            };
            if r.is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
        }
        (VIRTIO_BLK_S_OK, 0)
    }
}

fn ok_or_ioerr(r: vdisk::Result<()>) -> (u32, u32) {
    match r {
        Ok(()) => (VIRTIO_BLK_S_OK, 0),
        Err(_) => (VIRTIO_BLK_S_IOERR, 0),
    }
}

fn queue_err(e: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue: {e}"))
}

fn signal(st: &mut VringState<Memory>) -> io::Result<()> {
    // Without EVENT_IDX needs_notification always says yes.
    if st.needs_notification().map_err(queue_err)? {
        st.signal_used_queue()?;
    }
    Ok(())
}

/// Host (pointer, length) pieces of guest spans; None if any byte is outside guest
/// memory. A span crossing two memory regions gives two pieces.
fn pieces(mem: &GuestMemoryMmap<()>, spans: &[Span]) -> Option<Vec<(*mut u8, usize)>> {
    let mut out = Vec::with_capacity(spans.len());
    for s in spans {
        let mut got = 0usize;
        for sl in GuestMemoryBackend::get_slices(mem, GuestAddress(s.addr), s.len as usize) {
            let sl = sl.ok()?;
            got += sl.len();
            out.push((sl.ptr_guard_mut().as_ptr(), sl.len()));
        }
        if got != s.len as usize {
            return None;
        }
    }
    Some(out)
}

/// Guest spans as buffers the engine writes into (zero copy).
fn slices_mut<'m>(mem: &'m GuestMemoryMmap<()>, spans: &[Span]) -> Option<Vec<IoSliceMut<'m>>> {
    Some(
        pieces(mem, spans)?
            .into_iter()
            // SAFETY: each piece lies inside a region of `mem`, mapped for as long as
            // the borrow of `mem` (a load guard held across the request) lives. The
            // guest may touch the same memory concurrently, as with any DMA; the engine
            // only writes bytes into it.
            .map(|(p, n)| IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, n) }))
            .collect(),
    )
}

/// Guest spans as buffers the engine reads from (zero copy).
fn slices<'m>(mem: &'m GuestMemoryMmap<()>, spans: &[Span]) -> Option<Vec<IoSlice<'m>>> {
    Some(
        pieces(mem, spans)?
            .into_iter()
            // SAFETY: as in `slices_mut`; the engine only reads these bytes.
            .map(|(p, n)| IoSlice::new(unsafe { std::slice::from_raw_parts(p as *const u8, n) }))
            .collect(),
    )
}

/// Copies the first `out.len()` bytes of `spans` into `out` (small control data).
fn gather(mem: &GuestMemoryMmap<()>, spans: &[Span], out: &mut [u8]) -> Option<()> {
    let mut at = 0;
    for s in spans {
        if at == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - at);
        mem.read_slice(&mut out[at..at + n], GuestAddress(s.addr))
            .ok()?;
        at += n;
    }
    (at == out.len()).then_some(())
}

/// Copies `data` into the start of `spans`.
fn scatter(mem: &GuestMemoryMmap<()>, spans: &[Span], data: &[u8]) -> Option<()> {
    let mut at = 0;
    for s in spans {
        if at == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], GuestAddress(s.addr))
            .ok()?;
        at += n;
    }
    (at == data.len()).then_some(())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.cfg.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = encode_config(&Config {
            size: self.size(),
            num_queues: self.inner.cfg.num_queues,
            blk_size: self.inner.cfg.blk_size,
        });
        // Bytes past the structure read as zero; the request size is bounded by the
        // vhost-user message size the library accepts.
        let size = (size as usize).min(4096);
        (0..size)
            .map(|i| {
                (offset as usize)
                    .checked_add(i)
                    .and_then(|j| c.get(j).copied())
                    .unwrap_or(0)
            })
            .collect()
    }

    fn update_memory(&self, _mem: Memory) -> io::Result<()> {
        // `mem` is the object the backend already holds (the daemon swaps its
        // contents): nothing to do.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.cfg.num_queues.min(64))
            .map(|q| 1u64 << q)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        // One queue per thread: the event is that queue's kick.
        let q = usize::from(device_event);
        if q >= self.num_queues() {
            return Ok(());
        }
        for vring in vrings {
            self.process_queue(vring, q)?;
        }
        Ok(())
    }

    /// GET_VRING_BASE: the ring is already marked stopped; its requests in flight
    /// complete before the base is read, so nothing is added to its used ring after
    /// the VMM took it back (a reset or restart reuses the ring memory).
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        self.wait_until(|n| n.get(q).is_none_or(|c| c.load(Ordering::Acquire) == 0));
        Ok(())
    }
}
