//! VHD (QEMU's `vpc`): Virtual PC / Hyper-V / Azure virtual hard disks, fixed and
//! dynamic (differencing disks are read as dynamic ones, without their parent, as QEMU
//! does).
//!
//! Layout and rules: Microsoft's "Virtual Hard Disk Image Format Specification"; the
//! sizes, geometry and allocation behaviour are qemu-img 10's. Files by concern:
//! - [`footer`]: the footer (checksum, CHS geometry, size rules) decoded and encoded;
//! - [`dynheader`]: the dynamic disk header;
//! - [`bat`]: the block allocation table, loaded and validated;
//! - `io`: the mapping contract ([`crate::format::mapping::Mapper`]): runs, in-place
//!   targets and block allocation, through the generic data path;
//! - `create`: new images (`subformat=dynamic|fixed`, `force_size`);
//! - [`options`], [`descriptor`]: the declared options and the registration.
//!
//! A fixed VHD is its guest data followed by the footer: every guest byte is written in
//! place. A dynamic VHD maps blocks (2 MiB from qemu-img) through the BAT; each block is
//! a sector bitmap followed by the block's data; reads ignore the bitmap (as QEMU) and
//! unallocated blocks read as zeroes. qemu-img has no `check`, `resize` or `measure`
//! for vpc, and neither has this driver.
//!
//! Crash safety of a block allocation (all under the allocation lock, in this order):
//! the footer is written at the new end of the file (the file then ends in a valid
//! footer whatever happens next), the block's bitmap (all ones, as QEMU writes it) over
//! the old footer; the guest data is written by the data path; `commit` flushes (data,
//! bitmap and footer durable) and only then writes the BAT entry. A crash before the BAT
//! entry leaves a block nobody references (a leak; QEMU's own order writes the BAT
//! before the data). New blocks are placed past the end of the file, so their unwritten
//! parts read as zeroes; where that is not known (space left over by a crash, an aborted
//! allocation, trailing bytes), the whole block is written, zeroes included.
//!
//! Concurrency: lookups take the BAT's read lock for the moment of a lookup; allocated
//! blocks are written in place with no lock (a block is never freed or moved). Two
//! allocations of the same block are ordered by an in-flight list: the second waits,
//! then finds the block allocated.

pub mod bat;
pub(crate) mod create;
pub mod descriptor;
pub mod dynheader;
pub mod footer;
mod io;
pub mod options;

use crate::error::{Corruption, Invalid, Problem, Result, Structure, Unsupported};
use crate::format::datapath::{self, InFlight, Waiters};
use crate::format::{check_range, Driver, DriverOptions, Extent, Format, ZeroFlags};
use crate::storage::Storage;
use dynheader::DynHeader;
use footer::{Footer, FOOTER_LEN, TYPE_FIXED};
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// A VHD image.
#[derive(Debug)]
pub struct Vpc {
    storage: Arc<dyn Storage>,
    read_only: bool,
    /// Guest size (from the footer, by QEMU's rules).
    size: u64,
    /// The footer bytes as read (rewritten verbatim at the end of a growing file).
    footer: [u8; FOOTER_LEN],
    /// `None` for a fixed disk.
    dynamic: Option<Dynamic>,
}

/// A dynamic disk's state.
#[derive(Debug)]
struct Dynamic {
    header: DynHeader,
    /// Bytes of each block's sector bitmap.
    bitmap: u64,
    /// The BAT.
    bat: RwLock<Vec<u32>>,
    alloc: Mutex<AllocState>,
    cv: Condvar,
}

/// What the allocation lock guards.
#[derive(Debug, Default)]
struct AllocState {
    /// Blocks being allocated.
    inflight: InFlight,
    waiters: Waiters,
    /// Where the next block goes; the footer sits there.
    free_offset: u64,
    /// Bytes of the file below this may hold stale data (past a leaked block, or
    /// trailing bytes): a block allocated below it is written whole.
    stale_end: u64,
}

impl Vpc {
    /// Opens a VHD: the footer at offset 0 (dynamic, differencing) or at the end of the
    /// file (fixed), validated as QEMU's `vpc_open` does.
    pub fn open(storage: Arc<dyn Storage>, opts: &DriverOptions) -> Result<Vpc> {
        let file_len = storage.len()?;
        let too_short = || {
            Corruption::new(
                Structure::VpcFooter,
                Problem::Truncated {
                    have: Some(file_len),
                    need: FOOTER_LEN as u64,
                },
            )
        };
        if file_len < FOOTER_LEN as u64 {
            return Err(too_short().into());
        }
        let mut buf = [0u8; FOOTER_LEN];
        storage.read_at(&mut buf, 0)?;
        let fixed = !Footer::has_cookie(&buf);
        if fixed {
            storage.read_at(&mut buf, file_len - FOOTER_LEN as u64)?;
        }
        let f = Footer::decode(&buf)?;
        if fixed && f.disk_type != TYPE_FIXED {
            return Err(Corruption::new(Structure::VpcFooter, Problem::BadMagic).into());
        }
        let size = f.disk_size()?;
        let dynamic = if fixed {
            if size + FOOTER_LEN as u64 > file_len {
                return Err(Corruption::new(
                    Structure::VpcFooter,
                    Problem::PastEnd {
                        bytes: size + FOOTER_LEN as u64,
                        end: file_len,
                    },
                )
                .into());
            }
            None
        } else {
            let off = f.data_offset;
            if off.checked_add(1024).is_none_or(|e| e > file_len) {
                return Err(Corruption::new(
                    Structure::VpcDynamicHeader,
                    Problem::PastEnd {
                        bytes: 1024,
                        end: file_len,
                    },
                )
                .at(off)
                .into());
            }
            let mut hb = [0u8; dynheader::HEADER_LEN];
            storage.read_at(&mut hb, off)?;
            let header = DynHeader::decode(&hb)?;
            let loaded = bat::load(&*storage, &header, off, size, file_len)?;
            let bitmap = header.bitmap_size();
            // Anything past the footer at the free offset is not known to be zeroes.
            let stale_end = if file_len > loaded.free_offset + FOOTER_LEN as u64 {
                file_len
            } else {
                0
            };
            Some(Dynamic {
                header,
                bitmap,
                bat: RwLock::new(loaded.entries),
                alloc: Mutex::new(AllocState {
                    free_offset: loaded.free_offset,
                    stale_end,
                    ..AllocState::default()
                }),
                cv: Condvar::new(),
            })
        };
        Ok(Vpc {
            storage,
            read_only: opts.read_only,
            size,
            footer: buf,
            dynamic,
        })
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(crate::error::Error::ReadOnly);
        }
        Ok(())
    }
}

impl Driver for Vpc {
    fn format(&self) -> Format {
        Format::Vpc
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> Option<u64> {
        self.dynamic.as_ref().map(|d| d.header.block_size as u64)
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
    /// path). VHD never moves or frees a data block (no resize, discard or repair;
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
        // QEMU's vpc driver has no discard: the request changes nothing.
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
        self.dynamic.is_none()
    }
    fn resize(&self, _new_size: u64, _shrink: bool) -> Result<()> {
        Err(Unsupported::NoResize("vpc").into())
    }
}

pub use create::create;
