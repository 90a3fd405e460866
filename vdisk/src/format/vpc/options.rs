//! The vpc creation options, declared once. Order = qemu-img's `Formatting` line;
//! help texts are qemu-img 10's (including the trailing space of `subformat`'s).

use crate::format::options::{OptKind, OptionDesc, SIZE};

/// `subformat`'s words.
pub const SUBFORMATS: &[&str] = &["dynamic", "fixed"];

/// vpc's options (QEMU's vpc driver has no `amend`).
pub const CREATE_OPTIONS: &[OptionDesc] = &[
    SIZE,
    OptionDesc::new(
        "subformat",
        OptKind::Enum {
            values: SUBFORMATS,
            qapi: Some("subformat"),
        },
        None,
        "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
    ),
    OptionDesc::new(
        "force_size",
        OptKind::Bool,
        None,
        "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation",
    ),
];
