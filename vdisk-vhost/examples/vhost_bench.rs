//! A host-side load generator for vhost-user-blk back-ends: plays the VMM (one queue,
//! guest memory in a memfd) and keeps `--qd` requests in flight, each request's data
//! split in `--seg`-byte descriptors of an indirect table as a Linux guest's page
//! vectors are. It measures a back-end without a guest, so vdisk's and
//! qemu-storage-daemon's can be compared on the same job without the emulator's noise:
//!
//! ```sh
//! cargo run --release -p vdisk-vhost --example vhost_bench -- SOCKET \
//!     [--rw read|write|randread|randwrite] [--bs BYTES] [--qd N] [--count N] \
//!     [--seg BYTES] [--span BYTES]
//! ```
//!
//! Prints requests, wall seconds and IOPS. Every request must complete with status OK.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::Instant;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Ring size: one descriptor per request (the data is in an indirect table).
const QSIZE: u16 = 256;
/// Descriptor flags (virtio 1.x split ring).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Feature bit the generator turns off so every completion is signalled (simpler).
const EVENT_IDX: u64 = 1 << 29;
/// Where the per-slot header, status byte and indirect table live.
const SLOTS: u64 = 0x10000;
/// Bytes per slot of control data (header, status, table of up to 4092 entries).
const SLOT_LEN: u64 = 0x10000;

