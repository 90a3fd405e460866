//! Errors of the format, chain and image layers.
//!
//! Storage has its own error type ([`crate::storage::StorageError`]); it converts into
//! [`Error::Storage`] so callers see one type at the image API.
//!
//! Errors are facts: a corruption names the [`Structure`], the entry index and the host
//! offset as fields and the [`Problem`] as an enum, so front-ends can act on them
//! (NBD errno, exit codes, JSON) without parsing text. `Display` renders the wording the
//! CLI prints (QEMU's where qemu-img prints one). No variant holds a sentence: an error
//! that adds context to another ([`Error::Backing`]) holds the inner error and the
//! context as fields.

mod bitmap;
mod corruption;
mod reasons;
mod snapshot;
mod vhdx;
mod vmdk;

pub use bitmap::BitmapError;
pub use corruption::{Corruption, Field, Problem, Structure};
pub use reasons::{Invalid, NoSpace, Unsupported, V3Feature, ZeroLimit};
pub use snapshot::SnapshotError;
pub use vhdx::VhdxProblem;
pub use vmdk::VmdkProblem;

use std::fmt;

use crate::storage::StorageError;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong opening or using an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host file failed (I/O error, lock conflict...).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The image's metadata violates the format.
    #[error("{0}")]
    Corrupt(Corruption),
    /// A valid image (or a request) uses a feature this engine does not implement.
    #[error("{0}")]
    Unsupported(Unsupported),
    /// A caller passed a bad argument (option value, offset past the end, ...).
    #[error("{0}")]
    InvalidArgument(Invalid),
    /// A write was attempted on an image opened read-only.
    #[error("image is read-only")]
    ReadOnly,
    /// A backing chain names a file twice.
    #[error("backing chain loop: {0}")]
    BackingLoop(ChainLoop),
    /// The disk image no longer has room (e.g. format size limits).
    #[error("{0}")]
    NoSpace(NoSpace),
    /// A backing file of the chain could not be opened (or failed while opening).
    #[error("{context}: {source}")]
    Backing {
        /// Which step, of which file.
        context: BackingContext,
        /// What went wrong.
        source: Box<Error>,
    },
    /// Encryption: a missing or wrong key, a bad or hostile LUKS header.
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
    /// An internal snapshot operation was refused.
    #[error("{0}")]
    Snapshot(SnapshotError),
    /// A persistent dirty bitmap operation was refused.
    #[error("{0}")]
    Bitmap(BitmapError),
    /// The compression library failed to compress a cluster.
    #[error("{}: {source}", compress_verb(.zstd))]
    Compress {
        /// zstd (else deflate).
        zstd: bool,
        /// The library's error.
        source: std::io::Error,
    },
}

/// The words a compression failure starts with (as the messages always were).
fn compress_verb(zstd: &bool) -> &'static str {
    if *zstd {
        "zstd compression failed"
    } else {
        "deflate failed"
    }
}

/// A backing file that is its own backing file (directly or down the chain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainLoop {
    /// The backing file name as the image records it.
    pub name: String,
    /// The chain down to the repeated file (empty when not known).
    pub chain: Vec<String>,
}

impl fmt::Display for ChainLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' is its own backing file", self.name)?;
        if !self.chain.is_empty() {
            write!(f, " (chain: {})", self.chain.join(" -> "))?;
        }
        Ok(())
    }
}

/// What was being done with a backing file when it failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackingContext {
    /// Opening the backing file named by an image (name not yet resolved).
    Open,
    /// Opening the backing file at this path (image creation reads its size).
    OpenFile(String),
    /// Opening the backing chain below the image at this path.
    Image(String),
}

impl fmt::Display for BackingContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackingContext::Open => write!(f, "Could not open backing file"),
            BackingContext::OpenFile(p) => write!(f, "Could not open backing file '{p}'"),
            BackingContext::Image(p) => write!(f, "Could not open backing image '{p}'"),
        }
    }
}

impl Error {
    /// `source`, as it failed while opening a backing file (`context`).
    pub fn backing(context: BackingContext, source: Error) -> Self {
        Error::Backing {
            context,
            source: Box::new(source),
        }
    }
    /// The corruption this error reports, if it is one.
    pub fn corruption(&self) -> Option<&Corruption> {
        match self {
            Error::Corrupt(c) => Some(c),
            _ => None,
        }
    }
    /// An errno-like code for front-ends that speak POSIX errors (NBD, exit codes).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Storage(e) => e.errno(),
            Error::Corrupt(_) => libc::EIO,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::InvalidArgument(Invalid::VmStateTooLarge { .. }) => libc::EFBIG,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly => libc::EPERM,
            Error::BackingLoop(_) => libc::ELOOP,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::Backing { source, .. } => source.errno(),
            Error::Compress { .. } => libc::EINVAL,
            Error::Crypto(e) => e.errno(),
            Error::Snapshot(s) => s.errno(),
            Error::Bitmap(b) => b.errno(),
        }
    }
}

