//! The VMDK creation options, declared once. Order = qemu-img's `Formatting` line;
//! help texts are qemu-img 10's.

use crate::format::options::{OptKind, OptionDesc, BACKING_FILE, SIZE};

/// `subformat` values.
pub const SUBFORMATS: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];
/// `adapter_type` values.
pub const ADAPTER_TYPES: &[&str] = &["ide", "buslogic", "lsilogic", "legacyESX"];

/// VMDK's options. QEMU's VMDK driver has no `amend`.
pub const CREATE_OPTIONS: &[OptionDesc] = &[
    SIZE,
    OptionDesc::new(
        "adapter_type",
        OptKind::Enum {
            values: ADAPTER_TYPES,
            qapi: None,
        },
        None,
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    ),
    BACKING_FILE,
    OptionDesc::new(
        "backing_fmt",
        OptKind::Str,
        None,
        "Must be 'vmdk' if present",
    ),
    OptionDesc::new("compat6", OptKind::Bool, Some("off"), "VMDK version 6 image"),
    OptionDesc::new(
        "hwversion",
        OptKind::Str,
        Some("undefined"),
        "VMDK hardware version",
    ),
    OptionDesc::new(
        "toolsversion",
        OptKind::Str,
        None,
        "VMware guest tools version",
    ),
    OptionDesc::new(
        "subformat",
        OptKind::Enum {
            values: SUBFORMATS,
            qapi: None,
        },
        None,
        "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    ),
    OptionDesc::new(
        "zeroed_grain",
        OptKind::Bool,
        None,
        "Enable efficient zero writes using the zeroed-grain GTE feature",
    ),
];
