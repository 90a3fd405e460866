//! `vdisk convert`: copies one or more images (concatenated) into a new image, as
//! `qemu-img convert`.
//!
//! The target is cut into windows (2 MiB, aligned in the target). A planner walks the
//! sources' block status under a lock (keeping the last answer, so a long extent costs
//! one query) and hands out numbered work items; worker threads read them. Without
//! `-W` the items go through the sequencer (`convert/sequencer.rs`), which writes them
//! in target order, so the target is laid out in order, without any worker waiting for
//! its turn; with `-W` (and for `-c`, whose compression happens inside the write) each
//! worker writes its items as soon as they are read. Ranges that read as zeroes are
//! not written into a fresh target, and ranges the source leaves to its backing file
//! are not copied when the target has one.

mod sequencer;

use crate::common::{self, chain_status, layers, Layer};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use vdisk::{CacheMode, CreateOptions, Error, Format, Image, OpenOptions, ZeroFlags};

/// Size of a data window (and of the largest single read/write).
const WINDOW: u64 = 2 << 20;
/// Largest run of zeroes handed out as one item (zeroes may need writing; ranges that
/// are skipped cost nothing, so they go out whole: a sparse 64 TiB disk is one item).
const MAX_ZERO_ITEM: u64 = 1 << 30;
/// Largest `-S` qemu-img accepts.
const MAX_SPARSE: u64 = 16 << 20;

/// Arguments of `vdisk convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Source format (probed when absent).
    #[arg(short = 'f', long = "source-format")]
    pub format: Option<String>,
    /// Target format (default raw).
    #[arg(short = 'O', long = "target-format")]
    pub out_format: Option<String>,
    /// Target format options.
    #[arg(short = 'o', long = "target-options")]
    pub options: Vec<String>,
    /// Backing file of the target.
    #[arg(short = 'B', long = "backing")]
    pub backing: Option<String>,
    /// Format of the target's backing file.
    #[arg(short = 'F', long = "backing-format")]
    pub backing_format: Option<String>,
    /// Compress the target (qcow2).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Do not create the target; it must exist.
    #[arg(short = 'n', long = "no-create")]
    pub no_create: bool,
    /// With -n: the target already reads as zeroes.
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Minimum run of zeroes (bytes) not written; 0 writes everything.
    #[arg(short = 'S', long = "sparse-size")]
    pub sparse: Option<String>,
    /// Target cache mode (default unsafe).
    #[arg(short = 't', long = "target-cache")]
    pub cache: Option<String>,
    /// Source cache mode (default writeback).
    #[arg(short = 'T', long = "source-cache")]
    pub src_cache: Option<String>,
    /// Allow out-of-order writes.
    #[arg(short = 'W', long = "oob-writes")]
    pub oob_writes: bool,
    /// Parallel requests (1..16, default 8); with buffered I/O at most one thread per
    /// CPU runs them.
    #[arg(short = 'm', long = "parallel")]
    pub parallel: Option<String>,
    /// Use copy offloading (`copy_file_range`) between raw images on host files.
    #[arg(short = 'C', long = "copy-range-offloading")]
    pub copy_range: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Open the sources in shared mode.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Treat the image name as a key=value option list (`driver=qcow2,file.filename=X`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Treat the target name as a key=value option list (needs `-n`).
    #[arg(long = "target-image-opts")]
    pub target_image_opts: bool,
    /// Convert a snapshot of the source: `snapshot.id=ID,snapshot.name=NAME` (either
    /// or both), or an ID or name.
    #[arg(short = 'l', action = clap::ArgAction::Append)]
    pub snapshot: Vec<String>,
    /// Copy the source's persistent dirty bitmaps to the target.
    #[arg(long = "bitmaps")]
    pub bitmaps: bool,
    /// With --bitmaps, skip inconsistent bitmaps (with a warning) instead of failing.
    #[arg(long = "skip-broken-bitmaps")]
    pub skip_broken_bitmaps: bool,
    /// Source images followed by the target.
    pub files: Vec<String>,
}

