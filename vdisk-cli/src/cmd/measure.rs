//! `vdisk measure`: the file size a new image needs, for a size or for an existing
//! image's contents, human or JSON, as `qemu-img measure`.

use crate::common;
use crate::output::{to_json_pretty, QDict, QValue};
use vdisk::format::measure::{measure, MeasureSource};
use vdisk::format::FormatSpecific;
use vdisk::{Format, OpenOptions};

/// Arguments of `vdisk measure`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format: human or json.
    #[arg(long = "output", action = clap::ArgAction::Append)]
    pub output: Vec<String>,
    /// Format of the image to create (default raw).
    #[arg(short = 'O', action = clap::ArgAction::Append)]
    pub out_format: Vec<String>,
    /// Creation options of the new image (repeatable).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    pub options: Vec<String>,
    /// Guest size of a new empty image (k, M, G, T, P, E suffixes).
    #[arg(long = "size", action = clap::ArgAction::Append)]
    pub size: Vec<String>,
    /// Format of the input image (probed when absent).
    #[arg(short = 'f', long = "format", action = clap::ArgAction::Append)]
    pub format: Vec<String>,
    /// Snapshot of the input image to measure (`snapshot.id=…,snapshot.name=…`).
    #[arg(short = 'l', action = clap::ArgAction::Append)]
    pub snapshot: Vec<String>,
    /// Open the input in shared mode.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Treat the image name as a key=value option list.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Input image.
    pub filenames: Vec<String>,
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    common::exit_code(run_inner(a))
}

fn usage(msg: &str) -> String {
    common::error(msg);
    eprintln!("Try 'vdisk measure --help' for more info");
    String::new()
}

fn run_inner(a: Args) -> Result<(), String> {
    let json = match a.output.last().map(String::as_str) {
        None | Some("human") => false,
        Some("json") => true,
        Some(o) => {
            return Err(usage(&format!(
                "--output expects 'human' or 'json' not '{o}'"
            )))
        }
    };
    let size = match a.size.last() {
        None => None,
        Some(s) => Some(
            common::parse_size_arg(s)
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| format!("Invalid image size specified: '{s}'."))?,
        ),
    };
    if a.filenames.len() > 1 {
        return Err(usage("Expecting one image file name"));
    }
    let filename = a.filenames.first();
    if filename.is_none() && (a.image_opts || !a.format.is_empty() || !a.snapshot.is_empty()) {
        return Err("--image-opts, -f, and -l require a filename argument.".into());
    }
    if filename.is_some() && size.is_some() {
        return Err("--size N cannot be used together with a filename.".into());
    }
    if filename.is_none() && size.is_none() {
        return Err("Either --size N or one filename must be specified.".into());
    }
    let input = match filename {
        Some(f) => {
            let format = common::parse_format(a.format.last().map(String::as_str))
                .map_err(|e| format!("Could not open '{f}': {e}"))?;
            let img = common::open_image_with(
                f,
                &OpenOptions {
                    format,
                    read_only: true,
                    force_share: a.force_share,
                    image_opts: a.image_opts,
                    ..OpenOptions::default()
                },
            )?;
            if let Some(l) = a.snapshot.last() {
                crate::cmd::snapshot::load(&img, l)?;
            }
            Some(img)
        }
        None => None,
    };
    let out_name = a.out_format.last().map_or("raw", String::as_str);
    let out = Format::parse(out_name).map_err(|_| format!("Unknown file format '{out_name}'"))?;
    if !out.can_create() {
        return Err(format!(
            "Format driver '{out_name}' does not support image creation"
        ));
    }
    let options = common::parse_options(&a.options).map_err(|e| {
        common::error(e);
        format!("Invalid options for file format '{out_name}'")
    })?;
    let info = match &input {
        None => measure(out, &options, MeasureSource::Size(size.unwrap_or(0))),
        Some(img) => {
            // As qemu-img: the chain's status, with data runs of a layer qemu would
            // recurse into (a qcow2 that looks metadata-preallocated) refined by the
            // host file's holes, which then count as zeroes.
            let chain = common::layers(img);
            let mut recurse = vec![None; chain.len()];
            let mut status = |off: u64, len: u64| {
                let s = common::refined_chain_status(&chain, &mut recurse, off, len)?;
                let kind = if s.zero {
                    vdisk::ExtentKind::Zero
                } else if s.data {
                    vdisk::ExtentKind::Data
                } else {
                    vdisk::ExtentKind::Unallocated
                };
                Ok((kind, s.len))
            };
            // Persistent bitmaps live in qcow2 inputs (none are measured yet: their
            // size is 0 until vdisk writes bitmaps).
            let bitmaps =
                matches!(img.format_specific(), FormatSpecific::Qcow2 { .. }).then_some(0);
            measure(
                out,
                &options,
                MeasureSource::Image {
                    size: img.size(),
                    status: &mut status,
                    bitmaps,
                },
            )
        }
    };
    let info = info.map_err(|e| match e {
        vdisk::Error::InvalidArgument(vdisk::error::Invalid::UnknownOption(_)) => {
            common::error(&e);
            format!("Invalid options for file format '{out_name}'")
        }
        e => e.to_string(),
    })?;
    if json {
        let mut d = QDict::new();
        if let Some(b) = info.bitmaps {
            d.int("bitmaps", b);
        }
        d.int("required", info.required);
        d.int("fully-allocated", info.fully_allocated);
        crate::outln!("{}", to_json_pretty(&QValue::Dict(d)));
    } else {
        crate::outln!("required size: {}", info.required);
        crate::outln!("fully allocated size: {}", info.fully_allocated);
        if let Some(b) = info.bitmaps {
            crate::outln!("bitmaps size: {b}");
        }
    }
    Ok(())
}
