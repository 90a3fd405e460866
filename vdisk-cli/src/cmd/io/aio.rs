//! Asynchronous requests and blkdebug breakpoints: qemu-io's `aio_read`/`aio_write`
//! next to `break`, `wait_break`, `resume` and `remove_break`.
//!
//! While the image's blkdebug filter has a breakpoint set (or a request stopped at
//! one), `aio_read`/`aio_write` run on their own threads so that one can wait at the
//! breakpoint while later commands run. Their completions are reported on the command
//! thread where qemu-io's single-threaded main loop would see them: before the next
//! command, while `wait_break` and `aio_flush` wait, and before the image closes.
//! Without breakpoints the requests complete inside their command, as before.
//!
//! blkdebug's own lines (`blkdebug: Suspended request 'A'`, `... Resuming ...`) are
//! printed here, by the front-end: the library never prints.

use super::buffer::IoBuf;
use std::collections::HashSet;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vdisk::storage::blkdebug::MAX_SUSPEND;
use vdisk::{Image, ZeroFlags};

/// What an asynchronous request does.
pub(super) enum Job {
    /// Read `len` bytes.
    Read { len: u64 },
    /// Write `len` bytes of `pattern`.
    Write { len: u64, pattern: u8, fua: bool },
    /// Zero `len` bytes.
    Zeroes {
        len: u64,
        flags: ZeroFlags,
        fua: bool,
    },
}

/// How a completion is reported (the request's options).
#[derive(Clone, Copy)]
pub(super) struct Report {
    /// The command's name as its failure message gives it (`readv`, `aio_write`).
    pub op: &'static str,
    pub offset: u64,
    pub len: u64,
    pub pattern: Option<u8>,
    pub dump: bool,
    pub quiet: bool,
    pub machine: bool,
}

/// A finished request: its report and outcome (a read's bytes and whether they
/// matched the pattern).
pub(super) struct Done {
    pub report: Report,
    pub result: vdisk::Result<Option<IoBuf>>,
    pub elapsed: Duration,
    pub write: bool,
    /// Submission order.
    seq: u64,
}

/// The requests of one open image still running, and the suspensions announced.
pub struct Queue {
    tx: Sender<Done>,
    rx: Receiver<Done>,
    in_flight: usize,
    submitted: u64,
    announced: HashSet<u64>,
}

impl Default for Queue {
    fn default() -> Self {
        let (tx, rx) = channel();
        Queue {
            tx,
            rx,
            in_flight: 0,
            submitted: 0,
            announced: HashSet::new(),
        }
    }
}

/// Whether `img` has breakpoints that asynchronous requests must be able to wait at.
pub(super) fn wanted(img: &Image) -> bool {
    img.blkdebug().is_some_and(|b| b.has_breakpoints())
}

impl Queue {
    /// Starts `job` at `offset` on its own thread.
    pub(super) fn submit(&mut self, img: &Arc<Image>, job: Job, report: Report) {
        let (img, tx) = (img.clone(), self.tx.clone());
        let offset = report.offset;
        let seq = self.submitted;
        self.submitted += 1;
        self.in_flight += 1;
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let write = !matches!(job, Job::Read { .. });
            let result = run(&img, job, offset);
            // The image is let go before the completion is seen, so that a close or
            // reopen right after finds no other user holding it (and its locks).
            drop(img);
            let _ = tx.send(Done {
                report,
                result,
                elapsed: t0.elapsed(),
                write,
                seq,
            });
        });
    }

    /// Reports the requests finished so far and the suspensions not yet announced.
    pub(super) fn poll(&mut self, img: &Image, print: &mut impl FnMut(Done)) {
        self.announce(img);
        while let Ok(d) = self.rx.try_recv() {
            self.in_flight -= 1;
            print(d);
            self.announce(img);
        }
    }

    /// Waits until every request finished, reporting each (`aio_flush`, close). A
    /// request held at a breakpoint goes on by itself after blkdebug's bound. What
    /// finishes while waiting is reported in submission order: requests that waited
    /// on one another (two allocations of one cluster) finish in that order in
    /// qemu-io, and threads must not make the order vary.
    pub(super) fn drain(&mut self, img: &Image, print: &mut impl FnMut(Done)) {
        self.poll(img, print);
        let end = Instant::now() + MAX_SUSPEND + Duration::from_secs(60);
        let mut done = Vec::new();
        while self.in_flight > 0 {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(d) => {
                    self.in_flight -= 1;
                    done.push(d);
                    self.announce(img);
                }
                Err(RecvTimeoutError::Timeout) if !left.is_zero() => self.announce(img),
                Err(_) => break,
            }
        }
        done.sort_by_key(|d| d.seq);
        done.into_iter().for_each(print);
    }

    /// `wait_break TAG`: reports completions until a request is stopped at `tag`;
    /// false when none stops there within blkdebug's bound (qemu-io would wait
    /// forever).
    pub(super) fn wait_break(
        &mut self,
        img: &Image,
        tag: &str,
        print: &mut impl FnMut(Done),
    ) -> bool {
        let Some(bd) = img.blkdebug() else {
            return false;
        };
        let end = Instant::now() + MAX_SUSPEND;
        loop {
            self.poll(img, print);
            if bd.wait_suspended(tag, Duration::from_millis(20)) {
                self.announce(img);
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
        }
    }

    /// Prints `blkdebug: Suspended request 'TAG'` once for each newly stopped request.
    pub(super) fn announce(&mut self, img: &Image) {
        let Some(bd) = img.blkdebug() else {
            return;
        };
        for (tag, ticket) in bd.suspended() {
            if self.announced.insert(ticket) {
                out!("blkdebug: Suspended request '{tag}'");
            }
        }
    }
}

fn run(img: &Image, job: Job, offset: u64) -> vdisk::Result<Option<IoBuf>> {
    match job {
        Job::Read { len } => {
            let mut buf = IoBuf::new(len)?;
            img.read_at(&mut buf, offset)?;
            Ok(Some(buf))
        }
        Job::Write { len, pattern, fua } => {
            let mut buf = IoBuf::new(len)?;
            buf.fill(pattern);
            img.write_at(&buf, offset)?;
            if fua {
                img.flush()?;
            }
            Ok(None)
        }
        Job::Zeroes { len, flags, fua } => {
            img.write_zeroes(offset, len, flags)?;
            if fua {
                img.flush()?;
            }
            Ok(None)
        }
    }
}
