//! vdisk: a disk-image engine for raw, qcow2 and QED images with backing chains.
//!
//! Layers, bottom to top:
//! - [`storage`]: a host file (positional I/O, flush, holes, QEMU-compatible locks), or
//!   an in-memory / fault-injecting stand-in.
//! - [`format`](mod@format): raw, qcow2, QED drivers mapping guest offsets to host offsets.
//! - [`chain`]: backing files (path resolution, probing, loop detection, status).
//! - [`image`]: the public handle front-ends use, the only door for guest writes and
//!   metadata changes; [`hook`]: the write hooks it runs every change through;
//!   [`layer`]: read-only views of the chain's layers.
#![warn(missing_docs)]

pub mod chain;
pub mod commit;
pub mod crypto;
pub mod error;
pub mod format;
pub mod hook;
pub mod image;
pub mod layer;
pub mod policy;
mod siblings;
pub mod storage;

pub use error::{Error, Result, SnapshotError};
pub use format::{CheckReport, Extent, ExtentKind, Format, Repair, ZeroFlags};
pub use hook::{Change, Request, WriteHook};
pub use image::{CreateOptions, DirectIo, Image, OpenOptions, SnapshotParam};
pub use layer::ImageLayer;
pub use storage::{AioMode, CacheMode};
