//! Ordering of overlapping requests: a list of guest ranges with an operation in
//! flight (allocations, in-place writes), and a counted condvar wait.
//!
//! Concurrency: both types live inside the driver's own mutex-protected state (one list
//! per image for qcow2, one per L2 table for QED); every method is called with that
//! mutex held, and the condvar paired with it is signalled whenever a range is removed.
//! A request that finds its range busy waits, then looks at the mapping again: the
//! operation it waited for may have changed it (QEMU's `QCowL2Meta` rule).

use std::sync::{Condvar, MutexGuard};

/// Guest ranges `[start, end)` (in the driver's unit: clusters for qcow2 and QED) with
/// an operation in flight. Small: one entry per concurrent request.
#[derive(Debug, Default)]
pub struct InFlight {
    ranges: Vec<(u64, u64)>,
}

impl InFlight {
    /// An empty list.
    pub const fn new() -> InFlight {
        InFlight { ranges: Vec::new() }
    }
    /// Whether some range in flight overlaps `[start, end)`.
    #[inline]
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.ranges.iter().any(|&(a, b)| a < end && start < b)
    }
    /// Whether `x` lies in a range in flight.
    #[inline]
    pub fn contains(&self, x: u64) -> bool {
        self.overlaps(x, x + 1)
    }
    /// Registers `[start, end)`.
    #[inline]
    pub fn insert(&mut self, start: u64, end: u64) {
        self.ranges.push((start, end));
    }
    /// Removes one registration of exactly `[start, end)` (no-op if absent).
    #[inline]
    pub fn remove(&mut self, start: u64, end: u64) {
        if let Some(i) = self.ranges.iter().position(|&r| r == (start, end)) {
            self.ranges.swap_remove(i);
        }
    }
    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// Requests blocked on a condvar, counted under the same mutex so that finishing an
/// operation costs no wake-up system call when nobody waits.
#[derive(Debug, Default)]
pub struct Waiters(usize);

impl Waiters {
    /// Blocks on `cv` once (the caller loops on its condition), counted in the
    /// [`Waiters`] that `get` finds in the guarded state.
    pub fn wait<'a, T>(
        cv: &Condvar,
        mut guard: MutexGuard<'a, T>,
        get: fn(&mut T) -> &mut Waiters,
    ) -> MutexGuard<'a, T> {
        get(&mut guard).0 += 1;
        let mut guard = cv.wait(guard).unwrap_or_else(|p| p.into_inner());
        get(&mut guard).0 -= 1;
        guard
    }

    /// Wakes every waiter, if there is one. Call with the mutex still held, right after
    /// the change: a counted request is then already blocked on `cv`, and one not yet
    /// counted will see the change before it would wait.
    #[inline]
    pub fn wake(&self, cv: &Condvar) {
        if self.0 > 0 {
            cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_rules() {
        let mut l = InFlight::new();
        l.insert(4, 8);
        assert!(l.overlaps(7, 9) && l.overlaps(0, 5) && !l.overlaps(8, 10) && !l.overlaps(0, 4));
        assert!(l.contains(4) && !l.contains(8));
        l.insert(4, 8);
        l.remove(4, 8);
        assert!(l.contains(5));
        l.remove(4, 8);
        assert!(l.is_empty());
    }
}
