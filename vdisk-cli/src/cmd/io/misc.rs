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

/// `break EVENT TAG`: breakpoints need a blkdebug node, which this image is not.
pub(super) fn break_f(_s: &mut OpenFile, _args: &[String]) -> bool {
    out!("Could not set breakpoint: {}", strerror(libc::ENOTSUP));
    false
}

/// `remove_break TAG`.
pub(super) fn remove_break_f(_s: &mut OpenFile, args: &[String]) -> bool {
    out!(
        "Could not remove breakpoint {}: {}",
        args[1],
        strerror(libc::ENOTSUP)
    );
    false
}

/// `resume TAG`.
pub(super) fn resume_f(_s: &mut OpenFile, _args: &[String]) -> bool {
    out!("Could not resume request: {}", strerror(libc::ENOTSUP));
    false
}

/// `wait_break TAG`: qemu-io waits forever for a request that can never stop on an
/// image without breakpoints; vdisk says so instead of hanging.
pub(super) fn wait_break_f(_s: &mut OpenFile, args: &[String]) -> bool {
    out!(
        "Could not wait for breakpoint {}: {}",
        args[1],
        strerror(libc::ENOTSUP)
    );
    false
}
