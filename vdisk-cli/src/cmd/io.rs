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

pub(crate) mod buffer;
mod commands;
mod open;
pub(crate) mod parse;
mod report;

use std::io::{BufRead, IsTerminal, Write};
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
    /// Native AIO (accepted for compatibility; requests are synchronous here).
    #[arg(short = 'k', long = "native-aio")]
    pub native_aio: bool,
    /// AIO engine (accepted for compatibility, ignored).
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
    let opts = OpenOptions {
        format,
        read_only: a.read_only,
        force_share: a.force_share,
        cache,
        image_opts: a.image_opts,
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
                native_aio: a.native_aio,
                ..open::OpenExtra::default()
            },
        ) {
            return 1;
        }
    }
    let mut failed = false;
    if !a.cmds.is_empty() {
        for c in &a.cmds {
            failed |= !commands::run_line(&mut s, c);
            if s.quit {
                break;
            }
        }
    } else {
        failed |= !command_loop(&mut s);
    }
    let _ = std::io::stdout().flush();
    if let Some(f) = s.file.take() {
        failed |= !open::close_file(f);
    }
    i32::from(failed)
}

/// Runs commands from stdin until EOF or `quit`; returns false if any failed.
fn command_loop(s: &mut commands::Session) -> bool {
    let stdin = std::io::stdin();
    let prompt = stdin.is_terminal();
    let mut ok = true;
    let mut lines = stdin.lock();
    let mut line = String::new();
    loop {
        if prompt {
            print!("vdisk-io> ");
            let _ = std::io::stdout().flush();
        }
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                crate::common::error(format!("reading commands: {e}"));
                return false;
            }
        }
        ok &= commands::run_line(s, &line);
        if s.quit {
            break;
        }
    }
    ok
}
