//! Errors of the format, chain and image layers.
//!
//! Storage has its own error type ([`crate::storage::StorageError`]); it converts into
//! [`Error::Storage`] so callers see one type at the image API.
//!
//! Errors are facts: a corruption names the [`Structure`], the entry index and the host
//! offset as fields and the [`Problem`] as an enum, so front-ends can act on them
//! (NBD errno, exit codes, JSON) without parsing text. `Display` renders the wording the
//! CLI prints (QEMU's where qemu-img prints one). Each kind keeps a string fallback
//! ([`Error::corrupt`], [`Error::invalid`], [`Error::unsupported`]) for call sites that
//! have not been given a typed variant yet.

use crate::storage::StorageError;
use std::fmt;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong opening or using an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host file failed (I/O error, lock conflict...).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The image's metadata violates the format.
    #[error("{0}")]
    Corrupt(Corruption),
    /// A valid image (or a request) uses a feature this engine does not implement.
    #[error("{0}")]
    Unsupported(Unsupported),
    /// A caller passed a bad argument (option value, offset past the end, ...).
    #[error("{0}")]
    InvalidArgument(Invalid),
    /// A write was attempted on an image opened read-only.
    #[error("image is read-only")]
    ReadOnly,
    /// A backing chain names a file twice.
    #[error("backing chain loop: {0}")]
    BackingLoop(String),
    /// The disk image no longer has room (e.g. format size limits).
    #[error("{0}")]
    NoSpace(NoSpace),
}

impl Error {
    /// A corruption described only by a message (fallback for unconverted call sites).
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(Corruption::other(msg))
    }
    /// An invalid argument described only by a message.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(Invalid::Other(msg.into()))
    }
    /// An unsupported feature described only by a message.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(Unsupported::Other(msg.into()))
    }
    /// The corruption this error reports, if it is one.
    pub fn corruption(&self) -> Option<&Corruption> {
        match self {
            Error::Corrupt(c) => Some(c),
            _ => None,
        }
    }
    /// An errno-like code for front-ends that speak POSIX errors (NBD, exit codes).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Storage(e) => e.errno(),
            Error::Corrupt(_) => libc::EIO,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly => libc::EPERM,
            Error::BackingLoop(_) => libc::ELOOP,
            Error::NoSpace(_) => libc::ENOSPC,
        }
    }
}

impl From<Corruption> for Error {
    fn from(c: Corruption) -> Self {
        Error::Corrupt(c)
    }
}

impl From<Invalid> for Error {
    fn from(i: Invalid) -> Self {
        Error::InvalidArgument(i)
    }
}

impl From<Unsupported> for Error {
    fn from(u: Unsupported) -> Self {
        Error::Unsupported(u)
    }
}

impl From<NoSpace> for Error {
    fn from(n: NoSpace) -> Self {
        Error::NoSpace(n)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(StorageError::from(e))
    }
}

/// A metadata structure of an image (named by corruption errors and check findings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Structure {
    /// The qcow2 header (cluster 0).
    Qcow2Header,
    /// A qcow2 header extension (`entry` holds its type code).
    HeaderExtension,
    /// The qcow2 backing file name in the header cluster.
    BackingFileName,
    /// The active qcow2 L1 table.
    L1Table,
    /// A qcow2 L2 table.
    L2Table,
    /// The qcow2 refcount table.
    RefcountTable,
    /// A qcow2 refcount block (`entry` is its refcount table index).
    RefcountBlock,
    /// The qcow2 snapshot table (`entry` is the snapshot index).
    SnapshotTable,
    /// A snapshot's L1 table (`entry` is the snapshot index).
    SnapshotL1Table,
    /// The qcow2 bitmaps header extension.
    BitmapExtension,
    /// The qcow2 bitmap directory (`entry` is the bitmap index).
    BitmapDirectory,
    /// A qcow2 bitmap table (`entry` is the bitmap index).
    BitmapTable,
    /// A guest data cluster.
    DataCluster,
    /// A compressed guest cluster.
    CompressedCluster,
    /// The QED header.
    QedHeader,
    /// The QED backing file name in the header.
    QedBackingFileName,
    /// The QED L1 table.
    QedL1Table,
    /// A QED L2 table (`entry` is its L1 index).
    QedL2Table,
    /// A host cluster, whoever references it (refcount findings).
    HostCluster,
    /// The image as a whole (its file, its flags) or an unnamed structure.
    Image,
}

