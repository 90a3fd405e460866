//! Creating QED images, laid out as `qemu-img create -f qed` does: one header cluster
//! (backing name right after the fixed fields), then the L1 table; nothing else.

use super::header::{self, Header, F_BACKING_FORMAT_NO_PROBE};
use crate::error::{Invalid, Result};
use crate::format::registry::CreateArgs;
use crate::format::{CreateSpec, Format};
use crate::storage::Storage;
use std::sync::Arc;

/// Largest L1 table create writes out as zeroes (qemu-img writes any size; 32 MiB is
/// a table of 16 clusters of 2 MiB).
const WRITTEN_L1_MAX: u64 = 32 << 20;

/// Creates a QED image on `storage` from untyped `-o` pairs (checked against
/// [`super::options::CREATE_OPTIONS`] and the file protocol's).
pub fn create(storage: &Arc<dyn Storage>, spec: &CreateSpec) -> Result<()> {
    crate::format::create(Format::Qed, storage, spec)
}

/// Creates a QED image on `storage` from typed options (`size`, `cluster_size`,
/// `table_size`, `backing_file`, `backing_fmt`; the protocol's `preallocation` is
/// checked and, as in QEMU, has nothing to do on an empty file; `extent_size_hint` and
/// `nocow` were applied to the new file by [`crate::Image::create`]).
pub fn create_typed(storage: &Arc<dyn Storage>, args: &CreateArgs) -> Result<()> {
    let o = &args.options;
    let size = o.size("size").unwrap_or(args.size);
    let cluster_size = o
        .size("cluster_size")
        .unwrap_or(header::DEFAULT_CLUSTER_SIZE as u64);
    let table_size = o
        .size("table_size")
        .unwrap_or(header::DEFAULT_TABLE_SIZE as u64);
    let mut backing_file = args.backing.as_ref().map(|b| b.name.clone());
    let mut backing_fmt = args.backing.as_ref().and_then(|b| b.format);
    if let Some(v) = o.str("backing_file") {
        backing_file = Some(v.to_string());
    }
    if let Some(v) = o.str("backing_fmt") {
        backing_fmt = Some(Format::parse(v)?);
    }
    o.get_enum("preallocation")?;
    if !header::cluster_size_valid(cluster_size) {
        return Err(Invalid::QedClusterSize {
            min: header::MIN_CLUSTER_SIZE as u64,
            max: header::MAX_CLUSTER_SIZE as u64,
        }
        .into());
    }
    if !header::table_size_valid(table_size) {
        return Err(Invalid::QedTableSize {
            min: header::MIN_TABLE_SIZE as u64,
            max: header::MAX_TABLE_SIZE as u64,
        }
        .into());
    }
    // qemu-img rounds the size up to whole sectors.
    let size = size
        .checked_next_multiple_of(header::SECTOR)
        .ok_or(Invalid::Size(size))?;
    if !header::image_size_valid(size, cluster_size, table_size) {
        return Err(Invalid::QedImageSize {
            max: header::max_image_size(cluster_size, table_size),
        }
        .into());
    }
    let mut h = Header {
        cluster_size: cluster_size as u32,
        table_size: table_size as u32,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: cluster_size,
        image_size: size,
        backing_filename_offset: 0,
        backing_filename_size: 0,
    };
    let bytes = header::header_with_name(&mut h, backing_file.as_deref())?;
    if backing_file.is_some() && backing_fmt == Some(Format::Raw) {
        h.features |= F_BACKING_FORMAT_NO_PROBE;
    }
    let mut bytes = bytes;
    bytes[..header::HEADER_LEN].copy_from_slice(&h.to_bytes());
    storage.set_len(0)?;
    storage.write_at(&bytes, 0)?;
    // The all-zero L1 table is written, not left as a hole, as qemu-img writes it: the
    // new file takes the same space on disk (`info`'s "disk size"). Tables beyond
    // `WRITTEN_L1_MAX` (only with huge clusters and tables) stay sparse rather than
    // cost that much disk for zeroes.
    let zeroes = vec![0u8; h.table_bytes().min(1 << 20) as usize];
    let mut at = h.l1_table_offset;
    let end = h.l1_table_offset + h.table_bytes();
    if h.table_bytes() > WRITTEN_L1_MAX {
        at = end;
    }
    while at < end {
        let n = (end - at).min(zeroes.len() as u64) as usize;
        storage.write_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    storage.set_len(end)?;
    storage.flush()?;
    Ok(())
}
