//! Errors of the storage layer: the operation, the file and the offset as fields.

use std::fmt;

/// What a storage call was doing when it failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageOp {
    /// Opening (or creating) the file.
    Open,
    /// Truncating or extending it.
    Truncate,
    /// Reading.
    Read,
    /// Writing.
    Write,
    /// Flushing.
    Flush,
    /// Querying its size.
    Stat,
    /// Deallocating a range.
    PunchHole,
    /// Writing zeroes.
    WriteZeroes,
    /// Reserving space.
    Allocate,
    /// Looking for data or holes.
    SeekData,
    /// Taking the image locks.
    Lock,
    /// Dropping the image locks.
    Unlock,
    /// Not recorded (an `std::io::Error` converted without context).
    Unspecified,
}

impl StorageOp {
    /// The words QEMU (and our messages) start with for this operation.
    fn verb(&self) -> &str {
        match self {
            StorageOp::Open => "Could not open",
            StorageOp::Truncate => "Could not truncate",
            StorageOp::Read => "Could not read",
            StorageOp::Write => "Could not write",
            StorageOp::Flush => "Could not flush",
            StorageOp::Stat => "Could not stat",
            StorageOp::PunchHole => "Could not punch hole in",
            StorageOp::WriteZeroes => "Could not write zeroes to",
            StorageOp::Allocate => "Could not allocate space in",
            StorageOp::SeekData => "Could not seek data in",
            StorageOp::Lock => "Failed to lock",
            StorageOp::Unlock => "Failed to unlock image",
            StorageOp::Unspecified => "",
        }
    }
}

/// Another process holds a lock this open needs (QEMU's image locking).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockConflict {
    /// The permission (`write`, `consistent read`, ...).
    pub perm: &'static str,
    /// Whether it is the "shared" lock (we refuse to share what another holds) rather
    /// than the permission itself.
    pub shared: bool,
    /// The file, as named in the message.
    pub path: String,
}

impl fmt::Display for LockConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Failed to get {}\"{}\" lock\nIs another process using the image [{}]?",
            if self.shared { "shared " } else { "" },
            self.perm,
            self.path
        )
    }
}

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call failed.
    #[error("{}", IoDisplay { op, path, offset, source })]
    Io {
        /// What was being done.
        op: StorageOp,
        /// The file, when known.
        path: Option<String>,
        /// The offset of the failed access, when there is one.
        offset: Option<u64>,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds a conflicting image lock (the message matches QEMU's).
    #[error("{0}")]
    Locked(LockConflict),
    /// An image name or options tree is malformed, or names what cannot be opened.
    #[error(transparent)]
    Spec(#[from] super::options::SpecError),
}

/// Renders an I/O failure: `<verb> '<path>' at offset <n>: <error>`.
struct IoDisplay<'a> {
    op: &'a StorageOp,
    path: &'a Option<String>,
    offset: &'a Option<u64>,
    source: &'a std::io::Error,
}

impl fmt::Display for IoDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = self.op.verb();
        f.write_str(verb)?;
        if let Some(p) = self.path {
            write!(f, " '{p}'")?;
        }
        if let Some(o) = self.offset {
            write!(f, " at offset {o}")?;
        }
        if !verb.is_empty() || self.path.is_some() {
            f.write_str(": ")?;
        }
        write!(f, "{}", self.source)
    }
}

impl StorageError {
    /// An I/O failure of `op` on `path` (at `offset`).
    pub fn op(
        op: StorageOp,
        path: impl Into<String>,
        offset: Option<u64>,
        source: std::io::Error,
    ) -> Self {
        StorageError::Io {
            op,
            path: Some(path.into()),
            offset,
            source,
        }
    }
    /// The errno of the failure, EIO when unknown.
    pub fn errno(&self) -> i32 {
        match self {
            StorageError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            StorageError::Locked(_) => libc::EAGAIN,
            StorageError::Spec(_) => libc::EINVAL,
        }
    }
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io {
            op: StorageOp::Unspecified,
            path: None,
            offset: None,
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enoent() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOENT)
    }

    #[test]
    fn io_wording() {
        let e = StorageError::op(StorageOp::Open, "a.qcow2", None, enoent());
        assert!(e
            .to_string()
            .starts_with("Could not open 'a.qcow2': No such file or directory"));
        let e = StorageError::op(StorageOp::PunchHole, "a", Some(512), enoent());
        assert!(e
            .to_string()
            .starts_with("Could not punch hole in 'a' at offset 512: No such"));
        let e = StorageError::Io {
            op: StorageOp::Unlock,
            path: None,
            offset: None,
            source: enoent(),
        };
        assert!(e.to_string().starts_with("Failed to unlock image: No such"));
        let e = StorageError::from(enoent());
        assert!(e.to_string().starts_with("No such file"));
        assert_eq!(e.errno(), libc::ENOENT);
    }

    #[test]
    fn lock_wording() {
        let e = StorageError::Locked(LockConflict {
            perm: "write",
            shared: true,
            path: "V.qcow2".into(),
        });
        assert_eq!(
            e.to_string(),
            "Failed to get shared \"write\" lock\nIs another process using the image [V.qcow2]?"
        );
        assert_eq!(e.errno(), libc::EAGAIN);
    }
}
