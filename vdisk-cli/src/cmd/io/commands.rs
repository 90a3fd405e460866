//! The qemu-io commands: each takes the session and its words (the first is the
//! command name) and returns whether it succeeded. Messages and report lines are
//! qemu-io's, so scripts comparing output work on both tools.

use super::aio::{self, Done, Job, Report};
use super::buffer::IoBuf;
use super::misc::{abort_f, break_f, remove_break_f, resume_f, sigraise_f, wait_break_f, zone_f};
use super::open::{close_f, open_f, reopen_f, OpenExtra, TempFile, OPEN_ARGS};
use super::parse::{
    breakline, cvtnum, cvtnum_error, parse_pattern, strerror, Getopt, REQUEST_MAX_BYTES,
};
use super::report::{cvtstr, dump_buffer, print_report};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vdisk::format::FormatSpecific;
use vdisk::{ExtentKind, Image, ZeroFlags};

/// Bytes moved per library call on long requests: bounds memory and lets the progress
/// bar move.
const CHUNK: u64 = 64 << 20;
/// Requests longer than this get a progress bar with `-p`.
const PROGRESS_MIN: u64 = 64 << 20;

/// The open image and what was asked when opening it.
pub struct OpenFile {
    /// The open image (shared with the threads of asynchronous requests).
    pub img: Arc<Image>,
    /// The name it was opened by (for messages).
    pub name: String,
    /// Show a progress bar on long requests (`-p`).
    pub progress: bool,
    /// Opened with `-r`: commands that modify the image are refused up front.
    pub read_only: bool,
    /// Opened with `-o detect-zeroes=on|unmap`: all-zero writes become zero writes
    /// before the format sees them (so a compressed write of zeroes never fails).
    pub detect_zeroes: bool,
    /// How it was opened (what `reopen` changes).
    pub opts: vdisk::OpenOptions,
    /// The open's other settings (what `reopen` changes).
    pub extra: OpenExtra,
    /// The temporary overlay of `-s`, removed at close.
    pub temp: Option<TempFile>,
    /// Asynchronous requests still running (only while breakpoints are set).
    pub aio: aio::Queue,
}

impl OpenFile {
    /// Reports the asynchronous requests finished so far.
    pub fn poll_aio(&mut self) {
        self.aio.poll(&self.img, &mut print_done);
    }
    /// Waits for every asynchronous request and reports it.
    pub fn drain_aio(&mut self) {
        self.aio.drain(&self.img, &mut print_done);
    }
}

/// Reports a finished asynchronous request as qemu-io's completion callbacks do.
pub(super) fn print_done(d: Done) {
    let r = d.report;
    if d.write {
        match d.result {
            Err(e) => report_error(r.op, &e),
            Ok(_) if r.quiet => {}
            Ok(_) => print_report("wrote", d.elapsed, r.offset, r.len, r.len, r.machine),
        }
        return;
    }
    let result = d.result.map(|buf| {
        let buf = buf.unwrap_or_else(|| IoBuf::new(0).expect("an empty buffer"));
        let ok = r.pattern.is_none_or(|p| buf.iter().all(|&b| b == p));
        (ok, r.dump.then_some(buf))
    });
    finish_read(
        r.op, result, r.offset, r.len, 0, r.len, r.quiet, r.machine, d.elapsed,
    );
}

/// The state commands work on: at most one open image, as in qemu-io.
pub struct Session {
    /// The open image; `None` before `open` or after `close`.
    pub file: Option<OpenFile>,
    /// Show a progress bar on long requests (`-p`), for every image opened.
    pub progress: bool,
    /// Set by `quit`: stop reading commands.
    pub quit: bool,
}

/// What a command runs on.
#[derive(Clone, Copy)]
enum CmdFn {
    /// Needs an open image.
    File(fn(&mut OpenFile, &[String]) -> bool),
    /// Works on the session; `needs_file` says whether an open image is required.
    Session {
        f: fn(&mut Session, &[String]) -> bool,
        needs_file: bool,
    },
}

/// One entry of the command table.
struct CmdInfo {
    name: &'static str,
    alt: Option<&'static str>,
    argmin: usize,
    /// `None`: no upper bound.
    argmax: Option<usize>,
    /// Argument synopsis; `None` and `Some("")` print differently, as in qemu-io.
    args: Option<&'static str>,
    oneline: &'static str,
    func: CmdFn,
    /// Modifies the image (needs write permission).
    writes: bool,
}

