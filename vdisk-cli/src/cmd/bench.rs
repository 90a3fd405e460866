//! `vdisk bench`: qemu-img bench's workload — COUNT requests of BUFFER_SIZE bytes,
//! DEPTH of them in flight at once, from OFFSET advancing by STEP and wrapping at the
//! end of the disk; optionally writes of a pattern byte with a flush every N requests.
//!
//! Depth is real concurrency: DEPTH worker threads share one [`Image`] and take the
//! next request from a shared counter, so a driver's locking is exercised the way a
//! guest with a deep queue would.

/// `println!` that ignores a closed stdout instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

use super::io::buffer::IoBuf;
use super::io::parse::{cvtnum, NumError};
use std::sync::{Condvar, Mutex};
use std::time::Instant;
use vdisk::{CacheMode, Image, OpenOptions};

/// Most worker threads one run starts: qemu's own thread pool stops at 64, and deeper
/// queues than this only add scheduling noise on a host, while each thread costs a
/// stack. Depth beyond it is served by this many requests in flight.
const MAX_WORKERS: u64 = 256;

/// Arguments of `vdisk bench` (qemu-img bench's options).
#[derive(clap::Args)]
pub struct Args {
    /// Number of requests (default 75000).
    #[arg(short = 'c', long = "count")]
    pub count: Option<String>,
    /// Requests in flight at once (default 64).
    #[arg(short = 'd', long = "depth")]
    pub depth: Option<String>,
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Issue a flush every N requests (write tests only).
    #[arg(long = "flush-interval")]
    pub flush_interval: Option<String>,
    /// Do not wait for in-flight requests before a flush.
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// AIO mode of the image's files: threads, native or io_uring.
    #[arg(short = 'i', long = "aio")]
    pub aio: Option<String>,
    /// Native AIO (`-i native`: needs a direct cache mode, as in qemu-img).
    #[arg(short = 'n', long = "native")]
    pub native: bool,
    /// Offset of the first request (default 0).
    #[arg(short = 'o', long = "offset")]
    pub offset: Option<String>,
    /// Byte written by write requests (default 0).
    #[arg(long = "pattern")]
    pub pattern: Option<String>,
    /// Quiet (qemu-img prints its lines anyway; so do we).
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Request size (default 4096).
    #[arg(short = 's', long = "buffer-size")]
    pub buffer_size: Option<String>,
    /// Distance between request offsets (default: the request size).
    #[arg(short = 'S', long = "step-size")]
    pub step: Option<String>,
    /// Host cache mode (default writeback).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    pub write: bool,
    /// Share the image with other users (read tests only).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Treat the image name as a key=value option list (`driver=qcow2,file.filename=X`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image file.
    pub filename: String,
}

/// Parses a numeric option with qemu's suffixes and range message.
fn num_opt(what: &str, v: Option<&str>, default: u64, min: u64, max: u64) -> Result<u64, String> {
    let Some(s) = v else {
        return Ok(default);
    };
    match cvtnum(s) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) | Err(NumError::Range) | Err(NumError::Invalid) => Err(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        )),
    }
}

/// The validated workload.
#[derive(Clone, Copy, Debug)]
struct Plan {
    count: u64,
    depth: u64,
    bufsize: u64,
    step: u64,
    offset: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
}

