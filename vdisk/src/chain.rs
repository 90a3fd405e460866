//! Backing chains: opening the storage an image name or options tree names (through
//! [`crate::storage::spec`] and the protocol registry), its format, its backing files
//! (relative plain names resolved, loops detected), and status through the chain.

use crate::error::{BackingContext, ChainLoop, Error, Invalid, Result};
use crate::format::{self, BackingSpec, Driver, DriverOptions, Format};
use crate::storage::options::{Node, SpecError, Value};
use crate::storage::registry::{self, ProtocolOpen};
use crate::storage::{
    spec, AioMode, CacheMode, FileStorage, LockMode, OpenFileOptions, Storage, StorageError,
};
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
    /// AIO mode of every host file of the chain (a node's `aio` key wins).
    pub aio: AioMode,
}

/// Resolves a backing file name against the directory of the image naming it, as QEMU
/// does (absolute names are kept; relative ones are joined, not canonicalised). Names
/// with a protocol prefix or `json:` are not paths and are returned unchanged.
pub fn resolve_backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() || !spec::is_plain_path(name) {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// The host file a backing name opens, for display and host-file queries (QEMU shows
/// a `json:` backing by its file's name): a plain name resolved as
/// [`resolve_backing_path`]; a `json:` name whose storage is a host file gives that
/// file (relative to the working directory, as QEMU opens it); else the name itself.
pub fn backing_file_path(image: &Path, name: &str) -> PathBuf {
    let resolved = resolve_backing_path(image, name);
    if spec::is_plain_path(name) {
        return resolved;
    }
    spec::parse_filename(name)
        .ok()
        .and_then(|tree| tree_local_file(&tree).map(PathBuf::from))
        .unwrap_or(resolved)
}

/// The host file of a format node's storage (or of a protocol node at the root).
pub(crate) fn tree_local_file(tree: &Node) -> Option<&str> {
    match tree.get("driver") {
        Some(Value::Str(d)) if registry::by_name(d).is_some() => registry::local_file(tree),
        _ => match tree.get("file") {
            Some(Value::Node(f)) => registry::local_file(f),
            _ => None,
        },
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
    Ok(Arc::new(with_aio(FileStorage::open(path, &fo)?, opts.aio)))
}

impl From<SpecError> for Error {
    fn from(e: SpecError) -> Self {
        Error::Storage(StorageError::Spec(e))
    }
}

/// What a format node's `backing` option says.
#[derive(Clone, Debug)]
pub enum BackingChoice {
    /// Open the backing file the image's header names (the default).
    Header,
    /// No backing file (`"backing": null`, or `backing=` in key=value form).
    Disabled,
    /// Open this node instead of the header's backing file.
    Node(Node),
}

/// A format node with its storage open, ready for its format driver.
#[derive(Debug)]
pub struct OpenedNode {
    /// The format: the node's `driver`, else probed.
    pub format: Format,
    /// The storage holding the format's metadata (the `file` child).
    pub metadata: Arc<dyn Storage>,
    /// The storage of guest data when a `data-file` child is given (else the data
    /// lives in [`OpenedNode::metadata`]).
    pub data: Option<Arc<dyn Storage>>,
    /// A detached LUKS header (the luks driver's `header` child): the format reads its
    /// header there and its payload from `file`.
    pub header: Option<Arc<dyn Storage>>,
    /// Format options from the node (`l2-cache-size`…), over the chain's.
    pub driver: DriverOptions,
    /// What to do about the backing file.
    pub backing: BackingChoice,
    /// The host file of the `file` child, when it is one: relative backing names
    /// resolve against it, and it is the name front-ends show.
    pub local_path: Option<PathBuf>,
    /// Its canonical path (loop detection).
    pub canonical: Option<PathBuf>,
    /// The format was probed (neither the tree nor the caller named it).
    pub probed: bool,
    /// The node was a bare protocol node (`driver=file,filename=x`), opened as raw
    /// data on it; QEMU reports the protocol as the image's format.
    pub protocol_root: bool,
    /// How other files the image names (VMDK extents) are opened.
    pub files: FileOpen,
}

/// How the files an image names besides its backing file (VMDK extents) are opened:
/// relative to the image's own file, with its access, cache mode and locks.
#[derive(Clone, Debug)]
pub struct FileOpen {
    /// The image's own host file (`None`: not a host file, so it can name none).
    pub image: Option<PathBuf>,
    /// Open without write access.
    pub read_only: bool,
    /// Host cache mode.
    pub cache: CacheMode,
    /// Locks to take.
    pub lock: LockMode,
    /// AIO mode (inherited from the image's file, as QEMU's children inherit it).
    pub aio: AioMode,
}

/// A host file set up for `aio` (io_uring where asked and the kernel allows it).
fn with_aio(f: FileStorage, aio: AioMode) -> FileStorage {
    match aio {
        AioMode::IoUring => f.with_io_uring().0,
        AioMode::Threads | AioMode::Native => f,
    }
}

impl FileOpen {
    /// Opens the file `name` (relative names resolved against the image's file, as
    /// QEMU's `path_combine`); returns it and the name it was opened by.
    pub fn open(&self, name: &str) -> Result<(Arc<dyn Storage>, String)> {
        let image = self.image.as_deref().unwrap_or(Path::new(""));
        let path = resolve_backing_path(image, name);
        let fo = OpenFileOptions {
            read_only: self.read_only,
            cache: self.cache,
            lock: self.lock,
            create: false,
        };
        let st: Arc<dyn Storage> = Arc::new(with_aio(FileStorage::open(&path, &fo)?, self.aio));
        Ok((st, path.display().to_string()))
    }
}

/// How [`open_node`] opens the storage of a node.
pub struct NodeOpen<'a> {
    /// Open without write access.
    pub read_only: bool,
    /// The chain's options (cache mode, locking, format defaults).
    pub chain: &'a ChainOptions,
    /// A format named outside the tree (`-f`, the header's backing format): wins
    /// over the tree's `driver`, as qemu-img's `-f` does.
    pub format: Option<Format>,
    /// The locks to hold once the format is known (formats differ in what a reader
    /// shares); applied only when the chain locks.
    pub lock: &'a dyn Fn(Format) -> LockMode,
    /// Called with the canonical path of the node's host file before it is opened
    /// (loop detection).
    pub check_path: &'a mut dyn FnMut(&Path) -> Result<()>,
}

/// Format options a format's node accepts, besides `driver`, `file`, `backing`,
/// `data-file` and the generic `cache.*`.
fn format_options(f: Format) -> &'static [&'static str] {
    if f == Format::Qcow2 {
        &["l2-cache-size", "refcount-cache-size", "encrypt.key-secret"]
    } else if f.name() == "luks" {
        &["key-secret"]
    } else {
        &[]
    }
}

