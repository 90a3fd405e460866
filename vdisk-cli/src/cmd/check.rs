//! `vdisk check`: metadata consistency check (and repair), as `qemu-img check`.
//!
//! Exit codes: 0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 the format
//! cannot be checked.

use crate::common;
use crate::output::{c_format_f64, to_json_pretty, QDict, QValue};
use vdisk::error::Structure;
use vdisk::format::{Finding, FindingKind, Outcome};
use vdisk::{CheckReport, Error, OpenOptions, Repair};

/// Arguments of `vdisk check`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Repair: `leaks` or `all`.
    #[arg(short = 'r', long = "repair")]
    pub repair: Option<String>,
    /// Cache mode for the image.
    #[arg(short = 'T', long = "cache")]
    pub cache: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Open in shared mode (ignore other users' locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Treat the image name as a key=value option list (`driver=qcow2,file.filename=X`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Image file.
    pub filename: String,
}

/// The check result with the counts repaired by an earlier pass (qemu's `ImageCheck`).
struct ImageCheck {
    filename: String,
    format: String,
    r: CheckReport,
}

fn to_qdict(c: &ImageCheck) -> QDict {
    let r = &c.r;
    let mut d = QDict::new();
    d.str("filename", c.filename.clone());
    d.str("format", c.format.clone());
    d.int("check-errors", r.check_errors);
    let mut opt = |k: &str, v: Option<u64>| {
        if let Some(v) = v.filter(|&v| v != 0) {
            d.int(k, v);
        }
    };
    opt("image-end-offset", r.image_end_offset);
    opt("corruptions", Some(r.corruptions));
    opt("leaks", Some(r.leaks));
    opt("corruptions-fixed", Some(r.corruptions_fixed));
    opt("leaks-fixed", Some(r.leaks_fixed));
    opt("total-clusters", r.total_clusters);
    opt("allocated-clusters", r.allocated_clusters);
    opt("fragmented-clusters", r.fragmented_clusters);
    opt("compressed-clusters", r.compressed_clusters);
    d
}

fn human(r: &CheckReport, quiet: bool) {
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        crate::qprintln!(quiet, "No errors were found on the image.");
    } else {
        if r.corruptions != 0 {
            crate::qprintln!(
                quiet,
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                r.corruptions
            );
        }
        if r.leaks != 0 {
            crate::qprintln!(
                quiet,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                r.leaks
            );
        }
        if r.check_errors != 0 {
            crate::qprintln!(
                quiet,
                "\n{} internal errors have occurred during the check.",
                r.check_errors
            );
        }
    }
    let total = r.total_clusters.unwrap_or(0);
    let alloc = r.allocated_clusters.unwrap_or(0);
    if total != 0 && alloc != 0 {
        let frag = r.fragmented_clusters.unwrap_or(0);
        let comp = r.compressed_clusters.unwrap_or(0);
        crate::qprintln!(
            quiet,
            "{}/{} = {}% allocated, {}% fragmented, {}% compressed clusters",
            alloc,
            total,
            c_format_f64("%0.2f", alloc as f64 * 100.0 / total as f64),
            c_format_f64("%0.2f", frag as f64 * 100.0 / alloc as f64),
            c_format_f64("%0.2f", comp as f64 * 100.0 / alloc as f64)
        );
    }
    if let Some(end) = r.image_end_offset.filter(|&e| e != 0) {
        crate::qprintln!(quiet, "Image end offset: {end}");
    }
}

