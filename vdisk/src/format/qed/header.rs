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
            let room = h.header_bytes() - HEADER_LEN as u64;
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
