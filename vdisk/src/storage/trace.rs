//! Fault injection for crash simulation.
//!
//! [`TraceStorage`] behaves like a file and records every write-like operation and every
//! flush in order. A crash "at point k" is rebuilt offline by [`Trace::crash_image`]: all
//! operations up to the last flush before `k` are durable; of the operations between that
//! flush and `k`, the selector decides which reached the disk (none, all, or any subset),
//! which models a power loss with a volatile write cache that reorders.

use super::mem::{apply_write, apply_zero, read_from};
use super::{Storage, StorageResult};
use std::sync::{Mutex, RwLock};

/// One recorded storage operation.
#[derive(Clone, Debug)]
pub enum TraceOp {
    /// Bytes written at an offset.
    Write(u64, Vec<u8>),
    /// Size changed.
    SetLen(u64),
    /// Range zeroed (punch hole / zero range) without changing the size,
    /// unless the range runs past the end, in which case it extends.
    Zero(u64, u64),
    /// Everything before this is durable.
    Flush,
}

/// The recorded history of a storage.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Contents when recording started.
    pub initial: Vec<u8>,
    /// Operations in the order they completed.
    pub ops: Vec<TraceOp>,
}

fn apply(v: &mut Vec<u8>, op: &TraceOp) {
    match op {
        TraceOp::Write(off, data) => apply_write(v, data, *off),
        TraceOp::SetLen(len) => v.resize(*len as usize, 0),
        TraceOp::Zero(off, len) => {
            if v.len() < (off + len) as usize {
                v.resize((off + len) as usize, 0);
            }
            apply_zero(v, *off, *len)
        }
        TraceOp::Flush => {}
    }
}

impl Trace {
    /// Number of crash points (one before each op and one at the end).
    pub fn points(&self) -> usize {
        self.ops.len() + 1
    }

    /// Index of the last flush among the first `k` ops (0 if none).
    pub fn durable_prefix(&self, k: usize) -> usize {
        self.ops[..k]
            .iter()
            .rposition(|o| matches!(o, TraceOp::Flush))
            .map_or(0, |i| i + 1)
    }

    /// The disk contents after a power loss when only the first `k` ops had been issued.
    /// `keep(i)` decides whether unflushed op `i` (an index into `ops`) reached the disk.
    pub fn crash_image(&self, k: usize, mut keep: impl FnMut(usize) -> bool) -> Vec<u8> {
        let durable = self.durable_prefix(k);
        let mut v = self.initial.clone();
        for op in &self.ops[..durable] {
            apply(&mut v, op);
        }
        for i in durable..k {
            if keep(i) {
                apply(&mut v, &self.ops[i]);
            }
        }
        v
    }
}

/// Storage that records what happens to it, for crash simulation.
#[derive(Debug)]
pub struct TraceStorage {
    data: RwLock<Vec<u8>>,
    trace: Mutex<Trace>,
}

impl TraceStorage {
    /// Starts recording on top of `initial` contents.
    pub fn new(initial: Vec<u8>) -> TraceStorage {
        TraceStorage {
            data: RwLock::new(initial.clone()),
            trace: Mutex::new(Trace {
                initial,
                ops: Vec::new(),
            }),
        }
    }
    /// A copy of the trace so far.
    pub fn trace(&self) -> Trace {
        self.trace.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Number of ops recorded so far (the crash point "now").
    pub fn point(&self) -> usize {
        self.trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ops
            .len()
    }
    /// Current contents (as if nothing crashed).
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn record(&self, op: TraceOp) {
        // Apply and record under the trace lock so the order in the trace is the order of
        // effects on the data.
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        apply(
            &mut self.data.write().unwrap_or_else(|p| p.into_inner()),
            &op,
        );
        t.ops.push(op);
    }
}

impl Storage for TraceStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        read_from(
            &self.data.read().unwrap_or_else(|p| p.into_inner()),
            buf,
            offset,
        );
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        self.record(TraceOp::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> StorageResult<()> {
        self.record(TraceOp::Flush);
        Ok(())
    }
    fn len(&self) -> StorageResult<u64> {
        Ok(self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> StorageResult<()> {
        self.record(TraceOp::SetLen(len));
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()> {
        let flen = self.len()?;
        let end = (offset + len).min(flen);
        if end > offset {
            self.record(TraceOp::Zero(offset, end - offset));
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.record(TraceOp::Zero(offset, len));
        Ok(())
    }
    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()> {
        if self.len()? < offset + len {
            self.record(TraceOp::SetLen(offset + len));
        }
        Ok(())
    }
}
