//! Bounds what one connection may have in flight: a request count and a byte budget
//! (write payloads read ahead and read buffers waiting to be sent).

use std::sync::{Condvar, Mutex, PoisonError};

/// What one request takes from a [`Limiter`]: its buffer bytes, from the read or the
/// write budget (write payloads and read buffers are bounded apart: on an O_DIRECT
/// export the two want different bounds, see the transmission module).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Buffer bytes the request holds while in flight.
    pub bytes: u64,
    /// Whether they count against the write budget (else the read budget).
    pub write: bool,
}

impl Cost {
    /// `bytes` of read buffers.
    pub fn read(bytes: u64) -> Cost {
        Cost {
            bytes,
            write: false,
        }
    }
    /// `bytes` of write payload.
    pub fn write(bytes: u64) -> Cost {
        Cost { bytes, write: true }
    }
}

/// A counting budget. A single request larger than its whole byte budget is still
/// admitted when nothing else is in flight, so progress is always possible.
#[derive(Debug)]
pub struct Limiter {
    max_count: usize,
    /// Byte budgets: reads, writes.
    max_bytes: [u64; 2],
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Requests in flight.
    count: usize,
    /// Bytes in flight: reads, writes.
    bytes: [u64; 2],
    /// Callers waiting in `acquire` (a release pays for a wake-up only when someone
    /// waits).
    waiting: usize,
}

impl Limiter {
    /// A budget of `max_count` requests, `max_read_bytes` of read buffers and
    /// `max_write_bytes` of write payloads.
    pub fn new(max_count: usize, max_read_bytes: u64, max_write_bytes: u64) -> Limiter {
        Limiter {
            max_count: max_count.max(1),
            max_bytes: [max_read_bytes, max_write_bytes],
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    fn fits(&self, st: &State, c: Cost) -> bool {
        let i = c.write as usize;
        st.count == 0
            || (st.count < self.max_count
                && st.bytes[i].saturating_add(c.bytes) <= self.max_bytes[i])
    }

    fn take(st: &mut State, c: Cost) {
        let i = c.write as usize;
        st.count += 1;
        st.bytes[i] = st.bytes[i].saturating_add(c.bytes);
    }

    /// Waits until a request costing `c` fits, then takes it from the budget.
    pub fn acquire(&self, c: Cost) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !self.fits(&st, c) {
            st.waiting += 1;
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.waiting -= 1;
        }
        Self::take(&mut st, c);
    }

    /// Takes a request costing `c` from the budget if it fits now; false (nothing
    /// taken) when [`Limiter::acquire`] would wait.
    pub fn try_acquire(&self, c: Cost) -> bool {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.fits(&st, c) {
            return false;
        }
        Self::take(&mut st, c);
        true
    }

    /// Gives back what `acquire(c)` took.
    pub fn release(&self, c: Cost) {
        let i = c.write as usize;
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.count = st.count.saturating_sub(1);
        st.bytes[i] = st.bytes[i].saturating_sub(c.bytes);
        let waiting = st.waiting > 0;
        drop(st);
        if waiting {
            self.cv.notify_all();
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn oversize_request_admitted_alone_and_blocks_others() {
        let l = Arc::new(Limiter::new(4, 100, 100));
        l.acquire(Cost::write(1000));
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            l2.acquire(Cost::write(1));
            l2.release(Cost::write(1));
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        l.release(Cost::write(1000));
        t.join().unwrap();
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn read_and_write_budgets_are_apart() {
        let l = Limiter::new(8, 100, 10);
        assert!(l.try_acquire(Cost::write(10)));
        assert!(!l.try_acquire(Cost::write(1)), "write budget spent");
        assert!(l.try_acquire(Cost::read(100)), "reads have their own");
        assert!(!l.try_acquire(Cost::read(1)));
        l.release(Cost::write(10));
        assert!(l.try_acquire(Cost::write(5)));
        assert_eq!(l.in_flight(), 2);
    }
}
