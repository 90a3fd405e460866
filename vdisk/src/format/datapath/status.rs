//! Block status through a backing chain: the walk down the layers, in the format layer
//! so that both the chain layer (`chain::block_status`) and zero detection inside a
//! format ([`super::zero`]) use it without a format calling up into the chain layer.

use crate::error::Result;
use crate::format::{Driver, ExtentKind};

/// Status of a guest range through the whole chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainExtent {
    /// Bytes covered (> 0).
    pub len: u64,
    /// Data, zero, or unallocated in every layer (reads as zeroes).
    pub kind: ExtentKind,
    /// Layer that decided: 0 = the top image. For unallocated, the last layer examined.
    pub depth: u32,
    /// Host offset in that layer's file, when contiguous.
    pub offset: Option<u64>,
    /// Stored compressed.
    pub compressed: bool,
}

/// Status of `[offset, offset+len)` starting at `offset`, walking down from `top`.
pub fn chain_status(top: &dyn Driver, offset: u64, len: u64) -> Result<ChainExtent> {
    let mut layer: &dyn Driver = top;
    let mut len = len;
    let mut depth = 0u32;
    loop {
        let e = layer.block_status(offset, len)?;
        len = e.len;
        if e.kind != ExtentKind::Unallocated {
            return Ok(ChainExtent {
                len,
                kind: e.kind,
                depth,
                offset: e.offset,
                compressed: e.compressed,
            });
        }
        match layer.backing() {
            Some(b) if offset < b.size() => {
                len = len.min(b.size() - offset);
                layer = &**b;
                depth += 1;
            }
            // Past the end of a shorter backing file: reads as zeroes.
            Some(_) => {
                return Ok(ChainExtent {
                    len,
                    kind: ExtentKind::Unallocated,
                    depth: depth + 1,
                    offset: None,
                    compressed: false,
                });
            }
            // A layer may name host space it keeps for unallocated data (qcow2
            // subclusters of an allocated cluster): reported, as QEMU does.
            None => {
                return Ok(ChainExtent {
                    len,
                    kind: ExtentKind::Unallocated,
                    depth,
                    offset: e.offset,
                    compressed: false,
                });
            }
        }
    }
}
