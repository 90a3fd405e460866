//! Refcount entries (every width from 1 to 64 bits), refcount blocks through the
//! cache, new refcount blocks and refcount-table growth.
//!
//! New structures are always self-describing and complete before anything points at
//! them: a new block is written (and flushed) before its table entry, a new table with
//! its blocks is flushed before the header switches to it, and the old table is only
//! freed afterwards.

use super::{Meta, MAX_HOST_OFFSET, REFT_OFFSET_MASK};
use crate::error::{Corruption, Error, NoSpace, Problem, Result, Structure};
use crate::format::qcow2::header::MAX_REFTABLE_BYTES;
use crate::storage::BlkEvent;

/// Reads entry `i` of a refcount block of width `1 << order` bits.
pub(crate) fn get_entry(block: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            let shift = (i % per_byte) * bits;
            u64::from(byte >> shift) & ((1u64 << bits) - 1)
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes([
            block[4 * i],
            block[4 * i + 1],
            block[4 * i + 2],
            block[4 * i + 3],
        ])),
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&block[8 * i..8 * i + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Writes entry `i` (the value must fit the width).
pub(crate) fn set_entry(block: &mut [u8], i: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((v as u8) << shift) & mask);
        }
        3 => block[i] = v as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

impl Meta {
    /// Marks the image corrupt (as `mark_corrupt`, which logs and sets the corrupt bit)
    /// and returns the typed corruption.
    fn corrupt_rc(&mut self, c: Corruption) -> Error {
        self.mark_corrupt(c)
    }

    /// Host offset of refcount block `bi`, 0 if it has none (or lies beyond the table).
    pub(crate) fn rc_block_offset(&self, bi: u64) -> u64 {
        self.rc_table
            .get(bi as usize)
            .map_or(0, |e| e & REFT_OFFSET_MASK)
    }

    /// Cache slot of the refcount block at `off`, loading it (and evicting) if needed.
    pub(crate) fn rc_slot(&mut self, off: u64) -> Result<usize> {
        if let Some(i) = self.rc.lookup(off) {
            return Ok(i);
        }
        if !off.is_multiple_of(self.cs()) || off >= MAX_HOST_OFFSET || off >= self.file_end {
            let c = Corruption::new(Structure::RefcountBlock, Problem::Misplaced).at(off);
            return Err(self.corrupt_rc(c));
        }
        if self.rc.full() {
            if let Some(v) = self.rc.victim() {
                if self.rc.slot(v).dirty {
                    let s = self.rc.slot(v);
                    self.st.event(BlkEvent::RefblockUpdatePart);
                    self.st.write_at(&s.data, s.offset)?;
                    self.unflushed = true;
                }
                self.rc.remove(v);
            }
        }
        let mut data = vec![0u8; self.cs() as usize];
        self.st.event(BlkEvent::RefblockLoad);
        self.st.read_at(&mut data, off)?;
        Ok(self.rc.insert(off, data, false))
    }

    /// Refcount of host cluster `c`.
    pub(crate) fn rc_get(&mut self, c: u64) -> Result<u64> {
        let bi = c >> self.g.rc_block_bits;
        let off = self.rc_block_offset(bi);
        if off == 0 {
            return Ok(0);
        }
        let i = self.rc_slot(off)?;
        let idx = (c & (self.g.rc_per_block - 1)) as usize;
        Ok(get_entry(&self.rc.slot(i).data, idx, self.g.rc_order))
    }

    /// Adds `delta` to the refcount of host cluster `c` (in cache). The block must exist
    /// for increments; a decrement below zero is a corruption.
    pub(crate) fn rc_add(&mut self, c: u64, delta: i64) -> Result<u64> {
        let bi = c >> self.g.rc_block_bits;
        let off = self.rc_block_offset(bi);
        if off == 0 {
            let c = Corruption::new(
                Structure::RefcountBlock,
                Problem::RefcountMissing { cluster: c },
            )
            .entry(bi);
            return Err(self.corrupt_rc(c));
        }
        let i = self.rc_slot(off)?;
        let idx = (c & (self.g.rc_per_block - 1)) as usize;
        let order = self.g.rc_order;
        let max = self.g.rc_max();
        let cur = get_entry(&self.rc.slot(i).data, idx, order);
        let new = if delta >= 0 {
            match cur.checked_add(delta as u64) {
                Some(n) if n <= max => n,
                _ => {
                    return Err(Error::NoSpace(NoSpace::RefcountOverflow {
                        cluster: c,
                        refcount: cur,
                        delta: delta as u64,
                        max,
                    }))
                }
            }
        } else {
            match cur.checked_sub(delta.unsigned_abs()) {
                Some(n) => n,
                None => {
                    let c = Corruption::new(
                        Structure::HostCluster,
                        Problem::RefcountUnderflow {
                            cluster: c,
                            refcount: cur,
                            delta,
                        },
                    )
                    .at(c * self.cs());
                    return Err(self.corrupt_rc(c));
                }
            }
        };
        let s = self.rc.slot_mut(i);
        set_entry(&mut s.data, idx, order, new);
        s.dirty = true;
        if new == 0 && c < self.free_hint {
            self.free_hint = c;
        }
        Ok(new)
    }

