//! LUKS (version 1) probing: `LUKS\xba\xbe` then the big-endian version 1
//! (QEMU's `block_crypto_probe_luks`, via `qcrypto_block_luks_has_format`).

use crate::format::foreign::{has_at, score};
use crate::format::registry::ProbeInput;

/// The LUKS magic.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";

/// Scores a file: 100 for a LUKS1 header.
pub fn probe(p: &ProbeInput<'_>) -> u32 {
    score(
        has_at(p.head, 0, MAGIC) && p.head.get(6..8) == Some(&[0, 1][..]),
        100,
    )
}

#[cfg(test)]
mod tests {
    use crate::format::foreign::padded;
    use crate::format::Format;

    #[test]
    fn version_one() {
        assert_eq!(Format::probe(&padded(b"LUKS\xba\xbe\0\x01")).name(), "luks");
        // LUKS2 is not something QEMU's luks driver claims.
        assert_eq!(Format::probe(&padded(b"LUKS\xba\xbe\0\x02")).name(), "raw");
    }
}
