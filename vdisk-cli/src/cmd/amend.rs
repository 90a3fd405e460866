//! `vdisk amend`: changes options of an existing image (qcow2: compat, refcount_bits,
//! lazy_refcounts, size), as `qemu-img amend`.

use crate::common;
use crate::progress::Progress;
use vdisk::error::Invalid;
use vdisk::{Error, Format, OpenOptions};

/// Arguments of `vdisk amend`.
#[derive(clap::Args)]
pub struct Args {
    /// Options to change (repeatable; `help` lists them).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    pub options: Vec<String>,
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format", action = clap::ArgAction::Append)]
    pub format: Vec<String>,
    /// Cache mode (default writeback).
    #[arg(short = 't', action = clap::ArgAction::Append)]
    pub cache: Vec<String>,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Allow operations qemu-img only does when forced (erasing the last LUKS key
    /// slot, overwriting an active one).
    #[arg(long = "force")]
    pub force: bool,
    /// Treat the image name as a key=value option list.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Image file.
    pub filenames: Vec<String>,
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    common::exit_code(run_inner(a))
}

fn usage(msg: &str) -> String {
    common::error(msg);
    eprintln!("Try 'vdisk amend --help' for more info");
    String::new()
}

fn help(f: Format) -> Result<(), String> {
    match f.amend_options() {
        Some(opts) => {
            crate::outp!(
                "{}",
                vdisk::format::options::render_amend_help(f.name(), opts)
            );
            Ok(())
        }
        None => Err(format!(
            "Format driver '{}' does not support option amendment",
            f.name()
        )),
    }
}

fn run_inner(a: Args) -> Result<(), String> {
    if a.options.is_empty() {
        return Err(usage("Must specify options (-o)"));
    }
    let pairs: Vec<String> = a.options.clone();
    let wants_help = pairs
        .iter()
        .flat_map(|o| vdisk::storage::spec::split_items(o))
        .any(|i| i == "help" || i == "?");
    let format =
        common::parse_format(a.format.last().map(String::as_str)).map_err(|e| e.to_string())?;
    if wants_help {
        if let Some(f) = format {
            return help(f);
        }
    }
    if a.filenames.len() != 1 {
        return Err(usage("Expecting one image file name"));
    }
    let filename = &a.filenames[0];
    let cache = common::parse_cache(
        a.cache.last().map(String::as_str),
        vdisk::CacheMode::Writeback,
    )?;
    let img = common::open_image_with(
        filename,
        &OpenOptions {
            format,
            read_only: false,
            cache,
            image_opts: a.image_opts,
            ..OpenOptions::default()
        },
    )?;
    if wants_help {
        return help(img.format());
    }
    let options = common::parse_options(&pairs)?;
    // qemu-img starts its progress only once the options parsed (an option only
    // creation takes is refused before), then prints 0.00, the driver's steps, and
    // 100.00 with the newline whether the amend worked or not.
    let on = a.progress && !a.quiet;
    let progress: std::sync::OnceLock<Progress> = std::sync::OnceLock::new();
    let start = || progress.get_or_init(|| Progress::start(on, 1));
    let r = img.amend_with(&options, a.force, &|done, total| {
        start().amend_status(done, total)
    });
    let closed = img.close();
    if matches!(
        r,
        Err(Error::InvalidArgument(
            Invalid::NotAmendable(_) | Invalid::UnknownOption(_)
        ))
    ) {
        // Refused while parsing: qemu-img's progress never started, only its end.
        if on {
            crate::outln!();
        }
    } else {
        let p = start();
        p.absolute(100.0);
        p.end();
    }
    match r {
        Ok(()) => {}
        Err(Error::InvalidArgument(Invalid::NotAmendable(k))) => {
            common::error(format!("Invalid parameter '{k}'"));
            eprintln!("This option is only supported for image creation");
            return Err(String::new());
        }
        Err(Error::InvalidArgument(Invalid::AmendBacking)) => {
            common::error("Cannot amend the backing file");
            eprintln!("You can use 'vdisk rebase' instead.");
            return Err(String::new());
        }
        Err(e) => return Err(e.to_string()),
    }
    closed.map_err(|e| e.to_string())?;
    Ok(())
}
