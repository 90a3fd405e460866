//! Guest reads, through the generic data path ([`datapath::read_vectored`]) over QED's
//! mapping (`map`).
//!
//! Concurrency: no lock beyond the shared quiesce lock; a read racing an allocating
//! write of the same clusters sees the old contents (the L2 entry is only set once the
//! new cluster is complete) or the new ones, as for any unordered pair of requests.

use super::Inner;
use crate::error::Result;
use crate::format::check_range;
use crate::format::datapath;
use std::io::IoSliceMut;
use std::sync::Arc;

/// Reads guest bytes into `bufs` (consecutive guest bytes from `offset`).
pub(crate) fn read_vectored(
    inner: &Arc<Inner>,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> Result<()> {
    let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    check_range(offset, total, inner.image_size())?;
    let _q = inner.quiesce_shared();
    datapath::read_vectored(inner, bufs, offset)
}