fn plan(a: &Args) -> Result<Plan, String> {
    const INT_MAX: u64 = i32::MAX as u64;
    let count = num_opt("request count", a.count.as_deref(), 75000, 1, INT_MAX)?;
    let depth = num_opt("queue depth", a.depth.as_deref(), 64, 1, INT_MAX)?;
    let bufsize = num_opt("buffer size", a.buffer_size.as_deref(), 4096, 1, INT_MAX)?;
    let step = num_opt("step size", a.step.as_deref(), 0, 0, INT_MAX)?;
    let offset = num_opt("offset", a.offset.as_deref(), 0, 0, i64::MAX as u64)?;
    let pattern = num_opt("pattern byte", a.pattern.as_deref(), 0, 0, 0xff)? as u8;
    let flush_interval = num_opt("flush interval", a.flush_interval.as_deref(), 0, 0, INT_MAX)?;
    if flush_interval > 0 && !a.write {
        return Err("--flush-interval is only available in write tests".into());
    }
    if flush_interval > 0 && flush_interval < depth {
        return Err("Flush interval can't be smaller than depth".into());
    }
    Ok(Plan {
        count,
        depth,
        bufsize,
        step: if step == 0 { bufsize } else { step },
        offset,
        write: a.write,
        pattern,
        flush_interval,
        drain: !a.no_drain,
    })
}

/// Shared progress of a run, mirroring qemu-img's bench state machine: `n` requests
/// not yet completed, `in_flight` of them submitted.
struct State {
    n: u64,
    in_flight: u64,
    offset: u64,
    /// A draining flush is waiting for, or running after, the queue to empty.
    flush_blocked: bool,
    error: Option<String>,
    flushes: u64,
}

struct Runner<'a> {
    img: &'a Image,
    plan: Plan,
    size: u64,
    state: Mutex<State>,
    cond: Condvar,
}

