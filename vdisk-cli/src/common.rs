//! Helpers shared by the subcommands: opening images from command-line flags, option
//! lists, sizes, error reporting, and block status through a backing chain with
//! qemu-img's semantics.

use std::path::Path;
use vdisk::{CacheMode, ExtentKind, Format, Image, OpenOptions};

/// Prints an error the way qemu-img does (`vdisk: message`) to stderr.
pub fn error(msg: impl std::fmt::Display) {
    eprintln!("vdisk: {}", strip_os_error(&msg.to_string()));
}

/// Takes QEMU's `-T`/`--trace` options (`[enable=]PATTERN`, `events=FILE`,
/// `file=FILE`) as qemu's tools do, with no event to trace: an exact event name is
/// warned about as not existing, an events file must be readable, a log file is
/// created. `Err` is qemu's message for an option it refuses.
pub fn accept_trace(opts: &[String]) -> Result<(), String> {
    let warn = |p: &str| {
        if !p.is_empty() && !p.contains(['*', '?']) {
            eprintln!("vdisk: warning: trace event '{p}' does not exist");
        }
    };
    for o in opts {
        for item in o.split(',').filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                None => warn(item),
                Some(("enable", p)) => warn(p),
                Some(("events", f)) => {
                    let text = std::fs::read_to_string(f)
                        .map_err(|e| format!("{f}: {}", strip_os_error(&e.to_string())))?;
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.starts_with('#'))
                        .for_each(warn);
                }
                Some(("file", f)) => {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(f)
                        .map_err(|e| format!("{f}: {}", strip_os_error(&e.to_string())))?;
                }
                Some((k, _)) => return Err(format!("Invalid parameter '{k}'")),
            }
        }
    }
    Ok(())
}

/// The exit code of a subcommand that failed with a message (printed unless empty,
/// when it was printed already) or succeeded.
pub fn exit_code(r: Result<(), String>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            if !e.is_empty() {
                error(e);
            }
            1
        }
    }
}

/// Parses `--output`: `true` for json, `false` for human.
pub fn parse_output(o: &str) -> Result<bool, String> {
    match o {
        "human" => Ok(false),
        "json" => Ok(true),
        o => Err(format!(
            "--output must be used with human or json as argument. ({o})"
        )),
    }
}

pub use vdisk::error::strip_os_error;

/// Prints to stdout unless `quiet` (qemu-img's `qprintf`).
#[macro_export]
macro_rules! qprintln {
    ($quiet:expr, $($arg:tt)*) => {
        if !$quiet {
            $crate::outln!($($arg)*);
        }
    };
}

