//! Hyper-V VHDX: the file identifier `vhdxfile` at offset 0 (QEMU's `vhdx_probe`).

use super::{has_at, recognised, score};
use crate::format::registry::{Capabilities, FormatDesc, ProbeInput};

fn probe(p: &ProbeInput<'_>) -> u32 {
    score(has_at(p.head, 0, b"vhdxfile"), 100)
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = recognised("vhdx", probe, Capabilities::NONE.with_clusters());

#[cfg(test)]
mod tests {
    use super::super::padded;
    use crate::format::Format;

    #[test]
    fn identifier() {
        assert_eq!(Format::probe(&padded(b"vhdxfile")).name(), "vhdx");
        assert_eq!(Format::probe(&padded(b"vhdxfil")).name(), "raw");
    }
}
