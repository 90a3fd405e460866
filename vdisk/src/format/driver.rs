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

/// Opens a file an image's metadata names besides its backing file (a VMDK
/// descriptor's extents), by the name as stored: relative names are relative to the
/// image's own file. Returns the storage (opened with the image's own access and
/// locks) and the name it was opened by, for display. Supplied by the chain layer.
pub type FileResolver<'a> = dyn FnMut(&str) -> Result<(Arc<dyn Storage>, String)> + 'a;

/// Creates the files an image consists of besides the one being created (VMDK's
/// flat and split extents), by names relative to that file, as QEMU creates extents
/// next to the descriptor. Each call creates (or empties) one file. Supplied by the
/// layer that created the image's own file, which removes every file it made if the
/// format's create fails.
pub trait SiblingFiles: Send + Sync + std::fmt::Debug {
    /// Creates (or truncates) the sibling file `name` and opens it read-write.
    fn create(&self, name: &str) -> Result<Arc<dyn Storage>>;
}

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
    /// The id of the secret ([`crate::crypto::secret`]) that unlocks an encrypted
    /// image (`encrypt.key-secret` for qcow2, `key-secret` for LUKS). Never inherited
    /// by backing files: each layer names its own.
    pub key_secret: Option<String>,
    /// Open an encrypted image without its key: metadata only (`info`), guest I/O
    /// fails. QEMU opens with `BDRV_O_NO_IO` for the same purpose.
    pub no_io: bool,
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

/// The file a guest offset's data lives in ([`Driver::data_file_at`]).
#[derive(Clone, Debug)]
pub struct DataFileAt {
    /// The file (block status host offsets at that guest offset are in it).
    pub storage: Arc<dyn Storage>,
    /// Its name as opened.
    pub name: String,
    /// A raw (flat) extent: its unwritten areas are whatever the file has there, so
    /// the file's holes read as zeroes (QEMU recurses into such files for block status).
    pub raw: bool,
}

/// How grown space is preallocated ([`Driver::preallocate_grown`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreallocMode {
    /// Tables only: the data area reads zeroes and is not reserved.
    Metadata,
    /// Also reserve the data area.
    Falloc,
    /// Also write zeroes to the data area.
    Full,
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
        /// The external data file name the header records (or the node's `data-file`).
        data_file: Option<String>,
        /// The data file is kept a raw image (`data_file_raw`).
        data_file_raw: bool,
    },
    /// QED has no specific information in qemu-img.
    Qed,
    /// VMDK details, as qemu-img's `format-specific` object.
    Vmdk {
        /// Content ID.
        cid: u32,
        /// Parent content ID.
        parent_cid: u32,
        /// `createType`.
        create_type: String,
        /// The extents, in order.
        extents: Vec<VmdkExtentInfo>,
    },
}

/// One VMDK extent as `qemu-img info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmdkExtentInfo {
    /// The extent's file as opened (`None`: the image's own file).
    pub filename: Option<String>,
    /// The extent line's type (`SPARSE`, `FLAT`; empty for a monolithic file).
    pub format: String,
    /// Bytes of the disk it holds.
    pub virtual_size: u64,
    /// Grains are compressed.
    pub compressed: bool,
    /// Grain size (sparse extents).
    pub cluster_size: Option<u64>,
}

