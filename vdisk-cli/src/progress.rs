//! qemu-img's `-p` progress: `    (NN.NN/100%)\r` on stdout, from 0.00 at the start,
//! again each time at least one more percent is done, and 100.00 with a newline at the
//! end, whether or not stdout is a terminal, so scripts that read qemu-img's progress
//! read vdisk's.

use std::io::Write;
use std::sync::Mutex;

/// Least progress (percent) that prints a new line, as qemu-img's `-p`.
const MIN_STEP: f64 = 1.0;

/// A progress report; does nothing when off (no `-p`, or `-q`).
#[derive(Debug)]
pub struct Progress {
    on: bool,
    total: u64,
    /// The last percentage printed.
    last: Mutex<f64>,
}

impl Progress {
    /// Starts a report over `total` units (prints 0.00 when on).
    pub fn start(on: bool, total: u64) -> Progress {
        let p = Progress {
            on,
            total,
            last: Mutex::new(0.0),
        };
        p.print(0.0);
        p
    }

    /// `done` of the total units are done.
    pub fn set(&self, done: u64) {
        if !self.on {
            return;
        }
        let pct = if self.total == 0 {
            100.0
        } else {
            (done.min(self.total) as f64 * 100.0) / self.total as f64
        };
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if pct - *last >= MIN_STEP {
            *last = pct;
            drop(last);
            self.print(pct);
        }
    }

    /// The work is done: prints 100.00 and ends the line.
    pub fn finish(&self) {
        self.hundred();
        self.end();
    }

    /// Prints 100.00 without ending the line (`commit` ends it only after emptying
    /// the top image, as qemu-img does).
    pub fn hundred(&self) {
        self.print(100.0);
    }

    /// qemu's `qemu_progress_print(current, 0)`: an absolute percentage computed in
    /// single precision, printed when it moves more than one percent away from the
    /// last one printed, and always when it is exactly 0 or 100 (so those repeat, as
    /// in qemu-img's `amend -p`).
    pub fn absolute(&self, current: f32) {
        if !self.on {
            return;
        }
        let current = current.min(100.0);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // The comparisons are qemu's, in f32: the last value printed is kept at the
        // precision it was computed in.
        let prev = *last as f32;
        if current > prev + MIN_STEP as f32
            || current < prev - MIN_STEP as f32
            || current == 0.0
            || current == 100.0
        {
            *last = f64::from(current);
            drop(last);
            self.print(f64::from(current));
        }
    }

    /// qemu-img's `amend` status callback: `offset` of `total` units done, as the
    /// percentage `100.f * offset / total` in single precision.
    pub fn amend_status(&self, offset: u64, total: u64) {
        if total > 0 {
            self.absolute(100.0f32 * offset as f32 / total as f32);
        }
    }

    /// Ends the line without a last report (qemu-img's `compare`, and any command
    /// that stops early).
    pub fn end(&self) {
        if self.on {
            crate::outln!();
        }
    }

    fn print(&self, pct: f64) {
        if self.on {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "    ({pct:.2}/100%)\r");
            let _ = out.flush();
        }
    }
}
