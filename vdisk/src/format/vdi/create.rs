//! Creating VDI images as `qemu-img create -f vdi` does: the header, the block map
//! (whole sectors; all unallocated, or for `static=on` every block mapped to itself),
//! and for a static image the file extended (sparse) to hold every block.

use super::bmap::UNALLOCATED;
use super::header::{Header, MAX_DISK_SIZE, TYPE_DYNAMIC, TYPE_STATIC};
use crate::error::{Invalid, Result};
use crate::format::registry::CreateArgs;
use crate::format::vpc::create::random_uuid;
use crate::storage::Storage;
use std::sync::Arc;

/// Entries of block map written at once.
const MAP_CHUNK: u64 = 1 << 18;

/// Creates a VDI image on `storage` (empty) from typed options.
pub fn create(storage: &Arc<dyn Storage>, args: &CreateArgs) -> Result<()> {
    let o = &args.options;
    let size = o.size("size").unwrap_or(args.size);
    let is_static = o.bool("static").unwrap_or(false);
    o.get_enum("preallocation")?;
    let size = size.checked_next_multiple_of(512).unwrap_or(u64::MAX);
    if size > MAX_DISK_SIZE {
        return Err(Invalid::VdiTooLarge {
            size,
            max: MAX_DISK_SIZE,
        }
        .into());
    }
    let t = if is_static { TYPE_STATIC } else { TYPE_DYNAMIC };
    let h = Header::new(size, t, random_uuid(), random_uuid());
    storage.write_at(&h.encode(), 0)?;
    let blocks = h.blocks_in_image as u64;
    let map_bytes = (blocks * 4).div_ceil(512) * 512;
    let mut i = 0u64;
    while i * 4 < map_bytes {
        let n = (map_bytes / 4 - i).min(MAP_CHUNK);
        let mut buf = Vec::with_capacity(n as usize * 4);
        for k in i..i + n {
            let e = if k >= blocks {
                0
            } else if is_static {
                k as u32
            } else {
                UNALLOCATED
            };
            buf.extend_from_slice(&e.to_le_bytes());
        }
        storage.write_at(&buf, h.offset_bmap as u64 + i * 4)?;
        i += n;
    }
    if is_static {
        storage.set_len(h.offset_data as u64 + blocks * h.block_size as u64)?;
    }
    storage.flush()?;
    Ok(())
}