impl Structure {
    /// The structure's name as it starts a sentence (`L1 table`, `Reference count table`).
    pub fn name(self) -> &'static str {
        match self {
            Structure::Qcow2Header => "qcow2 header",
            Structure::HeaderExtension => "qcow2 header extension",
            Structure::BackingFileName => "Backing file name",
            Structure::L1Table => "L1 table",
            Structure::L2Table => "L2 table",
            Structure::RefcountTable => "Reference count table",
            Structure::RefcountBlock => "refcount block",
            Structure::SnapshotTable => "Snapshot table",
            Structure::SnapshotL1Table => "Snapshot L1 table",
            Structure::BitmapExtension => "bitmaps extension",
            Structure::BitmapDirectory => "bitmap directory",
            Structure::BitmapTable => "bitmap table",
            Structure::DataCluster => "data cluster",
            Structure::CompressedCluster => "compressed cluster",
            Structure::QedHeader => "QED header",
            Structure::QedBackingFileName => "QED backing file name",
            Structure::QedL1Table => "QED L1 table",
            Structure::QedL2Table => "QED L2 table",
            Structure::HostCluster => "cluster",
            Structure::Image => "image",
        }
    }
}

/// A header or table field a corruption is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// qcow2 `cluster_bits`.
    ClusterBits,
    /// QED `cluster_size`.
    ClusterSize,
    /// QED `table_size` (clusters per table).
    TableSize,
    /// qcow2 `header_length`.
    HeaderLength,
    /// QED `header_size` (clusters).
    HeaderSize,
    /// qcow2 `refcount_order`.
    RefcountOrder,
    /// qcow2 `compression_type`.
    CompressionType,
    /// The virtual disk size.
    ImageSize,
    /// Number of entries of a table.
    Entries,
    /// Number of clusters of a table.
    Clusters,
    /// Number of snapshots.
    Count,
    /// Length in bytes (of a name, a table, a snapshot's extra data).
    Length,
}

/// What is wrong with a [`Structure`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The magic number is not the format's.
    BadMagic,
    /// The structure is cut short: the file has `have` bytes (when known), `need` needed.
    Truncated {
        /// Bytes present.
        have: Option<u64>,
        /// Bytes needed.
        need: u64,
    },
    /// The offset is not cluster aligned.
    Unaligned,
    /// The structure overlaps the image header.
    OverlapsHeader,
    /// The structure (of `bytes` bytes) extends past `end` (the end of the file, of the
    /// header cluster, ...).
    PastEnd {
        /// Size of the structure (bytes; clusters for QED's `header_size`).
        bytes: u64,
        /// The limit it crosses.
        end: u64,
    },
    /// A field exceeds its limit.
    TooLarge {
        /// The field.
        field: Field,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A field is below its minimum.
    TooSmall {
        /// The field.
        field: Field,
        /// Its value.
        value: u64,
        /// The minimum.
        min: u64,
    },
    /// A field lies outside `[min, max]` (or violates a rule stated with those bounds).
    OutOfRange {
        /// The field.
        field: Field,
        /// Its value.
        value: u64,
        /// Lower bound.
        min: u64,
        /// Upper bound.
        max: u64,
    },
    /// A field has a value the format forbids.
    Invalid {
        /// The field.
        field: Field,
        /// Its value.
        value: u64,
    },
    /// The L1 table has fewer entries than the disk size needs.
    L1TooSmall {
        /// Entries present.
        entries: u64,
        /// The disk size.
        disk_size: u64,
        /// Entries needed.
        need: u64,
    },
    /// The offset is unaligned or lies past the end of the file.
    Misplaced,
    /// The refcount block covering host cluster `cluster` is missing.
    RefcountMissing {
        /// The host cluster whose refcount was being updated.
        cluster: u64,
    },
    /// A refcount decrement would drop below zero.
    RefcountUnderflow {
        /// The host cluster.
        cluster: u64,
        /// Its refcount.
        refcount: u64,
        /// The (negative) change asked for.
        delta: i64,
    },
    /// A name is not valid UTF-8.
    NotUtf8,
    /// A name is empty or contains NUL.
    EmptyOrNul,
    /// The structure is absent.
    Missing,
    /// The image's corrupt bit is set; writes are refused.
    MarkedCorrupt,
    /// The image's corrupt bit is set and it was opened read/write.
    CorruptOnOpen,
    /// A dirty image whose tables are corrupt, so its refcounts cannot be rebuilt.
    DirtyTablesCorrupt {
        /// Corruptions the reference count found.
        corruptions: u64,
    },
    /// Anything else, described in words (fallback).
    Detail(String),
}

/// A metadata corruption: which structure, which entry, where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    /// The structure at fault.
    pub structure: Structure,
    /// Index of the entry (in its table), or the snapshot / bitmap / extension the
    /// structure belongs to.
    pub entry: Option<u64>,
    /// Host offset of the structure.
    pub offset: Option<u64>,
    /// What is wrong.
    pub problem: Problem,
}

