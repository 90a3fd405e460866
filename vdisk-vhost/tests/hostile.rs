//! A hostile (or just broken) vhost-user front-end against the backend: the test plays
//! the VMM with the `vhost` crate's front-end, builds split virtqueues by hand in a
//! shared memfd, and sends malformed descriptor chains and out-of-range requests. Each
//! gets an error status (or, without a status byte, is only returned); the backend
//! never panics and keeps serving the other queue, a new connection after the VMM goes
//! away, and stops cleanly when asked.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vdisk::hook::Request;
use vdisk::{Image, OpenOptions, WriteHook};
use vdisk_vhost::{BlkConfig, VhostExport};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const DISK: u64 = 1 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// A status byte value the backend never writes: "untouched".
const UNTOUCHED: u8 = 0xAA;

struct Server {
    stop: UnixStream,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(read_only: bool, queues: u16) -> Server {
        Server::start_with(read_only, queues, Vec::new())
    }

    /// [`Server::start`] with write hooks on the image.
    fn start_with(read_only: bool, queues: u16, hooks: Vec<Arc<dyn WriteHook>>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, vec![0u8; DISK as usize]).unwrap();
        let image = Arc::new(
            Image::open(
                &img,
                &OpenOptions {
                    read_only,
                    hooks,
                    ..OpenOptions::default()
                },
            )
            .unwrap(),
        );
        let sock = dir.path().join("vhost.sock");
        let export = VhostExport {
            socket: sock.clone(),
            blk: BlkConfig {
                read_only,
                num_queues: queues,
                unmap: true,
                ..BlkConfig::default()
            },
        };
        let (stop_rx, stop) = UnixStream::pair().unwrap();
        let thread =
            std::thread::spawn(move || vdisk_vhost::serve(image, &export, &stop_rx, &|| {}));
        let until = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < until, "backend never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Server {
            stop,
            thread: Some(thread),
            sock,
            _dir: dir,
        }
    }

    /// Asks the backend to stop; it must return Ok promptly.
    fn stop(mut self) {
        self.stop.write_all(&[1]).unwrap();
        let t = self.thread.take().unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while !t.is_finished() {
            assert!(Instant::now() < until, "backend did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join()
            .expect("backend thread panicked")
            .expect("backend failed");
        assert!(!self.sock.exists(), "socket left behind");
    }
}

/// One queue the test drives: rings at fixed places in guest memory.
struct Ring {
    base: u64,
    avail_idx: u16,
    used_seen: u16,
    kick: EventFd,
    _call: EventFd,
}

impl Ring {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    fn used(&self) -> u64 {
        self.base + 0x2000
    }
}

/// The test's VMM: a connection, guest memory and two rings.
struct Vmm {
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    rings: Vec<Ring>,
    features: u64,
    _file: File,
}

fn memfd() -> File {
    // SAFETY: memfd_create with a valid C string; the descriptor is owned by the File.
    let fd = unsafe { libc::memfd_create(c"vdisk-test-guest".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is owned here only.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(MEM as u64).unwrap();
    f
}

impl Vmm {
    fn connect(sock: &Path, queues: usize) -> Vmm {
        let mut fe = Frontend::connect(sock, queues as u64).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(proto.contains(VhostUserProtocolFeatures::MQ));
        fe.set_protocol_features(proto).unwrap();
        assert!(fe.get_queue_num().unwrap() >= queues as u64);
        let file = memfd();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::new(
            0,
            MEM as u64,
            host,
            0,
            file.as_raw_fd(),
        )])
        .unwrap();
        let mut rings = Vec::new();
        for q in 0..queues {
            let base = 0x10000 * (q as u64 + 1);
            for off in 0..0x3000u64 {
                mem.write_obj(0u8, GuestAddress(base + off)).unwrap();
            }
            fe.set_vring_num(q, QSIZE).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: host + base,
                    used_ring_addr: host + base + 0x2000,
                    avail_ring_addr: host + base + 0x1000,
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(q, 0).unwrap();
            let kick = EventFd::new(0).unwrap();
            let call = EventFd::new(0).unwrap();
            fe.set_vring_call(q, &call).unwrap();
            fe.set_vring_kick(q, &kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            rings.push(Ring {
                base,
                avail_idx: 0,
                used_seen: 0,
                kick,
                _call: call,
            });
        }
        Vmm {
            fe,
            mem,
            rings,
            features,
            _file: file,
        }
    }

    /// Writes raw descriptors (index, addr, len, flags, next) and makes `head` available.
    fn submit_raw(&mut self, q: usize, descs: &[(u16, u64, u32, u16, u16)], head: u16) {
        let r = &mut self.rings[q];
        for &(i, addr, len, flags, next) in descs {
            let at = r.desc() + u64::from(i) * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let slot = r.avail() + 4 + u64::from(r.avail_idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(r.avail_idx, GuestAddress(r.avail() + 2))
            .unwrap();
        r.kick.write(1).unwrap();
    }

    /// A linked chain from descriptor 0: (addr, len, device-writable).
    fn submit(&mut self, q: usize, parts: &[(u64, u32, bool)]) {
        let n = parts.len() as u16;
        let descs: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, &(a, l, w))| {
                let i = i as u16;
                let mut f = if w { F_WRITE } else { 0 };
                if i + 1 < n {
                    f |= F_NEXT;
                }
                (i, a, l, f, i + 1)
            })
            .collect();
        self.submit_raw(q, &descs, 0);
    }

    /// Waits for the next used element of queue `q`: (id, len).
    fn complete(&mut self, q: usize) -> (u32, u32) {
        let r = &mut self.rings[q];
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(r.used() + 2)).unwrap();
            if idx != r.used_seen {
                let e = r.used() + 4 + u64::from(r.used_seen % QSIZE) * 8;
                r.used_seen = r.used_seen.wrapping_add(1);
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
                return (id, len);
            }
            assert!(
                Instant::now() < until,
                "request on queue {q} never completed"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Submits a 4 KiB write at sector 0 on queue 0 (descriptors 0-2) and waits until
    /// `arrived` says a [`Gate`] holds it; returns the address of its status byte.
    fn gated_write(&mut self, arrived: &Receiver<()>) -> u64 {
        let (wh, ws) = (0x70000u64, 0x7F000u64);
        self.header(wh, T_OUT, 0);
        self.mem.write_obj(UNTOUCHED, GuestAddress(ws)).unwrap();
        self.submit_raw(
            0,
            &[
                (0, wh, 16, F_NEXT, 1),
                (1, BUF, 4096, F_NEXT, 2),
                (2, ws, 1, F_WRITE, 0),
            ],
            0,
        );
        arrived
            .recv_timeout(Duration::from_secs(10))
            .expect("the write never reached the engine");
        ws
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// One request: header + data + status byte; returns (status, used len).
    fn request(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        data: &[(u64, u32, bool)],
    ) -> (u8, u32) {
        let (hdr, st) = (0x70000, 0x7F000);
        self.header(hdr, kind, sector);
        self.mem.write_obj(UNTOUCHED, GuestAddress(st)).unwrap();
        let mut parts = vec![(hdr, 16, false)];
        parts.extend_from_slice(data);
        parts.push((st, 1, true));
        self.submit(q, &parts);
        let (_, len) = self.complete(q);
        (self.status(st), len)
    }
}

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const BUF: u64 = 0x80000;

#[test]
fn hostile_chains_get_error_status_and_other_queues_keep_serving() {
    let srv = Server::start(false, 2);
    let mut vm = Vmm::connect(&srv.sock, 2);
    assert_eq!(vm.features & (1 << 5), 0, "RO offered on a writable export");
    let (_, cfg) = vm
        .fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        DISK / 512,
        "capacity"
    );

    // A good write and read back on queue 1.
    let pat: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    vm.mem.write_slice(&pat, GuestAddress(BUF)).unwrap();
    assert_eq!(vm.request(1, T_OUT, 8, &[(BUF, 4096, false)]), (S_OK, 1));
    assert_eq!(vm.request(1, T_FLUSH, 0, &[]), (S_OK, 1));
    vm.mem
        .write_slice(&[0u8; 4096], GuestAddress(BUF + 0x2000))
        .unwrap();
    // Read split over two descriptors.
    assert_eq!(
        vm.request(
            1,
            T_IN,
            8,
            &[
                (BUF + 0x2000, 1000, true),
                (BUF + 0x2000 + 1000, 3096, true)
            ]
        ),
        (S_OK, 4097)
    );
    let mut back = vec![0u8; 4096];
    vm.mem
        .read_slice(&mut back, GuestAddress(BUF + 0x2000))
        .unwrap();
    assert_eq!(back, pat);
    let (st, len) = vm.request(1, T_GET_ID, 0, &[(BUF, 20, true)]);
    assert_eq!((st, len), (S_OK, 21));
    let mut id = [0u8; 5];
    vm.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id, b"vdisk");

    // Out of range: past the end, a sector that overflows, a length that crosses the end.
    assert_eq!(
        vm.request(1, T_IN, DISK / 512, &[(BUF, 512, true)]).0,
        S_IOERR
    );
    assert_eq!(
        vm.request(1, T_IN, u64::MAX, &[(BUF, 512, true)]).0,
        S_IOERR
    );
    assert_eq!(
        vm.request(1, T_OUT, DISK / 512 - 1, &[(BUF, 1024, false)])
            .0,
        S_IOERR
    );
    // Data outside guest memory, and wrapping around the address space.
    assert_eq!(vm.request(1, T_IN, 0, &[(1 << 40, 512, true)]).0, S_IOERR);
    assert_eq!(
        vm.request(1, T_OUT, 0, &[(u64::MAX - 100, 512, false)]).0,
        S_IOERR
    );
    assert_eq!(
        vm.request(1, T_IN, 0, &[(MEM as u64 - 256, 512, true)]).0,
        S_IOERR
    );
    // Unknown request type.
    assert_eq!(vm.request(1, 99, 0, &[]).0, S_UNSUPP);
    // Discard / write-zeroes: a bad segment size, too many segments, bad flags, out of
    // range; then good ones.
    assert_eq!(vm.request(1, T_DISCARD, 0, &[(BUF, 15, false)]).0, S_UNSUPP);
    assert_eq!(
        vm.request(1, T_DISCARD, 0, &[(BUF, 16 * 17, false)]).0,
        S_UNSUPP
    );
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut b = Vec::new();
        b.extend_from_slice(&sector.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b
    };
    vm.mem
        .write_slice(&seg(0, 8, 2), GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        vm.request(1, T_WRITE_ZEROES, 0, &[(BUF, 16, false)]).0,
        S_UNSUPP
    );
    vm.mem
        .write_slice(&seg(0, 8, 1), GuestAddress(BUF))
        .unwrap();
    assert_eq!(vm.request(1, T_DISCARD, 0, &[(BUF, 16, false)]).0, S_UNSUPP);
    vm.mem
        .write_slice(&seg(DISK / 512 - 4, 8, 0), GuestAddress(BUF))
        .unwrap();
    assert_eq!(vm.request(1, T_DISCARD, 0, &[(BUF, 16, false)]).0, S_IOERR);
    vm.mem
        .write_slice(&seg(8, 4, 1), GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        vm.request(1, T_WRITE_ZEROES, 0, &[(BUF, 16, false)]).0,
        S_OK
    );

    // Malformed chains. Header too short:
    vm.mem.write_obj(UNTOUCHED, GuestAddress(0x7F000)).unwrap();
    vm.submit(1, &[(0x70000, 8, false), (0x7F000, 1, true)]);
    assert_eq!(vm.complete(1), (0, 1));
    assert_eq!(vm.status(0x7F000), S_IOERR);
    // Readable data after writable data:
    vm.header(0x70000, T_OUT, 0);
    vm.submit(
        1,
        &[
            (0x70000, 16, false),
            (BUF, 512, true),
            (BUF, 512, false),
            (0x7F000, 1, true),
        ],
    );
    assert_eq!(vm.complete(1), (0, 1));
    assert_eq!(vm.status(0x7F000), S_IOERR);
    // No writable status byte: returned with nothing written.
    vm.mem.write_obj(UNTOUCHED, GuestAddress(0x7F000)).unwrap();
    vm.submit(1, &[(0x70000, 16, false), (BUF, 512, false)]);
    assert_eq!(vm.complete(1), (0, 0));
    // A descriptor that loops to itself (the chain is cut at the queue size):
    vm.submit_raw(1, &[(0, 0x70000, 16, F_NEXT, 0)], 0);
    assert_eq!(vm.complete(1), (0, 0));
    // A descriptor index past the table, and a next index past the table:
    vm.submit_raw(1, &[], QSIZE + 3);
    vm.submit_raw(1, &[(0, 0x70000, 16, F_NEXT, 999)], 0);
    // An indirect table outside guest memory (flag 4 = INDIRECT).
    vm.submit_raw(1, &[(0, 1 << 40, 64, 4, 0)], 0);
    // The first is consumed without a used element (there is no such head to
    // return); the other two are returned with nothing written.
    assert_eq!(vm.complete(1), (0, 0));
    assert_eq!(vm.complete(1), (0, 0));
    // Whatever the backend made of those, it still serves queue 0 and queue 1.
    for q in [0, 1] {
        let (st, _) = vm.request(q, T_IN, 8, &[(BUF + 0x4000, 4096, true)]);
        assert_eq!(st, S_OK, "queue {q} after the hostile requests");
    }
    let mut back = vec![0u8; 4096];
    vm.mem
        .read_slice(&mut back, GuestAddress(BUF + 0x4000))
        .unwrap();
    assert_eq!(&back[..2048], &[0u8; 2048][..], "zeroed range");
    assert_eq!(&back[2048..], &pat[2048..]);

    // The VMM goes away (crash): a new one connects and is served.
    drop(vm);
    let mut vm = Vmm::connect(&srv.sock, 1);
    assert_eq!(vm.request(0, T_IN, 8, &[(BUF, 4096, true)]).0, S_OK);
    let mut back = vec![0u8; 4096];
    vm.mem.read_slice(&mut back, GuestAddress(BUF)).unwrap();
    assert_eq!(&back[2048..], &pat[2048..]);
    // Stop while connected.
    srv.stop();
}

#[test]
fn read_only_export_refuses_writes() {
    let srv = Server::start(true, 1);
    let mut vm = Vmm::connect(&srv.sock, 1);
    assert_ne!(vm.features & (1 << 5), 0, "RO not offered");
    assert_eq!(vm.request(0, T_OUT, 0, &[(BUF, 512, false)]).0, S_IOERR);
    vm.mem.write_slice(&[0u8; 16], GuestAddress(BUF)).unwrap();
    assert_eq!(vm.request(0, T_DISCARD, 0, &[(BUF, 16, false)]).0, S_IOERR);
    assert_eq!(
        vm.request(0, T_WRITE_ZEROES, 0, &[(BUF, 16, false)]).0,
        S_IOERR
    );
    assert_eq!(vm.request(0, T_IN, 0, &[(BUF, 512, true)]).0, S_OK);
    assert_eq!(vm.request(0, T_FLUSH, 0, &[]).0, S_OK);
    drop(vm);
    srv.stop();
}

/// Holds every data write in the driver's way until the test releases it, telling the
/// test when one has arrived.
#[derive(Debug)]
struct Gate {
    arrived: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
}

impl WriteHook for Gate {
    fn before(&self, req: &mut Request<'_>) -> vdisk::Result<()> {
        if matches!(req, Request::Write { .. }) {
            let _ = self.arrived.lock().unwrap().send(());
            let _ = self
                .release
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20));
        }
        Ok(())
    }
}

