//! The vdi creation options, declared once (qemu-img 10's help texts and default).

use crate::format::options::{OptKind, OptionDesc, SIZE};

/// vdi's options (QEMU's vdi driver has no `amend`).
pub const CREATE_OPTIONS: &[OptionDesc] = &[
    SIZE,
    OptionDesc::new(
        "static",
        OptKind::Bool,
        Some("off"),
        "VDI static (pre-allocated) image",
    ),
];