impl Corruption {
    /// A corruption of `structure`.
    pub fn new(structure: Structure, problem: Problem) -> Self {
        Corruption {
            structure,
            entry: None,
            offset: None,
            problem,
        }
    }
    /// A corruption described only by a message (fallback).
    pub fn other(msg: impl Into<String>) -> Self {
        Corruption::new(Structure::Image, Problem::Detail(msg.into()))
    }
    /// With the entry index.
    pub fn entry(mut self, entry: u64) -> Self {
        self.entry = Some(entry);
        self
    }
    /// With the host offset.
    pub fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }
    /// The structure's name including its entry where the wording has it
    /// (`Snapshot 3 L1 table`).
    fn name(&self) -> String {
        match (self.structure, self.entry) {
            (Structure::SnapshotL1Table, Some(i)) => format!("Snapshot {i} L1 table"),
            (s, _) => s.name().to_string(),
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Problem as P;
        use Structure as S;
        let off = self.offset.unwrap_or(0);
        let entry = self.entry.unwrap_or(0);
        match (self.structure, &self.problem) {
            (_, P::Detail(m)) => write!(f, "{m}"),
            // Table placement (qcow2's open validation).
            (_, P::Unaligned) => write!(f, "{} offset {off:#x} is not cluster aligned", self.name()),
            (_, P::OverlapsHeader) => {
                write!(f, "{} at offset {off} overlaps the image header", self.name())
            }
            (S::RefcountBlock, P::Misplaced) => write!(
                f,
                "Refcount block offset {off:#x} is unaligned or past the end of the file; refcount table corrupted"
            ),
            (_, P::RefcountMissing { cluster }) => write!(
                f,
                "refcount block for cluster {cluster} is missing while updating its refcount"
            ),
            (_, P::RefcountUnderflow {
                cluster,
                refcount,
                delta,
            }) => write!(
                f,
                "refcount of cluster {cluster} would drop below zero ({refcount} {delta})"
            ),
            (S::Qcow2Header, P::Truncated { have: Some(have), need }) => write!(
                f,
                "qcow2 header truncated: file has {have} bytes, the header needs {need}"
            ),
            (S::Qcow2Header, P::Truncated { have: None, need }) => {
                write!(f, "qcow2 v3 header truncated (needs {need} bytes)")
            }
            (S::Image, P::Truncated { have, .. }) => write!(
                f,
                "qcow2 image truncated: {} bytes is shorter than the header",
                have.unwrap_or(0)
            ),
            (S::Qcow2Header, P::BadMagic) => write!(f, "Image is not in qcow2 format (bad magic)"),
            (S::Qcow2Header, P::Invalid { field: Field::ClusterBits, value }) => write!(
                f,
                "Unsupported cluster size: 2^{value} (cluster_bits must be 9..21)"
            ),
            (S::Qcow2Header, P::TooSmall { field: Field::ClusterBits, value, .. }) => write!(
                f,
                "extended L2 entries need clusters of at least 16 KiB (cluster_bits {value})"
            ),
            (S::Qcow2Header, P::TooSmall { field: Field::HeaderLength, value, min }) => {
                write!(f, "qcow2 header_length {value} is too small (minimum {min})")
            }
            (S::Qcow2Header, P::TooLarge { field: Field::HeaderLength, value, .. }) => write!(
                f,
                "qcow2 header_length {value} exceeds the cluster size or the file"
            ),
            (S::Qcow2Header, P::TooLarge { field: Field::RefcountOrder, value, max }) => write!(
                f,
                "Reference count width must be 1..64 bits (refcount_order {value} > {max})"
            ),
            (S::Qcow2Header, P::Invalid { field: Field::RefcountOrder, .. }) => {
                write!(f, "qcow2 v2 images need 16-bit refcounts")
            }
            (S::Qcow2Header, P::Invalid { field: Field::CompressionType, .. }) => write!(
                f,
                "qcow2 compression type is zstd but the compression type feature bit is clear"
            ),
            (S::Qcow2Header, P::TooLarge { field: Field::ImageSize, value, .. }) => {
                write!(f, "qcow2 image size {value} is too large")
            }
            (S::BackingFileName, P::TooLarge { value, max, .. }) => write!(
                f,
                "Backing file name too long or empty ({value} bytes, max {max})"
            ),
            (S::BackingFileName, P::PastEnd { bytes, .. }) => write!(
                f,
                "Backing file name at offset {off} length {bytes} lies outside the header cluster"
            ),
            (S::HeaderExtension, P::PastEnd { bytes, .. }) => write!(
                f,
                "qcow2 header extension 0x{entry:08x} at offset {off} (length {bytes}) runs past the header cluster"
            ),
            (S::L1Table, P::TooLarge { value, max, .. }) => {
                write!(f, "Active L1 table too large: {value} entries (max {max})")
            }
            (S::L1Table, P::L1TooSmall { entries, disk_size, need }) => write!(
                f,
                "L1 table is too small: {entries} entries for a {disk_size}-byte disk (needs {need})"
            ),
            (S::RefcountTable, P::TooLarge { value, max, .. }) => write!(
                f,
                "Reference count table too large: {value} clusters (max {max} bytes)"
            ),
            (S::RefcountTable, P::Missing) => {
                write!(f, "Image does not contain a reference count table")
            }
            (S::SnapshotTable, P::TooLarge { field: Field::Count, value, max }) => {
                write!(f, "Too many snapshots: {value} (max {max})")
            }
            (S::SnapshotTable, P::TooLarge { field: Field::Length, value, .. })
                if self.entry.is_some() =>
            {
                write!(f, "snapshot {entry}: too much extra metadata ({value} bytes)")
            }
            (S::SnapshotTable, P::TooLarge { .. }) => write!(
                f,
                "snapshot table runs past the end of the file or exceeds 64 MiB"
            ),
            (S::SnapshotTable, P::PastEnd { .. }) if self.entry.is_some() && self.offset.is_some() => write!(
                f,
                "snapshot table entry {entry} at offset {off:#x} lies past the end of the file or the table size limit"
            ),
            (S::SnapshotTable, P::PastEnd { .. }) if self.entry.is_some() => {
                write!(f, "snapshot table entry {entry} runs past the end of the file")
            }
            (S::SnapshotL1Table, P::TooLarge { value, .. }) => {
                write!(f, "snapshot {entry}: L1 table too large ({value} entries)")
            }
            (S::QedHeader, P::OutOfRange { field, value, min, max }) => match field {
                Field::ClusterSize | Field::TableSize => write!(
                    f,
                    "QED header: invalid {} {value} (must be a power of two in [{min}, {max}])",
                    if *field == Field::ClusterSize { "cluster size" } else { "table size" }
                ),
                _ => write!(
                    f,
                    "QED header: invalid image size {value} (must be a multiple of 512 and at most {max})"
                ),
            },
            (S::QedHeader, P::Invalid { field: Field::HeaderSize, value }) => {
                write!(f, "QED header: header_size is {value} clusters")
            }
            (S::QedHeader, P::TooLarge { field: Field::HeaderSize, value, max }) => write!(
                f,
                "QED header: header_size {value} clusters runs past the end of the file ({max} bytes)"
            ),
            (S::QedL1Table, P::PastEnd { bytes, end }) => write!(
                f,
                "QED header: L1 table offset {off:#x} is invalid (must be cluster aligned, after \
                 the header and leave room for {bytes} bytes before the end of the file at {end})"
            ),
            (S::QedBackingFileName, P::PastEnd { bytes, end }) => write!(
                f,
                "QED header: backing file name at offset {off} length {bytes} does not lie \
                 inside the header ({end} bytes)"
            ),
            (S::QedBackingFileName, P::NotUtf8) => write!(
                f,
                "QED header: backing file name at offset {off} is not valid UTF-8"
            ),
            (S::QedBackingFileName, P::EmptyOrNul) => write!(
                f,
                "QED header: backing file name at offset {off} is empty or contains NUL"
            ),
            (_, P::PastEnd { bytes, end }) => write!(
                f,
                "{} at offset {off:#x} ({bytes} bytes) lies past the end of the file ({end} bytes)",
                self.name()
            ),
            (_, P::MarkedCorrupt) => write!(
                f,
                "qcow2 image is marked corrupt; writes are refused (run check -r all)"
            ),
            (_, P::CorruptOnOpen) => {
                write!(f, "qcow2: Image is corrupt; cannot be opened read/write")
            }
            (_, P::DirtyTablesCorrupt { corruptions }) => write!(
                f,
                "qcow2 image is dirty and its tables are corrupt ({corruptions} errors, the first in the {} at offset {off:#x}); cannot repair refcounts",
                self.name()
            ),
            // Generic wording for combinations no call site produces today.
            (_, p) => {
                write!(f, "{}", self.name())?;
                if let Some(e) = self.entry {
                    write!(f, " entry {e}")?;
                }
                if let Some(o) = self.offset {
                    write!(f, " at offset {o:#x}")?;
                }
                match p {
                    P::BadMagic => write!(f, ": bad magic"),
                    P::Truncated { need, .. } => write!(f, " truncated (needs {need} bytes)"),
                    P::TooLarge { field, value, max } => {
                        write!(f, ": {field:?} {value} too large (max {max})")
                    }
                    P::TooSmall { field, value, min } => {
                        write!(f, ": {field:?} {value} too small (min {min})")
                    }
                    P::OutOfRange { field, value, min, max } => {
                        write!(f, ": {field:?} {value} outside [{min}, {max}]")
                    }
                    P::Invalid { field, value } => write!(f, ": invalid {field:?} {value}"),
                    P::L1TooSmall { entries, need, .. } => {
                        write!(f, ": {entries} entries, needs {need}")
                    }
                    P::NotUtf8 => write!(f, ": not valid UTF-8"),
                    P::EmptyOrNul => write!(f, ": empty or contains NUL"),
                    P::Missing => write!(f, " is missing"),
                    P::Misplaced => write!(f, " is unaligned or past the end of the file"),
                    _ => write!(f, " is corrupt"),
                }
            }
        }
    }
}

