//! The VMDK text descriptor: parsed the way QEMU reads it (the first `CID`,
//! `parentCID`, `createType="…"`, `parentFileNameHint="…"` found anywhere, extent lines
//! `RW <sectors> <TYPE> "<file>" [<offset>]`), and rendered as qemu-img writes it.

use crate::error::{Corruption, Problem, Result, Structure, VmdkProblem};

/// Most extents a descriptor may name (bounds files opened and memory).
pub const MAX_EXTENTS: usize = 1024;
/// Longest descriptor read (QEMU reads at most 1 MiB - 1).
pub const MAX_DESC: usize = (1 << 20) - 1;

/// One extent line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// Size in sectors.
    pub sectors: u64,
    /// `FLAT`, `SPARSE`, `VMFS`, `VMFSSPARSE`, `SESPARSE`.
    pub kind: String,
    /// File name as written.
    pub file: String,
    /// Start sector in the file (flat extents).
    pub offset: u64,
}

/// What vdisk reads from a descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// `createType`, when present.
    pub create_type: Option<String>,
    /// `CID`.
    pub cid: Option<u32>,
    /// `parentCID`.
    pub parent_cid: Option<u32>,
    /// `parentFileNameHint`.
    pub parent_hint: Option<String>,
    /// The extents, in order.
    pub extents: Vec<ExtentLine>,
}

fn bad(p: VmdkProblem) -> crate::Error {
    Corruption::new(Structure::VmdkDescriptor, Problem::Vmdk(p)).into()
}

/// The value of `name="…"` at its first occurrence (QEMU skips the name and two bytes).
fn quoted(text: &str, name: &str) -> Option<std::result::Result<String, ()>> {
    let at = text.find(name)?;
    let rest = text.get(at + name.len() + 2..).unwrap_or("");
    Some(match rest.find('"') {
        Some(e) if at + name.len() + 2 < text.len() => Ok(rest[..e].to_string()),
        _ => Err(()),
    })
}

/// The hex number after `name=` at the first occurrence of `name` (`sscanf("%x")`).
fn hex_after(text: &str, name: &str) -> Option<u32> {
    let at = text.find(name)?;
    let rest = text.get(at + name.len() + 1..)?.trim_start();
    let rest = rest
        .strip_prefix("0x")
        .or_else(|| rest.strip_prefix("0X"))
        .unwrap_or(rest);
    let end = rest
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(rest.len());
    let digits = &rest[..end.min(16)];
    // sscanf("%x") keeps the low 32 bits of a longer number; no digits: no value.
    u64::from_str_radix(digits, 16).ok().map(|v| v as u32)
}

/// A signed decimal at the start of `s` (after blanks), and the rest.
fn int(s: &str) -> Option<(i64, &str)> {
    let s = s.trim_start();
    let end = s
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && (c == '-' || c == '+'))))
        .map_or(s.len(), |(i, _)| i);
    s[..end].parse().ok().map(|v| (v, &s[end..]))
}

/// A whitespace-delimited word of at most 10 bytes, and the rest.
fn word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    (end > 0).then(|| {
        // At most 10 bytes, as `%10s`, cut on a character boundary (hostile text).
        let mut e = end.min(10);
        while !s.is_char_boundary(e) {
            e -= 1;
        }
        (&s[..e], &s[e..])
    })
}

/// Parses one line as QEMU's `sscanf`: the values matched (at least 4 for an extent).
fn scan_line(line: &str) -> (usize, &str, i64, &str, Option<&str>, Option<i64>) {
    let mut m = 0;
    let (mut acc, mut secs, mut kind, mut name, mut off) = ("", 0, "", None, None);
    (|| {
        let (a, r) = word(line)?;
        acc = a;
        m = 1;
        let (n, r) = int(r)?;
        secs = n;
        m = 2;
        let (k, r) = word(r)?;
        kind = k;
        m = 3;
        let r = r.trim_start().strip_prefix('"')?;
        let end = r.find(['\n', '\r', '"'])?;
        if end == 0 || !r[end..].starts_with('"') {
            return None;
        }
        name = Some(&r[..end]);
        m = 4;
        let (o, _) = int(&r[end + 1..])?;
        off = Some(o);
        m = 5;
        Some(())
    })();
    (m, acc, secs, kind, name, off)
}

