//! The NEED_CHECK (dirty) lifecycle.
//!
//! - Before the first metadata-changing write of a session, NEED_CHECK is written and
//!   flushed, so a crash at any later point forces a check on the next read-write open.
//! - Every such write holds an [`AllocGuard`] while in flight (an allocation of the
//!   generic data path detaches it when prepared and ends it in `commit`/`abort`).
//! - NEED_CHECK is cleared (after a flush) on close, on drop, and by an idle timer: a
//!   thread started when the image turns dirty, which clears the bit once no guarded
//!   write has been in flight for the clean delay, then exits. Close and drop stop it.

use super::header::{Header, F_NEED_CHECK};
use super::Inner;
use crate::error::Result;
use crate::format::BackingSpec;
use std::sync::{Arc, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Header state and in-flight accounting, under one mutex.
#[derive(Debug)]
pub(crate) struct DirtyState {
    /// The header as on disk (fixed fields).
    pub header: Header,
    /// The backing file the header names.
    pub backing: Option<BackingSpec>,
    /// Metadata-changing requests in flight.
    pub inflight: u32,
    /// When the last one finished.
    pub last_alloc: Instant,
    /// Idle period before the timer clears NEED_CHECK.
    pub clean_delay: Duration,
    /// Whether the metadata is known consistent (false while a dirty image opened with
    /// `skip_repair` has not been repaired): only then may NEED_CHECK be cleared.
    pub verified: bool,
    timer: Option<JoinHandle<()>>,
    timer_running: bool,
    stopped: bool,
}

impl DirtyState {
    pub(crate) fn new(header: Header, backing: Option<BackingSpec>) -> DirtyState {
        let verified = !header.need_check();
        DirtyState {
            header,
            backing,
            inflight: 0,
            last_alloc: Instant::now(),
            clean_delay: super::DEFAULT_CLEAN_DELAY,
            verified,
            timer: None,
            timer_running: false,
            stopped: false,
        }
    }
}

/// Marks one metadata-changing request in flight; dropping it ends the request.
pub(crate) struct AllocGuard<'a> {
    inner: &'a Inner,
}

impl AllocGuard<'_> {
    /// Keeps the request counted in flight past this guard, for a request whose end is
    /// a later call (an allocation ends in `commit` or `abort`): that call must run
    /// [`end`] exactly once.
    pub(crate) fn detach(self) {
        std::mem::forget(self);
    }
}

impl Drop for AllocGuard<'_> {
    fn drop(&mut self) {
        end(self.inner);
    }
}

/// Ends a metadata-changing request started by [`begin`] (directly, for a detached
/// guard).
pub(crate) fn end(inner: &Inner) {
    let mut d = inner.dirty_lock();
    d.inflight = d.inflight.saturating_sub(1);
    d.last_alloc = Instant::now();
}

/// Starts a metadata-changing request: makes NEED_CHECK durable first if needed.
pub(crate) fn begin(inner: &Arc<Inner>) -> Result<AllocGuard<'_>> {
    let mut d = inner.dirty_lock();
    if !d.header.need_check() {
        let mut h = d.header.clone();
        h.features |= F_NEED_CHECK;
        inner.write_header(&h)?;
        inner.storage.flush()?;
        d.header = h;
    }
    d.inflight += 1;
    if !d.timer_running && !d.stopped {
        start_timer(inner, &mut d);
    }
    Ok(AllocGuard { inner })
}

fn start_timer(inner: &Arc<Inner>, d: &mut MutexGuard<'_, DirtyState>) {
    if let Some(old) = d.timer.take() {
        // It cleared `timer_running` as its last locked act; it is exiting.
        let _ = old.join();
    }
    let weak = Arc::downgrade(inner);
    match std::thread::Builder::new()
        .name("qed-clean".into())
        .spawn(move || timer_loop(weak))
    {
        Ok(h) => {
            d.timer = Some(h);
            d.timer_running = true;
        }
        Err(e) => tracing::warn!("QED: could not start the idle timer: {e}"),
    }
}

fn timer_loop(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let mut d = inner.dirty_lock();
        if d.stopped || !d.header.need_check() {
            d.timer_running = false;
            return;
        }
        let idle = d.last_alloc.elapsed();
        if d.inflight == 0 && idle >= d.clean_delay {
            if let Err(e) = clean_locked(&inner, &mut d) {
                tracing::warn!("QED: could not clear NEED_CHECK: {e}");
            }
            d.timer_running = false;
            return;
        }
        let wait = if d.inflight > 0 {
            d.clean_delay
        } else {
            d.clean_delay - idle
        };
        let wait = wait.clamp(Duration::from_millis(10), Duration::from_secs(1));
        let (d, _) = inner
            .dirty_cv
            .wait_timeout(d, wait)
            .unwrap_or_else(|p| p.into_inner());
        drop(d);
    }
}

/// Flushes and clears NEED_CHECK; caller holds the dirty lock with nothing in flight.
fn clean_locked(inner: &Inner, d: &mut DirtyState) -> Result<()> {
    if !d.header.need_check() || !d.verified || d.inflight > 0 || inner.read_only {
        return Ok(());
    }
    // Everything (guest data included) durable before the image is declared clean.
    inner.flush_all()?;
    let mut h = d.header.clone();
    h.features &= !F_NEED_CHECK;
    inner.write_header(&h)?;
    inner.storage.flush()?;
    d.header = h;
    Ok(())
}

/// Clears NEED_CHECK now if the metadata is consistent and nothing is in flight.
pub(crate) fn mark_clean(inner: &Inner) -> Result<()> {
    let mut d = inner.dirty_lock();
    clean_locked(inner, &mut d)
}

/// Records that a check found (or left) the metadata consistent or not.
pub(crate) fn set_verified(inner: &Inner, ok: bool) {
    inner.dirty_lock().verified = ok;
}

/// Stops the idle timer and waits for it to exit.
pub(crate) fn stop_timer(inner: &Inner) {
    let handle = {
        let mut d = inner.dirty_lock();
        d.stopped = true;
        d.timer.take()
    };
    inner.dirty_cv.notify_all();
    if let Some(h) = handle {
        if h.thread().id() != std::thread::current().id() {
            let _ = h.join();
        }
    }
}
