//! Committing the layers above a base into it (`qemu-img commit`'s copy step), on
//! open [`Image`]s: every range some layer above decides is written into the base,
//! data as data and zeroes as zeroes; ranges no layer above holds are left alone.
//!
//! Crash rules: the base receives ordinary guest writes (each format's allocation
//! ordering applies) and is flushed at the end; the layers above are only read, so a
//! crash at any point leaves them as they were and the base a mix of old and new
//! contents of ranges that all read the same through the chain. Emptying the top
//! afterwards ([`Image::make_empty`]) is a separate step the caller takes only once
//! this returned (the base durable).

use crate::format::{ExtentKind, ZeroFlags};
use crate::{Image, Result};

/// Bytes copied per step.
pub const CHUNK: u64 = 2 << 20;

/// The status of `[off, off + len)` above the base: the index of the first layer
/// (top first) that decides it and how, and the length of the run.
fn status_above(
    layers: &[Image],
    off: u64,
    len: u64,
) -> Result<(Option<(usize, ExtentKind)>, u64)> {
    let mut len = len;
    for (i, l) in layers.iter().enumerate() {
        if off >= l.size() {
            // Past the end of a layer the disk reads as zeroes.
            return Ok((Some((i, ExtentKind::Zero)), len));
        }
        let n = len.min(l.size() - off);
        let e = l.layer_block_status(off, n)?;
        let n = e.len.min(n).max(1);
        match e.kind {
            ExtentKind::Unallocated => len = n,
            k => return Ok((Some((i, k)), n)),
        }
    }
    Ok((None, len))
}

/// Copies what `above` (top first, each opened without its backing files) holds
/// over `[0, size)` into `base`, then flushes `base`. After each step
/// `step(offset_reached, data_bytes_copied)` is called (progress, rate limiting).
pub fn commit_into(
    above: &[Image],
    base: &Image,
    size: u64,
    step: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let mut copied = 0u64;
    let mut buf = vec![0u8; CHUNK.min(size.max(1)) as usize];
    let mut off = 0u64;
    while off < size {
        let (st, n) = status_above(above, off, (size - off).min(CHUNK))?;
        match st {
            Some((_, ExtentKind::Zero)) => base.write_zeroes(
                off,
                n,
                ZeroFlags {
                    may_unmap: true,
                    fast: false,
                },
            )?,
            Some((i, _)) => {
                let b = &mut buf[..n as usize];
                above[i].read_at(b, off)?;
                base.write_at(b, off)?;
                copied += n;
            }
            None => {}
        }
        off += n;
        step(off, copied);
    }
    base.flush()
}
