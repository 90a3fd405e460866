//! VHDX's registration: its probe (QEMU's `vhdx_probe`: `vhdxfile` at offset 0), open,
//! create, options and capabilities.

use crate::error::Result;
use crate::format::foreign::{has_at, score};
use crate::format::registry::{Capabilities, FormatDesc, OpenArgs, ProbeInput};
use crate::format::Driver;
use std::sync::Arc;

fn probe(p: &ProbeInput<'_>) -> u32 {
    score(has_at(p.head, 0, b"vhdxfile"), 100)
}

fn open(args: OpenArgs<'_, '_>) -> Result<Arc<dyn Driver>> {
    Ok(Arc::new(super::Vhdx::open(args)?))
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = FormatDesc {
    name: "vhdx",
    probe,
    open: Some(open),
    create: Some(super::create::create),
    create_options: super::options::CREATE_OPTIONS,
    amend_only_options: &[],
    amendable: false,
    caps: Capabilities::NONE.with_clusters(),
};

#[cfg(test)]
mod tests {
    use crate::format::foreign::padded;
    use crate::format::Format;

    #[test]
    fn identifier() {
        assert_eq!(Format::probe(&padded(b"vhdxfile")).name(), "vhdx");
        assert_eq!(Format::probe(&padded(b"vhdxfil")).name(), "raw");
    }
}
