//! The VHD footer (512 bytes, big-endian): decoded, validated and encoded in one place,
//! with its checksum, the CHS geometry rules and the size rules qemu-img 10 applies.
//!
//! Layout (Microsoft's "Virtual Hard Disk Image Format Specification"): cookie
//! `conectix` (0), features (8), file format version (12), data offset (16), time stamp
//! (24, seconds since 2000-01-01 UTC), creator application (28), creator version (32),
//! creator host OS (36), original size (40), current size (48), disk geometry
//! cylinders/heads/sectors (56/58/59), disk type (60), checksum (64, one's complement of
//! the byte sum with the field itself zero), unique id (68), saved state (84), reserved.
//!
//! Size rules (QEMU's `vpc_open` / `vpc_co_create_opts`): the disk size is
//! cylinders × heads × sectors × 512 — the CHS geometry — unless the creator is one known
//! to use the current-size field (`win `, `qem2`, `d2v `, `CTXS`, `tap\0`) or the geometry
//! is the maximum 65535×16×255, in which case the current-size field is the disk size.
//! Creation rounds a size up to the next CHS-representable one, unless `force_size`,
//! which records the exact size with the maximum geometry and creator `qem2` (what Azure
//! needs for its exact-MiB fixed VHDs).

use crate::error::{Corruption, Field, Problem, Result, Structure};

/// Bytes of the footer (and of its copy at the start of a dynamic image).
pub const FOOTER_LEN: usize = 512;
/// The footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// Disk type: fixed (data, then the footer).
pub const TYPE_FIXED: u32 = 2;
/// Disk type: dynamic (sparse, with a BAT).
pub const TYPE_DYNAMIC: u32 = 3;
/// Disk type: differencing (a dynamic disk with a parent; QEMU reads it as dynamic).
pub const TYPE_DIFFERENCING: u32 = 4;
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC.
pub const TIMESTAMP_BASE: u64 = 946_684_800;
/// Largest cylinder count of the geometry.
pub const CHS_MAX_C: u64 = 65535;
/// Largest head count of the geometry.
pub const CHS_MAX_H: u64 = 16;
/// Largest sectors-per-track of the geometry.
pub const CHS_MAX_S: u64 = 255;
/// Sectors of the maximum geometry: the marker for "the current size is the size".
pub const MAX_GEOMETRY: u64 = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S;
/// Largest disk QEMU opens or creates, in sectors (2040 GiB).
pub const MAX_SECTORS: u64 = 0xff00_0000;

/// The decoded footer. Fields not interpreted here (reserved bytes) are kept verbatim in
/// `raw` so a rewrite changes nothing but what the driver sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Features (2: reserved bit, always set).
    pub features: u32,
    /// File format version (0x00010000).
    pub version: u32,
    /// Offset of the dynamic disk header; all ones for a fixed disk.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application (`qemu`, `qem2`, `vpc `, `win `...).
    pub creator_app: [u8; 4],
    /// Creator version major.
    pub major: u16,
    /// Creator version minor.
    pub minor: u16,
    /// Creator host OS.
    pub creator_os: [u8; 4],
    /// Size at creation.
    pub orig_size: u64,
    /// Current size.
    pub current_size: u64,
    /// Geometry: cylinders.
    pub cyls: u16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors per track.
    pub secs: u8,
    /// Disk type ([`TYPE_FIXED`], [`TYPE_DYNAMIC`], [`TYPE_DIFFERENCING`]).
    pub disk_type: u32,
    /// The checksum as stored.
    pub checksum: u32,
    /// Unique id.
    pub uuid: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
    /// The 512 bytes as read (or as last encoded).
    pub raw: [u8; FOOTER_LEN],
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// The VHD checksum of `buf` with its checksum field (at `at`, 4 bytes) counted as zero.
pub fn checksum(buf: &[u8], at: usize) -> u32 {
    let mut sum = 0u32;
    for (i, &b) in buf.iter().enumerate() {
        if !(at..at + 4).contains(&i) {
            sum = sum.wrapping_add(b as u32);
        }
    }
    !sum
}

impl Footer {
    /// Whether `buf` starts with the footer cookie.
    pub fn has_cookie(buf: &[u8]) -> bool {
        buf.len() >= 8 && &buf[..8] == COOKIE
    }