/// What to do with one stretch of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Copy from the source.
    Data,
    /// Reads as zeroes.
    Zero,
    /// Left to the target's backing file.
    Skip,
}

/// A stretch of one source inside a work item.
#[derive(Clone, Copy, Debug)]
struct Segment {
    kind: Kind,
    src: usize,
    src_off: u64,
    dst_off: u64,
    len: u64,
}

/// A numbered unit of work.
#[derive(Debug)]
struct Item {
    index: u64,
    dst_off: u64,
    len: u64,
    segments: Vec<Segment>,
}

struct Source {
    img: Image,
    /// Size in whole sectors, as qemu counts it.
    size: u64,
    layers: Vec<Layer>,
    /// Per layer: whether qemu would treat it as metadata-preallocated (and so skip
    /// the host file's holes under its data runs), found out at its first data run.
    recurse: Mutex<Vec<Option<bool>>>,
    base: u64,
    name: String,
}

/// Walks the sources' block status and hands out items in target order.
struct Planner {
    pos: u64,
    next_index: u64,
    /// The last status answer, whole: a long extent serves many windows with one
    /// query (a query is a syscall or two for raw and may walk tables for others).
    last: Option<Segment>,
}

impl Segment {
    /// The part of this segment from target offset `dst` on, if it covers `dst`.
    fn from(&self, dst: u64) -> Option<Segment> {
        let skip = dst.checked_sub(self.dst_off)?;
        (skip < self.len).then(|| Segment {
            src_off: self.src_off + skip,
            dst_off: dst,
            len: self.len - skip,
            ..*self
        })
    }
}

struct Job<'a> {
    sources: &'a [Source],
    target: &'a Image,
    total: u64,
    /// Only the top layer of the source counts (the target has a backing file).
    top_only: bool,
    /// Target backing size: zeroes past it need not be written.
    target_backing_size: Option<u64>,
    zero_init: bool,
    sparse: u64,
    compress: bool,
    /// `-C` where offload can work (raw sources and target): data ranges are copied by
    /// the kernel (`copy_file_range`), never read here; what it cannot copy is read and
    /// written as usual.
    offload: bool,
    cluster: u64,
    /// Writes go through the sequencer, in target order (None: each worker writes
    /// its own items as soon as they are read).
    sequencer: Option<sequencer::Sequencer<Item>>,
    planner: Mutex<Planner>,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
    done_bytes: AtomicU64,
    progress: crate::progress::Progress,
}

