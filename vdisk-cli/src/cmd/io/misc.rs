//! qemu-io's commands that do not move data: `abort` and `sigraise` (crash and signal
//! tests), the zoned-device commands (vdisk's images are never zoned, so each fails as
//! qemu-io fails on a regular image), and the breakpoint commands.

use super::commands::OpenFile;
use super::parse::{cvtnum, cvtnum_error, strerror};
use std::io::Write;

/// `abort`: ends the process at once with SIGABRT, nothing written back (a crash).
pub(super) fn abort_f(_s: &mut OpenFile, _args: &[String]) -> bool {
    let _ = std::io::stdout().flush();
    std::process::abort()
}

/// Linux's signal count (glibc's `NSIG`); qemu-io refuses numbers above it.
const NSIG: u64 = 65;

/// `sigraise SIGNAL`: raises the signal in this process.
pub(super) fn sigraise_f(_s: &mut OpenFile, args: &[String]) -> bool {
    let sig = match cvtnum(&args[1]) {
        Ok(v) => v,
        Err(e) => {
            out!("{}", cvtnum_error(e, &args[1]));
            return false;
        }
    };
    if sig > NSIG {
        out!(
            "signal argument '{}' is too large to be a valid signal",
            args[1]
        );
        return false;
    }
    // What the handler (or the default action) does may end the process: let what was
    // printed so far reach its reader first.
    let _ = std::io::stdout().flush();
    // SAFETY: raise(3) with a number below NSIG; an invalid one only fails with EINVAL.
    unsafe {
        libc::raise(sig as libc::c_int);
    }
    true
}

/// `zone_report`, `zone_open`, `zone_close`, `zone_finish`, `zone_reset`,
/// `zone_append`: the numbers are read as qemu-io reads them, then the request fails
/// with ENOTSUP, as on every device that is not zoned.
pub(super) fn zone_f(_s: &mut OpenFile, args: &[String]) -> bool {
    let what = match args[0].as_str() {
        "zap" => "append",
        "zc" => "close",
        "zf" => "finish",
        "zo" => "open",
        "zrp" => "report",
        "zrs" => "reset",
        name => name.trim_start_matches("zone_"),
    };
    let nums = args[1..].iter().filter(|a| a.as_str() != "-p");
    for a in nums {
        if let Err(e) = cvtnum(a) {
            out!("{}", cvtnum_error(e, a));
            return false;
        }
    }
    out!("zone {what} failed: {}", strerror(libc::ENOTSUP));
    false
}

/// `break EVENT TAG`: the next request reaching EVENT stops there (a blkdebug node
/// is needed, as in QEMU).
pub(super) fn break_f(s: &mut OpenFile, args: &[String]) -> bool {
    let r = match s.img.blkdebug() {
        Some(bd) => bd.add_breakpoint(&args[1], &args[2]),
        None => Err(libc::ENOTSUP),
    };
    if let Err(e) = r {
        out!("Could not set breakpoint: {}", strerror(e));
        return false;
    }
    true
}

/// `remove_break TAG`: resumes the requests stopped at TAG, drops TAG's breakpoints.
pub(super) fn remove_break_f(s: &mut OpenFile, args: &[String]) -> bool {
    let tag = &args[1];
    let r = match s.img.blkdebug() {
        Some(bd) => {
            s.aio.announce(&s.img);
            let held = bd.suspended().iter().filter(|(t, _)| t == tag).count();
            let r = bd.remove_breakpoint(tag);
            for _ in 0..held {
                out!("blkdebug: Resuming request '{tag}'");
            }
            r
        }
        None => Err(libc::ENOTSUP),
    };
    if let Err(e) = r {
        out!("Could not remove breakpoint {tag}: {}", strerror(e));
        return false;
    }
    true
}

/// `resume TAG`: lets the oldest request stopped at TAG go on.
pub(super) fn resume_f(s: &mut OpenFile, args: &[String]) -> bool {
    let tag = &args[1];
    let r = match s.img.blkdebug() {
        Some(bd) => {
            s.aio.announce(&s.img);
            bd.resume(tag)
        }
        None => Err(libc::ENOTSUP),
    };
    match r {
        Ok(()) => {
            out!("blkdebug: Resuming request '{tag}'");
            true
        }
        Err(e) => {
            out!("Could not resume request: {}", strerror(e));
            false
        }
    }
}

/// `wait_break TAG`: waits until a request stops at TAG. qemu-io waits forever (also
/// on an image without breakpoints); vdisk gives up after blkdebug's bound on a stop.
pub(super) fn wait_break_f(s: &mut OpenFile, args: &[String]) -> bool {
    let tag = &args[1];
    let img = s.img.clone();
    if img.blkdebug().is_some()
        && s.aio
            .wait_break(&img, tag, &mut super::commands::print_done)
    {
        return true;
    }
    let e = if img.blkdebug().is_some() {
        libc::ETIMEDOUT
    } else {
        libc::ENOTSUP
    };
    out!("Could not wait for breakpoint {tag}: {}", strerror(e));
    false
}
