//! Apple disk images. QEMU's `dmg_probe` goes by the name only: a file whose name ends
//! in `.dmg` scores 2 (just above raw); the `koly` trailer is looked for when the image
//! is opened. So does this probe.

use super::recognised;
use crate::format::registry::{Capabilities, FormatDesc, ProbeInput};

fn probe(p: &ProbeInput<'_>) -> u32 {
    match p.filename {
        Some(n) if n.len() > 4 && n.ends_with(".dmg") => 2,
        _ => 0,
    }
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = recognised("dmg", probe, Capabilities::NONE.with_compression());

#[cfg(test)]
mod tests {
    use super::super::padded;
    use crate::format::Format;

    #[test]
    fn by_name() {
        let h = padded(b"");
        assert_eq!(Format::probe_named(&h, Some("a/x.dmg")).name(), "dmg");
        assert_eq!(Format::probe_named(&h, Some(".dmg")).name(), "raw");
        assert_eq!(Format::probe_named(&h, Some("x.img")).name(), "raw");
        // A real header wins over the name.
        let q = padded(b"QFI\xfb\0\0\0\x03");
        assert_eq!(Format::probe_named(&q, Some("x.dmg")).name(), "qcow2");
    }
}