/// A one-queue server whose data writes a [`Gate`] holds, a VMM connected to it, the
/// gate's "arrived" receiver and its "release" sender.
fn gated() -> (Server, Vmm, Receiver<()>, Sender<()>) {
    let (arrived_tx, arrived) = channel();
    let (release, release_rx) = channel();
    let gate = Arc::new(Gate {
        arrived: Mutex::new(arrived_tx),
        release: Mutex::new(release_rx),
    });
    let srv = Server::start_with(false, 1, vec![gate]);
    let vm = Vmm::connect(&srv.sock, 1);
    (srv, vm, arrived, release)
}

#[test]
fn a_slow_request_holds_up_no_other_request_of_its_queue() {
    let (srv, mut vm, arrived, release) = gated();
    // A write (descriptors 0-2) that the gate stops inside the engine...
    let ws = vm.gated_write(&arrived);
    // ...then a read on the same queue (descriptors 3-5), which must complete first.
    let (rh, rs) = (0x71000u64, 0x7E000u64);
    vm.header(rh, T_IN, 64);
    vm.mem.write_obj(UNTOUCHED, GuestAddress(rs)).unwrap();
    vm.submit_raw(
        0,
        &[
            (3, rh, 16, F_NEXT, 4),
            (4, BUF + 0x4000, 4096, F_NEXT | F_WRITE, 5),
            (5, rs, 1, F_WRITE, 0),
        ],
        3,
    );
    assert_eq!(vm.complete(0), (3, 4097), "the read waited for the write");
    assert_eq!(vm.status(rs), S_OK);
    assert_eq!(vm.status(ws), UNTOUCHED, "the write finished early");
    release.send(()).unwrap();
    assert_eq!(vm.complete(0), (0, 1));
    assert_eq!(vm.status(ws), S_OK);
    drop(vm);
    srv.stop();
}

#[test]
fn stopping_a_ring_waits_for_its_requests_in_flight() {
    let (srv, mut vm, arrived, release) = gated();
    let ws = vm.gated_write(&arrived);
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        release.send(()).unwrap();
    });
    // GET_VRING_BASE (a VMM stopping the device: reset, reboot) answers only once the
    // write is on the used ring: nothing may land there after the VMM took it back.
    let t = Instant::now();
    let base = vm.fe.get_vring_base(0).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "the ring stopped with a request in flight"
    );
    assert_eq!(base, 1);
    let used_idx: u16 = vm
        .mem
        .read_obj(GuestAddress(vm.rings[0].used() + 2))
        .unwrap();
    assert_eq!(used_idx, 1, "the write was not completed before the stop");
    assert_eq!(vm.status(ws), S_OK);
    opener.join().unwrap();
    drop(vm);
    srv.stop();
}
