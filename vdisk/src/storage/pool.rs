//! Buffers aligned for O_DIRECT (4 KiB), recycled through one process-wide pool.
//!
//! The storage layer's bounce buffers, the NBD server's payload and read buffers and the
//! CLI's request buffers all come from here, so a request whose offset and length are
//! aligned reaches `preadv`/`pwritev` on an O_DIRECT file without a copy, and no request
//! pays for a fresh zeroed allocation. The pool is bounded: a few buffers per power-of-two
//! size class are kept, larger requests are allocated and freed as before.

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock, PoisonError};

/// Alignment of every buffer: what O_DIRECT needs on every device vdisk supports.
pub const BUF_ALIGN: usize = 4096;
/// Smallest size class (one page).
const MIN_CLASS_SHIFT: u32 = 12;
/// Largest size class kept for reuse (4 MiB); larger buffers are not recycled.
const MAX_CLASS_SHIFT: u32 = 22;
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// Bytes kept idle per size class: bounds the pool at about 11 × 8 MiB in the worst
/// case, and keeps dozens of small buffers (a QD32 client's worth) for reuse.
const CLASS_BYTES: usize = 8 << 20;
/// Buffers kept idle per size class, whatever their size.
const CLASS_MAX_COUNT: usize = 64;

/// An owned, 4 KiB-aligned byte buffer of `len` bytes (its allocation may be larger).
/// Every byte is initialised (zeroed when first allocated; a recycled buffer holds what
/// its previous user left).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    /// Returned to the global pool on drop.
    pooled: bool,
}

// SAFETY: the buffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

fn layout(cap: usize) -> Option<Layout> {
    Layout::from_size_align(cap.max(BUF_ALIGN), BUF_ALIGN).ok()
}

impl AlignedBuf {
    /// A fresh zeroed buffer of `len` bytes (not from the pool, not returned to it);
    /// `None` when the allocation fails or the size is absurd.
    pub fn try_zeroed(len: usize) -> Option<AlignedBuf> {
        let cap = len.checked_next_multiple_of(BUF_ALIGN)?.max(BUF_ALIGN);
        Self::alloc(len, cap, false)
    }

    fn alloc(len: usize, cap: usize, pooled: bool) -> Option<AlignedBuf> {
        let l = layout(cap)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(l) })?;
        Some(AlignedBuf {
            ptr,
            len,
            cap,
            pooled,
        })
    }

    /// A zeroed buffer of `len` bytes; aborts like `vec!` when memory is exhausted.
    pub fn zeroed(len: usize) -> AlignedBuf {
        match Self::try_zeroed(len) {
            Some(b) => b,
            None => std::alloc::handle_alloc_error(
                layout(len.next_multiple_of(BUF_ALIGN)).unwrap_or(Layout::new::<u8>()),
            ),
        }
    }

    /// Bytes the allocation can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the length within the capacity (new bytes hold whatever the allocation
    /// held: zeroes or a previous user's bytes). Returns false when `len` does not fit.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.cap {
            return false;
        }
        self.len = len;
        true
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes, all initialised (alloc_zeroed).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.pooled {
            if let Some(class) = class_of(self.cap) {
                if pool().give_back(class, self) {
                    return;
                }
            }
        }
        if let Some(l) = layout(self.cap) {
            // SAFETY: allocated with this layout in alloc().
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), l) }
        }
    }
}

/// A recycled allocation waiting in the pool.
struct Idle(NonNull<u8>);
// SAFETY: an idle allocation is owned by the pool alone.
unsafe impl Send for Idle {}

/// The size classes' free lists.
struct Pool {
    classes: [Mutex<Vec<Idle>>; CLASSES],
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        classes: std::array::from_fn(|_| Mutex::new(Vec::new())),
    })
}

/// The size class whose buffers hold exactly `cap` bytes.
fn class_of(cap: usize) -> Option<usize> {
    if !cap.is_power_of_two() {
        return None;
    }
    let s = cap.trailing_zeros();
    (MIN_CLASS_SHIFT..=MAX_CLASS_SHIFT)
        .contains(&s)
        .then(|| (s - MIN_CLASS_SHIFT) as usize)
}

fn class_cap(class: usize) -> usize {
    1 << (class as u32 + MIN_CLASS_SHIFT)
}

fn class_limit(class: usize) -> usize {
    (CLASS_BYTES / class_cap(class)).clamp(2, CLASS_MAX_COUNT)
}

impl Pool {
    /// Keeps `b`'s allocation if its class has room; true when it was kept.
    fn give_back(&self, class: usize, b: &AlignedBuf) -> bool {
        let mut free = self.classes[class]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if free.len() >= class_limit(class) {
            return false;
        }
        free.push(Idle(b.ptr));
        true
    }
}

/// A buffer of `len` bytes from the pool (4 KiB aligned). Its contents are
/// unspecified (zeroes or a previous user's bytes): callers overwrite it. Sizes above
/// the largest class are allocated fresh and freed on drop.
pub fn get(len: usize) -> AlignedBuf {
    match try_get(len) {
        Some(b) => b,
        None => AlignedBuf::zeroed(len),
    }
}

/// [`get`] that reports a failed allocation (`None`) instead of aborting: for sizes
/// an untrusted user chose (a qemu-io request length).
pub fn try_get(len: usize) -> Option<AlignedBuf> {
    let cap = len.checked_next_power_of_two()?.max(BUF_ALIGN);
    if let Some(class) = class_of(cap) {
        let idle = pool().classes[class]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        if let Some(Idle(ptr)) = idle {
            return Some(AlignedBuf {
                ptr,
                len,
                cap,
                pooled: true,
            });
        }
        return AlignedBuf::alloc(len, cap, true);
    }
    AlignedBuf::try_zeroed(len)
}

/// A pooled buffer of `len` zero bytes.
pub fn get_zeroed(len: usize) -> AlignedBuf {
    let mut b = get(len);
    b.fill(0);
    b
}

/// Whether a buffer's address and length suit O_DIRECT as they are.
pub fn is_aligned(p: *const u8, len: usize) -> bool {
    (p as usize).is_multiple_of(BUF_ALIGN) && len.is_multiple_of(BUF_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_sized_and_recycled() {
        for len in [0usize, 1, 4095, 4096, 4097, 65536, 100_000, (4 << 20) + 1] {
            let mut b = get(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            b.fill(0xa5);
            drop(b);
            let z = get_zeroed(len);
            assert!(z.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn pool_is_bounded() {
        let held: Vec<AlignedBuf> = (0..200).map(|_| get(1 << 20)).collect();
        drop(held);
        let n = pool().classes[class_of(1 << 20).unwrap()]
            .lock()
            .unwrap()
            .len();
        assert!(n <= class_limit(8));
        assert!(n >= 2);
    }

    #[test]
    fn fresh_buffers_and_lengths() {
        let mut b = AlignedBuf::zeroed(10);
        assert_eq!(b.capacity(), BUF_ALIGN);
        assert!(b.set_len(4096));
        assert!(!b.set_len(4097));
        assert!(b.iter().all(|&x| x == 0));
        assert!(is_aligned(b.as_ptr(), b.len()));
        assert!(AlignedBuf::try_zeroed(usize::MAX).is_none());
        assert!(try_get(usize::MAX).is_none());
        assert!(try_get(1 << 50).is_none());
    }
}
