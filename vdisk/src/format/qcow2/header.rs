//! The qcow2 header and its extensions: the only place they are parsed and serialised.

use crate::error::{Corruption, Error, Field, Invalid, Problem, Result, Structure, Unsupported};

/// A corruption of the header itself.
fn corrupt(problem: Problem) -> Error {
    Corruption::new(Structure::Qcow2Header, problem).into()
}

/// `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Size of a version 2 header (and of the fixed part of a version 3 header).
pub const V2_HEADER_LEN: usize = 72;
/// Length of the header QEMU 10 writes for version 3 (with compression type + padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Incompatible feature: refcounts may be stale (lazy refcounts in use).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is corrupt; open read-only only.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is meaningful.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible features this driver understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bits this driver keeps (it never modifies bitmaps or an external data file,
/// so the bits QEMU defines stay true... except bitmaps: writes here would make them
/// stale, so only "raw external data" is kept; bitmaps are cleared like unknown bits).
pub const AUTOCLEAR_KNOWN: u64 = 1 << 1;

/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's caps on table sizes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU opens.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most snapshots QEMU opens.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// The feature name table QEMU 10 writes into version 3 images.
pub const QEMU_FEATURES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// An in-memory qcow2 header with its extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored (0 = none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header structure (v3).
    pub header_length: u32,
    /// 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// Header bytes after the compression type up to `header_length`, kept verbatim.
    pub tail: Vec<u8>,
    /// Backing file format extension.
    pub backing_format: Option<String>,
    /// Feature name table entries (type, bit, name).
    pub features: Vec<(u8, u8, String)>,
    /// Whether the image carries an external data file extension.
    pub has_data_file_ext: bool,
    /// Extensions this driver does not interpret (including bitmaps, crypto, data
    /// file name), preserved byte-exact, in order.
    pub other_exts: Vec<(u32, Vec<u8>)>,
    /// The backing file name.
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Name of feature `bit` of `kind` from the feature table, if present.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<&str> {
        self.features
            .iter()
            .find(|(k, b, _)| *k == kind && *b == bit)
            .map(|(_, _, n)| n.as_str())
    }

    /// Parses the header from the first cluster of the file (`head` holds at least the
    /// first `min(file_len, 2 MiB)` bytes; shorter is an error). `file_len` bounds
    /// every offset.
    pub fn parse(head: &[u8], file_len: u64) -> Result<Header> {
        if head.len() < V2_HEADER_LEN {
            return Err(corrupt(Problem::Truncated {
                have: Some(head.len() as u64),
                need: V2_HEADER_LEN as u64,
            }));
        }
        if head[..4] != MAGIC {
            return Err(corrupt(Problem::BadMagic));
        }
        let version = be32(head, 4);
        if version != 2 && version != 3 {
            return Err(Unsupported::Qcow2Version(version).into());
        }
        let cluster_bits = be32(head, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(Problem::Invalid {
                field: Field::ClusterBits,
                value: cluster_bits.into(),
            }));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(head, 8),
            backing_file_size: be32(head, 16),
            cluster_bits,
            size: be64(head, 24),
            crypt_method: be32(head, 32),
            l1_size: be32(head, 36),
            l1_table_offset: be64(head, 40),
            refcount_table_offset: be64(head, 48),
            refcount_table_clusters: be32(head, 56),
            nb_snapshots: be32(head, 60),
            snapshots_offset: be64(head, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
            tail: Vec::new(),
            backing_format: None,
            features: Vec::new(),
            has_data_file_ext: false,
            other_exts: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if head.len() < 104 {
                return Err(corrupt(Problem::Truncated {
                    have: None,
                    need: 104,
                }));
            }
            h.incompatible = be64(head, 72);
            h.compatible = be64(head, 80);
            h.autoclear = be64(head, 88);
            h.refcount_order = be32(head, 96);
            h.header_length = be32(head, 100);
            if h.header_length < 104 {
                return Err(corrupt(Problem::TooSmall {
                    field: Field::HeaderLength,
                    value: h.header_length.into(),
                    min: 104,
                }));
            }
            if u64::from(h.header_length) > cs || h.header_length as usize > head.len() {
                return Err(corrupt(Problem::TooLarge {
                    field: Field::HeaderLength,
                    value: h.header_length.into(),
                    max: cs.min(head.len() as u64),
                }));
            }
            if h.header_length > 104 {
                h.compression_type = head[104];
                h.tail = head[105..h.header_length as usize].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(corrupt(Problem::TooLarge {
                field: Field::RefcountOrder,
                value: h.refcount_order.into(),
                max: 6,
            }));
        }
        if h.version == 2 && h.refcount_order != 4 {
            return Err(corrupt(Problem::Invalid {
                field: Field::RefcountOrder,
                value: h.refcount_order.into(),
            }));
        }
        match (
            h.compression_type,
            h.incompatible & INCOMPAT_COMPRESSION != 0,
        ) {
            (0, _) => {}
            (1, true) => {}
            (1, false) => {
                return Err(corrupt(Problem::Invalid {
                    field: Field::CompressionType,
                    value: 1,
                }))
            }
            (t, _) => return Err(Unsupported::CompressionType(t).into()),
        }
        h.parse_extensions(head)?;
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME || h.backing_file_size == 0 {
                return Err(Corruption::new(
                    Structure::BackingFileName,
                    Problem::TooLarge {
                        field: Field::Length,
                        value: h.backing_file_size.into(),
                        max: MAX_BACKING_NAME.into(),
                    },
                )
                .at(h.backing_file_offset)
                .into());
            }
            let end = h
                .backing_file_offset
                .checked_add(u64::from(h.backing_file_size))
                .filter(|&e| e <= cs && e <= file_len && e as usize <= head.len())
                .ok_or_else(|| {
                    Corruption::new(
                        Structure::BackingFileName,
                        Problem::PastEnd {
                            bytes: h.backing_file_size.into(),
                            end: cs.min(file_len).min(head.len() as u64),
                        },
                    )
                    .at(h.backing_file_offset)
                })?;
            let raw = &head[h.backing_file_offset as usize..end as usize];
            h.backing_file = Some(String::from_utf8_lossy(raw).into_owned());
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, head: &[u8]) -> Result<()> {
        let cs = 1usize << self.cluster_bits;
        let mut off = self.header_length as usize;
        // Extensions end at the backing file name (if it is stored after them) or at the
        // end of cluster 0.
        let mut end = cs.min(head.len());
        if self.backing_file_offset != 0 && (self.backing_file_offset as usize) > off {
            end = end.min(self.backing_file_offset as usize);
        }
        // Each extension takes at least 8 bytes, so this bounds the loop.
        while off + 8 <= end {
            let ty = be32(head, off);
            let len = be32(head, off + 4) as usize;
            off += 8;
            if ty == 0 {
                return Ok(());
            }
            if len > end - off {
                return Err(Corruption::new(
                    Structure::HeaderExtension,
                    Problem::PastEnd {
                        bytes: len as u64,
                        end: end as u64,
                    },
                )
                .entry(ty.into())
                .at((off - 8) as u64)
                .into());
            }
            let data = &head[off..off + len];
            match ty {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(
                        String::from_utf8_lossy(data)
                            .trim_end_matches('\0')
                            .to_string(),
                    );
                }
                EXT_FEATURE_TABLE => {
                    self.features = data
                        .chunks_exact(48)
                        .map(|e| {
                            let name = &e[2..];
                            let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                            (e[0], e[1], String::from_utf8_lossy(&name[..n]).into_owned())
                        })
                        .collect();
                }
                _ => {
                    if ty == EXT_DATA_FILE {
                        self.has_data_file_ext = true;
                    }
                    self.other_exts.push((ty, data.to_vec()));
                }
            }
            off += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Serialises the header, its extensions and the backing file name into cluster 0
    /// (returns the bytes to write at offset 0; never longer than a cluster).
    /// `backing_file_offset`/`backing_file_size` are recomputed.
    pub fn serialize(&mut self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let hl = if self.version == 2 {
            V2_HEADER_LEN
        } else {
            self.header_length as usize
        };
        let mut b = vec![0u8; hl];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if hl > 104 {
                b[104] = self.compression_type;
                let n = self.tail.len().min(hl - 105);
                b[105..105 + n].copy_from_slice(&self.tail[..n]);
            }
        }
        let ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        // QEMU order: data file, crypto, feature table, bitmaps, then unknown ones.
        for (ty, d) in self.other_exts.iter().filter(|(t, _)| *t == EXT_DATA_FILE) {
            ext(&mut b, *ty, d);
        }
        for (ty, d) in self.other_exts.iter().filter(|(t, _)| *t == EXT_CRYPTO) {
            ext(&mut b, *ty, d);
        }
        if !self.features.is_empty() {
            let mut t = Vec::with_capacity(self.features.len() * 48);
            for (k, bit, name) in &self.features {
                let mut e = [0u8; 48];
                e[0] = *k;
                e[1] = *bit;
                let n = name.len().min(46);
                e[2..2 + n].copy_from_slice(&name.as_bytes()[..n]);
                t.extend_from_slice(&e);
            }
            ext(&mut b, EXT_FEATURE_TABLE, &t);
        }
        for (ty, d) in self.other_exts.iter().filter(|(t, _)| *t == EXT_BITMAPS) {
            ext(&mut b, *ty, d);
        }
        for (ty, d) in self
            .other_exts
            .iter()
            .filter(|(t, _)| ![EXT_DATA_FILE, EXT_CRYPTO, EXT_BITMAPS].contains(t))
        {
            ext(&mut b, *ty, d);
        }
        b.extend_from_slice(&[0u8; 8]);
        match &self.backing_file {
            Some(name) => {
                if name.len() > MAX_BACKING_NAME as usize {
                    return Err(Invalid::BackingNameTooLong {
                        len: name.len() as u64,
                        max: MAX_BACKING_NAME.into(),
                    }
                    .into());
                }
                self.backing_file_offset = b.len() as u64;
                self.backing_file_size = name.len() as u32;
                b.extend_from_slice(name.as_bytes());
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        if b.len() > cs {
            return Err(Invalid::HeaderTooLarge {
                bytes: b.len() as u64,
                cluster_size: cs as u64,
            }
            .into());
        }
        Ok(b)
    }

    /// The feature table QEMU writes for version 3 images.
    pub fn default_features() -> Vec<(u8, u8, String)> {
        QEMU_FEATURES
            .iter()
            .map(|(k, b, n)| (*k, *b, n.to_string()))
            .collect()
    }
}