    /// Decodes a footer; checks the cookie and the checksum (as QEMU, which refuses a
    /// bad checksum).
    pub fn decode(buf: &[u8; FOOTER_LEN]) -> Result<Footer> {
        if !Footer::has_cookie(buf) {
            return Err(Corruption::new(Structure::VpcFooter, Problem::BadMagic).into());
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&buf[28..32]);
        let mut creator_os = [0u8; 4];
        creator_os.copy_from_slice(&buf[36..40]);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[68..84]);
        let f = Footer {
            features: be32(buf, 8),
            version: be32(buf, 12),
            data_offset: be64(buf, 16),
            timestamp: be32(buf, 24),
            creator_app,
            major: be16(buf, 32),
            minor: be16(buf, 34),
            creator_os,
            orig_size: be64(buf, 40),
            current_size: be64(buf, 48),
            cyls: be16(buf, 56),
            heads: buf[58],
            secs: buf[59],
            disk_type: be32(buf, 60),
            checksum: be32(buf, 64),
            uuid,
            saved_state: buf[84],
            raw: *buf,
        };
        let want = checksum(buf, 64);
        if want != f.checksum {
            return Err(Corruption::new(
                Structure::VpcFooter,
                Problem::Invalid {
                    field: Field::Checksum,
                    value: f.checksum as u64,
                },
            )
            .into());
        }
        Ok(f)
    }

    /// Encodes the footer (reserved bytes from `raw`), computing the checksum.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = self.raw;
        b[..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..34].copy_from_slice(&self.major.to_be_bytes());
        b[34..36].copy_from_slice(&self.minor.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os);
        b[40..48].copy_from_slice(&self.orig_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.cyls.to_be_bytes());
        b[58] = self.heads;
        b[59] = self.secs;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// Sectors of the CHS geometry.
    pub fn chs_sectors(&self) -> u64 {
        self.cyls as u64 * self.heads as u64 * self.secs as u64
    }

    /// Whether the creator records the real size in the current-size field (QEMU's
    /// table: Hyper-V, QEMU with `force_size`, Disk2vhd, XenConverter, XenServer).
    pub fn creator_uses_current_size(&self) -> bool {
        matches!(
            &self.creator_app,
            b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0"
        )
    }

    /// The guest size in bytes, by QEMU's rules (see the module documentation), and
    /// checked against the 2040 GiB limit.
    pub fn disk_size(&self) -> Result<u64> {
        let chs = self.chs_sectors();
        let sectors = if self.creator_uses_current_size() || chs == MAX_GEOMETRY {
            self.current_size / 512
        } else {
            chs
        };
        if sectors > MAX_SECTORS {
            return Err(Corruption::new(
                Structure::VpcFooter,
                Problem::TooLarge {
                    field: Field::ImageSize,
                    value: sectors.saturating_mul(512),
                    max: MAX_SECTORS * 512,
                },
            )
            .into());
        }
        Ok(sectors * 512)
    }
}

/// The geometry the VHD specification's algorithm gives `total_sectors` (QEMU's
/// `calculate_geometry`, which goes past the ATA limit with 16 heads of 255 sectors for
/// large disks): `(cylinders, heads, sectors per track)`; may round down.
pub fn geometry(total_sectors: u64) -> (u64, u64, u64) {
    let total = total_sectors.min(MAX_GEOMETRY);
    let (secs, heads, cth);
    if total >= 65535 * 16 * 63 {
        secs = 255;
        heads = 16;
        cth = total / secs;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        secs = s;
        heads = h;
        cth = c;
    }
    // QEMU keeps cylinders × heads in 32 bits and cylinders in 16.
    let cyls = ((cth & 0xffff_ffff) / heads) & 0xffff;
    (cyls, heads, secs)
}

