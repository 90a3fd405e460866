//! The VDI header (512 bytes, little-endian), decoded, validated and encoded in one
//! place.
//!
//! Layout (VirtualBox's VDI 1.1 header, as QEMU reads it): text (0, 64 bytes, not
//! checked), signature 0xbeda107f (64), version 0x00010001 (68), header size (72), image
//! type (76: 1 dynamic, 2 static), image flags (80), description (84, 256 bytes), block
//! map offset (340), data offset (344), geometry cylinders/heads/sectors (348/352/356),
//! sector size (360), unused (364), disk size (368, u64), block size (376), block extra
//! (380), blocks in image (384), blocks allocated (388), image / last snapshot / link /
//! parent UUIDs (392/408/424/440), unused (456..512).
//!
//! Validation is QEMU's `vdi_open`, in its order and with its wording, plus a bound on
//! the block map this driver keeps in memory.

use crate::error::{Corruption, Field, Problem, Result, Structure};

/// Bytes of the header.
pub const HEADER_LEN: usize = 512;
/// The signature.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// The only version QEMU reads.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Image type: dynamic (blocks allocated on first write).
pub const TYPE_DYNAMIC: u32 = 1;
/// Image type: static (every block allocated at creation).
pub const TYPE_STATIC: u32 = 2;
/// The only block size QEMU reads or creates (1 MiB).
pub const BLOCK_SIZE: u32 = 1 << 20;
/// The text qemu-img writes.
pub const TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// Most blocks QEMU accepts (the block map fits in an `int`).
pub const QEMU_MAX_BLOCKS: u64 = (0x8000_0000 - 512) / 4;
/// Largest disk QEMU accepts.
pub const MAX_DISK_SIZE: u64 = QEMU_MAX_BLOCKS * BLOCK_SIZE as u64;
/// Most blocks this driver keeps in memory (64 MiB of block map: 16 TiB of disk).
pub const MAX_BLOCKS: u64 = 16 << 20;

/// The decoded header; `raw` keeps the bytes this driver does not interpret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Image type ([`TYPE_DYNAMIC`], [`TYPE_STATIC`]).
    pub image_type: u32,
    /// Block map offset.
    pub offset_bmap: u32,
    /// Data offset.
    pub offset_data: u32,
    /// Disk size in bytes, as stored.
    pub disk_size: u64,
    /// Block size.
    pub block_size: u32,
    /// Entries of the block map.
    pub blocks_in_image: u32,
    /// Blocks allocated.
    pub blocks_allocated: u32,
    /// The 512 bytes as read (or as last encoded).
    pub raw: [u8; HEADER_LEN],
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn bad(problem: Problem) -> crate::error::Error {
    Corruption::new(Structure::VdiHeader, problem).into()
}

fn invalid(field: Field, value: u64) -> crate::error::Error {
    bad(Problem::Invalid { field, value })
}

