//! `check` as QEMU's `vmdk_co_check`: every grain of every sparse extent is looked
//! up; a table that cannot be read, or a grain past the end of its file, is one
//! corruption (the check stops there). No repair (QEMU has none).
//!
//! Unlike QEMU's grain-by-grain walk, a grain table that is absent, or one already
//! checked (a hostile directory may name one table many times), is skipped whole: the
//! findings are the same, and the work is bounded by the tables the file can hold
//! instead of the claimed capacity (QEMU hangs on a 392 TiB header in a 64 MiB file).

use super::extent::{Grain, Layout};
use super::Vmdk;
use crate::error::{Result, Structure, Unsupported};
use crate::format::{CheckReport, Finding, FindingKind, Repair};

/// Checks the image.
pub(super) fn check(v: &Vmdk, repair: Repair) -> Result<CheckReport> {
    if repair.leaks || repair.errors {
        return Err(Unsupported::NoCheck("vmdk").into());
    }
    let mut report = CheckReport::default();
    for e in &v.extents {
        let Layout::Sparse(s) = &e.layout else {
            continue;
        };
        let file_len = e.storage.len()?;
        let span = s.grain.saturating_mul(s.gtes).max(s.grain);
        let mut seen = std::collections::HashSet::new();
        let mut rel = 0u64;
        while rel < e.len {
            if rel.is_multiple_of(span) {
                let gt = s.gd.get((rel / span) as usize).copied();
                if gt.is_some_and(|gt| gt == 0 || !seen.insert(gt)) {
                    rel = rel.saturating_add(span);
                    continue;
                }
            }
            match s.lookup(&*e.storage, rel) {
                Ok(Grain::Data(h)) | Ok(Grain::Compressed(h)) if h >= file_len => {
                    report.corruptions += 1;
                    report.push(
                        Finding::new(FindingKind::ReferencePastEnd, Structure::VmdkGrain)
                            .guest(e.start + rel)
                            .at(h),
                    );
                    return Ok(report);
                }
                Ok(_) => {}
                Err(_) => {
                    report.corruptions += 1;
                    report.push(
                        Finding::new(FindingKind::Unreadable, Structure::VmdkGrainTable)
                            .guest(e.start + rel),
                    );
                    return Ok(report);
                }
            }
            rel += s.grain;
        }
    }
    Ok(report)
}
