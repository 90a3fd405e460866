//! A bounded LRU cache of metadata clusters (L2 tables, refcount blocks), kept as the
//! on-disk big-endian bytes so write-back is a plain copy.
//!
//! The cache only stores; the ordering of write-backs (refcounts before L2 tables) is
//! decided by the owner, which is why eviction hands the victim back instead of
//! writing it itself.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Keys are cluster-aligned host offsets from our own tables: a multiplicative hash
/// spreads them well and is much cheaper than SipHash on this hot path (every guest
/// request looks up its L2 table).
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        // The low bits of an offset are zero: fold the high half of the product down.
        let x = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 32);
    }
}

type OffsetMap = HashMap<u64, usize, BuildHasherDefault<OffsetHasher>>;

/// One cached cluster.
#[derive(Debug)]
pub struct Slot {
    /// Host offset of the cluster.
    pub offset: u64,
    /// Its bytes.
    pub data: Vec<u8>,
    /// Modified since it was last written.
    pub dirty: bool,
    used: u64,
}

/// LRU cache of clusters keyed by host offset.
#[derive(Debug)]
pub struct Cache {
    map: OffsetMap,
    slots: Vec<Slot>,
    cap: usize,
    tick: u64,
}

impl Cache {
    /// A cache holding at most `cap` clusters (at least 2).
    pub fn new(cap: usize) -> Cache {
        Cache {
            map: OffsetMap::default(),
            slots: Vec::new(),
            cap: cap.max(2),
            tick: 0,
        }
    }

    /// Index of the cached cluster at `offset`, marking it recently used.
    pub fn lookup(&mut self, offset: u64) -> Option<usize> {
        let i = *self.map.get(&offset)?;
        self.tick += 1;
        self.slots[i].used = self.tick;
        Some(i)
    }

    /// Whether inserting needs an eviction first.
    pub fn full(&self) -> bool {
        self.slots.len() >= self.cap
    }

    /// The least recently used slot (the eviction victim when full).
    pub fn victim(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.used)
            .map(|(i, _)| i)
    }

    /// Removes slot `i` (which must be clean or already written).
    pub fn remove(&mut self, i: usize) -> Slot {
        let s = self.slots.swap_remove(i);
        self.map.remove(&s.offset);
        if i < self.slots.len() {
            let moved = self.slots[i].offset;
            self.map.insert(moved, i);
        }
        s
    }

    /// Drops the cluster at `offset` if cached (it was freed or rewritten elsewhere).
    pub fn forget(&mut self, offset: u64) {
        if let Some(&i) = self.map.get(&offset) {
            self.remove(i);
        }
    }

    /// Inserts a cluster (the caller made room); returns its index.
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) -> usize {
        self.tick += 1;
        if let Some(&i) = self.map.get(&offset) {
            let s = &mut self.slots[i];
            s.data = data;
            s.dirty |= dirty;
            s.used = self.tick;
            return i;
        }
        self.slots.push(Slot {
            offset,
            data,
            dirty,
            used: self.tick,
        });
        let i = self.slots.len() - 1;
        self.map.insert(offset, i);
        i
    }

    /// Slot `i`.
    pub fn slot(&self, i: usize) -> &Slot {
        &self.slots[i]
    }

    /// Slot `i`, mutable.
    pub fn slot_mut(&mut self, i: usize) -> &mut Slot {
        &mut self.slots[i]
    }

    /// Indices of dirty slots, in host offset order (sequential write-back).
    pub fn dirty(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].dirty)
            .collect();
        v.sort_by_key(|&i| self.slots[i].offset);
        v
    }

    /// Drops everything (after a rebuild).
    pub fn clear(&mut self) {
        self.map.clear();
        self.slots.clear();
    }
}
