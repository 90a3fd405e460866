//! VHDX (Hyper-V virtual hard disk v2), as MS-VHDX 1.0 specifies it and qemu-img
//! reads and writes it (dynamic and fixed images; no differencing images).
//!
//! Files by concern:
//! - [`header`]: file identifier, the two headers, the two region tables (CRC-32C);
//! - [`metadata`]: the metadata table and items, the BAT geometry;
//! - [`log`]: the log: finding the active sequence, replaying it;
//! - `io`: reads, writes, zero writes and block status through the BAT;
//! - `create`: new images as qemu-img lays them out; [`options`].
//!
//! Open: the current header is the valid one with the higher sequence number; a
//! non-zero log GUID means the log may hold entries: opened read-write, the active
//! sequence is replayed and the log GUID cleared before anything else (MS-VHDX 2.3.3);
//! opened read-only, a log with entries is refused (as qemu does: it must never be
//! ignored). A read-write open then writes both headers with a new file write GUID,
//! and the first guest write writes them again with a new data write GUID.
//!
//! Crash rules: a new payload block is appended (the file grown by one block, which
//! reads as zeroes), its data written and flushed before the BAT entry pointing at it
//! is written (8 bytes in place, atomic within a sector). BAT entries are not journaled
//! through the log: the ordering alone keeps the BAT from pointing at missing data.
//!
//! Concurrency: one allocation mutex orders BAT changes; reads and writes to present
//! blocks take no lock beyond reading the in-memory BAT.

pub mod descriptor;
pub mod header;
pub mod log;
pub mod metadata;
pub mod options;

mod create;
mod io;

use super::{CheckReport, Driver, Extent, Format, Repair, ZeroFlags};
use crate::error::{Corruption, Error, Problem, Result, Structure, Unsupported, VhdxProblem};
use crate::format::registry::OpenArgs;
use crate::storage::Storage;
use header::Header;
use metadata::Metadata;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// BAT payload states.
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
/// Undefined contents (read as zeroes).
pub const PAYLOAD_UNDEFINED: u64 = 1;
/// Reads as zeroes.
pub const PAYLOAD_ZERO: u64 = 2;
/// Unmapped (read as zeroes).
pub const PAYLOAD_UNMAPPED: u64 = 3;
/// The state of unmapped blocks written by VHDX 0.95 implementations.
pub const PAYLOAD_UNMAPPED_V095: u64 = 5;
/// Data present at the entry's offset.
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
/// Some sectors present (differencing images).
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
/// Low bits of a BAT entry holding the state.
pub const STATE_MASK: u64 = 7;
/// Bits of a BAT entry holding the file offset (MiB units from bit 20).
pub const OFFSET_MASK: u64 = !0xF_FFFF;

/// An open VHDX image.
#[derive(Debug)]
pub struct Vhdx {
    storage: Arc<dyn Storage>,
    md: Metadata,
    /// The BAT, in memory (it lies inside the file, so its size is bounded by it).
    bat: RwLock<Vec<u64>>,
    bat_offset: u64,
    headers: Mutex<(usize, Header)>,
    read_only: bool,
    /// The data write GUID was renewed this session.
    data_guid_written: AtomicBool,
    /// The log was replayed by this open (check reports it as fixed).
    replayed: bool,
    /// Orders allocations and BAT writes.
    alloc: Mutex<()>,
    /// File ranges no payload block may overlap: header section, log, BAT, metadata.
    reserved: Vec<(u64, u64)>,
}

fn bad(s: Structure, p: VhdxProblem) -> Error {
    Corruption::new(s, Problem::Vhdx(p)).into()
}

