//! The bitmap directory: one variable-length entry per bitmap, each padded to 8 bytes.
//!
//! ```text
//! 0..8    bitmap_table_offset   (cluster aligned, nonzero)
//! 8..12   bitmap_table_size     (entries, 1..=2^27)
//! 12..16  flags                 (bit 0 in_use, 1 auto, 2 extra_data_compatible)
//! 16      type                  (1 = dirty tracking)
//! 17      granularity_bits      (9..=31)
//! 18..20  name_size             (1..=1023)
//! 20..24  extra_data_size
//! 24..    extra data, name (no NUL), zero padding to a multiple of 8
//! ```

use super::table::table_covers;
use crate::error::{Corruption, Field, Problem, Result, Structure};

/// The bitmap is in use (being written, or left inconsistent by a crash).
pub(crate) const FLAG_IN_USE: u32 = 1;
/// The bitmap records guest writes (enabled).
pub(crate) const FLAG_AUTO: u32 = 2;
/// Extra data may be ignored by readers that do not understand it.
pub(crate) const FLAG_EXTRA_COMPAT: u32 = 4;
const RESERVED_FLAGS: u32 = !7;
/// The only bitmap type: dirty tracking.
pub(crate) const TYPE_DIRTY: u8 = 1;
/// QEMU's limit on table entries.
pub(crate) const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// QEMU's limit on a bitmap's data (table entries times the cluster size).
pub(crate) const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// Granularity bounds (log2 of bytes per bit).
pub(crate) const MIN_GRANULARITY_BITS: u8 = 9;
/// Coarsest granularity.
pub(crate) const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest name.
pub(crate) const MAX_NAME: usize = 1023;

/// One decoded directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    /// The name as stored (qemu stores bytes; shown lossily if not UTF-8).
    pub name: Vec<u8>,
    pub extra: Vec<u8>,
}

impl DirEntry {
    /// Bytes of the encoded entry, padding included.
    pub(crate) fn encoded_len(&self) -> usize {
        (24 + self.extra.len() + self.name.len()).div_ceil(8) * 8
    }
    /// The name for display and lookups.
    pub(crate) fn name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
    pub(crate) fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    pub(crate) fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
    /// Extra data that readers must understand to modify the bitmap.
    pub(crate) fn has_unknown_extra(&self) -> bool {
        !self.extra.is_empty() && self.flags & FLAG_EXTRA_COMPAT == 0
    }
    fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.kind);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(&self.name);
        out.resize(start + self.encoded_len(), 0);
    }
}

/// Encodes a directory.
pub(crate) fn encode(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|e| e.encoded_len()).sum());
    for e in entries {
        e.encode_into(&mut out);
    }
    out
}

