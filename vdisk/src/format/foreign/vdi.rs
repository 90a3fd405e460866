//! VirtualBox VDI: the signature 0xbeda107f, little-endian, at offset 0x40, after the
//! 64-byte text field ("<<< Oracle VM VirtualBox Disk Image >>>" and the like, which
//! QEMU's `vdi_probe` does not check), in a header of at least 512 bytes.

use super::{le32_at, recognised, score};
use crate::format::registry::{Capabilities, FormatDesc, ProbeInput};

/// The VDI signature.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Size of the VDI header QEMU reads before probing.
const HEADER_LEN: usize = 512;

fn probe(p: &ProbeInput<'_>) -> u32 {
    score(
        p.head.len() >= HEADER_LEN && le32_at(p.head, 0x40) == Some(SIGNATURE),
        100,
    )
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = recognised("vdi", probe, Capabilities::NONE.with_clusters());

#[cfg(test)]
mod tests {
    use super::super::padded;
    use super::SIGNATURE;
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
