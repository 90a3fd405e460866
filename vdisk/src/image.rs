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
    FormatSpecific, PreallocMode, Repair, SnapshotInfo, ZeroFlags,
};
use crate::hook::{DetectZeroes, DetectZeroesMode, Payload, Request, WriteHook};
use crate::layer::ImageLayer;
use crate::policy::DiscardMode;
use crate::storage::options::{Node, SpecError, Value};
use crate::storage::{
    spec, AioMode, CacheMode, FileStorage, LockMode, OpenFileOptions, Perm, Storage,
};
use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod bitmaps;
mod copy_on_read;
mod overlay;
pub use bitmaps::default_granularity;
pub use overlay::OverlayError;

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
    /// Discard policy when the options tree does not give `discard` (QEMU's
    /// BDRV_O_UNMAP: qemu-io and convert targets have it, other qemu-img commands and
    /// qemu-nbd by default do not).
    pub discard: DiscardMode,
    /// Copy data read from backing files into the image (QEMU's `copy-on-read=on`,
    /// qemu-io `-C`); needs a read/write open. The options tree's `copy-on-read` key
    /// overrides it.
    pub copy_on_read: bool,
    /// AIO mode of the chain's host files (qemu-io/qemu-img bench `-i`, qemu-nbd
    /// `--aio`); a node's own `aio` key overrides it.
    pub aio: AioMode,
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
            discard: DiscardMode::Unmap,
            copy_on_read: false,
            aio: AioMode::Threads,
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

/// A transfer the caller does itself on a host file, handed out by [`Image::direct`]:
/// where the bytes are, the driver's guard, and for a write the hooks' `after` (a dirty
/// bitmap marks the range) when it is finished or dropped.
#[must_use = "finish the transfer once it completed"]
#[derive(Debug)]
pub struct DirectIo<'a> {
    range: crate::format::mapping::DirectRange<'a>,
    /// A write: the image whose hooks see the change, and its guest offset.
    write: Option<(&'a Image, u64)>,
    ok: bool,
}

impl DirectIo<'_> {
    /// The host file descriptor to transfer on.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.range.fd
    }
    /// Host offset of the first byte.
    pub fn host(&self) -> u64 {
        self.range.host
    }
    /// Bytes to transfer: the whole guest range asked for.
    pub fn len(&self) -> u64 {
        self.range.len
    }
    /// Whether the range is empty (never, as handed out).
    pub fn is_empty(&self) -> bool {
        self.range.len == 0
    }
    /// Ends the transfer (`ok`: every byte was transferred): releases the guard and,
    /// for a write, tells the hooks. Dropping it unfinished counts as a failure.
    pub fn finish(mut self, ok: bool) {
        self.ok = ok;
    }
}