/// `println!` for the commands that print a result: a reader that went away
/// (`vdisk info | head`) ends the process as SIGPIPE ends qemu-img ([`stdout_write`]).
#[macro_export]
macro_rules! outln {
    () => { $crate::common::stdout_write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::common::stdout_write(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` with [`outln!`]'s handling of a closed stdout.
#[macro_export]
macro_rules! outp {
    ($($arg:tt)*) => { $crate::common::stdout_write(format_args!($($arg)*)) };
}

/// Writes to stdout. When the reader has gone (EPIPE) the process dies of SIGPIPE,
/// silently, as qemu-img does. SIGPIPE itself stays ignored (Rust's default): left at
/// its default it would also kill the process when a server closes a socket under a
/// `writev` (hyper's upload to S3, the NBD client), which has no `MSG_NOSIGNAL`.
pub fn stdout_write(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(&e);
    }
}

/// What a failed write to stdout does: EPIPE is SIGPIPE's death, anything else an
/// error message and exit status 1.
pub fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // SAFETY: restoring the default disposition and raising the signal on this
        // thread; nothing else runs signal code.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    error(format_args!("write error: {e}"));
    std::process::exit(1)
}

/// Parses `-o a=b,c=d` lists (repeatable) into ordered pairs. `,,` escapes a comma.
pub fn parse_options(opts: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for o in opts {
        let items = vdisk::storage::spec::split_items(o);
        for it in items {
            match it.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string())),
                None => return Err(format!("Invalid parameter '{it}'")),
            }
        }
    }
    Ok(out)
}

/// Parses a `-f`/`-O` format name.
pub fn parse_format(s: Option<&str>) -> Result<Option<Format>, String> {
    s.map(|f| Format::parse(f).map_err(|e| e.to_string()))
        .transpose()
}

/// Parses a `-t`/`-T` cache mode.
pub fn parse_cache(s: Option<&str>, default: CacheMode) -> Result<CacheMode, String> {
    match s {
        None => Ok(default),
        Some(m) => CacheMode::parse(m).ok_or_else(|| format!("Invalid cache option: {m}")),
    }
}

/// Parses `-i MODE` (`-k`/`-n` ask for `native` when no mode is named), with
/// qemu-io's and qemu-img bench's message for a mode it lacks.
pub fn parse_aio(s: Option<&str>, native: bool) -> Result<vdisk::AioMode, String> {
    match s {
        None if native => Ok(vdisk::AioMode::Native),
        None => Ok(vdisk::AioMode::Threads),
        Some(m) => vdisk::AioMode::parse(m).ok_or_else(|| format!("Invalid aio option: {m}")),
    }
}

/// Parses a size argument the way qemu-img's `cvtnum` does (`k`, `M`, `G`, `T`, `P`,
/// `E` suffixes, 1024-based; a bare number is bytes). `None` when invalid.
pub fn parse_size_arg(s: &str) -> Option<u64> {
    if s.is_empty() || s.starts_with('-') || s.starts_with('+') || s.trim() != s {
        return None;
    }
    vdisk::format::parse_size(s).ok()
}

/// Opens an image with full options; errors read like qemu-img's. With
/// `opts.image_opts` the name is a key=value option list (`--image-opts`).
pub fn open_image_with(filename: &str, opts: &OpenOptions) -> Result<Image, String> {
    if opts.image_opts && opts.format.is_some() {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    if let Some(f) = opts.format.filter(|_| !opts.image_opts) {
        if !f.caps().raw_data
            && !f.caps().probe_misses
            && f.can_open()
            && Path::new(filename).exists()
        {
            // qemu-img names a format mismatch explicitly instead of failing in the driver
            // (a format vdisk cannot read is refused by name when opened).
            if let Ok(head) = read_head(filename) {
                if f.score(&head, Some(filename)) == 0 {
                    return Err(format!(
                        "Could not open '{filename}': Image is not in {f} format"
                    ));
                }
            }
        }
    }
    let img =
        Image::open(filename, opts).map_err(|e| format!("Could not open '{filename}': {e}"))?;
    warn_if_probed_raw(filename, opts, &img);
    Ok(img)
}

/// Prints qemu's warning (stderr) when a read-write open had to probe and found raw.
pub fn warn_if_probed_raw(filename: &str, opts: &OpenOptions, img: &Image) {
    if opts.format.is_none() && img.format().caps().raw_data && !opts.read_only {
        eprintln!(
            "WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
        );
    }
}

fn read_head(filename: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(filename)?;
    let mut head = vec![0u8; vdisk::format::registry::PROBE_BYTES];
    let mut n = 0;
    while n < head.len() {
        let r = f.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(head)
}

/// The guest size qemu sees: its block layer counts whole 512-byte sectors, so a raw
/// file of odd length is a little larger (the tail reads as zeroes).
pub fn sector_size_of(img: &Image) -> u64 {
    img.size().div_ceil(512) * 512
}

/// Reads `buf.len()` bytes at `offset`; bytes between the image's end and the end of
/// its last 512-byte sector read as zeroes (see [`sector_size_of`]).
pub fn read_sectors(img: &Image, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
    let size = img.size();
    let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    if n > 0 {
        img.read_at(&mut buf[..n], offset)?;
    }
    buf[n..].fill(0);
    Ok(())
}

/// Bytes the file occupies on the host (`st_blocks * 512`), as qemu's `actual-size`.
pub fn allocated_size(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// One layer of an open chain, with the file name qemu would show for it (the top
/// image's name as given; backing names resolved against the directory of the image
/// naming them, like qemu's `full-backing-filename`).
pub use vdisk::ImageLayer as Layer;

/// The layers of an image's chain, top first.
pub fn layers(img: &Image) -> Vec<Layer> {
    img.layers()
}

/// Block status of one range through a chain, with the flags `qemu-img map` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Bytes covered (> 0).
    pub len: u64,
    /// Layer that decided (0 = top); for unallocated ranges the layer where the walk ended.
    pub depth: usize,
    /// Allocated in some layer (qemu's `BDRV_BLOCK_ALLOCATED`).
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Data stored.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the deciding layer's file.
    pub offset: Option<u64>,
}

/// Status of `[offset, offset+len)` from `start` layer down (`start` = 0 for the whole
/// chain), following qemu's `bdrv_block_status_above` as `qemu-img map` uses it: the
/// walk stops at the first layer that has data or zeroes; an unallocated range in the
/// bottom layer, or past the end of a layer's backing file, reads as zeroes there.
/// With `top_only`, only the first layer is asked (unallocated then means "backing").
pub fn chain_status(
    layers: &[Layer],
    offset: u64,
    len: u64,
    top_only: bool,
) -> vdisk::Result<Status> {
    let mut len = len;
    for (depth, layer) in layers.iter().enumerate() {
        let size = layer.size();
        if offset >= size {
            // Past this layer's end: zeroes (a shorter backing file).
            return Ok(Status {
                len,
                depth: depth.saturating_sub(1),
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
            });
        }
        len = len.min(size - offset);
        let e = layer.block_status(offset, len)?;
        let n = e.len.clamp(1, len);
        match e.kind {
            ExtentKind::Data => {
                return Ok(Status {
                    len: n,
                    depth,
                    present: true,
                    zero: false,
                    data: true,
                    compressed: e.compressed,
                    offset: if e.compressed { None } else { e.offset },
                })
            }
            ExtentKind::Zero => {
                return Ok(Status {
                    len: n,
                    depth,
                    present: true,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: e.offset,
                })
            }
            ExtentKind::Unallocated => {
                len = n;
                let last = top_only || depth + 1 == layers.len();
                let past_backing = layers.get(depth + 1).is_some_and(|b| offset >= b.size());
                if last || past_backing {
                    return Ok(Status {
                        len,
                        depth,
                        present: false,
                        // Unallocated over a backing file (top_only) is not known zero.
                        zero: !top_only || past_backing || depth + 1 == layers.len(),
                        data: false,
                        compressed: false,
                        // Host space a layer keeps for unallocated data (qcow2
                        // subclusters of an allocated cluster), as qemu prints it.
                        offset: e.offset,
                    });
                }
            }
        }
    }
    // Unreachable for a non-empty chain; report zeroes to stay total.
    Ok(Status {
        len: len.max(1),
        depth: 0,
        present: false,
        zero: true,
        data: false,
        compressed: false,
        offset: None,
    })
}

/// Whether every byte of `buf` is zero (the test zero detection uses).
pub use vdisk::hook::is_zero;

/// Whether qemu would treat a qcow2 layer as "metadata preallocated" and ask the host
/// file about data clusters (`BDRV_BLOCK_RECURSE`): more clusters are in use than the
/// file has allocated on the host, by at least 10% and at least two clusters.
///
/// Clusters in use are counted as the union of the clusters the file has allocated
/// (metadata is always written) and the host clusters the guest mapping references.
pub fn metadata_preallocated(layer: &Layer) -> vdisk::Result<bool> {
    let d = layer;
    if d.file_status_refines() {
        return Ok(true);
    }
    // QEMU looks at the image file only: data in an external data file is never
    // refined by it.
    if !d.format().caps().metadata_prealloc || d.external_data().is_some() {
        return Ok(false);
    }
    let Some(cs) = d.cluster_size().filter(|&c| c > 0) else {
        return Ok(false);
    };
    let file_len = layer.file_length()?;
    let Some(real) = allocated_size(layer.path()) else {
        return Ok(false);
    };
    let real_clusters = real / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = file_len.div_ceil(cs);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    // Allocated parts of the host file.
    let mut off = 0u64;
    while off < file_len {
        let (data, n) = layer.file_extent_at(off)?;
        if n == 0 {
            break;
        }
        if data {
            ranges.push((off / cs, (off + n).div_ceil(cs)));
        }
        off += n;
    }
    // Host clusters the guest mapping references (allocated data and zero clusters).
    let size = d.size();
    let mut g = 0u64;
    while g < size {
        let e = d.block_status(g, size - g)?;
        let n = e.len.clamp(1, size - g);
        if let (Some(h), ExtentKind::Data | ExtentKind::Zero) = (e.offset, e.kind) {
            ranges.push((h / cs, (h + n).div_ceil(cs)));
        }
        g += n;
    }
    ranges.sort_unstable();
    let mut count = 0u64;
    let mut cur: Option<(u64, u64)> = None;
    for (a, b) in ranges {
        let (a, b) = (a.min(end_cluster), b.min(end_cluster));
        match cur {
            Some((ca, cb)) if a <= cb => cur = Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                count += cb - ca;
                cur = Some((a, b));
            }
            None => cur = Some((a, b)),
        }
    }
    if let Some((ca, cb)) = cur {
        count += cb - ca;
    }
    Ok(count >= threshold)
}

/// [`chain_status`] as qemu's `bdrv_block_status_above` reports it to `map` and
/// `measure`: a data run of a layer that qemu would recurse into (metadata
/// preallocation, [`file_refines`]) is refined with the host file's own status.
/// `recurse` caches [`metadata_preallocated`] per layer (one entry per layer, `None`
/// until asked: the answer walks the image once).
pub fn refined_chain_status(
    layers: &[Layer],
    recurse: &mut [Option<bool>],
    offset: u64,
    len: u64,
) -> vdisk::Result<Status> {
    let mut s = chain_status(layers, offset, len, false)?;
    if s.data && !s.compressed {
        if let (Some(layer), Some(slot)) = (layers.get(s.depth), recurse.get_mut(s.depth)) {
            if metadata_preallocated_once(layer, slot)? || file_refines(layer, offset) {
                refine_with_file(layer, offset, &mut s)?;
            }
        }
    }
    Ok(s)
}

/// [`metadata_preallocated`], answered once and kept in `slot`.
pub fn metadata_preallocated_once(layer: &Layer, slot: &mut Option<bool>) -> vdisk::Result<bool> {
    if let Some(f) = *slot {
        return Ok(f);
    }
    let f = metadata_preallocated(layer)?;
    *slot = Some(f);
    Ok(f)
}

/// Refines a data extent of a metadata-preallocated layer with the host file's own
/// status, as qemu does: holes in the file read as zeroes (past the end of the file
/// the whole extent does), and the extent is cut where the file's status changes.
/// `guest` is the extent's first guest byte.
pub fn refine_with_file(layer: &Layer, guest: u64, s: &mut Status) -> vdisk::Result<()> {
    // A flat extent of a multi-file image (VMDK) is refined by its own file.
    if let Some(f) = layer.data_file_at(guest).filter(|f| f.raw) {
        return refine(s, || Ok(f.storage.len()?), |h| Ok(f.storage.extent_at(h)?));
    }
    refine(s, || layer.file_length(), |h| layer.file_extent_at(h))
}

/// Whether a data run of `layer` at guest offset `guest` is refined by its file's
/// status: formats that say so, and flat extents of multi-file images.
pub fn file_refines(layer: &Layer, guest: u64) -> bool {
    layer.file_status_refines() || layer.data_file_at(guest).is_some_and(|f| f.raw)
}

fn refine(
    s: &mut Status,
    file_len: impl FnOnce() -> vdisk::Result<u64>,
    extent_at: impl FnOnce(u64) -> vdisk::Result<(bool, u64)>,
) -> vdisk::Result<()> {
    let Some(host) = s.offset else {
        return Ok(());
    };
    if !s.data || s.zero {
        return Ok(());
    }
    let file_len = file_len()?;
    let (data, n) = extent_at(host)?;
    let at_eof = host.saturating_add(n) >= file_len;
    if at_eof && (n == 0 || !data) {
        s.zero = true;
    } else {
        s.len = s.len.min(n.max(1));
        s.zero = !data;
    }
    Ok(())
}