/// Decodes and validates a directory of `nb` entries (untrusted) for an image with
/// clusters of `cs` bytes, a disk of `disk_size` bytes and a file of `file_len` bytes.
/// `dir_offset` only names the place in errors.
pub(crate) fn parse(
    raw: &[u8],
    nb: u32,
    dir_offset: u64,
    cs: u64,
    disk_size: u64,
    file_len: u64,
) -> Result<Vec<DirEntry>> {
    let mut out = Vec::with_capacity((nb as usize).min(raw.len() / 24));
    let mut pos = 0usize;
    for i in 0..nb {
        let err = |p: Problem, at: usize| -> crate::error::Error {
            Corruption::new(Structure::BitmapDirectory, p)
                .entry(i.into())
                .at(dir_offset + at as u64)
                .into()
        };
        if raw.len() < pos + 24 {
            return Err(err(
                Problem::Truncated {
                    have: Some((raw.len() - pos) as u64),
                    need: 24,
                },
                pos,
            ));
        }
        let b = &raw[pos..];
        let be32 = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        let table_offset = u64::from_be_bytes(a);
        let table_size = be32(8);
        let flags = be32(12);
        let kind = b[16];
        let granularity_bits = b[17];
        let name_size = u16::from_be_bytes([b[18], b[19]]) as usize;
        let extra_size = be32(20) as usize;
        let len = (24usize + extra_size + name_size).div_ceil(8) * 8;
        if extra_size > raw.len() || raw.len() - pos < len {
            return Err(err(
                Problem::PastEnd {
                    bytes: len as u64,
                    end: raw.len() as u64,
                },
                pos,
            ));
        }
        let bad = |field, value: u64| Problem::Invalid { field, value };
        if kind != TYPE_DIRTY {
            return Err(err(bad(Field::Count, kind.into()), pos));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(err(
                Problem::OutOfRange {
                    field: Field::ClusterBits,
                    value: granularity_bits.into(),
                    min: MIN_GRANULARITY_BITS.into(),
                    max: MAX_GRANULARITY_BITS.into(),
                },
                pos,
            ));
        }
        if flags & RESERVED_FLAGS != 0 {
            return Err(err(bad(Field::Count, flags.into()), pos));
        }
        if name_size == 0 || name_size > MAX_NAME {
            return Err(err(
                Problem::OutOfRange {
                    field: Field::Length,
                    value: name_size as u64,
                    min: 1,
                    max: MAX_NAME as u64,
                },
                pos,
            ));
        }
        let ts = u64::from(table_size);
        if ts == 0 || ts > MAX_TABLE_ENTRIES || ts * cs > MAX_PHYS_BYTES {
            return Err(err(
                Problem::OutOfRange {
                    field: Field::Entries,
                    value: ts,
                    min: 1,
                    max: MAX_TABLE_ENTRIES.min(MAX_PHYS_BYTES / cs),
                },
                pos,
            ));
        }
        let entry = Some(u64::from(i));
        crate::format::qcow2::validate_table(
            Structure::BitmapTable,
            entry,
            table_offset,
            ts * 8,
            cs,
            file_len,
        )?;
        if flags & FLAG_IN_USE == 0 && !table_covers(ts, disk_size, granularity_bits.into(), cs) {
            return Err(Corruption::new(
                Structure::BitmapTable,
                Problem::TooSmall {
                    field: Field::Entries,
                    value: ts,
                    min: super::table::table_entries(disk_size, granularity_bits.into(), cs),
                },
            )
            .entry(i.into())
            .at(table_offset)
            .into());
        }
        let extra = b[24..24 + extra_size].to_vec();
        let name = b[24 + extra_size..24 + extra_size + name_size].to_vec();
        out.push(DirEntry {
            table_offset,
            table_size,
            flags,
            kind,
            granularity_bits,
            name,
            extra,
        });
        pos += len;
    }
    if pos != raw.len() {
        return Err(Corruption::new(
            Structure::BitmapDirectory,
            Problem::Invalid {
                field: Field::Length,
                value: raw.len() as u64,
            },
        )
        .at(dir_offset)
        .into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;
    const FL: u64 = 1 << 20;

    /// An entry laid out by hand from the specification.
    fn raw_entry(
        table: u64,
        size: u32,
        flags: u32,
        gran: u8,
        name: &[u8],
        extra: &[u8],
    ) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&table.to_be_bytes());
        v.extend_from_slice(&size.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.push(1);
        v.push(gran);
        v.extend_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        v.extend_from_slice(extra);
        v.extend_from_slice(name);
        while v.len() % 8 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn parses_what_qemu_writes_and_encodes_it_back() {
        // As qemu-img bitmap --add writes it (64 MiB disk, granularity 64 KiB).
        let mut raw = raw_entry(0xa0000, 1, FLAG_AUTO, 16, b"b1", b"");
        raw.extend(raw_entry(
            0xb0000,
            1,
            FLAG_EXTRA_COMPAT,
            17,
            b"second",
            &[9; 3],
        ));
        assert_eq!(raw.len(), 32 + 40);
        let d = parse(&raw, 2, 0x10000, CS, 64 << 20, FL).unwrap();
        assert_eq!(d[0].name(), "b1");
        assert!(d[0].auto() && !d[0].in_use());
        assert_eq!(d[1].granularity_bits, 17);
        assert_eq!(d[1].extra, vec![9; 3]);
        assert!(!d[1].has_unknown_extra());
        assert_eq!(encode(&d), raw);
    }

    #[test]
    fn rejects_bad_entries() {
        let ok = |r: &[u8]| parse(r, 1, 0x10000, CS, 64 << 20, FL);
        assert!(ok(&raw_entry(0xa0000, 1, 0, 16, b"x", b"")).is_ok());
        // Granularity out of range.
        assert!(ok(&raw_entry(0xa0000, 1, 0, 8, b"x", b"")).is_err());
        assert!(ok(&raw_entry(0xa0000, 1, 0, 32, b"x", b"")).is_err());
        // Reserved flags.
        assert!(ok(&raw_entry(0xa0000, 1, 8, 16, b"x", b"")).is_err());
        // Empty name.
        assert!(ok(&raw_entry(0xa0000, 1, 0, 16, b"", b"")).is_err());
        // Table empty, unaligned, past the end of the file.
        assert!(ok(&raw_entry(0xa0000, 0, 0, 16, b"x", b"")).is_err());
        assert!(ok(&raw_entry(0xa0200, 1, 0, 16, b"x", b"")).is_err());
        assert!(ok(&raw_entry(FL, 1, 0, 16, b"x", b"")).is_err());
        assert!(ok(&raw_entry(0, 1, 0, 16, b"x", b"")).is_err());
        // Table too small for the disk, unless in use.
        let big = 1u64 << 40;
        assert!(parse(&raw_entry(0xa0000, 1, 0, 9, b"x", b""), 1, 0, CS, big, FL).is_err());
        assert!(parse(
            &raw_entry(0xa0000, 1, FLAG_IN_USE, 9, b"x", b""),
            1,
            0,
            CS,
            big,
            FL
        )
        .is_ok());
        // Bad type.
        let mut r = raw_entry(0xa0000, 1, 0, 16, b"x", b"");
        r[16] = 2;
        assert!(ok(&r).is_err());
        // Truncated, name past the end, trailing bytes, fewer entries than announced.
        let r = raw_entry(0xa0000, 1, 0, 16, b"abcdefgh", b"");
        assert!(ok(&r[..20]).is_err());
        assert!(ok(&r[..28]).is_err());
        let mut t = r.clone();
        t.extend_from_slice(&[0; 8]);
        assert!(ok(&t).is_err());
        assert!(parse(&r, 2, 0, CS, 64 << 20, FL).is_err());
        // A huge extra data size does not overflow.
        let mut h = raw_entry(0xa0000, 1, 0, 16, b"x", b"");
        h[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(ok(&h).is_err());
    }

    #[test]
    fn unknown_extra_data_is_flagged() {
        let d = parse(
            &raw_entry(0xa0000, 1, 0, 16, b"x", &[1; 8]),
            1,
            0,
            CS,
            64 << 20,
            FL,
        )
        .unwrap();
        assert!(d[0].has_unknown_extra());
    }
}
