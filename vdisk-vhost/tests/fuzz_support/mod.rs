//! The `vhost_user` fuzz target's body (issue 14, part 2), shared by the libFuzzer
//! binary in `fuzz/` and by `tests/fuzz_replay.rs`: a hostile guest's descriptor
//! chain and request bytes through the virtio-blk request path (chain split, header
//! and segment decode, range checks, image I/O against guest memory), without a
//! socket or a virtqueue.
#![allow(dead_code)]

use std::sync::Arc;
use vdisk::format::DriverOptions;
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Format, Image};
use vdisk_vhost::request::Desc;
use vdisk_vhost::{BlkBackend, BlkConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory: one region at 0 (descriptors may point anywhere, also past it).
const MEM: usize = 64 << 10;
/// The disk behind the device.
const DISK: usize = 1 << 20;
/// Descriptors taken from one input (a queue bounds a chain; 16 reach every path).
const MAX_DESCS: usize = 16;

/// Input: flags (bit 0 read-only, bit 1 unmap), a descriptor count, then per
/// descriptor addr (u32 BE), len (u32 BE), flags (bit 0 device-writable); the rest is
/// copied into guest memory at 0 (request headers, data, segments).
pub fn vhost_user(data: &[u8]) {
    vhost_user_used(data);
}

/// [`vhost_user`], returning the used length and the status byte of the last
/// descriptor (`None` when the input is too short to form a chain).
pub fn vhost_user_used(data: &[u8]) -> Option<(u32, u8)> {
    let (&flags, rest) = data.split_first()?;
    let (&n, mut rest) = rest.split_first()?;
    let n = (n as usize).min(MAX_DESCS);
    let mut descs = Vec::with_capacity(n);
    for _ in 0..n {
        if rest.len() < 9 {
            return None;
        }
        descs.push(Desc {
            addr: u64::from(u32::from_be_bytes(rest[..4].try_into().ok()?)),
            len: u32::from_be_bytes(rest[4..8].try_into().ok()?),
            write: rest[8] & 1 != 0,
        });
        rest = &rest[9..];
    }
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).ok()?;
    let body = &rest[..rest.len().min(MEM)];
    gm.write_slice(body, GuestAddress(0)).ok()?;
    let mem = GuestMemoryAtomic::new(gm.clone());
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![0u8; DISK]));
    let image = Image::open_storage(st, Format::Raw, &DriverOptions::default()).ok()?;
    let cfg = BlkConfig {
        read_only: flags & 1 != 0,
        unmap: flags & 2 != 0,
        ..BlkConfig::default()
    };
    let dev = BlkBackend::new(Arc::new(image), cfg, mem);
    let used = dev.serve_chain(&descs);
    let status = descs
        .iter()
        .rev()
        .find(|d| d.len > 0)
        .and_then(|d| {
            gm.read_obj::<u8>(GuestAddress(d.addr + u64::from(d.len) - 1))
                .ok()
        })
        .unwrap_or(0xff);
    Some((used, status))
}

/// A target's body.
pub type Target = fn(&[u8]);

/// The targets by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[("vhost_user", vhost_user)];
