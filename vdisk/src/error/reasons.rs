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
}
