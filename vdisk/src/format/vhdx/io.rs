//! Guest reads, writes, zero writes, block status and check through the VHDX BAT.

use super::metadata::bat_index;
use super::{
    bad, Vhdx, OFFSET_MASK, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT,
    PAYLOAD_UNDEFINED, PAYLOAD_UNMAPPED, PAYLOAD_UNMAPPED_V095, PAYLOAD_ZERO, STATE_MASK,
};
use crate::error::{Result, Structure, Unsupported, VhdxProblem, ZeroLimit};
use crate::format::{CheckReport, Extent, ExtentKind, Finding, FindingKind, ZeroFlags};

/// What the BAT says about one payload block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    /// Reads as zeroes (not present, zero, unmapped, undefined).
    Zero,
    /// Data at this file offset.
    Data(u64),
}

fn block_of(v: &Vhdx, block: u64) -> Result<Block> {
    let idx = bat_index(&v.md, block) as usize;
    let e = v.bat().get(idx).copied().unwrap_or(0);
    match e & STATE_MASK {
        PAYLOAD_NOT_PRESENT
        | PAYLOAD_UNDEFINED
        | PAYLOAD_ZERO
        | PAYLOAD_UNMAPPED
        | PAYLOAD_UNMAPPED_V095 => Ok(Block::Zero),
        PAYLOAD_FULLY_PRESENT => {
            let off = e & OFFSET_MASK;
            if off < super::header::HEADER_SECTION_END {
                return Err(bad(
                    Structure::VhdxBat,
                    VhdxProblem::BlockOffset { block, offset: off },
                ));
            }
            Ok(Block::Data(off))
        }
        PAYLOAD_PARTIALLY_PRESENT => Err(bad(
            Structure::VhdxBat,
            VhdxProblem::PartiallyPresent { block },
        )),
        s => Err(bad(
            Structure::VhdxBat,
            VhdxProblem::BatState { block, state: s },
        )),
    }
}

/// Reads guest bytes.
pub(super) fn read(v: &Vhdx, buf: &mut [u8], offset: u64) -> Result<()> {
    let bs = v.md.block_size as u64;
    let mut pos = 0usize;
    while pos < buf.len() {
        let off = offset + pos as u64;
        let in_b = off % bs;
        let n = ((bs - in_b) as usize).min(buf.len() - pos);
        match block_of(v, off / bs)? {
            Block::Zero => buf[pos..pos + n].fill(0),
            Block::Data(h) => v.storage.read_at(&mut buf[pos..pos + n], h + in_b)?,
        }
        pos += n;
    }
    Ok(())
}

/// Writes guest bytes.
pub(super) fn write(v: &Vhdx, buf: &[u8], offset: u64) -> Result<()> {
    let bs = v.md.block_size as u64;
    let mut pos = 0usize;
    while pos < buf.len() {
        let off = offset + pos as u64;
        let block = off / bs;
        let in_b = off % bs;
        let n = ((bs - in_b) as usize).min(buf.len() - pos);
        let data = &buf[pos..pos + n];
        match block_of(v, block)? {
            Block::Data(h) => v.storage.write_at(data, h + in_b)?,
            Block::Zero => allocate(v, block, in_b, data)?,
        }
        pos += n;
    }
    Ok(())
}

/// Appends a payload block (the file grows by a block of zeroes, 1 MiB aligned),
/// writes `data` into it, makes it durable, then points the BAT entry at it.
fn allocate(v: &Vhdx, block: u64, in_b: u64, data: &[u8]) -> Result<()> {
    let _a = v.alloc.lock().unwrap_or_else(|p| p.into_inner());
    if let Block::Data(h) = block_of(v, block)? {
        return Ok(v.storage.write_at(data, h + in_b)?);
    }
    let bs = v.md.block_size as u64;
    let host = v.storage.len()?.div_ceil(1 << 20) << 20;
    let end = host
        .checked_add(bs)
        .filter(|e| *e <= i64::MAX as u64)
        .ok_or_else(|| {
            bad(
                Structure::VhdxBat,
                VhdxProblem::BlockOffset {
                    block,
                    offset: host,
                },
            )
        })?;
    v.storage.set_len(end)?;
    v.storage.write_at(data, host + in_b)?;
    v.storage.flush()?;
    set_entry(v, block, host | PAYLOAD_FULLY_PRESENT)
}

