//! The QED header: the one place it is parsed, validated and serialised.

use crate::error::{Corruption, Error, Field, Invalid, Problem, Result, Structure, Unsupported};
use crate::storage::Storage;

/// `QED\0` read as a little-endian u32.
pub const MAGIC: u32 = 0x0044_4551;
/// Bytes of the fixed header fields.
pub const HEADER_LEN: usize = 64;

/// The image has a backing file.
pub const F_BACKING_FILE: u64 = 0x01;
/// The image may be inconsistent; check before use.
pub const F_NEED_CHECK: u64 = 0x02;
/// The backing file is raw; never probe it.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
/// Every incompatible feature this driver understands.
pub const F_KNOWN: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// No autoclear features are defined: every set bit is unknown.
pub const AUTOCLEAR_KNOWN: u64 = 0;

/// Smallest cluster size.
pub const MIN_CLUSTER_SIZE: u32 = 4 * 1024;
/// Largest cluster size.
pub const MAX_CLUSTER_SIZE: u32 = 64 * 1024 * 1024;
/// Default cluster size.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;
/// Smallest table size, in clusters.
pub const MIN_TABLE_SIZE: u32 = 1;
/// Largest table size, in clusters.
pub const MAX_TABLE_SIZE: u32 = 16;
/// Default table size, in clusters.
pub const DEFAULT_TABLE_SIZE: u32 = 4;
/// Longest backing file name accepted (QEMU's limit is its path buffer).
pub const MAX_BACKING_NAME: u32 = 4095;
/// Guest sizes are whole sectors.
pub const SECTOR: u64 = 512;

/// The decoded header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Clusters per L1/L2 table.
    pub table_size: u32,
    /// Clusters taken by the header.
    pub header_size: u32,
    /// Incompatible features.
    pub features: u64,
    /// Compatible features (ignored).
    pub compat_features: u64,
    /// Features cleared by writers that do not know them.
    pub autoclear_features: u64,
    /// Byte offset of the L1 table.
    pub l1_table_offset: u64,
    /// Guest size in bytes.
    pub image_size: u64,
    /// Byte offset of the backing file name.
    pub backing_filename_offset: u32,
    /// Length of the backing file name.
    pub backing_filename_size: u32,
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

/// Whether `cluster_size` is a valid QED cluster size.
pub fn cluster_size_valid(cluster_size: u64) -> bool {
    cluster_size.is_power_of_two()
        && (MIN_CLUSTER_SIZE as u64..=MAX_CLUSTER_SIZE as u64).contains(&cluster_size)
}

/// Whether `table_size` is a valid QED table size.
pub fn table_size_valid(table_size: u64) -> bool {
    table_size.is_power_of_two()
        && (MIN_TABLE_SIZE as u64..=MAX_TABLE_SIZE as u64).contains(&table_size)
}

/// Largest guest size a geometry can address: (entries per table)^2 * cluster size.
pub fn max_image_size(cluster_size: u64, table_size: u64) -> u64 {
    let n = table_size * cluster_size / 8;
    n.saturating_mul(n).saturating_mul(cluster_size)
}

/// Whether `size` is a valid guest size for a geometry.
pub fn image_size_valid(size: u64, cluster_size: u64, table_size: u64) -> bool {
    size.is_multiple_of(SECTOR) && size <= max_image_size(cluster_size, table_size)
}

/// A corruption of the header's fixed fields.
fn corrupt(problem: Problem) -> Error {
    Corruption::new(Structure::QedHeader, problem).into()
}