/// A feature this engine does not implement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// A qcow2 version other than 2 and 3.
    Qcow2Version(u32),
    /// A qcow2 compression type other than zlib and zstd.
    CompressionType(u8),
    /// Encrypted qcow2 (`crypt_method`).
    Encryption(u32),
    /// Incompatible qcow2 features this driver does not know (their names).
    Qcow2Features(Vec<String>),
    /// Incompatible QED features (the unknown bits).
    QedFeatures(u64),
    /// A qcow2 external data file.
    ExternalDataFile,
    /// Writing an image with extended L2 entries.
    ExtendedL2Write,
    /// Creating an image with extended L2 entries.
    ExtendedL2Create,
    /// A create option naming a feature this driver lacks (encryption, data files).
    CreateOption(String),
    /// A format vdisk recognises but cannot read (its name: `vmdk`, `vhdx`...).
    Format(&'static str),
    /// A format without image creation.
    NoCreate(&'static str),
    /// A format without option amendment.
    NoAmend(&'static str),
    /// A backing file format this engine cannot open.
    BackingFormat {
        /// The backing file.
        name: String,
        /// Its format name.
        format: String,
    },
    /// A qcow2 file too large to check or repair in memory.
    TooLargeToCheck {
        /// The file length.
        file_len: u64,
        /// Whether it was a repair of a dirty image (else a check).
        repair: bool,
    },
    /// A QED file with more clusters than check tracks.
    QedTooLargeToCheck {
        /// Clusters of the file.
        clusters: u64,
        /// Cluster size.
        cluster_size: u64,
        /// Most clusters check tracks.
        max: u64,
    },
    /// Anything else, described in words (fallback).
    Other(String),
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::Qcow2Version(v) => write!(f, "Unsupported qcow2 version {v}"),
            Unsupported::CompressionType(t) => write!(f, "Unknown qcow2 compression type {t}"),
            Unsupported::Encryption(m) => write!(
                f,
                "encrypted qcow2 images are not supported (crypt_method {m})"
            ),
            Unsupported::Qcow2Features(names) => {
                write!(f, "Unsupported qcow2 feature(s): {}", names.join(", "))
            }
            Unsupported::QedFeatures(bits) => write!(
                f,
                "Unsupported QED features: {bits:#x} (image needs a newer driver)"
            ),
            Unsupported::ExternalDataFile => write!(
                f,
                "qcow2 images with an external data file are not supported"
            ),
            Unsupported::ExtendedL2Write => write!(
                f,
                "qcow2 images with extended L2 entries (subclusters) can only be opened read-only"
            ),
            Unsupported::ExtendedL2Create => write!(
                f,
                "Extended L2 entries (subclusters) are not supported by this qcow2 driver"
            ),
            Unsupported::CreateOption(k) => write!(
                f,
                "qcow2 option '{k}' (encryption / external data files) is not supported"
            ),
            Unsupported::Format(name) => {
                write!(f, "the {name} format is not supported by vdisk")
            }
            Unsupported::NoCreate(name) => {
                write!(f, "Format driver '{name}' does not support image creation")
            }
            Unsupported::NoAmend(name) => {
                write!(
                    f,
                    "Format driver '{name}' does not support option amendment"
                )
            }
            Unsupported::BackingFormat { name, format } => {
                write!(f, "backing file '{name}' has unsupported format '{format}'")
            }
            Unsupported::TooLargeToCheck { file_len, repair } => write!(
                f,
                "image file too large to {} ({file_len} bytes)",
                if *repair { "repair" } else { "check" }
            ),
            Unsupported::QedTooLargeToCheck {
                clusters,
                cluster_size,
                max,
            } => write!(
                f,
                "QED check: the file has {clusters} clusters of {cluster_size} bytes; at most \
                 {max} can be checked"
            ),
            Unsupported::Other(m) => write!(f, "{m}"),
        }
    }
}

