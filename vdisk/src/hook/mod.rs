//! Write hooks: code that sees every change [`crate::Image`] makes to the guest disk.
//!
//! `Image` is the only door for guest writes and metadata changes, so anything that must
//! see them all — zero detection, dirty bitmaps, encryption, write notifiers for NBD or
//! vhost-user exports — registers one [`WriteHook`] and never touches a front-end.
//!
//! A request goes through the hooks in registration order before it reaches the format
//! driver ([`WriteHook::before`]: a hook may rewrite it or refuse it), and after the
//! driver returns, through every hook again ([`WriteHook::after`]) with the range that
//! changed and whether the driver succeeded. Reads go through [`WriteHook::after_read`]
//! once the driver has filled the buffer (decryption). [`WriteHook::flush`] and
//! [`WriteHook::close`] run before the driver's own flush and close, so what a hook
//! writes back (a bitmap) is made durable by the same flush.
//!
//! Cost: the hook list is fixed when the image is opened (an immutable `Vec`); with no
//! hook, every I/O method tests `is_empty()` and calls the driver directly — no
//! allocation, no lock, no indirect call.
//!
//! Adding a hook: implement [`WriteHook`] (override only what you need), then pass it in
//! [`crate::OpenOptions::hooks`] or call [`crate::Image::add_hook`] before sharing the
//! image. [`DetectZeroes`] is the worked example.
//!
//! Layering: hooks live at the image layer; the format layer never sees this trait. A
//! hook that keeps a format's own metadata (qcow2 persistent dirty bitmaps) is built
//! here, above the driver, from what the driver exposes, and `Image::open` registers it
//! the way front-ends register theirs.

mod detect_zeroes;
mod dirty_bitmap;

pub use detect_zeroes::{DetectZeroes, DetectZeroesMode};
pub use dirty_bitmap::DirtyBitmapHook;

use crate::error::Result;
use crate::format::ZeroFlags;
use std::borrow::Cow;

/// The bytes of a data write as hooks see them: the caller's buffer until a hook
/// replaces it (an encrypting hook hands on its ciphertext without touching the
/// caller's memory). Hooks use its methods, not its representation, so a vectored
/// write (a list of `IoSlice`s) is carried without gathering it: the slices are only
/// copied into one buffer if a hook asks for [`Payload::bytes`] or changes them, and
/// otherwise reach the driver as they came (hooks that only look at the range, like
/// dirty bitmaps, cost no copy).
#[derive(Debug)]
pub struct Payload<'a> {
    repr: Repr<'a>,
    /// The slices gathered, once a hook asked for the bytes.
    gathered: std::cell::OnceCell<Vec<u8>>,
}

#[derive(Debug)]
enum Repr<'a> {
    Bytes(Cow<'a, [u8]>),
    Slices(&'a [std::io::IoSlice<'a>], usize),
}

