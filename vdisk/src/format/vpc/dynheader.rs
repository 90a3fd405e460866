//! The VHD dynamic disk header (1024 bytes, big-endian), decoded, validated and encoded
//! in one place.
//!
//! Layout: cookie `cxsparse` (0), data offset (8, unused: all ones), table offset (16,
//! the BAT), header version (24), max table entries (28), block size (32), checksum
//! (36), parent unique id (40), parent time stamp (56), reserved (60), parent unicode
//! name (64, 512 bytes), eight parent locators (576, 24 bytes each), reserved (768).

use super::footer::checksum;
use crate::error::{Corruption, Field, Problem, Result, Structure};

/// Bytes of the dynamic disk header.
pub const HEADER_LEN: usize = 1024;
/// The header cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Block size qemu-img creates (2 MiB).
pub const DEFAULT_BLOCK_SIZE: u32 = 0x20_0000;

/// The fields of the dynamic disk header the driver uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    /// Offset of the BAT.
    pub table_offset: u64,
    /// Entries of the BAT.
    pub max_table_entries: u32,
    /// Bytes of guest data per block (a power of two, at least 512).
    pub block_size: u32,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl DynHeader {
    /// Decodes the header: cookie and block size are checked here (QEMU does not verify
    /// this header's checksum, so neither does this).
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<DynHeader> {
        if &buf[..8] != COOKIE {
            return Err(Corruption::new(Structure::VpcDynamicHeader, Problem::BadMagic).into());
        }
        let mut t = [0u8; 8];
        t.copy_from_slice(&buf[16..24]);
        let h = DynHeader {
            table_offset: u64::from_be_bytes(t),
            max_table_entries: be32(buf, 28),
            block_size: be32(buf, 32),
        };
        if !h.block_size.is_power_of_two() || h.block_size < 512 {
            return Err(Corruption::new(
                Structure::VpcDynamicHeader,
                Problem::Invalid {
                    field: Field::BlockSize,
                    value: h.block_size as u64,
                },
            )
            .into());
        }
        Ok(h)
    }

    /// Encodes a new header as qemu-img writes it (everything else zero, data offset all
    /// ones, version 1.0, checksum set).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        let c = checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// Bytes of the sector bitmap in front of each block (one bit per sector, rounded
    /// up to whole sectors).
    pub fn bitmap_size(&self) -> u64 {
        (self.block_size as u64 / (8 * 512)).div_ceil(512) * 512
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = DynHeader {
            table_offset: 1536,
            max_table_entries: 50,
            block_size: DEFAULT_BLOCK_SIZE,
        };
        let b = h.encode();
        assert_eq!(&b[8..16], &[0xff; 8]);
        assert_eq!(checksum(&b, 36), be32(&b, 36));
        assert_eq!(DynHeader::decode(&b).unwrap(), h);
        assert_eq!(h.bitmap_size(), 512);
        let small = DynHeader {
            block_size: 512,
            ..h.clone()
        };
        // QEMU's rounding: blocks under 4 KiB have no bitmap sector at all.
        assert_eq!(small.bitmap_size(), 0);
        let four_k = DynHeader {
            block_size: 4096,
            ..h.clone()
        };
        assert_eq!(four_k.bitmap_size(), 512);
    }

    #[test]
    fn bad_fields() {
        let h = DynHeader {
            table_offset: 1536,
            max_table_entries: 50,
            block_size: 3 << 20,
        };
        let b = h.encode();
        assert_eq!(
            DynHeader::decode(&b).unwrap_err().to_string(),
            "Invalid block size 3145728"
        );
        let mut b = b;
        b[0] = 0;
        assert_eq!(
            DynHeader::decode(&b).unwrap_err().to_string(),
            "Invalid header magic"
        );
    }
}
