//! qemu-io's `open` and `close`, and the open routine the command line's image goes
//! through too, so both report failures the same way.

use super::commands::{OpenFile, Session};
use super::parse::Getopt;
use vdisk::hook::{DetectZeroes, DetectZeroesMode};
use vdisk::{CacheMode, Format, Image, OpenOptions};

/// The option words `open` takes (its usage line). `-s` (snapshot) and `-C`
/// (copy-on-read) are not offered, as on vdisk io's command line.
pub const OPEN_ARGS: &str = "[-rnkU] [-t cache] [-d discard] [-o options] [path]";

/// `help open`'s extended text.
pub const OPEN_HELP: &str = "
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (needs -n or a direct cache mode)
 -i, -- use AIO mode (threads, native or io_uring; requests are synchronous here)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver (driver=FORMAT,
       detect-zeroes=off|on|unmap)";

/// How to open an image besides the library's options.
pub struct OpenExtra {
    /// `-o` keys other than `driver` and `detect-zeroes` (refused, as the formats take
    /// no options).
    pub keys: Vec<String>,
    /// `-k`: native AIO, which qemu allows only with a direct (uncached) mode.
    pub native_aio: bool,
    /// `-o detect-zeroes=`: the mode, or the value qemu would refuse.
    pub detect_zeroes: Result<DetectZeroesMode, String>,
    /// `-d`: whether discards (and zero detection's unmapping) may deallocate; qemu-io
    /// opens with `unmap` unless told otherwise.
    pub discard_unmap: bool,
}

impl Default for OpenExtra {
    fn default() -> Self {
        OpenExtra {
            keys: Vec::new(),
            native_aio: false,
            detect_zeroes: Ok(DetectZeroesMode::Off),
            discard_unmap: true,
        }
    }
}

/// Opens `path` as the session's image; prints qemu-io's messages on failure.
pub fn open_file(s: &mut Session, path: &str, opts: &OpenOptions, extra: &OpenExtra) -> bool {
    if s.file.is_some() {
        crate::common::error("file open already, try 'help close'");
        return false;
    }
    let fail = |e: &dyn std::fmt::Display| {
        crate::common::error(format!("can't open device {path}: {e}"));
        false
    };
    if opts.force_share && !opts.read_only {
        return fail(&"force-share=on can only be used with read-only images");
    }
    if extra.native_aio && !opts.cache.direct() {
        return fail(
            &"aio=native was specified, but it requires cache.direct=on, which was not specified.",
        );
    }
    let mut img = match Image::open(path, opts) {
        Ok(i) => i,
        Err(e) => return fail(&e),
    };
    // qemu checks the zero-detection option once the file is open, before the others.
    let detect = match &extra.detect_zeroes {
        Ok(DetectZeroesMode::Unmap) if !extra.discard_unmap => Err(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".to_string(),
        ),
        other => other.clone(),
    };
    let zero_detection;
    match detect {
        Ok(mode) => {
            zero_detection = mode != DetectZeroesMode::Off;
            if let Some(hook) = DetectZeroes::for_mode(mode, extra.discard_unmap) {
                img.add_hook(hook);
            }
        }
        Err(e) => {
            let _ = img.close();
            return fail(&e);
        }
    }
    if let Some(key) = extra.keys.first() {
        // Driver options are not taken; qemu names the first one its driver refuses.
        let name = img.format().name().to_string();
        let _ = img.close();
        return fail(&format!(
            "Block format '{name}' does not support the option '{key}'"
        ));
    }
    crate::common::warn_if_probed_raw(path, opts, &img);
    s.file = Some(OpenFile {
        img,
        name: path.to_string(),
        progress: s.progress,
        read_only: opts.read_only,
        detect_zeroes: zero_detection,
    });
    true
}

/// `open [-rnkU] [-t cache] [-d discard] [-o options] [path]`.
pub fn open_f(s: &mut Session, args: &[String]) -> bool {
    let mut opts = OpenOptions {
        cache: CacheMode::Writeback,
        ..OpenOptions::default()
    };
    let mut driver: Option<String> = None;
    let mut extra = OpenExtra::default();
    let mut g = Getopt::new(args, "rnkUt:d:o:i:");
    while let Some(o) = g.next_opt() {
        match o {
            Ok(('r', _)) => opts.read_only = true,
            Ok(('n', _)) => opts.cache = CacheMode::None,
            Ok(('U', _)) => opts.force_share = true,
            // Native AIO / the AIO engine: accepted like on the command line; requests
            // are synchronous here.
            Ok(('k', _)) => extra.native_aio = true,
            Ok(('i', _)) => {}
            Ok(('t', v)) => {
                let v = v.unwrap_or_default();
                match CacheMode::parse(&v) {
                    Some(c) => opts.cache = c,
                    None => {
                        crate::common::error(format!("Invalid cache option: {v}"));
                        return false;
                    }
                }
            }
            Ok(('d', v)) => {
                // Discards always reach the format; the mode decides whether zero
                // detection may unmap.
                let v = v.unwrap_or_default();
                match v.as_str() {
                    "on" | "unmap" => extra.discard_unmap = true,
                    "off" | "ignore" => extra.discard_unmap = false,
                    _ => {
                        crate::common::error(format!("Invalid discard option: {v}"));
                        return false;
                    }
                }
            }
            Ok(('o', v)) => {
                for kv in v.unwrap_or_default().split(',').filter(|w| !w.is_empty()) {
                    let (k, val) = kv.split_once('=').unwrap_or((kv, "on"));
                    if k == "driver" {
                        driver = Some(val.to_string());
                    } else if k == "detect-zeroes" {
                        // The last one given counts, as in qemu.
                        extra.detect_zeroes =
                            DetectZeroesMode::parse(val).map_err(|e| e.to_string());
                    } else {
                        extra.keys.push(k.to_string());
                    }
                }
            }
            Ok(_) => {}
            Err(msg) => {
                eprintln!("{msg}");
                super::commands::usage(&args[0]);
                return false;
            }
        }
    }
    let path = match &args[g.optind..] {
        [p] => p.clone(),
        [] => {
            if s.file.is_some() {
                crate::common::error("file open already, try 'help close'");
            } else if driver.is_none() {
                crate::common::error("can't open: Must specify either driver or file");
            } else {
                crate::common::error("can't open: A block device must be specified for \"file\"");
            }
            return false;
        }
        _ => {
            super::commands::usage(&args[0]);
            return false;
        }
    };
    if let Some(d) = &driver {
        match Format::parse(d) {
            Ok(f) => opts.format = Some(f),
            Err(e) => {
                if s.file.is_some() {
                    crate::common::error("file open already, try 'help close'");
                } else {
                    crate::common::error(format!("can't open device {path}: {e}"));
                }
                return false;
            }
        }
    }
    open_file(s, &path, &opts, &extra)
}

/// `close`: closes the image (writing back its caches); the session stays usable.
pub fn close_f(s: &mut Session, _args: &[String]) -> bool {
    match s.file.take() {
        Some(f) => close_file(f),
        None => {
            eprintln!("no file open, try 'help open'");
            false
        }
    }
}

/// Closes an open image; prints the error when writing back fails.
pub fn close_file(f: OpenFile) -> bool {
    match f.img.close() {
        Ok(()) => true,
        Err(e) => {
            crate::common::error(format!("closing {}: {e}", f.name));
            false
        }
    }
}