struct Args {
    sock: String,
    write: bool,
    random: bool,
    bs: u64,
    qd: u64,
    count: u64,
    seg: u64,
    span: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        sock: String::new(),
        write: false,
        random: false,
        bs: 1 << 20,
        qd: 4,
        count: 2000,
        seg: 4096,
        span: 192 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match x.as_str() {
            "--rw" => {
                let v = it.next().unwrap_or_default();
                a.write = v.contains("write");
                a.random = v.starts_with("rand");
            }
            "--bs" => a.bs = val("--bs")?,
            "--qd" => a.qd = val("--qd")?,
            "--count" => a.count = val("--count")?,
            "--seg" => a.seg = val("--seg")?,
            "--span" => a.span = val("--span")?,
            s if a.sock.is_empty() && !s.starts_with('-') => a.sock = s.to_string(),
            s => return Err(format!("unknown argument {s}")),
        }
    }
    if a.sock.is_empty() {
        return Err(
            "usage: vhost_bench SOCKET [--rw R] [--bs B] [--qd N] [--count N] [--seg B] [--span B]"
                .into(),
        );
    }
    let segs = a.bs.div_ceil(a.seg.max(1));
    // The slot's table (64 bytes in) must fit its SLOT_LEN: header + segments + status.
    if a.bs == 0 || !a.bs.is_multiple_of(512) || a.seg == 0 || segs + 2 > 4092 {
        return Err("--bs must be a positive multiple of 512 in at most 4090 segments".into());
    }
    if a.qd == 0 || a.qd > u64::from(QSIZE) || a.span < a.bs {
        return Err("--qd must be 1..=256 and --span at least --bs".into());
    }
    Ok(a)
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a valid C string; the descriptor is owned by the File.
    let fd = unsafe { libc::memfd_create(c"vhost-bench-guest".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd was just created and is owned here only.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size the guest memory");
    f
}

/// A small xorshift, so random offsets need no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let data_base = SLOTS + a.qd * SLOT_LEN;
    let mem_len = (data_base + a.qd * a.bs).next_multiple_of(1 << 21);
    let file = memfd(mem_len);
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        mem_len as usize,
        Some(FileOffset::new(file.try_clone().expect("dup memfd"), 0)),
    )])
    .expect("map guest memory");
    let host = mem.get_host_address(GuestAddress(0)).expect("host address") as u64;

    let mut fe = Frontend::connect(Path::new(&a.sock), 1).expect("connect");
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES") & !EVENT_IDX;
    fe.set_features(features).expect("SET_FEATURES");
    let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES")
        & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
    fe.set_protocol_features(proto)
        .expect("SET_PROTOCOL_FEATURES");
    // seg_max (config offset 12): a guest never sends more data descriptors.
    let cfg = fe
        .get_config(0, 16, VhostUserConfigFlags::WRITABLE, &[0u8; 16])
        .expect("GET_CONFIG")
        .1;
    let seg_max = u32::from_le_bytes([cfg[12], cfg[13], cfg[14], cfg[15]]);
    let segs = a.bs.div_ceil(a.seg);
    if segs > u64::from(seg_max) {
        eprintln!("{segs} segments per request, the back-end's seg_max is {seg_max}");
        std::process::exit(2);
    }
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::new(
        0,
        mem_len,
        host,
        0,
        file.as_raw_fd(),
    )])
    .expect("SET_MEM_TABLE");
    // Split ring at 0: descriptors, then avail at 0x1000, used at 0x2000.
    let (desc, avail, used) = (0u64, 0x1000u64, 0x2000u64);
    fe.set_vring_num(0, QSIZE).expect("SET_VRING_NUM");
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host + desc,
            used_ring_addr: host + used,
            avail_ring_addr: host + avail,
            log_addr: None,
        },
    )
    .expect("SET_VRING_ADDR");
    fe.set_vring_base(0, 0).expect("SET_VRING_BASE");
    let kick = EventFd::new(0).expect("eventfd");
    let call = EventFd::new(0).expect("eventfd");
    fe.set_vring_call(0, &call).expect("SET_VRING_CALL");
    fe.set_vring_kick(0, &kick).expect("SET_VRING_KICK");
    fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");

    let w = |v: u64, at: u64| mem.write_obj(v, GuestAddress(at)).expect("guest write");
    let w32 = |v: u32, at: u64| mem.write_obj(v, GuestAddress(at)).expect("guest write");
    let w16 = |v: u16, at: u64| mem.write_obj(v, GuestAddress(at)).expect("guest write");
    // Fill the write buffers with something that is not zeroes.
    for s in 0..a.qd {
        let b = vec![0x5au8; a.bs as usize];
        mem.write_slice(&b, GuestAddress(data_base + s * a.bs))
            .expect("fill");
    }
    let blocks = a.span / a.bs;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seq = 0u64;
    let mut next_off = || {
        let b = if a.random {
            rng.next() % blocks
        } else {
            let b = seq % blocks;
            seq += 1;
            b
        };
        b * a.bs
    };
    let mut avail_idx = 0u16;
    let mut used_seen = 0u16;
    // Prepares slot `s` (descriptor `s` of the ring) for a request at `off` and makes
    // it available.
    let submit = |s: u64, off: u64, avail_idx: &mut u16| {
        let ctl = SLOTS + s * SLOT_LEN;
        let (hdr, status, table) = (ctl, ctl + 16, ctl + 64);
        w32(u32::from(a.write), hdr);
        w32(0, hdr + 4);
        w(off / 512, hdr + 8);
        mem.write_obj(0xAAu8, GuestAddress(status))
            .expect("guest write");
        let data_flags = if a.write { 0 } else { F_WRITE };
        let mut parts: Vec<(u64, u32, u16)> = vec![(hdr, 16, 0)];
        let mut done = 0;
        while done < a.bs {
            let n = a.seg.min(a.bs - done);
            parts.push((data_base + s * a.bs + done, n as u32, data_flags));
            done += n;
        }
        parts.push((status, 1, F_WRITE));
        let last = parts.len() - 1;
        for (i, &(addr, len, fl)) in parts.iter().enumerate() {
            let at = table + i as u64 * 16;
            let next = if i < last { F_NEXT } else { 0 };
            w(addr, at);
            w32(len, at + 8);
            w16(fl | next, at + 12);
            w16(i as u16 + 1, at + 14);
        }
        let d = desc + s * 16;
        w(table, d);
        w32(parts.len() as u32 * 16, d + 8);
        w16(F_INDIRECT, d + 12);
        w16(0, d + 14);
        w16(s as u16, avail + 4 + u64::from(*avail_idx % QSIZE) * 2);
        *avail_idx = avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        w16(*avail_idx, avail + 2);
    };

    let start = Instant::now();
    let mut submitted = 0u64;
    let mut completed = 0u64;
    for s in 0..a.qd.min(a.count) {
        submit(s, next_off(), &mut avail_idx);
        submitted += 1;
    }
    kick.write(1).expect("kick");
    while completed < a.count {
        // Waits until the back-end signals (the descriptor is shared with the
        // back-end, which may have made it non-blocking); then every new used entry
        // is taken.
        let mut pfd = libc::pollfd {
            fd: call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        let _ = call.read();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let idx: u16 = mem.read_obj(GuestAddress(used + 2)).expect("guest read");
        let mut again = false;
        while used_seen != idx {
            let e = used + 4 + u64::from(used_seen % QSIZE) * 8;
            used_seen = used_seen.wrapping_add(1);
            let id: u32 = mem.read_obj(GuestAddress(e)).expect("guest read");
            let s = u64::from(id);
            let st: u8 = mem
                .read_obj(GuestAddress(SLOTS + s * SLOT_LEN + 16))
                .expect("guest read");
            if st != 0 {
                eprintln!("request in slot {s} failed with status {st}");
                std::process::exit(1);
            }
            completed += 1;
            if submitted < a.count {
                submit(s, next_off(), &mut avail_idx);
                submitted += 1;
                again = true;
            }
        }
        if again {
            kick.write(1).expect("kick");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} requests of {} bytes ({}, qd {}, {}-byte segments, seg_max {seg_max}): {secs:.3} s, {:.0} IOPS",
        a.count,
        a.bs,
        match (a.random, a.write) {
            (false, false) => "read",
            (false, true) => "write",
            (true, false) => "randread",
            (true, true) => "randwrite",
        },
        a.qd,
        a.seg,
        a.count as f64 / secs
    );
}
