//! VMDK's registration: its probe (QEMU's `vmdk_probe`), open, create, options and
//! capabilities.
//!
//! The probe: a sparse extent starting with `KDMV` (VMDK4) or `COWD` (VMware 3 / ESX),
//! or a text descriptor whose first line that is neither a `#` comment nor blank is
//! `version=1`, `2` or `3` (LF or CRLF).

use crate::error::Result;
use crate::format::foreign::has_at;
use crate::format::registry::{Capabilities, FormatDesc, OpenArgs, ProbeInput};
use crate::format::Driver;
use std::sync::Arc;

fn descriptor_score(buf: &[u8]) -> u32 {
    let mut p = 0usize;
    while p < buf.len() {
        match buf[p] {
            b'#' => {
                // A comment line.
                while p < buf.len() && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                // Only blank lines may come before `version=`.
                while p < buf.len() && buf[p] == b' ' {
                    p += 1;
                }
                if p < buf.len() && buf[p] == b'\r' {
                    p += 1;
                }
                if p >= buf.len() || buf[p] != b'\n' {
                    return 0;
                }
                p += 1;
            }
            _ => {
                let rest = &buf[p..];
                let ok = [b'1', b'2', b'3'].iter().any(|v| {
                    rest.strip_prefix(b"version=")
                        .and_then(|r| r.strip_prefix(&[*v][..]))
                        .is_some_and(|r| r.starts_with(b"\n") || r.starts_with(b"\r\n"))
                });
                return if ok { 100 } else { 0 };
            }
        }
    }
    0
}

fn probe(p: &ProbeInput<'_>) -> u32 {
    if p.head.len() < 4 {
        return 0;
    }
    if has_at(p.head, 0, b"KDMV") || has_at(p.head, 0, b"COWD") {
        return 100;
    }
    descriptor_score(p.head)
}

fn open(args: OpenArgs<'_, '_>) -> Result<Arc<dyn Driver>> {
    Ok(Arc::new(super::Vmdk::open(args)?))
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = FormatDesc {
    name: "vmdk",
    probe,
    open: Some(open),
    create: Some(super::create::create),
    create_options: super::options::CREATE_OPTIONS,
    amend_only_options: &[],
    amendable: false,
    caps: Capabilities::NONE
        .with_clusters()
        .with_backing()
        .with_compression(),
};

#[cfg(test)]
mod tests {
    use crate::format::foreign::padded;
    use crate::format::Format;

    fn name(h: &[u8]) -> &'static str {
        Format::probe(&padded(h)).name()
    }

    #[test]
    fn sparse_magics() {
        assert_eq!(name(b"KDMV\x01\0\0\0"), "vmdk");
        assert_eq!(name(b"COWD\x01\0\0\0"), "vmdk");
    }

    #[test]
    fn text_descriptors() {
        assert_eq!(
            name(b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n"),
            "vmdk"
        );
        assert_eq!(name(b"# c\r\n  \r\nversion=3\r\n"), "vmdk");
        assert_eq!(name(b"version=2\n"), "vmdk");
        // Text before the version line, or another version, is not a descriptor.
        assert_eq!(name(b"# c\nCID=1\nversion=1\n"), "raw");
        assert_eq!(name(b"version=4\n"), "raw");
        assert_eq!(name(b"  x\nversion=1\n"), "raw");
        assert_eq!(name(b"version=1"), "raw");
    }
}
