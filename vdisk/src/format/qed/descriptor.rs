//! QED's registration: its probe (QEMU's `bdrv_qed_probe`), open, create, options and
//! capabilities.

use crate::error::Result;
use crate::format::registry::{Capabilities, FormatDesc, OpenArgs, ProbeInput};
use crate::format::Driver;
use std::sync::Arc;

fn probe(p: &ProbeInput<'_>) -> u32 {
    crate::format::foreign::score(super::probe(p.head), 100)
}

fn open(args: OpenArgs<'_, '_>) -> Result<Arc<dyn Driver>> {
    Ok(Arc::new(super::Qed::open(
        args.meta,
        args.opts,
        args.backing,
    )?))
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = FormatDesc {
    name: "qed",
    probe,
    open: Some(open),
    create: Some(super::create::create_typed),
    create_options: super::options::CREATE_OPTIONS,
    amend_only_options: &[],
    amendable: false,
    caps: Capabilities {
        sector_aligned: true,
        ..Capabilities::NONE.with_clusters().with_backing()
    },
};
