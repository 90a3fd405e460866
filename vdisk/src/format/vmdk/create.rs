//! Creating VMDK images as `qemu-img create -f vmdk` lays them out: a monolithic
//! sparse extent (header, descriptor in sectors 1..21, redundant and primary grain
//! directories with all their grain tables, the first grain on a 64 KiB boundary),
//! plain or stream-optimized (compressed grains appended as they are written); or a
//! descriptor file and its extents, created through [`CreateArgs::siblings`]:
//! monolithicFlat (`NAME-flat.vmdk`), twoGbMaxExtentFlat/Sparse (`NAME-f001.vmdk`,
//! `NAME-s001.vmdk`, … of 2 GiB each, the last one shorter; a split sparse extent's
//! header reserves the descriptor area, which stays empty).
//!
//! A backing (parent) link is the descriptor's `parentCID` (the parent's CID, from
//! [`CreateArgs::parent`]) and `parentFileNameHint` (its name as given).

use super::header::{new_geometry, Header, SECTOR};
use super::text::NewDescriptor;
use crate::error::{Invalid, Result, Unsupported};
use crate::format::registry::CreateArgs;
use crate::storage::Storage;
use std::sync::Arc;

/// A VMDK's qemu-img errors that have no typed home yet.
fn refuse(what: &str) -> crate::Error {
    Unsupported::VmdkCreate(what.to_string()).into()
}

/// Creates a VMDK image on `storage` from typed options.
pub fn create(storage: &Arc<dyn Storage>, args: &CreateArgs) -> Result<()> {
    let o = &args.options;
    let named = o.str("backing_fmt").map(str::to_string).or_else(|| {
        args.backing
            .as_ref()
            .and_then(|b| b.format)
            .map(|f| f.name().to_string())
    });
    if named.is_some_and(|f| f != "vmdk") {
        return Err(Invalid::VmdkBackingFormat.into());
    }
    let size = o.size("size").unwrap_or(args.size).div_ceil(SECTOR) * SECTOR;
    let adapter = o.get_enum("adapter_type")?.unwrap_or("ide");
    let subformat = o.get_enum("subformat")?.unwrap_or("monolithicSparse");
    let compat6 = o.bool("compat6").unwrap_or(false);
    let mut hw = o.str("hwversion").filter(|h| *h != "undefined");
    if compat6 {
        if hw.is_some() {
            return Err(Invalid::VmdkCompat6WithHwversion.into());
        }
        hw = Some("6");
    }
    let hw = hw.unwrap_or("4");
    let tools = o.str("toolsversion").unwrap_or("2147483647");
    let zeroed_grain = o.bool("zeroed_grain").unwrap_or(false);
    let flat = matches!(subformat, "monolithicFlat" | "twoGbMaxExtentFlat");
    let backing = o
        .str("backing_file")
        .map(str::to_string)
        .or_else(|| args.backing.as_ref().map(|b| b.name.clone()));
    if flat && backing.is_some() {
        return Err(Invalid::VmdkFlatBacking.into());
    }
    if flat && zeroed_grain {
        return Err(Invalid::VmdkFlatZeroedGrain.into());
    }
    let parent_cid = match (&backing, &args.parent) {
        (None, _) => 0xffff_ffff,
        (Some(_), Some(crate::format::FormatSpecific::Vmdk { cid, .. })) => *cid,
        // Not opened (`-u`) or not a VMDK: qemu-img reads the parent's CID.
        (Some(_), _) => return Err(refuse("backing_file that cannot be opened as vmdk")),
    };
    let sectors = size / SECTOR;
    if sectors > u32::MAX as u64 * 128 {
        return Err(Invalid::VmdkTooLarge { size }.into());
    }
    let name = args.filename.as_deref().unwrap_or("image.vmdk");
    let desc = |extent_lines: String| {
        NewDescriptor {
            cid: super::random_u32(),
            parent_cid,
            create_type: subformat,
            parent_hint: backing.as_deref(),
            extent_lines,
            hw_version: hw,
            size,
            adapter_type: adapter,
            tools_version: tools,
        }
        .render()
    };
    if matches!(subformat, "monolithicSparse" | "streamOptimized") {
        write_sparse(
            storage,
            sectors,
            subformat == "streamOptimized",
            zeroed_grain,
        )?;
        let text = desc(format!("RW {sectors} SPARSE \"{name}\"\n"));
        storage.write_at(text.as_bytes(), SECTOR)?;
        storage.flush()?;
        return Ok(());
    }
    let siblings = args
        .siblings
        .as_ref()
        .ok_or_else(|| refuse(&format!("subformat={subformat} without a file name")))?;
    // QEMU's names: the image name split before its last '.', the extension kept.
    let (stem, ext) = match name.rfind('.') {
        Some(i) => name.split_at(i),
        None => (name, ""),
    };
    let split = subformat.starts_with("twoGb");
    let per = if split { SPLIT_SECTORS } else { sectors.max(1) };
    let mut lines = String::new();
    let mut at = 0u64;
    let mut n = 0u32;
    // A zero-sized image still gets one (empty) extent, as qemu-img makes.
    while at < sectors || n == 0 {
        n += 1;
        let len = per.min(sectors - at);
        let file = match (split, flat) {
            (false, _) => format!("{stem}-flat{ext}"),
            (true, true) => format!("{stem}-f{n:03}{ext}"),
            (true, false) => format!("{stem}-s{n:03}{ext}"),
        };
        let st = siblings.create(&file)?;
        if flat {
            st.set_len(len * SECTOR)?;
            lines.push_str(&format!("RW {len} FLAT \"{file}\" 0\n"));
        } else {
            write_sparse(&st, len, false, zeroed_grain)?;
            lines.push_str(&format!("RW {len} SPARSE \"{file}\"\n"));
        }
        st.flush()?;
        at += len;
    }
    storage.set_len(0)?;
    storage.write_at(desc(lines).as_bytes(), 0)?;
    storage.flush()?;
    Ok(())
}

/// Sectors of each extent of a twoGbMaxExtent* image (2 GiB, as qemu-img).
const SPLIT_SECTORS: u64 = (2 << 30) / SECTOR;

/// Writes a sparse extent of `sectors`: header, both grain directories with all their
/// (empty) grain tables; its descriptor area is left for the caller.
fn write_sparse(
    storage: &Arc<dyn Storage>,
    sectors: u64,
    compress: bool,
    zeroed_grain: bool,
) -> Result<()> {
    let h = Header::new_sparse(sectors, compress, zeroed_grain);
    let g = new_geometry(sectors);
    storage.write_at(&h.to_bytes(), 0)?;
    storage.set_len(h.grain_offset * SECTOR)?;
    // Both directories, each followed by its grain tables (all entries zero).
    for dir in [h.rgd_offset, h.gd_offset] {
        let gd: Vec<u8> = (0..g.gt_count)
            .flat_map(|i| ((dir + g.gd_sectors + i * g.gt_sectors) as u32).to_le_bytes())
            .collect();
        let mut b = gd;
        b.resize((g.gd_sectors * SECTOR) as usize, 0);
        storage.write_at(&b, dir * SECTOR)?;
    }
    Ok(())
}
