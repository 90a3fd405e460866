//! The VHDX metadata region (MS-VHDX 2.6): the 64 KiB table (`metadata`, entry count,
//! 32-byte entries: item GUID, offset in the region, length, flags) and the items
//! vdisk reads and qemu-img writes: file parameters (block size, leave-allocated and
//! has-parent bits), virtual disk size, page 83 data, logical and physical sector size.

use super::header::{guid, guid_at, le16, le32, le64, TABLE_LEN};
use crate::error::{Corruption, Problem, Result, Structure, VhdxProblem};

/// CAA16737-FA36-4D43-B3B6-33F0AA44E76B.
pub const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// 2FA54224-CD1B-4876-B211-5DBED83BF4B8.
pub const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// BECA12AB-B2E6-4523-93EF-C309E000C746.
pub const PAGE83: [u8; 16] = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// 8141BF1D-A96F-4709-BA47-F233A8FAAB5F.
pub const LOGICAL_SECTOR: [u8; 16] = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// CDA348C7-445D-4471-9CC9-E9885251C556.
pub const PHYSICAL_SECTOR: [u8; 16] = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// A8D35F2D-B30B-454D-ABF7-D3D84834AB0C.
pub const PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

/// Item flag: required.
pub const IS_REQUIRED: u32 = 1 << 2;
/// Item flag: virtual disk metadata.
pub const IS_VIRTUAL_DISK: u32 = 1 << 1;
/// File parameter: blocks stay allocated (fixed).
pub const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File parameter: differencing image.
pub const HAS_PARENT: u32 = 2;
/// Largest virtual disk (64 TiB).
pub const MAX_SIZE: u64 = 64 << 40;
/// Block size bounds.
pub const MIN_BLOCK: u64 = 1 << 20;
/// Largest block.
pub const MAX_BLOCK: u64 = 256 << 20;
/// Most metadata entries.
const MAX_ENTRIES: usize = 2047;

/// What the metadata says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Payload block size.
    pub block_size: u32,
    /// File parameter bits.
    pub file_flags: u32,
    /// Virtual disk size.
    pub size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector: u32,
}

fn bad(p: VhdxProblem) -> crate::Error {
    Corruption::new(Structure::VhdxMetadata, Problem::Vhdx(p)).into()
}

/// Parses the metadata region `region` (all of it, or at least the table and items).
pub fn parse(region: &[u8]) -> Result<Metadata> {
    if region.len() < TABLE_LEN || &region[..8] != b"metadata" {
        return Err(bad(VhdxProblem::Missing("metadata table")));
    }
    let n = le16(region, 10) as usize;
    if n > MAX_ENTRIES {
        return Err(bad(VhdxProblem::Field("metadata entry count", n as u64)));
    }
    let mut items: Vec<([u8; 16], &[u8])> = Vec::new();
    for i in 0..n {
        let e = 32 + i * 32;
        let id = guid_at(region, e);
        let off = le32(region, e + 16) as usize;
        let len = le32(region, e + 20) as usize;
        let flags = le32(region, e + 24);
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE83,
            LOGICAL_SECTOR,
            PHYSICAL_SECTOR,
            PARENT_LOCATOR,
        ]
        .contains(&id);
        if !known {
            if flags & IS_REQUIRED != 0 {
                return Err(bad(VhdxProblem::UnknownRequired));
            }
            continue;
        }
        if id == PARENT_LOCATOR {
            return Err(bad(VhdxProblem::Differencing));
        }
        if len == 0 {
            continue;
        }
        let data = off
            .checked_add(len)
            .filter(|&end| off >= TABLE_LEN && end <= region.len())
            .map(|end| &region[off..end])
            .ok_or_else(|| bad(VhdxProblem::Field("metadata item offset", off as u64)))?;
        items.push((id, data));
    }
    let get = |id: [u8; 16], name: &'static str, need: usize| -> Result<&[u8]> {
        items
            .iter()
            .find(|(g, _)| *g == id)
            .map(|(_, d)| *d)
            .filter(|d| d.len() >= need)
            .ok_or_else(|| bad(VhdxProblem::Missing(name)))
    };
    let fp = get(FILE_PARAMETERS, "file parameters", 8)?;
    let md = Metadata {
        block_size: le32(fp, 0),
        file_flags: le32(fp, 4),
        size: le64(get(VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0),
        logical_sector: le32(get(LOGICAL_SECTOR, "logical sector size", 4)?, 0),
        physical_sector: le32(get(PHYSICAL_SECTOR, "physical sector size", 4)?, 0),
    };
    get(PAGE83, "page 83 data", 16)?;
    if md.file_flags & HAS_PARENT != 0 {
        return Err(bad(VhdxProblem::Differencing));
    }
    let bs = md.block_size as u64;
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&bs) || !bs.is_power_of_two() {
        return Err(bad(VhdxProblem::Field("block size", bs)));
    }
    if md.logical_sector != 512 && md.logical_sector != 4096 {
        return Err(bad(VhdxProblem::Field(
            "logical sector size",
            md.logical_sector as u64,
        )));
    }
    if md.physical_sector != 512 && md.physical_sector != 4096 {
        return Err(bad(VhdxProblem::Field(
            "physical sector size",
            md.physical_sector as u64,
        )));
    }
    if md.size > MAX_SIZE || !md.size.is_multiple_of(md.logical_sector as u64) {
        return Err(bad(VhdxProblem::Field("virtual disk size", md.size)));
    }
    Ok(md)
}

