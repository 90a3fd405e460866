//! Bochs growing redolog images (QEMU's `bochs_probe`): in a 512-byte header, the
//! NUL-terminated strings "Bochs Virtual HD Image" (32-byte field), "Redolog" (16) and
//! "Growing" (16), then the little-endian version 0x00020000 or 0x00010000 (v1).

use super::{le32_at, recognised, score};
use crate::format::registry::{Capabilities, FormatDesc, ProbeInput};

/// Size of the Bochs header.
const HEADER_LEN: usize = 512;

/// Whether the `len`-byte field at `offset` holds `s` followed by a NUL.
fn c_string_field(head: &[u8], offset: usize, len: usize, s: &[u8]) -> bool {
    head.get(offset..offset + len)
        .is_some_and(|f| f.len() > s.len() && f.starts_with(s) && f[s.len()] == 0)
}

fn probe(p: &ProbeInput<'_>) -> u32 {
    let h = p.head;
    score(
        h.len() >= HEADER_LEN
            && c_string_field(h, 0, 32, b"Bochs Virtual HD Image")
            && c_string_field(h, 32, 16, b"Redolog")
            && c_string_field(h, 48, 16, b"Growing")
            && matches!(le32_at(h, 64), Some(0x0002_0000 | 0x0001_0000)),
        100,
    )
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = recognised("bochs", probe, Capabilities::NONE.with_clusters());

#[cfg(test)]
mod tests {
    use super::super::padded;
    use super::HEADER_LEN;
    use crate::format::Format;

    fn sample_header(version: u32) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[..22].copy_from_slice(b"Bochs Virtual HD Image");
        h[32..39].copy_from_slice(b"Redolog");
        h[48..55].copy_from_slice(b"Growing");
        h[64..68].copy_from_slice(&version.to_le_bytes());
        h
    }

    #[test]
    fn header_fields() {
        assert_eq!(
            Format::probe(&padded(&sample_header(0x20000))).name(),
            "bochs"
        );
        assert_eq!(
            Format::probe(&padded(&sample_header(0x10000))).name(),
            "bochs"
        );
        assert_eq!(
            Format::probe(&padded(&sample_header(0x30000))).name(),
            "raw"
        );
        let mut h = sample_header(0x20000);
        h[55] = b'X';
        assert_eq!(Format::probe(&padded(&h)).name(), "raw");
    }
}
