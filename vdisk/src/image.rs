//! The public image API: open (by name, URL, `json:` or option tree) or create an
//! image with its backing chain.
//!
//! [`Image`] is the only door front-ends have to an image: every guest write, zero
//! write, discard, compressed write and resize, every metadata change (backing file;
//! snapshots and amend later) and every read goes through its methods, so the write
//! hooks registered on it ([`crate::hook`]) see them all. The format driver stays
//! private to this crate; what front-ends need to know about the layers below is
//! offered as [`ImageLayer`] views, which cannot write.

use crate::chain::{self, ChainExtent, ChainOptions, NodeOpen};
use crate::error::{BackingContext, Error, Invalid, Result, Unsupported};
use crate::format::{
    self, BackingSpec, CheckReport, CreateSpec, Driver, DriverOptions, Extent, Format,
    FormatSpecific, Repair, SnapshotInfo, ZeroFlags,
};
use crate::hook::{Payload, Request, WriteHook};
use crate::layer::ImageLayer;
use crate::storage::options::{Node, SpecError, Value};
use crate::storage::{spec, CacheMode, FileStorage, LockMode, OpenFileOptions, Perm, Storage};
use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Format; probed from the file when `None`.
    pub format: Option<Format>,
    /// Open without write access.
    pub read_only: bool,
    /// Host cache mode (for the image and its backing files).
    pub cache: CacheMode,
    /// Do not open backing files (unallocated ranges read as zeroes).
    pub no_backing: bool,
    /// Share every permission with other processes (`-U`); read-only only.
    pub force_share: bool,
    /// Take QEMU-compatible image locks (default on).
    pub locking: bool,
    /// A read-only opener that needs the data not to change under it (`convert`).
    /// Otherwise, like QEMU, a read-only raw image shares write permission (qemu-io -r,
    /// map, compare work beside a writer); formats with metadata always refuse writers.
    pub consistent_read: bool,
    /// Format options (cache sizes...).
    pub driver: DriverOptions,
    /// The name is a key=value option list (`driver=qcow2,file.filename=a.qcow2`),
    /// as qemu-img's `--image-opts`; it cannot be combined with `format`.
    pub image_opts: bool,
    /// Write hooks, in the order they see requests (see [`crate::hook`]).
    pub hooks: Vec<Arc<dyn WriteHook>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            read_only: false,
            cache: CacheMode::Writeback,
            no_backing: false,
            force_share: false,
            locking: true,
            consistent_read: false,
            driver: DriverOptions::default(),
            image_opts: false,
            hooks: Vec::new(),
        }
    }
}

/// How to create an image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Format to create.
    pub format: Format,
    /// Guest size; defaults to the backing file's size.
    pub size: Option<u64>,
    /// Format options (`-o key=value`), uninterpreted.
    pub options: Vec<(String, String)>,
    /// Backing file name to record (relative to the new image's directory).
    pub backing_file: Option<String>,
    /// Backing format to record; probed when `None` and the backing file is opened.
    pub backing_format: Option<Format>,
    /// Do not open the backing file (`-u`): the size must then be given.
    pub unsafe_backing: bool,
}

/// An open image with its backing chain. `Send + Sync`; every I/O method takes `&self`.
#[derive(Debug)]
pub struct Image {
    driver: Arc<dyn Driver>,
    path: PathBuf,
    closed: AtomicBool,
    /// Fixed once the image is shared (`add_hook` takes `&mut self`): the hot path
    /// reads it without a lock and skips the hook machinery when it is empty.
    hooks: Vec<Arc<dyn WriteHook>>,
}

