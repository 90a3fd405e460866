//! `measure`: the file size an image of a format needs for a guest disk of a given
//! size or with a given image's contents (qemu-img's "required size" and "fully
//! allocated size"). Each format that can be measured computes its own numbers;
//! formats QEMU cannot measure (QED) refuse as qemu-img does.

use super::options::{OptKind, OptionDesc, OptionValues};
use super::registry::Format;
use super::ExtentKind;
use crate::error::{Result, Unsupported};

/// raw's `preallocation`, as qemu declares it.
static RAW_PREALLOCATION: &[OptionDesc] = &[OptionDesc::new(
    "preallocation",
    OptKind::Enum {
        values: &["off", "falloc", "full"],
        qapi: Some("preallocation"),
    },
    None,
    "Preallocation mode (allowed values: off, falloc, full)",
)];

/// What to measure for.
pub enum MeasureSource<'a> {
    /// A new empty disk of this many bytes (`--size`).
    Size(u64),
    /// An existing disk: its size, its block status through the whole chain
    /// (`status(offset, len)` → kind and length of the run starting at `offset`), and
    /// the size its persistent bitmaps would take (`None`: the input has no bitmap
    /// support).
    Image {
        /// Guest size in bytes.
        size: u64,
        /// Block status through the chain.
        status: &'a mut dyn FnMut(u64, u64) -> Result<(ExtentKind, u64)>,
        /// Bytes of persistent bitmaps, when the input format has them.
        bitmaps: Option<u64>,
    },
}

/// qemu's `BlockMeasureInfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeasureInfo {
    /// File size needed for the data present.
    pub required: u64,
    /// File size with every cluster allocated.
    pub fully_allocated: u64,
    /// Bytes the persistent bitmaps would take (shown when both sides support them).
    pub bitmaps: Option<u64>,
}

/// Measures for a new image of `format` with creation options `options`.
pub fn measure(
    format: Format,
    options: &[(String, String)],
    src: MeasureSource<'_>,
) -> Result<MeasureInfo> {
    // qemu's raw driver takes `preallocation` (vdisk's raw create does not yet);
    // measuring accepts it, and it changes nothing for raw.
    let extra: &'static [OptionDesc] = if format.caps().raw_data {
        RAW_PREALLOCATION
    } else {
        &[]
    };
    let opts = OptionValues::parse(&[format.create_options(), extra], options)?;
    match format.name() {
        "qcow2" => super::qcow2::measure::measure(&opts, src),
        "raw" => Ok(raw(src)),
        name => Err(Unsupported::NoMeasure(name).into()),
    }
}

/// raw: the file is the disk, allocated or not.
fn raw(src: MeasureSource<'_>) -> MeasureInfo {
    let required = match src {
        MeasureSource::Size(s) => s.div_ceil(512) * 512,
        MeasureSource::Image { size, .. } => size,
    };
    MeasureInfo {
        required,
        fully_allocated: required,
        bitmaps: None,
    }
}
