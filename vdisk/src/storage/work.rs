//! A closable FIFO of work items for a pool of threads: the hand-off between a
//! front-end's request reader (an NBD connection's, a vhost-user queue's) and the
//! threads that execute requests against an image.
//!
//! A plain mutex + condvar: idle workers sleep instead of spinning, which matters on
//! small machines where spinning receivers steal the CPU the busy ones need, and a
//! push pays for a wake-up only when a worker sleeps. The queue itself is unbounded:
//! its users bound what they admit.

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
}
