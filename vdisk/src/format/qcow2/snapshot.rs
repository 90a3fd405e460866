//! The snapshot table: decoding every field of every entry, and encoding a table back
//! (entries read from the image are written back byte for byte, unknown extra data
//! included; new entries are encoded as QEMU 10 writes them). Creating, applying and
//! deleting snapshots is in `snapshot_ops`.

use super::header::{Header, MAX_L1_BYTES, MAX_SNAPSHOTS};
use super::{validate_table, Geom};
use crate::error::{Corruption, Field, Problem, Result, Structure};
use crate::format::SnapshotInfo;
use crate::storage::Storage;

/// Largest snapshot table QEMU accepts.
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
/// Largest extra data per snapshot QEMU accepts.
const MAX_EXTRA: u32 = 1024;

/// Longest ID QEMU keeps (its `id_str` buffer holds 128 bytes with the NUL).
const MAX_ID_LEN: usize = 127;
/// Longest name QEMU keeps (its `name` buffer holds 256 bytes with the NUL).
const MAX_NAME_LEN: usize = 255;

/// One snapshot's table entry: what refcounting needs, and what `info` lists.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Entries of that L1 table.
    pub l1_size: u32,
    /// ID, name, dates and sizes.
    pub info: SnapshotInfo,
    /// Guest size when the snapshot was taken (extra data; `None` when the entry is
    /// too short to hold it, as in old v2 images).
    pub disk_size: Option<u64>,
    /// The entry exactly as stored (fixed part, extra data, ID, name; no padding):
    /// written back unchanged when the table is rewritten.
    pub raw: Vec<u8>,
}

/// Bytes of the fixed part of a table entry.
pub(crate) const ENTRY_HEADER: usize = 40;
/// Extra data QEMU 10 writes: 64-bit VM state size, disk size, instruction count.
pub(crate) const EXTRA_V3: usize = 24;

/// A new snapshot entry, as QEMU 10 encodes it: 24 bytes of extra data (VM state
/// size, disk size, instruction count; `None` is stored as all ones), ID and name not
/// NUL-terminated. Lengths must already be bounded (the ID and name by the caller).
pub(crate) fn encode_entry(
    l1_offset: u64,
    l1_size: u32,
    info: &SnapshotInfo,
    id: &[u8],
    name: &[u8],
    disk_size: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(ENTRY_HEADER + EXTRA_V3 + id.len() + name.len());
    b.extend_from_slice(&l1_offset.to_be_bytes());
    b.extend_from_slice(&l1_size.to_be_bytes());
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(&(info.date_sec as u32).to_be_bytes());
    b.extend_from_slice(&info.date_nsec.to_be_bytes());
    b.extend_from_slice(&info.vm_clock_nsec.to_be_bytes());
    // The 32-bit field holds the size when it fits, else 0 (the 64-bit one is used).
    let small = u32::try_from(info.vm_state_size).unwrap_or(0);
    b.extend_from_slice(&small.to_be_bytes());
    b.extend_from_slice(&(EXTRA_V3 as u32).to_be_bytes());
    b.extend_from_slice(&info.vm_state_size.to_be_bytes());
    b.extend_from_slice(&disk_size.to_be_bytes());
    b.extend_from_slice(&info.icount.unwrap_or(u64::MAX).to_be_bytes());
    b.extend_from_slice(id);
    b.extend_from_slice(name);
    b
}

