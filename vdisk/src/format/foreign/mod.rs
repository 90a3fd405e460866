//! Formats vdisk recognises but cannot read yet: each module holds the format's probe,
//! with QEMU's scores, and its descriptor with no `open` and no `create`, so that opening
//! such an image fails naming the format instead of reading it as raw.
//!
//! The probes look only at what QEMU's probe functions (`block/*.c`) look at; they are
//! given the zero-padded first [`PROBE_BYTES`](super::registry::PROBE_BYTES) of a file.

pub mod bochs;
pub mod cloop;
pub mod dmg;
pub mod parallels;
pub mod qcow;

use super::registry::{Capabilities, FormatDesc, ProbeInput};

/// The descriptor of a recognised, unsupported format.
pub(crate) const fn recognised(
    name: &'static str,
    probe: fn(&ProbeInput<'_>) -> u32,
    caps: Capabilities,
) -> FormatDesc {
    FormatDesc {
        name,
        probe,
        open: None,
        create: None,
        create_options: &[],
        amend_only_options: &[],
        amendable: false,
        caps,
    }
}

/// A probe's score: `certainty` when the format is claimed, 0 otherwise.
pub(crate) fn score(claimed: bool, certainty: u32) -> u32 {
    if claimed {
        certainty
    } else {
        0
    }
}

/// Whether `head` holds `magic` at `offset`.
pub(crate) fn has_at(head: &[u8], offset: usize, magic: &[u8]) -> bool {
    head.get(offset..offset + magic.len()) == Some(magic)
}

/// The little-endian u32 at `offset`, if `head` is long enough.
pub(crate) fn le32_at(head: &[u8], offset: usize) -> Option<u32> {
    let b = head.get(offset..offset + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The big-endian u32 at `offset`, if `head` is long enough.
pub(crate) fn be32_at(head: &[u8], offset: usize) -> Option<u32> {
    let b = head.get(offset..offset + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The probe input of a test: `head` zero-padded to the probe size.
#[cfg(test)]
pub(crate) fn padded(head: &[u8]) -> Vec<u8> {
    let mut v = head.to_vec();
    v.resize(super::registry::PROBE_BYTES.max(head.len()), 0);
    v
}
