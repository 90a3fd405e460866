//! QEMU's original copy-on-write format (qcow version 1): `QFI\xfb` then version 1,
//! big-endian (QEMU's `qcow_probe`). Versions 2 and up belong to qcow2.

use super::{be32_at, has_at, recognised, score};
use crate::format::registry::{Capabilities, FormatDesc, ProbeInput};

/// The qcow (v1) header magic.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Size of the v1 header; QEMU wants at least this much to probe.
const HEADER_LEN: usize = 48;

fn probe(p: &ProbeInput<'_>) -> u32 {
    score(
        p.head.len() >= HEADER_LEN && has_at(p.head, 0, MAGIC) && be32_at(p.head, 4) == Some(1),
        100,
    )
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = recognised(
    "qcow",
    probe,
    Capabilities::NONE
        .with_clusters()
        .with_backing()
        .with_compression(),
);

#[cfg(test)]
mod tests {
    use super::super::padded;
    use crate::format::Format;

    #[test]
    fn version_one_only() {
        let mut h = padded(b"QFI\xfb\0\0\0\x01");
        assert_eq!(Format::probe(&h).name(), "qcow");
        h[7] = 2;
        assert_eq!(Format::probe(&h).name(), "qcow2");
        h[7] = 3;
        assert_eq!(Format::probe(&h).name(), "qcow2");
    }
}
