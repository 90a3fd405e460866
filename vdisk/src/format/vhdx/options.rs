//! The VHDX creation options, declared once. Order = qemu-img's `Formatting` line;
//! help texts are qemu-img 10's.

use crate::format::options::{OptKind, OptionDesc};

/// VHDX's options. QEMU's VHDX driver has no `amend`.
pub const CREATE_OPTIONS: &[OptionDesc] = &[
    OptionDesc::new(
        "size",
        OptKind::Size,
        None,
        "Virtual disk size; max of 64TB.",
    ),
    OptionDesc::new("log_size", OptKind::Size, Some("1048576"), "Log size; min 1MB."),
    OptionDesc::new(
        "block_size",
        OptKind::Size,
        Some("0"),
        "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
    ),
    OptionDesc::new(
        "subformat",
        OptKind::Enum {
            values: &["dynamic", "fixed"],
            qapi: Some("subformat"),
        },
        None,
        "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
    ),
    OptionDesc::new(
        "block_state_zero",
        OptKind::Bool,
        None,
        "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic.",
    ),
];