const COMMANDS: &[CmdInfo] = &[
    CmdInfo {
        name: "abort",
        alt: None,
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "simulate a program crash using abort(3)",
        writes: false,
        func: CmdFn::File(abort_f),
    },
    CmdInfo {
        name: "aio_flush",
        alt: None,
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "completes all outstanding aio requests",
        writes: false,
        func: CmdFn::File(aio_flush_f),
    },
    CmdInfo {
        name: "aio_read",
        alt: None,
        argmin: 2,
        argmax: None,
        args: Some("[-Ciqrv] [-P pattern] off len [len..]"),
        oneline: "asynchronously reads a number of bytes",
        writes: false,
        func: CmdFn::File(aio_read_f),
    },
    CmdInfo {
        name: "aio_write",
        alt: None,
        argmin: 2,
        argmax: None,
        args: Some("[-Cfiqruz] [-P pattern] off len [len..]"),
        oneline: "asynchronously writes a number of bytes",
        writes: true,
        func: CmdFn::File(aio_write_f),
    },
    CmdInfo {
        name: "alloc",
        alt: Some("a"),
        argmin: 1,
        argmax: Some(2),
        args: Some("offset [count]"),
        oneline: "checks if offset is allocated in the file",
        writes: false,
        func: CmdFn::File(alloc_f),
    },
    CmdInfo {
        name: "break",
        alt: None,
        argmin: 2,
        argmax: Some(2),
        args: Some("event tag"),
        oneline: "sets a breakpoint on event and tags the stopped request as tag",
        writes: false,
        func: CmdFn::File(break_f),
    },
    CmdInfo {
        name: "close",
        alt: Some("c"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "close the current open file",
        writes: false,
        func: CmdFn::Session {
            f: close_f,
            needs_file: true,
        },
    },
    CmdInfo {
        name: "discard",
        alt: Some("d"),
        argmin: 2,
        argmax: None,
        args: Some("[-Cq] off len"),
        oneline: "discards a number of bytes at a specified offset",
        writes: true,
        func: CmdFn::File(discard_f),
    },
    CmdInfo {
        name: "flush",
        alt: Some("f"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "flush all in-core file state to disk",
        writes: false,
        func: CmdFn::File(flush_f),
    },
    CmdInfo {
        name: "help",
        alt: Some("?"),
        argmin: 0,
        argmax: Some(1),
        args: Some("[command]"),
        oneline: "help for one or all commands",
        writes: false,
        func: CmdFn::Session {
            f: help_f,
            needs_file: false,
        },
    },
    CmdInfo {
        name: "info",
        alt: Some("i"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "prints information about the current file",
        writes: false,
        func: CmdFn::File(info_f),
    },
    CmdInfo {
        name: "length",
        alt: Some("l"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "gets the length of the current file",
        writes: false,
        func: CmdFn::File(length_f),
    },
    CmdInfo {
        name: "map",
        alt: Some("m"),
        argmin: 0,
        argmax: Some(0),
        args: Some(""),
        oneline: "prints the allocated areas of a file",
        writes: false,
        func: CmdFn::File(map_f),
    },
    CmdInfo {
        name: "open",
        alt: Some("o"),
        argmin: 1,
        argmax: None,
        args: Some(OPEN_ARGS),
        oneline: "open the file specified by path",
        writes: false,
        func: CmdFn::Session {
            f: open_f,
            needs_file: false,
        },
    },
    CmdInfo {
        name: "quit",
        alt: Some("q"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "exit the program",
        writes: false,
        func: CmdFn::Session {
            f: quit_f,
            needs_file: false,
        },
    },
    CmdInfo {
        name: "read",
        alt: Some("r"),
        argmin: 2,
        argmax: None,
        args: Some("[-abCqrv] [-P pattern [-s off] [-l len]] off len"),
        oneline: "reads a number of bytes at a specified offset",
        writes: false,
        func: CmdFn::File(read_f),
    },
    CmdInfo {
        name: "readv",
        alt: None,
        argmin: 2,
        argmax: None,
        args: Some("[-Cqrv] [-P pattern] off len [len..]"),
        oneline: "reads a number of bytes at a specified offset",
        writes: false,
        func: CmdFn::File(readv_f),
    },
    CmdInfo {
        name: "remove_break",
        alt: None,
        argmin: 1,
        argmax: Some(1),
        args: Some("tag"),
        oneline: "remove a breakpoint by tag",
        writes: false,
        func: CmdFn::File(remove_break_f),
    },
    CmdInfo {
        name: "reopen",
        alt: None,
        argmin: 0,
        argmax: None,
        args: Some("[(-r|-w)] [-c cache] [-o options]"),
        oneline: "reopens an image with new options",
        writes: false,
        func: CmdFn::Session {
            f: reopen_f,
            needs_file: true,
        },
    },
    CmdInfo {
        name: "resume",
        alt: None,
        argmin: 1,
        argmax: Some(1),
        args: Some("tag"),
        oneline: "resumes the request tagged as tag",
        writes: false,
        func: CmdFn::File(resume_f),
    },
    CmdInfo {
        name: "sigraise",
        alt: None,
        argmin: 1,
        argmax: Some(1),
        args: Some("signal"),
        oneline: "raises a signal",
        writes: false,
        func: CmdFn::File(sigraise_f),
    },
    CmdInfo {
        name: "sleep",
        alt: None,
        argmin: 1,
        argmax: Some(1),
        args: None,
        oneline: "waits for the given value in milliseconds",
        writes: false,
        func: CmdFn::Session {
            f: sleep_f,
            needs_file: false,
        },
    },
    CmdInfo {
        name: "truncate",
        alt: Some("t"),
        argmin: 1,
        argmax: Some(3),
        args: Some("[-m prealloc_mode] off"),
        oneline: "truncates the current file at the given offset",
        writes: true,
        func: CmdFn::File(truncate_f),
    },
    CmdInfo {
        name: "wait_break",
        alt: None,
        argmin: 1,
        argmax: Some(1),
        args: Some("tag"),
        oneline: "waits for the suspension of a request",
        writes: false,
        func: CmdFn::File(wait_break_f),
    },
    CmdInfo {
        name: "write",
        alt: Some("w"),
        argmin: 2,
        argmax: None,
        args: Some("[-bcCfnqruz] [-P pattern | -s source_file] off len"),
        oneline: "writes a number of bytes at a specified offset",
        writes: true,
        func: CmdFn::File(write_f),
    },
    CmdInfo {
        name: "writev",
        alt: None,
        argmin: 2,
        argmax: None,
        args: Some("[-Cfqr] [-P pattern] off len [len..]"),
        oneline: "writes a number of bytes at a specified offset",
        writes: true,
        func: CmdFn::File(writev_f),
    },
    CmdInfo {
        name: "zone_append",
        alt: Some("zap"),
        argmin: 3,
        argmax: Some(4),
        args: Some("offset len [len..]"),
        oneline: "append write a number of bytes at a specified offset",
        writes: false,
        func: CmdFn::File(zone_f),
    },
    CmdInfo {
        name: "zone_close",
        alt: Some("zc"),
        argmin: 2,
        argmax: Some(2),
        args: Some("offset len"),
        oneline: "close a range of zones in zone block device",
        writes: false,
        func: CmdFn::File(zone_f),
    },
    CmdInfo {
        name: "zone_finish",
        alt: Some("zf"),
        argmin: 2,
        argmax: Some(2),
        args: Some("offset len"),
        oneline: "finish a range of zones in zone block device",
        writes: false,
        func: CmdFn::File(zone_f),
    },
    CmdInfo {
        name: "zone_open",
        alt: Some("zo"),
        argmin: 2,
        argmax: Some(2),
        args: Some("offset len"),
        oneline: "explicit open a range of zones in zone block device",
        writes: false,
        func: CmdFn::File(zone_f),
    },
    CmdInfo {
        name: "zone_report",
        alt: Some("zrp"),
        argmin: 2,
        argmax: Some(2),
        args: Some("offset number"),
        oneline: "report zone information",
        writes: false,
        func: CmdFn::File(zone_f),
    },
    CmdInfo {
        name: "zone_reset",
        alt: Some("zrs"),
        argmin: 2,
        argmax: Some(2),
        args: Some("offset len"),
        oneline: "reset a zone write pointer in zone block device",
        writes: false,
        func: CmdFn::File(zone_f),
    },
];

fn find_command(name: &str) -> Option<&'static CmdInfo> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.alt == Some(name))
}

/// A command's one-line help, as qemu-io words it.
fn oneline(c: &CmdInfo) -> String {
    match c.args {
        None => format!("{} -- {}", c.name, c.oneline),
        Some(a) => format!("{} {a} -- {}", c.name, c.oneline),
    }
}

/// Prints a command's usage line (after a bad option or argument).
pub(super) fn usage(name: &str) {
    if let Some(c) = find_command(name) {
        out!("{}", oneline(c));
    }
}

/// Messages of `aio_read` requests that failed, printed when qemu-io would see the
/// completion: when the next command that waits for I/O runs (or at exit).
static DEFERRED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Prints the messages of failed asynchronous reads (see [`DEFERRED`]).
pub fn print_deferred() {
    let msgs = std::mem::take(&mut *DEFERRED.lock().unwrap_or_else(|p| p.into_inner()));
    for m in msgs {
        out!("{m}");
    }
}

/// Runs one command line; an empty line succeeds and does nothing.
pub fn run_line(s: &mut Session, line: &str) -> bool {
    let words = breakline(line);
    let Some(name) = words.first() else {
        return true;
    };
    // Submitting more asynchronous requests does not wait for earlier ones.
    if !matches!(name.as_str(), "aio_read" | "aio_write") {
        print_deferred();
        if let Some(f) = &mut s.file {
            f.poll_aio();
        }
    }
    let Some(ct) = find_command(name) else {
        eprintln!("command \"{name}\" not found");
        return false;
    };
    // qemu-io checks for an open file before the argument count.
    let needs_file = match ct.func {
        CmdFn::File(_) => true,
        CmdFn::Session { needs_file, .. } => needs_file,
    };
    if needs_file && s.file.is_none() {
        return no_file();
    }
    let n = words.len() - 1;
    let too_many = ct.argmax.is_some_and(|m| n > m);
    if n < ct.argmin || too_many {
        match ct.argmax {
            None => eprintln!(
                "bad argument count {n} to {name}, expected at least {} arguments",
                ct.argmin
            ),
            Some(m) if m == ct.argmin => {
                eprintln!("bad argument count {n} to {name}, expected {m} arguments")
            }
            Some(m) => eprintln!(
                "bad argument count {n} to {name}, expected between {} and {m} arguments",
                ct.argmin
            ),
        }
        return false;
    }
    if ct.writes && s.file.as_ref().is_some_and(|f| f.read_only) {
        // qemu-io checks permissions before parsing the command's arguments.
        eprintln!("vdisk: Block node is read-only");
        return false;
    }
    match ct.func {
        CmdFn::File(f) => match s.file.as_mut() {
            Some(file) => f(file, &words),
            None => no_file(),
        },
        CmdFn::Session { f, .. } => f(s, &words),
    }
}

fn no_file() -> bool {
    eprintln!("no file open, try 'help open'");
    false
}

/// Reads the options of a command; prints getopt's message and the usage on a bad one.
fn getopts(
    args: &[String],
    spec: &'static str,
    mut on: impl FnMut(char, Option<String>) -> bool,
) -> Option<usize> {
    let mut g = Getopt::new(args, spec);
    while let Some(o) = g.next_opt() {
        match o {
            Ok((c, v)) => {
                if !on(c, v) {
                    return None;
                }
            }
            Err(msg) => {
                eprintln!("{msg}");
                usage(&args[0]);
                return None;
            }
        }
    }
    Some(g.optind)
}

/// The `off len` pair that must end a command's words after its options, with
/// qemu-io's checks (usage, number syntax, request size); `None` after printing why.
fn off_len(args: &[String], optind: usize) -> Option<(u64, u64)> {
    if optind + 2 != args.len() {
        usage(&args[0]);
        return None;
    }
    let offset = num_arg(&args[optind])?;
    let count = num_arg(&args[optind + 1])?;
    if count > REQUEST_MAX_BYTES {
        out!(
            "length cannot exceed {REQUEST_MAX_BYTES}, given {}",
            args[optind + 1]
        );
        return None;
    }
    Some((offset, count))
}

fn num_arg(arg: &str) -> Option<u64> {
    match cvtnum(arg) {
        Ok(v) => Some(v),
        Err(e) => {
            out!("{}", cvtnum_error(e, arg));
            None
        }
    }
}

fn pattern_arg(arg: &str) -> Option<u8> {
    let p = parse_pattern(arg);
    if p.is_none() {
        out!("{arg} is not a valid pattern byte");
    }
    p
}

/// Prints `<op> failed: <strerror>` like qemu-io; library errors carrying more than
/// an errno (corruption, a named structure) also go to stderr in full.
fn report_error(op: &str, e: &vdisk::Error) {
    out!("{op} failed: {}", strerror(e.errno()));
    let detail = vdisk::error::strip_os_error(&e.to_string());
    if !detail.is_empty() && detail != strerror(e.errno()) {
        eprintln!("vdisk: {op}: {detail}");
    }
}

/// qemu refuses requests past the end of the disk with EIO before they reach a driver.
fn in_range(img: &Image, offset: u64, count: u64, op: &str) -> bool {
    let size = img.size();
    if offset > size || size - offset < count {
        out!("{op} failed: {}", strerror(libc::EIO));
        return false;
    }
    true
}

/// A progress bar for long requests when `-p` was given; hidden otherwise.
fn progress_bar(s: &OpenFile, len: u64) -> indicatif::ProgressBar {
    if !s.progress || len <= PROGRESS_MIN {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "    ({percent:>3}/100%) [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// Runs `f(position_in_request, length)` over `count` bytes in pieces of `chunk`.
fn chunked(
    s: &OpenFile,
    count: u64,
    chunk: u64,
    mut f: impl FnMut(u64, u64) -> vdisk::Result<()>,
) -> vdisk::Result<()> {
    let pb = progress_bar(s, count);
    let mut pos = 0;
    // A zero-length request still goes through once, as in qemu.
    loop {
        let n = (count - pos).min(chunk);
        f(pos, n)?;
        pos += n;
        pb.set_position(pos);
        if pos >= count {
            break;
        }
    }
    pb.finish_and_clear();
    Ok(())
}

/// What a pattern check covers: byte value, start and length relative to the request.
#[derive(Clone, Copy)]
struct Verify {
    pattern: u8,
    start: u64,
    len: u64,
}

/// Reads `count` bytes at `offset`. Returns whether the pattern matched, and the data
/// when `keep` (for `-v`).
/// Which address space a `read`/`write` addresses: the guest disk, or (`-b`) the
/// image's VM state area.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Area {
    Guest,
    VmState,
}

impl Area {
    fn read(self, s: &OpenFile, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        match self {
            Area::Guest => s.img.read_at(buf, offset),
            Area::VmState => s.img.load_vmstate(buf, offset),
        }
    }
    fn write(self, s: &OpenFile, buf: &[u8], offset: u64) -> vdisk::Result<()> {
        match self {
            Area::Guest => s.img.write_at(buf, offset),
            Area::VmState => s.img.save_vmstate(buf, offset),
        }
    }
}

fn read_range(
    s: &OpenFile,
    area: Area,
    offset: u64,
    count: u64,
    verify: Option<Verify>,
    keep: bool,
) -> vdisk::Result<(bool, Option<IoBuf>)> {
    let mut ok = true;
    let mut check = |pos: u64, data: &[u8]| {
        if let Some(v) = verify {
            let lo = v.start.max(pos);
            let hi = (v.start + v.len).min(pos + data.len() as u64);
            if lo < hi
                && data[(lo - pos) as usize..(hi - pos) as usize]
                    .iter()
                    .any(|&b| b != v.pattern)
            {
                ok = false;
            }
        }
    };
    if keep {
        let mut all = alloc_buffer(count)?;
        chunked(s, count, CHUNK, |pos, n| {
            let piece = &mut all[pos as usize..(pos + n) as usize];
            area.read(s, piece, offset + pos)
        })?;
        check(0, &all);
        return Ok((ok, Some(all)));
    }
    let mut buf = alloc_buffer(count.min(CHUNK))?;
    chunked(s, count, CHUNK, |pos, n| {
        let piece = &mut buf[..n as usize];
        area.read(s, piece, offset + pos)?;
        check(pos, piece);
        Ok(())
    })?;
    Ok((ok, None))
}

/// A zeroed buffer, failing with ENOMEM instead of aborting.
fn alloc_buffer(len: u64) -> vdisk::Result<IoBuf> {
    IoBuf::new(len)
}

/// How a write fills its range.
#[derive(Clone, Copy)]
enum Fill<'a> {
    /// Every byte is the pattern.
    Pattern(u8),
    /// The bytes of a file (`write -s`), repeated if the file is shorter.
    Source(&'a [u8]),
    /// Pattern bytes, stored compressed cluster by cluster.
    Compressed(u8),
    /// `write -z`.
    Zeroes(ZeroFlags),
}

fn write_range(
    s: &OpenFile,
    area: Area,
    offset: u64,
    count: u64,
    fill: Fill<'_>,
    fua: bool,
) -> vdisk::Result<()> {
    match fill {
        Fill::Source(data) => {
            let mut buf = alloc_buffer(count.min(CHUNK))?;
            chunked(s, count, CHUNK, |pos, n| {
                let piece = &mut buf[..n as usize];
                for (i, b) in piece.iter_mut().enumerate() {
                    *b = data[((pos + i as u64) % data.len() as u64) as usize];
                }
                area.write(s, piece, offset + pos)
            })?;
        }
        Fill::Pattern(p) => {
            let mut buf = alloc_buffer(count.min(CHUNK))?;
            buf.fill(p);
            chunked(s, count, CHUNK, |pos, n| {
                area.write(s, &buf[..n as usize], offset + pos)
            })?;
        }
        Fill::Compressed(p) => {
            let cluster = s.img.cluster_size().unwrap_or(count.max(1));
            let mut buf = alloc_buffer(count.min(cluster))?;
            buf.fill(p);
            chunked(s, count, cluster.max(1), |pos, n| {
                // qemu-io's compressed writes fail with EIO on a cluster that already
                // has host space (QEMU's qcow2 never overwrites with a compressed
                // cluster; vdisk's library can, but qemu-io scripts expect the error).
                let zeroes_detected = s.detect_zeroes && p == 0;
                let st = s.img.layer_block_status(offset + pos, n)?;
                if !zeroes_detected && (st.offset.is_some() || st.compressed) {
                    return Err(std::io::Error::from_raw_os_error(libc::EIO).into());
                }
                s.img.write_compressed(&buf[..n as usize], offset + pos)
            })?;
        }
        Fill::Zeroes(flags) => {
            let chunk = if s.progress { CHUNK * 16 } else { u64::MAX };
            chunked(s, count, chunk, |pos, n| {
                s.img.write_zeroes(offset + pos, n, flags)
            })?;
        }
    }
    if fua {
        s.img.flush()?;
    }
    Ok(())
}

fn read_f(s: &mut OpenFile, args: &[String]) -> bool {
    let (mut machine, mut quiet, mut dump, mut vmstate) = (false, false, false, false);
    let mut pattern: Option<u8> = None;
    let mut pstart: Option<u64> = None;
    let mut plen: Option<u64> = None;
    let Some(optind) = getopts(args, "abCl:pP:qrs:v", |c, v| {
        let v = v.unwrap_or_default();
        match c {
            'b' => vmstate = true,
            'C' => machine = true,
            'l' => match num_arg(&v) {
                Some(n) => plen = Some(n),
                None => return false,
            },
            'P' => match pattern_arg(&v) {
                Some(p) => pattern = Some(p),
                None => return false,
            },
            'q' => quiet = true,
            's' => match num_arg(&v) {
                Some(n) => pstart = Some(n),
                None => return false,
            },
            'v' => dump = true,
            _ => {} // -a, -p, -r: no meaning here
        }
        true
    }) else {
        return false;
    };
    let Some((offset, count)) = off_len(args, optind) else {
        return false;
    };
    if pattern.is_none() && (pstart.is_some() || plen.is_some()) {
        usage("read");
        return false;
    }
    let start = pstart.unwrap_or(0);
    let len = match plen {
        Some(l) => l,
        None => count.saturating_sub(start),
    };
    if start > count || len > count - start {
        out!("pattern verification range exceeds end of read data");
        return false;
    }
    if vmstate && !sector_aligned(offset, count) {
        return false;
    }
    let area = if vmstate { Area::VmState } else { Area::Guest };
    if area == Area::Guest && !in_range(&s.img, offset, count, "read") {
        return false;
    }
    let verify = pattern.map(|p| Verify {
        pattern: p,
        start,
        len,
    });
    let t0 = Instant::now();
    let r = read_range(s, area, offset, count, verify, dump && !quiet);
    let t = t0.elapsed();
    finish_read("read", r, offset, count, start, len, quiet, machine, t)
}

/// Prints a read's outcome (verification, dump, report); returns success.
#[allow(clippy::too_many_arguments)]
fn finish_read(
    op: &str,
    r: vdisk::Result<(bool, Option<IoBuf>)>,
    offset: u64,
    count: u64,
    pstart: u64,
    plen: u64,
    quiet: bool,
    machine: bool,
    t: Duration,
) -> bool {
    let (ok, data) = match r {
        Ok(v) => v,
        Err(e) => {
            report_error(op, &e);
            return false;
        }
    };
    if !ok {
        out!(
            "Pattern verification failed at offset {}, {} bytes",
            offset + pstart,
            plen
        );
    }
    if quiet {
        return ok;
    }
    if let Some(data) = data {
        let out = std::io::stdout();
        let mut out = std::io::BufWriter::new(out.lock());
        if dump_buffer(&mut out, &data, offset)
            .and_then(|_| out.flush())
            .is_err()
        {
            return false;
        }
    }
    print_report("read", t, offset, count, count, machine);
    ok
}

fn write_f(s: &mut OpenFile, args: &[String]) -> bool {
    let (mut machine, mut quiet, mut zero, mut unmap, mut fast) =
        (false, false, false, false, false);
    let (mut compressed, mut fua, mut vmstate) = (false, false, false);
    let mut pattern: Option<u8> = None;
    let mut source: Option<String> = None;
    let Some(optind) = getopts(args, "bcCfnpP:qrs:uz", |c, v| {
        match c {
            's' => source = v,
            'b' => vmstate = true,
            'c' => compressed = true,
            'C' => machine = true,
            'f' => fua = true,
            'n' => fast = true,
            'P' => match pattern_arg(&v.unwrap_or_default()) {
                Some(p) => pattern = Some(p),
                None => return false,
            },
            'q' => quiet = true,
            'u' => unmap = true,
            'z' => zero = true,
            _ => {} // -p, -r: no meaning here
        }
        true
    }) else {
        return false;
    };
    if optind + 2 != args.len() {
        usage("write");
        return false;
    }
    if vmstate && zero {
        out!("-b and -z cannot be specified at the same time");
        return false;
    }
    if fua && (vmstate || compressed) {
        out!("-f and -b or -c cannot be specified at the same time");
        return false;
    }
    if usize::from(zero) + usize::from(pattern.is_some()) + usize::from(source.is_some()) > 1 {
        out!("Only one of -z, -P, and -s can be specified at the same time");
        return false;
    }
    if unmap && !zero {
        out!("-u requires -z to be specified");
        return false;
    }
    if fast && !zero {
        out!("-n requires -z to be specified");
        return false;
    }
    let Some(offset) = num_arg(&args[optind]) else {
        return false;
    };
    let Some(count) = num_arg(&args[optind + 1]) else {
        return false;
    };
    if count > REQUEST_MAX_BYTES && !fast {
        out!(
            "length cannot exceed {REQUEST_MAX_BYTES} without -n, given {}",
            args[optind + 1]
        );
        return false;
    }
    if (vmstate || compressed) && !sector_aligned(offset, count) {
        return false;
    }
    let p = pattern.unwrap_or(0xcd);
    let data = match &source {
        Some(path) => match read_source(path, count) {
            Some(d) => d,
            None => return false,
        },
        None => Vec::new(),
    };
    let fill = if !data.is_empty() {
        Fill::Source(&data)
    } else if vmstate {
        // qemu-io saves VM state with the pattern whatever -c says.
        Fill::Pattern(p)
    } else if zero {
        Fill::Zeroes(ZeroFlags {
            may_unmap: unmap,
            fast,
        })
    } else if compressed {
        Fill::Compressed(p)
    } else {
        Fill::Pattern(p)
    };
    let area = if vmstate { Area::VmState } else { Area::Guest };
    do_write("write", s, area, offset, count, fill, fua, quiet, machine)
}

/// VM state and compressed requests must be whole 512-byte sectors, as in qemu-io.
fn sector_aligned(offset: u64, count: u64) -> bool {
    if !offset.is_multiple_of(512) {
        out!("{offset} is not a sector-aligned value for 'offset'");
        return false;
    }
    if !count.is_multiple_of(512) {
        out!("{count} is not a sector-aligned value for 'count'");
        return false;
    }
    true
}

/// Reads up to `count` bytes of a `write -s` source file; prints why on failure.
fn read_source(path: &str, count: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    let r = std::fs::File::open(path).and_then(|f| f.take(count).read_to_end(&mut data));
    match r {
        Err(e) => {
            eprintln!(
                "{path}: {}",
                strerror(e.raw_os_error().unwrap_or(libc::EIO))
            );
            None
        }
        Ok(0) if count > 0 => {
            eprintln!("{path}: file is empty");
            None
        }
        Ok(_) => Some(data),
    }
}

#[allow(clippy::too_many_arguments)]
fn do_write(
    op: &str,
    s: &OpenFile,
    area: Area,
    offset: u64,
    count: u64,
    fill: Fill<'_>,
    fua: bool,
    quiet: bool,
    machine: bool,
) -> bool {
    if area == Area::Guest && !in_range(&s.img, offset, count, op) {
        return false;
    }
    let t0 = Instant::now();
    let r = write_range(s, area, offset, count, fill, fua);
    let t = t0.elapsed();
    if let Err(e) = r {
        report_error(op, &e);
        return false;
    }
    if !quiet {
        print_report("wrote", t, offset, count, count, machine);
    }
    true
}

/// `readv`/`writev`/`aio_read`/`aio_write`: one offset, several lengths. The buffers
/// are contiguous in the guest, so they run as one request of the summed length.
fn vectored(s: &mut OpenFile, args: &[String], write: bool, spec: &'static str) -> bool {
    // The word qemu-io's failure messages use (its aio_read completes as a readv).
    let op = match (args[0].as_str(), write) {
        ("aio_write", _) => "aio_write",
        (_, true) => "writev",
        (_, false) => "readv",
    };
    let (mut machine, mut quiet, mut dump, mut fua, mut zero, mut unmap) =
        (false, false, false, false, false, false);
    let mut pattern: Option<u8> = None;
    let mut inject = false;
    let Some(optind) = getopts(args, spec, |c, v| {
        match c {
            'C' => machine = true,
            'q' => quiet = true,
            'v' => dump = true,
            'f' => fua = true,
            'z' => zero = true,
            'u' => unmap = true,
            'P' => match pattern_arg(&v.unwrap_or_default()) {
                Some(p) => pattern = Some(p),
                None => return false,
            },
            // `aio_* -i`: qemu-io accounts an invalid request and stops right there.
            'i' => {
                inject = true;
                return false;
            }
            _ => {} // -r: no meaning here
        }
        true
    }) else {
        if inject {
            let what = if write { "write" } else { "read" };
            out!("injecting invalid {what} request");
            return true;
        }
        return false;
    };
    if optind + 2 > args.len() {
        usage(&args[0]);
        return false;
    }
    if zero && pattern.is_some() {
        out!("Only one of -z, -P, and -s can be specified at the same time");
        return false;
    }
    if unmap && !zero {
        out!("-u requires -z to be specified");
        return false;
    }
    let Some(offset) = num_arg(&args[optind]) else {
        return false;
    };
    let mut total: u64 = 0;
    for a in &args[optind + 1..] {
        let Some(n) = num_arg(a) else {
            return false;
        };
        if n > i32::MAX as u64 && !zero {
            out!("too large length argument -- {a}");
            return false;
        }
        total = total.saturating_add(n);
    }
    if total > REQUEST_MAX_BYTES && !zero {
        out!("length cannot exceed {REQUEST_MAX_BYTES}, given {total}");
        return false;
    }
    if args[0].starts_with("aio_") && aio::wanted(&s.img) && in_range(&s.img, offset, total, op) {
        // A breakpoint may hold this request: it runs on its own thread.
        let job = match (write, zero) {
            (false, _) => Job::Read { len: total },
            (true, true) => Job::Zeroes {
                len: total,
                flags: ZeroFlags {
                    may_unmap: unmap,
                    fast: false,
                },
                fua,
            },
            (true, false) => Job::Write {
                len: total,
                pattern: pattern.unwrap_or(0xcd),
                fua,
            },
        };
        let report = Report {
            op,
            offset,
            len: total,
            pattern: if write { None } else { pattern },
            dump: dump && !quiet,
            quiet,
            machine,
        };
        let img = s.img.clone();
        s.aio.submit(&img, job, report);
        return true;
    }
    if write {
        let fill = if zero {
            Fill::Zeroes(ZeroFlags {
                may_unmap: unmap,
                fast: false,
            })
        } else {
            Fill::Pattern(pattern.unwrap_or(0xcd))
        };
        return do_write(op, s, Area::Guest, offset, total, fill, fua, quiet, machine);
    }
    if args[0] == "aio_read" && offset.checked_add(total).is_none_or(|e| e > s.img.size()) {
        // qemu-io sees this failure when the request completes, not when it is made.
        DEFERRED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{op} failed: {}", strerror(libc::EIO)));
        return false;
    }
    if !in_range(&s.img, offset, total, op) {
        return false;
    }
    let verify = pattern.map(|p| Verify {
        pattern: p,
        start: 0,
        len: total,
    });
    let t0 = Instant::now();
    let r = read_range(s, Area::Guest, offset, total, verify, dump && !quiet);
    let t = t0.elapsed();
    finish_read(op, r, offset, total, 0, total, quiet, machine, t)
}

fn readv_f(s: &mut OpenFile, args: &[String]) -> bool {
    vectored(s, args, false, "CP:qrv")
}

fn writev_f(s: &mut OpenFile, args: &[String]) -> bool {
    vectored(s, args, true, "CfP:qr")
}

fn aio_read_f(s: &mut OpenFile, args: &[String]) -> bool {
    vectored(s, args, false, "CiP:qrv")
}

fn aio_write_f(s: &mut OpenFile, args: &[String]) -> bool {
    vectored(s, args, true, "CfiP:qruz")
}

/// Waits for the asynchronous requests still running (without breakpoints they
/// complete before their command returns).
fn aio_flush_f(s: &mut OpenFile, _args: &[String]) -> bool {
    s.drain_aio();
    true
}

fn discard_f(s: &mut OpenFile, args: &[String]) -> bool {
    let (mut machine, mut quiet) = (false, false);
    let Some(optind) = getopts(args, "Cq", |c, _| {
        match c {
            'C' => machine = true,
            'q' => quiet = true,
            _ => {}
        }
        true
    }) else {
        return false;
    };
    let Some((offset, count)) = off_len(args, optind) else {
        return false;
    };
    if !in_range(&s.img, offset, count, "discard") {
        return false;
    }
    let t0 = Instant::now();
    let r = chunked(s, count, CHUNK * 16, |pos, n| {
        s.img.discard(offset + pos, n)
    });
    let t = t0.elapsed();
    if let Err(e) = r {
        report_error("discard", &e);
        return false;
    }
    if !quiet {
        print_report("discard", t, offset, count, count, machine);
    }
    true
}

fn flush_f(s: &mut OpenFile, _args: &[String]) -> bool {
    match s.img.flush() {
        Ok(()) => true,
        Err(e) => {
            report_error("flush", &e);
            false
        }
    }
}

fn map_f(s: &mut OpenFile, _args: &[String]) -> bool {
    let size = s.img.size();
    let mut offset = 0u64;
    while offset < size {
        // Merge runs with the same answer, as qemu-io does. Like qemu-io, only the
        // top image counts: ranges its backing file provides are "not allocated".
        let mut num = 0u64;
        let mut allocated = None;
        while offset + num < size {
            let e = match s.img.layer_block_status(offset + num, size - offset - num) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!(
                        "vdisk: Failed to get allocation status: {}",
                        strerror(e.errno())
                    );
                    eprintln!("vdisk: {e}");
                    return false;
                }
            };
            if e.len == 0 {
                eprintln!("vdisk: Unexpected end of image");
                return false;
            }
            let a = e.kind != ExtentKind::Unallocated;
            if allocated.is_some_and(|prev| prev != a) {
                break;
            }
            allocated = Some(a);
            num += e.len.min(size - offset - num);
        }
        out!(
            "{} (0x{:x}) bytes {} at offset {} (0x{:x})",
            cvtstr(num as f64),
            num,
            if allocated == Some(true) {
                "    allocated"
            } else {
                "not allocated"
            },
            cvtstr(offset as f64),
            offset
        );
        offset += num;
    }
    true
}

fn alloc_f(s: &mut OpenFile, args: &[String]) -> bool {
    let Some(start) = num_arg(&args[1]) else {
        return false;
    };
    let mut count = match args.get(2) {
        Some(a) => match num_arg(a) {
            Some(n) => n,
            None => return false,
        },
        None => 512,
    };
    let size = s.img.size();
    // qemu stops at the end of the disk and reports over what it could look at.
    count = count.min(size.saturating_sub(start));
    let mut offset = start;
    let end = start + count;
    let mut allocated = 0u64;
    while offset < end {
        match s.img.layer_block_status(offset, end - offset) {
            Ok(e) if e.len > 0 => {
                let n = e.len.min(end - offset);
                if e.kind != ExtentKind::Unallocated {
                    allocated += n;
                }
                offset += n;
            }
            Ok(_) => {
                count = offset - start;
                break;
            }
            Err(e) => {
                report_error("is_allocated", &e);
                return false;
            }
        }
    }
    out!(
        "{allocated}/{count} bytes allocated at offset {}",
        cvtstr(start as f64)
    );
    true
}

fn info_f(s: &mut OpenFile, _args: &[String]) -> bool {
    let d = &s.img;
    let cluster = d.cluster_size().unwrap_or(0);
    let spec = d.format_specific();
    out!("format name: {}", d.format());
    out!("cluster size: {}", cvtstr(cluster as f64));
    out!(
        "vm state offset: {}",
        cvtstr(vm_state_offset(d.size(), cluster, &spec) as f64)
    );
    // Like out!: a closed stdout is not an error here.
    let _ = std::io::stdout()
        .write_all(crate::cmd::info::specific_human_with(&spec, &d.bitmaps()).as_bytes());
    true
}

/// Where qcow2 keeps VM state: right after the guest disk, rounded up to what one L1
/// entry maps. Other formats have no VM state area.
fn vm_state_offset(size: u64, cluster: u64, spec: &FormatSpecific) -> u64 {
    let FormatSpecific::Qcow2 { extended_l2, .. } = spec else {
        return 0;
    };
    if !cluster.is_power_of_two() || cluster < 512 {
        return 0;
    }
    let cluster_bits = cluster.trailing_zeros();
    let entry_bits = if *extended_l2 { 4 } else { 3 };
    let shift = cluster_bits + cluster_bits.saturating_sub(entry_bits);
    if shift >= 64 {
        return 0;
    }
    let per_l1 = 1u64 << shift;
    size.div_ceil(per_l1).saturating_mul(per_l1)
}

fn length_f(s: &mut OpenFile, _args: &[String]) -> bool {
    out!("{}", cvtstr(s.img.size() as f64));
    true
}

fn truncate_f(s: &mut OpenFile, args: &[String]) -> bool {
    let mut mode = String::from("off");
    let Some(optind) = getopts(args, "m:", |c, v| {
        if c == 'm' {
            mode = v.unwrap_or_default();
        }
        true
    }) else {
        return false;
    };
    if optind + 1 != args.len() {
        usage("truncate");
        return false;
    }
    if mode != "off" {
        eprintln!("vdisk: truncate: preallocation mode '{mode}' is not supported; use off");
        return false;
    }
    let Some(size) = num_arg(&args[optind]) else {
        return false;
    };
    // QEMU's drivers that cannot shrink refuse here; vdisk's QED could, but qemu-io's
    // truncate must do what qemu-io does (`vdisk resize --shrink` still shrinks QED).
    if size < s.img.size() && !s.img.format().caps().qemu_shrinks {
        eprintln!("vdisk: Shrinking images is currently not supported");
        return false;
    }
    match s.img.resize(size, true) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("vdisk: {e}");
            false
        }
    }
}

fn sleep_f(_s: &mut Session, args: &[String]) -> bool {
    match args[1].parse::<u64>() {
        Ok(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
            true
        }
        Err(_) => {
            out!("{} is not a valid number", args[1]);
            false
        }
    }
}

fn help_f(_s: &mut Session, args: &[String]) -> bool {
    match args.get(1) {
        Some(name) => match find_command(name) {
            Some(c) => {
                out!("{}", oneline(c));
                if let Some((_, text)) = super::help::EXTENDED.iter().find(|(n, _)| *n == c.name) {
                    print!("{text}");
                }
                true
            }
            None => {
                out!("command {name} not found");
                false
            }
        },
        None => {
            for c in COMMANDS {
                out!("{}", oneline(c));
            }
            out!("\nUse 'help commandname' for extended help.");
            true
        }
    }
}

fn quit_f(s: &mut Session, _args: &[String]) -> bool {
    s.quit = true;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_state_offsets_match_qemu() {
        let q = |ext| FormatSpecific::Qcow2 {
            compat: "1.1".into(),
            compression_type: "zlib".into(),
            lazy_refcounts: false,
            refcount_bits: 16,
            corrupt: false,
            extended_l2: ext,
            data_file: None,
            data_file_raw: false,
        };
        assert_eq!(vm_state_offset(1 << 20, 65536, &q(false)), 512 << 20);
        assert_eq!(vm_state_offset(5 << 30, 65536, &q(true)), 5 << 30);
        assert_eq!(vm_state_offset(0, 65536, &q(false)), 0);
        assert_eq!(vm_state_offset(1 << 20, 65536, &FormatSpecific::Qed), 0);
    }
}
