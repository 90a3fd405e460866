//! Backing chains: opening the files an image names, and status through the chain.

use crate::error::{Error, Result};
use crate::format::{self, BackingSpec, Driver, DriverOptions, ExtentKind, Format};
use crate::storage::{CacheMode, FileStorage, LockMode, OpenFileOptions, Storage};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest chain we open; far beyond real use, it bounds descriptors and recursion.
pub const MAX_CHAIN_DEPTH: usize = 1000;

/// How files of a chain are opened.
#[derive(Clone, Debug)]
pub struct ChainOptions {
    /// Host cache mode for every file of the chain.
    pub cache: CacheMode,
    /// Share everything (`-U`).
    pub force_share: bool,
    /// Take QEMU-compatible locks.
    pub locking: bool,
    /// Options for the format drivers of backing files (always read-only).
    pub driver: DriverOptions,
}

/// Resolves a backing file name against the directory of the image naming it, as QEMU
/// does (absolute names are kept; relative ones are joined, not canonicalised).
pub fn resolve_backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// Reads the first bytes of a storage and guesses its format (the format registry's
/// probes, QEMU's scoring).
pub fn probe_storage(storage: &dyn Storage) -> Result<Format> {
    format::registry::probe_storage(storage, None)
}

/// Like [`probe_storage`], with the file's name for the probes that look at it (dmg).
pub fn probe_file(storage: &dyn Storage, path: &Path) -> Result<Format> {
    format::registry::probe_storage(storage, path.to_str())
}

/// Opens one file with the options of a chain.
pub fn open_file(path: &Path, read_only: bool, opts: &ChainOptions) -> Result<Arc<dyn Storage>> {
    let lock = if opts.locking {
        LockMode::for_open(read_only, opts.force_share)
    } else {
        LockMode::Off
    };
    let fo = OpenFileOptions {
        read_only,
        cache: opts.cache,
        lock,
        create: false,
    };
    Ok(Arc::new(FileStorage::open(path, &fo)?))
}

/// Opens the backing file `spec` named by the image at `image_path`, with its own chain.
/// `seen` holds the canonical paths of the images above, to detect loops.
pub fn open_backing(
    image_path: &Path,
    spec: &BackingSpec,
    opts: &ChainOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Arc<dyn Driver>> {
    if spec.name.contains("://") || spec.name.starts_with("json:") {
        return Err(Error::unsupported(format!(
            "backing file '{}': protocol and json: backing names are not supported; use a file name",
            spec.name
        )));
    }
    let path = resolve_backing_path(image_path, &spec.name);
    if seen.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::invalid(format!(
            "backing chain deeper than {MAX_CHAIN_DEPTH} images at '{}'",
            path.display()
        )));
    }
    let canon = std::fs::canonicalize(&path).map_err(|e| {
        crate::storage::StorageError::io(
            // qemu's wording: "Could not open backing file: Could not open 'x': <errno>".
            format!(
                "Could not open backing file: Could not open '{}'",
                path.display()
            ),
            e,
        )
    })?;
    if seen.contains(&canon) {
        let names: Vec<String> = seen.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::BackingLoop(format!(
            "'{}' is its own backing file (chain: {} -> {})",
            path.display(),
            names.join(" -> "),
            canon.display()
        )));
    }
    let storage = open_file(&path, true, opts)
        .map_err(|e| Error::invalid(format!("Could not open backing file: {e}")))?;
    let fmt = match spec.format {
        Some(f) => f,
        None => probe_file(&*storage, &path)?,
    };
    seen.push(canon);
    let mut dopts = opts.driver.clone();
    dopts.read_only = true;
    let r = format::open(fmt, storage, &dopts, &mut |s: &BackingSpec| {
        open_backing(&path, s, opts, seen)
    });
    seen.pop();
    r.map_err(|e| match e {
        Error::BackingLoop(_) => e,
        other => Error::invalid(format!(
            "Could not open backing image '{}': {other}",
            path.display()
        )),
    })
}

/// Status of a guest range through the whole chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainExtent {
    /// Bytes covered (> 0).
    pub len: u64,
    /// Data, zero, or unallocated in every layer (reads as zeroes).
    pub kind: ExtentKind,
    /// Layer that decided: 0 = the top image. For unallocated, the last layer examined.
    pub depth: u32,
    /// Host offset in that layer's file, when contiguous.
    pub offset: Option<u64>,
    /// Stored compressed.
    pub compressed: bool,
}

/// Status of `[offset, offset+len)` starting at `offset`, walking down the chain.
pub fn block_status(top: &Arc<dyn Driver>, offset: u64, len: u64) -> Result<ChainExtent> {
    let mut layer: &Arc<dyn Driver> = top;
    let mut len = len;
    let mut depth = 0u32;
    loop {
        let e = layer.block_status(offset, len)?;
        len = e.len;
        if e.kind != ExtentKind::Unallocated {
            return Ok(ChainExtent {
                len,
                kind: e.kind,
                depth,
                offset: e.offset,
                compressed: e.compressed,
            });
        }
        match layer.backing() {
            Some(b) if offset < b.size() => {
                len = len.min(b.size() - offset);
                layer = b;
                depth += 1;
            }
            Some(b) => {
                // Past the end of a shorter backing file: reads as zeroes.
                let _ = b;
                return Ok(ChainExtent {
                    len,
                    kind: ExtentKind::Unallocated,
                    depth: depth + 1,
                    offset: None,
                    compressed: false,
                });
            }
            None => {
                return Ok(ChainExtent {
                    len,
                    kind: ExtentKind::Unallocated,
                    depth,
                    offset: None,
                    compressed: false,
                });
            }
        }
    }
}
