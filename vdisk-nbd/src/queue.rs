//! The hand-off between a connection's reader and its workers, and a pool of request
//! buffers.
//!
//! The queue is a plain mutex + condvar: idle workers sleep instead of spinning, which
//! matters on small machines where spinning receivers steal the CPU the busy ones
//! need. Its length is bounded by the connection's [`crate::limiter::Limiter`].
//!
//! The pool recycles payload and read buffers so the hot path doesn't zero and
//! page-fault fresh memory for every request; it is the storage layer's aligned pool,
//! bounded per size class, so idle connections hold little memory.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, PoisonError};
use vdisk::storage::pool::{self, AlignedBuf};

#[derive(Debug)]
struct QueueState<T> {
    items: VecDeque<T>,
    closed: bool,
    /// Workers asleep in `pop`: a push only pays for a wake-up when someone sleeps.
    idle: usize,
}

/// A closable FIFO of work items.
#[derive(Debug)]
pub struct WorkQueue<T> {
    state: Mutex<QueueState<T>>,
    cv: Condvar,
}

impl<T> Default for WorkQueue<T> {
    fn default() -> Self {
        WorkQueue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                closed: false,
                idle: 0,
            }),
            cv: Condvar::new(),
        }
    }
}

impl<T> WorkQueue<T> {
    /// Adds an item and wakes one worker.
    pub fn push(&self, item: T) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.items.push_back(item);
        let wake = st.idle > 0;
        drop(st);
        if wake {
            self.cv.notify_one();
        }
    }

    /// Takes the next item, sleeping while there is none; `None` once closed and empty.
    pub fn pop(&self) -> Option<T> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(item) = st.items.pop_front() {
                return Some(item);
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.idle -= 1;
        }
    }

    /// No more items will come: workers drain what's left and stop.
    pub fn close(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.cv.notify_all();
    }
}

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
    use std::sync::Arc;

    #[test]
    fn queue_drains_then_stops_after_close() {
        let q = Arc::new(WorkQueue::default());
        let q2 = q.clone();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(x) = q2.pop() {
                got.push(x);
            }
            got
        });
        for i in 0..100 {
            q.push(i);
        }
        q.close();
        assert_eq!(t.join().unwrap(), (0..100).collect::<Vec<_>>());
    }

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
