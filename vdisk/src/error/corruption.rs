//! Corruptions: which [`Structure`], which entry, which offset, and the [`Problem`];
//! `Display` gives the wording the CLI prints.

use std::fmt;

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
    /// The encryption (LUKS) header an encrypted qcow2 image holds.
    CryptoHeader,
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
    /// The VHD (vpc) footer (and its copy at the start of a dynamic image).
    VpcFooter,
    /// The VHD dynamic disk header.
    VpcDynamicHeader,
    /// The VHD block allocation table (`entry` is a block index).
    VpcBat,
    /// The VDI header.
    VdiHeader,
    /// The VDI block map (`entry` is a block index).
    VdiBlockMap,
    /// A host cluster, whoever references it (refcount findings).
    HostCluster,
    /// The image as a whole (its file, its flags) or an unnamed structure.
    Image,
    /// A VMDK sparse extent header (or stream footer).
    VmdkHeader,
    /// A VMDK text descriptor.
    VmdkDescriptor,
    /// A VMDK grain directory.
    VmdkGrainDirectory,
    /// A VMDK grain table (`entry` is its grain directory index).
    VmdkGrainTable,
    /// A VMDK grain (compressed or not).
    VmdkGrain,
    /// A VHDX header.
    VhdxHeader,
    /// A VHDX region table.
    VhdxRegionTable,
    /// The VHDX metadata region.
    VhdxMetadata,
    /// The VHDX block allocation table.
    VhdxBat,
    /// The VHDX log.
    VhdxLog,
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
            Structure::CryptoHeader => "crypto header",
            Structure::BitmapTable => "bitmap table",
            Structure::DataCluster => "data cluster",
            Structure::CompressedCluster => "compressed cluster",
            Structure::QedHeader => "QED header",
            Structure::QedBackingFileName => "QED backing file name",
            Structure::QedL1Table => "QED L1 table",
            Structure::QedL2Table => "QED L2 table",
            Structure::VpcFooter => "VHD footer",
            Structure::VpcDynamicHeader => "VHD dynamic disk header",
            Structure::VpcBat => "VHD block allocation table",
            Structure::VdiHeader => "VDI header",
            Structure::VdiBlockMap => "VDI block map",
            Structure::HostCluster => "cluster",
            Structure::Image => "image",
            Structure::VmdkHeader => "VMDK header",
            Structure::VmdkDescriptor => "VMDK descriptor",
            Structure::VmdkGrainDirectory => "VMDK grain directory",
            Structure::VmdkGrainTable => "VMDK grain table",
            Structure::VmdkGrain => "VMDK grain",
            Structure::VhdxHeader => "VHDX header",
            Structure::VhdxRegionTable => "VHDX region table",
            Structure::VhdxMetadata => "VHDX metadata",
            Structure::VhdxBat => "VHDX BAT",
            Structure::VhdxLog => "VHDX log",
        }
    }
    /// The structure's name in QEMU's metadata overlap messages (`qcow2_header`,
    /// `active L1 table`).
    pub fn overlap_name(self) -> &'static str {
        match self {
            Structure::Qcow2Header => "qcow2_header",
            Structure::L1Table => "active L1 table",
            Structure::RefcountTable => "refcount table",
            Structure::SnapshotTable => "snapshot table",
            Structure::SnapshotL1Table => "inactive L1 table",
            s => s.name(),
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
    /// A checksum (VHD footer).
    Checksum,
    /// A block size (VHD, VDI).
    BlockSize,
    /// A format version (VDI).
    Version,
    /// A sector size (VDI).
    SectorSize,
    /// The signature (VDI).
    Signature,
    /// Offset of the data area (VDI).
    DataOffset,
    /// Offset of the block map (VDI).
    MapOffset,
    /// The link UUID (VDI).
    LinkUuid,
    /// The parent UUID (VDI differencing images).
    ParentUuid,
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
    /// An entry has reserved bits set: `raw` is the entry, `guest_cluster` the guest
    /// cluster an L2 entry maps (the corruption's `entry` is an L1 entry's index).
    ReservedBits {
        /// The raw entry.
        raw: u64,
        /// The guest cluster the entry maps (L2 entries).
        guest_cluster: Option<u64>,
    },
    /// An L2 entry maps `guest_cluster` to a host offset that is not cluster aligned.
    UnalignedHost {
        /// The guest cluster.
        guest_cluster: u64,
        /// The host offset.
        host: u64,
    },
    /// An extended L2 entry has an invalid subcluster bitmap.
    InvalidBitmap {
        /// The guest cluster.
        guest_cluster: u64,
        /// The bitmap.
        bitmap: u64,
    },
    /// An L2 entry cannot be represented in this image's entry format.
    Unencodable {
        /// The guest cluster.
        guest_cluster: u64,
        /// The raw entry.
        raw: u64,
    },
    /// An L2 entry is allocated without a host offset.
    NoHostOffset {
        /// The guest cluster.
        guest_cluster: u64,
    },
    /// An L2 entry points past the end of the file.
    HostPastEnd {
        /// The guest cluster.
        guest_cluster: u64,
        /// The host offset.
        host: u64,
    },
    /// A guest cluster lies beyond the L1 table (of `entries` entries, when known).
    BeyondL1 {
        /// The guest cluster.
        guest_cluster: u64,
        /// Entries of the L1 table.
        entries: Option<u64>,
    },
    /// The structure overlaps other metadata.
    OverlapsMetadata {
        /// The metadata it overlaps.
        with: Structure,
    },
    /// A guest data write would land on metadata (QEMU's overlap check).
    WriteOverlapsMetadata {
        /// The guest cluster written.
        guest_cluster: u64,
        /// The host offset it maps to.
        host: u64,
        /// The metadata it overlaps.
        with: Structure,
    },
    /// Newly allocated host clusters `first..end` overlap metadata (refcounts are corrupt).
    AllocationOverlapsMetadata {
        /// First host cluster.
        first: u64,
        /// One past the last host cluster.
        end: u64,
        /// The metadata they overlap.
        with: Structure,
    },
    /// A guest data write to `host` overlaps the table at the corruption's offset.
    DataOverlapsTable {
        /// Host offset of the write.
        host: u64,
    },
    /// An entry holds an invalid offset; `index` is its index where the corruption's
    /// `entry` names the table (QED L2 tables by L1 index).
    BadOffset {
        /// Index of the entry in its table.
        index: Option<u64>,
        /// The offset it holds.
        value: u64,
    },
    /// An index (the corruption's `entry`) outside a table of `entries` entries.
    IndexOutOfRange {
        /// Entries of the table.
        entries: u64,
    },
    /// A compressed mapping from a format that has no compression.
    CompressedMapping,
    /// A compressed cluster does not decompress; the decompressor's own message.
    Undecompressable {
        /// What the decompression library reported.
        library: String,
    },
    /// A compressed cluster decompressed to `got` bytes instead of `want`.
    DecompressedSize {
        /// Bytes produced.
        got: u64,
        /// Bytes expected (the cluster size).
        want: u64,
    },
    /// A decompressed cluster of `got` bytes is too short for `need` bytes at `skip`.
    DecompressedTooShort {
        /// Bytes decompressed.
        got: u64,
        /// Bytes wanted.
        need: u64,
        /// Where in the cluster they start.
        skip: u64,
    },
    /// A VMDK-specific problem (qemu's wording).
    Vmdk(super::VmdkProblem),
    /// A VHDX-specific problem.
    Vhdx(super::VhdxProblem),
    /// The refcount structure is unusable (the inner corruption, found at open), so
    /// writes are refused until `check -r all` rebuilds it.
    WritesRefused(Box<Corruption>),
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
            (_, P::Vmdk(p)) => write!(f, "{p}"),
            (S::VhdxHeader | S::VhdxRegionTable | S::VhdxLog, P::Vhdx(p)) => {
                write!(f, "{p}")
            }
            (_, P::Vhdx(p)) => {
                write!(f, "{}", self.name())?;
                if let Some(o) = self.offset {
                    write!(f, " at offset {o:#x}")?;
                }
                write!(f, ": {p}")
            }
            (_, P::WritesRefused(inner)) => {
                write!(f, "{inner}; writes are refused (run check -r all)")
            }
            // Entries (the data path's mapping checks).
            (S::L1Table, P::ReservedBits { raw, .. }) => {
                write!(f, "L1 entry {entry} ({raw:#x}) has reserved bits set")
            }
            (S::BitmapTable, P::ReservedBits { raw, guest_cluster }) => write!(
                f,
                "bitmap {entry}: bitmap table entry {} ({raw:#x}) has reserved bits set",
                guest_cluster.unwrap_or(0)
            ),
            (_, P::ReservedBits { raw, guest_cluster }) => write!(
                f,
                "L2 entry {raw:#x} of guest cluster {} has reserved bits set",
                guest_cluster.unwrap_or(0)
            ),
            (_, P::UnalignedHost { guest_cluster, host }) => write!(
                f,
                "L2 entry of guest cluster {guest_cluster} points to unaligned host offset {host:#x}"
            ),
            (_, P::InvalidBitmap { guest_cluster, bitmap }) => write!(
                f,
                "extended L2 entry of guest cluster {guest_cluster} has an invalid subcluster bitmap {bitmap:#x}"
            ),
            (_, P::Unencodable { guest_cluster, raw }) => write!(
                f,
                "L2 entry {raw:#x} of guest cluster {guest_cluster}: not representable in this entry format"
            ),
            (_, P::NoHostOffset { guest_cluster }) => write!(
                f,
                "L2 entry of guest cluster {guest_cluster} is allocated without a host offset"
            ),
            (_, P::HostPastEnd { guest_cluster, host }) => write!(
                f,
                "L2 entry of guest cluster {guest_cluster} points past the end of the file (host offset {host:#x})"
            ),
            (_, P::BeyondL1 { guest_cluster, entries: Some(n) }) => write!(
                f,
                "guest cluster {guest_cluster} is beyond the L1 table ({n} entries)"
            ),
            (_, P::BeyondL1 { guest_cluster, entries: None }) => {
                write!(f, "guest cluster {guest_cluster} is beyond the L1 table")
            }
            (S::L2Table, P::Misplaced) => write!(
                f,
                "L2 table offset {off:#x} of L1 entry {entry} is unaligned, overlaps the header or lies past the end of the file"
            ),
            (S::VpcBat | S::VdiBlockMap, P::OverlapsMetadata { .. }) => write!(
                f,
                "{} at offset {off:#x} overlaps the image metadata",
                self.name()
            ),
            (S::VdiHeader, P::OverlapsMetadata { .. }) => write!(
                f,
                "VDI data area at offset {off:#x} overlaps the header or the block map"
            ),
            (_, P::OverlapsMetadata { with }) => write!(
                f,
                "{} offset {off:#x} of L1 entry {entry} overlaps the {}",
                self.name(),
                with.overlap_name()
            ),
            (_, P::WriteOverlapsMetadata { guest_cluster, host, with }) => write!(
                f,
                "Preventing invalid write on metadata (overlaps with {}): guest cluster {guest_cluster} maps to host offset {host:#x}",
                with.overlap_name()
            ),
            (_, P::AllocationOverlapsMetadata { first, end, with }) => write!(
                f,
                "Preventing invalid allocation of clusters {first}..{end} (overlaps with {}); refcounts are corrupt",
                with.overlap_name()
            ),
            (_, P::DataOverlapsTable { host }) => write!(
                f,
                "QED: refusing to write guest data to host offset {host:#x}: it overlaps \
                 the L2 table at {off:#x} (cluster referenced twice; run a repair)"
            ),
            (S::VpcBat, P::BadOffset { index, value }) => write!(
                f,
                "VHD block allocation table entry {} points to block offset {value:#x} inside the image metadata",
                index.unwrap_or(0)
            ),
            (S::VdiBlockMap, P::BadOffset { index, value }) => write!(
                f,
                "VDI block map entry {} holds block {value}, outside the image's blocks",
                index.unwrap_or(0)
            ),
            (S::QedL1Table, P::BadOffset { value, .. }) => write!(
                f,
                "QED: L1 entry {entry} points to an invalid L2 table offset {value:#x} \
                 (misaligned, inside the header or the L1 table, or past the end of the file)"
            ),
            (_, P::BadOffset { index, value }) => write!(
                f,
                "QED: L2 table at {off:#x} (L1 index {entry}) entry {} holds an \
                 invalid cluster offset {value:#x} (misaligned, inside the header or the L1 \
                 table, or past the end of the file)",
                index.unwrap_or(0)
            ),
            (_, P::IndexOutOfRange { entries }) => write!(
                f,
                "QED: L1 index {entry} is outside the L1 table ({entries} entries)"
            ),
            (_, P::CompressedMapping) => {
                write!(f, "QED: a compressed mapping (the format has none)")
            }
            (_, P::Undecompressable { library }) => write!(
                f,
                "compressed cluster at host offset {off:#x} is corrupt: {library}"
            ),
            (_, P::DecompressedSize { got, want }) => write!(
                f,
                "compressed cluster at host offset {off:#x} is corrupt: decompressed to {got} bytes instead of {want}"
            ),
            (_, P::DecompressedTooShort { got, need, skip }) => write!(
                f,
                "compressed cluster at host offset {off:#x} decompressed to {got} bytes, too short for {need} bytes at {skip}"
            ),
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
            // VHD (vpc) and VDI: QEMU's wording where qemu-img has one.
            (S::VpcFooter, P::BadMagic) => write!(f, "invalid VPC image"),
            (S::VpcFooter, P::Truncated { .. }) => write!(f, "File too small for a VHD header"),
            (S::VpcFooter, P::Invalid { field: Field::Checksum, .. }) => {
                write!(f, "Incorrect header checksum")
            }
            (S::VpcFooter, P::TooLarge { value, max, .. }) => write!(
                f,
                "VHD disk size {value} is too large (max {max} bytes, 2040 GiB)"
            ),
            (S::VpcDynamicHeader, P::BadMagic) => write!(f, "Invalid header magic"),
            (S::VpcDynamicHeader, P::Invalid { field: Field::BlockSize, value }) => {
                write!(f, "Invalid block size {value}")
            }
            (S::VpcDynamicHeader, P::TooLarge { field: Field::Entries, value, .. }) => {
                write!(f, "Max Table Entries too large ({value})")
            }
            (S::VpcDynamicHeader, P::TooSmall { field: Field::Entries, .. }) => {
                write!(f, "Page table too small")
            }
            (S::VpcDynamicHeader, P::TooLarge { field: Field::ImageSize, .. }) => {
                write!(f, "Too many blocks")
            }
            (S::VpcBat, P::PastEnd { .. }) if self.entry.is_some() => write!(
                f,
                "block-vpc: free_data_block_offset points after the end of file. The image has been truncated."
            ),
            (S::VdiHeader, P::Invalid { field: Field::Signature, value }) => {
                write!(f, "Image not in VDI format (bad signature {value:08x})")
            }
            (S::VdiHeader, P::Invalid { field: Field::Version, value }) => write!(
                f,
                "unsupported VDI image (version {}.{})",
                value >> 16,
                value & 0xffff
            ),
            (S::VdiHeader, P::Invalid { field: Field::MapOffset, value }) => write!(
                f,
                "unsupported VDI image (unaligned block map offset {value:#x})"
            ),
            (S::VdiHeader, P::Invalid { field: Field::DataOffset, value }) => {
                write!(f, "unsupported VDI image (unaligned data offset {value:#x})")
            }
            (S::VdiHeader, P::Invalid { field: Field::SectorSize, value }) => {
                write!(f, "unsupported VDI image (sector size {value} is not 512)")
            }
            (S::VdiHeader, P::Invalid { field: Field::BlockSize, value }) => write!(
                f,
                "unsupported VDI image (block size {value} is not 1048576)"
            ),
            (S::VdiHeader, P::Invalid { field: Field::LinkUuid, .. }) => {
                write!(f, "unsupported VDI image (non-NULL link UUID)")
            }
            (S::VdiHeader, P::Invalid { field: Field::ParentUuid, .. }) => {
                write!(f, "unsupported VDI image (non-NULL parent UUID)")
            }
            (S::VdiHeader, P::TooLarge { field: Field::ImageSize, value, max }) => write!(
                f,
                "Unsupported VDI image size (size is {value:#x}, max supported is {max:#x})"
            ),
            (S::VdiHeader, P::TooLarge { field: Field::Entries, value, max }) => write!(
                f,
                "unsupported VDI image (too many blocks {value}, max is {max})"
            ),
            (S::VdiHeader, P::TooSmall { value, min, .. }) => write!(
                f,
                "unsupported VDI image (disk size {min}, image bitmap has room for {value})"
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

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
    fn entry_wording() {
        let l2 = |p| Corruption::new(Structure::L2Table, p).to_string();
        assert_eq!(
            l2(Problem::ReservedBits {
                raw: 0x8000_0000_0000_0201,
                guest_cluster: Some(3)
            }),
            "L2 entry 0x8000000000000201 of guest cluster 3 has reserved bits set"
        );
        assert_eq!(
            Corruption::new(
                Structure::L1Table,
                Problem::ReservedBits {
                    raw: 0x1ff,
                    guest_cluster: None
                }
            )
            .entry(2)
            .to_string(),
            "L1 entry 2 (0x1ff) has reserved bits set"
        );
        assert_eq!(
            l2(Problem::UnalignedHost {
                guest_cluster: 4,
                host: 0x10200
            }),
            "L2 entry of guest cluster 4 points to unaligned host offset 0x10200"
        );
        assert_eq!(
            l2(Problem::InvalidBitmap {
                guest_cluster: 1,
                bitmap: 0x11
            }),
            "extended L2 entry of guest cluster 1 has an invalid subcluster bitmap 0x11"
        );
        assert_eq!(
            l2(Problem::Unencodable {
                guest_cluster: 1,
                raw: 0x1
            }),
            "L2 entry 0x1 of guest cluster 1: not representable in this entry format"
        );
        assert_eq!(
            l2(Problem::NoHostOffset { guest_cluster: 9 }),
            "L2 entry of guest cluster 9 is allocated without a host offset"
        );
        assert_eq!(
            l2(Problem::HostPastEnd {
                guest_cluster: 9,
                host: 0x50000
            }),
            "L2 entry of guest cluster 9 points past the end of the file (host offset 0x50000)"
        );
        let beyond = |entries| {
            Corruption::new(
                Structure::L1Table,
                Problem::BeyondL1 {
                    guest_cluster: 70,
                    entries,
                },
            )
            .to_string()
        };
        assert_eq!(
            beyond(Some(2)),
            "guest cluster 70 is beyond the L1 table (2 entries)"
        );
        assert_eq!(beyond(None), "guest cluster 70 is beyond the L1 table");
    }

    #[test]
    fn overlap_wording() {
        let t = Corruption::new(Structure::L2Table, Problem::Misplaced)
            .entry(1)
            .at(0x200);
        assert_eq!(
            t.to_string(),
            "L2 table offset 0x200 of L1 entry 1 is unaligned, overlaps the header or lies past the end of the file"
        );
        let t = Corruption::new(
            Structure::L2Table,
            Problem::OverlapsMetadata {
                with: Structure::RefcountTable,
            },
        )
        .entry(1)
        .at(0x10000);
        assert_eq!(
            t.to_string(),
            "L2 table offset 0x10000 of L1 entry 1 overlaps the refcount table"
        );
        let w = Corruption::new(
            Structure::DataCluster,
            Problem::WriteOverlapsMetadata {
                guest_cluster: 0,
                host: 0,
                with: Structure::Qcow2Header,
            },
        );
        assert_eq!(
            w.to_string(),
            "Preventing invalid write on metadata (overlaps with qcow2_header): guest cluster 0 maps to host offset 0x0"
        );
        let a = Corruption::new(
            Structure::HostCluster,
            Problem::AllocationOverlapsMetadata {
                first: 3,
                end: 5,
                with: Structure::SnapshotL1Table,
            },
        );
        assert_eq!(
            a.to_string(),
            "Preventing invalid allocation of clusters 3..5 (overlaps with inactive L1 table); refcounts are corrupt"
        );
        assert_eq!(Structure::L1Table.overlap_name(), "active L1 table");
    }

    #[test]
    fn qed_and_compressed_wording() {
        let c = Corruption::new(
            Structure::QedL2Table,
            Problem::BadOffset {
                index: Some(7),
                value: 0x123,
            },
        )
        .entry(2)
        .at(0x40000);
        assert_eq!(
            c.to_string(),
            "QED: L2 table at 0x40000 (L1 index 2) entry 7 holds an invalid cluster offset 0x123 \
             (misaligned, inside the header or the L1 table, or past the end of the file)"
        );
        let c = Corruption::new(
            Structure::QedL1Table,
            Problem::BadOffset {
                index: None,
                value: 0x5,
            },
        )
        .entry(4);
        assert_eq!(
            c.to_string(),
            "QED: L1 entry 4 points to an invalid L2 table offset 0x5 (misaligned, inside the \
             header or the L1 table, or past the end of the file)"
        );
        let c = Corruption::new(
            Structure::QedL1Table,
            Problem::IndexOutOfRange { entries: 8 },
        )
        .entry(9);
        assert_eq!(
            c.to_string(),
            "QED: L1 index 9 is outside the L1 table (8 entries)"
        );
        let c = Corruption::new(
            Structure::QedL2Table,
            Problem::DataOverlapsTable { host: 0x20000 },
        )
        .at(0x20000);
        assert_eq!(
            c.to_string(),
            "QED: refusing to write guest data to host offset 0x20000: it overlaps the L2 table \
             at 0x20000 (cluster referenced twice; run a repair)"
        );
        assert_eq!(
            Corruption::new(Structure::QedL2Table, Problem::CompressedMapping).to_string(),
            "QED: a compressed mapping (the format has none)"
        );
        let z = |p| {
            Corruption::new(Structure::CompressedCluster, p)
                .at(0x30000)
                .to_string()
        };
        assert_eq!(
            z(Problem::Undecompressable {
                library: "bad frame".into()
            }),
            "compressed cluster at host offset 0x30000 is corrupt: bad frame"
        );
        assert_eq!(
            z(Problem::DecompressedSize {
                got: 100,
                want: 65536
            }),
            "compressed cluster at host offset 0x30000 is corrupt: decompressed to 100 bytes instead of 65536"
        );
        assert_eq!(
            z(Problem::DecompressedTooShort {
                got: 100,
                need: 512,
                skip: 0
            }),
            "compressed cluster at host offset 0x30000 decompressed to 100 bytes, too short for 512 bytes at 0"
        );
    }

    #[test]
    fn refused_writes_name_the_open_time_corruption() {
        let why = Corruption::new(Structure::RefcountTable, Problem::Missing);
        let c = Corruption::new(
            Structure::RefcountTable,
            Problem::WritesRefused(Box::new(why)),
        );
        assert_eq!(
            c.to_string(),
            "Image does not contain a reference count table; writes are refused (run check -r all)"
        );
        assert_eq!(Error::from(c).errno(), libc::EIO);
    }
}