/// Opens the storage of a format node (`file`, and `data-file` if given) through the
/// protocol registry, takes the node's format options, and probes the format when
/// neither the tree nor `how.format` names it. A root whose `driver` is a protocol
/// (`driver=file,filename=x`) is raw data on that storage.
pub fn open_node(mut root: Node, mut how: NodeOpen<'_>) -> Result<OpenedNode> {
    let driver = root.take_str("driver")?;
    if let Some(p) = driver.as_deref().and_then(registry::by_name) {
        // A protocol at the root: the node is its own storage, read as raw.
        root.insert_str("driver", p.name)?;
        let mut raw = Node::new();
        raw.insert_str("driver", Format::Raw.name())?;
        raw.insert("file", Value::Node(root))?;
        let mut node = open_node(raw, how)?;
        node.protocol_root = true;
        return Ok(node);
    }
    let named = match (how.format, driver) {
        (Some(f), _) => Some(f),
        (None, Some(d)) => Some(Format::parse(&d)?),
        (None, None) => None,
    };
    let cache = registry::cache_options(&mut root, how.chain.cache)?;
    let mut dopts = how.chain.driver.clone();
    dopts.read_only = how.read_only;
    let l2 = root.take_scalar("l2-cache-size")?;
    let rc = root.take_scalar("refcount-cache-size")?;
    let size = |key: &str, v: Option<String>| -> Result<Option<u64>> {
        v.map(|s| {
            format::parse_size(&s).map_err(|_| {
                Error::from(SpecError::Value {
                    key: key.into(),
                    expected: "a size".into(),
                })
            })
        })
        .transpose()
    };
    let (l2_given, rc_given) = (l2.is_some(), rc.is_some());
    let qcow2_secret = root.take_scalar("encrypt.key-secret")?;
    let luks_secret = root.take_scalar("key-secret")?;
    let (q_given, l_given) = (qcow2_secret.is_some(), luks_secret.is_some());
    if let Some(id) = qcow2_secret.or(luks_secret) {
        dopts.key_secret = Some(id);
    }
    if let Some(v) = size("l2-cache-size", l2)? {
        dopts.l2_cache_size = Some(v);
    }
    if let Some(v) = size("refcount-cache-size", rc)? {
        dopts.refcount_cache_size = Some(v);
    }
    let backing = match root.take("backing") {
        None => BackingChoice::Header,
        Some(Value::Null) => BackingChoice::Disabled,
        Some(Value::Str(s)) if s.is_empty() => BackingChoice::Disabled,
        Some(Value::Str(s)) => return Err(SpecError::NodeReference(s).into()),
        Some(Value::Node(n)) => BackingChoice::Node(n),
        Some(_) => {
            return Err(SpecError::Type {
                key: "backing".into(),
                expected: "object or null",
            }
            .into())
        }
    };
    let data_node = root.take_node("data-file")?;
    let header_node = root.take_node("header")?;
    let file_node = root
        .take_node("file")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            SpecError::Missing(if named.is_none() && root.contains("filename") {
                "Must specify either driver or file".into()
            } else {
                "A block device must be specified for \"file\"".into()
            })
        })?;
    let OpenedStorage {
        storage: metadata,
        local: local_path,
        canonical,
    } = open_protocol_node(file_node, cache, &mut how)?;
    let data = match data_node {
        Some(n) => Some(open_protocol_node(n, cache, &mut how)?.storage),
        None => None,
    };
    let header = match header_node {
        Some(n) => Some(open_protocol_node(n, cache, &mut how)?.storage),
        None => None,
    };
    let fmt = match named {
        Some(f) => f,
        None => match &local_path {
            Some(p) => probe_file(&*metadata, p)?,
            None => probe_storage(&*metadata)?,
        },
    };
    if header.is_some() && fmt.name() != "luks" {
        return Err(SpecError::FormatOption {
            format: fmt.name().into(),
            key: "header".into(),
        }
        .into());
    }
    let allowed = format_options(fmt);
    for (key, given) in [
        ("l2-cache-size", l2_given),
        ("refcount-cache-size", rc_given),
        ("encrypt.key-secret", q_given),
        ("key-secret", l_given),
    ] {
        if given && !allowed.contains(&key) {
            return Err(SpecError::FormatOption {
                format: fmt.name().into(),
                key: key.into(),
            }
            .into());
        }
    }
    root.finish(|key| SpecError::FormatOption {
        format: fmt.name().into(),
        key,
    })?;
    let mut lock = LockMode::Off;
    if how.chain.locking {
        let mode = (how.lock)(fmt);
        metadata.relock(mode)?;
        for d in data.iter().chain(&header) {
            d.relock(mode)?;
        }
        lock = mode;
    }
    let files = FileOpen {
        image: local_path.clone(),
        read_only: how.read_only,
        cache,
        lock,
        aio: how.chain.aio,
    };
    Ok(OpenedNode {
        format: fmt,
        metadata,
        data,
        header,
        driver: dopts,
        backing,
        local_path,
        canonical,
        probed: named.is_none(),
        protocol_root: false,
        files,
    })
}

