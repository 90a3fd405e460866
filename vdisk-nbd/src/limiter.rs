//! Bounds what one connection may have in flight: a request count and a byte budget
//! (write payloads read ahead and read buffers waiting to be sent).

use std::sync::{Condvar, Mutex, PoisonError};

/// A counting budget. A single request larger than the whole budget is still admitted
/// when nothing else is in flight, so progress is always possible.
#[derive(Debug)]
pub struct Limiter {
    max_count: usize,
    max_bytes: u64,
    /// Requests and bytes in flight, and how many callers wait in `acquire` (a release
    /// pays for a wake-up only when someone waits).
    state: Mutex<(usize, u64, usize)>,
    cv: Condvar,
}

impl Limiter {
    /// A budget of `max_count` requests and `max_bytes` bytes.
    pub fn new(max_count: usize, max_bytes: u64) -> Limiter {
        Limiter {
            max_count: max_count.max(1),
            max_bytes,
            state: Mutex::new((0, 0, 0)),
            cv: Condvar::new(),
        }
    }

    /// Waits until a request costing `bytes` fits, then takes it from the budget.
    pub fn acquire(&self, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while st.0 > 0 && (st.0 >= self.max_count || st.1.saturating_add(bytes) > self.max_bytes) {
            st.2 += 1;
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.2 -= 1;
        }
        st.0 += 1;
        st.1 = st.1.saturating_add(bytes);
    }

    /// Takes a request costing `bytes` from the budget if it fits now; false (nothing
    /// taken) when [`Limiter::acquire`] would wait.
    pub fn try_acquire(&self, bytes: u64) -> bool {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.0 > 0 && (st.0 >= self.max_count || st.1.saturating_add(bytes) > self.max_bytes) {
            return false;
        }
        st.0 += 1;
        st.1 = st.1.saturating_add(bytes);
        true
    }

    /// Gives back what `acquire(bytes)` took.
    pub fn release(&self, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.0 = st.0.saturating_sub(1);
        st.1 = st.1.saturating_sub(bytes);
        let waiting = st.2 > 0;
        drop(st);
        if waiting {
            self.cv.notify_all();
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn oversize_request_admitted_alone_and_blocks_others() {
        let l = Arc::new(Limiter::new(4, 100));
        l.acquire(1000);
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            l2.acquire(1);
            l2.release(1);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        l.release(1000);
        t.join().unwrap();
        assert_eq!(l.in_flight(), 0);
    }
}
