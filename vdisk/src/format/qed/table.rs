//! L1/L2 tables: on-disk encoding, sector-granular writes, and the bounded L2 cache.

use crate::error::Result;
use crate::storage::Storage;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Unallocated entry: read through to the backing file.
pub const UNALLOCATED: u64 = 0;
/// Zero-cluster entry (data cluster entries only): reads as zeroes.
pub const ZERO_CLUSTER: u64 = 1;

/// A table in memory: one u64 per entry.
pub type Table = Vec<u64>;

/// A cached L2 table, shared between requests. Entries change only under the
/// per-table allocation lock; readers take the read lock briefly to look entries up.
pub type SharedTable = Arc<RwLock<Table>>;

/// Decodes a table from its little-endian bytes.
pub fn decode(bytes: &[u8]) -> Table {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect()
}

/// Encodes entries as little-endian bytes.
pub fn encode(entries: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        v.extend_from_slice(&e.to_le_bytes());
    }
    v
}

/// Reads a whole table of `nelems` entries at `offset`.
pub fn read_table(storage: &dyn Storage, offset: u64, nelems: u64) -> Result<Table> {
    let mut buf = vec![0u8; (nelems * 8) as usize];
    storage.read_at(&mut buf, offset)?;
    Ok(decode(&buf))
}

/// Writes entries `[first, first+n)` of `table` (stored at `offset`), rounded out to
/// whole write units (512 bytes or the storage's alignment) so a partial sector is
/// never written.
pub fn write_entries(
    storage: &dyn Storage,
    offset: u64,
    table: &[u64],
    first: usize,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let (start, end) = write_unit_range(storage, table.len(), first, n);
    storage.write_at(&encode(&table[start..end]), offset + start as u64 * 8)?;
    Ok(())
}

/// Entries `[first, first+n)` of a table of `len` entries rounded out to whole write
/// units (512 bytes or the storage's alignment).
pub fn write_unit_range(
    storage: &dyn Storage,
    len: usize,
    first: usize,
    n: usize,
) -> (usize, usize) {
    let unit = (storage.alignment().max(512) / 8).min(len).max(1);
    let start = first / unit * unit;
    let end = ((first + n).div_ceil(unit) * unit).min(len);
    (start, end)
}

struct Slot {
    table: SharedTable,
    used: u64,
}

/// A bounded cache of L2 tables keyed by their file offset.
///
/// A table that some request still holds (an allocation updating it) is never evicted,
/// and a table read from disk is only inserted if no table was modified while it was
/// being read: together these guarantee a stale copy never replaces a newer one.
pub struct L2Cache {
    slots: Mutex<HashMap<u64, Slot>>,
    capacity: usize,
    tick: AtomicU64,
    /// Bumped on every in-memory table modification.
    epoch: AtomicU64,
}

impl std::fmt::Debug for L2Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2Cache")
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least one).
    pub fn new(capacity: usize) -> L2Cache {
        L2Cache {
            slots: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            tick: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    /// Number of tables the cache may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a cached table was modified in memory.
    pub fn modified(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The table at `offset`, reading it with `load` on a miss.
    pub fn get(&self, offset: u64, load: impl Fn() -> Result<Table>) -> Result<SharedTable> {
        for _ in 0..4 {
            let epoch = self.epoch.load(Ordering::Acquire);
            if let Some(t) = self.lookup(offset) {
                return Ok(t);
            }
            let table = load()?;
            let mut slots = self.lock();
            if let Some(s) = slots.get_mut(&offset) {
                s.used = self.tick.fetch_add(1, Ordering::Relaxed);
                return Ok(s.table.clone());
            }
            if self.epoch.load(Ordering::Acquire) != epoch {
                // Something changed while we read: our copy may be stale; retry.
                continue;
            }
            let t = Arc::new(RwLock::new(table));
            self.insert_locked(&mut slots, offset, t.clone());
            return Ok(t);
        }
        // Tables keep changing under us: read under the cache lock. A table absent from
        // the cache is held by nobody, so the disk copy is current.
        let mut slots = self.lock();
        if let Some(s) = slots.get_mut(&offset) {
            s.used = self.tick.fetch_add(1, Ordering::Relaxed);
            return Ok(s.table.clone());
        }
        let t = Arc::new(RwLock::new(load()?));
        self.insert_locked(&mut slots, offset, t.clone());
        Ok(t)
    }

    fn lookup(&self, offset: u64) -> Option<SharedTable> {
        let mut slots = self.lock();
        let s = slots.get_mut(&offset)?;
        s.used = self.tick.fetch_add(1, Ordering::Relaxed);
        Some(s.table.clone())
    }

    /// Inserts a table just created in memory (a new L2 table).
    pub fn insert(&self, offset: u64, table: SharedTable) {
        let mut slots = self.lock();
        self.insert_locked(&mut slots, offset, table);
    }

    fn insert_locked(&self, slots: &mut HashMap<u64, Slot>, offset: u64, table: SharedTable) {
        while slots.len() >= self.capacity {
            // Evict the least recently used table nobody else holds.
            let victim = slots
                .iter()
                .filter(|(_, s)| Arc::strong_count(&s.table) == 1)
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    slots.remove(&k);
                }
                None => break,
            }
        }
        let used = self.tick.fetch_add(1, Ordering::Relaxed);
        slots.insert(offset, Slot { table, used });
    }

    /// Drops every cached table (after check/repair rewrote tables on disk).
    pub fn clear(&self) {
        self.lock().clear();
        self.modified();
    }
}