impl Job<'_> {
    fn fail(&self, msg: String) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(msg);
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(q) = &self.sequencer {
            q.stop();
        }
    }

    fn source_at(&self, dst: u64) -> usize {
        // Sources are few; a linear scan from the end finds the last base <= dst.
        self.sources
            .iter()
            .rposition(|s| s.base <= dst)
            .unwrap_or(0)
    }

    /// Whether layer `depth` of `s` looks metadata-preallocated to qemu
    /// ([`common::metadata_preallocated`]), asked once per layer.
    fn recurses(&self, s: &Source, depth: usize) -> vdisk::Result<bool> {
        let mut r = s.recurse.lock().unwrap_or_else(|e| e.into_inner());
        match (s.layers.get(depth), r.get_mut(depth)) {
            (Some(layer), Some(slot)) => common::metadata_preallocated_once(layer, slot),
            _ => Ok(false),
        }
    }

    /// One status query: the kind of the target range starting at `dst` (at most `max`).
    fn classify(&self, dst: u64, max: u64) -> Result<Segment, String> {
        let si = self.source_at(dst);
        let s = &self.sources[si];
        let local = dst - s.base;
        let src_end = s.base + s.size;
        let mut len = max.min(src_end - dst);
        if local >= s.img.size() {
            // The tail of a partial last sector: zeroes.
            return Ok(Segment {
                kind: Kind::Zero,
                src: si,
                src_off: local,
                dst_off: dst,
                len,
            });
        }
        len = len.min(s.img.size() - local);
        if let Some(bs) = self.target_backing_size {
            if dst < bs {
                len = len.min(bs - dst);
            }
        }
        let status_err = |e: vdisk::Error| {
            format!(
                "error while reading block status of sector {}: {e}",
                local / 512
            )
        };
        let mut st = chain_status(&s.layers, local, len, self.top_only).map_err(status_err)?;
        // Formats whose data runs the host file refines (fixed VHD, static VDI: QEMU's
        // BDRV_BLOCK_RECURSE), or whose file holes read as zeroes (VHDX payload
        // blocks): holes in the file read as zeroes and need no copy.
        // So are the data runs of a qcow2 that qemu-img takes for metadata-preallocated
        // (its clusters mapped over file holes): without this a 4 GiB image made with
        // preallocation=metadata was read whole, 4 GiB of zeroes, where qemu-img reads
        // nothing. Encrypted data has no host offset, so it is never refined.
        if st.data && !st.compressed {
            if let Some(layer) = s.layers.get(st.depth) {
                let refines = common::file_refines(layer, local)
                    || layer.file_holes_read_zero()
                    || self.recurses(s, st.depth).map_err(status_err)?;
                if refines {
                    common::refine_with_file(layer, local, &mut st).map_err(status_err)?;
                }
            }
        }
        let len = st.len.clamp(1, len);
        let mut kind = if st.data && !st.zero {
            Kind::Data
        } else if st.zero {
            Kind::Zero
        } else {
            Kind::Skip
        };
        if kind == Kind::Zero && self.target_backing_size.is_some_and(|bs| dst >= bs) {
            // Past the end of the target's backing file the target reads zeroes anyway.
            kind = Kind::Skip;
        }
        Ok(Segment {
            kind,
            src: si,
            src_off: local,
            dst_off: dst,
            len,
        })
    }

    /// The status of the target from `dst` on, through the planner's cache.
    fn status(&self, p: &mut Planner, dst: u64) -> Result<Segment, String> {
        if let Some(seg) = p.last.as_ref().and_then(|s| s.from(dst)) {
            return Ok(seg);
        }
        let seg = self.classify(dst, self.total - dst)?;
        p.last = Some(seg);
        Ok(seg)
    }

    fn next_item(&self) -> Result<Option<Item>, String> {
        let mut guard = self.planner.lock().unwrap_or_else(|e| e.into_inner());
        let p = &mut *guard;
        if p.pos >= self.total || self.stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let start = p.pos;
        let win_end = ((start / WINDOW) + 1) * WINDOW;
        let win_end = win_end.min(self.total);
        let first = self.status(p, start)?;
        let mut segments = Vec::new();
        let end;
        if first.kind != Kind::Data && start + first.len > win_end {
            // A long quiet stretch: one item, ending on a window boundary (or the end)
            // so that later windows stay aligned (compressed clusters must be whole).
            // Zeroes that must be written go out in bounded pieces; the rest of the
            // stretch stays in the status cache for the next items.
            let quiet = if first.kind == Kind::Zero && self.writes_zeroes() {
                first.len.min(MAX_ZERO_ITEM)
            } else {
                first.len
            };
            let e = start + quiet;
            end = if e == self.total {
                e
            } else {
                e / WINDOW * WINDOW
            };
            segments.push(Segment {
                len: end - start,
                ..first
            });
        } else {
            let mut pos = start;
            let mut seg = Segment {
                len: first.len.min(win_end - start),
                ..first
            };
            loop {
                pos += seg.len;
                push_merged(&mut segments, seg);
                if pos >= win_end {
                    break;
                }
                seg = self.status(p, pos)?;
                seg.len = seg.len.min(win_end - pos);
            }
            end = win_end;
        }
        let index = p.next_index;
        p.next_index += 1;
        p.pos = end;
        Ok(Some(Item {
            index,
            dst_off: start,
            len: end - start,
            segments,
        }))
    }

    fn read(&self, seg: &Segment, buf: &mut [u8]) -> Result<(), String> {
        let s = &self.sources[seg.src];
        common::read_sectors(&s.img, buf, seg.src_off).map_err(|e| {
            format!(
                "error while reading at byte {} of {}: {e}",
                seg.src_off, s.name
            )
        })
    }

    fn write(&self, buf: &[u8], off: u64) -> Result<(), String> {
        self.target
            .write_at(buf, off)
            .map_err(|e| format!("error while writing at byte {off}: {e}"))
    }

    /// Whether ranges that read as zeroes must be written to the target.
    fn writes_zeroes(&self) -> bool {
        !self.zero_init || self.sparse == 0
    }

    fn zero(&self, off: u64, len: u64) -> Result<(), String> {
        if !self.writes_zeroes() || len == 0 {
            return Ok(());
        }
        if self.sparse == 0 {
            // -S 0 asks for a fully allocated target, as qemu-img: zeroes go out as data.
            let buf = vec![0u8; WINDOW.min(len) as usize];
            let mut pos = off;
            while pos < off + len {
                let n = (off + len - pos).min(WINDOW) as usize;
                self.write(&buf[..n], pos)?;
                pos += n as u64;
            }
            return Ok(());
        }
        let flags = ZeroFlags {
            may_unmap: self.sparse != 0,
            fast: false,
        };
        self.target
            .write_zeroes(off, len, flags)
            .map_err(|e| format!("error while writing zeroes at byte {off}: {e}"))
    }

    /// Writes a data range, leaving out aligned blocks of `sparse` zero bytes.
    fn write_sparse(&self, buf: &[u8], off: u64) -> Result<(), String> {
        if self.sparse == 0 {
            return self.write(buf, off);
        }
        let end = off + buf.len() as u64;
        let mut run_start = off;
        let mut run_zero: Option<bool> = None;
        let mut pos = off;
        while pos < end {
            let block_end = ((pos / self.sparse) + 1) * self.sparse;
            let block_end = block_end.min(end);
            let b = &buf[(pos - off) as usize..(block_end - off) as usize];
            let z = common::is_zero(b);
            if run_zero != Some(z) {
                if let Some(prev) = run_zero {
                    self.flush_run(buf, off, run_start, pos, prev)?;
                }
                run_start = pos;
                run_zero = Some(z);
            }
            pos = block_end;
        }
        if let Some(prev) = run_zero {
            self.flush_run(buf, off, run_start, end, prev)?;
        }
        Ok(())
    }

    fn flush_run(&self, buf: &[u8], base: u64, a: u64, b: u64, zero: bool) -> Result<(), String> {
        if zero {
            self.zero(a, b - a)
        } else {
            self.write(&buf[(a - base) as usize..(b - base) as usize], a)
        }
    }

    /// Reads an item's data into `buf` (the item's length). Only data segments are
    /// read: the rest of the buffer is never written out, except for compressed
    /// clusters, which are written whole and so read their non-data parts too (they
    /// read as zeroes or as the shared backing file).
    fn fill(&self, item: &Item, buf: &mut [u8]) -> Result<(), String> {
        for seg in &item.segments {
            if (seg.kind == Kind::Data && !self.offload) || self.compress {
                let rel = (seg.dst_off - item.dst_off) as usize;
                self.read(seg, &mut buf[rel..rel + seg.len as usize])?;
            }
        }
        Ok(())
    }

    /// Writes an item whose data segments `fill` has read into `buf` (empty when the
    /// item has no data).
    fn write_item(&self, item: &Item, buf: &[u8]) -> Result<(), String> {
        if self.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if self.compress && !buf.is_empty() {
            self.write_compressed_item(item, buf)?;
        } else {
            for seg in &item.segments {
                let rel = (seg.dst_off - item.dst_off) as usize;
                match seg.kind {
                    Kind::Data if self.offload => self.copy_offloaded(seg)?,
                    Kind::Data => {
                        self.write_sparse(&buf[rel..rel + seg.len as usize], seg.dst_off)?
                    }
                    Kind::Zero => self.zero(seg.dst_off, seg.len)?,
                    Kind::Skip => {}
                }
            }
        }
        let done = self.done_bytes.fetch_add(item.len, Ordering::Relaxed) + item.len;
        self.progress.set(done);
        Ok(())
    }

    /// Copies a data segment by copy offload; the part the kernel could not copy (a
    /// source shorter than its sector-rounded size, another file system) is read and
    /// written.
    fn copy_offloaded(&self, seg: &Segment) -> Result<(), String> {
        let s = &self.sources[seg.src];
        // Guest bytes past the source file's end read as zeroes: never offloaded.
        let in_file = seg.len.min(s.img.size().saturating_sub(seg.src_off));
        let done = if in_file > 0 {
            s.img
                .copy_range_to(seg.src_off, self.target, seg.dst_off, in_file)
                .map_err(|e| format!("error while writing at byte {}: {e}", seg.dst_off))?
        } else {
            0
        };
        if done < seg.len {
            let rest = Segment {
                src_off: seg.src_off + done,
                dst_off: seg.dst_off + done,
                len: seg.len - done,
                ..*seg
            };
            let mut buf = vec![0u8; rest.len.min(WINDOW) as usize];
            let mut pos = 0;
            while pos < rest.len {
                let n = (rest.len - pos).min(WINDOW);
                let part = Segment {
                    src_off: rest.src_off + pos,
                    dst_off: rest.dst_off + pos,
                    len: n,
                    ..rest
                };
                self.read(&part, &mut buf[..n as usize])?;
                self.write_sparse(&buf[..n as usize], part.dst_off)?;
                pos += n;
            }
        }
        Ok(())
    }

    fn write_compressed_item(&self, item: &Item, buf: &[u8]) -> Result<(), String> {
        let end = item.dst_off + item.len;
        let mut c = item.dst_off / self.cluster * self.cluster;
        while c < end {
            let ce = (c + self.cluster).min(end);
            let data_in_cluster = item
                .segments
                .iter()
                .any(|s| s.kind == Kind::Data && s.dst_off < ce && s.dst_off + s.len > c);
            let bytes = &buf[(c - item.dst_off) as usize..(ce - item.dst_off) as usize];
            if data_in_cluster && !common::is_zero(bytes) {
                match self.target.write_compressed(bytes, c) {
                    Ok(()) => {}
                    // A short last cluster may not be compressible: store it plainly.
                    Err(Error::InvalidArgument(_)) if ce - c < self.cluster => {
                        self.write(bytes, c)?
                    }
                    Err(e) => {
                        return Err(format!("error while compressing sector {}: {e}", c / 512))
                    }
                }
            } else {
                // Zero or untouched: handle each segment part by its kind.
                for s in &item.segments {
                    let a = s.dst_off.max(c);
                    let b = (s.dst_off + s.len).min(ce);
                    if a >= b {
                        continue;
                    }
                    match s.kind {
                        Kind::Data | Kind::Zero => self.zero(a, b - a)?,
                        Kind::Skip => {}
                    }
                }
            }
            c = ce;
        }
        Ok(())
    }

    fn worker(&self) {
        let r = match &self.sequencer {
            Some(q) => self.worker_in_order(q),
            None => self.worker_unordered(),
        };
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Reads items and writes each right away.
    fn worker_unordered(&self) -> Result<(), String> {
        let mut buf = Vec::new();
        while let Some(item) = self.next_item()? {
            let len = if has_data(&item) {
                if buf.is_empty() {
                    buf = vec![0u8; WINDOW as usize];
                }
                let b = &mut buf[..item.len as usize];
                self.fill(&item, b)?;
                item.len as usize
            } else {
                0
            };
            self.write_item(&item, &buf[..len])?;
        }
        Ok(())
    }

    /// Reads items and hands them to the sequencer, which writes them in order.
    fn worker_in_order(&self, q: &sequencer::Sequencer<Item>) -> Result<(), String> {
        let mut spare: Option<sequencer::Buf> = None;
        loop {
            // The buffer is taken before the item (see the sequencer's deadlock note).
            let mut buf = match spare.take() {
                Some(b) => b,
                None => match q.take_buffer() {
                    Some(b) => b,
                    None => return Ok(()),
                },
            };
            let Some(item) = self.next_item()? else {
                q.exhausted(buf);
                return Ok(());
            };
            let data = if has_data(&item) {
                self.fill(&item, &mut buf[..item.len as usize])?;
                Some(buf)
            } else {
                spare = Some(buf);
                None
            };
            q.submit(item.index, item, data, |it, b| {
                self.write_item(it, b.get(..it.len as usize).unwrap_or(&[]))
            })?;
        }
    }
}

