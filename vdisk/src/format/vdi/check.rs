//! QEMU's VDI check: every block map entry names a data block inside the image, no
//! data block is named twice, and the header's `blocks_allocated` equals the blocks
//! named. Repair is not supported (as in QEMU).

use super::bmap::is_allocated;
use super::Vdi;
use crate::error::{Result, Structure, Unsupported};
use crate::format::{CheckReport, Finding, FindingKind, Repair};

/// Most findings kept (the counts include the rest).
const MAX_FINDINGS: usize = 1 << 16;

/// Checks the block map.
pub(super) fn check(v: &Vdi, repair: Repair) -> Result<CheckReport> {
    if repair.leaks || repair.errors {
        return Err(Unsupported::NoCheck("vdi").into());
    }
    let mut r = CheckReport::default();
    let n = v.geo.blocks_in_image;
    let map = v.bmap.read().unwrap_or_else(|p| p.into_inner());
    let mut used = vec![false; n as usize];
    let mut counted = 0u64;
    let at = v.geo.offset_bmap as u64;
    for (i, &e) in map.iter().enumerate() {
        if !is_allocated(e) {
            continue;
        }
        let f = |kind| {
            Finding::new(kind, Structure::VdiBlockMap)
                .entry(i as u64)
                .value(e as u64)
                .at(at)
        };
        if e < n {
            counted += 1;
            if used[e as usize] {
                r.corruptions += 1;
                r.push_capped(f(FindingKind::VdiBlockShared), MAX_FINDINGS);
            } else {
                used[e as usize] = true;
            }
        } else {
            r.corruptions += 1;
            r.push_capped(f(FindingKind::VdiBlockOutOfRange), MAX_FINDINGS);
        }
    }
    let header = v.alloc.lock().unwrap_or_else(|p| p.into_inner()).disk_count as u64;
    if counted != header {
        r.corruptions += 1;
        r.push(
            Finding::new(FindingKind::VdiAllocatedMismatch, Structure::VdiHeader)
                .counts(Some(header), Some(counted)),
        );
    }
    Ok(r)
}