impl Descriptor {
    /// Parses a descriptor (text up to the first NUL).
    pub fn parse(raw: &[u8]) -> Result<Descriptor> {
        let raw = &raw[..raw.len().min(MAX_DESC)];
        let raw = raw.split(|&b| b == 0).next().unwrap_or(&[]);
        let text = String::from_utf8_lossy(raw);
        let create_type = match quoted(&text, "createType") {
            Some(Ok(t)) => Some(t),
            _ => None,
        };
        let parent_hint = match quoted(&text, "parentFileNameHint") {
            Some(Ok(t)) if t.len() < 4096 => Some(t),
            Some(_) => return Err(bad(VmdkProblem::ParentHint)),
            None => None,
        };
        let mut extents = Vec::new();
        for line in text.split_inclusive('\n') {
            let (m, acc, secs, kind, name, off) = scan_line(line);
            if m < 4 || acc != "RW" {
                continue;
            }
            let invalid = || bad(VmdkProblem::ExtentLine(line.trim_end_matches('\n').into()));
            let offset = match kind {
                "FLAT" => match off {
                    Some(o) if o >= 0 && m == 5 => o as u64,
                    _ => return Err(invalid()),
                },
                "VMFS" if m == 4 => 0,
                "VMFS" => return Err(invalid()),
                _ if m != 4 => return Err(invalid()),
                _ => 0,
            };
            if secs <= 0 || !["FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"].contains(&kind) {
                continue;
            }
            if extents.len() >= MAX_EXTENTS {
                return Err(bad(VmdkProblem::TooManyExtents {
                    max: MAX_EXTENTS as u64,
                }));
            }
            extents.push(ExtentLine {
                sectors: secs as u64,
                kind: kind.to_string(),
                file: name.unwrap_or_default().to_string(),
                offset,
            });
        }
        Ok(Descriptor {
            create_type,
            cid: hex_after(&text, "CID"),
            parent_cid: hex_after(&text, "parentCID"),
            parent_hint,
            extents,
        })
    }
}

/// What qemu-img writes into a new descriptor.
#[derive(Clone, Debug)]
pub struct NewDescriptor<'a> {
    /// Content ID.
    pub cid: u32,
    /// Parent's content ID (`ffffffff` without one).
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: &'a str,
    /// `parentFileNameHint`, if any.
    pub parent_hint: Option<&'a str>,
    /// Extent lines, already formatted.
    pub extent_lines: String,
    /// `ddb.virtualHWVersion`.
    pub hw_version: &'a str,
    /// Disk size in bytes (for the geometry).
    pub size: u64,
    /// Adapter type name.
    pub adapter_type: &'a str,
    /// `ddb.toolsVersion`.
    pub tools_version: &'a str,
}

impl NewDescriptor<'_> {
    /// The text, as qemu-img 10 formats it.
    pub fn render(&self) -> String {
        let heads: u64 = if self.adapter_type == "ide" { 16 } else { 255 };
        let parent = self
            .parent_hint
            .map(|p| format!("parentFileNameHint=\"{p}\""))
            .unwrap_or_default();
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={:x}\ncreateType=\"{}\"\n{}\n# Extent description\n{}\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{}\"\nddb.geometry.heads = \"{}\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
            self.cid,
            self.parent_cid,
            self.create_type,
            parent,
            self.extent_lines,
            self.hw_version,
            self.size / (63 * heads * 512),
            heads,
            self.adapter_type,
            self.tools_version
        )
    }
}

