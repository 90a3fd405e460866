//! The VHDX log (MS-VHDX 2.3): a circular buffer of entries, each a 64-byte header
//! (`loge`, CRC-32C over the whole entry, entry length, tail, sequence number,
//! descriptor count, log GUID, flushed and last file offsets) with 32-byte descriptors
//! (`zero`: length and file offset; `desc`: trailing 4 and leading 8 bytes of one
//! 4 KiB sector, its file offset) padded to 4 KiB, then one 4 KiB data sector (`data`,
//! high and low halves of the sequence number around 4084 bytes) per data descriptor.
//!
//! Replay (MS-VHDX 2.3.3): find the active sequence (valid entries of this log GUID,
//! consecutive sequence numbers, each following the previous one in the buffer; the one
//! whose head has the highest sequence number, starting at its head's tail), write
//! every descriptor of its entries in order, grow the file to the head's last file
//! offset, flush; then the caller clears the log GUID in the headers.

use super::header::{checksum_ok, guid_at, le32, le64, seal};
use crate::error::{Corruption, Problem, Result, Structure, VhdxProblem};
use crate::storage::Storage;

/// Log sector size.
pub const SECTOR: u64 = 4096;
/// Most entries of one sequence replayed (bounds work on a hostile log).
const MAX_SEQUENCE: usize = 1 << 16;

/// One descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// Zero `len` bytes at `offset`.
    Zero {
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// One 4 KiB sector at `offset`.
    Data {
        /// File offset.
        offset: u64,
        /// Its bytes.
        sector: Box<[u8; 4096]>,
    },
}

/// A decoded log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Where it starts in the log.
    pub at: u64,
    /// Bytes.
    pub len: u64,
    /// Offset (in the log) of the oldest entry still needed.
    pub tail: u64,
    /// Sequence number.
    pub sequence: u64,
    /// The file must be at least this long after replay.
    pub last_file_offset: u64,
    /// What to write.
    pub descriptors: Vec<Descriptor>,
}

fn bad(p: VhdxProblem) -> crate::Error {
    Corruption::new(Structure::VhdxLog, Problem::Vhdx(p)).into()
}

/// Reads `n` bytes at log offset `at` (wrapping at the end of the log).
fn read_log(st: &dyn Storage, log_off: u64, log_len: u64, at: u64, n: u64) -> Result<Vec<u8>> {
    let mut out = vec![0u8; n as usize];
    let mut done = 0u64;
    while done < n {
        let pos = (at + done) % log_len;
        let k = (log_len - pos).min(n - done);
        st.read_at(&mut out[done as usize..(done + k) as usize], log_off + pos)?;
        done += k;
    }
    Ok(out)
}

