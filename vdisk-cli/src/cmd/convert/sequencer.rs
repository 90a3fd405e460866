//! In-order write stage of `vdisk convert`, with the pool of data buffers.
//!
//! Workers read items in parallel and hand them in here; whichever worker hands in
//! the next item in target order becomes the writer and writes every consecutive
//! item that is ready, while the others go on reading. Nobody waits for its turn, so
//! a hand-off costs one uncontended lock instead of a sleep and a wake-up per item.
//! A worker only sleeps when every buffer is in use (the writer is the bottleneck).
//!
//! Deadlock freedom: a worker takes a buffer *before* it takes an item from the
//! planner, so the worker holding the next item to write always has a buffer and
//! will hand it in; handing it in drains the queue and frees buffers.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use vdisk::storage::AlignedBuf;

/// A data buffer: 4 KiB aligned, so reads and writes of whole blocks reach an O_DIRECT
/// source or target (`-T none`, `-t none`) without a bounce copy.
pub(super) type Buf = AlignedBuf;

/// An item read and waiting to be written, with its data (None: nothing to read).
type Ready<T> = (T, Option<Buf>);

struct State<T> {
    /// Index of the next item to write.
    next: u64,
    /// Items handed in out of turn, by index.
    pending: BTreeMap<u64, Ready<T>>,
    /// Some worker is writing: others only queue their items.
    writing: bool,
    free: Vec<Buf>,
    /// Buffers in existence (free, held by workers or queued).
    allocated: usize,
    /// Workers sleeping in `take_buffer`.
    waiters: usize,
    stopped: bool,
    /// The planner has no more items: workers waiting for a buffer can leave.
    exhausted: bool,
}

/// Orders the writes of numbered items and lends out their buffers.
pub(super) struct Sequencer<T> {
    state: Mutex<State<T>>,
    buffer_freed: Condvar,
    limit: usize,
    buf_len: usize,
}

impl<T> Sequencer<T> {
    /// A sequencer lending at most `limit` buffers of `buf_len` bytes.
    pub(super) fn new(limit: usize, buf_len: usize) -> Self {
        Sequencer {
            state: Mutex::new(State {
                next: 0,
                pending: BTreeMap::new(),
                writing: false,
                free: Vec::new(),
                allocated: 0,
                waiters: 0,
                stopped: false,
                exhausted: false,
            }),
            buffer_freed: Condvar::new(),
            limit: limit.max(1),
            buf_len,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `buf_len` bytes (contents unspecified); None once stopped or once
    /// the planner has run out of items.
    pub(super) fn take_buffer(&self) -> Option<Buf> {
        let mut st = self.lock();
        loop {
            if st.stopped || st.exhausted {
                return None;
            }
            if let Some(b) = st.free.pop() {
                return Some(b);
            }
            if st.allocated < self.limit {
                st.allocated += 1;
                drop(st);
                // Zeroed allocation comes from fresh mmap'd pages: no memset.
                return Some(AlignedBuf::zeroed(self.buf_len));
            }
            st.waiters += 1;
            st = self
                .buffer_freed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
            st.waiters -= 1;
        }
    }

    /// Hands in item `index`; if it is the next to write and nobody is writing, writes
    /// it and every consecutive item already queued, with `write`. A write error stops
    /// the sequencer and is returned to the worker that was writing.
    pub(super) fn submit<F>(
        &self,
        index: u64,
        item: T,
        buf: Option<Buf>,
        mut write: F,
    ) -> Result<(), String>
    where
        F: FnMut(&T, &[u8]) -> Result<(), String>,
    {
        let mut st = self.lock();
        if st.stopped {
            return Ok(());
        }
        if st.writing || index != st.next {
            st.pending.insert(index, (item, buf));
            return Ok(());
        }
        st.writing = true;
        let mut batch: Vec<Ready<T>> = vec![(item, buf)];
        loop {
            let mut n = st.next + batch.len() as u64;
            while let Some(r) = st.pending.remove(&n) {
                batch.push(r);
                n += 1;
            }
            drop(st);
            let mut result = Ok(());
            let mut written = Vec::with_capacity(batch.len());
            for (it, b) in batch.drain(..) {
                if result.is_ok() {
                    result = write(&it, b.as_deref().unwrap_or(&[]));
                }
                if let Some(b) = b {
                    written.push(b);
                }
            }
            st = self.lock();
            st.next = n;
            let freed = written.len();
            st.free.extend(written);
            if freed > 0 && st.waiters > 0 {
                self.buffer_freed.notify_all();
            }
            if let Err(e) = result {
                st.writing = false;
                st.stopped = true;
                st.pending.clear();
                self.buffer_freed.notify_all();
                return Err(e);
            }
            if st.stopped || !st.pending.contains_key(&st.next) {
                st.writing = false;
                return Ok(());
            }
        }
    }

    /// Notes that the planner has run out of items and takes back a worker's buffer;
    /// wakes the workers waiting for buffers, which then have nothing left to do.
    pub(super) fn exhausted(&self, buf: Buf) {
        let mut st = self.lock();
        st.exhausted = true;
        st.free.push(buf);
        if st.waiters > 0 {
            self.buffer_freed.notify_all();
        }
    }

    /// Stops lending buffers and drops queued items (after an error elsewhere).
    pub(super) fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        st.pending.clear();
        self.buffer_freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::Sequencer;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    /// Workers following the convert protocol (buffer first, then the next index);
    /// returns the order in which items were written.
    fn run(workers: usize, limit: usize, items: u64, fail_at: Option<u64>) -> Vec<u64> {
        let q = Sequencer::<u64>::new(limit, 16);
        let next = AtomicU64::new(0);
        let written = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for w in 0..workers {
                let (q, next, written) = (&q, &next, &written);
                s.spawn(move || {
                    let mut spare = None;
                    loop {
                        let buf = match spare.take() {
                            Some(b) => b,
                            None => match q.take_buffer() {
                                Some(b) => b,
                                None => return,
                            },
                        };
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= items {
                            q.exhausted(buf);
                            return;
                        }
                        // Uneven read times, so items arrive out of order.
                        if (i + w as u64).is_multiple_of(3) {
                            std::thread::yield_now();
                        }
                        // Every fifth item has no data, as a quiet item in convert:
                        // its worker keeps the buffer for the next item.
                        let data = if i.is_multiple_of(5) {
                            spare = Some(buf);
                            None
                        } else {
                            let mut b = buf;
                            b[0] = i as u8;
                            Some(b)
                        };
                        let r = q.submit(i, i, data, |&it, b| {
                            if Some(it) == fail_at {
                                return Err(format!("write {it} failed"));
                            }
                            assert!(
                                b.is_empty() || b[0] == it as u8,
                                "item {it} got another's data"
                            );
                            written.lock().unwrap().push(it);
                            Ok(())
                        });
                        if r.is_err() {
                            q.stop();
                            return;
                        }
                    }
                });
            }
        });
        written.into_inner().unwrap()
    }

    #[test]
    fn writes_every_item_in_order() {
        for (workers, limit) in [(1, 1), (2, 4), (8, 3), (8, 10), (16, 2)] {
            let order = run(workers, limit, 300, None);
            assert_eq!(
                order,
                (0..300).collect::<Vec<_>>(),
                "{workers} workers, {limit} buffers"
            );
        }
    }

    #[test]
    fn a_write_error_stops_everyone() {
        let order = run(8, 4, 300, Some(37));
        assert_eq!(order, (0..37).collect::<Vec<_>>());
    }
}