impl Header {
    /// Decodes the fixed fields without validating them (see [`Header::validate`]).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < HEADER_LEN || le32(buf, 0) != MAGIC {
            return Err(Invalid::WrongFormat("QED").into());
        }
        Ok(Header {
            cluster_size: le32(buf, 4),
            table_size: le32(buf, 8),
            header_size: le32(buf, 12),
            features: le64(buf, 16),
            compat_features: le64(buf, 24),
            autoclear_features: le64(buf, 32),
            l1_table_offset: le64(buf, 40),
            image_size: le64(buf, 48),
            backing_filename_offset: le32(buf, 56),
            backing_filename_size: le32(buf, 60),
        })
    }

    /// Encodes the fixed fields.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }

    /// Bytes per table.
    pub fn table_bytes(&self) -> u64 {
        self.table_size as u64 * self.cluster_size as u64
    }

    /// Entries per table.
    pub fn table_nelems(&self) -> u64 {
        self.table_bytes() / 8
    }

    /// Bytes of the header area (the first `header_size` clusters).
    pub fn header_bytes(&self) -> u64 {
        self.header_size as u64 * self.cluster_size as u64
    }

    /// Whether NEED_CHECK is set.
    pub fn need_check(&self) -> bool {
        self.features & F_NEED_CHECK != 0
    }

    /// Checks every field against the format's rules; `file_size` is the file's length
    /// rounded down to whole clusters.
    pub fn validate(&self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size as u64;
        if !cluster_size_valid(cs) {
            return Err(corrupt(Problem::OutOfRange {
                field: Field::ClusterSize,
                value: cs,
                min: MIN_CLUSTER_SIZE as u64,
                max: MAX_CLUSTER_SIZE as u64,
            }));
        }
        if !table_size_valid(self.table_size as u64) {
            return Err(corrupt(Problem::OutOfRange {
                field: Field::TableSize,
                value: self.table_size.into(),
                min: MIN_TABLE_SIZE as u64,
                max: MAX_TABLE_SIZE as u64,
            }));
        }
        let unknown = self.features & !F_KNOWN;
        if unknown != 0 {
            return Err(Unsupported::QedFeatures(unknown).into());
        }
        if self.header_size == 0 {
            return Err(corrupt(Problem::Invalid {
                field: Field::HeaderSize,
                value: 0,
            }));
        }
        let file_size = file_len & !(cs - 1);
        // The header clusters must exist in the file; this also bounds header_size.
        if self.header_bytes() > file_size.max(cs) {
            return Err(corrupt(Problem::TooLarge {
                field: Field::HeaderSize,
                value: self.header_size.into(),
                max: file_len,
            }));
        }
        if !image_size_valid(self.image_size, cs, self.table_size as u64) {
            return Err(corrupt(Problem::OutOfRange {
                field: Field::ImageSize,
                value: self.image_size,
                min: 0,
                max: max_image_size(cs, self.table_size as u64),
            }));
        }
        if !table_in_file(self, self.l1_table_offset, file_size) {
            return Err(Corruption::new(
                Structure::QedL1Table,
                Problem::PastEnd {
                    bytes: self.table_bytes(),
                    end: file_size,
                },
            )
            .at(self.l1_table_offset)
            .into());
        }
        if self.features & F_BACKING_FILE != 0 {
            let off = self.backing_filename_offset as u64;
            let len = self.backing_filename_size as u64;
            if len > MAX_BACKING_NAME as u64
                || off + len > self.header_bytes()
                || off < 64 && len > 0
            {
                return Err(Corruption::new(
                    Structure::QedBackingFileName,
                    Problem::PastEnd {
                        bytes: len,
                        end: self.header_bytes(),
                    },
                )
                .at(off)
                .into());
            }
        }
        Ok(())
    }
}

/// Whether `offset` names a whole cluster inside the file after the header clusters
/// (the test for the L1 table's own offset).
fn cluster_in_file(h: &Header, offset: u64, file_size: u64) -> bool {
    offset & (h.cluster_size as u64 - 1) == 0 && offset >= h.header_bytes() && offset < file_size
}

/// Whether `[offset, offset + len)` overlaps the L1 table.
fn overlaps_l1(h: &Header, offset: u64, len: u64) -> bool {
    let l1 = h.l1_table_offset;
    offset < l1.saturating_add(h.table_bytes()) && l1 < offset.saturating_add(len)
}

/// Whether a data cluster offset is valid: aligned, after the header, inside the file,
/// and not part of the L1 table (writing through such an entry would destroy metadata).
pub fn cluster_offset_valid(h: &Header, offset: u64, file_size: u64) -> bool {
    cluster_in_file(h, offset, file_size) && !overlaps_l1(h, offset, h.cluster_size as u64)
}

/// Whether `offset` can hold a whole table inside the file after the header clusters.
/// (QEMU rejects every table when table_size is 1 because of its overflow test; we do not.)
fn table_in_file(h: &Header, offset: u64, file_size: u64) -> bool {
    let Some(last) = offset.checked_add((h.table_size as u64 - 1) * h.cluster_size as u64) else {
        return false;
    };
    cluster_in_file(h, offset, file_size) && cluster_in_file(h, last, file_size)
}

/// Whether an L2 table offset is valid: the whole table lies inside the file after the
/// header and does not overlap the L1 table.
pub fn table_offset_valid(h: &Header, offset: u64, file_size: u64) -> bool {
    table_in_file(h, offset, file_size) && !overlaps_l1(h, offset, h.table_bytes())
}