impl Drop for DirectIo<'_> {
    fn drop(&mut self) {
        if let Some((img, offset)) = self.write {
            let change = crate::hook::Change::Write {
                offset,
                len: self.range.len,
            };
            for h in &img.hooks {
                h.after(&change, self.ok);
            }
        }
    }
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
    /// See [`Image::protocol_root`].
    protocol_root: bool,
    /// See [`Image::format_probed`].
    probed: bool,
    /// Whether discards are done (see [`crate::policy`]).
    discard: DiscardMode,
    /// Copy-on-read is on: reads copy backing data up, writes pass its gate.
    cor: Option<copy_on_read::Gate>,
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
        // QEMU's `copy-on-read` filter node above the image.
        let (mut tree, filter) = copy_on_read::unwrap_filter(tree, opts.read_only)?;
        // QEMU's generic options of the top node that vdisk implements as hooks.
        let discard = match tree.take_str("discard")? {
            Some(v) => DiscardMode::parse(&v)?,
            None => opts.discard,
        };
        let detect = match tree.take_str("detect-zeroes")? {
            Some(v) => DetectZeroesMode::parse(&v)?,
            None => DetectZeroesMode::Off,
        };
        if detect == DetectZeroesMode::Unmap && discard != DiscardMode::Unmap {
            return Err(Invalid::DetectZeroesUnmapWithoutDiscard.into());
        }
        let cor = tree.take_bool("copy-on-read")?.unwrap_or(opts.copy_on_read);
        let gate = match filter {
            Some(f) => Some(f.gate()),
            None => cor.then(copy_on_read::Gate::default),
        };
        if cor && opts.read_only {
            return Err(Invalid::CopyOnReadReadOnly.into());
        }
        let mut hooks = opts.hooks.clone();
        hooks.extend(DetectZeroes::for_mode(
            detect,
            discard == DiscardMode::Unmap,
        ));
        let copts = ChainOptions {
            cache: opts.cache,
            force_share: opts.force_share,
            locking: opts.locking,
            aio: opts.aio,
            // Each layer names its own key secret.
            driver: DriverOptions {
                key_secret: None,
                ..opts.driver.clone()
            },
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
        let (protocol_root, probed) = (node.protocol_root, node.probed);
        if node.driver.key_secret.is_none() {
            node.driver.key_secret = opts.driver.key_secret.clone();
        }
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
        let mut img = Image {
            driver,
            path,
            closed: AtomicBool::new(false),
            hooks,
            protocol_root,
            probed,
            discard,
            cor: gate,
        };
        if !read_only {
            img.attach_bitmaps();
        }
        Ok(img)
    }

    /// Registers the dirty-bitmap hook (last, so it sees requests in their final
    /// form) when the format stores persistent bitmaps.
    fn attach_bitmaps(&mut self) {
        if let Some(h) = crate::hook::DirtyBitmapHook::for_driver(&self.driver) {
            self.hooks.push(Arc::new(h));
        }
    }

    /// Wraps an already-open driver (e.g. on a [`crate::storage::MemStorage`] in tests).
    pub fn from_driver(driver: Arc<dyn Driver>, path: impl Into<PathBuf>) -> Image {
        let mut img = Image {
            driver,
            path: path.into(),
            closed: AtomicBool::new(false),
            hooks: Vec::new(),
            protocol_root: false,
            probed: false,
            discard: DiscardMode::Unmap,
            cor: None,
        };
        img.attach_bitmaps();
        img
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
        let remote = remote_target(path.as_ref())?;
        let target = match remote {
            Some(_) => path.as_ref().to_path_buf(),
            None => create_target(path.as_ref())?,
        };
        let path = target.as_path();
        let mut backing = None;
        let mut parent = None;
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
                        // Only its size and format are needed (QEMU: BDRV_O_NO_IO), so an
                        // encrypted backing file needs no key.
                        driver: DriverOptions {
                            no_io: true,
                            ..DriverOptions::default()
                        },
                        ..OpenOptions::default()
                    },
                )
                .map_err(|e| {
                    Error::backing(BackingContext::OpenFile(bpath.display().to_string()), e)
                })?;
                fmt = Some(bimg.format());
                parent = Some(bimg.format_specific());
                // qemu-img takes the backing size rounded up to whole sectors.
                size = size.or(Some(bimg.size().div_ceil(512) * 512));
            } else if size.is_none() {
                return Err(Invalid::NeedsSize.into());
            }
            if parent.is_none() {
                // Unchecked (`-u`, or the caller checked it): a format that records
                // facts about its parent (VMDK's parentCID) still gets them when the
                // file opens, as QEMU's vmdk create opens it; if it does not, the
                // format decides.
                let bpath = chain::resolve_backing_path(path, name);
                let o = OpenOptions {
                    format: fmt,
                    read_only: true,
                    force_share: true,
                    driver: DriverOptions {
                        no_io: true,
                        no_backing: true,
                        ..DriverOptions::default()
                    },
                    ..OpenOptions::default()
                };
                parent = Image::open(&bpath, &o).ok().map(|b| b.format_specific());
            }
            backing = Some(BackingSpec {
                name: name.clone(),
                format: fmt,
            });
        }
        let size = size.ok_or(Invalid::NeedsSize)?;
        if let Some(node) = remote {
            return create_remote(node, opts, size, backing, parent);
        }
        let fo = OpenFileOptions {
            read_only: false,
            cache: CacheMode::Writeback,
            lock: LockMode::for_open(false, false),
            create: true,
        };
        let existed = path.exists();
        let file = FileStorage::open(path, &fo)?;
        // The file protocol's hints (qemu's file-posix applies them to every file it
        // creates; its default extent size hint is 1 MiB). A value that does not parse
        // is reported by the format's option check below.
        let opt = |k: &str| {
            opts.options
                .iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v)
        };
        let nocow = opt("nocow").is_some_and(|v| v == "on");
        let hint_given = opt("extent_size_hint");
        let hint = match hint_given {
            Some(v) => format::parse_size(v).unwrap_or(0),
            None => 1 << 20,
        };
        if let Err(e) = file.apply_create_hints(nocow, hint) {
            if hint_given.is_some() {
                tracing::warn!("Failed to set extent size hint: {e}");
            }
        }
        let storage: Arc<dyn Storage> = Arc::new(file);
        // An external data file (qcow2 `data_file`) is created first, as QEMU does: by
        // its name as given (relative to the working directory), emptied.
        let data_name = opt("data_file")
            .filter(|n| !n.is_empty() && opts.format.caps().data_file)
            .cloned();
        let mut data_created = None;
        let data = match &data_name {
            Some(name) => {
                let dpath = PathBuf::from(name);
                let existed = dpath.exists();
                let opened = FileStorage::open(&dpath, &fo).and_then(|d| {
                    d.set_len(0)?;
                    Ok(d)
                });
                match opened {
                    Ok(d) => {
                        if !existed {
                            data_created = Some(dpath);
                        }
                        Some(Arc::new(d) as Arc<dyn Storage>)
                    }
                    Err(e) => {
                        drop(storage);
                        if !existed {
                            let _ = std::fs::remove_file(path);
                        }
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        let siblings = Arc::new(crate::siblings::FileSiblings::new(path, fo));
        let r = format::registry::create_with_files(
            opts.format,
            &storage,
            &CreateSpec {
                size,
                backing,
                options: opts.options.clone(),
            },
            path.file_name().and_then(|n| n.to_str()),
            data,
            Some(siblings.clone()),
            parent,
        );
        if r.is_err() {
            // Files made for a create that failed midway are removed (QEMU leaves
            // them; a half-made extent set is useless).
            siblings.remove_created();
        }
        if r.is_err() && !existed {
            // Bad options are found while formatting: leave no half-made file behind.
            drop(storage);
            let _ = std::fs::remove_file(path);
            if let Some(d) = data_created {
                let _ = std::fs::remove_file(d);
            }
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
    /// Whether the format was probed from the file's contents (not named by the
    /// caller or the options). QEMU restricts a probed raw image more (its exports
    /// advertise a 512-byte minimum block).
    pub fn format_probed(&self) -> bool {
        self.probed
    }
    /// The protocol of the image's own storage (`file`, `host_device`, `nbd`, `https`…).
    pub fn protocol(&self) -> &'static str {
        self.driver.storage().protocol_name()
    }
    /// When the image was opened from a bare protocol node (`--image-opts
    /// driver=file,filename=x`): that protocol's name. Its data is read as raw, and
    /// QEMU's tools report the protocol as the format (`file format: file`).
    pub fn protocol_root(&self) -> Option<&'static str> {
        self.protocol_root.then(|| self.protocol())
    }
    /// Guest size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    // ---- Guest data: every request passes the write hooks ----

    /// Reads guest bytes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(g) = &self.cor {
            self.copy_up(g, offset, buf.len() as u64)?;
        }
        if self.hooks.is_empty() {
            return self.driver.read_at(buf, offset);
        }
        self.driver.read_at(buf, offset)?;
        self.after_read(&mut [IoSliceMut::new(buf)], offset)
    }
    /// Writes guest bytes.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _gate = self.write_gate();
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
        if let Some(g) = &self.cor {
            let len = bufs.iter().map(|b| b.len() as u64).sum();
            self.copy_up(g, offset, len)?;
        }
        if self.hooks.is_empty() {
            return self.driver.read_vectored(bufs, offset);
        }
        self.driver.read_vectored(bufs, offset)?;
        self.after_read(bufs, offset)
    }
    /// Writes consecutive guest bytes from several buffers, as one request (gathered
    /// into one buffer only when a hook looks at or changes the bytes).
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let _gate = self.write_gate();
        if self.hooks.is_empty() {
            return self.driver.write_vectored(bufs, offset);
        }
        self.hooked(Request::Write {
            offset,
            data: Payload::vectored(bufs),
        })
    }
    /// `[offset, offset + len)` as one transfer the caller may do itself on a host
    /// file, asynchronously ([`crate::format::mapping::DirectRange`]: the NBD server's
    /// io_uring path), or `None`: use [`Image::read_at`] / [`Image::write_at`]. Only when
    /// nothing above the driver needs the bytes (no zero detection, no copy-on-read;
    /// a dirty bitmap only notes the range: [`WriteHook::range_only`]) and the driver
    /// maps it to one allocated host run on an O_DIRECT file. For a write the range
    /// holds the driver's in-place guard: call [`DirectIo::finish`] only once the
    /// transfer completed, and acknowledge the write only then. A QED image's check,
    /// repair and resize wait for every direct range handed out to be finished (they
    /// move clusters), so the thread holding one must not call them.
    pub fn direct(&self, offset: u64, len: u64, write: bool) -> Option<DirectIo<'_>> {
        if self.cor.is_some() || !self.hooks.iter().all(|h| h.range_only()) {
            return None;
        }
        let range = self.driver.direct(offset, len, write)?;
        if write {
            for h in &self.hooks {
                h.before_direct_write(offset, len).ok()?;
            }
        }
        Some(DirectIo {
            range,
            write: write.then_some((self, offset)),
            ok: false,
        })
    }
    /// Makes a range read as zeroes (`may_unmap`: it may be deallocated).
    pub fn write_zeroes(&self, offset: u64, len: u64, mut flags: ZeroFlags) -> Result<()> {
        let _gate = self.write_gate();
        if self.discard == DiscardMode::Ignore {
            flags.may_unmap = false;
        }
        if self.hooks.is_empty() {
            return self.driver.write_zeroes(offset, len, flags);
        }
        self.hooked(Request::Zeroes { offset, len, flags })
    }
    /// Discards a range (succeeds and changes nothing with `discard=ignore`).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _gate = self.write_gate();
        if self.discard == DiscardMode::Ignore {
            return crate::format::check_range(offset, len, self.size());
        }
        if self.hooks.is_empty() {
            return self.driver.discard(offset, len);
        }
        self.hooked(Request::Discard { offset, len })
    }
    /// Writes one cluster-aligned block compressed (a short block only at the end of
    /// the disk); formats without compression refuse.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _gate = self.write_gate();
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
        let _gate = self.write_gate();
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
    /// Writes VM state (QEMU's `savevm` data; qemu-io `write -b`) at byte `pos` of the
    /// image's VM state area. Not guest data: the write hooks (bitmaps, zero
    /// detection) do not see it. Only qcow2 keeps VM state; other formats answer
    /// ENOTSUP, as in QEMU.
    pub fn save_vmstate(&self, buf: &[u8], pos: u64) -> Result<()> {
        self.driver.save_vmstate(buf, pos)
    }
    /// Reads VM state at byte `pos` (qemu-io `read -b`); never-written bytes read as
    /// zeroes.
    pub fn load_vmstate(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        self.driver.load_vmstate(buf, pos)
    }
    /// The `blkdebug` filter under the top image, if it was opened over one
    /// (`blkdebug::file`, `driver=blkdebug`): where qemu-io's `break`/`resume`
    /// family sets and lifts its breakpoints.
    pub fn blkdebug(&self) -> Option<&crate::storage::blkdebug::BlkdebugStorage> {
        self.driver.storage().blkdebug()
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
            Request::Write { offset, data } => match data.slices() {
                Some(s) => self.driver.write_vectored(s, *offset),
                None => self.driver.write_at(data.bytes(), *offset),
            },
            Request::Zeroes { offset, len, flags } => {
                // A hook may have turned a data write into a zero write.
                let flags = ZeroFlags {
                    may_unmap: flags.may_unmap && self.discard == DiscardMode::Unmap,
                    ..*flags
                };
                self.driver.write_zeroes(*offset, *len, flags)
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

    /// Preallocates grown space `[offset, offset+len)` (`resize --preallocation`): on
    /// formats with metadata preallocation, maps it to host clusters (and reserves or
    /// writes them for `Falloc`/`Full`); on raw images `Falloc` reserves the file range
    /// and `Full` writes zeroes. It reads zeroes before and after.
    pub fn preallocate_grown(&self, offset: u64, len: u64, mode: PreallocMode) -> Result<()> {
        let caps = self.format().caps();
        if caps.raw_data {
            format::check_range(offset, len, self.size())?;
            let st = self.driver.storage();
            match mode {
                PreallocMode::Falloc => st.allocate(offset, len)?,
                PreallocMode::Full => {
                    // Zero bytes written, as QEMU: the range is data, not a hole or an
                    // unwritten extent.
                    let chunk = vec![0u8; len.min(1 << 20) as usize];
                    let mut pos = 0;
                    while pos < len {
                        let n = (len - pos).min(chunk.len() as u64) as usize;
                        st.write_at(&chunk[..n], offset + pos)?;
                        pos += n as u64;
                    }
                }
                PreallocMode::Metadata => {
                    return Err(Unsupported::NoPreallocation(self.format().name()).into())
                }
            }
            return Ok(());
        }
        self.driver.preallocate_grown(offset, len, mode)
    }

    /// Copies guest bytes `[offset, offset+len)` of this image to `dst` at
    /// `dst_offset` without reading them into memory (copy offload, `convert -C`),
    /// where both are raw images on host files and `dst` has no write hooks (a hook
    /// must see the bytes). Returns how many bytes were copied from the start of the
    /// range: fewer than `len` (possibly 0) when offload is impossible; the caller
    /// copies the rest by reading and writing.
    pub fn copy_range_to(
        &self,
        offset: u64,
        dst: &Image,
        dst_offset: u64,
        len: u64,
    ) -> Result<u64> {
        format::check_range(offset, len, self.size())?;
        format::check_range(dst_offset, len, dst.size())?;
        if !self.format().caps().raw_data || !dst.format().caps().raw_data || !dst.hooks.is_empty()
        {
            return Ok(0);
        }
        // A read-only destination fails the copy (EBADF): the caller's write then
        // reports it as any write would.
        Ok(self
            .driver
            .storage()
            .copy_range_to(offset, &**dst.driver.storage(), dst_offset, len)?)
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

    /// Whether the image compresses every write it stores (stream-optimized VMDK):
    /// writers should then write from several threads, in any order.
    pub fn compresses_writes(&self) -> bool {
        self.driver.compresses_writes()
    }

    /// Allocation unit, if the format has one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.driver.cluster_size()
    }
    /// Format-specific information (`info`'s `format-specific`).
    pub fn format_specific(&self) -> FormatSpecific {
        self.driver.format_specific()
    }
    /// How the image is encrypted (`None`: it is not).
    pub fn encryption(&self) -> Option<crate::format::EncryptionInfo> {
        self.driver.encryption()
    }
    /// Internal snapshots, in table order.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.driver.snapshots()
    }
    /// Whether the image is marked dirty (qcow2 dirty bit, QED NEED_CHECK).
    pub fn is_dirty(&self) -> bool {
        self.driver.is_dirty()
    }
    /// Whether QEMU's `bdrv_get_info` would succeed on this image (`qemu-img info`'s
    /// JSON then carries the dirty flag); false for a VMDK whose extents disagree.
    pub fn info_available(&self) -> bool {
        self.driver.info_available()
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
    /// The canonical name of the image's file when it is not a host file (an NBD
    /// export's `nbd+unix:///e?socket=s`), as QEMU shows it.
    pub fn exact_filename(&self) -> Option<String> {
        self.driver.storage().exact_filename()
    }

    // ---- Snapshots and amend (issue 8) ----
    //
    // Internal snapshot operations pass the same door as guest writes: applying a
    // snapshot replaces the whole guest disk, so it reaches the hooks as a write of
    // `0..size` (dirty bitmaps mark everything, notifiers tell their clients); amend
    // changing the size goes through `resize` above.

    /// Changes creation options of the image (`amend -o`): parsed against the format's
    /// declared options; options only creation takes are refused by name. A size
    /// change reaches the hooks as a resize.
    pub fn amend(&self, options: &[(String, String)]) -> Result<()> {
        self.amend_with_progress(options, &|_, _| {})
    }

    /// [`Image::amend`], reporting progress: `status(done, total)` is called with
    /// the work done so far out of the (projected) total, in the steps QEMU's driver
    /// reports them, so `100 * done / total` is what `qemu-img amend -p` prints. An
    /// amend that changes nothing long-running (e.g. `lazy_refcounts` alone) does not
    /// call it.
    pub fn amend_with_progress(
        &self,
        options: &[(String, String)],
        status: &dyn Fn(u64, u64),
    ) -> Result<()> {
        self.amend_with(options, false, status)
    }

    /// [`Image::amend_with_progress`] with qemu-img's `--force`: allows what QEMU only
    /// does when forced (erasing the last LUKS key slot, overwriting an active one).
    pub fn amend_with(
        &self,
        options: &[(String, String)],
        force: bool,
        status: &dyn Fn(u64, u64),
    ) -> Result<()> {
        let f = self.format();
        if f.amend_options().is_none() {
            return Err(Unsupported::NoAmend(f.name()).into());
        }
        let o = format::options::OptionValues::parse(
            &[f.create_options(), f.desc().amend_only_options],
            options,
        )?;
        if let Some(k) = o.not_amendable() {
            return Err(Invalid::NotAmendable(k).into());
        }
        let old_size = self.size();
        let r = self.driver.amend(&o, force, status);
        if !self.hooks.is_empty() && self.size() != old_size {
            let change = crate::hook::Change::Resize {
                old_size,
                new_size: self.size(),
            };
            for h in &self.hooks {
                h.after(&change, r.is_ok());
            }
        }
        r
    }
    /// Deallocates the whole active disk so it reads as the backing file (`commit`
    /// emptying its top image); formats that cannot refuse with `Unsupported`.
    pub fn make_empty(&self) -> Result<()> {
        let r = self.driver.make_empty();
        if !self.hooks.is_empty() {
            let change = crate::hook::Change::Discard {
                offset: 0,
                len: self.size(),
            };
            for h in &self.hooks {
                h.after(&change, r.is_ok());
            }
        }
        r
    }
    /// Creates an internal snapshot of the active disk (`sn.id` empty: the next free
    /// ID, as QEMU numbers them) and returns the entry as stored.
    pub fn snapshot_create(&self, sn: &SnapshotInfo) -> Result<SnapshotInfo> {
        self.driver.snapshot_create(sn)
    }
    /// Reverts the active disk (contents and size) to a snapshot, found by ID first,
    /// then by name (QEMU's `snapshot -a` lookup).
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<SnapshotInfo> {
        let r = self.driver.snapshot_apply(id_or_name);
        if !self.hooks.is_empty() {
            let change = crate::hook::Change::Write {
                offset: 0,
                len: self.size(),
            };
            for h in &self.hooks {
                h.after(&change, r.is_ok());
            }
        }
        r
    }
    /// Reads a snapshot instead of the active disk from now on (`convert -l`,
    /// exports of a snapshot): the first with this ID and/or name. The image must be
    /// open read-only; its size stays the active disk's, as in QEMU.
    pub fn snapshot_load(&self, id: Option<&str>, name: Option<&str>) -> Result<SnapshotInfo> {
        self.driver.snapshot_load(id, name)
    }
    /// Loads the snapshot a qemu `-l` parameter names (see [`SnapshotParam`]).
    pub fn snapshot_load_param(&self, p: &SnapshotParam) -> Result<SnapshotInfo> {
        match p {
            SnapshotParam::IdOrName(s) => self.snapshot_load_by_id_or_name(s),
            SnapshotParam::Exact { id, name } => self.snapshot_load(id.as_deref(), name.as_deref()),
        }
    }
    /// [`Image::snapshot_load`] by ID first, then by name (`convert -l NAME`).
    pub fn snapshot_load_by_id_or_name(&self, s: &str) -> Result<SnapshotInfo> {
        match self.driver.snapshot_load(Some(s), None) {
            Err(Error::Snapshot(crate::error::SnapshotError::NotFoundForLoad)) => {
                self.driver.snapshot_load(None, Some(s))
            }
            r => r,
        }
    }
    /// Deletes the first snapshot with this ID and/or name (both given: both must
    /// match).
    pub fn snapshot_delete(&self, id: Option<&str>, name: Option<&str>) -> Result<SnapshotInfo> {
        self.driver.snapshot_delete(id, name)
    }

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
    /// will be marked dirty again by the format if needed. Requests held at `blkdebug`
    /// breakpoints are let go first, and no breakpoint holds one afterwards.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // No request stays held at a breakpoint past the close (QEMU drains them).
        if let Some(b) = self.blkdebug() {
            b.release_all();
        }
        // The driver closes even if a hook failed; the first error is reported.
        let hooks = self.hooks.iter().try_for_each(|h| h.close());
        let driver = self.driver.close();
        // Then the storage (an S3 object uploads its spool), only after a clean close.
        let storage = match driver {
            Ok(()) => self.driver.storage().close().map_err(Error::from),
            Err(_) => Ok(()),
        };
        hooks.and(driver).and(storage)
    }
}

