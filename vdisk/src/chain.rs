//! Backing chains: opening the files an image names, and status through the chain.

use crate::error::{Error, Result};
use crate::format::{self, BackingSpec, Driver, DriverOptions, Format};
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

/// Reads the first bytes of a storage and guesses its format.
pub fn probe_storage(storage: &dyn Storage) -> Result<Format> {
    let mut head = [0u8; 512];
    storage.read_at(&mut head, 0)?;
    Ok(Format::probe(&head))
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
        None => probe_storage(&*storage)?,
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

pub use crate::format::datapath::ChainExtent;

/// Status of `[offset, offset+len)` starting at `offset`, walking down the chain (the
/// walk lives in the format layer, which uses it for zero detection too).
pub fn block_status(top: &Arc<dyn Driver>, offset: u64, len: u64) -> Result<ChainExtent> {
    format::datapath::chain_status(&**top, offset, len)
}