/// Rewrites the `CID=` value of a descriptor as QEMU's `vmdk_write_cid` does: the text
/// after `CID=` up to `parentCID` is replaced by the new value and a newline.
pub fn with_cid(raw: &[u8], cid: u32) -> Option<Vec<u8>> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let text = &raw[..end];
    let find = |pat: &[u8]| text.windows(pat.len()).position(|w| w == pat);
    let parent = find(b"parentCID")?;
    let at = find(b"CID")? + 4;
    if at > parent {
        return None;
    }
    let mut out = text[..at].to_vec();
    out.extend_from_slice(format!("{cid:x}\n").as_bytes());
    out.extend_from_slice(&text[parent..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=346b60d5\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 20480 FLAT \"monolithicFlat-flat.vmdk\" 0\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"20\"\nddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\nddb.toolsVersion = \"2147483647\"\n";

    #[test]
    fn parses_qemus_descriptor() {
        let d = Descriptor::parse(FLAT.as_bytes()).unwrap();
        assert_eq!(d.create_type.as_deref(), Some("monolithicFlat"));
        assert_eq!(d.cid, Some(0x346b60d5));
        assert_eq!(d.parent_cid, Some(0xffffffff));
        assert_eq!(d.parent_hint, None);
        assert_eq!(
            d.extents,
            vec![ExtentLine {
                sectors: 20480,
                kind: "FLAT".into(),
                file: "monolithicFlat-flat.vmdk".into(),
                offset: 0
            }]
        );
    }

    #[test]
    fn renders_as_qemu() {
        let n = NewDescriptor {
            cid: 0x346b60d5,
            parent_cid: 0xffffffff,
            create_type: "monolithicFlat",
            parent_hint: None,
            extent_lines: "RW 20480 FLAT \"monolithicFlat-flat.vmdk\" 0\n".into(),
            hw_version: "4",
            size: 10 << 20,
            adapter_type: "ide",
            tools_version: "2147483647",
        };
        assert_eq!(n.render(), FLAT);
    }

    #[test]
    fn extent_lines_as_sscanf() {
        let d = Descriptor::parse(
            b"createType=\"twoGbMaxExtentSparse\"\nparentFileNameHint=\"base.vmdk\"\nRW 10 SPARSE \"a b.vmdk\"\nRDONLY 5 SPARSE \"x\"\nRW 0 SPARSE \"y\"\nRW 4 VMFS \"v\"\nRW 3 ZERO\n",
        )
        .unwrap();
        assert_eq!(d.parent_hint.as_deref(), Some("base.vmdk"));
        assert_eq!(d.extents.len(), 2);
        assert_eq!(d.extents[0].file, "a b.vmdk");
        assert_eq!(d.extents[1].kind, "VMFS");
        let e = Descriptor::parse(b"RW 10 FLAT \"f\"\n").unwrap_err();
        assert_eq!(e.to_string(), "Invalid extent line: RW 10 FLAT \"f\"");
        assert!(Descriptor::parse(b"RW 10 SPARSE \"f\" 5\n").is_err());
        assert!(Descriptor::parse(b"parentFileNameHint=\"oops").is_err());
        // Multi-byte characters across the 10-byte word limit.
        let d = Descriptor::parse(
            "RW 10 SPARS\u{e9}\u{e9}\u{e9} \"f\"\nddb.geom\u{fffd}try.heads = \"16\"\n".as_bytes(),
        )
        .unwrap();
        assert!(d.extents.is_empty());
    }

    #[test]
    fn cid_rewrite() {
        let out = with_cid(FLAT.as_bytes(), 0xabc).unwrap();
        let d = Descriptor::parse(&out).unwrap();
        assert_eq!(d.cid, Some(0xabc));
        assert_eq!(d.parent_cid, Some(0xffffffff));
        assert_eq!(out.len(), FLAT.len() - 5);
    }
}
