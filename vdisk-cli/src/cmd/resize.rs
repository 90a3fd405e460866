//! `vdisk resize`: changes the guest size of an image, as `qemu-img resize`.

use crate::common;
use vdisk::format::PreallocMode;
use vdisk::OpenOptions;

/// Arguments of `vdisk resize`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Allow making the image smaller (data past the new end is lost).
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// Preallocation of the new area: off, metadata, falloc, full.
    #[arg(long = "preallocation")]
    pub preallocation: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Treat the image name as a key=value option list (`driver=qcow2,file.filename=X`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Image file.
    pub filename: String,
    /// New size, or `+N`/`-N` to grow/shrink by N (k, M, G, T, P, E suffixes).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

const SIZE_HELP: &str = "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    common::exit_code(run_inner(a))
}

fn run_inner(a: Args) -> Result<(), String> {
    let (rel, num) = match a.size.as_bytes().first() {
        Some(b'+') => (1i8, &a.size[1..]),
        Some(b'-') => (-1i8, &a.size[1..]),
        _ => (0i8, a.size.as_str()),
    };
    let n = common::parse_size_arg(num).ok_or_else(|| SIZE_HELP.to_string())?;
    let prealloc = a.preallocation.as_deref().unwrap_or("off");
    if !matches!(prealloc, "off" | "metadata" | "falloc" | "full") {
        return Err(format!("Invalid preallocation mode: '{prealloc}'"));
    }
    let format = common::parse_format(a.format.as_deref())
        .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
    let img = common::open_image_with(
        &a.filename,
        &OpenOptions {
            // qemu-img opens images without BDRV_O_UNMAP (only a convert target has it).
            discard: vdisk::policy::DiscardMode::Ignore,
            format,
            read_only: false,
            image_opts: a.image_opts,
            ..OpenOptions::default()
        },
    )?;
    let cur = img.size();
    let new_size = match rel {
        1 => cur.checked_add(n),
        -1 => cur.checked_sub(n),
        _ => Some(n),
    };
    let new_size = match new_size {
        Some(s) if s <= i64::MAX as u64 && (s > 0 || rel == 0) => s,
        _ => return Err("New image size must be positive".into()),
    };
    if new_size < cur && !a.shrink {
        common::error("Use the --shrink option to perform a shrink operation.");
        common::error("warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
        return Err(String::new());
    }
    if new_size < cur && prealloc != "off" {
        return Err("Preallocation can only be used for growing images".into());
    }
    let caps = img.format().caps();
    if caps.raw_data && prealloc == "metadata" {
        return Err("Unsupported preallocation mode: metadata".into());
    }
    // Formats whose QEMU driver cannot preallocate when growing (QED) refuse first.
    if !caps.raw_data && !caps.metadata_prealloc && prealloc != "off" {
        return Err(format!("Unsupported preallocation mode '{prealloc}'"));
    }
    img.resize(new_size, a.shrink).map_err(|e| e.to_string())?;
    if new_size > cur {
        let mode = match prealloc {
            "metadata" => Some(PreallocMode::Metadata),
            "falloc" => Some(PreallocMode::Falloc),
            "full" => Some(PreallocMode::Full),
            _ => None,
        };
        if let Some(mode) = mode {
            img.preallocate_grown(cur, new_size - cur, mode)
                .map_err(|e| format!("Could not preallocate new area: {e}"))?;
        }
    }
    img.close().map_err(|e| e.to_string())?;
    crate::qprintln!(a.quiet, "Image resized.");
    Ok(())
}