impl Header {
    /// Decodes and validates a header.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header> {
        let h = Header {
            image_type: le32(b, 76),
            offset_bmap: le32(b, 340),
            offset_data: le32(b, 344),
            disk_size: le64(b, 368),
            block_size: le32(b, 376),
            blocks_in_image: le32(b, 384),
            blocks_allocated: le32(b, 388),
            raw: *b,
        };
        if h.disk_size > MAX_DISK_SIZE {
            return Err(bad(Problem::TooLarge {
                field: Field::ImageSize,
                value: h.disk_size,
                max: MAX_DISK_SIZE,
            }));
        }
        let signature = le32(b, 64);
        let version = le32(b, 68);
        let sector_size = le32(b, 360);
        if signature != SIGNATURE {
            return Err(invalid(Field::Signature, signature as u64));
        }
        if version != VERSION_1_1 {
            return Err(invalid(Field::Version, version as u64));
        }
        if !h.offset_bmap.is_multiple_of(512) {
            return Err(invalid(Field::MapOffset, h.offset_bmap as u64));
        }
        if !h.offset_data.is_multiple_of(512) {
            return Err(invalid(Field::DataOffset, h.offset_data as u64));
        }
        if sector_size != 512 {
            return Err(invalid(Field::SectorSize, sector_size as u64));
        }
        if h.block_size != BLOCK_SIZE {
            return Err(invalid(Field::BlockSize, h.block_size as u64));
        }
        let room = h.blocks_in_image as u64 * h.block_size as u64;
        if h.size() > room {
            return Err(bad(Problem::TooSmall {
                field: Field::Entries,
                value: room,
                min: h.size(),
            }));
        }
        if b[424..440].iter().any(|&x| x != 0) {
            return Err(invalid(Field::LinkUuid, 0));
        }
        if b[440..456].iter().any(|&x| x != 0) {
            return Err(invalid(Field::ParentUuid, 0));
        }
        if h.blocks_in_image as u64 > QEMU_MAX_BLOCKS {
            return Err(bad(Problem::TooLarge {
                field: Field::Entries,
                value: h.blocks_in_image as u64,
                max: QEMU_MAX_BLOCKS,
            }));
        }
        if h.blocks_in_image as u64 > MAX_BLOCKS {
            return Err(bad(Problem::TooLarge {
                field: Field::Entries,
                value: h.blocks_in_image as u64,
                max: MAX_BLOCKS,
            }));
        }
        Ok(h)
    }

    /// The guest size: the disk size rounded up to whole sectors (VirtualBox can write
    /// odd sizes; QEMU rounds them up).
    pub fn size(&self) -> u64 {
        self.disk_size.div_ceil(512) * 512
    }

    /// Encodes the header (bytes not interpreted here from `raw`).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = self.raw;
        b[76..80].copy_from_slice(&self.image_type.to_le_bytes());
        b[340..344].copy_from_slice(&self.offset_bmap.to_le_bytes());
        b[344..348].copy_from_slice(&self.offset_data.to_le_bytes());
        b[368..376].copy_from_slice(&self.disk_size.to_le_bytes());
        b[376..380].copy_from_slice(&self.block_size.to_le_bytes());
        b[384..388].copy_from_slice(&self.blocks_in_image.to_le_bytes());
        b[388..392].copy_from_slice(&self.blocks_allocated.to_le_bytes());
        b
    }

    /// A new header as qemu-img writes it for `size` bytes (a multiple of 512).
    pub fn new(size: u64, image_type: u32, uuid_image: [u8; 16], uuid_snap: [u8; 16]) -> Header {
        let blocks = size.div_ceil(BLOCK_SIZE as u64) as u32;
        let bmap_bytes = (blocks as u64 * 4).div_ceil(512) * 512;
        let mut raw = [0u8; HEADER_LEN];
        raw[..TEXT.len()].copy_from_slice(TEXT);
        raw[64..68].copy_from_slice(&SIGNATURE.to_le_bytes());
        raw[68..72].copy_from_slice(&VERSION_1_1.to_le_bytes());
        raw[72..76].copy_from_slice(&0x180u32.to_le_bytes());
        raw[360..364].copy_from_slice(&512u32.to_le_bytes());
        raw[392..408].copy_from_slice(&uuid_image);
        raw[408..424].copy_from_slice(&uuid_snap);
        let h = Header {
            image_type,
            offset_bmap: 0x200,
            offset_data: (0x200 + bmap_bytes) as u32,
            disk_size: size,
            block_size: BLOCK_SIZE,
            blocks_in_image: blocks,
            blocks_allocated: if image_type == TYPE_STATIC { blocks } else { 0 },
            raw,
        };
        Header {
            raw: h.encode(),
            ..h
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = Header::new(100 << 20, TYPE_DYNAMIC, [1; 16], [2; 16]);
        assert_eq!(h.offset_data, 1024);
        assert_eq!(h.blocks_in_image, 100);
        let b = h.encode();
        assert_eq!(&b[..TEXT.len()], TEXT);
        assert_eq!(Header::decode(&b).unwrap(), h);
        let s = Header::new((3 << 20) + 512, TYPE_STATIC, [1; 16], [2; 16]);
        assert_eq!((s.blocks_in_image, s.blocks_allocated), (4, 4));
    }

    fn with(f: impl Fn(&mut [u8; HEADER_LEN])) -> String {
        let mut b = Header::new(4 << 20, TYPE_DYNAMIC, [1; 16], [2; 16]).encode();
        f(&mut b);
        Header::decode(&b).unwrap_err().to_string()
    }

    #[test]
    fn qemu_wording() {
        assert_eq!(
            with(|b| b[64] = 0),
            "Image not in VDI format (bad signature beda1000)"
        );
        assert_eq!(with(|b| b[68] = 2), "unsupported VDI image (version 1.2)");
        assert_eq!(
            with(|b| b[340] = 1),
            "unsupported VDI image (unaligned block map offset 0x201)"
        );
        assert_eq!(
            with(|b| b[376..380].copy_from_slice(&4096u32.to_le_bytes())),
            "unsupported VDI image (block size 4096 is not 1048576)"
        );
        assert_eq!(
            with(|b| b[384..388].copy_from_slice(&1u32.to_le_bytes())),
            "unsupported VDI image (disk size 4194304, image bitmap has room for 1048576)"
        );
        assert_eq!(
            with(|b| b[440] = 1),
            "unsupported VDI image (non-NULL parent UUID)"
        );
        assert_eq!(
            with(|b| b[368..376].copy_from_slice(&u64::MAX.to_le_bytes())),
            "Unsupported VDI image size (size is 0xffffffffffffffff, max supported is 0x1fffff8000000)"
        );
        let e = with(|b| {
            b[368..376].copy_from_slice(&(1u64 << 48).to_le_bytes());
            b[384..388].copy_from_slice(&(1u32 << 30).to_le_bytes());
        });
        assert_eq!(
            e,
            "unsupported VDI image (too many blocks 1073741824, max is 536870784)"
        );
    }
}