fn gather_slices(bufs: &[std::io::IoSlice<'_>]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
    bufs.iter().for_each(|b| v.extend_from_slice(b));
    v
}

impl<'a> Payload<'a> {
    fn of(repr: Repr<'a>) -> Payload<'a> {
        Payload {
            repr,
            gathered: std::cell::OnceCell::new(),
        }
    }
    /// Wraps the caller's buffer.
    pub fn borrowed(buf: &'a [u8]) -> Payload<'a> {
        Payload::of(Repr::Bytes(Cow::Borrowed(buf)))
    }
    /// Wraps the caller's slices of a vectored write, without copying them.
    pub fn vectored(bufs: &'a [std::io::IoSlice<'a>]) -> Payload<'a> {
        let len = bufs.iter().map(|b| b.len()).sum();
        Payload::of(Repr::Slices(bufs, len))
    }
    /// Gathers a vectored write into one owned buffer.
    pub fn gather(bufs: &[std::io::IoSlice<'_>]) -> Payload<'static> {
        Payload::of(Repr::Bytes(Cow::Owned(gather_slices(bufs))))
    }
    /// The bytes that will be written (a vectored write is gathered the first time).
    pub fn bytes(&self) -> &[u8] {
        match &self.repr {
            Repr::Bytes(c) => c,
            Repr::Slices(s, _) => self.gathered.get_or_init(|| gather_slices(s)),
        }
    }
    /// The caller's slices, when the payload is still the vectored write it came as.
    pub fn slices(&self) -> Option<&[std::io::IoSlice<'a>]> {
        match &self.repr {
            Repr::Slices(s, _) => Some(s),
            Repr::Bytes(_) => None,
        }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Bytes(c) => c.len(),
            Repr::Slices(_, n) => *n,
        }
    }
    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        match &self.repr {
            Repr::Bytes(c) => is_zero(c),
            Repr::Slices(s, _) => s.iter().all(|b| is_zero(b)),
        }
    }
    /// Replaces the bytes (same length expected by the driver: the request's range is
    /// `offset..offset+len` of the new bytes).
    pub fn replace(&mut self, bytes: Vec<u8>) {
        self.repr = Repr::Bytes(Cow::Owned(bytes));
        self.gathered = std::cell::OnceCell::new();
    }
    /// The bytes for modification in place (copies the caller's buffer the first time).
    pub fn to_mut(&mut self) -> &mut Vec<u8> {
        if let Repr::Slices(s, _) = &self.repr {
            let v = self.gathered.take().unwrap_or_else(|| gather_slices(s));
            self.repr = Repr::Bytes(Cow::Owned(v));
        }
        match &mut self.repr {
            Repr::Bytes(c) => c.to_mut(),
            Repr::Slices(..) => unreachable!("converted above"),
        }
    }
}

/// A change to the guest disk on its way to the driver. Hooks may rewrite it in
/// [`WriteHook::before`] (turn a data write into a zero write, replace the bytes).
#[derive(Debug)]
pub enum Request<'a> {
    /// Write guest bytes at `offset`.
    Write {
        /// Guest offset.
        offset: u64,
        /// The bytes.
        data: Payload<'a>,
    },
    /// Make `[offset, offset+len)` read as zeroes.
    Zeroes {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Whether the range may be deallocated, and whether only a fast way is allowed.
        flags: ZeroFlags,
    },
    /// Discard `[offset, offset+len)`.
    Discard {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Write one cluster compressed.
    Compressed {
        /// Guest offset (cluster-aligned).
        offset: u64,
        /// The uncompressed bytes.
        data: Payload<'a>,
    },
    /// Change the guest size.
    Resize {
        /// Size before.
        old_size: u64,
        /// Size asked for.
        new_size: u64,
        /// Shrinking allowed.
        shrink: bool,
    },
}

impl Request<'_> {
    /// What the request will change once done, for [`WriteHook::after`].
    pub fn change(&self) -> Change {
        match self {
            Request::Write { offset, data } => Change::Write {
                offset: *offset,
                len: data.len() as u64,
            },
            Request::Zeroes { offset, len, flags } => Change::Zeroes {
                offset: *offset,
                len: *len,
                may_unmap: flags.may_unmap,
            },
            Request::Discard { offset, len } => Change::Discard {
                offset: *offset,
                len: *len,
            },
            Request::Compressed { offset, data } => Change::Compressed {
                offset: *offset,
                len: data.len() as u64,
            },
            Request::Resize {
                old_size, new_size, ..
            } => Change::Resize {
                old_size: *old_size,
                new_size: *new_size,
            },
        }
    }
}

/// What a request changed (or tried to change), as [`WriteHook::after`] is told: the
/// request's final form, after every hook's rewrite, without its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Bytes written.
    Write {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Range made to read as zeroes.
    Zeroes {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The range may have been deallocated.
        may_unmap: bool,
    },
    /// Range discarded.
    Discard {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// One cluster written compressed.
    Compressed {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Guest size changed.
    Resize {
        /// Size before.
        old_size: u64,
        /// Size after.
        new_size: u64,
    },
}

impl Change {
    /// The guest range whose contents changed: `(offset, len)`. For a resize, the range
    /// between the old and the new size (dropped when shrinking, new zeroes when
    /// growing).
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Change::Write { offset, len }
            | Change::Zeroes { offset, len, .. }
            | Change::Discard { offset, len }
            | Change::Compressed { offset, len } => (offset, len),
            Change::Resize { old_size, new_size } => {
                (old_size.min(new_size), old_size.abs_diff(new_size))
            }
        }
    }
}

