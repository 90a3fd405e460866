//! Creating QED images, laid out as `qemu-img create -f qed` does: one header cluster
//! (backing name right after the fixed fields), then the L1 table; nothing else.

use super::header::{self, Header, F_BACKING_FORMAT_NO_PROBE};
use crate::error::{Error, Result};
use crate::format::{parse_size, CreateSpec, Format};
use crate::storage::Storage;
use std::sync::Arc;

/// Creates a QED image on `storage` (options: `size`, `cluster_size`, `table_size`,
/// `backing_file`, `backing_fmt`; `preallocation=off`, `extent_size_hint` and `nocow`
/// are accepted for qemu-img compatibility).
pub fn create(storage: &Arc<dyn Storage>, spec: &CreateSpec) -> Result<()> {
    let mut size = spec.size;
    let mut cluster_size = header::DEFAULT_CLUSTER_SIZE as u64;
    let mut table_size = header::DEFAULT_TABLE_SIZE as u64;
    let mut backing_file = spec.backing.as_ref().map(|b| b.name.clone());
    let mut backing_fmt = spec.backing.as_ref().and_then(|b| b.format);
    for (k, v) in &spec.options {
        match k.as_str() {
            "size" => size = parse_size(v)?,
            "cluster_size" => cluster_size = parse_size(v)?,
            "table_size" => table_size = parse_size(v)?,
            "backing_file" => backing_file = Some(v.clone()),
            "backing_fmt" => backing_fmt = Some(Format::parse(v)?),
            "preallocation" => match v.as_str() {
                // QEMU accepts every mode for QED and preallocates nothing.
                "off" | "falloc" | "full" => {}
                other => {
                    return Err(Error::invalid(format!(
                        "Parameter 'preallocation' does not accept value '{other}'"
                    )))
                }
            },
            "extent_size_hint" => {
                parse_size(v)?;
            }
            "nocow" => {
                crate::format::parse_bool(k, v)?;
            }
            _ => return Err(Error::invalid(format!("Invalid parameter '{k}'"))),
        }
    }
    if !header::cluster_size_valid(cluster_size) {
        return Err(Error::invalid(format!(
            "QED cluster size must be within range [{}, {}] and power of 2",
            header::MIN_CLUSTER_SIZE,
            header::MAX_CLUSTER_SIZE
        )));
    }
    if !header::table_size_valid(table_size) {
        return Err(Error::invalid(format!(
            "QED table size must be within range [{}, {}] and power of 2",
            header::MIN_TABLE_SIZE,
            header::MAX_TABLE_SIZE
        )));
    }
    // qemu-img rounds the size up to whole sectors.
    let size = size
        .checked_next_multiple_of(header::SECTOR)
        .ok_or_else(|| Error::invalid(format!("Invalid size {size}")))?;
    if !header::image_size_valid(size, cluster_size, table_size) {
        return Err(Error::invalid(format!(
            "QED image size must be a non-zero multiple of cluster size and less than {} bytes",
            header::max_image_size(cluster_size, table_size)
        )));
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
    // An all-zero L1 table: the file simply ends after it.
    storage.set_len(h.l1_table_offset + h.table_bytes())?;
    storage.write_at(&bytes, 0)?;
    storage.flush()?;
    Ok(())
}