/// How an image is encrypted, for `info` (`encrypted: yes` and the `encrypt` block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncryptionInfo {
    /// A LUKS1 header (raw LUKS, or qcow2 `encrypt.format=luks`).
    Luks(crate::crypto::luks::LuksInfo),
    /// qcow2's legacy AES-CBC scheme (`crypt_method` 1).
    Aes,
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
    /// The range `[offset, offset + len)` as one transfer the caller may do itself on
    /// a host file ([`super::mapping::DirectRange`]), when it maps to one contiguous
    /// host run that needs nothing else: data already allocated (for a write,
    /// overwritable in place), no encryption, storage that answers
    /// [`Storage::direct_fd`]. `None` (the default, and on any error: the ordinary
    /// path then reports it) means "use read_at / write_at".
    fn direct(
        &self,
        _offset: u64,
        _len: u64,
        _write: bool,
    ) -> Option<super::mapping::DirectRange<'_>> {
        None
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
    /// Whether block status of this layer's data runs is refined by the host file's own
    /// status (zero where the file has a hole), as QEMU's `BDRV_BLOCK_RECURSE` for
    /// fixed VHDs and static VDIs.
    fn file_status_refines(&self) -> bool {
        false
    }
    /// Whether a hole of the host file under one of this layer's data runs reads as
    /// zeroes through the format (the data is stored as is: not encrypted, not
    /// compressed), so a copy may skip it without reading it. True where
    /// [`Driver::file_status_refines`] is; a format that stores payload blocks as is
    /// may say so without changing what `map` shows.
    fn file_holes_read_zero(&self) -> bool {
        self.file_status_refines()
    }
    /// The name of the external data file guest data lives in (qcow2 `data_file`), as
    /// it was opened; `None` when the data is in [`Driver::storage`].
    fn external_data(&self) -> Option<String> {
        None
    }
    /// The file holding the data at guest `offset` when it is one of several files
    /// the image names (a VMDK extent file); `None` when it is [`Driver::storage`] or
    /// the external data file.
    fn data_file_at(&self, offset: u64) -> Option<DataFileAt> {
        let _ = offset;
        None
    }
    /// How the image is encrypted (`None`: it is not).
    fn encryption(&self) -> Option<EncryptionInfo> {
        None
    }
    /// Whether the image is marked dirty (qcow2 dirty bit, QED NEED_CHECK).
    fn is_dirty(&self) -> bool {
        false
    }
    /// Internal snapshots, in table order (none for formats without them).
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }
    /// Creates an internal snapshot of the active state (`sn.id` empty: the next free
    /// ID) and returns it as stored.
    fn snapshot_create(&self, _sn: &SnapshotInfo) -> Result<SnapshotInfo> {
        Err(crate::error::SnapshotError::NotSupported.into())
    }
    /// Reverts the active state (contents and size) to the snapshot with this ID or,
    /// when no ID matches, this name.
    fn snapshot_apply(&self, _id_or_name: &str) -> Result<SnapshotInfo> {
        Err(crate::error::SnapshotError::NotSupported.into())
    }
    /// Reads the first snapshot matching this ID and/or name instead of the active
    /// disk from now on (read-only images only; QEMU's `bdrv_snapshot_load_tmp`).
    fn snapshot_load(&self, _id: Option<&str>, _name: Option<&str>) -> Result<SnapshotInfo> {
        Err(crate::error::SnapshotError::NotSupported.into())
    }
    /// Deletes the first snapshot matching this ID and/or name.
    fn snapshot_delete(&self, _id: Option<&str>, _name: Option<&str>) -> Result<SnapshotInfo> {
        Err(crate::error::SnapshotError::NotSupported.into())
    }
    /// Changes creation options of the open image (`amend`); only options the format
    /// declares amendable reach it. `status(done, total)` reports progress in the
    /// units and steps QEMU's driver reports them (qemu-img `amend -p` prints them).
    /// `force` (qemu-img's `--force`) allows what QEMU only does when forced (erasing
    /// the last LUKS key slot, overwriting an active one).
    fn amend(
        &self,
        _opts: &super::options::OptionValues,
        _force: bool,
        _status: &dyn Fn(u64, u64),
    ) -> Result<()> {
        Err(Unsupported::NoAmend(self.format().name()).into())
    }
    /// Deallocates every cluster of the active disk, so that it reads as its backing
    /// file (`commit` emptying the top image, QEMU's `bdrv_make_empty`).
    fn make_empty(&self) -> Result<()> {
        Err(Unsupported::NoMakeEmpty(self.format().name()).into())
    }
    /// Checks (and optionally repairs) metadata consistency.
    fn check(&self, _repair: Repair) -> Result<CheckReport> {
        Err(Unsupported::NoCheck(self.format().name()).into())
    }
    /// Whether every write this image stores is compressed by the driver (a
    /// stream-optimized VMDK): writers gain nothing by ordering their writes, and
    /// should issue them from several threads so the compression runs in parallel.
    fn compresses_writes(&self) -> bool {
        false
    }
    /// Writes one cluster-aligned, cluster-sized block compressed.
    fn write_compressed(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Unsupported::NoCompression(self.format().name()).into())
    }
    /// Whether QEMU's `bdrv_get_info` succeeds on this image (qemu-img info then shows
    /// its dirty flag); a VMDK whose extents disagree is the case where it fails.
    fn info_available(&self) -> bool {
        true
    }
    /// Changes the guest size. Shrinking needs `shrink`.
    fn resize(&self, new_size: u64, shrink: bool) -> Result<()>;
    /// Writes VM state (the `savevm` data QEMU keeps beside the guest disk; qemu-io's
    /// `write -b`) at byte `pos` of the VM state area. Guest reads never see it and
    /// bitmaps do not track it. Formats without a VM state area refuse (ENOTSUP).
    fn save_vmstate(&self, _buf: &[u8], _pos: u64) -> Result<()> {
        Err(Unsupported::VmState(self.format().name()).into())
    }
    /// Reads VM state at byte `pos` of the VM state area (never written: zeroes).
    fn load_vmstate(&self, _buf: &mut [u8], _pos: u64) -> Result<()> {
        Err(Unsupported::VmState(self.format().name()).into())
    }
    /// Maps the unallocated clusters of grown space `[offset, offset+len)` to host
    /// clusters ahead of any write (`resize --preallocation=metadata|falloc|full`:
    /// `falloc` also reserves, `full` also writes the data area). Formats with
    /// [`Capabilities::metadata_prealloc`](crate::format::registry::Capabilities) do it.
    fn preallocate_grown(&self, _offset: u64, _len: u64, _mode: PreallocMode) -> Result<()> {
        Err(Unsupported::NoPreallocation(self.format().name()).into())
    }
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
