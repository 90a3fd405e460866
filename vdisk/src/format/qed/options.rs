//! The QED creation options, declared once. Order = qemu-img's `Formatting` line;
//! help texts are qemu-img 10's. Preallocation, `nocow` and `extent_size_hint` are the
//! file protocol's ([`FILE_PROTOCOL_OPTIONS`](crate::format::options::FILE_PROTOCOL_OPTIONS)).

use crate::format::options::{OptKind, OptionDesc, BACKING_FILE, BACKING_FMT, SIZE};

/// QED's options. QEMU's QED driver has no `amend`, so none is amendable.
pub const CREATE_OPTIONS: &[OptionDesc] = &[
    SIZE,
    BACKING_FILE,
    BACKING_FMT,
    OptionDesc::new(
        "cluster_size",
        OptKind::Size,
        Some("65536"),
        "Cluster size (in bytes)",
    ),
    OptionDesc::new(
        "table_size",
        OptKind::Size,
        None,
        "L1/L2 table size (in clusters)",
    ),
];
