//! Compressed loop images: the V2.0 shell-script header (QEMU's `cloop_probe`, score 2).

use super::{has_at, recognised, score};
use crate::format::registry::{Capabilities, FormatDesc, ProbeInput};

/// The header a cloop V2.0 image starts with.
pub const MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

fn probe(p: &ProbeInput<'_>) -> u32 {
    // QEMU compares min(header, buffer) bytes, but its buffer is always the padded
    // probe size; comparing the whole header keeps an empty head from matching.
    score(has_at(p.head, 0, MAGIC), 2)
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = recognised(
    "cloop",
    probe,
    Capabilities::NONE.with_clusters().with_compression(),
);

#[cfg(test)]
mod tests {
    use super::super::padded;
    use super::MAGIC;
    use crate::format::Format;

    #[test]
    fn script_header() {
        assert_eq!(Format::probe(&padded(MAGIC)).name(), "cloop");
        assert_eq!(Format::probe(&padded(&MAGIC[..20])).name(), "raw");
    }
}