/// Why an argument was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// A create/amend option the format does not have.
    UnknownOption(String),
    /// An option value the option does not accept.
    BadOptionValue {
        /// The option.
        option: String,
        /// The value given.
        value: String,
    },
    /// A size option that is not a non-negative number below 2^64.
    BadSizeOption(String),
    /// A number option whose value is not a number (the option).
    BadNumber(String),
    /// An enumerated option without a QAPI name given a word it does not know.
    BadEnumValue(String),
    /// A format name no driver has (`-f`, `-F`, `backing_fmt`).
    UnknownDriver(String),
    /// A qcow2 cluster size that is not a power of two in [512, 2 MiB].
    Qcow2ClusterSize,
    /// A qcow2 refcount width that is not a power of two up to 64.
    RefcountWidth,
    /// A QED cluster size outside `[min, max]` or not a power of two.
    QedClusterSize {
        /// Smallest cluster size.
        min: u64,
        /// Largest cluster size.
        max: u64,
    },
    /// A QED table size outside `[min, max]` or not a power of two.
    QedTableSize {
        /// Smallest table size.
        min: u64,
        /// Largest table size.
        max: u64,
    },
    /// A QED virtual size that is zero, not a cluster multiple or too large.
    QedImageSize {
        /// The size limit.
        max: u64,
    },
    /// A new size that is not a multiple of 512 or exceeds the format's limit.
    ResizeSize {
        /// The size asked for.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A size that cannot be represented.
    Size(u64),
    /// A size argument that does not parse (qemu's suffixes).
    BadSize(String),
    /// An on/off option with another value (the option).
    BadBool(String),
    /// A request that ends past the end of the guest disk.
    PastEnd {
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk size.
        size: u64,
    },
    /// A virtual size beyond what the format can address with these options.
    ImageTooLarge(&'static str),
    /// A shrink asked for without `--shrink`.
    ShrinkNeedsFlag,
    /// A backing file name longer than the qcow2 header allows.
    BackingNameTooLong {
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A backing file name that does not fit in the QED header.
    QedBackingNameTooLong {
        /// The name.
        name: String,
        /// Bytes of room in the header.
        room: u64,
    },
    /// The qcow2 header, its extensions and the backing name exceed one cluster.
    HeaderTooLarge {
        /// Bytes needed.
        bytes: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A backing file without a backing format (where one is required).
    BackingWithoutFormat,
    /// A backing file together with preallocation (qcow2 without extended L2).
    BackingWithPreallocation,
    /// A qcow2 feature asked for with `compat=0.10`.
    NeedsV3(V3Feature),
    /// Extended L2 entries with clusters below 16 KiB.
    ExtendedL2ClusterSize,
    /// A backing file given to a format without backing files.
    BackingNotSupported(&'static str),
    /// The data does not carry the format's signature.
    WrongFormat(&'static str),
    /// Anything else, described in words (fallback).
    Other(String),
}

/// A qcow2 feature that needs version 3 (`compat=1.1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V3Feature {
    /// Refcounts of another width than 16 bits.
    RefcountWidth,
    /// Lazy refcounts.
    LazyRefcounts,
    /// A compression type other than zlib.
    CompressionType,
    /// Extended L2 entries.
    ExtendedL2,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::UnknownOption(k) => write!(f, "Invalid parameter '{k}'"),
            Invalid::BadOptionValue { option, value } => {
                write!(f, "Parameter '{option}' does not accept value '{value}'")
            }
            Invalid::BadSizeOption(option) => write!(
                f,
                "Parameter '{option}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
            ),
            Invalid::BadNumber(option) => write!(f, "Parameter '{option}' expects a number"),
            Invalid::BadEnumValue(value) => write!(f, "invalid parameter value: {value}"),
            Invalid::UnknownDriver(name) => write!(f, "Unknown driver '{name}'"),
            Invalid::Qcow2ClusterSize => write!(
                f,
                "Cluster size must be a power of two between 512 and 2048k"
            ),
            Invalid::RefcountWidth => write!(
                f,
                "Refcount width must be a power of two and may not exceed 64 bits"
            ),
            Invalid::QedClusterSize { min, max } => write!(
                f,
                "QED cluster size must be within range [{min}, {max}] and power of 2"
            ),
            Invalid::QedTableSize { min, max } => write!(
                f,
                "QED table size must be within range [{min}, {max}] and power of 2"
            ),
            Invalid::QedImageSize { max } => write!(
                f,
                "QED image size must be a non-zero multiple of cluster size and less than {max} bytes"
            ),
            Invalid::ResizeSize { size, max } => write!(
                f,
                "Invalid image size specified: {size} (must be a multiple of 512 and at most {max} \
                 bytes for this cluster and table size)"
            ),
            Invalid::Size(s) => write!(f, "Invalid size {s}"),
            Invalid::BadSize(s) => write!(f, "Invalid size '{s}'"),
            Invalid::BadBool(k) => write!(f, "Parameter '{k}' expects 'on' or 'off'"),
            Invalid::PastEnd { offset, len, size } => write!(
                f,
                "request at offset {offset} length {len} is past the end of the image ({size} bytes)"
            ),
            Invalid::ImageTooLarge(fmt) => write!(
                f,
                "The image size is too large for file format '{fmt}' (try using a larger cluster size)"
            ),
            Invalid::ShrinkNeedsFlag => {
                write!(f, "Use the --shrink option to perform a shrink operation.")
            }
            Invalid::BackingNameTooLong { len, max } => {
                write!(f, "Backing file name too long ({len} bytes, max {max})")
            }
            Invalid::QedBackingNameTooLong { name, room } => write!(
                f,
                "Backing file name '{name}' too long for the QED header ({room} bytes of room)"
            ),
            Invalid::HeaderTooLarge {
                bytes,
                cluster_size,
            } => write!(
                f,
                "qcow2 header, extensions and backing file name ({bytes} bytes) do not fit in one cluster ({cluster_size} bytes)"
            ),
            Invalid::BackingWithPreallocation => write!(
                f,
                "Backing file and preallocation can only be used at the same time if extended_l2 is on"
            ),
            Invalid::NeedsV3(feature) => match feature {
                V3Feature::RefcountWidth => write!(
                    f,
                    "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"
                ),
                V3Feature::LazyRefcounts => write!(
                    f,
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"
                ),
                V3Feature::CompressionType => write!(
                    f,
                    "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"
                ),
                V3Feature::ExtendedL2 => write!(
                    f,
                    "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
                ),
            },
            Invalid::ExtendedL2ClusterSize => write!(
                f,
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
            ),
            Invalid::BackingWithoutFormat => {
                write!(f, "Backing file specified without backing format")
            }
            Invalid::BackingNotSupported(fmt) => {
                write!(f, "Backing file not supported for file format '{fmt}'")
            }
            Invalid::WrongFormat(fmt) => write!(f, "Image not in {fmt} format"),
            Invalid::Other(m) => write!(f, "{m}"),
        }
    }
}

/// Why an image has no room left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoSpace {
    /// A refcount would exceed the refcount width.
    RefcountOverflow {
        /// The host cluster index.
        cluster: u64,
        /// Its refcount.
        refcount: u64,
        /// The increment asked for.
        delta: u64,
        /// The largest refcount the width holds.
        max: u64,
    },
    /// No cluster could be found for a new refcount block.
    RefcountBlock,
    /// The refcount table would exceed its size limit (bytes).
    RefcountTable(u64),
    /// A rebuilt refcount table would exceed its size limit (bytes).
    RebuiltRefcountTable(u64),
    /// Anything else, described in words (fallback).
    Other(String),
}

impl fmt::Display for NoSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoSpace::RefcountOverflow {
                cluster,
                refcount,
                delta,
                max,
            } => write!(
                f,
                "refcount of cluster {cluster} would overflow ({refcount} + {delta} > {max})"
            ),
            NoSpace::RefcountBlock => write!(f, "could not allocate a refcount block"),
            NoSpace::RefcountTable(max) => write!(f, "refcount table would exceed {max} bytes"),
            NoSpace::RebuiltRefcountTable(max) => {
                write!(f, "rebuilt refcount table would exceed {} MiB", max >> 20)
            }
            NoSpace::Other(m) => write!(f, "{m}"),
        }
    }
}