/// One protocol node, open.
struct OpenedStorage {
    storage: Arc<dyn Storage>,
    /// Its host file, when it is one.
    local: Option<PathBuf>,
    /// That file's canonical path.
    canonical: Option<PathBuf>,
}

/// Opens one protocol node without locks (they are taken once the format is known,
/// so a loop back to an image above is reported as a loop, not as a lock conflict).
fn open_protocol_node(
    node: Node,
    cache: CacheMode,
    how: &mut NodeOpen<'_>,
) -> Result<OpenedStorage> {
    let local = registry::local_file(&node).map(PathBuf::from);
    let storage = registry::open(
        node,
        &ProtocolOpen {
            read_only: how.read_only,
            cache,
            lock: LockMode::Off,
            aio: how.chain.aio,
        },
    )?;
    // The file opened, so it exists; a path that still cannot be canonicalised just
    // takes no part in loop detection.
    let canonical = local.as_ref().and_then(|p| std::fs::canonicalize(p).ok());
    if let Some(c) = &canonical {
        (how.check_path)(c)?;
    }
    Ok(OpenedStorage {
        storage,
        local,
        canonical,
    })
}

/// Opens a format driver on an opened node, handing it the metadata storage and,
/// separately, the data storage (the same one unless the node has a `data-file`).
/// A format without external data files refuses a `data-file` child by name rather
/// than ignore it.
pub fn open_format(
    node: OpenedNode,
    backing: &mut format::BackingResolver<'_>,
) -> Result<Arc<dyn Driver>> {
    if node.data.is_some() && !node.format.caps().data_file {
        return Err(SpecError::FormatOption {
            format: node.format.name().into(),
            key: "data-file".into(),
        }
        .into());
    }
    let mut dopts = node.driver;
    if matches!(node.backing, BackingChoice::Disabled) {
        dopts.no_backing = true;
    }
    let data = node.data.unwrap_or_else(|| node.metadata.clone());
    // A detached LUKS header: the header is the format's metadata, `file` its data.
    let meta = node.header.unwrap_or_else(|| node.metadata.clone());
    let files = node.files;
    let named = files.image.is_some();
    // A data file name from a header is opened as QEMU opens it: as given (relative to
    // the working directory), with the image's access, cache mode and locks.
    let data_open = FileOpen {
        image: None,
        ..files.clone()
    };
    let mut open_file = move |name: &str| files.open(name);
    let mut open_data = move |name: &str| data_open.open(name);
    format::registry::open_with(
        node.format,
        format::registry::OpenArgs {
            meta,
            data,
            opts: &dopts,
            backing,
            files: if named { Some(&mut open_file) } else { None },
            data_files: Some(&mut open_data),
        },
    )
}

