//! `vdisk io`: qemu-io's command language on one image at a time (`open`/`close`).
//!
//! Commands come from repeated `-c` or, without any, one per line from stdin (with a
//! prompt only when stdin is a terminal). Unlike qemu-io, the exit status is 1 when
//! any command failed, including a `read -P` pattern mismatch, so scripts can rely on
//! it.

/// `println!` that ignores a closed stdout (`vdisk io ... | head`) instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod aio;
pub(crate) mod buffer;
mod commands;
mod help;
mod misc;
mod open;
pub(crate) mod parse;
mod report;

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vdisk::{CacheMode, OpenOptions};

/// Arguments of `vdisk io`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Open the image read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Share the image with other users (needs -r).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Host cache mode (none, writeback, writethrough, directsync, unsafe).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Bypass the host page cache (same as -t none).
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,
    /// Command to run (repeatable, run in order); without any, read stdin.
    #[arg(short = 'c', long = "cmd", allow_hyphen_values = true)]
    pub cmds: Vec<String>,
    /// Show a progress bar on long requests.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Native AIO (`-i native`: needs a direct cache mode, as in qemu-io).
    #[arg(short = 'k', long = "native-aio")]
    pub native_aio: bool,
    /// AIO mode of the image's files: threads, native or io_uring.
    #[arg(short = 'i', long = "aio")]
    pub aio: Option<String>,
    /// Discard mode (accepted for compatibility; discards always reach the format).
    #[arg(short = 'd', long = "discard")]
    pub discard: Option<String>,
    /// Misalign buffers (accepted for compatibility; buffers are plain heap memory).
    #[arg(short = 'm', long = "misalign")]
    pub misalign: bool,
    /// Treat the image name as a key=value option list (`driver=qcow2,file.filename=X`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Open the image through a temporary overlay: writes are dropped at exit.
    #[arg(short = 's', long = "snapshot")]
    pub snapshot: bool,
    /// Copy data read from backing files into the image.
    #[arg(short = 'C', long = "copy-on-read")]
    pub copy_on_read: bool,
    /// Trace options, as QEMU's `-T` (accepted; vdisk has no trace events).
    #[arg(short = 'T', long = "trace", value_name = "TRACE")]
    pub trace: Vec<String>,
    /// The image file (without it, start with none open: see the `open` command).
    pub filename: Option<String>,
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    let format = match crate::common::parse_format(a.format.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            crate::common::error(e);
            return 1;
        }
    };
    let cache = if a.nocache {
        CacheMode::None
    } else {
        match crate::common::parse_cache(a.cache.as_deref(), CacheMode::Writeback) {
            Ok(c) => c,
            Err(e) => {
                crate::common::error(e);
                return 1;
            }
        }
    };
    let aio = match crate::common::parse_aio(a.aio.as_deref(), a.native_aio) {
        Ok(m) => m,
        Err(e) => {
            crate::common::error(e);
            return 1;
        }
    };
    let opts = OpenOptions {
        format,
        aio,
        read_only: a.read_only,
        force_share: a.force_share,
        cache,
        image_opts: a.image_opts,
        copy_on_read: a.copy_on_read,
        ..OpenOptions::default()
    };
    let mut s = commands::Session {
        file: None,
        progress: a.progress,
        quit: false,
    };
    if let Some(name) = &a.filename {
        if !open::open_file(
            &mut s,
            name,
            &opts,
            &open::OpenExtra {
                snapshot: a.snapshot,
                ..open::OpenExtra::default()
            },
        ) {
            return 1;
        }
    }
    // SIGTERM, SIGINT and SIGHUP end the session as qemu-io's do: no more commands, the
    // image closed (its metadata written back), then death by that signal.
    let term = Arc::new(AtomicUsize::new(0));
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        if let Err(e) = signal_hook::flag::register_usize(sig, Arc::clone(&term), sig as usize) {
            crate::common::error(format!("installing a signal handler: {e}"));
            return 1;
        }
    }
    let mut failed = false;
    if !a.cmds.is_empty() {
        for c in &a.cmds {
            failed |= !commands::run_line(&mut s, c);
            if s.quit || term.load(Ordering::SeqCst) != 0 {
                break;
            }
        }
    } else {
        failed |= !command_loop(&mut s, &term);
    }
    commands::print_deferred();
    let _ = std::io::stdout().flush();
    if let Some(f) = s.file.take() {
        failed |= !open::close_file(f);
    }
    let sig = term.load(Ordering::SeqCst);
    if sig != 0 {
        let _ = std::io::stdout().flush();
        let _ = signal_hook::low_level::emulate_default_handler(sig as libc::c_int);
    }
    i32::from(failed)
}

/// Runs commands from stdin until EOF, `quit` or a terminating signal; returns false if
/// any failed. A thread reads the lines, so a signal ends the session even while the
/// user has not finished typing one.
fn command_loop(s: &mut commands::Session, term: &AtomicUsize) -> bool {
    let prompt = std::io::stdin().is_terminal();
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<String>>(1);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock();
        loop {
            let mut line = String::new();
            let r = lines.read_line(&mut line).map(|_| line);
            let end = !matches!(&r, Ok(l) if !l.is_empty());
            if tx.send(r).is_err() || end {
                return;
            }
        }
    });
    let mut ok = true;
    loop {
        if prompt {
            print!("qemu-io> ");
            let _ = std::io::stdout().flush();
        }
        let line = loop {
            if term.load(Ordering::SeqCst) != 0 {
                return ok;
            }
            match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(r) => break r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return ok,
            }
        };
        match line {
            Ok(l) if l.is_empty() => break,
            Ok(l) => {
                ok &= commands::run_line(s, &l);
            }
            Err(e) => {
                crate::common::error(format!("reading commands: {e}"));
                return false;
            }
        }
        if s.quit || term.load(Ordering::SeqCst) != 0 {
            break;
        }
    }
    ok
}
