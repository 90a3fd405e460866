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
/// Autoclear bits this driver keeps: bitmaps (bit 0, kept exact by the `bitmap` module,
/// which drops the extension itself when the bit was found clear) and raw external data.
pub const AUTOCLEAR_KNOWN: u64 = (1 << 0) | AUTOCLEAR_DATA_FILE_RAW;
/// Autoclear feature: the external data file is a valid raw image (guest offset ==
/// data file offset, every byte the guest reads is the data file's).
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

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
        // Version 2 has no place for these fields: writing them would silently drop them.
        if self.version == 2
            && (self.incompatible | self.compatible | self.autoclear != 0
                || self.refcount_order != 4
                || self.compression_type != 0)
        {
            return Err(Invalid::V2HeaderFields.into());
        }
        if self.version == 3 && !(104..=cs).contains(&(self.header_length as usize)) {
            return Err(Invalid::HeaderLength {
                len: self.header_length.into(),
                cluster_size: cs as u64,
            }
            .into());
        }
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

    /// The external data file name the header extension records (QEMU writes it
    /// without a terminating NUL; one is tolerated).
    pub fn data_file_name(&self) -> Option<String> {
        self.other_exts
            .iter()
            .find(|(t, _)| *t == EXT_DATA_FILE)
            .map(|(_, d)| {
                String::from_utf8_lossy(d)
                    .trim_end_matches('\0')
                    .to_string()
            })
    }

    /// Records (or, with `None`, drops) the external data file name extension.
    pub fn set_data_file_name(&mut self, name: Option<&str>) {
        self.other_exts.retain(|(t, _)| *t != EXT_DATA_FILE);
        if let Some(n) = name {
            // QEMU's position: the data file extension comes first among the others.
            self.other_exts
                .insert(0, (EXT_DATA_FILE, n.as_bytes().to_vec()));
        }
        self.has_data_file_ext = name.is_some();
    }

    /// The feature table QEMU writes for version 3 images.
    pub fn default_features() -> Vec<(u8, u8, String)> {
        QEMU_FEATURES
            .iter()
            .map(|(k, b, n)| (*k, *b, n.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    //! Header and extension round trips on hand-built byte arrays (laid out from the
    //! qcow2 specification, not from `serialize`), and every reject case of `parse`
    //! and `serialize`.

    use super::*;

    /// Appends one header extension (type, length, data padded to 8 bytes).
    fn push_ext(b: &mut Vec<u8>, ty: u32, data: &[u8]) {
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b.resize(b.len().div_ceil(8) * 8, 0);
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// The fixed fields every test image shares (offsets from the spec).
    fn fixed(version: u32, cluster_bits: u32, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[..4].copy_from_slice(b"QFI\xfb");
        put32(&mut b, 4, version);
        put32(&mut b, 20, cluster_bits);
        put64(&mut b, 24, 10 << 30);
        put32(&mut b, 32, 0);
        put32(&mut b, 36, 20);
        put64(&mut b, 40, 0x3_0000);
        put64(&mut b, 48, 0x1_0000);
        put32(&mut b, 56, 1);
        put32(&mut b, 60, 0);
        put64(&mut b, 64, 0);
        b
    }

    /// A minimal version 3 header with 64 KiB clusters and no extensions.
    fn v3_minimal() -> Vec<u8> {
        let mut b = fixed(3, 16, 112);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 112);
        b.extend_from_slice(&[0u8; 8]);
        b
    }

    /// Sets the backing file name fields to `name` placed at the end of `b`.
    fn push_backing(b: &mut Vec<u8>, name: &str) {
        let off = b.len() as u64;
        b.extend_from_slice(name.as_bytes());
        put64(b, 8, off);
        put32(b, 16, name.len() as u32);
    }

    fn feature_table() -> Vec<u8> {
        let mut t = Vec::new();
        for (k, bit, name) in QEMU_FEATURES {
            let mut e = [0u8; 48];
            e[0] = *k;
            e[1] = *bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            t.extend_from_slice(&e);
        }
        t
    }

    /// A version 3 header with every field and extension set, in QEMU's extension order
    /// (so `serialize` must reproduce it byte for byte).
    fn v3_full() -> Vec<u8> {
        let mut b = fixed(3, 16, 112);
        put32(&mut b, 60, 2);
        put64(&mut b, 64, 0x5_0000);
        put64(&mut b, 72, INCOMPAT_COMPRESSION | INCOMPAT_DATA_FILE);
        put64(&mut b, 80, COMPAT_LAZY_REFCOUNTS);
        put64(&mut b, 88, AUTOCLEAR_KNOWN);
        put32(&mut b, 96, 5);
        put32(&mut b, 100, 112);
        b[104] = 1;
        // Padding QEMU leaves zero; whatever is there must survive a rewrite.
        b[105..112].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7]);
        push_ext(&mut b, EXT_BACKING_FORMAT, b"qcow2");
        push_ext(&mut b, EXT_DATA_FILE, b"data.raw");
        push_ext(&mut b, EXT_CRYPTO, &[0xc0; 16]);
        push_ext(&mut b, EXT_FEATURE_TABLE, &feature_table());
        push_ext(&mut b, EXT_BITMAPS, &[0xb1; 24]);
        push_ext(&mut b, 0x1234_5678, &[9, 8, 7, 6, 5]);
        push_ext(&mut b, 0x0bad_cafe, &[]);
        b.extend_from_slice(&[0u8; 8]);
        push_backing(&mut b, "base image.qcow2");
        b
    }

    /// Parses `b` as the start of a file of exactly `b.len()` bytes.
    fn parse(b: &[u8]) -> Result<Header> {
        Header::parse(b, b.len() as u64)
    }

    fn rejected(b: &[u8], what: &str) {
        match parse(b) {
            Ok(h) => panic!("{what}: accepted as {h:?}"),
            Err(e) => assert!(!e.to_string().is_empty(), "{what}: empty message"),
        }
    }

    /// What `v3_full` holds, field by field.
    fn v3_full_expected(backing_file_offset: u64) -> Header {
        Header {
            version: 3,
            backing_file_offset,
            backing_file_size: 16,
            cluster_bits: 16,
            size: 10 << 30,
            crypt_method: 0,
            l1_size: 20,
            l1_table_offset: 0x3_0000,
            refcount_table_offset: 0x1_0000,
            refcount_table_clusters: 1,
            nb_snapshots: 2,
            snapshots_offset: 0x5_0000,
            incompatible: INCOMPAT_COMPRESSION | INCOMPAT_DATA_FILE,
            compatible: COMPAT_LAZY_REFCOUNTS,
            autoclear: AUTOCLEAR_KNOWN,
            refcount_order: 5,
            header_length: 112,
            compression_type: 1,
            tail: vec![1, 2, 3, 4, 5, 6, 7],
            backing_format: Some("qcow2".into()),
            features: Header::default_features(),
            has_data_file_ext: true,
            other_exts: vec![
                (EXT_DATA_FILE, b"data.raw".to_vec()),
                (EXT_CRYPTO, vec![0xc0; 16]),
                (EXT_BITMAPS, vec![0xb1; 24]),
                (0x1234_5678, vec![9, 8, 7, 6, 5]),
                (0x0bad_cafe, Vec::new()),
            ],
            backing_file: Some("base image.qcow2".into()),
        }
    }

    #[test]
    fn v3_full_parses_every_field() {
        let b = v3_full();
        let h = parse(&b).unwrap();
        assert_eq!(h, v3_full_expected(b.len() as u64 - 16));
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.feature_name(0, 3), Some("compression type"));
        assert_eq!(h.feature_name(1, 0), Some("lazy refcounts"));
        assert_eq!(h.feature_name(0, 9), None);
    }

    #[test]
    fn v3_full_serialises_byte_exact() {
        let b = v3_full();
        let mut h = parse(&b).unwrap();
        let parsed = h.clone();
        let out = h.serialize().unwrap();
        assert_eq!(out, b);
        assert_eq!(
            h, parsed,
            "serialize recomputes the same backing name fields"
        );
        assert_eq!(parse(&out).unwrap(), parsed);
    }

    #[test]
    fn v2_round_trip() {
        let mut b = fixed(2, 12, 72);
        put32(&mut b, 60, 1);
        put64(&mut b, 64, 0x4000);
        push_ext(&mut b, EXT_BACKING_FORMAT, b"raw");
        push_ext(&mut b, 0x7777_0001, &[0xaa; 3]);
        b.extend_from_slice(&[0u8; 8]);
        push_backing(&mut b, "../base.raw");
        let mut h = parse(&b).unwrap();
        let want = Header {
            version: 2,
            cluster_bits: 12,
            nb_snapshots: 1,
            snapshots_offset: 0x4000,
            backing_format: Some("raw".into()),
            other_exts: vec![(0x7777_0001, vec![0xaa; 3])],
            features: Vec::new(),
            has_data_file_ext: false,
            backing_file: Some("../base.raw".into()),
            backing_file_offset: b.len() as u64 - 11,
            backing_file_size: 11,
            // Version 2 has none of these version 3 fields: they read as implied.
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            compression_type: 0,
            tail: Vec::new(),
            ..v3_full_expected(0)
        };
        assert_eq!(h, want);
        let parsed = h.clone();
        assert_eq!(h.serialize().unwrap(), b);
        assert_eq!(h, parsed);
    }

    #[test]
    fn v2_without_backing_or_extensions() {
        let mut b = fixed(2, 16, 72);
        b.extend_from_slice(&[0u8; 8]);
        let mut h = parse(&b).unwrap();
        assert_eq!(h.backing_file, None);
        assert_eq!(h.backing_format, None);
        assert!(h.other_exts.is_empty() && h.features.is_empty());
        assert_eq!(h.serialize().unwrap(), b);
        // A file that ends right after the 72 header bytes (no end marker) is fine too.
        assert_eq!(parse(&b[..72]).unwrap(), h);
    }

    #[test]
    fn v3_header_length_104_has_no_compression_type() {
        let mut b = fixed(3, 16, 104);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 104);
        push_ext(&mut b, EXT_BACKING_FORMAT, b"qed");
        b.extend_from_slice(&[0u8; 8]);
        let mut h = parse(&b).unwrap();
        assert_eq!(h.header_length, 104);
        assert_eq!(h.compression_type, 0);
        assert!(h.tail.is_empty());
        assert_eq!(h.backing_format.as_deref(), Some("qed"));
        assert_eq!(h.serialize().unwrap(), b);
    }

    #[test]
    fn longer_v3_header_tail_is_kept() {
        // A future header field QEMU may add lives in the tail: kept verbatim.
        let mut b = fixed(3, 16, 128);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 128);
        for (i, x) in b[105..128].iter_mut().enumerate() {
            *x = i as u8 + 1;
        }
        b.extend_from_slice(&[0u8; 8]);
        let mut h = parse(&b).unwrap();
        assert_eq!(h.tail.len(), 128 - 105);
        assert_eq!(h.tail[0], 1);
        assert_eq!(h.serialize().unwrap(), b);
    }

    #[test]
    fn struct_round_trip_through_bytes() {
        let mut h = parse(&v3_minimal()).unwrap();
        h.backing_file = Some("b".repeat(MAX_BACKING_NAME as usize));
        h.backing_format = Some("qcow2".into());
        h.features = vec![(0, 1, "x".repeat(46)), (2, 7, String::new())];
        h.other_exts = vec![(EXT_BITMAPS, vec![2; 9]), (0x1, vec![1])];
        let out = h.serialize().unwrap();
        let back = parse(&out).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.backing_file_size, MAX_BACKING_NAME);
        // Bitmaps are written before unknown extensions whatever the input order.
        h.other_exts.reverse();
        let back = parse(&h.serialize().unwrap()).unwrap();
        assert_eq!(
            back.other_exts,
            vec![(EXT_BITMAPS, vec![2; 9]), (0x1, vec![1])]
        );
    }

    #[test]
    fn feature_names_are_cut_to_46_bytes() {
        let mut h = parse(&v3_minimal()).unwrap();
        h.features = vec![(0, 0, "n".repeat(60))];
        let back = parse(&h.serialize().unwrap()).unwrap();
        assert_eq!(back.features, vec![(0, 0, "n".repeat(46))]);
    }

    #[test]
    fn feature_table_partial_entry_is_ignored() {
        let mut b = fixed(3, 16, 112);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 112);
        let mut t = feature_table();
        t.truncate(48 * 2 + 20);
        push_ext(&mut b, EXT_FEATURE_TABLE, &t);
        b.extend_from_slice(&[0u8; 8]);
        let h = parse(&b).unwrap();
        assert_eq!(h.features.len(), 2);
        assert_eq!(h.features[1], (0, 1, "corrupt bit".to_string()));
    }

    #[test]
    fn backing_format_trailing_nuls_are_dropped() {
        let mut b = v3_minimal();
        b.truncate(112);
        push_ext(&mut b, EXT_BACKING_FORMAT, b"raw\0\0");
        b.extend_from_slice(&[0u8; 8]);
        assert_eq!(parse(&b).unwrap().backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn bytes_after_the_end_marker_are_not_extensions() {
        let mut b = v3_minimal();
        push_ext(&mut b, 0x1234_5678, &[1; 8]);
        let h = parse(&b).unwrap();
        assert!(h.other_exts.is_empty());
    }

    #[test]
    fn extension_may_end_exactly_at_the_cluster_end() {
        let mut b = fixed(3, 9, 112);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 112);
        push_ext(&mut b, 0x4242_4242, &[7; 512 - 112 - 8]);
        assert_eq!(b.len(), 512);
        let h = parse(&b).unwrap();
        assert_eq!(h.other_exts.len(), 1);
        assert_eq!(h.other_exts[0].1.len(), 512 - 120);
    }

    #[test]
    fn refcount_orders_0_to_6_parse() {
        for order in 0..=6 {
            let mut b = v3_minimal();
            put32(&mut b, 96, order);
            assert_eq!(parse(&b).unwrap().refcount_order, order);
        }
    }

    #[test]
    fn cluster_bits_bounds() {
        for bits in [9, 12, 16, 21] {
            let mut b = v3_minimal();
            put32(&mut b, 20, bits);
            if bits == 9 {
                b.resize(512, 0);
            }
            assert_eq!(parse(&b).unwrap().cluster_bits, bits, "cluster_bits {bits}");
        }
        for bits in [0, 8, 22, 31, 32, 63, 64, u32::MAX] {
            let mut b = v3_minimal();
            put32(&mut b, 20, bits);
            rejected(&b, &format!("cluster_bits {bits}"));
        }
    }

    #[test]
    fn rejects_truncated_headers() {
        let b = v3_minimal();
        for n in [0, 3, 4, 71] {
            rejected(&b[..n], &format!("{n}-byte file"));
        }
        for n in [72, 80, 103] {
            rejected(&b[..n], &format!("{n}-byte v3 header"));
        }
        // header_length says 112 but the file stops before it.
        rejected(&b[..108], "header_length past the end of the file");
    }

    #[test]
    fn rejects_bad_magic() {
        for i in 0..4 {
            let mut b = v3_minimal();
            b[i] ^= 0x20;
            rejected(&b, &format!("magic byte {i} changed"));
        }
    }

    #[test]
    fn rejects_unsupported_versions() {
        for v in [0, 1, 4, 0x0300_0000, u32::MAX] {
            let mut b = v3_minimal();
            put32(&mut b, 4, v);
            let e = parse(&b).unwrap_err();
            assert!(e.to_string().contains(&v.to_string()), "version {v}: {e}");
        }
    }

    #[test]
    fn rejects_header_length_out_of_bounds() {
        for hl in [0, 72, 100, 103] {
            let mut b = v3_minimal();
            put32(&mut b, 100, hl);
            rejected(&b, &format!("header_length {hl}"));
        }
        // Longer than the cluster (512 bytes) even though the file holds it.
        let mut b = fixed(3, 9, 1024);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 520);
        rejected(&b, "header_length past the cluster");
        put32(&mut b, 100, u32::MAX);
        rejected(&b, "header_length u32::MAX");
        // Exactly one cluster is allowed.
        put32(&mut b, 100, 512);
        assert_eq!(parse(&b).unwrap().tail.len(), 512 - 105);
    }

    #[test]
    fn rejects_refcount_order_above_6() {
        for order in [7, 8, 32, u32::MAX] {
            let mut b = v3_minimal();
            put32(&mut b, 96, order);
            rejected(&b, &format!("refcount_order {order}"));
        }
    }

    #[test]
    fn rejects_bad_compression_type() {
        let mut b = v3_minimal();
        b[104] = 1;
        rejected(&b, "zstd without the compression type feature bit");
        put64(&mut b, 72, INCOMPAT_COMPRESSION);
        assert_eq!(parse(&b).unwrap().compression_type, 1);
        for t in [2, 0x80, 0xff] {
            b[104] = t;
            rejected(&b, &format!("compression type {t}"));
        }
    }

    #[test]
    fn rejects_extension_past_the_cluster() {
        for len in [512 - 120 + 1, 4096, u32::MAX] {
            let mut b = fixed(3, 9, 112);
            put32(&mut b, 96, 4);
            put32(&mut b, 100, 112);
            b.extend_from_slice(&0x4242_4242u32.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            b.resize(1024, 0x11);
            rejected(&b, &format!("extension length {len}"));
        }
        // Past the end of a file shorter than the cluster.
        let mut b = v3_minimal();
        b.truncate(112);
        b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b.extend_from_slice(&16u32.to_be_bytes());
        b.extend_from_slice(b"qcow2");
        rejected(&b, "extension past the end of the file");
    }

    #[test]
    fn rejects_extension_running_into_the_backing_name() {
        let mut b = v3_minimal();
        b.truncate(112);
        b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b.extend_from_slice(&16u32.to_be_bytes());
        b.extend_from_slice(b"qcow2\0\0\0");
        push_backing(&mut b, "base.qcow2");
        rejected(&b, "extension overlapping the backing file name");
    }

    #[test]
    fn rejects_backing_name_out_of_bounds() {
        let named = |off: u64, size: u32, len: usize| {
            let mut b = v3_minimal();
            b.resize(len, b'n');
            put64(&mut b, 8, off);
            put32(&mut b, 16, size);
            b
        };
        // Past the 512-byte cluster.
        let mut b = named(500, 20, 1024);
        put32(&mut b, 20, 9);
        rejected(&b, "backing name past the cluster");
        // Past the end of the file.
        rejected(
            &named(120, 20, 130),
            "backing name past the end of the file",
        );
        rejected(&named(120, 0, 1024), "empty backing name");
        rejected(
            &named(120, MAX_BACKING_NAME + 1, 4096),
            "backing name > 1023 bytes",
        );
        rejected(&named(120, u32::MAX, 4096), "backing name u32::MAX bytes");
        rejected(&named(u64::MAX - 2, 10, 4096), "backing offset overflows");
        rejected(
            &named(1 << 40, 10, 4096),
            "backing offset far past the file",
        );
        let b = named(120, MAX_BACKING_NAME, 120 + MAX_BACKING_NAME as usize);
        assert_eq!(parse(&b).unwrap().backing_file.unwrap().len(), 1023);
    }

    #[test]
    fn damaged_headers_never_panic() {
        let b = v3_full();
        for n in 0..b.len() {
            let _ = parse(&b[..n]);
            let _ = Header::parse(&b, n as u64);
        }
        for i in 0..b.len() {
            for x in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut d = b.clone();
                d[i] = x;
                if let Ok(mut h) = parse(&d) {
                    // Whatever parses must serialise without panicking, too.
                    let _ = h.serialize();
                }
            }
        }
    }

    #[test]
    fn serialize_rejects_what_does_not_fit() {
        let mut h = parse(&v3_minimal()).unwrap();
        h.backing_file = Some("b".repeat(MAX_BACKING_NAME as usize + 1));
        assert!(h.serialize().is_err(), "backing name > 1023 bytes");

        let mut b = fixed(3, 9, 112);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 112);
        b.extend_from_slice(&[0u8; 8]);
        let mut h = parse(&b).unwrap();
        h.backing_file = Some("b".repeat(400));
        assert!(
            h.serialize().is_err(),
            "header + name past a 512-byte cluster"
        );
        h.backing_file = Some("b".repeat(512 - 120));
        assert_eq!(
            h.serialize().unwrap().len(),
            512,
            "exactly one cluster fits"
        );
    }

    #[test]
    fn serialize_rejects_v2_with_v3_only_fields() {
        let mut b = fixed(2, 16, 72);
        b.extend_from_slice(&[0u8; 8]);
        let v2 = parse(&b).unwrap();
        type Case = (&'static str, fn(&mut Header));
        let cases: [Case; 5] = [
            ("incompatible bits", |h| h.incompatible = INCOMPAT_DIRTY),
            ("compatible bits", |h| h.compatible = COMPAT_LAZY_REFCOUNTS),
            ("autoclear bits", |h| h.autoclear = AUTOCLEAR_KNOWN),
            ("refcount width", |h| h.refcount_order = 5),
            ("compression type", |h| h.compression_type = 1),
        ];
        for (what, set) in cases {
            let mut h = v2.clone();
            set(&mut h);
            assert!(h.serialize().is_err(), "v2 with {what}");
        }
    }

    #[test]
    fn serialize_rejects_bad_v3_header_length() {
        let v3 = parse(&v3_minimal()).unwrap();
        for hl in [0, 72, 103, 65537] {
            let mut h = v3.clone();
            h.header_length = hl;
            assert!(h.serialize().is_err(), "header_length {hl}");
        }
    }
}