/// A snapshot as qemu's `-l` parameter names it: `snapshot.id=ID,snapshot.name=NAME`
/// (either or both; both must match), or a bare ID or name (the ID first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotParam {
    /// A bare ID or name.
    IdOrName(String),
    /// `snapshot.id` and/or `snapshot.name`.
    Exact {
        /// The ID to match.
        id: Option<String>,
        /// The name to match.
        name: Option<String>,
    },
}

impl SnapshotParam {
    /// Parses a `-l` parameter; `Err(key)` names a key that is neither `snapshot.id`
    /// nor `snapshot.name`.
    pub fn parse(param: &str) -> std::result::Result<SnapshotParam, String> {
        if !param.starts_with("snapshot.") {
            return Ok(SnapshotParam::IdOrName(param.to_string()));
        }
        let (mut id, mut name) = (None, None);
        for item in spec::split_items(param) {
            match item.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v.to_string()),
                Some(("snapshot.name", v)) => name = Some(v.to_string()),
                _ => return Err(item.split('=').next().unwrap_or("").to_string()),
            }
        }
        Ok(SnapshotParam::Exact { id, name })
    }
}

/// The protocol node of a new image's name when it is storage other than a host file
/// that can take a new image (an S3 object); `None` for host files and for protocols
/// that cannot (refused by [`create_target`]).
fn remote_target(path: &Path) -> Result<Option<Node>> {
    let Some(name) = path.to_str().filter(|n| !spec::is_plain_path(n)) else {
        return Ok(None);
    };
    let tree = spec::parse_filename(name)?;
    if chain::tree_local_file(&tree).is_some() {
        return Ok(None);
    }
    let node = match tree.get("file") {
        Some(Value::Node(f)) => f.clone(),
        _ => tree,
    };
    Ok(match node.get("driver") {
        Some(Value::Str(d)) if crate::storage::registry::can_create(d) => Some(node),
        _ => None,
    })
}

/// Formats a new image on remote storage (no data file, no sibling files).
fn create_remote(
    node: Node,
    opts: &CreateOptions,
    size: u64,
    backing: Option<BackingSpec>,
    parent: Option<crate::format::FormatSpecific>,
) -> Result<()> {
    let storage = crate::storage::registry::open_new(
        node,
        &crate::storage::registry::ProtocolOpen {
            read_only: false,
            // Uploaded once, at the close below, not at each of create's flushes.
            cache: CacheMode::Unsafe,
            lock: LockMode::Off,
            aio: crate::storage::AioMode::Threads,
        },
    )?;
    format::registry::create_with_files(
        opts.format,
        &storage,
        &CreateSpec {
            size,
            backing,
            options: opts.options.clone(),
        },
        None,
        None,
        None,
        parent,
    )?;
    Ok(storage.close()?)
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
