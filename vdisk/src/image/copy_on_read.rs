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
//!
//! The same behaviour is reachable as QEMU's filter node: `driver=copy-on-read` with
//! the image as its `file` child ([`unwrap_filter`]). Its `bottom` option names a
//! backing node (by `node-name`): only data that a layer between the top image's
//! backing file and that node (inclusive) provides is copied, as QEMU's
//! `cor_co_preadv_part` asks `bdrv_is_allocated_above(backing, bottom, include_base)`;
//! ranges no such layer allocates are read without a copy.

use super::Image;
use crate::error::{Invalid, Result};
use crate::format::{ExtentKind, ZeroFlags};
use crate::hook::{Payload, Request};
use crate::storage::options::{Node, SpecError, Value};
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
    /// The filter's `bottom` as a chain depth (1 = the top image's backing file):
    /// only data from layers `1..=bottom` is copied. `None`: everything is.
    bottom: Option<u32>,
}

/// What a `driver=copy-on-read` filter node asked for (see [`unwrap_filter`]).
#[derive(Debug)]
pub(super) struct Filter {
    /// `bottom`, resolved to a chain depth.
    bottom: Option<u32>,
}

impl Filter {
    /// The gate the image runs its copies through.
    pub(super) fn gate(&self) -> Gate {
        Gate {
            bottom: self.bottom,
            ..Gate::default()
        }
    }
}

/// When `tree` is QEMU's `copy-on-read` filter node, returns its `file` child as the
/// image's tree and the filter's settings; otherwise the tree unchanged. `read_only`:
/// the filter needs write access to its child, so a read-only open fails as QEMU's
/// does ("Block node is read-only").
pub(super) fn unwrap_filter(mut tree: Node, read_only: bool) -> Result<(Node, Option<Filter>)> {
    if !matches!(tree.get("driver"), Some(Value::Str(d)) if d == "copy-on-read") {
        return Ok((tree, None));
    }
    tree.take("driver");
    let _ = tree.take_str("node-name")?;
    let bottom = tree.take_str("bottom")?;
    let mut file = tree.take_node("file")?.ok_or_else(|| {
        SpecError::Missing("A block device must be specified for \"file\"".into())
    })?;
    tree.finish(|key| SpecError::FormatOption {
        format: "copy-on-read".into(),
        key,
    })?;
    if read_only {
        return Err(Invalid::CopyOnReadFilterReadOnly.into());
    }
    file.rebase(String::new());
    let depth = strip_node_names(&mut file, bottom.as_deref(), 0)?;
    let bottom = match (bottom, depth) {
        (None, _) => None,
        (Some(_), Some(d)) => Some(d),
        (Some(b), None) => return Err(Invalid::CopyOnReadBottomNotFound(b).into()),
    };
    Ok((file, Some(Filter { bottom })))
}

/// Removes `node-name` from `node` and the backing nodes below it (names only matter
/// to the filter's `bottom`; the chain layer has no named nodes), returning the depth
/// of the first node named `bottom`.
fn strip_node_names(node: &mut Node, bottom: Option<&str>, depth: u32) -> Result<Option<u32>> {
    let mine = node.take_str("node-name")?;
    let mut found = match (mine, bottom) {
        (Some(m), Some(b)) if m == b => Some(depth),
        _ => None,
    };
    if matches!(node.get("backing"), Some(Value::Node(_))) {
        if let Some(mut b) = node.take_node("backing")? {
            let below = strip_node_names(&mut b, bottom, depth + 1)?;
            found = found.or(below);
            node.insert("backing", Value::Node(b))?;
        }
    }
    Ok(found)
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
            let mut run = e.len.clamp(1, end - pos);
            let mut copy = e.kind == ExtentKind::Unallocated;
            if let (true, Some(bottom)) = (copy, gate.bottom) {
                // Only what the layers down to `bottom` provide (QEMU's filter).
                let c = self.block_status(pos, run)?;
                run = c.len.clamp(1, run);
                copy = c.kind != ExtentKind::Unallocated && c.depth <= bottom;
            }
            if copy {
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
