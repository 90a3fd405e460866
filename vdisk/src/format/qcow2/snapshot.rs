//! The snapshot table (read only: snapshots are not created here, but their L1 tables
//! count in refcounts and their clusters must be copied before writing).

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
        v.push(Snapshot {
            l1_offset,
            l1_size,
            info,
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
