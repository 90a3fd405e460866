//! qemu-io's `open`, `reopen` and `close`, and the open routine the command line's
//! image goes through too, so all report failures the same way.

use super::commands::{OpenFile, Session};
use super::parse::Getopt;
use vdisk::hook::{DetectZeroes, DetectZeroesMode};
use vdisk::image::OverlayError;
use vdisk::{AioMode, CacheMode, Format, Image, OpenOptions};

/// The option words `open` takes (its usage line).
pub const OPEN_ARGS: &str = "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]";

/// How to open an image besides the library's options.
#[derive(Clone)]
pub struct OpenExtra {
    /// `-o` keys other than `driver` and `detect-zeroes`, for the image's options tree
    /// (format options such as `l2-cache-size`; the format refuses those it lacks).
    pub keys: Vec<(String, String)>,
    /// `-s`: open through a temporary overlay; writes are dropped at close.
    pub snapshot: bool,
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
            snapshot: false,
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
    match open_image(path, opts, extra, s.progress) {
        Ok(f) => {
            s.file = Some(f);
            true
        }
        Err(e) => {
            crate::common::error(format!("can't open device {path}: {e}"));
            false
        }
    }
}

/// Opens an image as `open` and `reopen` do; `Err` is qemu's message.
fn open_image(
    path: &str,
    opts: &OpenOptions,
    extra: &OpenExtra,
    progress: bool,
) -> Result<OpenFile, String> {
    if opts.force_share && !opts.read_only {
        return Err("force-share=on can only be used with read-only images".into());
    }
    if opts.aio == AioMode::Native && !opts.cache.direct() {
        return Err(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
                .into(),
        );
    }
    // `-s`: the overlay keeps its name while open, so `reopen` finds the writes made to
    // it; `close` removes it.
    let temp = if extra.snapshot {
        let p = Image::create_temp_overlay(path.as_ref(), opts).map_err(|e| match e {
            OverlayError::Base(e) | OverlayError::Overlay(e) => e.to_string(),
            e => e.to_string(),
        })?;
        Some(TempFile(p))
    } else {
        None
    };
    let mut img = if let Some(t) = &temp {
        let o = OpenOptions {
            format: Some(Format::Qcow2),
            image_opts: false,
            ..opts.clone()
        };
        Image::open(&t.0, &o).map_err(|e| e.to_string())?
    } else if extra.keys.is_empty() {
        Image::open(path, opts).map_err(|e| e.to_string())?
    } else {
        open_with_keys(path, opts, &extra.keys).map_err(|e| e.to_string())?
    };
    // qemu checks the zero-detection option once the file is open, before the others.
    let detect = match &extra.detect_zeroes {
        Ok(DetectZeroesMode::Unmap) if !extra.discard_unmap => Err(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".to_string(),
        ),
        other => other.clone(),
    };
    let mode = match detect {
        Ok(mode) => mode,
        Err(e) => {
            let _ = img.close();
            return Err(e);
        }
    };
    if let Some(hook) = DetectZeroes::for_mode(mode, extra.discard_unmap) {
        img.add_hook(hook);
    }
    crate::common::warn_if_probed_raw(path, opts, &img);
    Ok(OpenFile {
        img: std::sync::Arc::new(img),
        aio: Default::default(),
        name: path.to_string(),
        progress,
        read_only: opts.read_only,
        detect_zeroes: mode != DetectZeroesMode::Off,
        opts: opts.clone(),
        extra: extra.clone(),
        temp,
    })
}