/// The metadata table and items qemu-img writes: the 64 KiB table, then the items
/// packed from 64 KiB on.
pub fn to_bytes(md: &Metadata, page83: [u8; 16]) -> (Vec<u8>, Vec<u8>) {
    let mut t = vec![0u8; TABLE_LEN];
    t[..8].copy_from_slice(b"metadata");
    t[10..12].copy_from_slice(&5u16.to_le_bytes());
    let mut items = Vec::new();
    items.extend_from_slice(&md.block_size.to_le_bytes());
    items.extend_from_slice(&md.file_flags.to_le_bytes());
    items.extend_from_slice(&md.size.to_le_bytes());
    items.extend_from_slice(&page83);
    items.extend_from_slice(&md.logical_sector.to_le_bytes());
    items.extend_from_slice(&md.physical_sector.to_le_bytes());
    let list: [([u8; 16], u32, u32); 5] = [
        (FILE_PARAMETERS, 8, IS_REQUIRED),
        (VIRTUAL_DISK_SIZE, 8, IS_REQUIRED | IS_VIRTUAL_DISK),
        (PAGE83, 16, IS_REQUIRED | IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR, 4, IS_REQUIRED | IS_VIRTUAL_DISK),
        (PHYSICAL_SECTOR, 4, IS_REQUIRED | IS_VIRTUAL_DISK),
    ];
    let mut off = TABLE_LEN as u32;
    for (i, (id, len, flags)) in list.iter().enumerate() {
        let e = 32 + i * 32;
        t[e..e + 16].copy_from_slice(id);
        t[e + 16..e + 20].copy_from_slice(&off.to_le_bytes());
        t[e + 20..e + 24].copy_from_slice(&len.to_le_bytes());
        t[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        off += len;
    }
    (t, items)
}

/// Payload blocks per sector bitmap block: 2^23 sectors × sector size / block size.
pub fn chunk_ratio(md: &Metadata) -> u64 {
    ((1u64 << 23) * md.logical_sector as u64) / md.block_size as u64
}

/// Payload blocks of the disk.
pub fn data_blocks(md: &Metadata) -> u64 {
    md.size.div_ceil(md.block_size as u64)
}

/// BAT entries of a non-differencing image (payload entries with a sector bitmap
/// entry after every `chunk_ratio` of them, none after the last group).
pub fn bat_entries(md: &Metadata) -> u64 {
    let d = data_blocks(md);
    if d == 0 {
        return 0;
    }
    d + (d - 1) / chunk_ratio(md)
}

/// The BAT index of payload block `block`.
pub fn bat_index(md: &Metadata, block: u64) -> u64 {
    block + block / chunk_ratio(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md() -> Metadata {
        Metadata {
            block_size: 8 << 20,
            file_flags: 0,
            size: 10 << 20,
            logical_sector: 512,
            physical_sector: 512,
        }
    }

    #[test]
    fn round_trip() {
        let (t, items) = to_bytes(&md(), [7; 16]);
        let mut region = t;
        region.extend_from_slice(&items);
        region.resize(1 << 20, 0);
        assert_eq!(parse(&region).unwrap(), md());
        // A required item vdisk does not know.
        let mut r2 = region.clone();
        r2[32 + 5 * 32..32 + 5 * 32 + 16].copy_from_slice(&[1; 16]);
        r2[32 + 5 * 32 + 24] = 4;
        r2[10] = 6;
        assert!(parse(&r2).is_err());
        // A block size that is not a power of two.
        let mut r3 = region.clone();
        r3[TABLE_LEN..TABLE_LEN + 4].copy_from_slice(&(3u32 << 20).to_le_bytes());
        assert!(parse(&r3).unwrap_err().to_string().contains("block size"));
    }

    #[test]
    fn bat_geometry() {
        let m = md();
        assert_eq!(chunk_ratio(&m), 512);
        assert_eq!(data_blocks(&m), 2);
        assert_eq!(bat_entries(&m), 2);
        let big = Metadata {
            size: 8 << 30,
            block_size: 1 << 20,
            ..m
        };
        assert_eq!(chunk_ratio(&big), 4096);
        assert_eq!(bat_entries(&big), 8192 + 1);
        assert_eq!(bat_index(&big, 4096), 4097);
    }
}
