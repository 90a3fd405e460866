//! Bitmap tables: one 8-byte entry per cluster of bitmap data.
//!
//! Entry: bits 9..=55 the host offset of a data cluster; when they are 0, bit 0 says
//! whether the cluster reads as all ones (1) or all zeroes (0). Bits 1..=8 and 56..=63
//! are reserved; bit 0 is reserved when an offset is present.

use crate::error::{Corruption, Problem, Result, Structure};

/// Offset bits of an entry.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits (bit 0 is reserved only with an offset).
const RESERVED: u64 = 0xff00_0000_0000_01fe;
/// "All ones" flag of an entry without an offset.
const ALL_ONES: u64 = 1;

/// A decoded bitmap table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TableEntry {
    /// The cluster of bits reads as zeroes.
    Zeroes,
    /// The cluster of bits reads as ones.
    Ones,
    /// The bits are in the data cluster at this host offset.
    Data(u64),
}

impl TableEntry {
    /// Decodes entry `index` of the table of bitmap `bitmap` (untrusted): reserved bits,
    /// alignment and the end of the file are checked.
    pub(crate) fn decode(
        raw: u64,
        bitmap: u64,
        index: u64,
        cs: u64,
        file_len: u64,
    ) -> Result<TableEntry> {
        let off = raw & OFFSET_MASK;
        let err = |p| -> crate::error::Error {
            Corruption::new(Structure::BitmapTable, p)
                .entry(bitmap)
                .at(off)
                .into()
        };
        if raw & RESERVED != 0 || (off != 0 && raw & ALL_ONES != 0) {
            return Err(err(Problem::ReservedBits {
                raw,
                guest_cluster: Some(index),
            }));
        }
        if off == 0 {
            return Ok(if raw & ALL_ONES != 0 {
                TableEntry::Ones
            } else {
                TableEntry::Zeroes
            });
        }
        if !off.is_multiple_of(cs) {
            return Err(err(Problem::Unaligned));
        }
        if off
            .checked_add(cs)
            .is_none_or(|e| e > file_len.div_ceil(cs) * cs)
        {
            return Err(err(Problem::PastEnd {
                bytes: cs,
                end: file_len,
            }));
        }
        Ok(TableEntry::Data(off))
    }

    /// The on-disk entry.
    pub(crate) fn encode(self) -> u64 {
        match self {
            TableEntry::Zeroes => 0,
            TableEntry::Ones => ALL_ONES,
            TableEntry::Data(off) => off & OFFSET_MASK,
        }
    }
}

/// Entries a bitmap table needs: one per cluster of bit data, at least one (QEMU
/// refuses an empty table).
pub(crate) fn table_entries(disk_size: u64, granularity_bits: u32, cs: u64) -> u64 {
    let bits = disk_size.div_ceil(1u64 << granularity_bits);
    bits.div_ceil(cs * 8).max(1)
}

/// Whether a table of `entries` entries can hold the bits of a disk of `disk_size`
/// bytes (QEMU's rule for a bitmap that is not in use).
pub(crate) fn table_covers(entries: u64, disk_size: u64, granularity_bits: u32, cs: u64) -> bool {
    let bits = (entries as u128) * (cs as u128) * 8;
    bits << granularity_bits >= disk_size as u128
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;
    const FL: u64 = 1 << 20;

    #[test]
    fn decode_and_encode() {
        assert_eq!(
            TableEntry::decode(0, 0, 0, CS, FL).unwrap(),
            TableEntry::Zeroes
        );
        assert_eq!(
            TableEntry::decode(1, 0, 0, CS, FL).unwrap(),
            TableEntry::Ones
        );
        assert_eq!(
            TableEntry::decode(0x90000, 0, 0, CS, FL).unwrap(),
            TableEntry::Data(0x90000)
        );
        for e in [
            TableEntry::Zeroes,
            TableEntry::Ones,
            TableEntry::Data(0x20000),
        ] {
            assert_eq!(TableEntry::decode(e.encode(), 0, 0, CS, FL).unwrap(), e);
        }
    }

    #[test]
    fn rejects_reserved_unaligned_and_past_end() {
        assert!(TableEntry::decode(0x90001, 0, 0, CS, FL).is_err());
        assert!(TableEntry::decode(0x2, 0, 0, CS, FL).is_err());
        assert!(TableEntry::decode(1 << 63, 0, 0, CS, FL).is_err());
        assert!(TableEntry::decode(0x90200, 0, 0, CS, FL).is_err());
        assert!(TableEntry::decode(FL, 0, 0, CS, FL).is_err());
        let e = TableEntry::decode(0x90200, 3, 5, CS, FL).unwrap_err();
        assert_eq!(e.corruption().unwrap().entry, Some(3));
    }

    #[test]
    fn sizes() {
        // 64 MiB at 64 KiB: 1024 bits, one cluster.
        assert_eq!(table_entries(64 << 20, 16, CS), 1);
        // 1 TiB at 512 bytes: 2^31 bits = 2^28 bytes = 4096 clusters.
        assert_eq!(table_entries(1 << 40, 9, CS), 4096);
        assert_eq!(table_entries(0, 16, CS), 1);
        assert!(table_covers(1, 64 << 20, 16, CS));
        assert!(!table_covers(1, (1u64 << 35) + 1, 16, 512));
    }
}