/// The line qemu-img prints on stderr for a finding, or `None` where it prints none
/// (QEMU's QED check only counts its problems).
fn render(f: &Finding) -> Option<String> {
    use FindingKind as K;
    let repairing = f.outcome == Outcome::Repairing;
    let n = |v: Option<u64>| v.unwrap_or(0);
    let entry = n(f.entry);
    let value = n(f.entry_value);
    let off = n(f.host_offset);
    let cluster = n(f.cluster);
    let refcount = n(f.refcount);
    let references = n(f.references);
    Some(match &f.kind {
        K::ReferencePastEnd => format!(
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {:#x}",
            n(f.length)
        ),
        K::ReservedBits => {
            let what = if f.structure == Structure::L2Table {
                "l2"
            } else {
                "L1"
            };
            if repairing {
                format!("Repairing {what} entry with reserved bits set: {value:x}")
            } else {
                format!("ERROR found {what} entry with reserved bits set: {value:x}")
            }
        }
        K::Unaligned => match f.structure {
            Structure::L2Table => format!(
                "ERROR l2_offset={off:x}: Table is not cluster aligned; L1 entry corrupted"
            ),
            Structure::RefcountBlock => format!(
                "ERROR refcount block {entry} is not cluster aligned; refcount table entry corrupted"
            ),
            _ => format!(
                "ERROR offset={off:x}: Cluster is not properly aligned; L2 entry corrupted."
            ),
        },
        K::CompressedCopied => format!(
            "ERROR: cluster {cluster}: copied flag must never be set for compressed clusters"
        ),
        K::SubclusterBitmap => match f.structure {
            Structure::CompressedCluster => format!(
                "ERROR compressed cluster {entry} with non-zero subcluster allocation bitmap, entry={value:#x}"
            ),
            Structure::DataCluster => format!(
                "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            ),
            _ => "ERROR: Unallocated cluster has non-zero subcluster allocation map".to_string(),
        },
        K::BitmapExtensionTooShort => "ERROR bitmaps extension is too short".to_string(),
        K::BitmapExtensionInvalid { bitmaps } => format!(
            "ERROR bitmaps extension is invalid ({bitmaps} bitmaps, directory {} bytes)",
            n(f.length)
        ),
        K::BitmapEntryPastDirectory => {
            format!("ERROR bitmap directory entry {entry} runs past the directory")
        }
        K::BitmapTableTooLarge => format!("ERROR bitmap {entry}: bitmap table too large"),
        K::RefcountStructureUnusable(why) => format!("ERROR {why}"),
        K::RefcountBlockOutsideImage => format!("ERROR refcount block {entry} is outside image"),
        K::RefcountBlockShared => {
            format!("ERROR refcount block {entry} refcount={references}")
        }
        K::RefcountUnreadable => {
            format!("Can't get refcount for cluster {cluster}: Input/output error")
        }
        K::RefcountTooLow | K::LeakedCluster => {
            let label = if repairing {
                "Repairing"
            } else if f.kind == K::RefcountTooLow {
                "ERROR"
            } else {
                "Leaked"
            };
            format!("{label} cluster {cluster} refcount={refcount} reference={references}")
        }
        K::RefcountRebuild => "Rebuilding refcount structure".to_string(),
        K::RebuildNeeded => "ERROR need to rebuild refcount structures".to_string(),
        K::CopiedFlag => {
            let label = if repairing { "Repairing" } else { "ERROR" };
            if f.structure == Structure::L2Table {
                format!(
                    "{label} OFLAG_COPIED L2 cluster: l1_index={entry} l1_entry={value:x} refcount={refcount}"
                )
            } else {
                format!("{label} OFLAG_COPIED data cluster: l2_entry={value:x} refcount={refcount}")
            }
        }
        K::VdiBlockShared => format!("ERROR: block index {value} also used by {value}"),
        K::VdiBlockOutOfRange => format!("ERROR: block index {entry} too large, is {value}"),
        K::VdiAllocatedMismatch => format!(
            "ERROR: allocated blocks mismatch, is {references}, should be {refcount}"
        ),
        K::InvalidOffset | K::ReferencedTwice | K::Unreadable | K::WriteBackFailed => {
            return None
        }
    })
}

/// Runs the check, printing a line per finding to stderr as qemu does. A check that
/// stopped early (`aborted`) becomes an error after its lines.
fn do_check(img: &vdisk::Image, repair: Repair) -> Result<CheckReport, Error> {
    let r = img.check(repair)?;
    for line in r.findings.iter().filter_map(render) {
        eprintln!("{line}");
    }
    match r.aborted {
        Some(why) => Err(std::io::Error::from_raw_os_error(why.errno()).into()),
        None => Ok(r),
    }
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    let json = match common::parse_output(&a.output) {
        Ok(j) => j,
        Err(e) => {
            common::error(e);
            return 1;
        }
    };
    let repair = match a.repair.as_deref() {
        None => Repair::default(),
        Some("leaks") => Repair {
            leaks: true,
            errors: false,
        },
        Some("all") => Repair {
            leaks: true,
            errors: true,
        },
        Some(_) => {
            common::error("Unknown option for -r (expecting 'leaks' or 'all')");
            return 1;
        }
    };
    let fix = repair.leaks || repair.errors;
    if fix && a.force_share {
        common::error("--force-share/-U is not allowed when repairing");
        return 1;
    }
    let format = match common::parse_format(a.format.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            common::error(format!("Could not open '{}': {e}", a.filename));
            return 1;
        }
    };
    let cache = match common::parse_cache(a.cache.as_deref(), vdisk::CacheMode::Writeback) {
        Ok(c) => c,
        Err(e) => {
            common::error(e);
            return 1;
        }
    };
    let mut oo = OpenOptions {
        // qemu-img opens images without BDRV_O_UNMAP (only a convert target has it).
        discard: vdisk::policy::DiscardMode::Ignore,
        format,
        read_only: !fix,
        force_share: a.force_share,
        cache,
        image_opts: a.image_opts,
        ..OpenOptions::default()
    };
    oo.driver.skip_repair = true;
    let img = match common::open_image_with(&a.filename, &oo) {
        Ok(i) => i,
        Err(e) => {
            common::error(e);
            return 1;
        }
    };
    let fmt_name = img.format().name().to_string();

    let first = match do_check(&img, repair) {
        Ok(r) => r,
        Err(Error::Unsupported(_)) => {
            common::error("This image format does not support checks");
            return 63;
        }
        Err(e) => {
            common::error(format!("Check failed: {e}"));
            return 1;
        }
    };
    let mut report = first.clone();
    if first.corruptions_fixed != 0 || first.leaks_fixed != 0 {
        if !json {
            crate::qprintln!(
                a.quiet,
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                first.leaks_fixed,
                first.corruptions_fixed
            );
        }
        report = match do_check(&img, Repair::default()) {
            Ok(r) => r,
            Err(e) => {
                common::error(format!("Check failed: {e}"));
                return 1;
            }
        };
        report.leaks_fixed = first.leaks_fixed;
        report.corruptions_fixed = first.corruptions_fixed;
    }
    if json {
        let c = ImageCheck {
            filename: a.filename.clone(),
            format: fmt_name,
            r: report.clone(),
        };
        crate::qprintln!(a.quiet, "{}", to_json_pretty(&QValue::Dict(to_qdict(&c))));
    } else {
        human(&report, a.quiet);
    }
    if let Err(e) = img.close() {
        common::error(e);
        return 1;
    }
    if report.check_errors != 0 {
        common::error("Check failed");
        1
    } else if report.corruptions != 0 {
        2
    } else if report.leaks != 0 {
        3
    } else {
        0
    }
}