/// Reads the backing file name the header points at.
pub fn read_backing_name(storage: &dyn Storage, h: &Header) -> Result<Option<String>> {
    if h.features & F_BACKING_FILE == 0 {
        return Ok(None);
    }
    let mut buf = vec![0u8; h.backing_filename_size as usize];
    storage.read_at(&mut buf, h.backing_filename_offset as u64)?;
    let name_error = |problem| {
        Corruption::new(Structure::QedBackingFileName, problem).at(h.backing_filename_offset.into())
    };
    let name = String::from_utf8(buf).map_err(|_| name_error(Problem::NotUtf8))?;
    if name.is_empty() || name.contains('\0') {
        return Err(name_error(Problem::EmptyOrNul).into());
    }
    Ok(Some(name))
}

/// Serialises the first `header_bytes` bytes to write for a header plus its backing name
/// stored right after the fixed fields (where QEMU puts it).
pub fn header_with_name(h: &mut Header, name: Option<&str>) -> Result<Vec<u8>> {
    match name {
        Some(n) => {
            let room = h.header_bytes().saturating_sub(HEADER_LEN as u64);
            if n.is_empty() || n.len() as u64 > room || n.len() as u64 > MAX_BACKING_NAME as u64 {
                return Err(Invalid::QedBackingNameTooLong {
                    name: n.to_string(),
                    room,
                }
                .into());
            }
            h.features |= F_BACKING_FILE;
            h.features &= !F_BACKING_FORMAT_NO_PROBE;
            h.backing_filename_offset = HEADER_LEN as u32;
            h.backing_filename_size = n.len() as u32;
        }
        None => {
            h.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
            h.backing_filename_offset = 0;
            h.backing_filename_size = 0;
        }
    }
    let mut v = h.to_bytes().to_vec();
    if let Some(n) = name {
        v.extend_from_slice(n.as_bytes());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    const CS: u32 = 64 * 1024;

    /// A valid header: 64 KiB clusters, 4-cluster tables, one header cluster, L1 right
    /// after it, 1 GiB guest.
    fn base() -> Header {
        Header {
            cluster_size: CS,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: CS as u64,
            image_size: 1 << 30,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    /// File length holding the header cluster(s) and the L1 table of `h`.
    fn file_len(h: &Header) -> u64 {
        h.l1_table_offset + h.table_bytes()
    }

    fn valid(h: &Header) -> bool {
        h.validate(file_len(h)).is_ok()
    }

    #[test]
    fn round_trip_every_field() {
        // Distinct values in every field, so a swapped or truncated field shows.
        let h = Header {
            cluster_size: 0x0102_0304,
            table_size: 0x0506_0708,
            header_size: 0x090a_0b0c,
            features: 0x1112_1314_1516_1718,
            compat_features: 0x2122_2324_2526_2728,
            autoclear_features: 0x3132_3334_3536_3738,
            l1_table_offset: 0x4142_4344_4546_4748,
            image_size: 0x5152_5354_5556_5758,
            backing_filename_offset: 0x6162_6364,
            backing_filename_size: 0x7172_7374,
        };
        let b = h.to_bytes();
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(&b[0..4], b"QED\0");
        // Little-endian, at the offsets the format names.
        assert_eq!(&b[4..8], &[0x04, 0x03, 0x02, 0x01]);
        assert_eq!(&b[8..12], &[0x08, 0x07, 0x06, 0x05]);
        assert_eq!(&b[12..16], &[0x0c, 0x0b, 0x0a, 0x09]);
        assert_eq!(&b[16..24], &0x1112_1314_1516_1718u64.to_le_bytes());
        assert_eq!(&b[24..32], &0x2122_2324_2526_2728u64.to_le_bytes());
        assert_eq!(&b[32..40], &0x3132_3334_3536_3738u64.to_le_bytes());
        assert_eq!(&b[40..48], &0x4142_4344_4546_4748u64.to_le_bytes());
        assert_eq!(&b[48..56], &0x5152_5354_5556_5758u64.to_le_bytes());
        assert_eq!(&b[56..60], &[0x64, 0x63, 0x62, 0x61]);
        assert_eq!(&b[60..64], &[0x74, 0x73, 0x72, 0x71]);
        assert_eq!(Header::parse(&b).unwrap(), h);
        // Trailing bytes (the rest of the header cluster) are not part of the fields.
        let mut long = b.to_vec();
        long.extend_from_slice(&[0xff; 100]);
        assert_eq!(Header::parse(&long).unwrap(), h);
    }

    #[test]
    fn round_trip_feature_bits() {
        for features in 0..=F_KNOWN {
            let mut h = base();
            h.features = features;
            if features & F_BACKING_FILE != 0 {
                h.backing_filename_offset = HEADER_LEN as u32;
                h.backing_filename_size = 8;
            }
            let back = Header::parse(&h.to_bytes()).unwrap();
            assert_eq!(back, h);
            assert_eq!(back.need_check(), features & F_NEED_CHECK != 0);
            assert!(valid(&back), "features {features:#x} should be accepted");
        }
    }

    #[test]
    fn parse_rejects_bad_magic_and_short_buffers() {
        let b = base().to_bytes();
        for i in 0..4 {
            let mut bad = b;
            bad[i] ^= 0x20;
            assert!(Header::parse(&bad).is_err(), "magic byte {i} flipped");
        }
        // qcow2's magic is not QED's.
        let mut qcow2 = b;
        qcow2[..4].copy_from_slice(b"QFI\xfb");
        assert!(Header::parse(&qcow2).is_err());
        for n in [0, 4, 63] {
            assert!(Header::parse(&b[..n]).is_err(), "{n}-byte buffer");
        }
    }

    #[test]
    fn geometry_helpers() {
        for cs in [4096u64, 8192, 65536, 1 << 20, 64 << 20] {
            assert!(cluster_size_valid(cs), "{cs}");
        }
        for cs in [
            0u64,
            1,
            512,
            2048,
            4095,
            4097,
            3 * 4096,
            65535,
            128 << 20,
            1 << 40,
        ] {
            assert!(!cluster_size_valid(cs), "{cs}");
        }
        for ts in [1u64, 2, 4, 8, 16] {
            assert!(table_size_valid(ts), "{ts}");
        }
        for ts in [0u64, 3, 5, 12, 17, 32, u32::MAX as u64] {
            assert!(!table_size_valid(ts), "{ts}");
        }
        // 4 KiB clusters, 1-cluster tables: 512 entries, 512 * 512 * 4 KiB = 1 GiB.
        assert_eq!(max_image_size(4096, 1), 1 << 30);
        // 64 KiB clusters, 4-cluster tables (QEMU's default): 32 Ki entries, 64 TiB.
        assert_eq!(max_image_size(65536, 4), 1 << 46);
        // The largest geometry saturates instead of overflowing.
        assert_eq!(max_image_size(64 << 20, 16), u64::MAX);
        assert!(image_size_valid(0, 4096, 1));
        assert!(image_size_valid(1 << 30, 4096, 1));
        assert!(!image_size_valid((1 << 30) + 512, 4096, 1));
        assert!(!image_size_valid(1000, 4096, 1));
    }

    #[test]
    fn base_header_is_valid() {
        let h = base();
        assert!(valid(&h));
        assert_eq!(h.table_bytes(), 4 * CS as u64);
        assert_eq!(h.table_nelems(), 4 * CS as u64 / 8);
        assert_eq!(h.header_bytes(), CS as u64);
        // A file whose length is not a cluster multiple counts whole clusters only.
        assert!(h.validate(file_len(&h) + 100).is_ok());
        assert!(h.validate(file_len(&h) - 1).is_err());
    }

    #[test]
    fn cluster_size_bounds() {
        for cs in [MIN_CLUSTER_SIZE, 1 << 20, MAX_CLUSTER_SIZE] {
            let mut h = base();
            h.cluster_size = cs;
            h.l1_table_offset = cs as u64;
            assert!(valid(&h), "cluster size {cs}");
        }
        for cs in [
            0,
            512,
            2048,
            4095,
            3 * 4096,
            65536 + 4096,
            128 << 20,
            u32::MAX,
        ] {
            let mut h = base();
            h.cluster_size = cs;
            assert!(!valid(&h), "cluster size {cs} accepted");
        }
    }

    #[test]
    fn table_size_bounds() {
        for ts in [1, 2, 8, 16] {
            let mut h = base();
            h.table_size = ts;
            assert!(valid(&h), "table size {ts}");
        }
        for ts in [0, 3, 6, 17, 32, u32::MAX] {
            let mut h = base();
            h.table_size = ts;
            // Give the L1 table room in any case, so only the size itself is wrong.
            let len = CS as u64 * 64;
            assert!(h.validate(len).is_err(), "table size {ts} accepted");
        }
    }

    #[test]
    fn header_size_bounds() {
        let mut h = base();
        h.header_size = 0;
        assert!(!valid(&h), "header_size 0");

        // Several header clusters, L1 after them.
        let mut h = base();
        h.header_size = 3;
        h.l1_table_offset = 3 * CS as u64;
        assert!(valid(&h));
        // ... but not with the L1 table inside them.
        let mut inside = h.clone();
        inside.l1_table_offset = 2 * CS as u64;
        assert!(inside.validate(file_len(&h)).is_err());

        // Header clusters running past the end of the file.
        let mut h = base();
        h.header_size = u32::MAX;
        assert!(!valid(&h));
        h.header_size = 6;
        assert!(h.validate(5 * CS as u64).is_err());
    }

    #[test]
    fn l1_table_offset_rules() {
        let h = base();
        let len = file_len(&h);
        let cases = [
            (0, "at 0 (the header)"),
            (CS as u64 + 512, "unaligned by a sector"),
            (CS as u64 + 1, "unaligned by a byte"),
            (CS as u64 / 2, "inside the header cluster, unaligned"),
            (len, "at the end of the file"),
            (len - CS as u64, "table runs past the end of the file"),
            (!(CS as u64 - 1), "near 2^64"),
        ];
        for (off, what) in cases {
            let mut bad = h.clone();
            bad.l1_table_offset = off;
            assert!(bad.validate(len).is_err(), "L1 {what} ({off:#x}) accepted");
        }
        // Anywhere after the header with room for the whole table is fine.
        let mut later = h.clone();
        later.l1_table_offset = 10 * CS as u64;
        assert!(later.validate(14 * CS as u64).is_ok());
        assert!(later.validate(14 * CS as u64 - 1).is_err());
    }

    #[test]
    fn image_size_rules() {
        let mut h = base();
        for size in [0, 512, 1 << 20, 1 << 46] {
            h.image_size = size;
            assert!(valid(&h), "size {size}");
        }
        for size in [1, 511, 513, (1 << 30) + 100, (1 << 46) + 512, u64::MAX] {
            h.image_size = size;
            assert!(!valid(&h), "size {size} accepted");
        }
        // The capacity follows the geometry: 4 KiB clusters, 1-cluster tables: 1 GiB.
        let mut small = base();
        small.cluster_size = 4096;
        small.table_size = 1;
        small.l1_table_offset = 4096;
        small.image_size = 1 << 30;
        assert!(valid(&small));
        small.image_size += 512;
        assert!(!valid(&small));
    }

    #[test]
    fn backing_name_location() {
        let mut h = base();
        h.features = F_BACKING_FILE;
        h.backing_filename_offset = HEADER_LEN as u32;
        h.backing_filename_size = 100;
        assert!(valid(&h));
        // Ending exactly at the end of the header area.
        h.backing_filename_offset = CS - 100;
        assert!(valid(&h));
        let cases = [
            (CS - 99, 100, "one byte past the header area"),
            (CS, 1, "just after the header area"),
            (u32::MAX, u32::MAX, "offset and size at u32::MAX"),
            (0, 10, "over the magic"),
            (HEADER_LEN as u32 - 1, 10, "over the fixed fields"),
            (
                HEADER_LEN as u32,
                MAX_BACKING_NAME + 1,
                "longer than the limit",
            ),
        ];
        for (off, len, what) in cases {
            let mut bad = h.clone();
            bad.backing_filename_offset = off;
            bad.backing_filename_size = len;
            assert!(!valid(&bad), "backing name {what} accepted");
        }
        // Without the feature bit the fields mean nothing and are not checked.
        let mut unused = base();
        unused.backing_filename_offset = u32::MAX;
        unused.backing_filename_size = u32::MAX;
        assert!(valid(&unused));
    }

    #[test]
    fn unknown_features() {
        for bit in 3..64 {
            let mut h = base();
            h.features = 1 << bit;
            assert!(!valid(&h), "incompatible bit {bit} accepted");
        }
        // Compatible and autoclear bits are never a reason to refuse an image.
        let mut h = base();
        h.compat_features = u64::MAX;
        h.autoclear_features = u64::MAX;
        assert!(valid(&h));
    }

    #[test]
    fn validate_never_panics() {
        // Deterministic xorshift over hostile field values (extremes mixed with valid
        // ones): validation must answer, never overflow or panic.
        const U32S: [u32; 8] = [0, 1, 512, 4096, CS, 64 << 20, u32::MAX / 2, u32::MAX];
        const U64S: [u64; 8] = [
            0,
            1,
            512,
            CS as u64,
            1 << 40,
            u64::MAX / 2,
            u64::MAX - 511,
            u64::MAX,
        ];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 8) as usize
        };
        for _ in 0..20_000 {
            let h = Header {
                cluster_size: U32S[next()],
                table_size: [0, 1, 2, 4, 16, 17, 3, u32::MAX][next()],
                header_size: U32S[next()],
                features: next() as u64 & 0x7,
                compat_features: 0,
                autoclear_features: 0,
                l1_table_offset: U64S[next()],
                image_size: U64S[next()],
                backing_filename_offset: U32S[next()],
                backing_filename_size: U32S[next()],
            };
            let _ = h.validate(U64S[next()]);
        }
    }

    fn storage_with_name(h: &Header, name: &[u8]) -> MemStorage {
        let mut v = h.to_bytes().to_vec();
        v.resize(h.header_bytes() as usize, 0);
        let off = h.backing_filename_offset as usize;
        v[off..off + name.len()].copy_from_slice(name);
        MemStorage::from_vec(v)
    }

    #[test]
    fn backing_name_read() {
        let mut h = base();
        assert_eq!(read_backing_name(&MemStorage::new(), &h).unwrap(), None);
        h.features = F_BACKING_FILE;
        h.backing_filename_offset = 1000;
        h.backing_filename_size = 9;
        let s = storage_with_name(&h, b"base.qcow2");
        // Exactly `size` bytes: no NUL terminator is expected or read.
        assert_eq!(
            read_backing_name(&s, &h).unwrap().as_deref(),
            Some("base.qcow")
        );
        h.backing_filename_size = 10;
        assert_eq!(
            read_backing_name(&s, &h).unwrap().as_deref(),
            Some("base.qcow2")
        );
        for bad in [&b"a\0b"[..], &b"\xff\xfe"[..], &b""[..]] {
            h.backing_filename_size = bad.len() as u32;
            let s = storage_with_name(&h, bad);
            assert!(read_backing_name(&s, &h).is_err(), "name {bad:?} accepted");
        }
    }

    #[test]
    fn header_with_name_round_trip() {
        let mut h = base();
        h.features = F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
        let bytes = header_with_name(&mut h, Some("../base image.raw")).unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + 17);
        assert_eq!(&bytes[HEADER_LEN..], b"../base image.raw");
        let back = Header::parse(&bytes).unwrap();
        assert_eq!(back, h);
        // The name bit is set, the raw hint dropped (it is set separately), other
        // features kept.
        assert_eq!(back.features, F_BACKING_FILE | F_NEED_CHECK);
        assert_eq!(back.backing_filename_offset, HEADER_LEN as u32);
        assert_eq!(back.backing_filename_size, 17);
        assert!(valid(&back));
        let s = storage_with_name(&back, b"../base image.raw");
        assert_eq!(
            read_backing_name(&s, &back).unwrap().as_deref(),
            Some("../base image.raw")
        );

        // Removing the name clears every backing field.
        let bytes = header_with_name(&mut h, None).unwrap();
        assert_eq!(bytes.len(), HEADER_LEN);
        let back = Header::parse(&bytes).unwrap();
        assert_eq!(back.features, F_NEED_CHECK);
        assert_eq!(
            (back.backing_filename_offset, back.backing_filename_size),
            (0, 0)
        );
    }

    #[test]
    fn header_with_name_rejects() {
        let mut h = base();
        assert!(header_with_name(&mut h, Some("")).is_err());
        let long = "x".repeat(MAX_BACKING_NAME as usize + 1);
        assert!(header_with_name(&mut h, Some(&long)).is_err());
        // The limit is also the room in the header area.
        let mut small = base();
        small.cluster_size = 4096;
        small.l1_table_offset = 4096;
        let fits = "y".repeat(4096 - HEADER_LEN);
        let mut fits_h = small.clone();
        assert!(header_with_name(&mut fits_h, Some(&fits)).is_ok());
        let too_long = "y".repeat(4096 - HEADER_LEN + 1);
        assert!(header_with_name(&mut small, Some(&too_long)).is_err());
        // A rejected name leaves the header untouched.
        assert_eq!(small.features, 0);
        // An invalid header_size never underflows the room computation.
        let mut zero = base();
        zero.header_size = 0;
        assert!(header_with_name(&mut zero, Some("b")).is_err());
    }
}
