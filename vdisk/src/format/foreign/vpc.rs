//! Virtual PC / VHD: the footer cookie `conectix` at offset 0 (QEMU's `vpc_probe`).
//!
//! Dynamic and differencing VHDs start with a copy of the footer. A *fixed* VHD has the
//! footer only in its last 512 bytes; QEMU's probe does not look there (it opens such a
//! file as raw unless `-f vpc` is given), so neither does this one.

use super::{has_at, recognised, score};
use crate::format::registry::{Capabilities, FormatDesc, ProbeInput};

fn probe(p: &ProbeInput<'_>) -> u32 {
    score(has_at(p.head, 0, b"conectix"), 100)
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = recognised("vpc", probe, Capabilities::NONE.with_clusters());

#[cfg(test)]
mod tests {
    use super::super::padded;
    use crate::format::Format;

    #[test]
    fn cookie_at_start() {
        assert_eq!(Format::probe(&padded(b"conectix\0\0\0\x02")).name(), "vpc");
        let mut h = padded(b"");
        h[512..520].copy_from_slice(b"conectix");
        assert_eq!(Format::probe(&h).name(), "raw");
    }
}
