//! Guest reads.
//!
//! Concurrency: no lock beyond the shared quiesce lock; see `map` for why a stale
//! mapping answer is harmless to a reader.

use super::table::Entry;
use super::Inner;
use crate::error::Result;
use crate::format::{check_range, read_backing};
use std::sync::Arc;

/// Reads guest bytes.
pub(crate) fn read_at(inner: &Arc<Inner>, buf: &mut [u8], offset: u64) -> Result<()> {
    check_range(offset, buf.len() as u64, inner.image_size())?;
    let _q = inner.quiesce_shared();
    let mut pos = 0usize;
    while pos < buf.len() {
        let guest = offset + pos as u64;
        let run = inner.map(guest, (buf.len() - pos) as u64)?;
        let n = run.len as usize;
        let dst = &mut buf[pos..pos + n];
        match run.kind {
            Entry::Data(_) => inner.storage.read_at(dst, run.host)?,
            Entry::Zero => dst.fill(0),
            Entry::Unallocated => read_backing(inner.backing.as_ref(), dst, guest)?,
        }
        pos += n;
    }
    Ok(())
}
