//! The hand-off between a connection's reader and its workers, and a pool of request
//! buffers.
//!
//! The queue is a plain mutex + condvar: idle workers sleep instead of spinning, which
//! matters on small machines where spinning receivers steal the CPU the busy ones
//! need. Its length is bounded by the connection's [`crate::limiter::Limiter`].
//!
//! The pool recycles payload and read buffers so the hot path doesn't zero and
//! page-fault fresh memory for every request; it keeps only a bounded number of
//! modest buffers, so idle connections hold little memory.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, PoisonError};

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

/// Buffers at most this large are kept for reuse.
const POOL_MAX_BUF: usize = 1 << 20;
/// Buffers kept.
const POOL_MAX_COUNT: usize = 16;

/// A buffer from a [`BufPool`]: `len` bytes of a possibly larger allocation.
#[derive(Debug, Default)]
pub struct PoolBuf {
    v: Vec<u8>,
    len: usize,
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[..self.len]
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[..self.len]
    }
}

/// Recycled byte buffers.
#[derive(Debug, Default)]
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// A buffer of exactly `len` bytes (contents unspecified: callers overwrite it).
    pub fn get(&self, len: usize) -> PoolBuf {
        if len <= POOL_MAX_BUF {
            let popped = self
                .free
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            if let Some(mut v) = popped {
                if v.len() < len {
                    // Only growth is zero-filled; reused bytes are overwritten by callers.
                    v.resize(len, 0);
                }
                return PoolBuf { v, len };
            }
        }
        PoolBuf {
            v: vec![0u8; len],
            len,
        }
    }

    /// Returns a buffer for reuse.
    pub fn put(&self, b: PoolBuf) {
        if b.v.len() > POOL_MAX_BUF || b.v.is_empty() {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < POOL_MAX_COUNT {
            free.push(b.v);
        }
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
        let p = BufPool::default();
        let mut b = p.get(4096);
        b.fill(7);
        p.put(b);
        let b = p.get(100);
        assert_eq!(b.len(), 100);
        assert!(b.iter().all(|&x| x == 7), "reused, not re-zeroed");
        let b2 = p.get(8192);
        assert_eq!(b2.len(), 8192);
        assert_eq!(p.get(2 << 20).len(), 2 << 20);
    }
}