    /// Sets the refcount of `c` (repair). The block must exist.
    pub(crate) fn rc_set(&mut self, c: u64, v: u64) -> Result<()> {
        let mut cur = self.rc_get(c)?;
        // 64-bit refcounts can differ by more than an i64 holds: step (at most twice).
        while cur != v {
            let step = if v > cur {
                (v - cur).min(i64::MAX as u64) as i64
            } else {
                -((cur - v).min(i64::MAX as u64) as i64)
            };
            let next = self.rc_add(c, step)?;
            if next == cur {
                break;
            }
            cur = next;
        }
        Ok(())
    }

    /// Writes every dirty refcount block.
    pub(crate) fn write_rc_blocks(&mut self) -> Result<()> {
        for i in self.rc.dirty() {
            let s = self.rc.slot(i);
            self.st.event(BlkEvent::RefblockUpdatePart);
            self.st.write_at(&s.data, s.offset)?;
            self.rc.slot_mut(i).dirty = false;
            self.unflushed = true;
        }
        Ok(())
    }

    /// Points refcount table entry `bi` at the new block at `off`, in memory only once
    /// the entry is written: a failed write must not leave the table in memory pointing
    /// where the disk does not (refcount updates would go to an unreachable block).
    fn hook_rc_block(&mut self, bi: u64, off: u64) -> Result<()> {
        self.rc_table[bi as usize] = off;
        let r = self.write_rc_table_entry(bi);
        if r.is_err() {
            self.rc_table[bi as usize] = 0;
        }
        r
    }

    fn write_rc_table_entry(&mut self, bi: u64) -> Result<()> {
        let v = self.rc_table[bi as usize];
        self.st.event(BlkEvent::RefblockAllocHookup);
        self.st
            .write_at(&v.to_be_bytes(), self.hdr.refcount_table_offset + bi * 8)?;
        self.unflushed = true;
        Ok(())
    }

    /// Makes sure refcount block `bi` exists, allocating (and possibly growing the
    /// table). May allocate clusters, so callers searching for free space search again.
    pub(crate) fn ensure_rc_block(&mut self, bi: u64) -> Result<()> {
        // Each round creates one block or grows the table, so this is bounded by the
        // table size limit.
        for _ in 0..(MAX_REFTABLE_BYTES / 8 + 2) {
            if bi >= self.rc_table.len() as u64 {
                self.grow_rc_table(bi)?;
                continue;
            }
            if self.rc_block_offset(bi) != 0 {
                return Ok(());
            }
            self.st.event(BlkEvent::RefblockAlloc);
            let c = self.find_free(1)?;
            let cbi = c >> self.g.rc_block_bits;
            if cbi >= self.rc_table.len() as u64 {
                self.grow_rc_table(cbi)?;
                continue;
            }
            let cs = self.cs();
            let mut data = vec![0u8; cs as usize];
            if self.rc_block_offset(cbi) == 0 {
                // The new block describes itself.
                set_entry(
                    &mut data,
                    (c & (self.g.rc_per_block - 1)) as usize,
                    self.g.rc_order,
                    1,
                );
                self.st.event(BlkEvent::RefblockAllocWrite);
                self.st.write_at(&data, c * cs)?;
                self.st.flush()?;
                self.hook_rc_block(cbi, c * cs)?;
                self.rc.forget(c * cs);
                self.file_end = self.file_end.max((c + 1) * cs);
                continue;
            }
            self.rc_add(c, 1)?;
            let written = self.write_rc_blocks().and_then(|()| {
                self.st.event(BlkEvent::RefblockAllocWrite);
                self.st.write_at(&data, c * cs)?;
                Ok(self.st.flush()?)
            });
            if let Err(e) = written {
                // Nothing on disk points at the new block yet: give its cluster back.
                let _ = self.rc_add(c, -1);
                return Err(e);
            }
            // A failed hookup keeps the cluster counted (a leak at worst): the entry
            // may have reached the disk after all.
            self.hook_rc_block(bi, c * cs)?;
            self.rc.forget(c * cs);
            self.file_end = self.file_end.max((c + 1) * cs);
        }
        Err(Error::NoSpace(NoSpace::RefcountBlock))
    }

