//! The VHD block allocation table (BAT): one big-endian u32 per block, the sector
//! number of the block's sector bitmap (the block's data follows the bitmap), or
//! [`UNALLOCATED`]. Loaded whole (bounded: at most [`MAX_ENTRIES`] entries) and
//! validated at open the way QEMU's `vpc_open` does, plus a check that no block lies
//! over the image's own metadata (a write there would corrupt the header or the BAT).

use super::dynheader::DynHeader;
use crate::error::{Corruption, Field, Problem, Result, Structure};
use crate::storage::Storage;

/// An unallocated entry.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// Most BAT entries loaded (64 MiB of memory; with 2 MiB blocks, 32 TiB of disk, far
/// past the format's 2040 GiB).
pub const MAX_ENTRIES: u64 = 16 << 20;

/// Decodes `n` big-endian entries.
pub fn decode(buf: &[u8]) -> Vec<u32> {
    buf.chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The loaded table and where the next block goes.
#[derive(Debug)]
pub struct Loaded {
    /// The entries.
    pub entries: Vec<u32>,
    /// First byte after the last block (or after the BAT): where a new block goes and
    /// where the footer sits (QEMU's `free_data_block_offset`).
    pub free_offset: u64,
}

/// Validates the header against the disk size and reads the BAT.
pub fn load(
    st: &dyn Storage,
    h: &DynHeader,
    header_offset: u64,
    disk_size: u64,
    file_len: u64,
) -> Result<Loaded> {
    let bs = h.block_size as u64;
    let err = |p: Problem| Corruption::new(Structure::VpcDynamicHeader, p).at(header_offset);
    if disk_size / bs > 0xffff_ffff {
        return Err(err(Problem::TooLarge {
            field: Field::ImageSize,
            value: disk_size,
            max: 0xffff_ffff * bs,
        })
        .into());
    }
    let n = h.max_table_entries as u64;
    if n * bs < disk_size {
        return Err(err(Problem::TooSmall {
            field: Field::Entries,
            value: n,
            min: disk_size.div_ceil(bs),
        })
        .into());
    }
    if n > MAX_ENTRIES {
        return Err(err(Problem::TooLarge {
            field: Field::Entries,
            value: n,
            max: MAX_ENTRIES,
        })
        .into());
    }
    let bytes = n * 4;
    let end = h.table_offset.checked_add(bytes);
    if end.is_none_or(|e| e > file_len) {
        return Err(Corruption::new(
            Structure::VpcBat,
            Problem::PastEnd {
                bytes,
                end: file_len,
            },
        )
        .at(h.table_offset)
        .into());
    }
    let bat_end = (h.table_offset + bytes).div_ceil(512) * 512;
    // An entry update must never land on the footer copy or the dynamic header.
    if h.table_offset < 512 || (h.table_offset < header_offset + 1024 && header_offset < bat_end) {
        return Err(Corruption::new(
            Structure::VpcBat,
            Problem::OverlapsMetadata {
                with: Structure::VpcDynamicHeader,
            },
        )
        .at(h.table_offset)
        .into());
    }
    let mut buf = vec![0u8; bytes as usize];
    st.read_at(&mut buf, h.table_offset)?;
    let entries = decode(&buf);
    let bitmap = h.bitmap_size();
    let mut free_offset = bat_end;
    // The image's own metadata: the footer copy, the dynamic header, the BAT.
    let meta = [
        (0, 512),
        (header_offset, header_offset + 1024),
        (h.table_offset, bat_end),
    ];
    for (i, &e) in entries.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let start = e as u64 * 512;
        let next = start + bitmap + bs;
        if meta.iter().any(|&(a, b)| start < b && a < next) {
            return Err(Corruption::new(
                Structure::VpcBat,
                Problem::BadOffset {
                    index: Some(i as u64),
                    value: start,
                },
            )
            .at(h.table_offset)
            .into());
        }
        free_offset = free_offset.max(next);
    }
    if free_offset > file_len {
        return Err(Corruption::new(
            Structure::VpcBat,
            Problem::PastEnd {
                bytes: free_offset,
                end: file_len,
            },
        )
        .entry(0)
        .at(h.table_offset)
        .into());
    }
    Ok(Loaded {
        entries,
        free_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn header(n: u32) -> DynHeader {
        DynHeader {
            table_offset: 1536,
            max_table_entries: n,
            block_size: 1 << 21,
        }
    }

    #[test]
    fn free_offset_and_entries() {
        let mut img = vec![0u8; 2048];
        img[1536..1544].copy_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2]);
        let st = MemStorage::from_vec(img.clone());
        let h = header(2);
        // Block 1 at sector 4 overlaps the header.
        let e = load(&st, &h, 512, 4 << 20, 2048).unwrap_err();
        assert!(e.to_string().contains("entry 1"), "{e}");
        img[1540..1544].copy_from_slice(&(2048u32 / 512).to_be_bytes());
        let st = MemStorage::from_vec(img.clone());
        // Sector 4 = 2048: after the BAT (1536..2048); the file is too short for it.
        let e = load(&st, &h, 512, 4 << 20, 2048).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let len = 2048 + 512 + (2 << 20) + 512;
        let l = load(&st, &h, 512, 4 << 20, len).unwrap();
        assert_eq!(l.entries, vec![UNALLOCATED, 4]);
        assert_eq!(l.free_offset, 2048 + 512 + (2 << 20));
    }

    #[test]
    fn table_limits() {
        let st = MemStorage::from_vec(vec![0u8; 4096]);
        let e = load(&st, &header(1), 512, 4 << 20, 4096).unwrap_err();
        assert_eq!(e.to_string(), "Page table too small");
        let e = load(&st, &header(u32::MAX), 512, 4 << 20, 4096).unwrap_err();
        assert!(
            e.to_string().starts_with("Max Table Entries too large"),
            "{e}"
        );
        let e = load(&st, &header(1000), 512, 4 << 20, 4096).unwrap_err();
        assert!(e.to_string().contains("past the end of the file"), "{e}");
        let over = DynHeader {
            table_offset: 1024,
            ..header(2)
        };
        let e = load(&st, &over, 512, 4 << 20, 4096).unwrap_err();
        assert!(e.to_string().contains("overlaps the image metadata"), "{e}");
    }
}