/// Decodes one entry produced by [`encode_entry`] (or read from a file) into a
/// [`Snapshot`]: the same decoder `read_table` uses.
pub(crate) fn decode_entry(raw: Vec<u8>) -> Option<Snapshot> {
    let h: [u8; ENTRY_HEADER] = raw.get(..ENTRY_HEADER)?.try_into().ok()?;
    let id_len = u16::from_be_bytes([h[12], h[13]]) as usize;
    let name_len = u16::from_be_bytes([h[14], h[15]]) as usize;
    let extra = u32::from_be_bytes([h[36], h[37], h[38], h[39]]) as usize;
    let var = raw.get(ENTRY_HEADER..)?;
    if var.len() != extra + id_len + name_len {
        return None;
    }
    let info = decode_info(&h, var, extra, id_len);
    Some(Snapshot {
        l1_offset: u64::from_be_bytes(h[0..8].try_into().ok()?),
        l1_size: u32::from_be_bytes(h[8..12].try_into().ok()?),
        info,
        disk_size: be64_at(&var[..extra], 8),
        raw,
    })
}

/// The whole table: every entry (as stored), each padded to 8 bytes. The table's
/// length is the unpadded end of the last entry, as QEMU counts it.
pub(crate) fn encode_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        b.resize(b.len().div_ceil(8) * 8, 0);
        b.extend_from_slice(&s.raw);
    }
    b
}

/// A snapshot's ID or name as QEMU shows it: cut at the first NUL and to QEMU's
/// buffer size (bytes that are not UTF-8 are replaced).
fn text(b: &[u8], max: usize) -> String {
    let b = &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())];
    String::from_utf8_lossy(&b[..b.len().min(max)]).into_owned()
}

fn be64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes the fixed 40-byte entry header `h` and the `var` bytes after it
/// (extra data, ID, name).
fn decode_info(h: &[u8; 40], var: &[u8], extra: usize, id_len: usize) -> SnapshotInfo {
    let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let ex = &var[..extra];
    // Version 3 extra data: 64-bit VM state size, disk size, instruction count. A
    // field counts only when the extra data covers it whole; an all-ones icount means
    // none was recorded.
    SnapshotInfo {
        id: text(&var[extra..extra + id_len], MAX_ID_LEN),
        name: text(&var[extra + id_len..], MAX_NAME_LEN),
        vm_state_size: be64_at(ex, 0).unwrap_or(u64::from(be32(32))),
        date_sec: u64::from(be32(16)),
        date_nsec: be32(20),
        vm_clock_nsec: be64_at(&h[..], 24).unwrap_or(0),
        icount: be64_at(ex, 16).filter(|&c| c != u64::MAX),
    }
}