    /// Replaces the refcount table by a larger one that has an entry for block
    /// `need_bi`, placed with its own new refcount blocks after everything the old
    /// table covers.
    pub(crate) fn grow_rc_table(&mut self, need_bi: u64) -> Result<()> {
        self.st.event(BlkEvent::ReftableGrow);
        let cs = self.cs();
        let per = self.g.rc_per_block;
        let old_len = self.rc_table.len() as u64;
        let file_clusters = self.file_end.div_ceil(cs);
        let start = (old_len * per).max(file_clusters);
        let entries_per_cluster = cs / 8;
        let mut new_len = (need_bi + 1).max(old_len + old_len / 2).max(1);
        let mut nblocks = 0u64;
        let (first_bi, tclusters) = loop {
            let tclusters = (new_len * 8).div_ceil(cs);
            new_len = tclusters * entries_per_cluster;
            let total = nblocks + tclusters;
            let first = start / per;
            let last = (start + total - 1) / per;
            let need_blocks = last - first + 1;
            if need_blocks != nblocks {
                nblocks = need_blocks;
                continue;
            }
            if last >= new_len {
                new_len = last + 1;
                continue;
            }
            break (first, tclusters);
        };
        if new_len * 8 > MAX_REFTABLE_BYTES || (start + nblocks + tclusters) * cs > MAX_HOST_OFFSET
        {
            return Err(Error::NoSpace(NoSpace::RefcountTable(MAX_REFTABLE_BYTES)));
        }
        let total = nblocks + tclusters;
        let order = self.g.rc_order;
        // Blocks first, each counting the new clusters it covers.
        let mut new_table = self.rc_table.clone();
        new_table.resize(new_len as usize, 0);
        self.st.event(BlkEvent::RefblockAllocWriteBlocks);
        for k in 0..nblocks {
            let bi = first_bi + k;
            let mut data = vec![0u8; cs as usize];
            for c in start..start + total {
                if c / per == bi {
                    set_entry(&mut data, (c % per) as usize, order, 1);
                }
            }
            let off = (start + k) * cs;
            self.st.write_at(&data, off)?;
            new_table[bi as usize] = off;
        }
        let mut raw = Vec::with_capacity((tclusters * cs) as usize);
        for e in &new_table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        raw.resize((tclusters * cs) as usize, 0);
        let table_off = (start + nblocks) * cs;
        self.st.event(BlkEvent::RefblockAllocWriteTable);
        self.st.write_at(&raw, table_off)?;
        // Existing dirty blocks are still valid where they are; write them too so the
        // new structure is complete on disk before the header points to it.
        self.write_rc_blocks()?;
        self.st.flush()?;
        let mut h = [0u8; 12];
        h[..8].copy_from_slice(&table_off.to_be_bytes());
        h[8..].copy_from_slice(&(tclusters as u32).to_be_bytes());
        self.st.event(BlkEvent::RefblockAllocSwitchTable);
        self.st.write_at(&h, 48)?;
        self.st.flush()?;
        self.unflushed = false;
        let old_off = self.hdr.refcount_table_offset;
        let old_clusters = u64::from(self.hdr.refcount_table_clusters);
        self.hdr.refcount_table_offset = table_off;
        self.hdr.refcount_table_clusters = tclusters as u32;
        self.rc_table = new_table;
        self.file_end = self.file_end.max((start + total) * cs);
        // The header no longer points at the old table: it can go.
        for i in 0..old_clusters {
            let c = old_off / cs + i;
            if self.rc_get(c)? > 0 {
                self.rc_add(c, -1)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Refcount entries at every width (1 to 64 bits): bit layout, get/set round trips
    //! at the first, last and odd positions with neighbours untouched, the largest
    //! value, and overflow/underflow refused by `rc_add` on an image in memory.

    use super::*;
    use crate::format::qcow2::header::{Header, MAGIC};
    use crate::format::qcow2::Qcow2;
    use crate::format::{BackingSpec, DriverOptions};
    use crate::storage::MemStorage;
    use std::sync::Arc;

    /// Bytes of the test blocks (512 bits: 512 one-bit entries, 8 64-bit entries).
    const BLOCK: usize = 64;

    fn max_for(order: u32) -> u64 {
        if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << order)) - 1
        }
    }

