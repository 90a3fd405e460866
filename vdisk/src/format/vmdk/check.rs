//! `check` as QEMU's `vmdk_co_check`: every grain of every sparse extent is looked
//! up; a table that cannot be read, or a grain past the end of its file, is one
//! corruption (the check stops there). No repair (QEMU has none).

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
        let mut rel = 0u64;
        while rel < e.len {
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