/// What creation records for a requested size (already rounded up to whole sectors):
/// the geometry and the guest size in bytes, as qemu-img 10 (`force_size`: maximum
/// geometry and the exact size). Sizes past 2040 GiB are refused with qemu's words.
pub fn creation_geometry(size: u64, force_size: bool) -> Result<((u64, u64, u64), u64)> {
    let too_large = || -> crate::error::Error { crate::error::Invalid::VpcTooLarge.into() };
    let geo = if force_size {
        (CHS_MAX_C, CHS_MAX_H, CHS_MAX_S)
    } else {
        // Increase the sectors asked for until the geometry holds them (or the
        // geometry saturates at its maximum).
        let total = (size / 512).min(MAX_GEOMETRY);
        let mut geo = (0, 0, 0);
        let mut i = 0u64;
        while total > geo.0 * geo.1 * geo.2 {
            geo = geometry(total + i);
            i += 1;
        }
        geo
    };
    let chs = geo.0 * geo.1 * geo.2;
    let sectors = if chs == MAX_GEOMETRY {
        let s = size / 512;
        if s > MAX_SECTORS {
            return Err(too_large());
        }
        s
    } else {
        chs
    };
    Ok((geo, sectors * 512))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        let mut f = Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: 512,
            timestamp: 12345,
            creator_app: *b"qemu",
            major: 5,
            minor: 3,
            creator_os: *b"Wi2k",
            orig_size: 104_865_792,
            current_size: 104_865_792,
            cyls: 0,
            heads: 0,
            secs: 0,
            disk_type: TYPE_DYNAMIC,
            checksum: 0,
            uuid: [7; 16],
            saved_state: 0,
            raw: [0; FOOTER_LEN],
        };
        let ((c, h, s), _) = creation_geometry(100 << 20, false).unwrap();
        f.cyls = c as u16;
        f.heads = h as u8;
        f.secs = s as u8;
        f
    }

    #[test]
    fn round_trip_and_checksum() {
        let f = sample();
        let b = f.encode();
        assert_eq!(&b[..8], COOKIE);
        let g = Footer::decode(&b).unwrap();
        assert_eq!(g.encode(), b);
        assert_eq!(g.current_size, f.current_size);
        assert_eq!(g.checksum, checksum(&b, 64));
        let mut bad = b;
        bad[100] ^= 1;
        let e = Footer::decode(&bad).unwrap_err();
        assert_eq!(e.to_string(), "Incorrect header checksum");
        let mut bad = b;
        bad[0] = b'x';
        assert_eq!(
            Footer::decode(&bad).unwrap_err().to_string(),
            "invalid VPC image"
        );
    }

    #[test]
    fn qemu_sizes() {
        // What qemu-img 10 gives 100 MiB, 1 GiB: CHS-rounded up.
        assert_eq!(creation_geometry(100 << 20, false).unwrap().1, 104_865_792);
        let (geo, sz) = creation_geometry(1 << 30, false).unwrap();
        assert_eq!(geo.0 * geo.1 * geo.2 * 512, sz);
        assert!(sz >= 1 << 30);
        // force_size keeps the size and takes the maximum geometry.
        let (geo, sz) = creation_geometry(100 << 20, true).unwrap();
        assert_eq!(geo, (65535, 16, 255));
        assert_eq!(sz, 100 << 20);
        assert!(creation_geometry(MAX_SECTORS * 512 + 512, true).is_err());
        assert_eq!(
            creation_geometry(MAX_SECTORS * 512, true).unwrap().1,
            MAX_SECTORS * 512
        );
    }

    #[test]
    fn disk_size_rules() {
        let mut f = sample();
        assert_eq!(f.disk_size().unwrap(), f.chs_sectors() * 512);
        f.current_size = 100 << 20;
        assert_eq!(f.disk_size().unwrap(), f.chs_sectors() * 512);
        f.creator_app = *b"win ";
        assert_eq!(f.disk_size().unwrap(), 100 << 20);
        f.creator_app = *b"vpc ";
        f.cyls = 65535;
        f.heads = 16;
        f.secs = 255;
        assert_eq!(f.disk_size().unwrap(), 100 << 20);
        f.current_size = u64::MAX;
        assert!(f.disk_size().is_err());
    }

    #[test]
    fn geometry_small_disks() {
        // The specification's example thresholds: 17 sectors per track for small disks.
        assert_eq!(geometry(2048), (30, 4, 17));
        let (c, h, s) = geometry(65535 * 16 * 63);
        assert_eq!((h, s), (16, 255));
        assert!(c * h * s <= 65535 * 16 * 63);
    }
}