impl From<Corruption> for Error {
    fn from(c: Corruption) -> Self {
        Error::Corrupt(c)
    }
}

impl From<BitmapError> for Error {
    fn from(b: BitmapError) -> Self {
        Error::Bitmap(b)
    }
}

impl From<Invalid> for Error {
    fn from(i: Invalid) -> Self {
        Error::InvalidArgument(i)
    }
}

impl From<Unsupported> for Error {
    fn from(u: Unsupported) -> Self {
        Error::Unsupported(u)
    }
}

impl From<SnapshotError> for Error {
    fn from(s: SnapshotError) -> Self {
        Error::Snapshot(s)
    }
}

impl From<NoSpace> for Error {
    fn from(n: NoSpace) -> Self {
        Error::NoSpace(n)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(StorageError::from(e))
    }
}

/// Removes Rust's ` (os error N)` suffixes from a rendered message, so front-ends print
/// errors the way QEMU's tools print `strerror` text.
pub fn strip_os_error(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(" (os error ") {
        let tail = &rest[i + " (os error ".len()..];
        let digits = tail.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 && tail.as_bytes().get(digits) == Some(&b')') {
            out.push_str(&rest[..i]);
            rest = &tail[digits + 1..];
        } else {
            out.push_str(&rest[..i + 1]);
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_wraps_the_inner_error() {
        let inner = Error::from(Invalid::UnknownDriver("foo".into()));
        let e = Error::backing(BackingContext::Open, inner);
        assert_eq!(
            e.to_string(),
            "Could not open backing file: Unknown driver 'foo'"
        );
        assert_eq!(e.errno(), libc::EINVAL);
        let io = Error::from(std::io::Error::from_raw_os_error(libc::ENOENT));
        let e = Error::backing(BackingContext::Image("b.qcow2".into()), io);
        assert!(e
            .to_string()
            .starts_with("Could not open backing image 'b.qcow2': No such file"));
        assert_eq!(e.errno(), libc::ENOENT);
        let e = Error::backing(
            BackingContext::OpenFile("b".into()),
            Error::from(Invalid::NeedsSize),
        );
        assert_eq!(
            e.to_string(),
            "Could not open backing file 'b': Image creation needs a size parameter"
        );
        let e = Error::Compress {
            zstd: true,
            source: std::io::Error::other("boom"),
        };
        assert_eq!(e.to_string(), "zstd compression failed: boom");
        assert_eq!(e.errno(), libc::EINVAL);
    }

    #[test]
    fn loop_wording() {
        let l = ChainLoop {
            name: "a".into(),
            chain: vec!["x".into(), "y".into(), "x".into()],
        };
        assert_eq!(
            Error::BackingLoop(l).to_string(),
            "backing chain loop: 'a' is its own backing file (chain: x -> y -> x)"
        );
        let l = ChainLoop {
            name: "a".into(),
            chain: Vec::new(),
        };
        assert_eq!(
            Error::BackingLoop(l).to_string(),
            "backing chain loop: 'a' is its own backing file"
        );
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            Error::from(Corruption::new(Structure::L2Table, Problem::Unaligned)).errno(),
            libc::EIO
        );
        assert_eq!(
            Error::from(Unsupported::ExternalDataFile).errno(),
            libc::ENOTSUP
        );
        assert_eq!(Error::from(Invalid::ShrinkNeedsFlag).errno(), libc::EINVAL);
        assert_eq!(Error::ReadOnly.errno(), libc::EPERM);
        let l = ChainLoop {
            name: "a".into(),
            chain: Vec::new(),
        };
        assert_eq!(Error::BackingLoop(l).errno(), libc::ELOOP);
        assert_eq!(Error::from(NoSpace::RefcountBlock).errno(), libc::ENOSPC);
        assert_eq!(Error::from(NoSpace::Clusters).errno(), libc::ENOSPC);
        assert_eq!(
            Error::from(Unsupported::ZeroesNeedData(ZeroLimit::QedPartialCluster)).errno(),
            libc::ENOTSUP
        );
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(Error::from(io).errno(), libc::ENOENT);
    }
}
