//! VMDK on-disk structures, parsed and serialised in one place: the VMDK4 sparse
//! extent header (`KDMV`), the VMware 3 `COWD` header, stream-optimized markers and
//! the compressed grain header.
//!
//! Layout (little endian) of the VMDK4 header, 512 bytes: magic `KDMV` (u32 at 0, read
//! big-endian as QEMU), version u32 @4, flags u32 @8, capacity u64 @12 (sectors),
//! grain size u64 @20 (sectors), descriptor offset u64 @28, descriptor size u64 @36,
//! grain table entries per table u32 @44, redundant grain directory u64 @48, grain
//! directory u64 @56 (`GD_AT_END`: in the footer), overhead (first grain) u64 @64,
//! unclean shutdown u8 @72, the four newline detection bytes `\n \r\n` @73, compression
//! algorithm u16 @77.

use crate::error::{Corruption, Problem, Result, Structure, VmdkProblem};

/// A 512-byte sector.
pub const SECTOR: u64 = 512;
/// `KDMV` as the big-endian u32 at offset 0.
pub const VMDK4_MAGIC: u32 = 0x4b44_4d56;
/// `COWD` as the big-endian u32 at offset 0.
pub const VMDK3_MAGIC: u32 = 0x434f_5744;
/// Newline detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// A redundant grain directory exists.
pub const FLAG_RGD: u32 = 1 << 1;
/// Grain table entry 1 means "zeroed grain".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Grains are compressed.
pub const FLAG_COMPRESS: u32 = 1 << 16;
/// Stream markers are present.
pub const FLAG_MARKER: u32 = 1 << 17;
/// Deflate (zlib stream) compression.
pub const COMPRESSION_DEFLATE: u16 = 1;
/// The grain directory offset of a stream whose directory is in the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// The grain table entry of a zeroed grain (with [`FLAG_ZERO_GRAIN`]).
pub const GTE_ZEROED: u32 = 1;
/// End-of-stream marker type.
pub const MARKER_EOS: u32 = 0;
/// Footer marker type.
pub const MARKER_FOOTER: u32 = 3;
/// Bytes of a compressed grain's header (lba u64, size u32).
pub const GRAIN_MARKER_LEN: usize = 12;

/// The decoded VMDK4 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version (1, 2 with zeroed grains, 3 with changed block tracking).
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub granularity: u64,
    /// Embedded descriptor (sectors).
    pub desc_offset: u64,
    /// Embedded descriptor size (sectors).
    pub desc_size: u64,
    /// Grain table entries per grain table.
    pub num_gtes_per_gt: u32,
    /// Redundant grain directory (sectors).
    pub rgd_offset: u64,
    /// Grain directory (sectors), or [`GD_AT_END`].
    pub gd_offset: u64,
    /// First grain (sectors).
    pub grain_offset: u64,
    /// Unclean shutdown byte.
    pub unclean: u8,
    /// The newline detection bytes.
    pub check_bytes: [u8; 4],
    /// Compression algorithm (0 or [`COMPRESSION_DEFLATE`]).
    pub compress_algorithm: u16,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The big-endian magic at the start of `b` (0 when shorter than 4 bytes).
pub fn magic(b: &[u8]) -> u32 {
    b.get(..4)
        .map(|m| u32::from_be_bytes([m[0], m[1], m[2], m[3]]))
        .unwrap_or(0)
}

fn bad(p: VmdkProblem) -> crate::Error {
    Corruption::new(Structure::VmdkHeader, Problem::Vmdk(p)).into()
}

impl Header {
    /// Decodes the 512-byte header at the start of `b` (magic not checked).
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < SECTOR as usize {
            return Err(bad(VmdkProblem::TooSmall));
        }
        let mut check_bytes = [0u8; 4];
        check_bytes.copy_from_slice(&b[73..77]);
        Ok(Header {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            granularity: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            num_gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            grain_offset: le64(b, 64),
            unclean: b[72],
            check_bytes,
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        })
    }

    /// Encodes the header as its 512-byte sector (with the magic).
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(&VMDK4_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.granularity.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.grain_offset.to_le_bytes());
        b[72] = self.unclean;
        b[73..77].copy_from_slice(&self.check_bytes);
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Whether grains are deflate-compressed (stream-optimized).
    pub fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESSION_DEFLATE
    }

    /// The header of a new extent of `sectors` sectors as qemu-img 10 lays it out:
    /// 64 KiB grains, 512-entry grain tables, the descriptor in sectors 1..21, the
    /// redundant directory and its tables, then the directory and its tables, the first
    /// grain on a grain boundary.
    pub fn new_sparse(sectors: u64, compress: bool, zeroed_grain: bool) -> Header {
        let g = new_geometry(sectors);
        Header {
            version: if compress {
                3
            } else if zeroed_grain {
                2
            } else {
                1
            },
            flags: FLAG_RGD
                | FLAG_NL_DETECT
                | if compress {
                    FLAG_COMPRESS | FLAG_MARKER
                } else {
                    0
                }
                | if zeroed_grain { FLAG_ZERO_GRAIN } else { 0 },
            capacity: sectors,
            granularity: 128,
            desc_offset: 1,
            desc_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 21 + g.gd_sectors + g.gt_sectors * g.gt_count,
            grain_offset: (21 + 2 * (g.gd_sectors + g.gt_sectors * g.gt_count)).div_ceil(128) * 128,
            unclean: 0,
            check_bytes: *b"\n \r\n",
            compress_algorithm: if compress { COMPRESSION_DEFLATE } else { 0 },
        }
    }
}

