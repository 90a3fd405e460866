//! Group commit: concurrent requests that each need "everything I wrote is durable"
//! share flushes instead of issuing one each.

use crate::error::Result;
use crate::storage::Storage;
use std::sync::{Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    /// Flushes started so far.
    started: u64,
    /// Highest flush generation known to have completed successfully.
    done: u64,
    running: bool,
}

/// Shares flushes between concurrent callers.
#[derive(Debug, Default)]
pub(crate) struct FlushGate {
    state: Mutex<State>,
    cv: Condvar,
}

impl FlushGate {
    /// Returns once a flush that started after this call has completed, so every write
    /// completed before the call is durable.
    pub(crate) fn flush(&self, storage: &dyn Storage) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // A flush already running may have started before our writes completed: we need
        // the next one.
        let target = s.started + 1;
        loop {
            if s.done >= target {
                return Ok(());
            }
            if !s.running {
                s.running = true;
                s.started += 1;
                let gen = s.started;
                drop(s);
                let r = storage.flush();
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                s.running = false;
                if r.is_ok() {
                    s.done = s.done.max(gen);
                }
                self.cv.notify_all();
                return Ok(r?);
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}
