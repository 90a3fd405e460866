//! What can be wrong with a VHDX image ([`VhdxProblem`]).

use std::fmt;

/// A VHDX-specific corruption or refusal (the [`super::Problem::Vhdx`] of a
/// [`super::Corruption`] naming one of the VHDX structures).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VhdxProblem {
    /// Neither header has a valid signature, checksum and version.
    NoValidHeader,
    /// Neither region table is valid.
    NoValidRegionTable,
    /// A structure whose CRC-32C does not match.
    Checksum,
    /// A required region or metadata item is missing (its name).
    Missing(&'static str),
    /// A required region or metadata item vdisk does not know.
    UnknownRequired,
    /// A field out of its allowed range (its name and value).
    Field(&'static str, u64),
    /// A differencing image (parent locator).
    Differencing,
    /// A partially present block (differencing images only).
    PartiallyPresent {
        /// The block.
        block: u64,
    },
    /// A BAT entry with an undefined state.
    BatState {
        /// The block.
        block: u64,
        /// The state.
        state: u64,
    },
    /// A payload block inside the header area or past what the file can hold.
    BlockOffset {
        /// The block.
        block: u64,
        /// Its file offset.
        offset: u64,
    },
    /// A read-only open of a file whose log must be replayed.
    LogNeedsReplay,
    /// The log has entries but no valid sequence to replay.
    LogInvalid,
    /// The log's version or region is not what vdisk replays.
    LogUnsupported,
}

impl fmt::Display for VhdxProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VhdxProblem::NoValidHeader => write!(f, "No valid VHDX header found"),
            VhdxProblem::NoValidRegionTable => write!(f, "No valid VHDX region table found"),
            VhdxProblem::Checksum => write!(f, "checksum mismatch"),
            VhdxProblem::Missing(what) => write!(f, "VHDX {what} is missing"),
            VhdxProblem::UnknownRequired => {
                write!(f, "VHDX image has an unknown required region or metadata item")
            }
            VhdxProblem::Field(name, v) => write!(f, "VHDX {name} {v} is invalid"),
            VhdxProblem::Differencing => {
                write!(f, "VHDX differencing images are not supported")
            }
            VhdxProblem::PartiallyPresent { block } => write!(
                f,
                "VHDX block {block} is partially present (differencing images are not supported)"
            ),
            VhdxProblem::BatState { block, state } => {
                write!(f, "VHDX BAT entry of block {block} has an invalid state {state}")
            }
            VhdxProblem::BlockOffset { block, offset } => write!(
                f,
                "VHDX BAT entry of block {block} has an invalid file offset {offset}"
            ),
            VhdxProblem::LogNeedsReplay => write!(
                f,
                "VHDX image file opened read-only, but contains a log that needs to be replayed\nTo replay the log, run:\nqemu-img check -r all"
            ),
            VhdxProblem::LogInvalid => write!(f, "VHDX log has no valid sequence to replay"),
            VhdxProblem::LogUnsupported => write!(f, "VHDX log version or placement is not supported"),
        }
    }
}
