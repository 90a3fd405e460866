//! vdi's registration: its probe (QEMU's `vdi_probe`: the signature 0xbeda107f,
//! little-endian, at offset 0x40, after the 64-byte text field, which is not checked, in
//! a head of at least 512 bytes), open, create, options and capabilities.

use crate::error::Result;
use crate::format::foreign::{le32_at, score};
use crate::format::registry::{Capabilities, FormatDesc, OpenArgs, ProbeInput};
use crate::format::Driver;
use std::sync::Arc;

fn probe(p: &ProbeInput<'_>) -> u32 {
    score(
        p.head.len() >= super::header::HEADER_LEN
            && le32_at(p.head, 0x40) == Some(super::header::SIGNATURE),
        100,
    )
}

fn open(args: OpenArgs<'_, '_>) -> Result<Arc<dyn Driver>> {
    Ok(Arc::new(super::Vdi::open(args.meta, args.opts)?))
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = FormatDesc {
    name: "vdi",
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
    use super::super::header::SIGNATURE;
    use crate::format::foreign::padded;
    use crate::format::Format;

    #[test]
    fn signature_at_0x40() {
        let mut h = padded(b"<<< QEMU VM Virtual Disk Image >>>\n");
        assert_eq!(Format::probe(&h).name(), "raw");
        h[0x40..0x44].copy_from_slice(&SIGNATURE.to_le_bytes());
        assert_eq!(Format::probe(&h).name(), "vdi");
        // Too short a head is not probed.
        assert_eq!(Format::probe(&h[..511]).name(), "raw");
    }
}
