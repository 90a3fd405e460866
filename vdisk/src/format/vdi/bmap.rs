//! The VDI block map: one little-endian u32 per guest block, the index of its data
//! block (at `offset_data + index × block_size`), [`UNALLOCATED`] or [`DISCARDED`]
//! (both read as zeroes). Loaded whole at open (bounded by
//! [`MAX_BLOCKS`](super::header::MAX_BLOCKS) entries and by the file's length).

use super::header::Header;
use crate::error::{Corruption, Problem, Result, Structure};
use crate::storage::Storage;

/// A block never allocated.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// A block discarded (reads as zeroes).
pub const DISCARDED: u32 = 0xffff_fffe;

/// Whether an entry names a data block.
pub fn is_allocated(e: u32) -> bool {
    e < DISCARDED
}

/// Decodes little-endian entries.
pub fn decode(buf: &[u8]) -> Vec<u32> {
    buf.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reads the block map, which must lie inside the file.
pub fn load(st: &dyn Storage, h: &Header, file_len: u64) -> Result<Vec<u32>> {
    let bytes = h.blocks_in_image as u64 * 4;
    let off = h.offset_bmap as u64;
    if off + bytes > file_len {
        return Err(Corruption::new(
            Structure::VdiBlockMap,
            Problem::PastEnd {
                bytes,
                end: file_len,
            },
        )
        .at(off)
        .into());
    }
    // Block map updates and data writes must never land on the header or the map.
    let map_end = off + bytes.div_ceil(512) * 512;
    let data = h.offset_data as u64;
    let data_end = data + h.blocks_in_image as u64 * h.block_size as u64;
    let overlaps = |a: u64, b: u64, c: u64, d: u64| a < d && c < b;
    if off < 512 && bytes > 0 {
        return Err(Corruption::new(
            Structure::VdiBlockMap,
            Problem::OverlapsMetadata {
                with: Structure::VdiHeader,
            },
        )
        .at(off)
        .into());
    }
    if data_end > data && (data < 512 || overlaps(data, data_end, off, map_end)) {
        return Err(Corruption::new(
            Structure::VdiHeader,
            Problem::OverlapsMetadata {
                with: Structure::VdiBlockMap,
            },
        )
        .at(data)
        .into());
    }
    let mut buf = vec![0u8; bytes as usize];
    st.read_at(&mut buf, off)?;
    Ok(decode(&buf))
}

/// One past the highest data block index in use (entries naming blocks outside the
/// image are not counted: reading them fails, and check reports them).
pub fn next_free(entries: &[u32], blocks_in_image: u32) -> u32 {
    entries
        .iter()
        .filter(|&&e| e < blocks_in_image)
        .map(|&e| e + 1)
        .max()
        .unwrap_or(0)
}

/// The data block indices below `count` that no entry names, highest first (so that
/// popping hands out the lowest).
pub fn unused(entries: &[u32], count: u32) -> Vec<u32> {
    let mut used = vec![false; count as usize];
    for &e in entries {
        if let Some(u) = used.get_mut(e as usize) {
            *u = true;
        }
    }
    (0..count).rev().filter(|&i| !used[i as usize]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::vdi::header::TYPE_DYNAMIC;
    use crate::storage::MemStorage;

    #[test]
    fn load_and_cursor() {
        let h = Header::new(3 << 20, TYPE_DYNAMIC, [0; 16], [0; 16]);
        let mut img = vec![0u8; 1024];
        img[512..524]
            .copy_from_slice(&[0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff]);
        let st = MemStorage::from_vec(img);
        let e = load(&st, &h, 1024).unwrap();
        assert_eq!(e, vec![UNALLOCATED, 1, DISCARDED]);
        assert!(!is_allocated(e[0]) && is_allocated(e[1]) && !is_allocated(e[2]));
        assert_eq!(next_free(&e, 3), 2);
        assert_eq!(next_free(&[7, UNALLOCATED], 2), 0);
        assert_eq!(unused(&[2, UNALLOCATED, 0], 5), vec![4, 3, 1]);
        let err = load(&st, &h, 520).unwrap_err();
        assert!(
            err.to_string().contains("past the end of the file"),
            "{err}"
        );
    }
}