fn has_data(item: &Item) -> bool {
    item.segments.iter().any(|s| s.kind == Kind::Data)
}

fn push_merged(v: &mut Vec<Segment>, s: Segment) {
    if let Some(last) = v.last_mut() {
        if last.kind == s.kind
            && last.src == s.src
            && last.dst_off + last.len == s.dst_off
            && last.src_off + last.len == s.src_off
        {
            last.len += s.len;
            return;
        }
    }
    v.push(s);
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    match run_inner(a) {
        Ok(()) => 0,
        Err(e) => {
            if !e.is_empty() {
                common::error(e);
            }
            1
        }
    }
}

fn parse_sparse(s: Option<&str>) -> Result<u64, String> {
    let Some(s) = s else {
        return Ok(4096);
    };
    match common::parse_size_arg(s) {
        Some(v) if v % 512 == 0 && v <= MAX_SPARSE => Ok(v),
        _ => Err(format!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates output)."
        )),
    }
}

/// `--bitmaps`: the source must store bitmaps, and (without `--skip-broken-bitmaps`)
/// none may be inconsistent. Bitmaps are looked at last first, as qemu-img does.
fn check_bitmaps(src: &Image, skip_broken: bool) -> Result<(), String> {
    if !src.supports_bitmaps() {
        return Err("Source lacks bitmap support".into());
    }
    if !skip_broken {
        if let Some(b) = src.bitmaps().iter().rev().find(|b| b.in_use) {
            common::error(format!("Cannot copy inconsistent bitmap '{}'", b.name));
            eprintln!("Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it");
            return Err(String::new());
        }
    }
    Ok(())
}

