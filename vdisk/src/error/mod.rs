//! Errors of the format, chain and image layers.
//!
//! Storage has its own error type ([`crate::storage::StorageError`]); it converts into
//! [`Error::Storage`] so callers see one type at the image API.
//!
//! Errors are facts: a corruption names the [`Structure`], the entry index and the host
//! offset as fields and the [`Problem`] as an enum, so front-ends can act on them
//! (NBD errno, exit codes, JSON) without parsing text. `Display` renders the wording the
//! CLI prints (QEMU's where qemu-img prints one). Each kind keeps a string fallback
//! ([`Error::corrupt`], [`Error::invalid`], [`Error::unsupported`]) for call sites that
//! have not been given a typed variant yet.

mod corruption;
mod reasons;

pub use corruption::{Corruption, Field, Problem, Structure};
pub use reasons::{Invalid, NoSpace, Unsupported, V3Feature};

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
    BackingLoop(String),
    /// The disk image no longer has room (e.g. format size limits).
    #[error("{0}")]
    NoSpace(NoSpace),
}

impl Error {
    /// A corruption described only by a message (fallback for unconverted call sites).
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(Corruption::other(msg))
    }
    /// An invalid argument described only by a message.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(Invalid::Other(msg.into()))
    }
    /// An unsupported feature described only by a message.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(Unsupported::Other(msg.into()))
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
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly => libc::EPERM,
            Error::BackingLoop(_) => libc::ELOOP,
            Error::NoSpace(_) => libc::ENOSPC,
        }
    }
}

impl From<Corruption> for Error {
    fn from(c: Corruption) -> Self {
        Error::Corrupt(c)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallbacks_keep_the_message() {
        assert_eq!(
            Error::corrupt("L2 table at 0x0 bad").to_string(),
            "L2 table at 0x0 bad"
        );
        assert_eq!(Error::invalid("bad").to_string(), "bad");
        assert_eq!(Error::unsupported("nope").to_string(), "nope");
        assert_eq!(Error::NoSpace("full".into()).to_string(), "full");
        assert!(matches!(
            Error::corrupt("x").corruption(),
            Some(Corruption {
                problem: Problem::Detail(_),
                ..
            })
        ));
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(Error::corrupt("x").errno(), libc::EIO);
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
        assert_eq!(Error::BackingLoop("a".into()).errno(), libc::ELOOP);
        assert_eq!(Error::from(NoSpace::RefcountBlock).errno(), libc::ENOSPC);
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(Error::from(io).errno(), libc::ENOENT);
    }
}
