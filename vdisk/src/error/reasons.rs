//! Why an argument was refused ([`Invalid`]), what is not implemented
//! ([`Unsupported`]) and why an image is full ([`NoSpace`]), with their wording.

use std::fmt;

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
    /// What a qcow2 image with an external data file cannot do (compressed clusters,
    /// internal snapshots): QEMU answers ENOTSUP, "Operation not supported".
    ExternalDataFile,
    /// VM state (`savevm` data, qemu-io `read -b`/`write -b`) in a format that keeps
    /// none (the format's name): QEMU answers ENOTSUP.
    VmState(&'static str),
    /// A write into a cluster shared with a snapshot, in an encrypted image with
    /// extended L2 entries (the copy of its mixed subclusters is not encrypted here).
    ExtendedL2SharedEncrypted,
    /// A create or amend option naming a feature this driver lacks.
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
    /// A format driver without consistency checks (its name).
    NoCheck(&'static str),
    /// A format driver without compressed writes (its name).
    NoCompression(&'static str),
    /// A format without backing files asked to record one (its name).
    NoBackingFile(&'static str),
    /// A format whose data is not the file's bytes asked for falloc preallocation.
    NoPreallocation(&'static str),
    /// A decompression asked of a format that has no compressed clusters.
    NoCompressedClusters,
    /// A driver whose disk size is fixed (its name).
    NoResize(&'static str),
    /// The format has no `measure` (QEMU's QED has none either).
    NoMeasure(&'static str),
    /// The format cannot be emptied in place (`commit`'s last step).
    NoMakeEmpty(&'static str),
    /// Resizing a qcow2 v2 image that has snapshots.
    ResizeV2WithSnapshots,
    /// Shrinking a qcow2 image that has snapshots.
    ShrinkWithSnapshots,
    /// Zeroes that could only be written as data, and the caller refused data writes.
    ZeroesNeedData(ZeroLimit),
    /// A VMDK creation vdisk does not do yet (the subformat or option).
    VmdkCreate(String),
    /// Compressed clusters in an encrypted image.
    CompressedEncrypted,
}

/// Why a write of zeroes would have to write data (and was asked not to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroLimit {
    /// A qcow2 v2 image with a backing file has no zero flag.
    Qcow2V2Backing,
    /// Part of a qcow2 cluster.
    Qcow2PartialCluster,
    /// Part of a QED cluster.
    QedPartialCluster,
    /// A VMDK range that is not whole zeroed grains.
    VmdkGrain,
    /// An encrypted raw LUKS volume stores zeroes encrypted.
    Encrypted,
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
            Unsupported::ExternalDataFile | Unsupported::VmState(_) => {
                write!(f, "Operation not supported")
            }
            Unsupported::ExtendedL2SharedEncrypted => write!(
                f,
                "writing into a cluster shared with a snapshot is not supported in encrypted qcow2 images with extended L2 entries"
            ),
            Unsupported::CreateOption(k) => write!(f, "qcow2 option '{k}' is not supported"),
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
            Unsupported::NoCheck(name) => {
                write!(f, "This image format ({name}) does not support checks")
            }
            Unsupported::NoCompression(name) => {
                write!(f, "Compression is not supported for the {name} format")
            }
            Unsupported::NoBackingFile(name) => write!(f, "{name} images have no backing file"),
            Unsupported::NoPreallocation(name) => {
                write!(f, "falloc preallocation of a {name} image")
            }
            Unsupported::NoCompressedClusters => {
                write!(f, "this format has no compressed clusters")
            }
            Unsupported::NoResize(_) => {
                // qemu's `bdrv_co_truncate` wording (it does not name the format).
                write!(f, "Image format driver does not support resize")
            }
            Unsupported::NoMeasure(name) => {
                write!(f, "Block driver '{name}' does not support size measurement")
            }
            Unsupported::NoMakeEmpty(name) => {
                write!(f, "Image format '{name}' cannot be emptied")
            }
            Unsupported::ResizeV2WithSnapshots => {
                write!(f, "Can't resize a v2 image which has snapshots")
            }
            Unsupported::ShrinkWithSnapshots => {
                write!(f, "Can't shrink a qcow2 image with snapshots")
            }
            Unsupported::ZeroesNeedData(ZeroLimit::Qcow2V2Backing) => write!(
                f,
                "qcow2 v2 image with a backing file cannot write zeroes without writing data"
            ),
            Unsupported::ZeroesNeedData(ZeroLimit::Qcow2PartialCluster) => write!(
                f,
                "writing zeroes to part of a qcow2 cluster needs writing data"
            ),
            Unsupported::ZeroesNeedData(ZeroLimit::QedPartialCluster) => {
                write!(f, "QED: zeroing a partial cluster needs writing zero bytes")
            }
            Unsupported::VmdkCreate(what) => {
                write!(f, "vdisk cannot create VMDK images with {what} yet")
            }
            Unsupported::ZeroesNeedData(ZeroLimit::VmdkGrain) => {
                write!(
                    f,
                    "VMDK: zeroing anything but whole zeroed grains needs writing zero bytes"
                )
            }
            Unsupported::CompressedEncrypted => {
                write!(
                    f,
                    "Compression and encryption not supported at the same time"
                )
            }
            Unsupported::ZeroesNeedData(ZeroLimit::Encrypted) => {
                write!(f, "zeroes in an encrypted image must be written as data")
            }
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
    /// A VMDK `backing_fmt` other than `vmdk`.
    VmdkBackingFormat,
    /// A VHDX creation parameter out of range (qemu-img's sentence).
    VhdxCreate(&'static str),
    /// A rule of qcow2's external data files (qemu-img's sentence).
    DataFile(&'static str),
    /// VMDK `compat6` together with `hwversion`.
    VmdkCompat6WithHwversion,
    /// A flat VMDK with a backing file.
    VmdkFlatBacking,
    /// A flat VMDK with zeroed grains.
    VmdkFlatZeroedGrain,
    /// A VMDK extent larger than its grain tables address.
    VmdkTooLarge {
        /// The size asked for.
        size: u64,
    },
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
    /// A VHD larger than 2040 GiB (qemu's wording has no hint).
    VpcTooLarge,
    /// A VDI larger than QEMU's limit.
    VdiTooLarge {
        /// The size asked for.
        size: u64,
        /// The largest size.
        max: u64,
    },
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
    /// A qcow2 version 2 header asked to hold version 3 fields (feature bits, another
    /// refcount width, a compression type).
    V2HeaderFields,
    /// A qcow2 v3 `header_length` outside `104..=cluster_size`.
    HeaderLength {
        /// The length asked for.
        len: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A backing file without a backing format (where one is required).
    BackingWithoutFormat,
    /// A backing file together with preallocation (qcow2 without extended L2).
    BackingWithPreallocation,
    /// A qcow2 feature asked for with `compat=0.10`.
    NeedsV3(V3Feature),
    /// `amend` narrowing refcounts below a refcount the image holds.
    RefcountNarrowing {
        /// The new width.
        bits: u32,
        /// Host offset of the cluster.
        offset: u64,
        /// Its refcount.
        refcount: u64,
    },
    /// `amend` with a refcount width other than 16 and compat=0.10.
    AmendRefcountNeedsV3,
    /// `amend` downgrading an image whose refcounts are not 16 bits wide.
    DowngradeRefcountWidth,
    /// `amend` downgrading with incompatible features set (their bits).
    DowngradeFeatures(u64),
    /// `amend` downgrading with snapshots of another size or a VM state above 4 GiB.
    DowngradeSnapshots,
    /// `amend` changing the backing file (QEMU 10 sends users to `rebase`).
    AmendBacking,
    /// `amend` downgrading a zstd image that has compressed clusters.
    DowngradeZstd,
    /// `amend` with a `compat` value it does not know.
    UnknownCompat(String),
    /// `amend` of an option only creation takes.
    NotAmendable(&'static str),
    /// `amend` of encryption options on an image without encryption.
    AmendEncryption,
    /// `amend` of encryption options on a legacy AES image.
    AmendOnlyLuks,
    /// An enum option value the legacy option path refuses (`measure`).
    LegacyEnumValue(String),
    /// A `compat` value the legacy option path refuses (`measure`).
    CompatLevel(String),
    /// A v3 feature asked with compat=0.10, in the wording of the legacy option path
    /// (`measure`, `amend`): "use compat=1.1 or greater".
    NeedsV3Compat(V3Feature),
    /// Extended L2 entries with clusters below 16 KiB.
    ExtendedL2ClusterSize,
    /// A backing file given to a format without backing files.
    BackingNotSupported(&'static str),
    /// The data does not carry the format's signature.
    WrongFormat(&'static str),
    /// A file too short to hold the format's header.
    FileTooShort {
        /// The format.
        format: &'static str,
        /// The file length.
        len: u64,
    },
    /// An option read as an enumeration that is not declared as one.
    NotEnum(String),
    /// An image or backing file name that is not UTF-8 (shown lossily).
    NotUtf8Name {
        /// Whether it names a backing file (else the image).
        backing: bool,
        /// The name, lossily converted.
        name: String,
    },
    /// A backing chain longer than the depth bound.
    ChainTooDeep {
        /// The bound.
        max: usize,
        /// The image at which it was crossed.
        name: String,
    },
    /// `--image-opts` together with `--format`.
    ImageOptsWithFormat,
    /// A `discard` option that is none of QEMU's words.
    BadDiscardOption,
    /// `detect-zeroes=unmap` on an image whose `discard` policy is not `unmap`.
    DetectZeroesUnmapWithoutDiscard,
    /// `force-share=on` on an image opened read/write.
    ForceShareReadWrite,
    /// `copy-on-read=on` on an image opened read-only.
    CopyOnReadReadOnly,
    /// The `copy-on-read` filter node (`driver=copy-on-read`) on a read-only open.
    CopyOnReadFilterReadOnly,
    /// The `copy-on-read` filter's `bottom` names no node of its chain.
    CopyOnReadBottomNotFound(String),
    /// A backing file reached on an open that disabled backing files.
    BackingDisabled,
    /// A backing file reached while an image is being created.
    BackingWhileCreating,
    /// Image creation without a size (and no backing file to take it from).
    NeedsSize,
    /// A backing file name longer than create accepts.
    CreateBackingNameTooLong {
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A qcow2 size whose L1 table would exceed the L1 size limit.
    L1TooLarge {
        /// The size asked for.
        size: u64,
    },
    /// VM state at `offset` (an image offset past the guest disk) that the L1 table
    /// cannot reach within its size limit: QEMU answers EFBIG, "File too large".
    VmStateTooLarge {
        /// The image offset of the VM state byte past the limit.
        offset: u64,
    },
    /// A compressed write not at a cluster boundary inside the disk.
    CompressedWriteUnaligned {
        /// Its offset.
        offset: u64,
    },
    /// A compressed write that is not exactly one cluster (or the disk's tail).
    CompressedWriteLength {
        /// Bytes it must cover.
        want: u64,
        /// Bytes given.
        got: u64,
    },
    /// An L2 entry this image's entry format cannot encode (the entry as `{:?}`).
    UnencodableL2Entry {
        /// The guest cluster.
        guest_cluster: u64,
        /// The entry, rendered with `Debug` (a value, not a sentence).
        entry: String,
    },
    /// A write hook refused the request (`op` names the kind: `discards`, `writes`).
    RefusedByHook {
        /// The kind of request, plural.
        op: &'static str,
    },
    /// Block status asked of an empty range.
    EmptyBlockStatus {
        /// Its offset.
        offset: u64,
    },
    /// Block status returned nothing for a range.
    NoBlockStatus {
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// A format driver mapped a run of `len` bytes for a request of `want` at `guest`.
    BadMapping {
        /// Guest offset of the request.
        guest: u64,
        /// Bytes mapped.
        len: u64,
        /// Bytes asked for.
        want: u64,
    },
    /// A format driver returned a write target of `len` bytes for `want` at `guest`.
    BadWriteTarget {
        /// Guest offset of the request.
        guest: u64,
        /// Bytes of the target.
        len: u64,
        /// Bytes asked for.
        want: u64,
    },
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
            Invalid::VmdkBackingFormat => write!(f, "backing_file must be a vmdk image"),
            Invalid::VhdxCreate(why) => write!(f, "{why}"),
            Invalid::DataFile(why) => write!(f, "{why}"),
            Invalid::VmdkCompat6WithHwversion => {
                write!(f, "compat6 cannot be enabled with hwversion set")
            }
            Invalid::VmdkFlatBacking => write!(f, "Flat image can't have backing file"),
            Invalid::VmdkFlatZeroedGrain => write!(f, "Flat image can't enable zeroed grain"),
            Invalid::VmdkTooLarge { size } => {
                write!(f, "VMDK extent of {size} bytes is larger than a sparse extent holds")
            }
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
            Invalid::VpcTooLarge => {
                write!(f, "The image size is too large for file format 'vpc'")
            }
            Invalid::VdiTooLarge { size, max } => write!(
                f,
                "Unsupported VDI image size (size is {size:#x}, max supported is {max:#x})"
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
            Invalid::V2HeaderFields => write!(
                f,
                "qcow2 version 2 header cannot hold feature bits, a refcount width other than 16 bits or a compression type"
            ),
            Invalid::HeaderLength { len, cluster_size } => write!(
                f,
                "qcow2 header_length {len} must be between 104 and the cluster size ({cluster_size})"
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
            Invalid::RefcountNarrowing {
                bits,
                offset,
                refcount,
            } => write!(
                f,
                "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {offset:#x} has a refcount of {refcount}"
            ),
            Invalid::AmendRefcountNeedsV3 => write!(
                f,
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
            ),
            Invalid::DowngradeRefcountWidth => {
                write!(f, "compat=0.10 requires refcount_bits=16")
            }
            Invalid::DowngradeFeatures(bits) => write!(
                f,
                "Cannot downgrade an image with incompatible features {bits:#x} set"
            ),
            Invalid::DowngradeSnapshots => {
                write!(f, "Internal snapshots prevent downgrade of image")
            }
            Invalid::AmendBacking => write!(f, "Cannot amend the backing file"),
            Invalid::NotAmendable(k) => write!(f, "Invalid parameter '{k}'"),
            Invalid::DowngradeZstd => write!(
                f,
                "Cannot downgrade an image with zstd compression type and existing compressed clusters"
            ),
            Invalid::UnknownCompat(v) => write!(f, "Unknown compatibility level {v}"),
            Invalid::AmendEncryption => write!(
                f,
                "Can't amend encryption options - encryption not present"
            ),
            Invalid::AmendOnlyLuks => write!(f, "Only LUKS encryption options can be amended"),
            Invalid::LegacyEnumValue(v) => write!(f, "invalid parameter value: {v}"),
            Invalid::CompatLevel(v) => write!(f, "Invalid compatibility level: '{v}'"),
            Invalid::NeedsV3Compat(feature) => {
                let v = Invalid::NeedsV3(*feature).to_string();
                write!(f, "{}", v.replace("use version=v3", "use compat=1.1"))
            }
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
            Invalid::FileTooShort { format, len } => {
                write!(f, "Image not in {format} format (file is only {len} bytes)")
            }
            Invalid::NotEnum(key) => {
                write!(f, "option '{key}' is not declared as an enumeration")
            }
            Invalid::NotUtf8Name { backing, name } => write!(
                f,
                "{} name '{name}' is not UTF-8",
                if *backing { "backing file" } else { "image" }
            ),
            Invalid::ChainTooDeep { max, name } => {
                write!(f, "backing chain deeper than {max} images at '{name}'")
            }
            Invalid::ImageOptsWithFormat => {
                write!(f, "--image-opts and --format are mutually exclusive")
            }
            Invalid::BadDiscardOption => write!(f, "Invalid discard option"),
            Invalid::DetectZeroesUnmapWithoutDiscard => write!(
                f,
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
            ),
            Invalid::ForceShareReadWrite => write!(
                f,
                "force-share=on can only be used with read-only images"
            ),
            Invalid::CopyOnReadReadOnly => {
                write!(f, "Can't use copy-on-read on read-only device")
            }
            Invalid::CopyOnReadFilterReadOnly => write!(f, "Block node is read-only"),
            Invalid::CopyOnReadBottomNotFound(n) => write!(f, "Bottom node '{n}' not found"),
            Invalid::BackingDisabled => write!(f, "backing files are disabled for this open"),
            Invalid::BackingWhileCreating => {
                write!(f, "backing files are not opened while creating")
            }
            Invalid::NeedsSize => write!(f, "Image creation needs a size parameter"),
            Invalid::CreateBackingNameTooLong { .. } => write!(f, "Backing file name too long"),
            Invalid::L1TooLarge { size } => write!(
                f,
                "qcow2 image size {size} needs an L1 table larger than 32 MiB"
            ),
            Invalid::VmStateTooLarge { .. } => write!(f, "File too large"),
            Invalid::CompressedWriteUnaligned { offset } => write!(
                f,
                "compressed write at offset {offset} is not cluster aligned or past the end"
            ),
            Invalid::CompressedWriteLength { want, got } => write!(
                f,
                "compressed writes must cover one whole cluster ({want} bytes), got {got}"
            ),
            Invalid::UnencodableL2Entry {
                guest_cluster,
                entry,
            } => write!(
                f,
                "qcow2: cannot write L2 entry {entry} of guest cluster {guest_cluster} in this image"
            ),
            Invalid::RefusedByHook { op } => write!(f, "{op} refused by the hook"),
            Invalid::EmptyBlockStatus { .. } => write!(f, "block status of an empty range"),
            Invalid::NoBlockStatus { offset, len } => {
                write!(f, "no block status for offset {offset} length {len}")
            }
            Invalid::BadMapping { guest, len, want } => write!(
                f,
                "format driver mapped {len} bytes at guest offset {guest:#x} for a request of {want}"
            ),
            Invalid::BadWriteTarget { guest, len, want } => write!(
                f,
                "format driver returned a write target of {len} bytes at guest offset {guest:#x} for a request of {want}"
            ),
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
    /// No host clusters could be allocated.
    Clusters,
    /// Every host cluster offset the qcow2 entries can hold is taken.
    HostOffsets,
    /// A QED allocation whose byte size overflows.
    QedAllocation {
        /// Clusters asked for.
        clusters: u64,
    },
    /// A QED image file that would grow past 2^63 bytes.
    QedFileSize,
    /// A block past the offsets a VHD BAT (sector numbers in 32 bits) or a VDI block
    /// map can hold (the format's name).
    BlockTable(&'static str),
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
            NoSpace::Clusters => write!(f, "could not allocate clusters"),
            NoSpace::HostOffsets => write!(f, "qcow2 image is full (host offsets exhausted)"),
            NoSpace::QedAllocation { .. } => write!(f, "QED allocation too large"),
            NoSpace::QedFileSize => write!(f, "QED image file would exceed 2^63 bytes"),
            NoSpace::BlockTable(fmt) => {
                write!(
                    f,
                    "{fmt} image file would grow past what its block table can address"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

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
    fn converted_site_wording() {
        let t = |e: Error| e.to_string();
        assert_eq!(
            t(Unsupported::NoCheck("raw").into()),
            "This image format (raw) does not support checks"
        );
        assert_eq!(
            t(Unsupported::NoCompression("raw").into()),
            "Compression is not supported for the raw format"
        );
        assert_eq!(
            t(Unsupported::NoBackingFile("raw").into()),
            "raw images have no backing file"
        );
        assert_eq!(
            t(Unsupported::NoPreallocation("qcow2").into()),
            "falloc preallocation of a qcow2 image"
        );
        assert_eq!(
            t(Unsupported::ResizeV2WithSnapshots.into()),
            "Can't resize a v2 image which has snapshots"
        );
        assert_eq!(
            t(Unsupported::ZeroesNeedData(ZeroLimit::Qcow2V2Backing).into()),
            "qcow2 v2 image with a backing file cannot write zeroes without writing data"
        );
        assert_eq!(
            t(Invalid::FileTooShort {
                format: "QED",
                len: 10
            }
            .into()),
            "Image not in QED format (file is only 10 bytes)"
        );
        assert_eq!(
            t(Invalid::NotUtf8Name {
                backing: true,
                name: "a\u{fffd}".into()
            }
            .into()),
            "backing file name 'a\u{fffd}' is not UTF-8"
        );
        assert_eq!(
            t(Invalid::ChainTooDeep {
                max: 64,
                name: "b".into()
            }
            .into()),
            "backing chain deeper than 64 images at 'b'"
        );
        assert_eq!(
            t(Invalid::CompressedWriteUnaligned { offset: 512 }.into()),
            "compressed write at offset 512 is not cluster aligned or past the end"
        );
        assert_eq!(
            t(Invalid::CompressedWriteLength {
                want: 65536,
                got: 512
            }
            .into()),
            "compressed writes must cover one whole cluster (65536 bytes), got 512"
        );
        assert_eq!(
            t(Invalid::BadWriteTarget {
                guest: 0x1000,
                len: 0,
                want: 512
            }
            .into()),
            "format driver returned a write target of 0 bytes at guest offset 0x1000 for a request of 512"
        );
        assert_eq!(
            t(Invalid::BadMapping {
                guest: 0,
                len: 0,
                want: 512
            }
            .into()),
            "format driver mapped 0 bytes at guest offset 0x0 for a request of 512"
        );
        assert_eq!(
            t(Invalid::NoBlockStatus {
                offset: 0,
                len: 512
            }
            .into()),
            "no block status for offset 0 length 512"
        );
        assert_eq!(
            t(Invalid::L1TooLarge { size: 1 << 60 }.into()),
            "qcow2 image size 1152921504606846976 needs an L1 table larger than 32 MiB"
        );
        assert_eq!(
            t(Invalid::RefusedByHook { op: "discards" }.into()),
            "discards refused by the hook"
        );
        assert_eq!(t(NoSpace::Clusters.into()), "could not allocate clusters");
        assert_eq!(
            t(NoSpace::QedFileSize.into()),
            "QED image file would exceed 2^63 bytes"
        );
        assert_eq!(Error::from(Invalid::NeedsSize).errno(), libc::EINVAL);
        assert_eq!(
            Error::from(Unsupported::NoCheck("raw")).errno(),
            libc::ENOTSUP
        );
    }
}
