//! `vdisk create`: creates an image, printing qemu-img's `Formatting ...` line.

use crate::common::{self, parse_options};
use std::path::Path;
use vdisk::format::options::{self, OptionValues};
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

/// Prints `-o help` like qemu-img, from the format's declared options (and, when the
/// target file name is known, its protocol's). Formats that cannot be created have none.
pub fn print_help(f: Format, filename: Option<&str>) -> Result<(), String> {
    if !f.can_create() {
        return Err(f.no_create_error().to_string());
    }
    let proto = filename.map(|_| f.protocol_options());
    crate::outp!(
        "{}",
        options::render_help(f.name(), f.create_options(), proto)
    );
    Ok(())
}

/// Whether `-o` asks for help (`help` or `?`).
pub fn wants_help(options: &[String]) -> bool {
    options
        .iter()
        .flat_map(|o| o.split(','))
        .any(|o| o == "help" || o == "?")
}

/// The `Formatting '...', fmt=... ...` line qemu-img prints before creating.
pub fn formatting_line(filename: &str, f: Format, values: &OptionValues) -> String {
    let mut s = format!("Formatting '{filename}', fmt={}", f.name());
    for (k, v) in options::formatting_pairs(f.create_options(), f.protocol_options(), values) {
        s.push_str(&format!(" {k}={v}"));
    }
    s
}

/// Type-checks `-o` pairs against the format's declared options, with qemu's wording
/// (unknown names, malformed sizes, bools and numbers are refused before anything).
pub fn check_options(f: Format, opts: &[(String, String)]) -> Result<OptionValues, String> {
    vdisk::format::registry::parse_create_options(f, opts).map_err(|e| e.to_string())
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
    let Some(format) = Format::by_name(&fmt_name) else {
        let who = a.filename.clone().unwrap_or_default();
        return Err(format!("{who}: Unknown file format '{fmt_name}'"));
    };
    if wants_help(&a.options) {
        return print_help(format, a.filename.as_deref());
    }
    let Some(filename) = a.filename.clone() else {
        return Err("Expecting image file name".into());
    };
    let ctx = |e: String| format!("{filename}: {e}");
    if !format.can_create() {
        return Err(ctx(format.no_create_error().to_string()));
    }
    let mut opts = parse_options(&a.options).map_err(ctx)?;
    let typed = check_options(format, &opts).map_err(ctx)?;

    // -b/-F and -o backing_file/backing_fmt are the same thing.
    let backing = typed
        .str("backing_file")
        .map(str::to_string)
        .or(a.backing.clone());
    let backing_fmt_name = typed
        .str("backing_fmt")
        .map(str::to_string)
        .or(a.backing_format.clone());
    let mut size = typed.size("size");
    if let Some(s) = &a.size {
        size = Some(parse_create_size(s)?);
    }
    let backing_fmt = match &backing_fmt_name {
        Some(n) => Some(Format::parse(n).map_err(|_| ctx(format!("Unknown driver '{n}'")))?),
        None => None,
    };
    if backing.is_some() && !format.caps().backing {
        return Err(ctx(format!(
            "Backing file not supported for file format '{format}'"
        )));
    }
    if let Some(b) = &backing {
        let bpath = vdisk::chain::resolve_backing_path(Path::new(&filename), b);
        if !a.unsafe_backing {
            let bimg = vdisk::Image::open(
                &bpath,
                &OpenOptions {
                    // qemu-img opens images without BDRV_O_UNMAP (only a convert target has it).
                    discard: vdisk::policy::DiscardMode::Ignore,
                    format: backing_fmt,
                    read_only: true,
                    force_share: true,
                    // Its size only: an encrypted backing file needs no key (as qemu-img).
                    driver: vdisk::format::DriverOptions {
                        no_io: true,
                        ..Default::default()
                    },
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
    shown.push(("size".into(), size.to_string()));
    if let Some(b) = &backing {
        shown.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &backing_fmt {
        shown.push(("backing_fmt".into(), f.name().into()));
    }
    let shown = check_options(format, &shown).map_err(ctx)?;
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
