//! The generic, vectored guest data path above the format drivers.
//!
//! A driver describes its mapping through [`super::mapping::Mapper`]; everything that
//! moves guest bytes lives here, once, for every format:
//! - [`read`]: split a read at mapping boundaries; data straight into the caller's
//!   buffers (vectored), zeroes, backing reads (zeroes past the backing image's end),
//!   compressed clusters through the driver's decompressor;
//! - [`write`](mod@write): in-place writes behind the driver's guard, allocating writes with their
//!   copy-on-write head and tail in one vectored write, commit/abort;
//! - [`direct`]: a guest range that is one allocated host run, for a front-end's own
//!   asynchronous transfer;
//! - [`inflight`]: the list of guest ranges being allocated and the counted condvar
//!   wait that orders overlapping requests (the lists live in the drivers, under their
//!   own locks);
//! - [`status`]: block status through a backing chain (the walk the chain layer and
//!   zero detection share);
//! - [`zero`]: QEMU's `is_zero` rule for partial-cluster zero writes;
//! - `iov`: sub-ranges of `IoSlice` lists without allocating.

pub mod direct;
pub mod inflight;
mod iov;
pub mod read;
pub mod status;
pub mod write;
pub mod zero;

pub use inflight::{InFlight, Waiters};
pub use read::read_vectored;
pub use status::{chain_status, ChainExtent};
pub use write::write_vectored;
pub use zero::is_zero;
