//! qcow2's registration: its probe (QEMU's `qcow2_probe`), open, create, options and
//! capabilities.

use crate::error::Result;
use crate::format::registry::{Capabilities, FormatDesc, OpenArgs, ProbeInput};
use crate::format::Driver;
use std::sync::Arc;

/// Every `QFI\xfb` file except version 1, which is qcow (v1): versions 2 and 3 and any
/// unknown version, which the driver then names in its error.
fn probe(p: &ProbeInput<'_>) -> u32 {
    let h = p.head;
    crate::format::foreign::score(
        super::probe(h) && h.get(4..8) != Some(&[0, 0, 0, 1][..]),
        100,
    )
}

fn open(args: OpenArgs<'_, '_>) -> Result<Arc<dyn Driver>> {
    // A `data` storage other than `meta` is the node's `data-file` child.
    let child = (!Arc::ptr_eq(&args.meta, &args.data)).then_some(args.data);
    Ok(Arc::new(super::Qcow2::open_with(
        args.meta,
        super::DataSource {
            child,
            files: args.data_files,
        },
        args.opts,
        args.backing,
    )?))
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = FormatDesc {
    name: "qcow2",
    probe,
    open: Some(open),
    create: Some(super::create::create_typed),
    create_options: super::options::CREATE_OPTIONS,
    amend_only_options: super::options::AMEND_ONLY_OPTIONS,
    amendable: true,
    caps: Capabilities {
        metadata_prealloc: true,
        dirty_flag: true,
        qemu_shrinks: true,
        data_file: true,
        ..Capabilities::NONE
            .with_clusters()
            .with_backing()
            .with_compression()
    },
};