    /// Deterministic noise so neighbours start out non-zero.
    fn noise(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn sub_byte_entries_fill_bytes_from_the_least_significant_bit() {
        let mut b = [0u8; 2];
        set_entry(&mut b, 0, 0, 1);
        assert_eq!(b, [0x01, 0]);
        set_entry(&mut b, 7, 0, 1);
        assert_eq!(b, [0x81, 0]);
        set_entry(&mut b, 8, 0, 1);
        assert_eq!(b, [0x81, 0x01]);

        let mut b = [0u8; 2];
        set_entry(&mut b, 1, 1, 3);
        set_entry(&mut b, 3, 1, 2);
        set_entry(&mut b, 4, 1, 1);
        assert_eq!(b, [0b1000_1100, 0b0000_0001]);

        let mut b = [0u8; 2];
        set_entry(&mut b, 1, 2, 0xa);
        set_entry(&mut b, 2, 2, 0x3);
        assert_eq!(b, [0xa0, 0x03]);
    }

    #[test]
    fn wide_entries_are_big_endian() {
        let mut b = [0u8; 16];
        set_entry(&mut b, 1, 3, 0xab);
        assert_eq!(b[..2], [0, 0xab]);
        let mut b = [0u8; 16];
        set_entry(&mut b, 1, 4, 0x1234);
        assert_eq!(b[..4], [0, 0, 0x12, 0x34]);
        let mut b = [0u8; 16];
        set_entry(&mut b, 1, 5, 0x1234_5678);
        assert_eq!(b[..8], [0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78]);
        let mut b = [0u8; 16];
        set_entry(&mut b, 1, 6, 0x0102_0304_0506_0708);
        assert_eq!(b[8..], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(b[..8], [0; 8]);
    }

    #[test]
    fn every_width_round_trips_with_neighbours_untouched() {
        for order in 0..=6u32 {
            let bits = 1usize << order;
            let n = BLOCK * 8 / bits;
            let max = max_for(order);
            let positions = [0, 1, 3, n / 2 + 1, n - 3, n - 2, n - 1];
            let values = [
                0,
                1,
                max,
                max - 1,
                0xaaaa_aaaa_aaaa_aaaa & max,
                0x5555_5555_5555_5555 & max,
            ];
            for (k, &i) in positions.iter().enumerate() {
                for &v in &values {
                    let mut b = noise((order as u64) << 32 | (k as u64) << 8 | v & 0xff);
                    let before_bytes = b.clone();
                    let before: Vec<u64> = (0..n).map(|j| get_entry(&b, j, order)).collect();
                    set_entry(&mut b, i, order, v);
                    let what = format!("width {bits}, entry {i}, value {v:#x}");
                    assert_eq!(get_entry(&b, i, order), v, "{what}");
                    for j in (0..n).filter(|&j| j != i) {
                        assert_eq!(get_entry(&b, j, order), before[j], "{what}: entry {j}");
                    }
                    // Only the byte(s) holding entry i may change.
                    let (lo, hi) = if bits < 8 {
                        (i * bits / 8, i * bits / 8 + 1)
                    } else {
                        (i * bits / 8, (i + 1) * bits / 8)
                    };
                    assert_eq!(b[..lo], before_bytes[..lo], "{what}: bytes before");
                    assert_eq!(b[hi..], before_bytes[hi..], "{what}: bytes after");
                    // Setting the old value back restores the block exactly.
                    set_entry(&mut b, i, order, before[i]);
                    assert_eq!(b, before_bytes, "{what}: restore");
                }
            }
        }
    }

    #[test]
    fn every_entry_of_a_block_is_independent() {
        for order in 0..=6u32 {
            let n = (BLOCK * 8) >> order;
            let max = max_for(order);
            let mut b = vec![0u8; BLOCK];
            let value = |j: usize| (j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
            for j in 0..n {
                set_entry(&mut b, j, order, value(j));
            }
            for j in 0..n {
                assert_eq!(
                    get_entry(&b, j, order),
                    value(j),
                    "order {order}, entry {j}"
                );
            }
            for j in 0..n {
                set_entry(&mut b, j, order, max);
            }
            assert!(b.iter().all(|&x| x == 0xff), "order {order}: all max");
        }
    }

    /// A version 3 image of 512-byte clusters with refcount width `1 << order`: header,
    /// refcount table, one refcount block (clusters 0-2 counted once), no L1 entries.
    fn image(order: u32) -> Vec<u8> {
        let mut b = vec![0u8; 3 * 512];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&9u32.to_be_bytes());
        b[48..56].copy_from_slice(&512u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&order.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b[512..520].copy_from_slice(&1024u64.to_be_bytes());
        for c in 0..3 {
            set_entry(&mut b[1024..], c, order, 1);
        }
        assert_eq!(
            Header::parse(&b, b.len() as u64).unwrap().refcount_order,
            order
        );
        b
    }

    fn open(bytes: Vec<u8>) -> (Arc<MemStorage>, Qcow2) {
        let mem = Arc::new(MemStorage::from_vec(bytes));
        let q = Qcow2::open(
            mem.clone(),
            &DriverOptions::default(),
            &mut |_: &BackingSpec| Err(crate::error::Invalid::BackingDisabled.into()),
        )
        .unwrap();
        (mem, q)
    }

    /// Adds `n` to the refcount of `c` in steps that fit `rc_add`'s `i64`.
    fn add(m: &mut Meta, c: u64, mut n: u64) -> Result<u64> {
        let mut v = m.rc_get(c)?;
        while n > 0 {
            let step = n.min(i64::MAX as u64);
            v = m.rc_add(c, step as i64)?;
            n -= step;
        }
        Ok(v)
    }

    #[test]
    fn rc_add_reaches_the_maximum_and_refuses_overflow_at_every_width() {
        for order in 0..=6u32 {
            let max = max_for(order);
            let (mem, q) = open(image(order));
            let mut m = q.lock();
            assert_eq!(m.g.rc_max(), max, "order {order}");
            let per_block = (512 * 8) >> order;
            assert_eq!(m.g.rc_per_block, per_block);
            for c in 0..3 {
                assert_eq!(m.rc_get(c).unwrap(), 1, "order {order}, cluster {c}");
            }
            assert_eq!(m.rc_get(3).unwrap(), 0);
            // Beyond the one block: no block, refcount 0.
            assert_eq!(m.rc_get(per_block).unwrap(), 0);

            let last = per_block - 1;
            for c in [5, last] {
                assert_eq!(
                    add(&mut m, c, max).unwrap(),
                    max,
                    "order {order}, cluster {c}"
                );
                assert!(m.rc_add(c, 1).is_err(), "order {order}: overflow accepted");
                assert_eq!(
                    m.rc_get(c).unwrap(),
                    max,
                    "order {order}: changed by a refusal"
                );
            }
            if order < 6 {
                assert!(m.rc_add(3, max as i64 + 1).is_err(), "order {order}");
                assert_eq!(m.rc_get(3).unwrap(), 0);
            }
            assert_eq!(m.rc_get(4).unwrap(), 0, "order {order}: neighbour");
            assert_eq!(m.rc_get(6).unwrap(), 0, "order {order}: neighbour");
            assert_eq!(m.rc_get(2).unwrap(), 1, "order {order}: neighbour");
            assert_eq!(m.rc_add(5, -1).unwrap(), max - 1);
            assert_eq!(m.rc_add(5, 1).unwrap(), max);

            // On disk, the block holds exactly those values at that width.
            m.write_rc_blocks().unwrap();
            let disk = mem.to_vec();
            let block = &disk[1024..1536];
            for c in 0..per_block as usize {
                let want = match c {
                    0..=2 => 1,
                    5 => max,
                    c if c as u64 == last => max,
                    _ => 0,
                };
                assert_eq!(
                    get_entry(block, c, order),
                    want,
                    "order {order}, cluster {c}"
                );
            }
        }
    }

    #[test]
    fn rc_add_refuses_to_drop_below_zero() {
        for order in 0..=6u32 {
            let (_mem, q) = open(image(order));
            let mut m = q.lock();
            assert!(m.rc_add(3, -1).is_err(), "order {order}");
            assert_eq!(m.rc_get(3).unwrap(), 0);
            assert!(m.rc_add(1, -2).is_err(), "order {order}");
            assert_eq!(m.rc_get(1).unwrap(), 1);
        }
    }

    #[test]
    fn rc_add_without_a_block_is_refused() {
        let (_mem, q) = open(image(4));
        let mut m = q.lock();
        let c = m.g.rc_per_block;
        assert!(m.rc_add(c, 1).is_err());
        assert!(m.rc_add(u64::MAX, 1).is_err());
    }
}
