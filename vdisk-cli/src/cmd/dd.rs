//! `vdisk dd`: copies (part of) an image into a new image, block by block, as
//! `qemu-img dd` (its operands, its size rule for `count` and `skip`, its messages).

use crate::common;
use vdisk::{CreateOptions, Format, Image, OpenOptions};

/// Arguments of `vdisk dd`.
#[derive(clap::Args)]
pub struct Args {
    /// Input image format (probed when absent).
    #[arg(short = 'f', long = "format", action = clap::ArgAction::Append)]
    pub format: Vec<String>,
    /// Output image format (default raw).
    #[arg(short = 'O', action = clap::ArgAction::Append)]
    pub out_format: Vec<String>,
    /// Open the input in shared mode.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Treat the input name as a key=value option list.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Operands: if=INPUT of=OUTPUT [bs=SIZE] [count=BLOCKS] [skip=BLOCKS].
    pub operands: Vec<String>,
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    common::exit_code(run_inner(a))
}

/// qemu's `cvtnum_full`: a size with suffixes in `[min, max]`.
fn number(name: &str, v: &str, min: u64, max: u64) -> Result<u64, String> {
    let range = || format!("Invalid {name} specified. Must be between {min} and {max}.");
    if let Some(abs) = v.strip_prefix('-') {
        if common::parse_size_arg(abs).is_some() {
            return Err(range());
        }
    }
    match common::parse_size_arg(v) {
        None => Err(format!("Invalid {name} specified: '{v}'.")),
        Some(n) if n < min || n > max => Err(range()),
        Some(n) => Ok(n),
    }
}

fn run_inner(a: Args) -> Result<(), String> {
    let mut bs: u64 = 512;
    let (mut count, mut skip) = (None, None);
    let (mut input, mut output) = (None, None);
    for op in &a.operands {
        let Some((k, v)) = op.split_once('=') else {
            return Err(format!("unrecognized operand {op}"));
        };
        match k {
            "bs" => bs = number("bs", v, 1, i32::MAX as u64)?,
            "count" => count = Some(number("count", v, 0, i64::MAX as u64)?),
            "skip" => skip = Some(number("skip", v, 0, i64::MAX as u64)?),
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            _ => return Err(format!("unrecognized operand {k}")),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err("Must specify both input and output files".into());
    };
    let format = common::parse_format(a.format.last().map(String::as_str))
        .map_err(|e| format!("Could not open '{input}': {e}"))?;
    let src = common::open_image_with(
        &input,
        &OpenOptions {
            format,
            read_only: true,
            force_share: a.force_share,
            image_opts: a.image_opts,
            ..OpenOptions::default()
        },
    )?;
    let out_name = a.out_format.last().map_or("raw", String::as_str);
    let out_fmt =
        Format::parse(out_name).map_err(|_| format!("Unknown file format '{out_name}'"))?;
    // qemu-img's rule: `count` bounds the input from its start, `skip` then starts
    // inside that.
    let mut size = src.size();
    if let Some(c) = count {
        if let Some(n) = c.checked_mul(bs).filter(|&n| n <= i64::MAX as u64) {
            size = size.min(n);
        }
    }
    let skip_bytes = skip.and_then(|s| s.checked_mul(bs).filter(|&n| n <= i64::MAX as u64));
    let beyond = skip.is_some() && skip_bytes.is_none_or(|n| n > size);
    let out_size = if beyond {
        0
    } else {
        size - skip_bytes.unwrap_or(0)
    };
    Image::create(
        &output,
        &CreateOptions {
            format: out_fmt,
            // The drivers' create rounds the size up to whole sectors.
            size: Some(out_size.div_ceil(512) * 512),
            options: Vec::new(),
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
        },
    )
    .map_err(|e| format!("{output}: error while creating output image: {e}"))?;
    let dst = common::open_image_with(
        &output,
        &OpenOptions {
            format: Some(out_fmt),
            read_only: false,
            ..OpenOptions::default()
        },
    )?;
    let mut in_pos = if beyond {
        common::error(format!("{input}: cannot skip to specified offset"));
        size
    } else {
        skip_bytes.unwrap_or(0)
    };
    let mut out_pos = 0u64;
    let mut buf = vec![0u8; bs as usize];
    while in_pos < size {
        let n = bs.min(size - in_pos) as usize;
        src.read_at(&mut buf[..n], in_pos).map_err(|e| {
            format!(
                "error while reading from input image file: {}",
                common::strip_os_error(&e.to_string())
            )
        })?;
        in_pos += n as u64;
        dst.write_at(&buf[..n], out_pos).map_err(|e| {
            format!(
                "error while writing to output image file: {}",
                common::strip_os_error(&e.to_string())
            )
        })?;
        out_pos += n as u64;
    }
    dst.close().map_err(|e| e.to_string())?;
    src.close().map_err(|e| e.to_string())
}
