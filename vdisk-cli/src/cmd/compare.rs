//! `vdisk compare`: compares the guest contents of two images, as `qemu-img compare`.
//!
//! Exit codes: 0 identical, 1 different, 2 error. Ranges that read as zeroes in both
//! images (by block status) are skipped without reading.

use crate::common::{self, chain_status, layers, Layer};
use vdisk::{Image, OpenOptions};

/// Largest read per image per step.
const CHUNK: u64 = 2 << 20;
const SECTOR: usize = 512;

/// Arguments of `vdisk compare`.
#[derive(clap::Args)]
pub struct Args {
    /// Format of the first image.
    #[arg(short = 'f', long = "a-format")]
    pub format1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F', long = "b-format")]
    pub format2: Option<String>,
    /// Strict: sizes and allocation must match too.
    #[arg(short = 's', long = "strict")]
    pub strict: bool,
    /// Cache mode.
    #[arg(short = 'T', long = "cache")]
    pub cache: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Open in shared mode (ignore other users' locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Treat the image name as a key=value option list (`driver=qcow2,file.filename=X`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// First image.
    pub filename1: String,
    /// Second image.
    pub filename2: String,
}

/// Why the comparison stopped.
enum Stop {
    /// Images differ (message already printed): exit 1.
    Differ,
    /// An error: exit 2.
    Error(String),
}

fn read(img: &Image, buf: &mut [u8], offset: u64, name: &str) -> Result<(), Stop> {
    common::read_sectors(img, buf, offset).map_err(|e| {
        Stop::Error(format!(
            "error while reading offset {offset} of {name}: {e}"
        ))
    })
}

/// Index of the first 512-byte sector that differs, if any.
fn first_diff_sector(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
}

/// Index of the first non-zero 512-byte sector, if any.
fn first_nonzero_sector(a: &[u8]) -> Option<usize> {
    a.chunks(SECTOR).position(|x| !common::is_zero(x))
}

/// Fails with "Content mismatch" when `[offset, offset+len)` of `img` is not all zeroes.
fn check_empty(
    img: &Image,
    offset: u64,
    len: u64,
    name: &str,
    buf: &mut Vec<u8>,
    quiet: bool,
) -> Result<(), Stop> {
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(CHUNK) as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        read(img, &mut buf[..n], pos, name)?;
        if let Some(s) = first_nonzero_sector(&buf[..n]) {
            crate::qprintln!(
                quiet,
                "Content mismatch at offset {}!",
                pos + (s * SECTOR) as u64
            );
            return Err(Stop::Differ);
        }
        pos += n as u64;
    }
    Ok(())
}

struct Side<'a> {
    img: &'a Image,
    layers: Vec<Layer>,
    name: &'a str,
}

fn status(side: &Side, offset: u64, len: u64) -> Result<common::Status, Stop> {
    chain_status(&side.layers, offset, len, false).map_err(|e| {
        Stop::Error(format!(
            "Sector allocation test failed for {}: {e}",
            side.name
        ))
    })
}

fn compare(
    a: &Args,
    s1: &Side,
    s2: &Side,
    progress: &crate::progress::Progress,
) -> Result<(), Stop> {
    let size1 = common::sector_size_of(s1.img);
    let size2 = common::sector_size_of(s2.img);
    if a.strict && size1 != size2 {
        crate::qprintln!(a.quiet, "Strict mode: Image size mismatch!");
        return Err(Stop::Differ);
    }
    let common_size = size1.min(size2);
    let mut buf1 = vec![0u8; CHUNK as usize];
    let mut buf2 = vec![0u8; CHUNK as usize];
    let mut offset = 0u64;
    while offset < common_size {
        let st1 = status(s1, offset, common_size - offset)?;
        let st2 = status(s2, offset, common_size - offset)?;
        let mut chunk = st1.len.min(st2.len).max(1);
        if a.strict
            && (st1.present, st1.zero, st1.data, st1.offset.is_some())
                != (st2.present, st2.zero, st2.data, st2.offset.is_some())
        {
            crate::qprintln!(
                a.quiet,
                "Strict mode: Offset {offset} block status mismatch!"
            );
            return Err(Stop::Differ);
        }
        if st1.zero && st2.zero {
            // Both read as zeroes: nothing to read.
        } else if st1.present == st2.present {
            if st1.present {
                chunk = chunk.min(CHUNK);
                let n = chunk as usize;
                read(s1.img, &mut buf1[..n], offset, s1.name)?;
                read(s2.img, &mut buf2[..n], offset, s2.name)?;
                if let Some(s) = first_diff_sector(&buf1[..n], &buf2[..n]) {
                    crate::qprintln!(
                        a.quiet,
                        "Content mismatch at offset {}!",
                        offset + (s * SECTOR) as u64
                    );
                    return Err(Stop::Differ);
                }
            }
        } else {
            chunk = chunk.min(CHUNK);
            let (side, _) = if st1.present { (s1, s2) } else { (s2, s1) };
            check_empty(side.img, offset, chunk, side.name, &mut buf1, a.quiet)?;
        }
        offset += chunk;
        progress.set(offset);
    }
    if size1 != size2 {
        crate::qprintln!(a.quiet, "Warning: Image size mismatch!");
        let over = if size1 > size2 { s1 } else { s2 };
        let total = size1.max(size2);
        let mut offset = common_size;
        while offset < total {
            let st = status(over, offset, total - offset)?;
            let chunk = st.len.max(1);
            if st.present && !st.zero {
                check_empty(over.img, offset, chunk, over.name, &mut buf1, a.quiet)?;
            }
            offset += chunk;
            progress.set(offset.min(common_size.max(1)));
        }
    }
    crate::qprintln!(a.quiet, "Images are identical.");
    Ok(())
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    let open = |name: &str, fmt: &Option<String>| -> Result<Image, String> {
        let format = common::parse_format(fmt.as_deref())
            .map_err(|e| format!("Could not open '{name}': {e}"))?;
        let cache = common::parse_cache(a.cache.as_deref(), vdisk::CacheMode::Writeback)?;
        common::open_image_with(
            name,
            &OpenOptions {
                // qemu-img opens images without BDRV_O_UNMAP (only a convert target has it).
                discard: vdisk::policy::DiscardMode::Ignore,
                format,
                read_only: true,
                force_share: a.force_share,
                cache,
                image_opts: a.image_opts,
                ..OpenOptions::default()
            },
        )
    };
    let img1 = match open(&a.filename1, &a.format1) {
        Ok(i) => i,
        Err(e) => {
            common::error(e);
            return 2;
        }
    };
    let img2 = match open(&a.filename2, &a.format2) {
        Ok(i) => i,
        Err(e) => {
            common::error(e);
            return 2;
        }
    };
    let s1 = Side {
        layers: layers(&img1),
        img: &img1,
        name: &a.filename1,
    };
    let s2 = Side {
        layers: layers(&img2),
        img: &img2,
        name: &a.filename2,
    };
    let progress = crate::progress::Progress::start(
        a.progress && !a.quiet,
        img1.size().min(img2.size()).max(1),
    );
    let r = compare(&a, &s1, &s2, &progress);
    progress.end();
    match r {
        Ok(()) => 0,
        Err(Stop::Differ) => 1,
        Err(Stop::Error(e)) => {
            common::error(e);
            2
        }
    }
}
