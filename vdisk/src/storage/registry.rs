//! The storage protocols, chosen by name the way QEMU chooses its protocol drivers.
//!
//! A protocol declares its name, the filename prefixes it claims (`nbd`, `nbd+unix`,
//! `https`: the text before the first `:`), the option keys its node accepts, how a
//! filename with its prefix becomes options, and how a node of options becomes a
//! [`Storage`]. The chain never names a protocol: it hands the `file` (or
//! `data-file`) node of a tree to [`open`], which finds the protocol by `driver`.
//!
//! Adding a protocol is one module exporting a `pub static PROTOCOL: Protocol` and
//! one line in [`PROTOCOLS`]. A protocol whose syntax is known but whose client is not
//! built yet has `open: None`: its names parse fully (so mistakes are reported as
//! such) and opening one fails with [`SpecError::UnknownProtocol`], as QEMU words it
//! when a protocol module is missing.

use super::options::{Node, SpecError};
use super::{blkdebug, file, http, nbd, s3, AioMode, CacheMode, LockMode, Storage, StorageResult};
use std::sync::Arc;

/// What a protocol's open function is given besides its node.
#[derive(Clone, Copy, Debug)]
pub struct ProtocolOpen {
    /// Open without write access.
    pub read_only: bool,
    /// Host cache mode (after the node's own `cache.*` options).
    pub cache: CacheMode,
    /// Image locks to take now (protocols without locks ignore it).
    pub lock: LockMode,
    /// AIO mode of host files, unless the node's own `aio` key names one.
    pub aio: AioMode,
}

/// Turns a filename that starts with one of a protocol's schemes into the options of
/// its node (everything but `driver`, which the caller sets).
pub type ParseFn = fn(filename: &str, node: &mut Node) -> Result<(), SpecError>;

/// Opens a protocol node (its `driver` and the `cache.*` keys already taken; every key
/// left was declared in [`Protocol::options`]). A key it does not consume is reported.
pub type OpenFn = fn(node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>>;

/// A storage protocol.
#[derive(Debug)]
pub struct Protocol {
    /// The `driver` name (`file`, `nbd`, `https`).
    pub name: &'static str,
    /// Filename prefixes (before the first `:`) this protocol claims.
    pub schemes: &'static [&'static str],
    /// Option keys (dotted, relative to the node) the node accepts besides `driver`
    /// and the generic `cache.direct` / `cache.no-flush`; `child.*` accepts every key
    /// below `child` (a child node or rule list the protocol checks itself).
    pub options: &'static [&'static str],
    /// Filename → options.
    pub parse_filename: ParseFn,
    /// Options → storage; `None` while the protocol's client is not built.
    pub open: Option<OpenFn>,
}

/// Every protocol vdisk knows, openable or not. One line per protocol.
pub static PROTOCOLS: &[&Protocol] = &[
    &file::PROTOCOL,
    &file::HOST_DEVICE,
    &nbd::PROTOCOL,
    &http::HTTP,
    &http::HTTPS,
    &blkdebug::PROTOCOL,
    &s3::PROTOCOL,
];

/// Options every node takes (QEMU's generic block options vdisk implements).
pub const COMMON_OPTIONS: &[&str] = &["driver", "cache.direct", "cache.no-flush"];

/// The protocol whose `driver` name is `name`.
pub fn by_name(name: &str) -> Option<&'static Protocol> {
    PROTOCOLS.iter().copied().find(|p| p.name == name)
}

/// The protocol claiming filename prefix `scheme` (case-sensitive, as QEMU).
pub fn by_scheme(scheme: &str) -> Option<&'static Protocol> {
    PROTOCOLS
        .iter()
        .copied()
        .find(|p| p.schemes.contains(&scheme))
}

/// QEMU's `path_has_protocol`: the prefix before the first `:` when no `/` comes
/// before it (`nbd://h/x` → `nbd`; `./a:b` and `/x/a:b` are plain paths).
pub fn protocol_prefix(filename: &str) -> Option<&str> {
    let i = filename.find([':', '/'])?;
    (filename.as_bytes()[i] == b':').then(|| &filename[..i])
}

/// Whether `proto` declares `key` (exactly, or below a `child.*` entry).
fn declared(proto: &Protocol, key: &str) -> bool {
    proto.options.iter().any(|o| match o.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => *o == key,
    })
}

/// Applies a node's `cache.direct` / `cache.no-flush` to the mode it inherits.
pub fn cache_options(node: &mut Node, inherited: CacheMode) -> Result<CacheMode, SpecError> {
    let direct = node
        .take_bool("cache.direct")?
        .unwrap_or(inherited.direct());
    let no_flush = node
        .take_bool("cache.no-flush")?
        .unwrap_or(inherited.ignore_flush());
    let wt = inherited.write_through();
    Ok(match (direct, no_flush, wt) {
        (false, false, false) => CacheMode::Writeback,
        (false, false, true) => CacheMode::Writethrough,
        (true, false, false) => CacheMode::None,
        (true, false, true) => CacheMode::Directsync,
        (false, true, _) => CacheMode::Unsafe,
        (true, true, _) => {
            return Err(SpecError::Value {
                key: node.key_path("cache.no-flush"),
                expected: "'off' when cache.direct is on (vdisk has no uncached unsafe mode)"
                    .into(),
            })
        }
    })
}

