//! qcow2's `measure`: the metadata of a fully allocated image of a given size
//! (header, L2 tables, L1 table, refcount blocks and table, found as a fixed point
//! like QEMU), plus the data clusters an input image holds.

use crate::error::{Invalid, Result, V3Feature};
use crate::format::measure::{MeasureInfo, MeasureSource};
use crate::format::options::OptionValues;
use crate::format::ExtentKind;

/// Bytes of refcount blocks and table for `clusters` clusters (the structure counts
/// itself, so this is the fixed point of blocks + table clusters).
pub(crate) fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    // Each round can only grow the counts, and they are bounded by `clusters`.
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// File size of a qcow2 image of `size` bytes with every cluster allocated.
pub(crate) fn prealloc_size(size: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let l2e = if extended_l2 { 16 } else { 8 };
    let aligned = size.div_ceil(cs) * cs;
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta + aligned
}

/// Measures a qcow2 target with creation options `o`.
pub(crate) fn measure(o: &OptionValues, src: MeasureSource<'_>) -> Result<MeasureInfo> {
    let extended_l2 = o.bool("extended_l2").unwrap_or(false);
    let cs = o.size("cluster_size").unwrap_or(65536);
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(Invalid::Qcow2ClusterSize.into());
    }
    if extended_l2 && cs < 16384 {
        return Err(Invalid::ExtendedL2ClusterSize.into());
    }
    let raw = |k: &str| {
        o.given()
            .iter()
            .find(|g| g.desc.name == k)
            .map(|g| g.raw.clone())
    };
    let version = match raw("compat").as_deref() {
        None | Some("1.1" | "v3") => 3,
        Some("0.10" | "v2") => 2,
        Some(v) => return Err(Invalid::CompatLevel(v.to_string()).into()),
    };
    let refcount_bits = o.number("refcount_bits").unwrap_or(16);
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(Invalid::RefcountWidth.into());
    }
    if version < 3 && refcount_bits != 16 {
        return Err(Invalid::NeedsV3Compat(V3Feature::RefcountWidth).into());
    }
    let full_data = match raw("preallocation").as_deref() {
        None | Some("off" | "metadata") => false,
        Some("falloc" | "full") => true,
        Some(v) => return Err(Invalid::LegacyEnumValue(v.to_string()).into()),
    };
    let (virtual_size, mut required, bitmaps) = match src {
        MeasureSource::Size(s) => (s.div_ceil(cs) * cs, 0, None),
        MeasureSource::Image {
            size,
            status,
            bitmaps,
        } => {
            let mut required = 0u64;
            let mut off = 0u64;
            // Each run is at least one byte long, so this ends within `size` steps
            // (runs are much longer in practice).
            while off < size {
                let (kind, n) = status(off, size - off)?;
                let mut n = n.clamp(1, size - off);
                if kind == ExtentKind::Data {
                    // Whole clusters: the run extends to the end of its last cluster.
                    n = (off + n).div_ceil(cs) * cs - off;
                    required += off % cs + n;
                }
                off += n;
            }
            (size.div_ceil(cs) * cs, required, bitmaps)
        }
    };
    if full_data {
        required = virtual_size;
    }
    let order = refcount_bits.trailing_zeros();
    let fully_allocated = prealloc_size(virtual_size, cs, order, extended_l2);
    Ok(MeasureInfo {
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps: if version >= 3 { bitmaps } else { None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fully_allocated_sizes_match_qemu() {
        // qemu-img measure -O qcow2 --size N [-o ...] (qemu-img 10.0).
        assert_eq!(prealloc_size(1 << 30, 65536, 4, false), 1_074_135_040);
        assert_eq!(prealloc_size(1 << 20, 65536, 4, false), 1_376_256);
        assert_eq!(prealloc_size(0, 65536, 4, false), 196_608);
        assert_eq!(
            prealloc_size(100 << 20, 65536, 4, false),
            105_185_280 - (100 << 20) + (100 << 20)
        );
    }

    #[test]
    fn refcount_fixed_point_counts_itself() {
        // One block of 64 KiB with 16-bit entries covers 32768 clusters.
        assert_eq!(refcount_metadata_size(1, 65536, 4), 2 * 65536);
        assert_eq!(refcount_metadata_size(32766, 65536, 4), 2 * 65536);
        assert_eq!(refcount_metadata_size(32767, 65536, 4), 3 * 65536);
        // 1-bit refcounts: 524288 clusters per block.
        assert_eq!(refcount_metadata_size(10, 65536, 0), 2 * 65536);
    }
}