impl Vhdx {
    /// Opens a VHDX image (replaying its log when opened read-write).
    pub fn open(args: OpenArgs<'_, '_>) -> Result<Vhdx> {
        let st = args.meta;
        let read_only = args.opts.read_only;
        let skip_check = args.opts.skip_repair;
        let file_len = st.len()?;
        let mut id = [0u8; 8];
        st.read_at(&mut id, 0)?;
        if &id != header::FILE_SIGNATURE {
            return Err(bad(Structure::VhdxHeader, VhdxProblem::NoValidHeader));
        }
        let mut best: Option<(usize, Header)> = None;
        for (i, off) in header::HEADER_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; header::HEADER_LEN];
            st.read_at(&mut b, *off)?;
            if let Some(h) = Header::parse(&b) {
                if best.as_ref().is_none_or(|(_, c)| h.sequence > c.sequence) {
                    best = Some((i, h));
                }
            }
        }
        let (cur, mut h) =
            best.ok_or_else(|| bad(Structure::VhdxHeader, VhdxProblem::NoValidHeader))?;
        let mut replayed = false;
        if h.log_guid != [0; 16] {
            if h.log_version != 0 {
                return Err(bad(Structure::VhdxLog, VhdxProblem::LogUnsupported));
            }
            let log_end = h.log_offset.checked_add(h.log_length as u64);
            if h.log_offset % (1 << 20) != 0
                || h.log_offset < header::HEADER_SECTION_END
                || log_end.is_none_or(|e| e > file_len)
            {
                return Err(bad(Structure::VhdxLog, VhdxProblem::LogUnsupported));
            }
            let seq = log::active_sequence(&*st, h.log_offset, h.log_length as u64, &h.log_guid)?;
            if !seq.is_empty() {
                if read_only {
                    return Err(bad(Structure::VhdxLog, VhdxProblem::LogNeedsReplay));
                }
                log::replay(&*st, &seq)?;
                replayed = true;
            }
        }
        let file_len = st.len()?;
        let mut regions = None;
        for off in header::REGION_OFFSETS {
            let mut b = vec![0u8; header::TABLE_LEN];
            st.read_at(&mut b, off)?;
            if let Some(r) = header::parse_regions(&b) {
                regions = Some(r);
                break;
            }
        }
        let regions = regions
            .ok_or_else(|| bad(Structure::VhdxRegionTable, VhdxProblem::NoValidRegionTable))?;
        let (bat_r, meta_r) = header::find_regions(&regions, file_len)?;
        let mut mb = vec![0u8; meta_r.length as usize];
        st.read_at(&mut mb, meta_r.offset)?;
        let md = metadata::parse(&mb)?;
        let entries = metadata::bat_entries(&md);
        if entries.saturating_mul(8) > bat_r.length as u64 {
            return Err(bad(
                Structure::VhdxBat,
                VhdxProblem::Field("BAT length", bat_r.length as u64),
            ));
        }
        let mut bb = vec![0u8; (entries * 8) as usize];
        st.read_at(&mut bb, bat_r.offset)?;
        let bat: Vec<u64> = bb.chunks_exact(8).map(|c| header::le64(c, 0)).collect();
        let v = Vhdx {
            storage: st,
            md,
            bat: RwLock::new(bat),
            bat_offset: bat_r.offset,
            headers: Mutex::new((cur, h.clone())),
            read_only,
            data_guid_written: AtomicBool::new(false),
            replayed,
            alloc: Mutex::new(()),
            reserved: vec![
                (0, header::HEADER_SECTION_END),
                (h.log_offset, h.log_length as u64),
                (bat_r.offset, bat_r.length as u64),
                (meta_r.offset, meta_r.length as u64),
            ],
        };
        if !skip_check {
            // As qemu's open (outside check): a BAT pointing outside the file or into
            // metadata makes the image unusable.
            if let Some(&(i, off)) = io::bat_errors(&v)?.first() {
                return Err(bad(
                    Structure::VhdxBat,
                    VhdxProblem::BlockOffset {
                        block: i,
                        offset: off,
                    },
                ));
            }
        }
        if !read_only {
            // A new session: a new file write GUID; the log is empty now.
            h.file_write_guid = header::random_guid();
            h.log_guid = [0; 16];
            *v.lock_headers() = (cur, h);
            v.update_headers(false)?;
        }
        Ok(v)
    }

    fn lock_headers(&self) -> std::sync::MutexGuard<'_, (usize, Header)> {
        self.headers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the header twice (the inactive copy, then the other), each with the next
    /// sequence number, as qemu's `vhdx_update_headers`; `new_data_guid` renews the
    /// data write GUID first.
    fn update_headers(&self, new_data_guid: bool) -> Result<()> {
        let mut g = self.lock_headers();
        if new_data_guid {
            g.1.data_write_guid = header::random_guid();
        }
        for _ in 0..2 {
            let slot = 1 - g.0;
            g.1.sequence = g.1.sequence.wrapping_add(1);
            self.storage
                .write_at(&g.1.to_bytes(), header::HEADER_OFFSETS[slot])?;
            g.0 = slot;
        }
        self.storage.flush()?;
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if !self.data_guid_written.swap(true, Ordering::AcqRel) {
            self.update_headers(true)?;
        }
        Ok(())
    }

    fn bat(&self) -> std::sync::RwLockReadGuard<'_, Vec<u64>> {
        self.bat.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl Driver for Vhdx {
    fn format(&self) -> Format {
        Format::Vhdx
    }
    fn size(&self) -> u64 {
        self.md.size
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.md.block_size as u64)
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::format::check_range(offset, buf.len() as u64, self.md.size)?;
        io::read(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        crate::format::check_range(offset, buf.len() as u64, self.md.size)?;
        self.writable()?;
        io::write(self, buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        crate::format::check_range(offset, len, self.md.size)?;
        self.writable()?;
        io::write_zeroes(self, offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // qemu's VHDX driver has no discard: nothing changes.
        crate::format::check_range(offset, len, self.md.size)
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage.flush()?;
        Ok(())
    }
    /// Payload blocks are stored as is, and QEMU allocates whole blocks (8 MiB and up)
    /// for partial writes, leaving the rest a hole of the file: convert skips those
    /// holes instead of reading and testing megabytes of zeroes. `map` is unchanged.
    fn file_holes_read_zero(&self) -> bool {
        true
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        crate::format::check_range(offset, len, self.md.size)?;
        if len == 0 {
            return Err(crate::error::Invalid::EmptyBlockStatus { offset }.into());
        }
        io::block_status(self, offset, len)
    }
    fn check(&self, _repair: Repair) -> Result<CheckReport> {
        io::check(self)
    }
    fn resize(&self, _new_size: u64, _shrink: bool) -> Result<()> {
        Err(Unsupported::NoResize("vhdx").into())
    }
}
