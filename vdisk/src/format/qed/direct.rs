//! Direct ranges ([`crate::format::mapping::DirectRange`]): allocated guest ranges the
//! NBD server reads or overwrites itself, on its own io_uring, with no worker hop.
//!
//! Why a gate of its own: check/repair and resize (which compacts the file when it
//! shrinks) move and free clusters, so they hold the quiesce lock exclusively, and
//! every ordinary request holds it shared for its whole life. A direct transfer
//! outlives the call that handed it out (it completes on the ring later), and the
//! thread that reaps its completion is the connection's reader, which may block on
//! the shared lock in the ordinary path meanwhile: holding the `RwLock` across the
//! transfer could deadlock with a waiting writer. So direct ranges are counted
//! instead: one never blocks to start (it is refused while anyone quiesces, and the
//! request takes the ordinary path), and a quiescer first announces itself, then
//! waits, holding no lock, for the ranges in flight to end, then takes the exclusive
//! lock. The reader keeps reaping meanwhile, so the wait ends.
//!
//! What needs no gate: in-place writes change no metadata, and zero writes and
//! discard zero or punch allocated clusters in place, never releasing one (QED has no
//! refcounts, and allocates only at the end of the file), so a direct transfer racing
//! one of them touches only its own guest range's clusters, as an unordered pair of
//! requests may.

use super::Inner;
use crate::format::datapath;
use crate::format::mapping::{DirectRange, InPlaceGuard, ReleaseInPlace};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// Direct ranges in flight and the quiescers waiting for them.
#[derive(Debug, Default)]
pub(super) struct DirectGate {
    /// Direct ranges handed out and not yet dropped (plus, for an instant, ones being
    /// handed out).
    inflight: AtomicUsize,
    /// Quiescers announced and not yet done: while nonzero, no direct range starts.
    quiescing: AtomicUsize,
    lock: Mutex<()>,
    /// Signalled when `inflight` drops to zero while someone quiesces.
    drained: Condvar,
}

impl DirectGate {
    /// Counts a direct range about to start; false (nothing counted) while someone
    /// quiesces. Never blocks.
    fn enter(&self) -> bool {
        // Count first, then look: a quiescer announces itself first, then looks at the
        // count, so one of the two always sees the other (both sequentially consistent).
        self.inflight.fetch_add(1, SeqCst);
        if self.quiescing.load(SeqCst) > 0 {
            self.leave();
            return false;
        }
        true
    }

    /// Ends a counted direct range.
    fn leave(&self) {
        if self.inflight.fetch_sub(1, SeqCst) == 1 && self.quiescing.load(SeqCst) > 0 {
            // Under the lock: the waiter checks the count and sleeps under it, so the
            // signal cannot fall between the two.
            let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.drained.notify_all();
        }
    }

    /// Refuses new direct ranges and waits for those in flight to end; they start
    /// again when the returned value is dropped. Holds no lock while it waits.
    pub(super) fn drain(&self) -> Drained<'_> {
        self.quiescing.fetch_add(1, SeqCst);
        let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        while self.inflight.load(SeqCst) > 0 {
            g = self.drained.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        Drained(self)
    }
}

/// Direct ranges are refused until this is dropped ([`DirectGate::drain`]).
#[derive(Debug)]
pub(super) struct Drained<'a>(&'a DirectGate);

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        self.0.quiescing.fetch_sub(1, SeqCst);
    }
}

impl ReleaseInPlace for Inner {
    /// The direct range counted by [`direct`] ended.
    fn release_in_place(&self, _token: (u64, u64)) {
        self.direct.leave();
    }
}

/// The direct range for `[offset, offset + len)`, or `None` (nothing held) when it
/// lies outside the guest size, is a write to a read-only image, any part of it is not
/// allocated data, lies over an L2 table, sits on storage that is not an O_DIRECT file,
/// or someone is quiescing the image.
pub(super) fn direct(
    inner: &Arc<Inner>,
    offset: u64,
    len: u64,
    write: bool,
) -> Option<DirectRange<'_>> {
    if !inner.direct.enter() {
        return None;
    }
    // From here the count is held by this guard: dropped on any `None` below, or with
    // the range once its transfer completed.
    let held = InPlaceGuard::new(&**inner, (0, 0));
    let range = datapath::direct::gated(inner, inner.writable(), offset, len, write)?;
    Some(range.holding(held))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn a_range_starts_unless_someone_quiesces() {
        let g = DirectGate::default();
        assert!(g.enter());
        g.leave();
        let d = g.drain();
        assert!(!g.enter(), "refused while quiescing");
        assert_eq!(g.inflight.load(SeqCst), 0, "a refused range counts nothing");
        drop(d);
        assert!(g.enter());
        g.leave();
    }

    #[test]
    fn drain_waits_for_the_ranges_in_flight() {
        let g = Arc::new(DirectGate::default());
        assert!(g.enter());
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (g, done) = (g.clone(), done.clone());
            std::thread::spawn(move || {
                let _d = g.drain();
                done.store(true, SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!done.load(SeqCst), "drain returned with a range in flight");
        assert!(!g.enter(), "a new range started while a quiescer waits");
        g.leave();
        t.join().unwrap();
        assert!(done.load(SeqCst));
        assert!(g.enter(), "ranges start again after the quiescer is done");
        g.leave();
    }
}
