//! Creating VHDs as `qemu-img create -f vpc` does.
//!
//! The size is rounded up to whole sectors, then (without `force_size`) up to the next
//! size a CHS geometry holds; the footer records it (creator `qemu`, or `qem2` with
//! `force_size`, which keeps the exact size and takes the maximum geometry).
//! - fixed: the data (a hole), then the footer;
//! - dynamic: footer copy (0), dynamic header (512), BAT (1536, all unallocated, whole
//!   sectors), footer; 2 MiB blocks.

use super::bat::UNALLOCATED;
use super::dynheader::{DynHeader, DEFAULT_BLOCK_SIZE};
use super::footer::{
    creation_geometry, Footer, FOOTER_LEN, TIMESTAMP_BASE, TYPE_DYNAMIC, TYPE_FIXED,
};
use crate::error::{Invalid, Result};
use crate::format::registry::CreateArgs;
use crate::storage::Storage;
use std::sync::Arc;

/// Bytes of BAT written at once.
const BAT_CHUNK: usize = 1 << 20;

/// A random (version 4) UUID; the time when the system has no random source.
pub(crate) fn random_uuid() -> [u8; 16] {
    use std::io::Read;
    let mut u = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut u))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        u.copy_from_slice(&t.to_le_bytes());
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Creates a VHD on `storage` (empty) from typed options.
pub fn create(storage: &Arc<dyn Storage>, args: &CreateArgs) -> Result<()> {
    let o = &args.options;
    let size = o.size("size").unwrap_or(args.size);
    let fixed = o.get_enum("subformat")? == Some("fixed");
    let force = o.bool("force_size").unwrap_or(false);
    o.get_enum("preallocation")?;
    let size = size
        .checked_next_multiple_of(512)
        .ok_or(Invalid::VpcTooLarge)?;
    let ((c, h, s), total) = creation_geometry(size, force)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let footer = Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: if fixed { u64::MAX } else { FOOTER_LEN as u64 },
        timestamp: now.saturating_sub(TIMESTAMP_BASE) as u32,
        creator_app: if force { *b"qem2" } else { *b"qemu" },
        major: 5,
        minor: 3,
        creator_os: *b"Wi2k",
        orig_size: total,
        current_size: total,
        cyls: c as u16,
        heads: h as u8,
        secs: s as u8,
        disk_type: if fixed { TYPE_FIXED } else { TYPE_DYNAMIC },
        checksum: 0,
        uuid: random_uuid(),
        saved_state: 0,
        raw: [0; FOOTER_LEN],
    }
    .encode();
    if fixed {
        storage.set_len(total + FOOTER_LEN as u64)?;
        storage.write_at(&footer, total)?;
        storage.flush()?;
        return Ok(());
    }
    let bs = DEFAULT_BLOCK_SIZE as u64;
    let entries = (total / 512).div_ceil(bs / 512);
    let bat_bytes = (entries * 4).div_ceil(512) * 512;
    storage.write_at(&footer, 0)?;
    storage.write_at(&footer, 1536 + bat_bytes)?;
    let chunk = vec![0xffu8; (bat_bytes as usize).min(BAT_CHUNK)];
    let mut done = 0u64;
    while done < bat_bytes {
        let n = (bat_bytes - done).min(chunk.len() as u64) as usize;
        storage.write_at(&chunk[..n], 1536 + done)?;
        done += n as u64;
    }
    debug_assert_eq!(u32::from_be_bytes([0xff; 4]), UNALLOCATED);
    let header = DynHeader {
        table_offset: 1536,
        max_table_entries: entries as u32,
        block_size: DEFAULT_BLOCK_SIZE,
    };
    storage.write_at(&header.encode(), 512)?;
    storage.flush()?;
    Ok(())
}