/// Sets the BAT entry of `block` (in memory and in the file). Allocation lock held.
fn set_entry(v: &Vhdx, block: u64, value: u64) -> Result<()> {
    let idx = bat_index(&v.md, block);
    v.storage
        .write_at(&value.to_le_bytes(), v.bat_offset + idx * 8)?;
    let mut bat = v.bat.write().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = bat.get_mut(idx as usize) {
        *e = value;
    }
    Ok(())
}

/// Makes a range read as zeroes: blocks that already do are left alone; the rest is
/// written as zero bytes (qemu's VHDX driver has no zero write of its own).
pub(super) fn write_zeroes(v: &Vhdx, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
    let bs = v.md.block_size as u64;
    let end = offset + len;
    let mut off = offset;
    let z = vec![0u8; bs.min(len).min(1 << 20) as usize];
    while off < end {
        let in_b = off % bs;
        let n = (bs - in_b).min(end - off);
        if let Block::Data(h) = block_of(v, off / bs)? {
            if flags.fast {
                return Err(Unsupported::ZeroesNeedData(ZeroLimit::VmdkGrain).into());
            }
            let mut done = 0;
            while done < n {
                let k = (n - done).min(z.len() as u64) as usize;
                v.storage.write_at(&z[..k], h + in_b + done)?;
                done += k as u64;
            }
        }
        off += n;
    }
    Ok(())
}

/// Status of the range at `offset`: runs of blocks with the same state (contiguous
/// for data).
pub(super) fn block_status(v: &Vhdx, offset: u64, len: u64) -> Result<Extent> {
    let bs = v.md.block_size as u64;
    let first = block_of(v, offset / bs)?;
    let in_b = offset % bs;
    let mut n = (bs - in_b).min(len);
    let mut steps = 0;
    while n < len && steps < 65536 {
        let next = block_of(v, (offset + n) / bs)?;
        let same = match (first, next) {
            (Block::Zero, Block::Zero) => true,
            (Block::Data(a), Block::Data(b)) => b == a + in_b + n,
            _ => false,
        };
        if !same {
            break;
        }
        n = (n + bs).min(len);
        steps += 1;
    }
    Ok(match first {
        Block::Zero => Extent {
            len: n,
            kind: ExtentKind::Zero,
            offset: None,
            compressed: false,
        },
        Block::Data(h) => Extent {
            len: n,
            kind: ExtentKind::Data,
            offset: Some(h + in_b),
            compressed: false,
        },
    })
}

/// qemu's `vhdx_check_bat_entries`: every present entry (payload or bitmap, by BAT
/// index `i`) must start inside the file and, but for a short last block
/// (`min(block, disk - i * block)` bytes), end inside it, and payload blocks must not
/// overlap the header section, the log, the BAT or the metadata. Returns the BAT
/// indices at fault with the offsets.
pub(super) fn bat_errors(v: &Vhdx) -> Result<Vec<(u64, u64)>> {
    let file_len = v.storage.len()?;
    let bs = v.md.block_size as u64;
    let ratio = super::metadata::chunk_ratio(&v.md);
    let bat = v.bat();
    let mut out = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        if e & STATE_MASK != PAYLOAD_FULLY_PRESENT {
            continue;
        }
        let i = i as u64;
        let off = e & OFFSET_MASK;
        let len = bs.min(v.md.size.saturating_sub(i.saturating_mul(bs)));
        let payload = !(i + 1).is_multiple_of(ratio + 1);
        let overlaps = payload
            && v.reserved
                .iter()
                .any(|&(a, l)| off < a + l && a < off.saturating_add(bs));
        if off >= file_len || off.saturating_add(len) > file_len || overlaps {
            out.push((i, off));
            if out.len() >= 1 << 16 {
                break;
            }
        }
    }
    Ok(out)
}

/// qemu's `vhdx_co_check`: a replayed log counts as a fixed corruption; each bad BAT
/// entry ([`bat_errors`]) is a corruption.
pub(super) fn check(v: &Vhdx) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    if v.replayed {
        r.corruptions_fixed += 1;
    }
    for (i, off) in bat_errors(v)? {
        r.corruptions += 1;
        r.push(
            Finding::new(FindingKind::ReferencePastEnd, Structure::VhdxBat)
                .entry(i)
                .at(off),
        );
    }
    Ok(r)
}
