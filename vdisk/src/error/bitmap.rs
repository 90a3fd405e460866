//! Errors of persistent dirty bitmap operations (`vdisk bitmap`, the library API),
//! worded as qemu-img words them.

use std::fmt;

/// A refused bitmap operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapError {
    /// No bitmap has this name.
    NotFound(String),
    /// A bitmap with this name exists already.
    Exists(String),
    /// The name is empty.
    EmptyName,
    /// The name is longer than 1023 bytes.
    NameTooLong(String),
    /// The granularity is not a power of two of at least 512 bytes (or above 2 GiB).
    Granularity(u64),
    /// The bitmap is marked in use by a writer that did not close the image: its
    /// contents are inconsistent and it can only be removed.
    Inconsistent(String),
    /// The bitmap has extra data this engine does not understand: it is kept as is.
    Unknown(String),
    /// qcow2 version 2 images cannot hold bitmaps.
    V2Image(String),
    /// The format stores no persistent bitmaps.
    NotSupported(&'static str),
    /// The image holds the most bitmaps a qcow2 directory may hold.
    TooMany,
    /// The bitmap's data would exceed the size limit (bytes of bit data, limit).
    TooLarge {
        /// The bitmap.
        name: String,
        /// Bytes its data needs.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// A resize is refused while an inconsistent bitmap exists.
    ResizeInconsistent(String),
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitmapError::NotFound(n) => write!(f, "Dirty bitmap '{n}' not found"),
            BitmapError::Exists(n) => write!(f, "Bitmap already exists: {n}"),
            BitmapError::EmptyName => write!(f, "Bitmap name cannot be empty"),
            BitmapError::NameTooLong(n) => write!(
                f,
                "Can't make bitmap '{n}' persistent: Name length exceeds maximum (1023 characters)"
            ),
            BitmapError::Granularity(_) => {
                write!(f, "Granularity must be power of 2 and at least 512")
            }
            BitmapError::Inconsistent(n) => write!(
                f,
                "Bitmap '{n}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
            ),
            BitmapError::Unknown(n) => write!(
                f,
                "Bitmap '{n}' has unknown extra data and cannot be modified"
            ),
            BitmapError::V2Image(n) => write!(
                f,
                "Can't make bitmap '{n}' persistent: Cannot store dirty bitmaps in qcow2 v2 files"
            ),
            BitmapError::NotSupported(fmt) => write!(
                f,
                "Can't store persistent bitmaps to {fmt}: Operation not supported"
            ),
            BitmapError::TooMany => write!(
                f,
                "Can't make bitmap persistent: Maximum number of persistent bitmaps is already reached"
            ),
            BitmapError::TooLarge { name, bytes, max } => write!(
                f,
                "Bitmap '{name}' is too large: {bytes} bytes of data (max {max})"
            ),
            BitmapError::ResizeInconsistent(n) => write!(
                f,
                "Cannot resize qcow2 image with inconsistent persistent bitmap '{n}'"
            ),
        }
    }
}

impl BitmapError {
    /// The errno a front-end reports.
    pub fn errno(&self) -> i32 {
        match self {
            BitmapError::NotFound(_) => libc::ENOENT,
            BitmapError::Exists(_) => libc::EEXIST,
            BitmapError::NotSupported(_) | BitmapError::V2Image(_) => libc::ENOTSUP,
            BitmapError::TooMany | BitmapError::TooLarge { .. } => libc::ENOSPC,
            BitmapError::Inconsistent(_) | BitmapError::Unknown(_) => libc::EBUSY,
            _ => libc::EINVAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_wording() {
        assert_eq!(
            BitmapError::NotFound("b".into()).to_string(),
            "Dirty bitmap 'b' not found"
        );
        assert_eq!(
            BitmapError::Exists("b1".into()).to_string(),
            "Bitmap already exists: b1"
        );
        assert_eq!(
            BitmapError::Granularity(3000).to_string(),
            "Granularity must be power of 2 and at least 512"
        );
        assert_eq!(BitmapError::NotFound("x".into()).errno(), libc::ENOENT);
    }
}