/// Table sizes of a new sparse extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewGeometry {
    /// Grain tables.
    pub gt_count: u64,
    /// Sectors of one grain table.
    pub gt_sectors: u64,
    /// Sectors of the grain directory.
    pub gd_sectors: u64,
}

/// The table sizes qemu-img gives a new extent of `sectors` sectors.
pub fn new_geometry(sectors: u64) -> NewGeometry {
    let grains = sectors.div_ceil(128);
    let gt_count = grains.div_ceil(512);
    NewGeometry {
        gt_count,
        gt_sectors: (512 * 4u64).div_ceil(SECTOR),
        gd_sectors: (gt_count * 4).div_ceil(SECTOR),
    }
}

/// The VMware 3 (`COWD`) header fields QEMU reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vmdk3Header {
    /// Extent size in sectors.
    pub disk_sectors: u32,
    /// Grain size in sectors.
    pub granularity: u32,
    /// Grain directory (sectors).
    pub l1dir_offset: u32,
    /// Grain directory entries.
    pub l1dir_size: u32,
}

impl Vmdk3Header {
    /// Decodes the fields after the magic (version @4, flags @8, then these).
    pub fn parse(b: &[u8]) -> Result<Vmdk3Header> {
        if b.len() < 44 {
            return Err(bad(VmdkProblem::TooSmall));
        }
        Ok(Vmdk3Header {
            disk_sectors: le32(b, 12),
            granularity: le32(b, 16),
            l1dir_offset: le32(b, 20),
            l1dir_size: le32(b, 24),
        })
    }
}

/// Checks the stream footer (footer marker, header copy, end-of-stream marker: the
/// last 1536 bytes of the file) and returns the header it holds.
pub fn parse_footer(b: &[u8]) -> Result<Header> {
    if b.len() < 1536 {
        return Err(bad(VmdkProblem::InvalidFooter));
    }
    let (fm, rest) = b.split_at(512);
    let (h, eos) = rest.split_at(512);
    let ok = magic(h) == VMDK4_MAGIC
        && le32(fm, 8) == 0
        && le32(fm, 12) == MARKER_FOOTER
        && le64(eos, 0) == 0
        && le32(eos, 8) == 0
        && le32(eos, 12) == MARKER_EOS;
    if !ok {
        return Err(bad(VmdkProblem::InvalidFooter));
    }
    Header::parse(h)
}

/// A compressed grain's header: the grain's first sector (`lba`, extent relative) and
/// the compressed size.
pub fn parse_grain_marker(b: &[u8]) -> Option<(u64, u32)> {
    (b.len() >= GRAIN_MARKER_LEN).then(|| (le64(b, 0), le32(b, 8)))
}

/// Encodes a compressed grain's header.
pub fn grain_marker(lba: u64, size: u32) -> [u8; GRAIN_MARKER_LEN] {
    let mut m = [0u8; GRAIN_MARKER_LEN];
    m[..8].copy_from_slice(&lba.to_le_bytes());
    m[8..].copy_from_slice(&size.to_le_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_header_is_qemus_layout() {
        // qemu-img create -f vmdk x.vmdk 10M: gd at 0x1a, grains from sector 128.
        let h = Header::new_sparse(20480, true, false);
        let b = h.to_bytes();
        assert_eq!(&b[..4], b"KDMV");
        assert_eq!(h.version, 3);
        assert_eq!(h.flags, 0x0003_0003);
        assert_eq!(h.rgd_offset, 21);
        assert_eq!(h.gd_offset, 0x1a);
        assert_eq!(h.grain_offset, 128);
        assert_eq!(&b[72..79], b"\0\n \r\n\x01\0");
        assert_eq!(Header::parse(&b).unwrap(), h);
        assert_eq!(magic(&b), VMDK4_MAGIC);
        let s = Header::new_sparse(20480, false, true);
        assert_eq!((s.version, s.flags), (2, 7));
        let g = new_geometry(2 << 30 >> 9);
        assert_eq!((g.gt_count, g.gd_sectors), (64, 1));
    }

    #[test]
    fn footer_and_markers() {
        let mut f = vec![0u8; 1536];
        f[12..16].copy_from_slice(&MARKER_FOOTER.to_le_bytes());
        let mut h = Header::new_sparse(2048, true, false);
        h.gd_offset = 77;
        f[512..1024].copy_from_slice(&h.to_bytes());
        assert_eq!(parse_footer(&f).unwrap().gd_offset, 77);
        f[1024 + 12] = 1;
        assert!(parse_footer(&f)
            .unwrap_err()
            .to_string()
            .contains("Invalid footer"));
        let m = grain_marker(256, 1000);
        assert_eq!(parse_grain_marker(&m), Some((256, 1000)));
        assert_eq!(parse_grain_marker(&m[..5]), None);
        assert!(Header::parse(&[0u8; 10]).is_err());
    }

    #[test]
    fn cowd_fields() {
        let mut b = vec![0u8; 512];
        b[..4].copy_from_slice(b"COWD");
        b[12..16].copy_from_slice(&100u32.to_le_bytes());
        b[16..20].copy_from_slice(&8u32.to_le_bytes());
        b[20..24].copy_from_slice(&4u32.to_le_bytes());
        b[24..28].copy_from_slice(&1u32.to_le_bytes());
        let h = Vmdk3Header::parse(&b).unwrap();
        assert_eq!(
            (h.disk_sectors, h.granularity, h.l1dir_offset, h.l1dir_size),
            (100, 8, 4, 1)
        );
    }
}
