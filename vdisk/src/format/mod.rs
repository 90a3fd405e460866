//! Format layer: maps guest offsets to host offsets and owns each format's metadata.
//!
//! A format implements [`Driver`] on top of a [`Storage`]. It never opens files itself:
//! its backing file reaches it through the [`BackingResolver`] the chain layer passes to
//! `open`, so a format knows nothing of paths, probing or front-ends.

pub mod qcow2;
pub mod qed;
pub mod raw;

use crate::error::{Error, Result};
use crate::storage::Storage;
use std::sync::Arc;

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// A plain file: guest offset = host offset.
    Raw,
    /// QEMU copy-on-write v2 (compat=0.10) and v3 (compat=1.1).
    Qcow2,
    /// QEMU enhanced disk.
    Qed,
}

impl Format {
    /// The name qemu-img uses (`raw`, `qcow2`, `qed`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
        }
    }
    /// Parses a qemu-img format name.
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "qed" => Ok(Format::Qed),
            other => Err(Error::invalid(format!("Unknown driver '{other}'"))),
        }
    }
    /// Guesses the format from the first bytes of a file (at least 512 wanted).
    pub fn probe(head: &[u8]) -> Format {
        if qcow2::probe(head) {
            Format::Qcow2
        } else if qed::probe(head) {
            Format::Qed
        } else {
            Format::Raw
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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
    /// Fail with [`Error::Unsupported`] instead of writing zero bytes the slow way.
    pub fast: bool,
}

/// What `check` should repair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repair {
    /// Fix leaked clusters.
    pub leaks: bool,
    /// Fix corruptions too (`-r all`).
    pub errors: bool,
}

/// The result of a consistency check, with the fields of `qemu-img check --output=json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions left after repair.
    pub corruptions: u64,
    /// Leaked clusters left after repair.
    pub leaks: u64,
    /// Errors that stopped the check from completing (I/O errors...).
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// First byte after the last cluster in use.
    pub image_end_offset: Option<u64>,
    /// Guest clusters.
    pub total_clusters: Option<u64>,
    /// Guest clusters allocated in this image.
    pub allocated_clusters: Option<u64>,
    /// Allocated guest clusters not contiguous with their predecessor.
    pub fragmented_clusters: Option<u64>,
    /// Compressed guest clusters.
    pub compressed_clusters: Option<u64>,
    /// One line per problem found, as qemu-img prints them
    /// (e.g. `Leaked cluster 9 refcount=1 reference=0`).
    pub messages: Vec<String>,
    /// Set when the check stopped early the way QEMU's fails (the errno it returns,
    /// e.g. EIO for `-r leaks` on refcounts that need a rebuild): `messages` holds the
    /// lines up to that point and no report is printed.
    pub failed: Option<i32>,
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
        Err(Error::unsupported(format!(
            "This image format ({}) does not support checks",
            self.format()
        )))
    }
    /// Writes one cluster-aligned, cluster-sized block compressed.
    fn write_compressed(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::unsupported(format!(
            "Compression is not supported for the {} format",
            self.format()
        )))
    }
    /// Changes the guest size. Shrinking needs `shrink`.
    fn resize(&self, new_size: u64, shrink: bool) -> Result<()>;
    /// Rewrites the backing file reference in the header (`rebase -u`).
    fn set_backing_spec(&self, _spec: Option<&BackingSpec>) -> Result<()> {
        Err(Error::unsupported(format!(
            "{} images have no backing file",
            self.format()
        )))
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

/// Creates an empty image of `format` on `storage` (which should be empty).
pub fn create(format: Format, storage: &Arc<dyn Storage>, spec: &CreateSpec) -> Result<()> {
    match format {
        Format::Raw => raw::create(storage, spec),
        Format::Qcow2 => qcow2::create(storage, spec),
        Format::Qed => qed::create(storage, spec),
    }
}

/// Opens an image of a known format on `storage`.
pub fn open(
    format: Format,
    storage: Arc<dyn Storage>,
    opts: &DriverOptions,
    backing: &mut BackingResolver<'_>,
) -> Result<Arc<dyn Driver>> {
    match format {
        Format::Raw => Ok(Arc::new(raw::Raw::open(storage, opts)?)),
        Format::Qcow2 => Ok(Arc::new(qcow2::Qcow2::open(storage, opts, backing)?)),
        Format::Qed => Ok(Arc::new(qed::Qed::open(storage, opts, backing)?)),
    }
}

/// Reads from a backing image into `buf`; bytes past the backing image's end (or all of
/// them without a backing image) read as zeroes.
pub fn read_backing(backing: Option<&Arc<dyn Driver>>, buf: &mut [u8], offset: u64) -> Result<()> {
    let Some(b) = backing else {
        buf.fill(0);
        return Ok(());
    };
    let size = b.size();
    let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    if n > 0 {
        b.read_at(&mut buf[..n], offset)?;
    }
    buf[n..].fill(0);
    Ok(())
}

/// Checks that `[offset, offset+len)` lies inside a guest disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::invalid(format!(
            "request at offset {offset} length {len} is past the end of the image ({size} bytes)"
        ))),
    }
}

/// Parses a size with qemu's suffixes (`k`, `M`, `G`, `T`, `P`, `E`, binary; `b` = 512-byte
/// sectors are not accepted, as in qemu-img 10; a bare number is bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let bad = || Error::invalid(format!("Invalid size '{s}'"));
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                'E' => 1 << 60,
                _ => return Err(bad()),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(v) = num.parse::<u64>() {
        return v.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    if f.is_nan() || f < 0.0 {
        return Err(bad());
    }
    let v = f * mult as f64;
    if v >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v as u64)
}

/// Parses an on/off option value the way qemu does.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(Error::invalid(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}