/// Decodes and validates the entry at log offset `at`; `None` when there is none.
pub fn read_entry(
    st: &dyn Storage,
    log_off: u64,
    log_len: u64,
    at: u64,
    log_guid: &[u8; 16],
) -> Result<Option<Entry>> {
    let h = read_log(st, log_off, log_len, at, SECTOR)?;
    if &h[..4] != b"loge" {
        return Ok(None);
    }
    let len = le32(&h, 8) as u64;
    let count = le32(&h, 24) as u64;
    if len == 0 || !len.is_multiple_of(SECTOR) || len > log_len || guid_at(&h, 32) != *log_guid {
        return Ok(None);
    }
    let desc_sectors = (64 + 32 * count).div_ceil(SECTOR);
    if desc_sectors * SECTOR > len {
        return Ok(None);
    }
    let raw = read_log(st, log_off, log_len, at, len)?;
    if !checksum_ok(&raw, 4) {
        return Ok(None);
    }
    let sequence = le64(&raw, 16);
    let mut descriptors = Vec::with_capacity(count.min(4096) as usize);
    let mut data_at = desc_sectors * SECTOR;
    for i in 0..count as usize {
        let d = &raw[64 + i * 32..64 + (i + 1) * 32];
        if le64(d, 24) != sequence {
            return Ok(None);
        }
        match &d[..4] {
            b"zero" => descriptors.push(Descriptor::Zero {
                len: le64(d, 8),
                offset: le64(d, 16),
            }),
            b"desc" => {
                if data_at + SECTOR > len {
                    return Ok(None);
                }
                let s = &raw[data_at as usize..(data_at + SECTOR) as usize];
                if &s[..4] != b"data"
                    || le32(s, 4) as u64 != sequence >> 32
                    || le32(s, 4092) as u64 != sequence & 0xffff_ffff
                {
                    return Ok(None);
                }
                let mut sector = Box::new([0u8; 4096]);
                sector[..8].copy_from_slice(&d[8..16]);
                sector[8..4092].copy_from_slice(&s[8..4092]);
                sector[4092..].copy_from_slice(&d[4..8]);
                descriptors.push(Descriptor::Data {
                    offset: le64(d, 16),
                    sector,
                });
                data_at += SECTOR;
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(Entry {
        at,
        len,
        tail: le32(&h, 12) as u64,
        sequence,
        last_file_offset: le64(&h, 56),
        descriptors,
    }))
}

/// The active sequence of the log, oldest entry first (empty: nothing to replay).
pub fn active_sequence(
    st: &dyn Storage,
    log_off: u64,
    log_len: u64,
    log_guid: &[u8; 16],
) -> Result<Vec<Entry>> {
    if log_len == 0 || !log_len.is_multiple_of(SECTOR) {
        return Err(bad(VhdxProblem::LogUnsupported));
    }
    // The valid sequence with the highest head: scan every sector for an entry start
    // and follow each chain of consecutive entries.
    let mut best: Option<Vec<Entry>> = None;
    let mut at = 0u64;
    while at < log_len {
        let Some(first) = read_entry(st, log_off, log_len, at, log_guid)? else {
            at += SECTOR;
            continue;
        };
        let step = first.len;
        let mut seq = vec![first];
        while seq.len() < MAX_SEQUENCE {
            let last = &seq[seq.len() - 1];
            let next_at = (last.at + last.len) % log_len;
            match read_entry(st, log_off, log_len, next_at, log_guid)? {
                Some(e) if e.sequence == last.sequence.wrapping_add(1) && e.at != seq[0].at => {
                    seq.push(e)
                }
                _ => break,
            }
        }
        let head = seq[seq.len() - 1].sequence;
        if best.as_ref().is_none_or(|b| b[b.len() - 1].sequence < head) {
            best = Some(seq);
        }
        at += step;
    }
    let Some(seq) = best else {
        return Ok(Vec::new());
    };
    // The sequence starts at its head's tail.
    let tail = seq[seq.len() - 1].tail;
    match seq.iter().position(|e| e.at == tail) {
        Some(i) => Ok(seq[i..].to_vec()),
        None => Err(bad(VhdxProblem::LogInvalid)),
    }
}

/// Writes the entries' descriptors to the file, grows it to the last file offset and
/// flushes.
pub fn replay(st: &dyn Storage, entries: &[Entry]) -> Result<()> {
    for e in entries {
        for d in &e.descriptors {
            match d {
                Descriptor::Zero { offset, len } => st.write_zeroes(*offset, *len)?,
                Descriptor::Data { offset, sector } => st.write_at(&sector[..], *offset)?,
            }
        }
    }
    if let Some(last) = entries.last() {
        if st.len()? < last.last_file_offset {
            st.set_len(last.last_file_offset)?;
        }
    }
    st.flush()?;
    Ok(())
}

/// Encodes one log entry (used by tests to build dirty logs).
pub fn encode_entry(
    sequence: u64,
    tail: u32,
    log_guid: &[u8; 16],
    last_file_offset: u64,
    descriptors: &[Descriptor],
) -> Vec<u8> {
    let count = descriptors.len() as u64;
    let desc_sectors = (64 + 32 * count).div_ceil(SECTOR);
    let data = descriptors
        .iter()
        .filter(|d| matches!(d, Descriptor::Data { .. }))
        .count() as u64;
    let len = (desc_sectors + data) * SECTOR;
    let mut b = vec![0u8; len as usize];
    b[..4].copy_from_slice(b"loge");
    b[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    b[12..16].copy_from_slice(&tail.to_le_bytes());
    b[16..24].copy_from_slice(&sequence.to_le_bytes());
    b[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    b[32..48].copy_from_slice(log_guid);
    b[48..56].copy_from_slice(&last_file_offset.to_le_bytes());
    b[56..64].copy_from_slice(&last_file_offset.to_le_bytes());
    let mut data_at = (desc_sectors * SECTOR) as usize;
    for (i, d) in descriptors.iter().enumerate() {
        let e = 64 + i * 32;
        match d {
            Descriptor::Zero { offset, len } => {
                b[e..e + 4].copy_from_slice(b"zero");
                b[e + 8..e + 16].copy_from_slice(&len.to_le_bytes());
                b[e + 16..e + 24].copy_from_slice(&offset.to_le_bytes());
            }
            Descriptor::Data { offset, sector } => {
                b[e..e + 4].copy_from_slice(b"desc");
                b[e + 4..e + 8].copy_from_slice(&sector[4092..]);
                b[e + 8..e + 16].copy_from_slice(&sector[..8]);
                b[e + 16..e + 24].copy_from_slice(&offset.to_le_bytes());
                let s = &mut b[data_at..data_at + 4096];
                s[..4].copy_from_slice(b"data");
                s[4..8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
                s[8..4092].copy_from_slice(&sector[8..4092]);
                s[4092..].copy_from_slice(&(sequence as u32).to_le_bytes());
                data_at += 4096;
            }
        }
        b[e + 24..e + 32].copy_from_slice(&sequence.to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn sector(v: u8) -> Box<[u8; 4096]> {
        let mut s = Box::new([v; 4096]);
        s[0] = 0xAA;
        s[4095] = 0xBB;
        s
    }

    #[test]
    fn finds_and_replays_the_active_sequence() {
        let m = MemStorage::new();
        let g = [5u8; 16];
        let log_off = 1 << 20;
        let log_len = 1 << 20;
        m.set_len(3 << 20).unwrap();
        // An old entry (seq 3) at 0, then entries 10 and 11 from 8 KiB, tail = 8 KiB.
        let old = encode_entry(3, 0, &g, 0, &[Descriptor::Zero { offset: 0, len: 1 }]);
        m.write_at(&old, log_off).unwrap();
        let e10 = encode_entry(
            10,
            8192,
            &g,
            0,
            &[Descriptor::Data {
                offset: 2 << 20,
                sector: sector(1),
            }],
        );
        let at11 = 8192 + e10.len() as u64;
        let e11 = encode_entry(
            11,
            8192,
            &g,
            4 << 20,
            &[
                Descriptor::Data {
                    offset: (2 << 20) + 4096,
                    sector: sector(2),
                },
                Descriptor::Zero {
                    offset: 2 << 20,
                    len: 16,
                },
            ],
        );
        m.write_at(&e10, log_off + 8192).unwrap();
        m.write_at(&e11, log_off + at11).unwrap();
        let seq = active_sequence(&m, log_off, log_len, &g).unwrap();
        assert_eq!(
            seq.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![10, 11]
        );
        replay(&m, &seq).unwrap();
        let mut b = vec![0u8; 8192];
        m.read_at(&mut b, 2 << 20).unwrap();
        assert_eq!(&b[..16], &[0; 16]);
        assert_eq!(b[16], 1);
        assert_eq!((b[4096], b[4097], b[8191]), (0xAA, 2, 0xBB));
        assert_eq!(m.len().unwrap(), 4 << 20);
        // Another log GUID: nothing to replay; a broken checksum: entry ignored.
        assert!(active_sequence(&m, log_off, log_len, &[6; 16])
            .unwrap()
            .is_empty());
        m.write_at(&[0xFF], log_off + at11 + 100).unwrap();
        let seq = active_sequence(&m, log_off, log_len, &g).unwrap();
        assert_eq!(seq.len(), 1);
    }
}
