//! vhost-user-blk backend for vdisk images (`vdisk serve --vhost-user-blk SOCKET`), on
//! the rust-vmm crates: `vhost` / `vhost-user-backend` speak the vhost-user protocol,
//! `virtio-queue` walks the rings, `vm-memory` maps the guest's shared memory.
//!
//! - `request`: virtio-blk requests, segments, config space; the split of an
//!   untrusted descriptor chain (pure, unit-tested);
//! - `backend`: the device (features, config, one worker per queue, I/O straight
//!   between guest memory and [`vdisk::Image`]);
//! - `server`: the socket, reconnects, and stopping.
#![warn(missing_docs)]

pub mod backend;
pub mod request;
pub mod server;

pub use backend::{BlkBackend, BlkConfig};
pub use server::{serve, VhostExport};
