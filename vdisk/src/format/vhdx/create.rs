//! Creating VHDX images as `qemu-img create -f vhdx` lays them out: file identifier
//! (creator "QEMU v10.0.2"-style string in UTF-16), two headers (random sequence
//! number and GUIDs, log at 1 MiB), two region tables, the BAT at the first MiB after
//! the log, the metadata region after the BAT, data from BAT + 5 MiB on; with `block_state_zero=on`
//! (the default, also for fixed images) every BAT entry is ZERO; otherwise dynamic
//! entries are NOT_PRESENT and fixed images have every block present.

use super::header::{self, Header, Region};
use super::metadata::{self, Metadata};
use super::{PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT, PAYLOAD_ZERO};
use crate::error::{Invalid, Result};
use crate::format::registry::CreateArgs;
use crate::storage::Storage;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// Creates a VHDX image on `storage` from typed options.
pub fn create(storage: &Arc<dyn Storage>, args: &CreateArgs) -> Result<()> {
    let o = &args.options;
    let size = o.size("size").unwrap_or(args.size).div_ceil(512) * 512;
    let fixed = matches!(o.get_enum("subformat")?, Some("fixed"));
    let log_size = o.size("log_size").unwrap_or(MIB).div_ceil(MIB) * MIB;
    let mut block = o.size("block_size").unwrap_or(0).div_ceil(MIB) * MIB;
    block = block.min(metadata::MAX_BLOCK);
    let zero_blocks = o.bool("block_state_zero").unwrap_or(true);
    if size > metadata::MAX_SIZE {
        return Err(Invalid::VhdxCreate("Image size too large; max of 64TB").into());
    }
    if log_size > u32::MAX as u64 {
        return Err(Invalid::VhdxCreate("Log size must be smaller than 4 GB").into());
    }
    if block == 0 {
        block = if size > 32 << 40 {
            64 * MIB
        } else if size > 100 << 30 {
            32 * MIB
        } else if size > 1 << 30 {
            16 * MIB
        } else {
            8 * MIB
        };
    }
    if !block.is_power_of_two() {
        return Err(Invalid::VhdxCreate("Block size must be a power of two").into());
    }
    let md = Metadata {
        block_size: block as u32,
        file_flags: if fixed {
            metadata::LEAVE_BLOCKS_ALLOCATED
        } else {
            0
        },
        size,
        logical_sector: 512,
        physical_sector: 512,
    };
    // (A) the file identifier and creator.
    let mut id = header::FILE_SIGNATURE.to_vec();
    let creator = concat!("vdisk v", env!("CARGO_PKG_VERSION"));
    id.extend(creator.encode_utf16().flat_map(|c| c.to_le_bytes()));
    storage.write_at(&id, 0)?;
    // (B), (C) the headers.
    let mut h = Header {
        sequence: rand::random::<u32>() as u64,
        file_write_guid: header::random_guid(),
        data_write_guid: header::random_guid(),
        log_guid: [0; 16],
        log_version: 0,
        version: 1,
        log_length: log_size as u32,
        log_offset: header::HEADER_SECTION_END,
    };
    storage.write_at(&h.to_bytes(), header::HEADER_OFFSETS[0])?;
    h.sequence += 1;
    storage.write_at(&h.to_bytes(), header::HEADER_OFFSETS[1])?;
    // (D), (E) the region tables; (G) the BAT.
    let entries = metadata::bat_entries(&md);
    let bat_len = (entries * 8).div_ceil(MIB) * MIB;
    let bat_off = (header::HEADER_SECTION_END + log_size).div_ceil(MIB) * MIB;
    let meta_off = (bat_off + bat_len).div_ceil(MIB) * MIB;
    if bat_len > u32::MAX as u64 {
        return Err(Invalid::VhdxCreate("BAT too large").into());
    }
    let regions = [
        Region {
            guid: header::BAT_GUID,
            offset: bat_off,
            length: bat_len as u32,
            required: false,
        },
        Region {
            guid: header::METADATA_GUID,
            offset: meta_off,
            length: MIB as u32,
            required: false,
        },
    ];
    let data_off = bat_off + bat_len + 5 * MIB;
    storage.set_len(if fixed { data_off + size } else { data_off })?;
    // The BAT region is written (zeroes where no entry is set), as qemu-img writes it:
    // the new file takes the same space on disk.
    let zeroes = vec![0u8; bat_len.min(MIB) as usize];
    let mut at = bat_off;
    while at < bat_off + bat_len {
        let n = (bat_off + bat_len - at).min(MIB) as usize;
        storage.write_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    if fixed || zero_blocks {
        // As qemu: `block_state_zero` wins over `fixed` (ZERO entries carry no offset).
        let state = if zero_blocks {
            PAYLOAD_ZERO
        } else if fixed {
            PAYLOAD_FULLY_PRESENT
        } else {
            PAYLOAD_NOT_PRESENT
        };
        let mut bat = vec![0u8; (entries * 8) as usize];
        for b in 0..metadata::data_blocks(&md) {
            let off = if state == PAYLOAD_ZERO {
                0
            } else {
                (data_off + b * block).div_ceil(MIB) * MIB
            };
            let i = metadata::bat_index(&md, b) as usize;
            bat[i * 8..i * 8 + 8].copy_from_slice(&(off | state).to_le_bytes());
        }
        storage.write_at(&bat, bat_off)?;
    }
    let rt = header::regions_to_bytes(&regions);
    storage.write_at(&rt, header::REGION_OFFSETS[0])?;
    storage.write_at(&rt, header::REGION_OFFSETS[1])?;
    // (H) the metadata.
    let (table, items) = metadata::to_bytes(&md, header::random_guid());
    storage.write_at(&table, meta_off)?;
    storage.write_at(&items, meta_off + header::TABLE_LEN as u64)?;
    storage.flush()?;
    Ok(())
}
