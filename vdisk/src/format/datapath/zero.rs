//! Zero detection without reading data: QEMU's `is_zero` rule, used to decide whether a
//! partial-cluster zero write may set a zero flag instead of writing zero bytes.

use super::status::chain_status;
use crate::error::Result;
use crate::format::{Driver, ExtentKind};

/// Whether guest `[off, off + len)` of `top` (clipped to its size) reads as zeroes
/// according to block status through the chain: zero or unallocated in every layer
/// counts, data never does (its bytes are not looked at).
pub fn is_zero(top: &dyn Driver, mut off: u64, len: u64) -> Result<bool> {
    let end = off.saturating_add(len).min(top.size());
    while off < end {
        let e = chain_status(top, off, end - off)?;
        if e.kind == ExtentKind::Data {
            return Ok(false);
        }
        off += e.len.clamp(1, end - off);
    }
    Ok(true)
}
