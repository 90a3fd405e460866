//! VHDX on-disk structures of the header section, parsed and serialised in one place
//! (MS-VHDX 2.2): the file identifier (`vhdxfile` at 0), the two headers (4 KiB at
//! 64 KiB and 128 KiB: `head`, CRC-32C, sequence number, file/data write and log GUIDs,
//! log version 0, version 1, log length and offset) and the two region tables (64 KiB
//! at 192 KiB and 256 KiB: `regi`, CRC-32C, entry count, then 32-byte entries: GUID,
//! file offset, length, required flag). All integers little endian; GUIDs in their
//! on-disk (mixed-endian) byte order.

use crate::error::{Corruption, Problem, Result, Structure, VhdxProblem};

/// `vhdxfile`.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Offsets of the two headers.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes of a header.
pub const HEADER_LEN: usize = 4096;
/// Offsets of the two region tables.
pub const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes of a region table (and of the metadata table).
pub const TABLE_LEN: usize = 64 << 10;
/// End of the header section (where qemu puts the log).
pub const HEADER_SECTION_END: u64 = 1 << 20;
/// Most region table entries.
pub const MAX_REGION_ENTRIES: u32 = 2047;

/// A GUID from its canonical parts, in on-disk byte order.
pub const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// The BAT region: 2DC27766-F623-4200-9D64-115E9BFD4A08.
pub const BAT_GUID: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// The metadata region: 8B7CA206-4790-4B9A-B8FE-575F050F886E.
pub const METADATA_GUID: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn guid_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

/// CRC-32C of `b` with the 4 bytes at `at` taken as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &b[at + 4..])
}

/// Stores the checksum of `b` at `at`.
pub fn seal(b: &mut [u8], at: usize) {
    let c = checksum(b, at);
    b[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// Whether the checksum at `at` matches.
pub fn checksum_ok(b: &[u8], at: usize) -> bool {
    le32(b, at) == checksum(b, at)
}

/// A new random GUID (version 4).
pub fn random_guid() -> [u8; 16] {
    let mut g: [u8; 16] = rand::random();
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

/// A decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Sequence number: the valid header with the higher one is current.
    pub sequence: u64,
    /// Changed on every open for writing.
    pub file_write_guid: [u8; 16],
    /// Changed before the first guest-visible write.
    pub data_write_guid: [u8; 16],
    /// Non-zero: the log may hold entries to replay.
    pub log_guid: [u8; 16],
    /// Log format version (0).
    pub log_version: u16,
    /// Format version (1).
    pub version: u16,
    /// Bytes of the log.
    pub log_length: u32,
    /// File offset of the log.
    pub log_offset: u64,
}

impl Header {
    /// Decodes a header; `None` unless its signature, checksum and version are valid.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN || &b[..4] != b"head" || !checksum_ok(&b[..HEADER_LEN], 4) {
            return None;
        }
        let h = Header {
            sequence: le64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        (h.version == 1).then_some(h)
    }

    /// Encodes the header with its checksum (4 KiB).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        seal(&mut b, 4);
        b
    }
}

/// One region table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// What the region is.
    pub guid: [u8; 16],
    /// File offset (1 MiB aligned).
    pub offset: u64,
    /// Bytes (1 MiB multiple).
    pub length: u32,
    /// The image cannot be used without understanding it.
    pub required: bool,
}

fn bad(s: Structure, p: VhdxProblem) -> crate::Error {
    Corruption::new(s, Problem::Vhdx(p)).into()
}

/// Decodes a region table; `None` unless signature, checksum and count are valid.
pub fn parse_regions(b: &[u8]) -> Option<Vec<Region>> {
    if b.len() < TABLE_LEN || &b[..4] != b"regi" || !checksum_ok(&b[..TABLE_LEN], 4) {
        return None;
    }
    let n = le32(b, 8);
    if n > MAX_REGION_ENTRIES {
        return None;
    }
    Some(
        (0..n as usize)
            .map(|i| {
                let e = 16 + i * 32;
                Region {
                    guid: guid_at(b, e),
                    offset: le64(b, e + 16),
                    length: le32(b, e + 24),
                    required: le32(b, e + 28) & 1 != 0,
                }
            })
            .collect(),
    )
}

