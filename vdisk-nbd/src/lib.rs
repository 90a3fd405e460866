//! NBD server for vdisk images: a drop-in for qemu-nbd, serving any format the
//! library opens through the public [`vdisk::Image`] API.
//!
//! - [`proto`]: wire constants and header layouts.
//! - [`handshake`]: fixed-newstyle option negotiation.
//! - [`transmission`]: request execution with concurrent workers per connection.
//! - [`uring`]: a connection's io_uring for O_DIRECT reads and writes.
//! - [`server`]: accept loop, client limits, orderly shutdown.
//! - [`export`]: the served image and its policy; block status translation.
//! - [`cli`]: `vdisk serve` (qemu-nbd's options).
//! - [`exports`]: the other exports `vdisk serve` runs (vhost-user-blk, FUSE).
//! - [`daemon`]: `vdisk storage-daemon`, several exports in one process.
#![warn(missing_docs)]

pub mod cli;
pub mod daemon;
pub mod export;
pub mod exports;
pub mod handshake;
pub mod limiter;
pub mod log;
pub mod queue;
pub mod server;
pub mod stream;
pub mod transmission;
pub mod uring;

/// The NBD wire format, shared with the NBD client storage of the library.
pub use vdisk::storage::nbd::proto;