/// The tree a backing file comes from: the node's explicit `backing` child, else the
/// header's name (plain names resolved against the image's own file), with the
/// header's backing format over the tree's `driver`, as QEMU.
fn backing_tree(
    image: &Path,
    spec: &BackingSpec,
    choice: &BackingChoice,
) -> Result<(Node, String)> {
    match choice {
        BackingChoice::Node(n) if n.contains("file") || n.contains("driver") => {
            let mut n = n.clone();
            n.rebase(String::new());
            Ok((n, spec.name.clone()))
        }
        BackingChoice::Node(n) => {
            // Options only (`backing.encrypt.key-secret=…`): they apply to the backing
            // file the header names, as in QEMU.
            let (mut tree, name) = backing_tree(image, spec, &BackingChoice::Header)?;
            for (k, v) in n.flatten() {
                tree.insert_str(&k, v)?;
            }
            Ok((tree, name))
        }
        _ => {
            let path = resolve_backing_path(image, &spec.name);
            let name = path.to_str().map(str::to_string).ok_or_else(|| {
                Error::from(Invalid::NotUtf8Name {
                    backing: true,
                    name: path.display().to_string(),
                })
            })?;
            Ok((spec::parse_filename(&name)?, name))
        }
    }
}

/// Opens the backing file `spec` named by the image at `image_path` (or the node the
/// image's options give instead), with its own chain. `seen` holds the canonical
/// paths of the host files above, to detect loops.
pub fn open_backing(
    image_path: &Path,
    spec: &BackingSpec,
    opts: &ChainOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Arc<dyn Driver>> {
    open_backing_with(image_path, spec, &BackingChoice::Header, opts, seen)
}

/// [`open_backing`] with the image node's `backing` choice.
pub fn open_backing_with(
    image_path: &Path,
    spec: &BackingSpec,
    choice: &BackingChoice,
    opts: &ChainOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Arc<dyn Driver>> {
    let (tree, name) = backing_tree(image_path, spec, choice)
        .map_err(|e| Error::backing(BackingContext::Open, e))?;
    if seen.len() >= MAX_CHAIN_DEPTH {
        return Err(Invalid::ChainTooDeep {
            max: MAX_CHAIN_DEPTH,
            name,
        }
        .into());
    }
    let force_share = opts.force_share;
    let mut check = |canon: &Path| -> Result<()> {
        if seen.iter().any(|p| p == canon) {
            let chain = seen
                .iter()
                .map(|p| p.as_path())
                .chain([canon])
                .map(|p| p.display().to_string())
                .collect();
            return Err(Error::BackingLoop(ChainLoop {
                name: name.clone(),
                chain,
            }));
        }
        Ok(())
    };
    let node = open_node(
        tree,
        NodeOpen {
            read_only: true,
            chain: opts,
            format: match choice {
                BackingChoice::Node(n) if n.contains("file") || n.contains("driver") => None,
                _ => spec.format,
            },
            lock: &|_| LockMode::for_open(true, force_share),
            check_path: &mut check,
        },
    )
    .map_err(|e| match e {
        Error::BackingLoop(_) => e,
        other => Error::backing(BackingContext::Open, other),
    })?;
    let path = node
        .local_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(&name));
    // Storage that is no host file stands in `seen` by its name: it still counts
    // towards the depth bound, and the same name twice in a chain is a loop.
    let canon = node
        .canonical
        .clone()
        .unwrap_or_else(|| PathBuf::from(&name));
    if node.canonical.is_none() && seen.contains(&canon) {
        return Err(Error::BackingLoop(ChainLoop {
            name,
            chain: Vec::new(),
        }));
    }
    let choice = node.backing.clone();
    seen.push(canon);
    let r = open_format(node, &mut |s: &BackingSpec| {
        open_backing_with(&path, s, &choice, opts, seen)
    });
    seen.pop();
    r.map_err(|e| match e {
        Error::BackingLoop(_) => e,
        other => Error::backing(BackingContext::Image(path.display().to_string()), other),
    })
}

pub use crate::format::datapath::ChainExtent;

/// Status of `[offset, offset+len)` starting at `offset`, walking down the chain (the
/// walk lives in the format layer, which uses it for zero detection too).
pub fn block_status(top: &Arc<dyn Driver>, offset: u64, len: u64) -> Result<ChainExtent> {
    format::datapath::chain_status(&**top, offset, len)
}