/// Reads and validates the snapshot table. Returns the entries and sets nothing else.
pub(crate) fn read_table(
    st: &dyn Storage,
    hdr: &Header,
    g: &Geom,
    file_len: u64,
) -> Result<Vec<Snapshot>> {
    if hdr.nb_snapshots > MAX_SNAPSHOTS {
        return Err(Corruption::new(
            Structure::SnapshotTable,
            Problem::TooLarge {
                field: Field::Count,
                value: hdr.nb_snapshots.into(),
                max: MAX_SNAPSHOTS.into(),
            },
        )
        .into());
    }
    if hdr.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    validate_table(
        Structure::SnapshotTable,
        None,
        hdr.snapshots_offset,
        40,
        g.cs,
        file_len,
    )?;
    let mut v = Vec::with_capacity(hdr.nb_snapshots as usize);
    let mut pos = hdr.snapshots_offset;
    for i in 0..hdr.nb_snapshots {
        let mut h = [0u8; 40];
        if pos + 40 > file_len || pos + 40 - hdr.snapshots_offset > MAX_SNAPSHOT_TABLE {
            return Err(Corruption::new(
                Structure::SnapshotTable,
                Problem::PastEnd {
                    bytes: 40,
                    end: file_len.min(hdr.snapshots_offset + MAX_SNAPSHOT_TABLE),
                },
            )
            .entry(i.into())
            .at(pos)
            .into());
        }
        st.read_at(&mut h, pos)?;
        let l1_offset = u64::from_be_bytes(h[0..8].try_into().unwrap_or([0; 8]));
        let l1_size = u32::from_be_bytes(h[8..12].try_into().unwrap_or([0; 4]));
        let id_len = u16::from_be_bytes([h[12], h[13]]) as u64;
        let name_len = u16::from_be_bytes([h[14], h[15]]) as u64;
        let extra = u32::from_be_bytes(h[36..40].try_into().unwrap_or([0; 4]));
        if extra > MAX_EXTRA {
            return Err(Corruption::new(
                Structure::SnapshotTable,
                Problem::TooLarge {
                    field: Field::Length,
                    value: extra.into(),
                    max: MAX_EXTRA.into(),
                },
            )
            .entry(i.into())
            .into());
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(Corruption::new(
                Structure::SnapshotL1Table,
                Problem::TooLarge {
                    field: Field::Entries,
                    value: l1_size.into(),
                    max: MAX_L1_BYTES / 8,
                },
            )
            .entry(i.into())
            .at(l1_offset)
            .into());
        }
        validate_table(
            Structure::SnapshotL1Table,
            Some(i.into()),
            l1_offset,
            u64::from(l1_size) * 8,
            g.cs,
            file_len,
        )?;
        let var_len = u64::from(extra) + id_len + name_len;
        if pos + 40 + var_len > file_len {
            return Err(Corruption::new(
                Structure::SnapshotTable,
                Problem::PastEnd {
                    bytes: 40 + var_len,
                    end: file_len,
                },
            )
            .entry(i.into())
            .into());
        }
        // Bounded: extra <= 1 KiB and each length < 64 KiB.
        let mut var = vec![0u8; var_len as usize];
        st.read_at(&mut var, pos + 40)?;
        let info = decode_info(&h, &var, extra as usize, id_len as usize);
        pos = (pos + 40 + var_len).div_ceil(8) * 8;
        let disk_size = be64_at(&var[..extra as usize], 8);
        let mut raw = h.to_vec();
        raw.extend_from_slice(&var);
        v.push(Snapshot {
            l1_offset,
            l1_size,
            info,
            disk_size,
            raw,
        });
    }
    if pos - hdr.snapshots_offset > MAX_SNAPSHOT_TABLE {
        return Err(Corruption::new(
            Structure::SnapshotTable,
            Problem::TooLarge {
                field: Field::Length,
                value: pos - hdr.snapshots_offset,
                max: MAX_SNAPSHOT_TABLE,
            },
        )
        .at(hdr.snapshots_offset)
        .into());
    }
    Ok(v)
}

/// Size in bytes of the snapshot table (for refcounting its clusters).
pub(crate) fn table_len(st: &dyn Storage, hdr: &Header) -> Result<u64> {
    let mut pos = hdr.snapshots_offset;
    for _ in 0..hdr.nb_snapshots.min(MAX_SNAPSHOTS) {
        let mut h = [0u8; 40];
        st.read_at(&mut h, pos)?;
        let id_len = u16::from_be_bytes([h[12], h[13]]) as u64;
        let name_len = u16::from_be_bytes([h[14], h[15]]) as u64;
        let extra = u64::from(u32::from_be_bytes(h[36..40].try_into().unwrap_or([0; 4])));
        pos = (pos + 40 + extra.min(u64::from(MAX_EXTRA)) + id_len + name_len).div_ceil(8) * 8;
    }
    Ok(pos - hdr.snapshots_offset)
}

#[cfg(test)]
mod tests {
    //! Snapshot table decoding on hand-built tables laid out from the qcow2
    //! specification, every reject case of `read_table`, and the encoder (new
    //! entries, and existing ones written back byte for byte).

    use super::*;
    use crate::storage::MemStorage;

    const CS: u64 = 512;
    /// Where the tests put the snapshot table, and a snapshot L1 table.
    const TABLE: u64 = 4 * CS;
    const L1: u64 = 2 * CS;