/// Adds every consistent bitmap of `src` to `dst` (same name, granularity, enabled
/// state) with the same bits.
fn copy_bitmaps(src: &Image, dst: &Image, skip_broken: bool) -> Result<(), String> {
    let all = src.bitmaps();
    // qemu-img warns about the inconsistent ones last first, and the target lists the
    // copies in the source's order.
    for b in all.iter().rev().filter(|b| b.in_use) {
        if !skip_broken {
            return Err(format!("Cannot copy inconsistent bitmap '{}'", b.name));
        }
        common::error(format!(
            "warning: Skipping inconsistent bitmap '{}'",
            b.name
        ));
    }
    for b in all.iter().filter(|b| !b.in_use) {
        dst.add_bitmap(&b.name, Some(b.granularity), b.enabled)
            .and_then(|_| dst.merge_bitmap(&b.name, src, &b.name))
            .map_err(|e| format!("Failed to populate bitmap {}: {e}", b.name))?;
    }
    Ok(())
}

fn run_inner(a: Args) -> Result<(), String> {
    let workers: usize = match a.parallel.as_deref() {
        None => 8,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=16).contains(&n) => n,
            _ => {
                return Err(
                    "Invalid number of coroutines specified. Must be between 1 and 16.".into(),
                )
            }
        },
    };
    let sparse = parse_sparse(a.sparse.as_deref())?;
    // qemu-img's order: these come before `-o help` and the file count.
    if a.no_create && !a.options.is_empty() {
        return Err("-o has no effect when skipping image creation".into());
    }
    if a.target_image_opts && !a.no_create {
        return Err("--target-image-opts requires use of -n flag".into());
    }
    if a.copy_range && a.compress {
        return Err("Cannot enable copy offloading when -c is used".into());
    }
    if crate::cmd::create::wants_help(&a.options) {
        let out_name = a.out_format.clone().unwrap_or_else(|| "raw".into());
        let out_fmt =
            Format::parse(&out_name).map_err(|_| format!("Unknown file format '{out_name}'"))?;
        let target = a.files.last().filter(|_| a.files.len() >= 2);
        return crate::cmd::create::print_help(out_fmt, target.map(String::as_str));
    }
    if a.files.len() < 2 {
        return Err("Must specify image file name".into());
    }
    let (src_names, target_name) = a.files.split_at(a.files.len() - 1);
    let target_name = &target_name[0];
    if a.backing.is_some() && src_names.len() > 1 {
        return Err(
            "Having a backing file for the target makes no sense when concatenating multiple input images"
                .into(),
        );
    }
    if a.backing.is_some() && a.backing_format.is_none() && !a.no_create {
        return Err("Use of backing file requires explicit backing format".into());
    }
    if a.target_is_zero && !a.no_create {
        return Err("--target-is-zero requires use of -n flag".into());
    }
    let out_name = a.out_format.clone().unwrap_or_else(|| "raw".into());
    let out_fmt =
        Format::parse(&out_name).map_err(|_| format!("Unknown file format '{out_name}'"))?;
    // With --target-image-opts the target's options name its format; `-O` would be a
    // second one (qemu-img refuses the pair when it opens the target).
    let target_format = if a.target_image_opts {
        None
    } else {
        Some(out_fmt)
    };
    if !a.no_create && !out_fmt.can_create() {
        return Err(out_fmt.no_create_error().to_string());
    }
    if a.compress && !a.target_image_opts && !out_fmt.caps().compression {
        return Err("Compression not supported for this file format".into());
    }
    let src_fmt = common::parse_format(a.format.as_deref())
        .map_err(|e| format!("Could not open '{}': {e}", src_names[0]))?;
    let src_cache = common::parse_cache(a.src_cache.as_deref(), CacheMode::Writeback)?;
    let dst_cache = common::parse_cache(a.cache.as_deref(), CacheMode::Unsafe)?;
    let opts = common::parse_options(&a.options)?;
    let backing_fmt = match &a.backing_format {
        Some(n) => Some(Format::parse(n).map_err(|_| format!("Unknown driver '{n}'"))?),
        None => None,
    };

    if a.bitmaps && src_names.len() > 1 {
        return Err("Copying bitmaps only possible with single source".into());
    }
    // Sources, concatenated.
    let mut sources = Vec::new();
    let mut total = 0u64;
    for name in src_names {
        let img = common::open_image_with(
            name,
            &OpenOptions {
                // qemu-img opens images without BDRV_O_UNMAP (only a convert target has it).
                discard: vdisk::policy::DiscardMode::Ignore,
                format: src_fmt,
                read_only: true,
                force_share: a.force_share,
                cache: src_cache,
                consistent_read: true,
                image_opts: a.image_opts,
                ..OpenOptions::default()
            },
        )?;
        if let Some(l) = a.snapshot.last() {
            crate::cmd::snapshot::load(&img, l)?;
        }
        let size = common::sector_size_of(&img);
        sources.push(Source {
            size,
            recurse: Mutex::new(vec![None; layers(&img).len()]),
            layers: layers(&img),
            img,
            base: total,
            name: name.clone(),
        });
        total = total
            .checked_add(size)
            .ok_or("the sources together are too large")?;
    }

    if a.bitmaps {
        check_bitmaps(&sources[0].img, a.skip_broken_bitmaps)?;
    }
    if !a.no_create {
        let typed = crate::cmd::create::check_options(out_fmt, &opts)?;
        let mut backing = a.backing.clone();
        let mut bfmt = backing_fmt;
        if let Some(v) = typed.str("backing_file") {
            backing = Some(v.to_string());
        }
        if let Some(v) = typed.str("backing_fmt") {
            bfmt = Some(Format::parse(v).map_err(|_| format!("Unknown driver '{v}'"))?);
        }
        if backing.is_some() && !out_fmt.caps().backing {
            return Err(format!(
                "Backing file not supported for file format '{out_fmt}'"
            ));
        }
        // The size is the sources'; the backing file goes by its own fields.
        let create_opts: Vec<(String, String)> = opts
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "backing_file" | "backing_fmt" | "size"))
            .cloned()
            .collect();
        Image::create(
            target_name,
            &CreateOptions {
                format: out_fmt,
                size: Some(total),
                options: create_opts,
                backing_file: backing,
                backing_format: bfmt,
                unsafe_backing: false,
            },
        )
        .map_err(|e| format!("{target_name}: error while converting {out_fmt}: {e}"))?;
    }

    if a.target_image_opts && a.out_format.is_some() {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    // An encrypted target is unlocked with the secret its creation named
    // (`encrypt.key-secret` / `key-secret`), or by its own --target-image-opts.
    let target_key = opts
        .iter()
        .rev()
        .find(|(k, _)| k == "encrypt.key-secret" || k == "key-secret")
        .map(|(_, v)| v.clone());
    let target = common::open_image_with(
        target_name,
        &OpenOptions {
            format: target_format,
            read_only: false,
            cache: dst_cache,
            image_opts: a.target_image_opts,
            driver: vdisk::format::DriverOptions {
                key_secret: target_key,
                ..Default::default()
            },
            ..OpenOptions::default()
        },
    )?;
    if a.compress && !target.format().caps().compression {
        return Err("Compression not supported for this file format".into());
    }
    if a.bitmaps && !target.supports_bitmaps() {
        return Err(format!(
            "Format driver '{out_fmt}' does not support bitmaps"
        ));
    }
    if a.no_create && target.size() < total {
        return Err("output file is smaller than input file".into());
    }
    let target_backing = target.backing().map(|b| b.size());
    let has_backing = target_backing.is_some() || a.backing.is_some();
    if a.target_is_zero && has_backing {
        return Err("--target-is-zero cannot be used with a target that has a backing file".into());
    }
    let zero_init = if a.no_create {
        a.target_is_zero
    } else {
        sparse != 0 && !has_backing
    };
    let cluster = target.cluster_size().unwrap_or(65536).max(512);
    if a.compress && !WINDOW.is_multiple_of(cluster) {
        return Err(format!(
            "cluster size {cluster} is too large for compression"
        ));
    }

    let progress = crate::progress::Progress::start(a.progress && !a.quiet, total);
    // Buffered I/O is a memory copy in the caller's thread (page-cache reads, and
    // writes that the host file system serialises per file): threads beyond the CPUs
    // only add lock hand-offs and context switches (measured: a 512 MiB raw→qcow2
    // convert on 2 CPUs took ~20% more CPU and more wall time with 8 threads than
    // with 2). Direct I/O waits for the device, so there each of the `-m` requests
    // gets its own thread to keep them in flight.
    // Network storage (NBD, HTTP) waits for its server the way direct I/O waits for
    // the device: it gets the `-m` threads too.
    let networked = |i: &Image| !matches!(i.protocol(), "file" | "host_device");
    let remote = networked(&target) || sources.iter().any(|s| networked(&s.img));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if src_cache.direct() || dst_cache.direct() || remote {
        workers
    } else {
        workers.min(cpus.max(2))
    };
    let job = Job {
        sources: &sources,
        target: &target,
        total,
        top_only: has_backing,
        target_backing_size: target_backing,
        zero_init,
        sparse,
        compress: a.compress,
        offload: a.copy_range
            && target.format().caps().raw_data
            && sources.iter().all(|s| s.img.format().caps().raw_data),
        cluster,
        // Targets that compress every write (stream-optimized VMDK: out-of-order grains
        // are part of the format) take their writes from every worker at once.
        sequencer: (!a.oob_writes && !a.compress && !target.compresses_writes())
            .then(|| sequencer::Sequencer::new(threads + 2, WINDOW as usize)),
        planner: Mutex::new(Planner {
            pos: 0,
            next_index: 0,
            last: None,
        }),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        done_bytes: AtomicU64::new(0),
        progress,
    };
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| job.worker());
        }
    });
    job.progress.finish();
    if let Some(e) = job.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    if a.bitmaps {
        // After the data, so the copy itself is not recorded in the new bitmaps.
        copy_bitmaps(&sources[0].img, &target, a.skip_broken_bitmaps)?;
    }
    target
        .close()
        .map_err(|e| format!("error while closing '{target_name}': {e}"))?;
    Ok(())
}
