//! `vdisk rebase`: changes an image's backing file, as `qemu-img rebase`.
//!
//! Safe mode (default) keeps the guest contents: every range the image leaves to its
//! backing file is compared between the old and the new backing file, and clusters
//! that differ are copied from the old one into the image before the header changes.
//! `-u` only rewrites the header.

use crate::common;
use vdisk::format::{BackingSpec, FormatSpecific};
use vdisk::{CacheMode, ExtentKind, Format, Image, ImageLayer, OpenOptions};

/// Largest comparison step.
const CHUNK: u64 = 2 << 20;

/// Arguments of `vdisk rebase`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// New backing file ("" removes the backing file).
    #[arg(short = 'b', long = "backing", allow_hyphen_values = true)]
    pub backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F', long = "backing-format")]
    pub backing_format: Option<String>,
    /// Unsafe: only change the name in the header.
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_mode: bool,
    /// Cache mode of the image.
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Cache mode of the backing files.
    #[arg(short = 'T', long = "source-cache")]
    pub src_cache: Option<String>,
    /// Write copied clusters compressed (qcow2).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Open backing files in shared mode.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Treat the image name as a key=value option list (`driver=qcow2,file.filename=X`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image.
    pub filename: String,
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    common::exit_code(run_inner(a))
}

fn run_inner(a: Args) -> Result<(), String> {
    let Some(backing) = a.backing.clone() else {
        return Err("Must specify backing file (-b) or use unsafe mode (-u)".into());
    };
    let format = common::parse_format(a.format.as_deref())
        .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
    let new_fmt = match &a.backing_format {
        Some(n) => Some(Format::parse(n).map_err(|_| format!("Unknown driver '{n}'"))?),
        None => None,
    };
    if !backing.is_empty() && new_fmt.is_none() {
        return Err(format!(
            "Could not change the backing file to '{backing}': backing format must be specified"
        ));
    }
    let cache = common::parse_cache(a.cache.as_deref(), CacheMode::Writeback)?;
    let src_cache = common::parse_cache(a.src_cache.as_deref(), CacheMode::Writeback)?;
    let img = common::open_image_with(
        &a.filename,
        &OpenOptions {
            // qemu-img opens images without BDRV_O_UNMAP (only a convert target has it).
            discard: vdisk::policy::DiscardMode::Ignore,
            format,
            read_only: false,
            cache,
            no_backing: a.unsafe_mode,
            image_opts: a.image_opts,
            ..OpenOptions::default()
        },
    )?;
    if a.compress && !img.format().caps().compression {
        return Err("Compression not supported for this file format".into());
    }
    let spec = (!backing.is_empty()).then(|| BackingSpec {
        name: backing.clone(),
        format: new_fmt,
    });
    let progress = crate::progress::Progress::start(a.progress && !a.quiet, img.size());
    if !a.unsafe_mode {
        let new_backing = match &spec {
            Some(s) => {
                let path = vdisk::chain::resolve_backing_path(img.path(), &s.name);
                let path = path.display().to_string();
                Some(common::open_image_with(
                    &path,
                    &OpenOptions {
                        // qemu-img opens images without BDRV_O_UNMAP (only a convert target has it).
                        discard: vdisk::policy::DiscardMode::Ignore,
                        format: new_fmt,
                        read_only: true,
                        force_share: a.force_share,
                        cache: src_cache,
                        ..OpenOptions::default()
                    },
                )?)
            }
            None => None,
        };
        copy_differences(&a, &img, new_backing.as_ref(), &progress)?;
    }
    img.set_backing(spec)
        .map_err(|e| format!("Could not change the backing file to '{backing}': {e}"))?;
    progress.finish();
    img.close().map_err(|e| e.to_string())
}

/// Copies into `img` the clusters it leaves to its backing file whose old contents differ
/// from what the new backing file (or zeroes) would give.
fn copy_differences(
    a: &Args,
    img: &Image,
    new: Option<&Image>,
    progress: &crate::progress::Progress,
) -> Result<(), String> {
    let old: Option<ImageLayer> = img.backing();
    let size = img.size();
    let mut cluster = img.cluster_size().unwrap_or(65536).clamp(512, CHUNK);
    // As qemu-img: differences are written in the image's allocation unit, the
    // subcluster when the image has them (compressed writes need whole clusters).
    if !a.compress
        && matches!(
            img.format_specific(),
            FormatSpecific::Qcow2 {
                extended_l2: true,
                ..
            }
        )
    {
        cluster = (cluster / 32).max(512);
    }
    let mut old_buf = vec![0u8; CHUNK as usize];
    let mut new_buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < size {
        let want = (size - off).min(CHUNK - off % CHUNK);
        let e = img
            .layer_block_status(off, want)
            .map_err(|e| format!("error while reading image metadata at offset {off}: {e}"))?;
        let len = e.len.clamp(1, want);
        if e.kind == ExtentKind::Unallocated {
            let n = len as usize;
            // Without a backing file (or past its end) the image reads zeroes.
            match &old {
                Some(b) => b.read_at(&mut old_buf[..n], off),
                None => {
                    old_buf[..n].fill(0);
                    Ok(())
                }
            }
            .map_err(|e| {
                format!("error while reading from old backing file at offset {off}: {e}")
            })?;
            match new {
                Some(b) => common::read_sectors(b, &mut new_buf[..n], off),
                None => {
                    new_buf[..n].fill(0);
                    Ok(())
                }
            }
            .map_err(|e| {
                format!("error while reading from new backing file at offset {off}: {e}")
            })?;
            // Whole clusters (clipped to this run) that differ are written.
            let mut c = off;
            while c < off + len {
                let ce = ((c / cluster) + 1) * cluster;
                let ce = ce.min(off + len);
                let (i, j) = ((c - off) as usize, (ce - off) as usize);
                if old_buf[i..j] != new_buf[i..j] {
                    let data = &old_buf[i..j];
                    let whole = c.is_multiple_of(cluster) && ce - c == cluster;
                    let r = if a.compress && whole {
                        img.write_compressed(data, c)
                    } else {
                        img.write_at(data, c)
                    };
                    r.map_err(|e| format!("error while writing at offset {c}: {e}"))?;
                }
                c = ce;
            }
        }
        off += len;
        progress.set(off);
    }
    img.flush()
        .map_err(|e| format!("error while flushing: {e}"))
}