    /// One table entry as the spec lays it out, padded to 8 bytes.
    struct Entry<'a> {
        l1_offset: u64,
        l1_size: u32,
        id: &'a [u8],
        name: &'a [u8],
        date_sec: u32,
        date_nsec: u32,
        vm_clock_nsec: u64,
        vm_state_size: u32,
        extra: Vec<u8>,
    }

    impl Entry<'_> {
        fn new() -> Self {
            Entry {
                l1_offset: L1,
                l1_size: 2,
                id: b"1",
                name: b"snap",
                date_sec: 1_700_000_000,
                date_nsec: 123_456_789,
                vm_clock_nsec: 0x1122_3344_5566_7788,
                vm_state_size: 0,
                extra: Vec::new(),
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(&self.l1_offset.to_be_bytes());
            b.extend_from_slice(&self.l1_size.to_be_bytes());
            b.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
            b.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
            b.extend_from_slice(&self.date_sec.to_be_bytes());
            b.extend_from_slice(&self.date_nsec.to_be_bytes());
            b.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
            b.extend_from_slice(&self.vm_state_size.to_be_bytes());
            b.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
            assert_eq!(b.len(), 40);
            b.extend_from_slice(&self.extra);
            b.extend_from_slice(self.id);
            b.extend_from_slice(self.name);
            b.resize(b.len().div_ceil(8) * 8, 0);
            b
        }
    }

    /// Version 3 extra data: large VM state size, disk size, instruction count.
    fn extra(vm_state: u64, disk_size: u64, icount: u64) -> Vec<u8> {
        [vm_state, disk_size, icount]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect()
    }

    /// A header announcing `n` snapshots at `offset`.
    fn header(n: u32, offset: u64) -> Header {
        let mut b = vec![0u8; 112];
        b[..4].copy_from_slice(b"QFI\xfb");
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&9u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        let mut h = Header::parse(&b, b.len() as u64).unwrap();
        h.nb_snapshots = n;
        h.snapshots_offset = offset;
        h
    }

    /// A file holding `table` at `TABLE` (and zeroes up to `len` at least).
    fn file(table: &[u8], len: u64) -> MemStorage {
        let mut v = vec![0u8; (TABLE as usize + table.len()).max(len as usize)];
        v[TABLE as usize..TABLE as usize + table.len()].copy_from_slice(table);
        MemStorage::from_vec(v)
    }

    /// Reads a table of `n` entries from `table` placed at `TABLE` in a file of the
    /// table's own end (or `len`, when larger).
    fn read(table: &[u8], n: u32, len: u64) -> Result<Vec<Snapshot>> {
        let st = file(table, len);
        let file_len = st.len()?;
        read_table(&st, &header(n, TABLE), &Geom::new(9, 4, 3, false), file_len)
    }

    fn rejected(table: &[u8], n: u32, what: &str) {
        match read(table, n, 0) {
            Ok(v) => panic!("{what}: accepted as {v:?}"),
            Err(e) => assert!(!e.to_string().is_empty(), "{what}: empty message"),
        }
    }

    #[test]
    fn decodes_every_field_of_a_version_3_entry() {
        let mut e = Entry::new();
        e.id = b"42";
        e.name = b"before upgrade";
        e.vm_state_size = 7;
        e.extra = extra(0x1_0000_0000, 10 << 30, 123_456);
        let v = read(&e.bytes(), 1, 0).unwrap();
        assert_eq!(v.len(), 1);
        let s = &v[0];
        assert_eq!(s.l1_offset, L1);
        assert_eq!(s.l1_size, 2);
        let i = &s.info;
        assert_eq!(i.id, "42");
        assert_eq!(i.name, "before upgrade");
        assert_eq!(i.date_sec, 1_700_000_000);
        assert_eq!(i.date_nsec, 123_456_789);
        assert_eq!(i.vm_clock_nsec, 0x1122_3344_5566_7788);
        // The 64-bit size in the extra data wins over the 32-bit field.
        assert_eq!(i.vm_state_size, 0x1_0000_0000);
        assert_eq!(i.icount, Some(123_456));
    }

    #[test]
    fn extra_data_fields_count_only_when_whole() {
        let full = extra(0x2_0000_0000, 1 << 30, 99);
        // (extra bytes, vm_state_size, icount)
        let cases: [(usize, u64, Option<u64>); 6] = [
            (0, 7, None),
            (7, 7, None),
            (8, 0x2_0000_0000, None),
            (16, 0x2_0000_0000, None),
            (23, 0x2_0000_0000, None),
            (24, 0x2_0000_0000, Some(99)),
        ];
        for (n, vm_state, icount) in cases {
            let mut e = Entry::new();
            e.vm_state_size = 7;
            e.extra = full[..n].to_vec();
            let v = read(&e.bytes(), 1, 0).unwrap();
            assert_eq!(v[0].info.vm_state_size, vm_state, "{n} extra bytes");
            assert_eq!(v[0].info.icount, icount, "{n} extra bytes");
            assert_eq!(v[0].info.name, "snap", "{n} extra bytes");
        }
    }

    #[test]
    fn all_ones_icount_means_none_recorded() {
        let mut e = Entry::new();
        e.extra = extra(0, 0, u64::MAX);
        assert_eq!(read(&e.bytes(), 1, 0).unwrap()[0].info.icount, None);
    }

    #[test]
    fn largest_extra_data_is_accepted_and_skipped() {
        let mut e = Entry::new();
        e.extra = extra(5, 6, 7);
        e.extra.resize(MAX_EXTRA as usize, 0xee);
        let v = read(&e.bytes(), 1, 0).unwrap();
        assert_eq!(v[0].info.vm_state_size, 5);
        assert_eq!(v[0].info.id, "1");
        assert_eq!(v[0].info.name, "snap");
    }

    #[test]
    fn entries_follow_each_other_8_byte_aligned() {
        let names: [&[u8]; 3] = [b"a", b"second one", b"third-snapshot-name"];
        let ids: Vec<Vec<u8>> = (1..=3).map(|k: u32| k.to_string().into_bytes()).collect();
        let mut table = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let mut e = Entry::new();
            e.id = &ids[k];
            e.name = name;
            e.extra = extra(k as u64, 0, u64::MAX)[..8 * (k + 1)].to_vec();
            table.extend_from_slice(&e.bytes());
        }
        let v = read(&table, 3, 0).unwrap();
        for (k, s) in v.iter().enumerate() {
            assert_eq!(s.info.id, format!("{}", k + 1));
            assert_eq!(s.info.name.as_bytes(), names[k]);
            assert_eq!(s.info.vm_state_size, k as u64);
        }
        let st = file(&table, 0);
        assert_eq!(
            table_len(&st, &header(3, TABLE)).unwrap(),
            table.len() as u64
        );
        assert_eq!(table_len(&st, &header(0, TABLE)).unwrap(), 0);
    }

    #[test]
    fn id_and_name_are_cut_like_qemu() {
        let long_id = vec![b'i'; 200];
        let long_name = vec![b'n'; 300];
        let mut e = Entry::new();
        e.id = &long_id;
        e.name = &long_name;
        let s = &read(&e.bytes(), 1, 0).unwrap()[0];
        assert_eq!(s.info.id, "i".repeat(MAX_ID_LEN));
        assert_eq!(s.info.name, "n".repeat(MAX_NAME_LEN));

        let mut e = Entry::new();
        e.id = b"7\0junk";
        e.name = b"\xffname\0rest";
        let s = &read(&e.bytes(), 1, 0).unwrap()[0];
        assert_eq!(s.info.id, "7");
        assert_eq!(s.info.name, "\u{fffd}name");

        let mut e = Entry::new();
        e.id = b"";
        e.name = b"";
        let s = &read(&e.bytes(), 1, 0).unwrap()[0];
        assert_eq!((s.info.id.as_str(), s.info.name.as_str()), ("", ""));
    }

    #[test]
    fn empty_l1_table_may_sit_at_offset_0() {
        let mut e = Entry::new();
        e.l1_offset = 0;
        e.l1_size = 0;
        assert_eq!(read(&e.bytes(), 1, 0).unwrap()[0].l1_size, 0);
    }

    #[test]
    fn no_snapshots_reads_nothing() {
        // Even with a nonsensical offset: it is never looked at.
        let st = MemStorage::new();
        let g = Geom::new(9, 4, 3, false);
        assert!(read_table(&st, &header(0, 3), &g, 0).unwrap().is_empty());
    }

    #[test]
    fn rejects_too_many_snapshots() {
        let st = MemStorage::new();
        let g = Geom::new(9, 4, 3, false);
        let h = header(MAX_SNAPSHOTS + 1, TABLE);
        assert!(read_table(&st, &h, &g, 1 << 40).is_err());
        let h = header(u32::MAX, TABLE);
        assert!(read_table(&st, &h, &g, 1 << 40).is_err());
    }

    #[test]
    fn rejects_a_misplaced_table() {
        let e = Entry::new().bytes();
        let st = file(&e, 0);
        let len = st.len().unwrap();
        let g = Geom::new(9, 4, 3, false);
        for (off, what) in [
            (TABLE + 8, "unaligned table"),
            (0, "table over the header"),
            (len, "table at the end of the file"),
            (len.div_ceil(CS) * CS + CS, "table past the end of the file"),
            (!(CS - 1), "table at the largest offset"),
        ] {
            assert!(read_table(&st, &header(1, off), &g, len).is_err(), "{what}");
        }
    }

    #[test]
    fn rejects_truncated_entries() {
        let e = Entry::new().bytes();
        // The file ends inside the fixed part of the entry.
        rejected(&e[..39], 1, "truncated fixed part");
        // ... or inside its ID and name.
        rejected(&e[..44], 1, "truncated name");
        // The second entry is announced but the file ends inside it.
        let mut two = e.clone();
        two.extend_from_slice(&e[..20]);
        rejected(&two, 2, "second entry truncated");
        rejected(&e, 2, "second entry missing");
        assert_eq!(read(&e, 1, 0).unwrap().len(), 1);
    }

    #[test]
    fn rejects_id_and_name_past_the_end() {
        for (at, what) in [(12, "id length"), (14, "name length")] {
            let mut b = Entry::new().bytes();
            b[at..at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
            rejected(&b, 1, what);
        }
    }

    #[test]
    fn rejects_too_much_extra_data() {
        for n in [MAX_EXTRA + 1, 1 << 20, u32::MAX] {
            let mut b = Entry::new().bytes();
            b[36..40].copy_from_slice(&n.to_be_bytes());
            b.resize(b.len() + 2048, 0);
            rejected(&b, 1, &format!("{n} bytes of extra data"));
        }
    }

    #[test]
    fn rejects_a_bad_snapshot_l1_table() {
        let cases: [(u64, u32, &str); 6] = [
            (L1 + 8, 2, "unaligned L1 offset"),
            (L1 + 1, 2, "odd L1 offset"),
            (0, 2, "L1 table over the header"),
            (64 * CS, 2, "L1 table past the end of the file"),
            (L1, (MAX_L1_BYTES / 8) as u32 + 1, "L1 table above 32 MiB"),
            (!(CS - 1), 1, "L1 offset overflows"),
        ];
        for (l1_offset, l1_size, what) in cases {
            let mut e = Entry::new();
            e.l1_offset = l1_offset;
            e.l1_size = l1_size;
            rejected(&e.bytes(), 1, what);
        }
    }

    #[test]
    fn rejects_a_table_above_64_mib() {
        // Each entry carries the longest ID and name (about 128 KiB), so the entry
        // after the 64 MiB mark is refused even though the file holds it.
        let long = vec![b'x'; u16::MAX as usize];
        let mut e = Entry::new();
        e.id = &long;
        e.name = &long;
        let one = e.bytes();
        let n = (MAX_SNAPSHOT_TABLE / one.len() as u64 + 2) as u32;
        let mut table = Vec::with_capacity(one.len() * n as usize);
        for _ in 0..n {
            table.extend_from_slice(&one);
        }
        rejected(&table, n, "table above 64 MiB");
        let fits = (MAX_SNAPSHOT_TABLE / one.len() as u64) as u32;
        assert_eq!(read(&table, fits, 0).unwrap().len(), fits as usize);
    }

    #[test]
    fn damaged_entries_never_panic() {
        let mut e = Entry::new();
        e.extra = extra(1, 2, 3);
        let mut two = e.bytes();
        two.extend_from_slice(&Entry::new().bytes());
        for i in 0..two.len() {
            for x in [0x00, 0x01, 0x80, 0xff] {
                let mut d = two.clone();
                d[i] = x;
                let _ = read(&d, 2, 0);
                let st = file(&d, 0);
                let _ = table_len(&st, &header(2, TABLE));
            }
        }
    }

    #[test]
    fn encodes_a_new_entry_as_the_spec_lays_it_out() {
        let info = SnapshotInfo {
            id: "3".into(),
            name: "before".into(),
            vm_state_size: 0,
            date_sec: 1_796_303_804,
            date_nsec: 754_739_000,
            vm_clock_nsec: 0,
            icount: Some(0),
        };
        let b = encode_entry(0x15000, 1, &info, b"3", b"before", 1 << 20);
        let mut e = Entry::new();
        e.l1_offset = 0x15000;
        e.l1_size = 1;
        e.id = b"3";
        e.name = b"before";
        e.date_sec = 1_796_303_804;
        e.date_nsec = 754_739_000;
        e.vm_clock_nsec = 0;
        e.extra = extra(0, 1 << 20, 0);
        let want = e.bytes();
        assert_eq!(b[..], want[..b.len()]);
        assert_eq!(b.len(), 40 + 24 + 1 + 6);
        let s = decode_entry(b.clone()).unwrap();
        assert_eq!(s.info, info);
        assert_eq!(s.disk_size, Some(1 << 20));
        assert_eq!((s.l1_offset, s.l1_size), (0x15000, 1));
        // A large VM state: the 32-bit field is 0, the 64-bit one holds it; no
        // instruction count is stored as all ones.
        let big = SnapshotInfo {
            vm_state_size: 5 << 32,
            icount: None,
            ..info
        };
        let b = encode_entry(0x15000, 1, &big, b"3", b"before", 0);
        assert_eq!(b[32..36], [0; 4]);
        assert_eq!(b[40..48], (5u64 << 32).to_be_bytes());
        assert_eq!(b[56..64], [0xff; 8]);
        assert_eq!(decode_entry(b).unwrap().info, big);
        assert!(decode_entry(vec![0; 39]).is_none());
    }

    #[test]
    fn rewritten_tables_keep_every_byte_of_existing_entries() {
        // Unknown extra data past the 24 bytes QEMU knows, a name with a NUL and
        // bytes that are not UTF-8, a short v2-style entry without extra data.
        let mut a = Entry::new();
        a.extra = extra(1, 2 << 20, 3);
        a.extra.extend_from_slice(b"future-field-xyz");
        a.name = b"n\0\xff";
        let mut b = Entry::new();
        b.id = b"2";
        b.extra = Vec::new();
        let mut table = a.bytes();
        table.extend_from_slice(&b.bytes());
        let v = read(&table, 2, 0).unwrap();
        assert_eq!(v[0].disk_size, Some(2 << 20));
        assert_eq!(v[1].disk_size, None);
        let out = encode_table(&v);
        // The table ends at the unpadded end of the last entry.
        assert_eq!(out[..], table[..out.len()]);
        assert_eq!(out.len(), table.len() - (table.len() - out.len()));
        assert!(table[out.len()..].iter().all(|&x| x == 0));
        assert!(encode_table(&[]).is_empty());
    }
}
