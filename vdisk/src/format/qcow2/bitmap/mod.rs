//! qcow2 persistent dirty bitmaps (the bitmaps extension, autoclear bit 0).
//!
//! - [`ext`]: the header extension (directory location), encoded/decoded.
//! - [`dir`]: the bitmap directory entries, encoded/decoded and validated.
//! - [`table`]: bitmap table entries and table sizes.
//! - `store`: open (load the enabled bitmaps), in-use marking, write-back at close,
//!   directory relocation, add/remove/resize.
//! - `api`: [`PersistentBitmaps`](crate::format::bitmap::PersistentBitmaps) for `Qcow2`.
//!
//! Crash rules:
//! - Before the first guest change after a read-write open, every enabled bitmap is
//!   marked `in_use` in the directory (rewritten in place: only flag bits change, so a
//!   torn write leaves each entry either old or new) and flushed. From then on until a
//!   clean close a crash leaves the bitmap in use, which QEMU and vdisk both treat as
//!   inconsistent (never stale).
//! - At close, each bitmap this image marked is written back: data clusters of an in-use
//!   bitmap are overwritten in place (nobody may trust them), new ones are allocated
//!   behind a barrier (refcounts before references), the tables are written, then the
//!   directory (new table offsets, still in use) is flushed, and only then is `in_use`
//!   cleared and flushed. Clusters no longer referenced are freed last.
//! - A directory that changes length (add, remove) is written complete to new clusters
//!   and flushed before the header names it; the old one is freed afterwards.
//!
//! Memory: one bit per granularity for each loaded bitmap (see
//! [`crate::format::bitmap`]); bitmaps are loaded when enabled on a read-write open, or
//! when an operation needs their contents.

pub(crate) mod dir;
pub(crate) mod ext;
pub(crate) mod table;

mod api;
mod store;

use crate::format::bitmap::DirtyBitmap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

pub(crate) use store::open;

/// The bitmaps of an open image, under the metadata mutex.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Where the directory is (0 = no extension).
    pub dir_offset: u64,
    /// Its length in bytes.
    pub dir_size: u64,
    pub entries: Vec<Entry>,
}

/// One bitmap.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The directory entry as on disk (flags included).
    pub dir: dir::DirEntry,
    /// The bits in memory, when loaded.
    pub mem: Option<Arc<DirtyBitmap>>,
    /// This image set `in_use` on disk: `mem` is the truth and is written back at close.
    pub owned: bool,
}

/// What the write path reads without the metadata mutex.
#[derive(Debug, Default)]
pub(crate) struct Tracking {
    /// The enabled, loaded bitmaps every guest change is recorded in.
    pub active: RwLock<Vec<Arc<DirtyBitmap>>>,
    /// Every active bitmap is marked in use on disk.
    pub armed: AtomicBool,
}