/// Code that sees every guest write, zero write, discard, compressed write and resize
/// of an [`crate::Image`], and every read. Every method has a default that does
/// nothing, so a hook overrides only what it needs:
///
/// - zero detection and encryption rewrite requests in [`WriteHook::before`]
///   (encryption also decrypts in [`WriteHook::after_read`]);
/// - dirty bitmaps mark [`Change::range`] in [`WriteHook::after`] (also when the driver
///   failed: a failed write may have changed part of its range) and write themselves
///   back in [`WriteHook::flush`] / [`WriteHook::close`];
/// - write notifiers (NBD, vhost-user) act in [`WriteHook::after`] when `ok`.
///
/// Hooks are called from every thread doing I/O on the image, concurrently: keep state
/// behind fine-grained locks or atomics, never a lock held across the driver call.
pub trait WriteHook: Send + Sync + std::fmt::Debug {
    /// Called before the request reaches the driver, in registration order; the request
    /// may be rewritten (what later hooks and the driver see) or refused with an error
    /// (the driver is then not called, and no hook's `after` runs).
    fn before(&self, _req: &mut Request<'_>) -> Result<()> {
        Ok(())
    }
    /// Called after the driver returned, in registration order, with what the request
    /// changed in its final form; `ok` is whether the driver succeeded.
    fn after(&self, _change: &Change, _ok: bool) {}
    /// Called after the driver filled `buf` from guest `offset` (in reverse registration
    /// order, so a hook undoes its own transformation after later ones undid theirs).
    fn after_read(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Ok(())
    }
    /// Whether the hook only notes the ranges of changes (a dirty bitmap): it never
    /// looks at nor changes the bytes of a write or a read, and does nothing in
    /// `after_read`. Only then may a front-end transfer the bytes itself
    /// ([`crate::Image::direct`]), with [`WriteHook::before_direct_write`] run before its
    /// write and `after` once the write completed. The default is false.
    fn range_only(&self) -> bool {
        false
    }
    /// A range-only hook's `before` for a write of `[offset, offset + len)` whose bytes
    /// the front-end transfers itself; an error keeps the write on the ordinary path.
    fn before_direct_write(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// Called before the driver flushes (write back what must be durable with it).
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// Called once before the driver closes.
    fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Whether every byte of `buf` is zero (compares 16-byte words; vectorises well).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let body_zero = words
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0);
    body_zero && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_range_covers_the_difference() {
        let grow = Change::Resize {
            old_size: 10,
            new_size: 30,
        };
        assert_eq!(grow.range(), (10, 20));
        let shrink = Change::Resize {
            old_size: 30,
            new_size: 10,
        };
        assert_eq!(shrink.range(), (10, 20));
    }

    #[test]
    fn payload_replacement_keeps_the_caller_buffer() {
        let caller = [1u8, 2, 3];
        let mut p = Payload::borrowed(&caller);
        p.to_mut()[0] = 9;
        assert_eq!(p.bytes(), &[9, 2, 3]);
        assert_eq!(caller, [1, 2, 3]);
        assert!(!p.is_zero());
        p.replace(vec![0; 3]);
        assert!(p.is_zero());
        let (a, b) = ([1u8, 2], [3u8]);
        let g = Payload::gather(&[std::io::IoSlice::new(&a), std::io::IoSlice::new(&b)]);
        assert_eq!(g.bytes(), &[1, 2, 3]);
        let sl = [std::io::IoSlice::new(&a), std::io::IoSlice::new(&b)];
        let mut v = Payload::vectored(&sl);
        assert_eq!((v.len(), v.is_zero()), (3, false));
        assert!(v.slices().is_some());
        assert_eq!(v.bytes(), &[1, 2, 3]);
        v.to_mut()[2] = 0;
        assert!(v.slices().is_none());
        assert_eq!(v.bytes(), &[1, 2, 0]);
    }

    #[test]
    fn zero_detection_checks_the_tail() {
        assert!(is_zero(&[0u8; 33]));
        let mut v = vec![0u8; 33];
        v[32] = 1;
        assert!(!is_zero(&v));
        v[32] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