impl From<&str> for NoSpace {
    fn from(m: &str) -> Self {
        NoSpace::Other(m.to_string())
    }
}

impl From<String> for NoSpace {
    fn from(m: String) -> Self {
        NoSpace::Other(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_placement_wording() {
        let e = Error::from(Corruption::new(Structure::L1Table, Problem::Unaligned).at(0x10200));
        assert_eq!(
            e.to_string(),
            "L1 table offset 0x10200 is not cluster aligned"
        );
        let e = Corruption::new(Structure::RefcountTable, Problem::OverlapsHeader).at(0);
        assert_eq!(
            e.to_string(),
            "Reference count table at offset 0 overlaps the image header"
        );
        let e = Corruption::new(
            Structure::SnapshotL1Table,
            Problem::PastEnd {
                bytes: 16,
                end: 4096,
            },
        )
        .entry(2)
        .at(0x20000);
        assert_eq!(
            e.to_string(),
            "Snapshot 2 L1 table at offset 0x20000 (16 bytes) lies past the end of the file (4096 bytes)"
        );
    }

    #[test]
    fn snapshot_table_wording() {
        let past = Problem::PastEnd {
            bytes: 40,
            end: 4096,
        };
        let t = |c: Corruption| c.to_string();
        let table = Corruption::new(Structure::SnapshotTable, past.clone());
        assert_eq!(
            t(table.clone().at(0x10000)),
            "Snapshot table at offset 0x10000 (40 bytes) lies past the end of the file (4096 bytes)"
        );
        assert_eq!(
            t(table.clone().entry(3).at(0x10000)),
            "snapshot table entry 3 at offset 0x10000 lies past the end of the file or the table size limit"
        );
        assert_eq!(
            t(table.entry(3)),
            "snapshot table entry 3 runs past the end of the file"
        );
        let big = |entry: Option<u64>| Corruption {
            entry,
            ..Corruption::new(
                Structure::SnapshotTable,
                Problem::TooLarge {
                    field: Field::Length,
                    value: 2000,
                    max: 1024,
                },
            )
        };
        assert_eq!(
            t(big(Some(1))),
            "snapshot 1: too much extra metadata (2000 bytes)"
        );
        assert_eq!(
            t(big(None)),
            "snapshot table runs past the end of the file or exceeds 64 MiB"
        );
    }

    #[test]
    fn refcount_update_wording() {
        let c = Corruption::new(Structure::RefcountBlock, Problem::Misplaced).at(0x1200);
        assert_eq!(
            c.to_string(),
            "Refcount block offset 0x1200 is unaligned or past the end of the file; refcount table corrupted"
        );
        let c = Corruption::new(
            Structure::RefcountBlock,
            Problem::RefcountMissing { cluster: 77 },
        );
        assert_eq!(
            c.to_string(),
            "refcount block for cluster 77 is missing while updating its refcount"
        );
        let c = Corruption::new(
            Structure::HostCluster,
            Problem::RefcountUnderflow {
                cluster: 5,
                refcount: 0,
                delta: -1,
            },
        );
        assert_eq!(
            c.to_string(),
            "refcount of cluster 5 would drop below zero (0 -1)"
        );
    }

    #[test]
    fn header_wording() {
        let c = |p| Corruption::new(Structure::Qcow2Header, p).to_string();
        assert_eq!(
            c(Problem::BadMagic),
            "Image is not in qcow2 format (bad magic)"
        );
        assert_eq!(
            c(Problem::Truncated {
                have: Some(10),
                need: 72
            }),
            "qcow2 header truncated: file has 10 bytes, the header needs 72"
        );
        assert_eq!(
            c(Problem::Invalid {
                field: Field::ClusterBits,
                value: 30
            }),
            "Unsupported cluster size: 2^30 (cluster_bits must be 9..21)"
        );
        assert_eq!(
            Corruption::new(
                Structure::QedHeader,
                Problem::OutOfRange {
                    field: Field::TableSize,
                    value: 3,
                    min: 1,
                    max: 16
                }
            )
            .to_string(),
            "QED header: invalid table size 3 (must be a power of two in [1, 16])"
        );
        assert_eq!(
            Corruption::new(Structure::RefcountTable, Problem::Missing).to_string(),
            "Image does not contain a reference count table"
        );
        assert_eq!(
            Corruption::new(Structure::Image, Problem::CorruptOnOpen).to_string(),
            "qcow2: Image is corrupt; cannot be opened read/write"
        );
    }

    #[test]
    fn fallbacks_keep_the_message() {
        assert_eq!(
            Error::corrupt("L2 table at 0x0 bad").to_string(),
            "L2 table at 0x0 bad"
        );
        assert_eq!(Error::invalid("bad").to_string(), "bad");
        assert_eq!(Error::unsupported("nope").to_string(), "nope");
        assert_eq!(Error::NoSpace("full".into()).to_string(), "full");
        assert!(matches!(
            Error::corrupt("x").corruption(),
            Some(Corruption {
                problem: Problem::Detail(_),
                ..
            })
        ));
    }

    #[test]
    fn cli_wording() {
        assert_eq!(
            Error::from(Invalid::BadOptionValue {
                option: "preallocation".into(),
                value: "bogus".into()
            })
            .to_string(),
            "Parameter 'preallocation' does not accept value 'bogus'"
        );
        assert_eq!(
            Error::from(Invalid::UnknownOption("foo".into())).to_string(),
            "Invalid parameter 'foo'"
        );
        assert_eq!(
            Error::from(Invalid::PastEnd {
                offset: 512,
                len: 512,
                size: 512
            })
            .to_string(),
            "request at offset 512 length 512 is past the end of the image (512 bytes)"
        );
        assert_eq!(
            Error::from(Invalid::ShrinkNeedsFlag).to_string(),
            "Use the --shrink option to perform a shrink operation."
        );
        assert_eq!(
            Error::from(Invalid::BackingNotSupported("raw")).to_string(),
            "Backing file not supported for file format 'raw'"
        );
        assert_eq!(
            Error::from(Unsupported::Qcow2Features(vec!["foo".into(), "bar".into()])).to_string(),
            "Unsupported qcow2 feature(s): foo, bar"
        );
        assert_eq!(
            Error::from(Invalid::UnknownDriver("foo".into())).to_string(),
            "Unknown driver 'foo'"
        );
        assert_eq!(
            Error::from(Invalid::BadSizeOption("size".into())).to_string(),
            "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        );
        assert_eq!(
            Error::from(Unsupported::Format("vmdk")).to_string(),
            "the vmdk format is not supported by vdisk"
        );
        assert_eq!(
            Error::from(Unsupported::NoAmend("raw")).to_string(),
            "Format driver 'raw' does not support option amendment"
        );
        assert_eq!(
            Error::from(NoSpace::RebuiltRefcountTable(8 << 20)).to_string(),
            "rebuilt refcount table would exceed 8 MiB"
        );
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(Error::corrupt("x").errno(), libc::EIO);
        assert_eq!(
            Error::from(Corruption::new(Structure::L2Table, Problem::Unaligned)).errno(),
            libc::EIO
        );
        assert_eq!(
            Error::from(Unsupported::ExternalDataFile).errno(),
            libc::ENOTSUP
        );
        assert_eq!(Error::from(Invalid::ShrinkNeedsFlag).errno(), libc::EINVAL);
        assert_eq!(Error::ReadOnly.errno(), libc::EPERM);
        assert_eq!(Error::BackingLoop("a".into()).errno(), libc::ELOOP);
        assert_eq!(Error::from(NoSpace::RefcountBlock).errno(), libc::ENOSPC);
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(Error::from(io).errno(), libc::ENOENT);
    }
}
