//! vpc's registration: its probe (QEMU's `vpc_probe`: the footer cookie at offset 0),
//! open, create, options and capabilities.
//!
//! Dynamic and differencing VHDs start with a copy of the footer. A *fixed* VHD has the
//! footer only in its last 512 bytes; QEMU's probe does not look there (it opens such a
//! file as raw unless `-f vpc` is given), so neither does this one.

use crate::error::Result;
use crate::format::foreign::{has_at, score};
use crate::format::registry::{Capabilities, FormatDesc, OpenArgs, ProbeInput};
use crate::format::Driver;
use std::sync::Arc;

fn probe(p: &ProbeInput<'_>) -> u32 {
    score(has_at(p.head, 0, super::footer::COOKIE), 100)
}

fn open(args: OpenArgs<'_, '_>) -> Result<Arc<dyn Driver>> {
    Ok(Arc::new(super::Vpc::open(args.meta, args.opts)?))
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = FormatDesc {
    name: "vpc",
    probe,
    open: Some(open),
    create: Some(super::create::create),
    create_options: super::options::CREATE_OPTIONS,
    amend_only_options: &[],
    amendable: false,
    caps: Capabilities::NONE.with_clusters().with_probe_misses(),
};

#[cfg(test)]
mod tests {
    use crate::format::foreign::padded;
    use crate::format::Format;

    #[test]
    fn cookie_at_start() {
        assert_eq!(Format::probe(&padded(b"conectix\0\0\0\x02")).name(), "vpc");
        let mut h = padded(b"");
        h[512..520].copy_from_slice(b"conectix");
        assert_eq!(Format::probe(&h).name(), "raw");
    }
}
