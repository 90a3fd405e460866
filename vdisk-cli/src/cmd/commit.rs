//! `vdisk commit`: writes what an image (and the images between it and the base)
//! holds into its backing file or a base further down, then empties it, as
//! `qemu-img commit`.
//!
//! The chain is opened once read-only to find the layers; then the base is opened
//! read-write (with its own backing files, for copy-on-write of partial clusters),
//! and the top and intermediate images alone (no backing files), so each host file is
//! opened once with the locks qemu-img takes. Data allocated above the base is copied
//! range by range from the topmost layer holding it (zero ranges become zero writes);
//! the base grows first when it is smaller. Crash safety: the base is flushed and
//! closed before the top is emptied, so a crash at any point leaves the top's view of
//! the disk intact (the top still holds every byte, or the base does).

use crate::common;
use crate::progress::Progress;
use std::time::{Duration, Instant};
use vdisk::{CacheMode, Image, OpenOptions};

/// Arguments of `vdisk commit`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format", action = clap::ArgAction::Append)]
    pub format: Vec<String>,
    /// Cache mode for the images (default writeback).
    #[arg(short = 't', action = clap::ArgAction::Append)]
    pub cache: Vec<String>,
    /// Commit into this image of the backing chain (implies -d).
    #[arg(short = 'b', action = clap::ArgAction::Append)]
    pub base: Vec<String>,
    /// Do not empty the image after committing.
    #[arg(short = 'd')]
    pub drop: bool,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Rate limit in bytes per second (k, M, G suffixes).
    #[arg(short = 'r', action = clap::ArgAction::Append)]
    pub rate: Vec<String>,
    /// Treat the image name as a key=value option list.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Image file.
    pub filename: String,
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    common::exit_code(run_inner(a))
}

fn run_inner(a: Args) -> Result<(), String> {
    let filename = &a.filename;
    let format = common::parse_format(a.format.last().map(String::as_str))
        .map_err(|e| format!("Could not open '{filename}': {e}"))?;
    let cache = common::parse_cache(a.cache.last().map(String::as_str), CacheMode::Writeback)?;
    let rate = match a.rate.last() {
        None => None,
        Some(r) => Some(
            common::parse_size_arg(r)
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("Invalid rate limit specified: '{r}'."))?,
        ),
    };
    // -b implies -d: the images between base and top would read wrong afterwards.
    let keep_top = a.drop || !a.base.is_empty();
    let progress_on = a.progress && !a.quiet;
    // The chain, read-only, to find the layers.
    let chain = common::open_image_with(
        filename,
        &OpenOptions {
            format,
            read_only: true,
            cache,
            image_opts: a.image_opts,
            ..OpenOptions::default()
        },
    )?;
    let layers = chain.layers();
    if layers.len() < 2 {
        return Err("Image does not have a backing file".into());
    }
    let base_idx = match a.base.last() {
        None => 1,
        Some(b) => {
            let want = std::fs::canonicalize(b).ok();
            layers
                .iter()
                .enumerate()
                .skip(1)
                .find(|(_, l)| want.is_some() && std::fs::canonicalize(l.path()).ok() == want)
                .map(|(i, _)| i)
                .ok_or_else(|| format!("Did not find '{b}' in the backing chain of '{filename}'"))?
        }
    };
    let top_path = layers[0].path().to_path_buf();
    let paths: Vec<(std::path::PathBuf, vdisk::Format)> = layers[..=base_idx]
        .iter()
        .map(|l| (l.path().to_path_buf(), l.format()))
        .collect();
    // The views hold the chain open (and locked): let them go first.
    std::mem::drop(layers);
    drop_image(chain)?;
    let size = {
        let top = open_layer(&paths[0], true, cache)?;
        let s = top.size();
        drop_image(top)?;
        s
    };
    // The base, read-write, with its own backing files.
    let base = Image::open(
        &paths[base_idx].0,
        &OpenOptions {
            format: Some(paths[base_idx].1),
            read_only: false,
            cache,
            ..OpenOptions::default()
        },
    )
    .map_err(|e| format!("Could not open '{}': {e}", paths[base_idx].0.display()))?;
    let above: Vec<Image> = paths[..base_idx]
        .iter()
        .map(|p| open_layer(p, true, cache))
        .collect::<Result<_, _>>()?;
    if base.size() < size {
        base.resize(size, false).map_err(|e| e.to_string())?;
    }
    let progress = Progress::start(progress_on, size);
    let start = Instant::now();
    vdisk::commit::commit_into(&above, &base, size, &mut |off, copied| {
        if let Some(r) = rate {
            let due = Duration::from_secs_f64(copied as f64 / r as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        progress.set(off);
    })
    .map_err(|e| e.to_string())?;
    drop_image(base)?;
    progress.hundred();
    std::mem::drop(above);
    if !keep_top {
        let top = open_layer(&(top_path, paths[0].1), false, cache)?;
        match top.make_empty() {
            Ok(()) => {}
            // Formats that cannot be emptied stay as they are, like qemu-img.
            Err(e) if e.errno() == libc::ENOTSUP => {}
            Err(e) => return Err(e.to_string()),
        }
        drop_image(top)?;
    }
    progress.end();
    crate::qprintln!(a.quiet, "Image committed.");
    Ok(())
}

/// Opens one image of the chain alone (no backing files).
fn open_layer(
    p: &(std::path::PathBuf, vdisk::Format),
    read_only: bool,
    cache: CacheMode,
) -> Result<Image, String> {
    Image::open(
        &p.0,
        &OpenOptions {
            format: Some(p.1),
            read_only,
            cache,
            no_backing: true,
            ..OpenOptions::default()
        },
    )
    .map_err(|e| format!("Could not open '{}': {e}", p.0.display()))
}

fn drop_image(img: Image) -> Result<(), String> {
    img.close().map_err(|e| e.to_string())
}
