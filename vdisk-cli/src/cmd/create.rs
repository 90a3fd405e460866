//! `vdisk create`: creates an image, printing qemu-img's `Formatting ...` line.

use crate::common::{self, parse_options};
use std::path::Path;
use vdisk::{CreateOptions, Format, OpenOptions};

/// Arguments of `vdisk create`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (default raw).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Format options, `key=value[,key=value...]` (`-o help` lists them).
    #[arg(short = 'o', long = "options")]
    pub options: Vec<String>,
    /// Backing file of the new image.
    #[arg(short = 'b', long = "backing")]
    pub backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', long = "backing-format")]
    pub backing_format: Option<String>,
    /// Do not open the backing file (its size then cannot be used).
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_backing: bool,
    /// Quiet: no `Formatting` line.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Image file to create (overwritten if it exists).
    pub filename: Option<String>,
    /// Size, with optional k, M, G, T, P, E suffix.
    #[arg(allow_hyphen_values = true)]
    pub size: Option<String>,
}

/// How a creation option is printed, in the order qemu's option list declares it.
struct OptDesc {
    name: &'static str,
    /// Printed when not given.
    default: Option<&'static str>,
    /// A size: printed as a plain number of bytes.
    size: bool,
    help: &'static str,
    kind: &'static str,
}

const fn od(
    name: &'static str,
    default: Option<&'static str>,
    size: bool,
    kind: &'static str,
    help: &'static str,
) -> OptDesc {
    OptDesc {
        name,
        default,
        size,
        help,
        kind,
    }
}

// Options several formats declare identically.
const SIZE_OPT: OptDesc = od("size", None, true, "size", "Virtual disk size");
const BACKING_FILE_OPT: OptDesc = od(
    "backing_file",
    None,
    false,
    "str",
    "File name of a base image",
);
const BACKING_FMT_OPT: OptDesc = od(
    "backing_fmt",
    None,
    false,
    "str",
    "Image format of the base image",
);
const NOCOW_OPT: OptDesc = od(
    "nocow",
    None,
    false,
    "bool (on/off)",
    "Turn off copy-on-write (valid only on btrfs)",
);
/// Preallocation of raw and QED (qcow2 adds `metadata`).
const PREALLOC_OPT: OptDesc = od(
    "preallocation",
    None,
    false,
    "str",
    "Preallocation mode (allowed values: off, falloc, full)",
);