impl Image {
    /// Opens the image named `path`: a file name, `file:NAME`, a protocol URL or a
    /// `json:{…}` pseudo-filename, or (with [`OpenOptions::image_opts`]) a key=value
    /// option list; see [`crate::storage::spec`].
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let name = path.to_str().ok_or_else(|| {
            Error::from(Invalid::NotUtf8Name {
                backing: false,
                name: path.display().to_string(),
            })
        })?;
        let tree = if opts.image_opts {
            if opts.format.is_some() {
                return Err(Invalid::ImageOptsWithFormat.into());
            }
            spec::parse_image_opts(name)?
        } else {
            spec::parse_filename(name)?
        };
        Image::open_tree(tree, name, opts)
    }

    /// Opens the image an options tree describes (`name` is what it was parsed from,
    /// shown when the tree names no host file).
    pub fn open_tree(tree: Node, name: &str, opts: &OpenOptions) -> Result<Image> {
        if opts.force_share && !opts.read_only {
            return Err(Invalid::ForceShareReadWrite.into());
        }
        let copts = ChainOptions {
            cache: opts.cache,
            force_share: opts.force_share,
            locking: opts.locking,
            driver: opts.driver.clone(),
        };
        let (read_only, force_share, consistent) =
            (opts.read_only, opts.force_share, opts.consistent_read);
        // What a reader shares depends on the format, so locks are taken once it is known.
        let lock = move |fmt: Format| {
            if fmt.caps().raw_data && read_only && !consistent {
                LockMode::On {
                    perm: Perm::CONSISTENT_READ,
                    shared: Perm::ALL,
                }
            } else {
                LockMode::for_open(read_only, force_share)
            }
        };
        let mut node = chain::open_node(
            tree,
            NodeOpen {
                read_only,
                chain: &copts,
                format: opts.format,
                lock: &lock,
                check_path: &mut |_| Ok(()),
            },
        )?;
        node.driver.no_backing |= opts.no_backing;
        let path = node
            .local_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(name));
        let mut seen = vec![node.canonical.clone().unwrap_or_else(|| path.clone())];
        let no_backing = node.driver.no_backing;
        let choice = node.backing.clone();
        let driver = chain::open_format(node, &mut |spec: &BackingSpec| {
            if no_backing {
                return Err(Invalid::BackingDisabled.into());
            }
            chain::open_backing_with(&path, spec, &choice, &copts, &mut seen)
        })?;
        Ok(Image {
            driver,
            path,
            closed: AtomicBool::new(false),
            hooks: opts.hooks.clone(),
        })
    }

    /// Wraps an already-open driver (e.g. on a [`crate::storage::MemStorage`] in tests).
    pub fn from_driver(driver: Arc<dyn Driver>, path: impl Into<PathBuf>) -> Image {
        Image {
            driver,
            path: path.into(),
            closed: AtomicBool::new(false),
            hooks: Vec::new(),
        }
    }

    /// Opens an image of `format` on any storage, without a backing file.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        format: Format,
        opts: &DriverOptions,
    ) -> Result<Image> {
        let mut o = opts.clone();
        o.no_backing = true;
        let driver = format::open(format, storage, &o, &mut |_s: &BackingSpec| {
            Err(Invalid::BackingDisabled.into())
        })?;
        Ok(Image::from_driver(driver, "<storage>"))
    }

    /// Creates an image file at `path` (truncating an existing file).
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        let target = create_target(path.as_ref())?;
        let path = target.as_path();
        let mut backing = None;
        let mut size = opts.size;
        if let Some(name) = &opts.backing_file {
            let mut fmt = opts.backing_format;
            if !opts.unsafe_backing {
                let bpath = chain::resolve_backing_path(path, name);
                let bimg = Image::open(
                    &bpath,
                    &OpenOptions {
                        format: fmt,
                        read_only: true,
                        force_share: true,
                        ..OpenOptions::default()
                    },
                )
                .map_err(|e| {
                    Error::backing(BackingContext::OpenFile(bpath.display().to_string()), e)
                })?;
                fmt = Some(bimg.format());
                // qemu-img takes the backing size rounded up to whole sectors.
                size = size.or(Some(bimg.size().div_ceil(512) * 512));
            } else if size.is_none() {
                return Err(Invalid::NeedsSize.into());
            }
            backing = Some(BackingSpec {
                name: name.clone(),
                format: fmt,
            });
        }
        let size = size.ok_or(Invalid::NeedsSize)?;
        let fo = OpenFileOptions {
            read_only: false,
            cache: CacheMode::Writeback,
            lock: LockMode::for_open(false, false),
            create: true,
        };
        let existed = path.exists();
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, &fo)?);
        let r = format::create(
            opts.format,
            &storage,
            &CreateSpec {
                size,
                backing,
                options: opts.options.clone(),
            },
        );
        if r.is_err() && !existed {
            // Bad options are found while formatting: leave no half-made file behind.
            drop(storage);
            let _ = std::fs::remove_file(path);
        }
        r
    }

    /// Registers a write hook after the ones already registered (before the image is
    /// shared: the hook list is fixed while I/O runs).
    pub fn add_hook(&mut self, hook: Arc<dyn WriteHook>) {
        self.hooks.push(hook);
    }
    /// The path the image was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The image's format.
    pub fn format(&self) -> Format {
        self.driver.format()
    }
    /// Guest size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    // ---- Guest data: every request passes the write hooks ----

    /// Reads guest bytes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.hooks.is_empty() {
            return self.driver.read_at(buf, offset);
        }
        self.driver.read_at(buf, offset)?;
        self.after_read(&mut [IoSliceMut::new(buf)], offset)
    }
    /// Writes guest bytes.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.hooks.is_empty() {
            return self.driver.write_at(buf, offset);
        }
        self.hooked(Request::Write {
            offset,
            data: Payload::borrowed(buf),
        })
    }
    /// Reads consecutive guest bytes into several buffers, as one request.
    pub fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        if self.hooks.is_empty() {
            return self.driver.read_vectored(bufs, offset);
        }
        self.driver.read_vectored(bufs, offset)?;
        self.after_read(bufs, offset)
    }
    /// Writes consecutive guest bytes from several buffers, as one request (gathered
    /// into one buffer only when hooks are registered).
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        if self.hooks.is_empty() {
            return self.driver.write_vectored(bufs, offset);
        }
        self.hooked(Request::Write {
            offset,
            data: Payload::gather(bufs),
        })
    }
    /// Makes a range read as zeroes (`may_unmap`: it may be deallocated).
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.hooks.is_empty() {
            return self.driver.write_zeroes(offset, len, flags);
        }
        self.hooked(Request::Zeroes { offset, len, flags })
    }
    /// Discards a range.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.hooks.is_empty() {
            return self.driver.discard(offset, len);
        }
        self.hooked(Request::Discard { offset, len })
    }
    /// Writes one cluster-aligned block compressed (a short block only at the end of
    /// the disk); formats without compression refuse.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.hooks.is_empty() {
            return self.driver.write_compressed(buf, offset);
        }
        self.hooked(Request::Compressed {
            offset,
            data: Payload::borrowed(buf),
        })
    }
    /// Changes the guest size; shrinking needs `shrink`.
    pub fn resize(&self, new_size: u64, shrink: bool) -> Result<()> {
        let req = Request::Resize {
            old_size: self.size(),
            new_size,
            shrink,
        };
        if self.hooks.is_empty() {
            return self.submit(&req);
        }
        self.hooked(req)
    }
    /// Makes completed writes durable (the hooks write back their state first).
    pub fn flush(&self) -> Result<()> {
        self.hooks.iter().try_for_each(|h| h.flush())?;
        self.driver.flush()
    }

    /// Shows the bytes a read filled, consecutive from `offset`, to the hooks (last
    /// registered first).
    fn after_read(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        for h in self.hooks.iter().rev() {
            let mut off = offset;
            for b in bufs.iter_mut() {
                h.after_read(b, off)?;
                off += b.len() as u64;
            }
        }
        Ok(())
    }

    /// Runs `req` through the hooks' `before`, the driver, and the hooks' `after`.
    fn hooked(&self, mut req: Request<'_>) -> Result<()> {
        for h in &self.hooks {
            h.before(&mut req)?;
        }
        let r = self.submit(&req);
        let change = req.change();
        for h in &self.hooks {
            h.after(&change, r.is_ok());
        }
        r
    }

    /// Hands a request, in its final form, to the driver.
    fn submit(&self, req: &Request<'_>) -> Result<()> {
        match req {
            Request::Write { offset, data } => self.driver.write_at(data.bytes(), *offset),
            Request::Zeroes { offset, len, flags } => {
                self.driver.write_zeroes(*offset, *len, *flags)
            }
            Request::Discard { offset, len } => self.driver.discard(*offset, *len),
            Request::Compressed { offset, data } => {
                self.driver.write_compressed(data.bytes(), *offset)
            }
            Request::Resize {
                new_size, shrink, ..
            } => self.driver.resize(*new_size, *shrink),
        }
    }

    /// Reserves host space for `[offset, offset+len)` without changing what it reads
    /// (`resize --preallocation=falloc`). Raw images only, where guest and file offsets
    /// are the same; other formats refuse.
    pub fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        if !self.format().caps().raw_data {
            return Err(Unsupported::NoPreallocation(self.format().name()).into());
        }
        Ok(self.driver.storage().allocate(offset, len)?)
    }

    // ---- Metadata ----

    /// Allocation unit, if the format has one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.driver.cluster_size()
    }
    /// Format-specific information (`info`'s `format-specific`).
    pub fn format_specific(&self) -> FormatSpecific {
        self.driver.format_specific()
    }
    /// Internal snapshots, in table order.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.driver.snapshots()
    }
    /// Whether the image is marked dirty (qcow2 dirty bit, QED NEED_CHECK).
    pub fn is_dirty(&self) -> bool {
        self.driver.is_dirty()
    }
    /// The backing file the header names.
    pub fn backing_spec(&self) -> Option<BackingSpec> {
        self.driver.backing_spec()
    }
    /// Rewrites the backing file reference in the header (`rebase -u`; `None` removes
    /// it). The backing image open now stays open until the image is closed.
    pub fn set_backing(&self, spec: Option<BackingSpec>) -> Result<()> {
        self.driver.set_backing_spec(spec.as_ref())
    }
    /// Length of the image's host file.
    pub fn file_length(&self) -> Result<u64> {
        Ok(self.driver.storage().len()?)
    }
    /// The protocol the image's file is reached by (`file`, `nbd`).
    pub fn file_protocol(&self) -> &'static str {
        self.driver.storage().protocol_name()
    }
    /// The canonical name of the image's file when it is not a host file (an NBD
    /// export's `nbd+unix:///e?socket=s`), as QEMU shows it.
    pub fn exact_filename(&self) -> Option<String> {
        self.driver.storage().exact_filename()
    }

    // ---- Snapshots and amend (issue 8) ----
    //
    // Internal snapshot operations (create, apply, delete, list by name) and `amend`
    // belong here, as methods that call the driver, so that they pass the same door as
    // guest writes: applying a snapshot replaces the whole guest disk, so it must reach
    // the hooks as a change of `0..size` (dirty bitmaps mark everything, notifiers
    // tell their clients); amend changing the size goes through `resize` above.

    // ---- Status and chain ----

    /// Status through the backing chain of the range starting at `offset`.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<ChainExtent> {
        chain::block_status(&self.driver, offset, len)
    }
    /// Status of the range starting at `offset` in this image only, not its backing
    /// files (qemu-io's `map` and `alloc`; unallocated = "read from the backing file").
    pub fn layer_block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.driver.block_status(offset, len)
    }
    /// Consistency check of the top image.
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        self.driver.check(repair)
    }
    /// Every layer of the chain, this image first.
    pub fn layers(&self) -> Vec<ImageLayer> {
        ImageLayer::chain(&self.driver, &self.path)
    }
    /// The backing image directly below, if one is open.
    pub fn backing(&self) -> Option<ImageLayer> {
        self.layers().into_iter().nth(1)
    }
    /// Backing images, top first (not including this one).
    pub fn backing_chain(&self) -> Vec<ImageLayer> {
        let mut v = self.layers();
        v.remove(0);
        v
    }
    /// Flushes and marks the image clean; later I/O is still possible but the image
    /// will be marked dirty again by the format if needed.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // The driver closes even if a hook failed; the first error is reported.
        let hooks = self.hooks.iter().try_for_each(|h| h.close());
        let driver = self.driver.close();
        hooks.and(driver)
    }
}

/// The host file a new image goes to: a plain path, `file:NAME`, or a `json:` name
/// whose storage is a host file. Other protocols cannot take a new image and are
/// refused by name before anything is written.
fn create_target(path: &Path) -> Result<PathBuf> {
    let Some(name) = path.to_str().filter(|n| !spec::is_plain_path(n)) else {
        return Ok(path.to_path_buf());
    };
    let tree = spec::parse_filename(name)?;
    match chain::tree_local_file(&tree) {
        Some(f) => Ok(PathBuf::from(f)),
        None => {
            let proto = match tree.get("file") {
                Some(Value::Node(f)) => f.get("driver"),
                _ => tree.get("driver"),
            };
            let proto = match proto {
                Some(Value::Str(p)) => p.clone(),
                _ => name.to_string(),
            };
            Err(SpecError::UnknownProtocol(proto).into())
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!("closing {}: {e}", self.path.display());
        }
    }
}
