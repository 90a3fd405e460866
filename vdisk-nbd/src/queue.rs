//! The hand-off between a connection's reader and its workers (the storage layer's
//! [`WorkQueue`], its length bounded by the connection's [`crate::limiter::Limiter`]),
//! and a pool of request buffers.
//!
//! The pool recycles payload and read buffers so the hot path doesn't zero and
//! page-fault fresh memory for every request; it is the storage layer's aligned pool,
//! bounded per size class, so idle connections hold little memory.

use vdisk::storage::pool::{self, AlignedBuf};
pub use vdisk::storage::work::WorkQueue;

/// A request buffer: `len` bytes, 4 KiB aligned, from the storage layer's shared pool
/// ([`vdisk::storage::pool`]), so a read or write payload reaches an O_DIRECT image
/// without a bounce copy. Dropping it returns it to that pool.
#[derive(Debug, Default)]
pub struct PoolBuf(Option<AlignedBuf>);

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

/// Hands out request buffers from the process-wide aligned pool (bounded per size
/// class there, so idle connections hold little memory).
#[derive(Debug, Default)]
pub struct BufPool;

impl BufPool {
    /// A buffer of exactly `len` bytes (contents unspecified: callers overwrite it).
    pub fn get(&self, len: usize) -> PoolBuf {
        if len == 0 {
            return PoolBuf(None);
        }
        PoolBuf(Some(pool::get(len)))
    }

    /// Returns a buffer for reuse.
    pub fn put(&self, b: PoolBuf) {
        drop(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_returns_requested_length() {
        let p = BufPool;
        for len in [0usize, 100, 4096, 8192, 2 << 20] {
            let mut b = p.get(len);
            assert_eq!(b.len(), len);
            assert!((b.as_ptr() as usize).is_multiple_of(pool::BUF_ALIGN) || len == 0);
            b.fill(7);
            p.put(b);
        }
    }
}
