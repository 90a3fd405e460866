//! What can be wrong with a VMDK image ([`VmdkProblem`]), in qemu-img's words where it
//! has them.

use std::fmt;

/// A VMDK-specific corruption or refusal (the [`super::Problem::Vmdk`] of a
/// [`super::Corruption`] naming one of the VMDK structures).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmdkProblem {
    /// A stream-optimized file whose footer (or its markers) is not valid.
    InvalidFooter,
    /// A sparse extent version above 3.
    Version(u32),
    /// A version 3 (changed block tracking) extent opened read-write.
    Version3ReadOnly,
    /// More than 512 grain table entries per grain table.
    L2TooBig,
    /// Grain table entries × grain size is zero.
    L1EntryInvalid,
    /// The file is shorter than the first grain offset (`need` bytes).
    Truncated {
        /// Bytes the header says the file has at least.
        need: u64,
    },
    /// A grain of more than 1 GiB (or zero).
    Granularity,
    /// A grain directory of more than 32 Mi entries.
    L1TooBig,
    /// A descriptor without `createType`.
    BadDescriptor,
    /// A `createType` vdisk (and qemu) do not read.
    ImageType(String),
    /// A malformed extent line (the line).
    ExtentLine(String),
    /// An extent type vdisk does not read (`SESPARSE`, `VMFSRDM`...).
    ExtentType(String),
    /// Neither a sparse extent nor a descriptor.
    NotVmdk,
    /// A file of less than 4 bytes.
    TooSmall,
    /// The descriptor names more extents than vdisk opens.
    TooManyExtents {
        /// The limit.
        max: u64,
    },
    /// A grain table or grain sector offset past the end of its file.
    PastEnd {
        /// The sector offset.
        sector: u64,
        /// The file length in bytes.
        file_len: u64,
    },
    /// A compressed grain whose marker says it belongs elsewhere or is empty.
    BadGrainMarker {
        /// The compressed size the marker holds.
        size: u64,
    },
    /// A write to a grain of a stream-optimized extent that already holds data.
    StreamRewrite,
    /// A write to a stream-optimized extent that does not cover whole grains.
    StreamPartialGrain,
    /// A `parentFileNameHint` without its closing quote, or too long.
    ParentHint,
    /// A relative extent name in a descriptor that is not a local file.
    RelativeExtent(String),
    /// A sparse extent whose capacity differs from the extent line's size.
    ExtentSize {
        /// Sectors the descriptor says.
        line: u64,
        /// Sectors the extent header says.
        header: u64,
    },
    /// An allocation beyond the 2^32 sectors a grain table entry addresses.
    ExtentFull,
}

impl fmt::Display for VmdkProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmdkProblem::InvalidFooter => write!(f, "Invalid footer"),
            VmdkProblem::Version(v) => write!(f, "Unsupported VMDK version {v}"),
            VmdkProblem::Version3ReadOnly => write!(f, "VMDK version 3 must be read only"),
            VmdkProblem::L2TooBig => write!(f, "L2 table size too big"),
            VmdkProblem::L1EntryInvalid => write!(f, "L1 entry size is invalid"),
            VmdkProblem::Truncated { need } => {
                write!(f, "File truncated, expecting at least {need} bytes")
            }
            VmdkProblem::Granularity => write!(f, "Invalid granularity, image may be corrupt"),
            VmdkProblem::L1TooBig => write!(f, "L1 size too big"),
            VmdkProblem::BadDescriptor => write!(f, "invalid VMDK image descriptor"),
            VmdkProblem::ImageType(t) => write!(f, "Unsupported image type '{t}'"),
            VmdkProblem::ExtentLine(l) => write!(f, "Invalid extent line: {l}"),
            VmdkProblem::ExtentType(t) => write!(f, "Unsupported extent type '{t}'"),
            VmdkProblem::NotVmdk => write!(f, "Image not in VMDK format"),
            VmdkProblem::TooSmall => write!(f, "File is too small, not a valid image"),
            VmdkProblem::TooManyExtents { max } => {
                write!(f, "VMDK descriptor names more than {max} extents")
            }
            VmdkProblem::PastEnd { sector, file_len } => write!(
                f,
                "VMDK table entry points to sector {sector}, past the end of the file ({file_len} bytes)"
            ),
            VmdkProblem::BadGrainMarker { size } => {
                write!(f, "VMDK compressed grain has an invalid size {size}")
            }
            VmdkProblem::StreamRewrite => {
                write!(f, "Could not write to allocated cluster for streamOptimized")
            }
            VmdkProblem::StreamPartialGrain => write!(
                f,
                "streamOptimized VMDK writes must cover whole grains"
            ),
            VmdkProblem::ParentHint => write!(f, "invalid parentFileNameHint in VMDK descriptor"),
            VmdkProblem::RelativeExtent(n) => write!(
                f,
                "Cannot use relative paths with VMDK descriptor file '{n}'"
            ),
            VmdkProblem::ExtentSize { line, header } => write!(
                f,
                "VMDK extent of {line} sectors in the descriptor has a capacity of {header} sectors"
            ),
            VmdkProblem::ExtentFull => write!(f, "VMDK extent is full (2^32 sectors)"),
        }
    }
}