/// Encodes a region table with its checksum (64 KiB).
pub fn regions_to_bytes(regions: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; TABLE_LEN];
    b[..4].copy_from_slice(b"regi");
    b[8..12].copy_from_slice(&(regions.len() as u32).to_le_bytes());
    for (i, r) in regions.iter().enumerate() {
        let e = 16 + i * 32;
        b[e..e + 16].copy_from_slice(&r.guid);
        b[e + 16..e + 24].copy_from_slice(&r.offset.to_le_bytes());
        b[e + 24..e + 28].copy_from_slice(&r.length.to_le_bytes());
        b[e + 28..e + 32].copy_from_slice(&(r.required as u32).to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

/// The BAT and metadata regions of a region table, validated against the file: both
/// present, 1 MiB aligned, inside the file, past the header section, not overlapping;
/// no unknown required region.
pub fn find_regions(regions: &[Region], file_len: u64) -> Result<(Region, Region)> {
    let mut bat = None;
    let mut meta = None;
    for r in regions {
        if r.guid == BAT_GUID {
            bat = Some(r.clone());
        } else if r.guid == METADATA_GUID {
            meta = Some(r.clone());
        } else if r.required {
            return Err(bad(
                Structure::VhdxRegionTable,
                VhdxProblem::UnknownRequired,
            ));
        }
    }
    let bat = bat.ok_or_else(|| {
        bad(
            Structure::VhdxRegionTable,
            VhdxProblem::Missing("BAT region"),
        )
    })?;
    let meta = meta.ok_or_else(|| {
        bad(
            Structure::VhdxRegionTable,
            VhdxProblem::Missing("metadata region"),
        )
    })?;
    for (name, r) in [("BAT offset", &bat), ("metadata offset", &meta)] {
        let end = r.offset.checked_add(r.length as u64);
        if r.offset % (1 << 20) != 0
            || r.offset < HEADER_SECTION_END
            || end.is_none_or(|e| e > file_len)
        {
            return Err(bad(
                Structure::VhdxRegionTable,
                VhdxProblem::Field(name, r.offset),
            ));
        }
    }
    if bat.offset < meta.offset + meta.length as u64 && meta.offset < bat.offset + bat.length as u64
    {
        return Err(bad(
            Structure::VhdxRegionTable,
            VhdxProblem::Field("BAT offset", bat.offset),
        ));
    }
    Ok((bat, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_in_disk_order() {
        assert_eq!(
            BAT_GUID,
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        let g = random_guid();
        assert_eq!(g[7] >> 4, 4);
    }

    #[test]
    fn crc32c_known_value() {
        // CRC-32C of "123456789" is 0xE3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let mut b = b"ab\0\0\0\0cd".to_vec();
        seal(&mut b, 2);
        assert!(checksum_ok(&b, 2));
        b[7] ^= 1;
        assert!(!checksum_ok(&b, 2));
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            sequence: 7,
            file_write_guid: [1; 16],
            data_write_guid: [2; 16],
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        };
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b), Some(h));
        b[100] = 1;
        assert_eq!(Header::parse(&b), None);
    }

    #[test]
    fn region_table() {
        let rs = vec![
            Region {
                guid: BAT_GUID,
                offset: 2 << 20,
                length: 1 << 20,
                required: true,
            },
            Region {
                guid: METADATA_GUID,
                offset: 3 << 20,
                length: 1 << 20,
                required: true,
            },
        ];
        let b = regions_to_bytes(&rs);
        let back = parse_regions(&b).unwrap();
        assert_eq!(back, rs);
        assert!(find_regions(&back, 4 << 20).is_ok());
        assert!(find_regions(&back, (4 << 20) - 1).is_err());
        let mut odd = back.clone();
        odd.push(Region {
            guid: [9; 16],
            offset: 5 << 20,
            length: 1 << 20,
            required: true,
        });
        assert!(find_regions(&odd, 8 << 20)
            .unwrap_err()
            .to_string()
            .contains("unknown required"));
    }
}
