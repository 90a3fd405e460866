//! Parallels disks: `WithoutFreeSpace` or `WithouFreSpacExt` then version 2,
//! little-endian, in a 64-byte header (QEMU's `parallels_probe`).

use super::{has_at, le32_at, recognised, score};
use crate::format::registry::{Capabilities, FormatDesc, ProbeInput};

/// Size of the header QEMU wants before probing.
const HEADER_LEN: usize = 64;

fn probe(p: &ProbeInput<'_>) -> u32 {
    let magic = has_at(p.head, 0, b"WithoutFreeSpace") || has_at(p.head, 0, b"WithouFreSpacExt");
    score(
        p.head.len() >= HEADER_LEN && magic && le32_at(p.head, 16) == Some(2),
        100,
    )
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc =
    recognised("parallels", probe, Capabilities::NONE.with_clusters());

#[cfg(test)]
mod tests {
    use super::super::padded;
    use crate::format::Format;

    #[test]
    fn both_magics_version_two() {
        assert_eq!(
            Format::probe(&padded(b"WithoutFreeSpace\x02\0\0\0")).name(),
            "parallels"
        );
        assert_eq!(
            Format::probe(&padded(b"WithouFreSpacExt\x02\0\0\0")).name(),
            "parallels"
        );
        assert_eq!(
            Format::probe(&padded(b"WithoutFreeSpace\x03\0\0\0")).name(),
            "raw"
        );
    }
}