/// Opens a protocol node: finds the protocol by `driver` (the `file` protocol when a
/// node has only a `filename`, as QEMU), checks its keys, applies `cache.*`, opens.
pub fn open(node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>> {
    open_by(node, ctx, |p| p.open)
}

/// [`open`] with the open function `pick` chooses for the protocol (`None`: it
/// cannot, [`SpecError::UnknownProtocol`]).
fn open_by(
    mut node: Node,
    ctx: &ProtocolOpen,
    pick: impl FnOnce(&Protocol) -> Option<OpenFn>,
) -> StorageResult<Arc<dyn Storage>> {
    let driver = match node.take_str("driver")? {
        Some(d) => d,
        None if node.contains("filename") => file::PROTOCOL.name.to_string(),
        None => return Err(SpecError::Missing("Must specify either driver or file".into()).into()),
    };
    let proto = by_name(&driver).ok_or_else(|| SpecError::UnknownProtocol(driver.clone()))?;
    node.check_keys(
        |k| declared(proto, k) || COMMON_OPTIONS.contains(&k),
        |key| SpecError::ProtocolOption {
            protocol: proto.name.into(),
            key,
        },
    )?;
    let cache = cache_options(&mut node, ctx.cache)?;
    let open = pick(proto).ok_or_else(|| SpecError::UnknownProtocol(proto.name.into()))?;
    open(node, &ProtocolOpen { cache, ..*ctx })
}

/// Protocols (other than host files) that can hold a new image: each opens a node as
/// empty, writable storage for `create`/`convert` to format.
static CREATE: &[(&str, OpenFn)] = &[(s3::PROTOCOL.name, s3::create)];

/// Whether a new image can be created on the protocol named `driver` (host files
/// are created by the image layer itself).
pub fn can_create(driver: &str) -> bool {
    CREATE.iter().any(|(n, _)| *n == driver)
}

/// Opens a protocol node as empty, writable storage for a new image (a protocol for
/// which [`can_create`] is true; else [`SpecError::UnknownProtocol`]).
pub fn open_new(node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>> {
    open_by(node, ctx, |p| {
        CREATE.iter().find(|(n, _)| *n == p.name).map(|(_, f)| *f)
    })
}

/// The host file a protocol node names, when it is the `file` protocol: the chain
/// uses it to detect loops and to resolve nothing else.
pub fn local_file(node: &Node) -> Option<&str> {
    let is_file = match node.get("driver") {
        // A filter (blkdebug) stands for the file of its `image` child.
        Some(super::options::Value::Str(d)) if d == blkdebug::PROTOCOL.name => {
            return match node.get("image") {
                Some(super::options::Value::Node(n)) => local_file(n),
                _ => None,
            };
        }
        None => true,
        Some(super::options::Value::Str(d)) => {
            d == file::PROTOCOL.name || d == file::HOST_DEVICE.name
        }
        Some(_) => false,
    };
    match node.get("filename") {
        Some(super::options::Value::Str(f)) if is_file => Some(f),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_follow_qemu() {
        assert_eq!(protocol_prefix("nbd://h/x"), Some("nbd"));
        assert_eq!(protocol_prefix("nbd+unix:///x?socket=s"), Some("nbd+unix"));
        assert_eq!(protocol_prefix("file:a"), Some("file"));
        assert_eq!(protocol_prefix("a:b"), Some("a"));
        assert_eq!(protocol_prefix("./a:b"), None);
        assert_eq!(protocol_prefix("/x/a:b"), None);
        assert_eq!(protocol_prefix("plain.qcow2"), None);
    }

    #[test]
    fn every_scheme_is_claimed_once_and_names_are_unique() {
        let mut seen = Vec::new();
        for p in PROTOCOLS {
            assert!(!seen.contains(&p.name), "{}", p.name);
            seen.push(p.name);
            for s in p.schemes {
                assert_eq!(by_scheme(s).map(|q| q.name), Some(p.name));
            }
        }
    }

    #[test]
    fn unknown_protocols_and_options_fail_by_name() {
        let mut n = Node::new();
        n.insert_str("driver", "http").unwrap();
        let ctx = ProtocolOpen {
            read_only: true,
            cache: CacheMode::Writeback,
            lock: LockMode::Off,
            aio: AioMode::Threads,
        };
        let mut u = Node::new();
        u.insert_str("driver", "gluster").unwrap();
        let e = open(u, &ctx).unwrap_err();
        assert_eq!(e.to_string(), "Unknown protocol 'gluster'");
        n.insert_str("bogus", "1").unwrap();
        let e = open(n, &ctx).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Block protocol 'http' doesn't support the option 'bogus'"
        );
    }

    #[test]
    fn cache_options_combine_with_the_inherited_mode() {
        let mut n = Node::new();
        n.insert("cache.direct", crate::storage::options::Value::Bool(true))
            .unwrap();
        assert_eq!(
            cache_options(&mut n, CacheMode::Writethrough),
            Ok(CacheMode::Directsync)
        );
        assert!(n.is_empty());
        let mut n = Node::new();
        n.insert_str("cache.no-flush", "on").unwrap();
        assert_eq!(
            cache_options(&mut n, CacheMode::Writeback),
            Ok(CacheMode::Unsafe)
        );
        let mut n = Node::new();
        n.insert_str("cache.no-flush", "on").unwrap();
        assert!(cache_options(&mut n, CacheMode::None).is_err());
    }
}
