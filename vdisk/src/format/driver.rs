//! The contract between a format and the layers above it: the [`Driver`] trait and
//! the types its methods take and return.

use super::{CheckReport, Format, Repair};
use crate::error::{Result, Unsupported};
use crate::storage::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// The backing file an image's header names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingSpec {
    /// The name as stored (relative names are relative to the image's directory).
    pub name: String,
    /// The recorded format, if any (probe when `None`).
    pub format: Option<Format>,
}

/// Opens the backing file named by an image's header. Supplied by the chain layer.
pub type BackingResolver<'a> = dyn FnMut(&BackingSpec) -> Result<Arc<dyn Driver>> + 'a;

/// Options every format understands at open time.
#[derive(Clone, Debug, Default)]
pub struct DriverOptions {
    /// No writes; the file is never modified (not even dirty bits).
    pub read_only: bool,
    /// Bytes of L2-table cache (qcow2/QED); `None` = the format's default.
    pub l2_cache_size: Option<u64>,
    /// Bytes of refcount-block cache (qcow2); `None` = default.
    pub refcount_cache_size: Option<u64>,
    /// Do not open the backing file even if the header names one (`backing: none`);
    /// unallocated ranges then read as zeroes.
    pub no_backing: bool,
    /// Open even if the image needs a check/repair first; used by `check` so it can report
    /// (and, for `check -r`, repair: qcow2 then opens a corrupt image read-write, still
    /// refusing guest writes until the repair clears the corrupt bit).
    pub skip_repair: bool,
}

/// What one layer says about a range of the guest disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data stored in this layer.
    Data,
    /// Reads as zeroes, decided by this layer (no fall-through to the backing file).
    Zero,
    /// Not allocated in this layer: reads come from the backing file (zeroes without one).
    Unallocated,
}

/// A run of guest bytes with one status in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (> 0).
    pub len: u64,
    /// Status.
    pub kind: ExtentKind,
    /// Host offset of the first byte when the run is contiguous in the file.
    pub offset: Option<u64>,
    /// Stored compressed.
    pub compressed: bool,
}

/// Flags for [`Driver::write_zeroes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (it must still read as zeroes).
    pub may_unmap: bool,
    /// Fail with [`Error::Unsupported`](crate::Error::Unsupported) instead of writing zero bytes the slow way.
    pub fast: bool,
}

/// Format-specific information for `info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatSpecific {
    /// Nothing to add (raw).
    None,
    /// qcow2 details, as qemu-img's `format-specific` object.
    Qcow2 {
        /// "0.10" or "1.1".
        compat: String,
        /// "zlib" or "zstd".
        compression_type: String,
        /// Lazy refcounts enabled.
        lazy_refcounts: bool,
        /// Refcount width.
        refcount_bits: u32,
        /// Corrupt bit set.
        corrupt: bool,
        /// Extended L2 entries.
        extended_l2: bool,
    },
    /// QED has no specific information in qemu-img.
    Qed,
}

/// One internal snapshot, as `qemu-img info` lists it (QEMU's `SnapshotInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique ID string.
    pub id: String,
    /// User-chosen name (tag).
    pub name: String,
    /// Size of the saved VM state in bytes (0 for a disk-only snapshot).
    pub vm_state_size: u64,
    /// Creation time, seconds since the Unix epoch.
    pub date_sec: u64,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Guest clock when the snapshot was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Guest instruction count (record/replay), when recorded.
    pub icount: Option<u64>,
}

/// An open image of one format, over one storage. All I/O takes `&self`: a driver is
/// shared between threads and orders its own metadata updates.
pub trait Driver: Send + Sync + std::fmt::Debug {
    /// The format.
    fn format(&self) -> Format;
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;
    /// Allocation unit, if the format has one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// The storage the image lives on.
    fn storage(&self) -> &Arc<dyn Storage>;
    /// Reads guest bytes; the range must lie inside [`Driver::size`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes guest bytes; the range must lie inside [`Driver::size`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Reads consecutive guest bytes into several buffers (one request); the range must
    /// lie inside [`Driver::size`]. Drivers on the generic data path
    /// ([`super::datapath`]) read straight into the buffers.
    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        super::check_range(offset, total, self.size())?;
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Writes consecutive guest bytes from several buffers (one request); the range must
    /// lie inside [`Driver::size`].
    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        super::check_range(offset, total, self.size())?;
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Makes a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;
    /// Hints that a range is no longer needed; contents afterwards are unspecified
    /// (formats here make it read as zeroes or as the backing file, as QEMU does).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Status of the range starting at `offset` (at most `len` bytes) in this layer only.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;
    /// The backing file as named in the header.
    fn backing_spec(&self) -> Option<BackingSpec> {
        None
    }
    /// The open backing image, if any.
    fn backing(&self) -> Option<&Arc<dyn Driver>> {
        None
    }
    /// Format-specific info.
    fn format_specific(&self) -> FormatSpecific {
        FormatSpecific::None
    }
    /// Whether the image is marked dirty (qcow2 dirty bit, QED NEED_CHECK).
    fn is_dirty(&self) -> bool {
        false
    }
    /// Internal snapshots, in table order (none for formats without them).
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }
    /// Checks (and optionally repairs) metadata consistency.
    fn check(&self, _repair: Repair) -> Result<CheckReport> {
        Err(Unsupported::NoCheck(self.format().name()).into())
    }
    /// Writes one cluster-aligned, cluster-sized block compressed.
    fn write_compressed(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Unsupported::NoCompression(self.format().name()).into())
    }
    /// Changes the guest size. Shrinking needs `shrink`.
    fn resize(&self, new_size: u64, shrink: bool) -> Result<()>;
    /// Rewrites the backing file reference in the header (`rebase -u`).
    fn set_backing_spec(&self, _spec: Option<&BackingSpec>) -> Result<()> {
        Err(Unsupported::NoBackingFile(self.format().name()).into())
    }
    /// The format's persistent dirty bitmaps, if it stores them (qcow2).
    fn bitmaps(&self) -> Option<&dyn super::bitmap::PersistentBitmaps> {
        None
    }
    /// Flushes and marks the image clean. Called once when the last user lets go.
    fn close(&self) -> Result<()> {
        self.flush()
    }
}

/// What `create` needs from the caller, already resolved by the chain layer.
#[derive(Clone, Debug, Default)]
pub struct CreateSpec {
    /// Guest size in bytes.
    pub size: u64,
    /// Backing file to record.
    pub backing: Option<BackingSpec>,
    /// Format options as `-o key=value` pairs, in order, not yet interpreted.
    pub options: Vec<(String, String)>,
}