const QCOW2_OPTS: &[OptDesc] = &[
    od(
        "cluster_size",
        Some("65536"),
        true,
        "size",
        "qcow2 cluster size",
    ),
    od(
        "extended_l2",
        Some("off"),
        false,
        "bool (on/off)",
        "Extended L2 tables",
    ),
    od(
        "preallocation",
        None,
        false,
        "str",
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    od(
        "compression_type",
        Some("zlib"),
        false,
        "str",
        "Compression method used for image cluster compression",
    ),
    SIZE_OPT,
    od(
        "compat",
        None,
        false,
        "str",
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    BACKING_FILE_OPT,
    BACKING_FMT_OPT,
    od(
        "data_file",
        None,
        false,
        "str",
        "File name of an external data file",
    ),
    od(
        "data_file_raw",
        None,
        false,
        "bool (on/off)",
        "The external data file must stay valid as a raw image",
    ),
    od(
        "lazy_refcounts",
        Some("off"),
        false,
        "bool (on/off)",
        "Postpone refcount updates",
    ),
    od(
        "refcount_bits",
        Some("16"),
        false,
        "num",
        "Width of a reference count entry in bits",
    ),
    NOCOW_OPT,
];

const QED_OPTS: &[OptDesc] = &[
    SIZE_OPT,
    BACKING_FILE_OPT,
    BACKING_FMT_OPT,
    od(
        "cluster_size",
        Some("65536"),
        true,
        "size",
        "Cluster size (in bytes)",
    ),
    od(
        "table_size",
        None,
        true,
        "size",
        "L1/L2 table size (in clusters)",
    ),
    PREALLOC_OPT,
    NOCOW_OPT,
];

const RAW_OPTS: &[OptDesc] = &[SIZE_OPT, PREALLOC_OPT, NOCOW_OPT];

/// The creation options a format accepts, in qemu's print order.
fn opt_descs(f: Format) -> &'static [OptDesc] {
    match f {
        Format::Qcow2 => QCOW2_OPTS,
        Format::Qed => QED_OPTS,
        Format::Raw => RAW_OPTS,
    }
}

/// Prints `-o help` like qemu-img (format-level options, sorted by name).
fn print_help(f: Format) {
    println!("Supported {} options:", f.name());
    let mut v: Vec<&OptDesc> = opt_descs(f)
        .iter()
        .filter(|d| d.name != "nocow" && (f != Format::Raw || d.name == "size"))
        .filter(|d| !(f == Format::Qed && d.name == "preallocation"))
        .collect();
    v.sort_by_key(|d| d.name);
    for d in v {
        let left = format!("{}=<{}>", d.name, d.kind);
        println!("  {left:<22} - {}", d.help);
    }
    println!();
    println!("The protocol level may support further options.");
    println!("Specify the target filename to include those options.");
}

/// The `Formatting '...', fmt=... ...` line qemu-img prints before creating.
pub fn formatting_line(filename: &str, f: Format, opts: &[(String, String)]) -> String {
    let mut s = format!("Formatting '{filename}', fmt={}", f.name());
    for d in opt_descs(f) {
        let given = opts.iter().rev().find(|(k, _)| k == d.name).map(|(_, v)| v);
        let value = match given {
            Some(v) if d.size => vdisk::format::parse_size(v)
                .map(|n| n.to_string())
                .unwrap_or_else(|_| v.clone()),
            Some(v) => v.clone(),
            None => match d.default {
                Some(v) => v.to_string(),
                None => continue,
            },
        };
        s.push_str(&format!(" {}={}", d.name, value));
    }
    s
}

/// Checks option names against the format; qemu rejects unknown ones before anything.
pub fn validate_option_names(f: Format, opts: &[(String, String)]) -> Result<(), String> {
    let descs = opt_descs(f);
    for (k, _) in opts {
        let known = descs.iter().any(|d| d.name == k)
            || (f == Format::Qcow2 && (k == "encryption" || k.starts_with("encrypt.")));
        if !known {
            return Err(format!("Invalid parameter '{k}'"));
        }
    }
    Ok(())
}

/// Parses the size argument of `create`, with qemu-img's messages.
fn parse_create_size(s: &str) -> Result<u64, String> {
    let bad_range =
        || "Invalid image size specified. Must be between 0 and 9223372036854775807.".to_string();
    if s.starts_with('-') {
        return Err(bad_range());
    }
    match common::parse_size_arg(s) {
        Some(n) if n <= i64::MAX as u64 => Ok(n),
        Some(_) => Err(bad_range()),
        None => Err(format!("Invalid image size specified: '{s}'.")),
    }
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    common::exit_code(run_inner(a))
}

fn run_inner(a: Args) -> Result<(), String> {
    let fmt_name = a.format.clone().unwrap_or_else(|| "raw".into());
    let wants_help = a.options.iter().any(|o| o == "help" || o == "?");
    let format = match Format::parse(&fmt_name) {
        Ok(f) => f,
        Err(_) => {
            let who = a.filename.clone().unwrap_or_default();
            return Err(format!("{who}: Unknown file format '{fmt_name}'"));
        }
    };
    if wants_help {
        print_help(format);
        return Ok(());
    }
    let Some(filename) = a.filename.clone() else {
        return Err("Expecting image file name".into());
    };
    let ctx = |e: String| format!("{filename}: {e}");
    let mut opts = parse_options(&a.options).map_err(ctx)?;
    validate_option_names(format, &opts).map_err(ctx)?;

    // -b/-F and -o backing_file/backing_fmt are the same thing.
    let mut backing = a.backing.clone();
    let mut backing_fmt_name = a.backing_format.clone();
    let mut size: Option<u64> = None;
    for (k, v) in &opts {
        match k.as_str() {
            "backing_file" => backing = Some(v.clone()),
            "backing_fmt" => backing_fmt_name = Some(v.clone()),
            "size" => {
                size = Some(
                    vdisk::format::parse_size(v).map_err(|_| ctx(format!("Invalid size '{v}'")))?,
                )
            }
            _ => {}
        }
    }
    if let Some(s) = &a.size {
        size = Some(parse_create_size(s)?);
    }
    let backing_fmt = match &backing_fmt_name {
        Some(n) => Some(Format::parse(n).map_err(|_| ctx(format!("Unknown driver '{n}'")))?),
        None => None,
    };
    if backing.is_some() && format == Format::Raw {
        return Err(ctx(
            "Backing file not supported for file format 'raw'".into()
        ));
    }
    if let Some(b) = &backing {
        let bpath = vdisk::chain::resolve_backing_path(Path::new(&filename), b);
        if !a.unsafe_backing {
            let bimg = vdisk::Image::open(
                &bpath,
                &OpenOptions {
                    format: backing_fmt,
                    read_only: true,
                    force_share: true,
                    ..OpenOptions::default()
                },
            )
            .map_err(|e| ctx(format!("{e}\nCould not open backing image.")))?;
            if backing_fmt.is_none() {
                return Err(ctx(format!(
                    "Backing file specified without backing format\nDetected format of {}.",
                    bimg.format()
                )));
            }
            if size.is_none() {
                size = Some(bimg.size());
            }
        } else if backing_fmt.is_none() {
            return Err(ctx(
                "Backing file specified without backing format".to_string()
            ));
        }
    }
    let Some(size) = size else {
        return Err(ctx("Image creation needs a size parameter".into()));
    };

    // Print with the resolved size and backing, in qemu's option order.
    opts.retain(|(k, _)| k != "size" && k != "backing_file" && k != "backing_fmt");
    let mut shown = opts.clone();
    // nocow is a btrfs hint qemu passes to the host file; there is nothing to do here.
    opts.retain(|(k, _)| k != "nocow");
    shown.push(("size".into(), size.to_string()));
    if let Some(b) = &backing {
        shown.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &backing_fmt {
        shown.push(("backing_fmt".into(), f.name().into()));
    }
    crate::qprintln!(a.quiet, "{}", formatting_line(&filename, format, &shown));

    // qemu's block layer works in whole sectors: it creates images of the size rounded
    // up to 512 bytes (while printing the size as given).
    let size = size.div_ceil(512) * 512;
    let co = CreateOptions {
        format,
        size: Some(size),
        options: opts,
        backing_file: backing,
        backing_format: backing_fmt,
        unsafe_backing: true,
    };
    vdisk::Image::create(&filename, &co).map_err(|e| ctx(e.to_string()))
}
