//! Why an internal snapshot operation was refused (qcow2 `snapshot -c/-a/-d`).

use std::fmt;

/// Why an internal snapshot operation was refused. `Display` renders what QEMU's block
/// layer says; [`SnapshotError::errno`] is the errno qemu-img turns into its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotError {
    /// The format has no internal snapshots (raw, QED).
    NotSupported,
    /// No snapshot has this ID or name.
    NotFound(String),
    /// A snapshot with this ID exists already.
    IdExists(String),
    /// The table holds the most snapshots QEMU opens.
    TooMany(u32),
    /// Taking the snapshot would raise a refcount past the image's refcount width.
    RefcountOverflow {
        /// Host cluster whose refcount would overflow.
        cluster: u64,
        /// Largest refcount of the image.
        max: u64,
    },
    /// An ID or name longer than the table can hold (65535 bytes).
    TooLong(usize),
    /// Loading a snapshot for reading (`convert -l`): none matches.
    NotFoundForLoad,
    /// Loading a snapshot for reading needs an image opened read-only.
    NotReadOnly,
}

impl SnapshotError {
    /// The errno QEMU returns for this refusal.
    pub fn errno(&self) -> i32 {
        match self {
            SnapshotError::NotSupported => libc::ENOTSUP,
            SnapshotError::NotFound(_) => libc::ENOENT,
            SnapshotError::IdExists(_) => libc::EEXIST,
            SnapshotError::TooMany(_) => libc::EFBIG,
            SnapshotError::RefcountOverflow { .. } => libc::EINVAL,
            SnapshotError::TooLong(_) => libc::EINVAL,
            SnapshotError::NotFoundForLoad => libc::ENOENT,
            SnapshotError::NotReadOnly => libc::EINVAL,
        }
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::NotSupported => write!(f, "Block driver does not support snapshots"),
            SnapshotError::NotFound(_) => write!(f, "Can't find the snapshot"),
            SnapshotError::IdExists(id) => write!(f, "Snapshot ID '{id}' already exists"),
            SnapshotError::TooMany(n) => write!(f, "Too many snapshots (at most {n})"),
            SnapshotError::RefcountOverflow { cluster, max } => write!(
                f,
                "Refcount of cluster {cluster} would exceed the maximum of {max}"
            ),
            SnapshotError::NotFoundForLoad => write!(f, "Can't find snapshot"),
            SnapshotError::NotReadOnly => write!(f, "Device is not readonly"),
            SnapshotError::TooLong(n) => {
                write!(f, "Snapshot ID or name too long ({n} bytes, at most 65535)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wording_and_errno() {
        let e = SnapshotError::NotSupported;
        assert_eq!(e.to_string(), "Block driver does not support snapshots");
        assert_eq!(e.errno(), libc::ENOTSUP);
        let e = SnapshotError::NotFound("x".into());
        assert_eq!(e.to_string(), "Can't find the snapshot");
        assert_eq!(e.errno(), libc::ENOENT);
        assert_eq!(SnapshotError::TooMany(65536).errno(), libc::EFBIG);
        assert_eq!(SnapshotError::IdExists("1".into()).errno(), libc::EEXIST);
        let e = SnapshotError::RefcountOverflow { cluster: 3, max: 1 };
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("cluster 3"));
    }
}
