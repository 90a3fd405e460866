//! Errors of the format, chain and image layers.
//!
//! Storage has its own error type ([`crate::storage::StorageError`]); it converts into
//! [`Error::Storage`] so callers see one type at the image API.

use crate::storage::StorageError;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong opening or using an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host file failed (I/O error, lock conflict...).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The image's metadata violates the format: the message names the structure,
    /// entry and offset.
    #[error("{0}")]
    Corrupt(String),
    /// A valid image uses a feature this engine does not implement (e.g. encryption).
    #[error("{0}")]
    Unsupported(String),
    /// A caller passed a bad argument (option value, offset past the end, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A write was attempted on an image opened read-only.
    #[error("image is read-only")]
    ReadOnly,
    /// A backing chain names a file twice.
    #[error("backing chain loop: {0}")]
    BackingLoop(String),
    /// The disk image no longer has room (e.g. format size limits).
    #[error("{0}")]
    NoSpace(String),
}

impl Error {
    /// Shorthand for [`Error::Corrupt`].
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
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

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(StorageError::Io {
            context: String::new(),
            source: e,
        })
    }
}