impl Runner<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A worker never panics while holding the lock; recover the data if one did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One request, with qemu's range check (EIO past the end) ahead of the driver's.
    fn request(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        let len = buf.len() as u64;
        if offset > self.size || self.size - offset < len {
            return Err(super::io::parse::strerror(libc::EIO));
        }
        let r = if self.plan.write {
            self.img.write_at(buf, offset)
        } else {
            self.img.read_at(buf, offset)
        };
        r.map_err(|e| format!("{} ({e})", super::io::parse::strerror(e.errno())))
    }

    fn flush(&self) -> Result<(), String> {
        self.img
            .flush()
            .map_err(|e| format!("{} ({e})", super::io::parse::strerror(e.errno())))
    }

    fn worker(&self) {
        let mut buf = match IoBuf::filled(self.plan.bufsize, self.plan.pattern) {
            Ok(b) => b,
            Err(e) => {
                let mut st = self.lock();
                st.error
                    .get_or_insert(format!("cannot allocate a request buffer: {e}"));
                self.cond.notify_all();
                return;
            }
        };
        let mut st = self.lock();
        loop {
            if st.error.is_some() || st.n == st.in_flight {
                // Failed, or nothing left to submit: in-flight requests finish elsewhere.
                return;
            }
            if st.flush_blocked {
                st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let offset = st.offset;
            st.in_flight += 1;
            st.offset = match offset.checked_add(self.plan.step) {
                Some(o) if self.size > 0 => o % self.size,
                _ => 0,
            };
            drop(st);
            let r = self.request(&mut buf, offset);
            st = self.lock();
            if let Err(e) = r {
                st.error.get_or_insert(format!("Failed request: {e}"));
                self.cond.notify_all();
                return;
            }
            let remaining = st.n - st.in_flight;
            st.n -= 1;
            st.in_flight -= 1;
            let fi = self.plan.flush_interval;
            if fi > 0 && remaining.is_multiple_of(fi) {
                if self.plan.drain {
                    // Stop submitting; whoever empties the queue flushes, then resumes.
                    st.flush_blocked = true;
                    if st.in_flight > 0 {
                        continue;
                    }
                }
                st.flushes += 1;
                drop(st);
                let r = self.flush();
                st = self.lock();
                if let Err(e) = r {
                    st.error.get_or_insert(format!("Failed flush request: {e}"));
                }
                st.flush_blocked = false;
                self.cond.notify_all();
            }
        }
    }
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    // qemu-img refuses an unknown mode while it reads its options, before anything else.
    let aio = match crate::common::parse_aio(a.aio.as_deref(), a.native) {
        Ok(m) => m,
        Err(e) => {
            crate::common::error(e);
            return 1;
        }
    };
    let plan = match plan(&a) {
        Ok(p) => p,
        Err(e) => {
            crate::common::error(e);
            return 1;
        }
    };
    let format = match crate::common::parse_format(a.format.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            crate::common::error(e);
            return 1;
        }
    };
    let cache = match crate::common::parse_cache(a.cache.as_deref(), CacheMode::Writeback) {
        Ok(c) => c,
        Err(_) => {
            crate::common::error("Invalid cache mode");
            return 1;
        }
    };
    let opts = OpenOptions {
        // qemu-img opens images without BDRV_O_UNMAP (only a convert target has it).
        discard: vdisk::policy::DiscardMode::Ignore,
        format,
        read_only: !plan.write,
        force_share: a.force_share,
        cache,
        aio,
        image_opts: a.image_opts,
        ..OpenOptions::default()
    };
    let img = match Image::open(&a.filename, &opts) {
        Ok(i) => i,
        Err(e) => {
            crate::common::error(format!("Could not open '{}': {e}", a.filename));
            return 1;
        }
    };
    crate::common::warn_if_probed_raw(&a.filename, &opts, &img);
    out!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        plan.count,
        if plan.write { "write" } else { "read" },
        plan.bufsize,
        plan.depth,
        plan.offset,
        plan.step
    );
    if plan.flush_interval > 0 {
        out!("Sending flush every {} requests", plan.flush_interval);
    }
    let runner = Runner {
        img: &img,
        plan,
        size: img.size(),
        state: Mutex::new(State {
            n: plan.count,
            in_flight: 0,
            offset: plan.offset,
            flush_blocked: false,
            error: None,
            flushes: 0,
        }),
        cond: Condvar::new(),
    };
    let workers = plan.depth.min(plan.count).min(MAX_WORKERS);
    let t0 = Instant::now();
    let spawned = std::thread::scope(|sc| {
        for i in 0..workers {
            let r = &runner;
            let b = std::thread::Builder::new().name(format!("bench-{i}"));
            if let Err(e) = b.spawn_scoped(sc, move || r.worker()) {
                // Fewer threads than asked still completes the run, at a lower depth.
                if i == 0 {
                    return Err(e);
                }
                break;
            }
        }
        Ok(())
    });
    let elapsed = t0.elapsed();
    if let Err(e) = spawned {
        crate::common::error(format!("cannot start worker threads: {e}"));
        return 1;
    }
    let st = runner.lock();
    if let Some(e) = &st.error {
        crate::common::error(e);
        return 1;
    }
    tracing::debug!("bench: {} flushes", st.flushes);
    drop(st);
    out!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    if let Err(e) = img.close() {
        crate::common::error(format!("closing {}: {e}", a.filename));
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: Args,
        }
        let m = <T as clap::CommandFactory>::command()
            .try_get_matches_from(std::iter::once("bench").chain(v.iter().copied()))
            .unwrap();
        T::from_arg_matches(&m).unwrap().a
    }

    #[test]
    fn defaults_and_validation() {
        let p = plan(&args(&["x"])).unwrap();
        assert_eq!(
            (p.count, p.depth, p.bufsize, p.step),
            (75000, 64, 4096, 4096)
        );
        let p = plan(&args(&["-s", "64k", "-S", "0", "x"])).unwrap();
        assert_eq!(p.step, 65536);
        assert!(plan(&args(&["--flush-interval=10", "x"])).is_err());
        assert!(plan(&args(&["-w", "--flush-interval=10", "x"])).is_err());
        assert!(plan(&args(&["-w", "--flush-interval=64", "x"])).is_ok());
        assert_eq!(
            plan(&args(&["--pattern=256", "x"])).unwrap_err(),
            "Invalid pattern byte specified. Must be between 0 and 255."
        );
        assert!(plan(&args(&["-c", "0", "x"])).is_err());
    }
}
