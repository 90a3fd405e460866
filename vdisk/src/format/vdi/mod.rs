//! VDI: VirtualBox disk images, dynamic and static (QEMU's `vdi`).
//!
//! Layout and rules: the VDI 1.1 header as QEMU reads it (1 MiB blocks, no snapshots or
//! parents). Files by concern:
//! - [`header`]: the header, decoded, validated (QEMU's rules and wording) and encoded;
//! - [`bmap`]: the block map (one little-endian u32 per guest block: the index of its
//!   data block, or unallocated / discarded);
//! - `io`: the mapping contract ([`crate::format::mapping::Mapper`]) through the
//!   generic data path: runs, in-place targets, allocation of whole blocks;
//! - `create`: new images (`static=on|off`); `check`: QEMU's block map check;
//! - [`options`], [`descriptor`]: the declared options and the registration.
//!
//! A block is allocated whole (the request's bytes and zeroes, as QEMU writes it) at
//! data block index `blocks_allocated`. Crash safety of an allocation: the data path
//! writes the whole block; `commit` writes the header with the new `blocks_allocated`,
//! flushes, and only then writes the block map entry, so a durable entry never points
//! at a block that is not, and a crash before the entry leaves a counted but unused
//! block (what QEMU's check reports as an allocated-blocks mismatch), never a block
//! handed out twice. Such blocks are found at open and handed out again first (safe:
//! every allocation writes its block whole). QEMU's own order is data, header, map,
//! with no flush.
//!
//! Concurrency: lookups take the map's read lock for the moment of a lookup; allocated
//! blocks are written in place with no lock (blocks are never freed or moved). An
//! allocation holds the allocation lock to reserve its block and to commit (header and
//! map writes are ordered by it); a second allocation of the same block waits in the
//! in-flight list, then finds it allocated. qemu-img has no `resize` or `measure` for
//! vdi, and neither has this driver.

pub mod bmap;
mod check;
mod create;
pub mod descriptor;
pub mod header;
mod io;
pub mod options;

use crate::error::{Invalid, Result, Unsupported};
use crate::format::datapath::{self, InFlight, Waiters};
use crate::format::{
    check_range, CheckReport, Driver, DriverOptions, Extent, Format, Repair, ZeroFlags,
};
use crate::storage::Storage;
use header::Header;
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Condvar, Mutex, RwLock};

pub use create::create;

/// A VDI image.
#[derive(Debug)]
pub struct Vdi {
    storage: Arc<dyn Storage>,
    read_only: bool,
    size: u64,
    /// The header as opened (geometry fields never change).
    geo: Header,
    bmap: RwLock<Vec<u32>>,
    alloc: Mutex<AllocState>,
    cv: Condvar,
}

/// What the allocation lock guards.
#[derive(Debug, Default)]
struct AllocState {
    inflight: InFlight,
    waiters: Waiters,
    /// The header as last written (`blocks_allocated` counts reserved blocks).
    header: Option<Header>,
    /// `blocks_allocated` as on disk (what check compares with, as QEMU's).
    disk_count: u32,
    /// Data blocks below `blocks_allocated` that no entry names (left by a crash or an
    /// aborted allocation): handed out again before the count grows. Safe because a
    /// block is always written whole before an entry names it.
    free: Vec<u32>,
}

impl Vdi {
    /// Opens a VDI image, validating its header and block map.
    pub fn open(storage: Arc<dyn Storage>, opts: &DriverOptions) -> Result<Vdi> {
        let file_len = storage.len()?;
        if file_len < header::HEADER_LEN as u64 {
            return Err(Invalid::FileTooShort {
                format: "VDI",
                len: file_len,
            }
            .into());
        }
        let mut hb = [0u8; header::HEADER_LEN];
        storage.read_at(&mut hb, 0)?;
        let mut h = Header::decode(&hb)?;
        let geo = h.clone();
        let disk_count = geo.blocks_allocated;
        let entries = bmap::load(&*storage, &h, file_len)?;
        // Where the next block goes: after every block in use, whatever the header's
        // count says (a count behind the map would hand a block out twice).
        let used = bmap::next_free(&entries, h.blocks_in_image);
        h.blocks_allocated = h.blocks_allocated.max(used).min(h.blocks_in_image);
        let free = bmap::unused(&entries, h.blocks_allocated);
        Ok(Vdi {
            storage,
            read_only: opts.read_only,
            size: h.size(),
            geo,
            bmap: RwLock::new(entries),
            alloc: Mutex::new(AllocState {
                disk_count,
                header: Some(h),
                free,
                ..AllocState::default()
            }),
            cv: Condvar::new(),
        })
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(crate::error::Error::ReadOnly);
        }
        Ok(())
    }
}

impl Driver for Vdi {
    fn format(&self) -> Format {
        Format::Vdi
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.block_size as u64)
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_vectored(&mut [IoSliceMut::new(buf)], offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_vectored(&[IoSlice::new(buf)], offset)
    }
    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.size)?;
        datapath::read_vectored(self, bufs, offset)
    }
    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.writable()?;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.size)?;
        datapath::write_vectored(self, bufs, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        io::write_zeroes(self, offset, len)
    }
    /// Allocated data as one transfer of the caller's own (the NBD server's io_uring
    /// path). VDI never moves or frees a data block (no resize, discard or repair;
    /// zero writes zero allocated blocks in place), so the in-place rules of the
    /// ordinary path hold with no guard.
    fn direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Option<crate::format::mapping::DirectRange<'_>> {
        datapath::direct::gated(self, self.writable(), offset, len, write)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // QEMU's vdi driver has no discard: the request changes nothing.
        self.writable()?;
        check_range(offset, len, self.size)
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        Ok(self.storage.flush()?)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Err(Invalid::EmptyBlockStatus { offset }.into());
        }
        Ok(io::map_range(self, offset, len)?.extent())
    }
    fn file_status_refines(&self) -> bool {
        self.geo.image_type == header::TYPE_STATIC
    }
    fn check(&self, repair: Repair) -> Result<CheckReport> {
        check::check(self, repair)
    }
    fn resize(&self, _new_size: u64, _shrink: bool) -> Result<()> {
        Err(Unsupported::NoResize("vdi").into())
    }
}