/// A temporary file removed when dropped (the overlay of `-s`).
pub struct TempFile(pub std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `reopen [(-r|-w)] [-c cache] [-o options]`: the image is closed (its caches written
/// back) and opened again with the changed options; when that fails, it is opened again
/// as it was, as qemu keeps the old state.
pub fn reopen_f(s: &mut Session, args: &[String]) -> bool {
    let mut read_only: Option<bool> = None;
    let mut cache: Option<CacheMode> = None;
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut g = Getopt::new(args, "c:o:rw");
    while let Some(o) = g.next_opt() {
        match o {
            Ok((c @ ('r' | 'w'), _)) => {
                if read_only.is_some() {
                    crate::common::error("Only one -r/-w option may be given");
                    return false;
                }
                read_only = Some(c == 'r');
            }
            Ok(('c', v)) => {
                let v = v.unwrap_or_default();
                match CacheMode::parse(&v) {
                    Some(c) => cache = Some(c),
                    None => {
                        crate::common::error(format!("Invalid cache option: {v}"));
                        return false;
                    }
                }
            }
            Ok(('o', v)) => {
                for kv in v.unwrap_or_default().split(',').filter(|w| !w.is_empty()) {
                    let (k, val) = kv.split_once('=').unwrap_or((kv, "on"));
                    keys.push((k.to_string(), val.to_string()));
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
    if g.optind != args.len() {
        super::commands::usage(&args[0]);
        return false;
    }
    let Some(f) = s.file.as_ref() else {
        eprintln!("no file open, try 'help open'");
        return false;
    };
    let mut opts = f.opts.clone();
    let mut extra = f.extra.clone();
    if let Some(r) = read_only {
        opts.read_only = r;
        // Sharing is what a read-only user offers; a writer takes its own permissions.
        if !r {
            opts.force_share = false;
        }
    }
    if let Some(c) = cache {
        opts.cache = c;
    }
    for (k, v) in &keys {
        if let Err(e) = change_option(f, &mut opts, &mut extra, k, v) {
            crate::common::error(e);
            return false;
        }
    }
    let Some(old) = s.file.take() else {
        return false;
    };
    let name = old.name.clone();
    let (old_opts, old_extra) = (old.opts.clone(), old.extra.clone());
    let mut old = old;
    release_and_drain(&mut old);
    let OpenFile { img, temp, .. } = old;
    if let Err(e) = img.close() {
        crate::common::error(format!("closing {name}: {e}"));
        return false;
    }
    drop(img);
    // With `-s`, the overlay (and the writes it holds) is what is reopened.
    let progress = s.progress;
    let reopen = |opts: &OpenOptions, extra: &OpenExtra| match &temp {
        Some(t) => {
            let o = OpenOptions {
                format: Some(Format::Qcow2),
                image_opts: false,
                ..opts.clone()
            };
            let e = OpenExtra {
                snapshot: false,
                ..extra.clone()
            };
            let p = t.0.to_string_lossy().into_owned();
            open_image(&p, &o, &e, progress).map(|f| OpenFile {
                name: name.clone(),
                opts: opts.clone(),
                extra: extra.clone(),
                ..f
            })
        }
        None => open_image(&name, opts, extra, progress),
    };
    let (result, ok) = match reopen(&opts, &extra) {
        Ok(f) => (Some(f), true),
        Err(e) => {
            crate::common::error(e);
            (reopen(&old_opts, &old_extra).ok(), false)
        }
    };
    if let Some(mut f) = result {
        f.temp = temp;
        s.file = Some(f);
    }
    ok
}

/// Applies one `reopen -o` key; `Err` is qemu's refusal.
fn change_option(
    f: &OpenFile,
    opts: &mut OpenOptions,
    extra: &mut OpenExtra,
    key: &str,
    value: &str,
) -> Result<(), String> {
    let cannot = || format!("Cannot change the option '{key}'");
    let flag = |v: &str| match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    };
    match key {
        "detect-zeroes" => {
            extra.detect_zeroes = DetectZeroesMode::parse(value).map_err(|e| e.to_string())
        }
        "discard" => {
            extra.discard_unmap = match value {
                "on" | "unmap" => true,
                "off" | "ignore" => false,
                _ => return Err(format!("Invalid discard option: {value}")),
            }
        }
        "cache.direct" => {
            let direct = flag(value)?;
            opts.cache = match (opts.cache, direct) {
                (CacheMode::Writeback, true) => CacheMode::None,
                (CacheMode::Writethrough, true) => CacheMode::Directsync,
                (CacheMode::None, false) => CacheMode::Writeback,
                (CacheMode::Directsync, false) => CacheMode::Writethrough,
                (c, d) if c.direct() == d => c,
                // O_DIRECT without flushes has no cache mode here.
                _ => return Err(cannot()),
            }
        }
        "cache.no-flush" => {
            let no_flush = flag(value)?;
            opts.cache = match (opts.cache, no_flush) {
                (CacheMode::Writeback, true) => CacheMode::Unsafe,
                (CacheMode::Unsafe, false) => CacheMode::Writeback,
                (CacheMode::Unsafe, true) => CacheMode::Unsafe,
                (c, false) => c,
                _ => return Err(cannot()),
            }
        }
        "l2-cache-size" | "refcount-cache-size" | "cache-size"
            if f.img.format() == Format::Qcow2 =>
        {
            extra.keys.retain(|(k, _)| k != key);
            extra.keys.push((key.to_string(), value.to_string()));
        }
        // The lazy-refcounts mode follows the image's header here; asking for the mode
        // the image already has changes nothing.
        "lazy-refcounts" if f.img.format() == Format::Qcow2 => {
            let want = flag(value)?;
            let have = matches!(
                f.img.format_specific(),
                vdisk::format::FormatSpecific::Qcow2 {
                    lazy_refcounts: true,
                    ..
                }
            );
            if want != have {
                return Err(cannot());
            }
        }
        _ => return Err(cannot()),
    }
    Ok(())
}

/// Opens `path` with `-o` keys added to its options tree, as qemu-io merges them into
/// the image's options.
fn open_with_keys(
    path: &str,
    opts: &OpenOptions,
    keys: &[(String, String)],
) -> vdisk::Result<Image> {
    let mut tree = if opts.image_opts {
        vdisk::storage::spec::parse_image_opts(path)?
    } else {
        vdisk::storage::spec::parse_filename(path)?
    };
    for (k, v) in keys {
        tree.insert_str(k, v.clone())?;
    }
    Image::open_tree(tree, path, opts)
}

/// `open [-rnkU] [-t cache] [-d discard] [-o options] [path]`.
pub fn open_f(s: &mut Session, args: &[String]) -> bool {
    let mut opts = OpenOptions {
        cache: CacheMode::Writeback,
        ..OpenOptions::default()
    };
    let mut driver: Option<String> = None;
    let mut extra = OpenExtra::default();
    let mut g = Getopt::new(args, "rsCnkUt:d:o:i:");
    while let Some(o) = g.next_opt() {
        match o {
            Ok(('r', _)) => opts.read_only = true,
            Ok(('s', _)) => extra.snapshot = true,
            Ok(('C', _)) => opts.copy_on_read = true,
            Ok(('n', _)) => opts.cache = CacheMode::None,
            Ok(('U', _)) => opts.force_share = true,
            Ok(('k', _)) => opts.aio = AioMode::Native,
            Ok(('i', v)) => match crate::common::parse_aio(v.as_deref(), false) {
                Ok(m) => opts.aio = m,
                Err(e) => {
                    crate::common::error(e);
                    return false;
                }
            },
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
                        extra.keys.push((k.to_string(), val.to_string()));
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

/// Lets requests held at breakpoints go (qemu-io would wait for them forever) and
/// reports every asynchronous request still running.
fn release_and_drain(f: &mut OpenFile) {
    if let Some(bd) = f.img.blkdebug() {
        bd.release_all();
    }
    f.drain_aio();
}

/// Closes an open image; prints the error when writing back fails.
pub fn close_file(mut f: OpenFile) -> bool {
    release_and_drain(&mut f);
    match f.img.close() {
        Ok(()) => true,
        Err(e) => {
            crate::common::error(format!("closing {}: {e}", f.name));
            false
        }
    }
}
