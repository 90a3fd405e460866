//! `vdisk map`: the allocation map through the backing chain, as `qemu-img map`.

use crate::common::{self, layers, Layer};
use std::io::Write;
use vdisk::OpenOptions;

/// Arguments of `vdisk map`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// First guest offset to map.
    #[arg(long = "start-offset")]
    pub start_offset: Option<String>,
    /// Bytes to map from the start offset.
    #[arg(long = "max-length")]
    pub max_length: Option<String>,
    /// Open in shared mode (ignore other users' locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Treat the image name as a key=value option list (`driver=qcow2,file.filename=X`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Image file.
    pub filename: String,
}

/// One line of the map (qemu-img's `MapEntry`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MapEntry {
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
    compressed: bool,
    offset: Option<u64>,
    depth: usize,
    present: bool,
    filename: Option<String>,
}

fn mergeable(curr: &MapEntry, next: &MapEntry) -> bool {
    if curr.length == 0 {
        return false;
    }
    if curr.zero != next.zero
        || curr.data != next.data
        || curr.compressed != next.compressed
        || curr.depth != next.depth
        || curr.present != next.present
        || curr.filename.is_some() != next.filename.is_some()
        || curr.offset.is_some() != next.offset.is_some()
    {
        return false;
    }
    if curr.filename.is_some() && curr.filename != next.filename {
        return false;
    }
    match (curr.offset, next.offset) {
        (Some(a), Some(b)) => a + curr.length == b,
        _ => true,
    }
}

/// Writes one entry; for human output also relaxes `next`'s flags as qemu-img does
/// (human output does not distinguish unallocated, zero and zero+data).
fn dump(
    out: &mut impl Write,
    json: bool,
    e: &MapEntry,
    next: Option<&mut MapEntry>,
) -> Result<(), String> {
    let io = |err: std::io::Error| -> String { crate::common::stdout_failed(&err) };
    if json {
        write!(
            out,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        )
        .map_err(io)?;
        if let Some(o) = e.offset {
            write!(out, ", \"offset\": {o}").map_err(io)?;
        }
        write!(out, "}}").map_err(io)?;
        if next.is_some() {
            writeln!(out, ",").map_err(io)?;
        }
    } else {
        if e.data && e.offset.is_none() {
            return Err("File contains external, encrypted or compressed clusters.".into());
        }
        if e.data && !e.zero {
            writeln!(
                out,
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(e.length),
                hex(e.offset.unwrap_or(0)),
                e.filename.as_deref().unwrap_or("")
            )
            .map_err(io)?;
        }
        if let Some(n) = next {
            if !n.data || n.zero {
                n.data = false;
                n.zero = true;
            }
        }
    }
    Ok(())
}

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

fn entry(
    layers: &[Layer],
    recurse: &mut [Option<bool>],
    offset: u64,
    len: u64,
) -> vdisk::Result<MapEntry> {
    let top = &layers[0];
    if offset >= top.size() {
        // The rest of a partial last sector of a raw file: qemu maps it as zeroes
        // in the file past its end.
        return Ok(MapEntry {
            start: offset,
            length: len,
            data: false,
            zero: true,
            compressed: false,
            offset: Some(offset),
            depth: 0,
            present: true,
            filename: Some(top.display_name()),
        });
    }
    let s = common::refined_chain_status(layers, recurse, offset, len)?;
    // The file the data is in: a VMDK extent file, the external data file, or the
    // layer's own file.
    let filename = match s.offset {
        Some(_) => layers.get(s.depth).map(|l| match l.data_file_at(offset) {
            Some(f) => f.name,
            None => l.external_data().unwrap_or_else(|| l.display_name()),
        }),
        None => None,
    };
    Ok(MapEntry {
        start: offset,
        length: s.len,
        data: s.data,
        zero: s.zero,
        compressed: s.compressed,
        offset: s.offset,
        depth: s.depth,
        present: s.present,
        filename,
    })
}

fn parse_offset(v: &Option<String>, what: &str) -> Result<Option<u64>, String> {
    match v {
        None => Ok(None),
        Some(s) => match common::parse_size_arg(s) {
            Some(n) if n <= i64::MAX as u64 => Ok(Some(n)),
            _ => Err(format!("Invalid {what} specified")),
        },
    }
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    common::exit_code(run_inner(a))
}

fn run_inner(a: Args) -> Result<(), String> {
    let json = common::parse_output(&a.output)?;
    let start = parse_offset(&a.start_offset, "start offset")?.unwrap_or(0);
    let max_len = parse_offset(&a.max_length, "max length")?;
    let format = common::parse_format(a.format.as_deref())
        .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
    let img = common::open_image_with(
        &a.filename,
        &OpenOptions {
            // qemu-img opens images without BDRV_O_UNMAP (only a convert target has it).
            discard: vdisk::policy::DiscardMode::Ignore,
            format,
            read_only: true,
            force_share: a.force_share,
            image_opts: a.image_opts,
            ..OpenOptions::default()
        },
    )?;
    let chain = layers(&img);
    let mut recurse = vec![None; chain.len()];
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io = |err: std::io::Error| -> String { crate::common::stdout_failed(&err) };
    if json {
        write!(out, "[").map_err(io)?;
    } else {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )
        .map_err(io)?;
    }
    let mut length = common::sector_size_of(&img);
    if let Some(m) = max_len {
        length = length.min(start.saturating_add(m));
    }
    let mut curr = MapEntry {
        start,
        ..MapEntry::default()
    };
    let mut offset = start;
    while offset < length {
        // qemu asks at most 1 GiB at a time; entries merge afterwards either way.
        let n = (length - offset).min(1 << 30);
        let mut next = entry(&chain, &mut recurse, offset, n)
            .map_err(|e| format!("Could not read file metadata: {e}"))?;
        offset += next.length;
        if mergeable(&curr, &next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            if let Err(e) = dump(&mut out, json, &curr, Some(&mut next)) {
                let _ = out.flush();
                return Err(e);
            }
        }
        curr = next;
    }
    let r = dump(&mut out, json, &curr, None);
    if json {
        writeln!(out, "]").map_err(io)?;
    }
    out.flush().map_err(io)?;
    r
}
