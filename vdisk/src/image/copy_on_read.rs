//! Copy-on-read (QEMU's `copy-on-read=on` node option, `qemu-io -C`): a read of data
//! that comes from a backing file also writes it into the top image, so later reads
//! need the backing file less (the usual setting when the backing file is remote).
//!
//! As in QEMU, the copy covers whole clusters around the request and only ranges the
//! top image does not allocate; all-zero data is copied as a zero write (no unmap). The copy goes through the image's write hooks like a guest
//! write (dirty bitmaps see it), but it never changes what the guest reads.
//!
//! Ordering: a copy must not overwrite a guest write that lands between reading the
//! backing data and writing it up. [`Gate`] keeps copies exclusive against writes (and
//! other copies); writers only pass a counter while no copy runs or waits, so with
//! copy-on-read off nothing is locked at all.

use super::Image;
use crate::error::Result;
use crate::format::{ExtentKind, ZeroFlags};
use crate::hook::{Payload, Request};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Largest piece copied with one read and one write (bounds the buffer).
const PIECE: u64 = 1 << 20;
/// Alignment when the format has no clusters.
const DEFAULT_ALIGN: u64 = 64 << 10;

#[derive(Debug, Default)]
struct GateState {
    /// Guest writes in progress.
    writers: usize,
    /// A copy is running.
    copying: bool,
    /// Copies waiting for writers to drain (new writers wait behind them).
    waiting: usize,
}

/// Keeps copy-up sections exclusive against guest writes.
#[derive(Debug, Default)]
pub(super) struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

/// A guest write in progress (see [`Gate::writer`]).
pub(super) struct WriterGuard<'a>(&'a Gate);
/// A copy in progress (see [`Gate::copier`]).
struct CopierGuard<'a>(&'a Gate);

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // The state is a pair of counters: still meaningful after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no copy runs or waits, then counts a writer.
    pub(super) fn writer(&self) -> WriterGuard<'_> {
        let mut s = self.lock();
        while s.copying || s.waiting > 0 {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.writers += 1;
        WriterGuard(self)
    }

    /// Waits until no writer or other copy runs, then runs alone.
    fn copier(&self) -> CopierGuard<'_> {
        let mut s = self.lock();
        s.waiting += 1;
        while s.copying || s.writers > 0 {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.waiting -= 1;
        s.copying = true;
        CopierGuard(self)
    }
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.writers -= 1;
        if s.writers == 0 {
            self.0.cv.notify_all();
        }
    }
}

impl Drop for CopierGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().copying = false;
        self.0.cv.notify_all();
    }
}

impl Image {
    /// A guest write's pass through the copy-on-read gate (`None`: copy-on-read off).
    pub(super) fn write_gate(&self) -> Option<WriterGuard<'_>> {
        self.cor.as_ref().map(Gate::writer)
    }

    /// Before a read of `[offset, offset+len)`: copies what the backing chain provides
    /// for the clusters around it into the top image.
    pub(super) fn copy_up(&self, gate: &Gate, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if len == 0 || offset >= size {
            return Ok(());
        }
        let align = self
            .cluster_size()
            .filter(|c| *c > 0)
            .unwrap_or(DEFAULT_ALIGN);
        let start = offset - offset % align;
        let end = offset
            .saturating_add(len)
            .div_ceil(align)
            .saturating_mul(align)
            .min(size);
        // Most reads hit data the top image has: they pass without the gate. (A range
        // seen allocated here can only lose its data by a discard, after which reading
        // it through the backing file without a copy is still correct.)
        if self.top_allocated(start, end)? {
            return Ok(());
        }
        let _alone = gate.copier();
        let mut pos = start;
        let mut buf = Vec::new();
        while pos < end {
            // What the top image does not allocate is copied, even where no layer has
            // data (it is then recorded as zeroes), as QEMU does.
            let e = self.driver.block_status(pos, end - pos)?;
            let run = e.len.clamp(1, end - pos);
            if e.kind == ExtentKind::Unallocated {
                let mut p = pos;
                while p < pos + run {
                    let n = (pos + run - p).min(PIECE);
                    buf.resize(n as usize, 0);
                    self.driver.read_at(&mut buf, p)?;
                    let req = if buf.iter().all(|b| *b == 0) {
                        Request::Zeroes {
                            offset: p,
                            len: n,
                            flags: ZeroFlags::default(),
                        }
                    } else {
                        Request::Write {
                            offset: p,
                            data: Payload::borrowed(&buf),
                        }
                    };
                    let zero = matches!(req, Request::Zeroes { .. });
                    match self.copy_request(req) {
                        // Some layouts cannot record zeroes over a backing file (qcow2
                        // v2): write the zero bytes instead.
                        Err(crate::Error::Unsupported(_)) if zero => {
                            self.copy_request(Request::Write {
                                offset: p,
                                data: Payload::borrowed(&buf),
                            })?
                        }
                        r => r?,
                    }
                    p += n;
                }
            }
            pos += run;
        }
        Ok(())
    }

    /// Whether the top image allocates all of `[start, end)`.
    fn top_allocated(&self, start: u64, end: u64) -> Result<bool> {
        let mut pos = start;
        while pos < end {
            let e = self.driver.block_status(pos, end - pos)?;
            if e.kind == ExtentKind::Unallocated {
                return Ok(false);
            }
            pos += e.len.clamp(1, end - pos);
        }
        Ok(true)
    }

    /// Writes copied data as a guest write would be written (through the hooks).
    fn copy_request(&self, req: Request<'_>) -> Result<()> {
        if self.hooks.is_empty() {
            self.submit(&req)
        } else {
            self.hooked(req)
        }
    }
}
