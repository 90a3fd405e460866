//! L1/L2 tables: on-disk encoding, sector-granular writes, and the bounded page cache.
//!
//! Tables can be huge (16 clusters of 64 MiB: 1 GiB, 128 Mi entries), so no table is
//! ever held whole in memory: tables are read, cached and written in pages of at most
//! [`PAGE_BYTES`], and only the pages a request needs are loaded.

use crate::error::Result;
use crate::storage::Storage;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Unallocated entry: read through to the backing file.
pub const UNALLOCATED: u64 = 0;
/// Zero-cluster entry (data cluster entries only): reads as zeroes.
pub const ZERO_CLUSTER: u64 = 1;

/// Largest page of table entries read, cached or written at once.
pub const PAGE_BYTES: u64 = 64 * 1024;

/// A page of table entries in memory: one u64 per entry.
pub type Page = Vec<u64>;

/// A cached page, shared between requests. Entries change only under the owning table's
/// allocation lock (L1: the L1 write lock); readers take the read lock briefly.
pub type SharedPage = Arc<RwLock<Page>>;

/// Bytes per page for tables of `table_bytes` (tables are powers of two of at least
/// 4 KiB, so pages tile them exactly).
pub fn page_bytes(table_bytes: u64) -> u64 {
    table_bytes.min(PAGE_BYTES)
}

/// Decodes entries from their little-endian bytes.
pub fn decode(bytes: &[u8]) -> Page {
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

/// Reads `n` entries at `offset`; callers bound `n` by a page.
pub fn read_entries(storage: &dyn Storage, offset: u64, n: u64) -> Result<Page> {
    let mut buf = vec![0u8; (n * 8) as usize];
    storage.read_at(&mut buf, offset)?;
    Ok(decode(&buf))
}

/// Whole pages (of `page_bytes`) from `offset` on, at most `max_pages`, that the storage
/// reports as a hole (reading as zeroes: every entry unallocated), so walks over huge
/// sparse tables skip them; 0 when the storage reports data or cannot tell.
pub fn hole_pages(storage: &dyn Storage, offset: u64, page_bytes: u64, max_pages: u64) -> u64 {
    match storage.extent_at(offset) {
        Ok((false, n)) => (n / page_bytes).min(max_pages),
        _ => 0,
    }
}

/// Writes entries `[first, first+n)` of `page` (stored at `offset`), rounded out to
/// whole write units (512 bytes or the storage's alignment) so a partial sector is
/// never written.
pub fn write_entries(
    storage: &dyn Storage,
    offset: u64,
    page: &[u64],
    first: usize,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let (start, end) = write_unit_range(storage, page.len(), first, n);
    storage.write_at(&encode(&page[start..end]), offset + start as u64 * 8)?;
    Ok(())
}

/// Writes one entry of the table at `table` by read-modify-write of its write unit
/// (`table_len` entries long), for callers holding the image quiesced.
pub fn write_one(
    storage: &dyn Storage,
    table: u64,
    table_len: u64,
    idx: u64,
    value: u64,
) -> Result<()> {
    let (s, e) = write_unit_range(storage, table_len as usize, idx as usize, 1);
    let mut unit = read_entries(storage, table + s as u64 * 8, (e - s) as u64)?;
    unit[idx as usize - s] = value;
    storage.write_at(&encode(&unit), table + s as u64 * 8)?;
    Ok(())
}

/// Entries `[first, first+n)` of a page of `len` entries rounded out to whole write
/// units (512 bytes or the storage's alignment).
pub fn write_unit_range(
    storage: &dyn Storage,
    len: usize,
    first: usize,
    n: usize,
) -> (usize, usize) {
    let unit = unit_entries(storage, len);
    let start = first / unit * unit;
    let end = ((first + n).div_ceil(unit) * unit).min(len);
    (start, end)
}

/// Entries per write unit in a page of `len` entries.
pub fn unit_entries(storage: &dyn Storage, len: usize) -> usize {
    (storage.alignment().max(512) / 8).min(len).max(1)
}

struct Slot {
    table: SharedPage,
    used: u64,
}

/// A bounded cache of table pages keyed by their file offset.
///
/// A page that some request still holds (an allocation updating it) is never evicted,
/// and a page read from disk is only inserted if no page was modified while it was
/// being read: together these guarantee a stale copy never replaces a newer one.
pub struct PageCache {
    slots: Mutex<HashMap<u64, Slot>>,
    capacity: usize,
    tick: AtomicU64,
    /// Bumped on every in-memory table modification.
    epoch: AtomicU64,
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache")
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl PageCache {
    /// A cache holding at most `capacity` pages (at least one) beyond those in use.
    pub fn new(capacity: usize) -> PageCache {
        PageCache {
            slots: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            tick: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    /// Number of pages the cache may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a cached page was modified in memory.
    pub fn modified(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The page at `offset`, reading it with `load` on a miss.
    pub fn get(&self, offset: u64, load: impl Fn() -> Result<Page>) -> Result<SharedPage> {
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

    fn lookup(&self, offset: u64) -> Option<SharedPage> {
        let mut slots = self.lock();
        let s = slots.get_mut(&offset)?;
        s.used = self.tick.fetch_add(1, Ordering::Relaxed);
        Some(s.table.clone())
    }

    /// Inserts a page just created in memory (part of a new L2 table).
    pub fn insert(&self, offset: u64, table: SharedPage) {
        let mut slots = self.lock();
        self.insert_locked(&mut slots, offset, table);
    }

    fn insert_locked(&self, slots: &mut HashMap<u64, Slot>, offset: u64, table: SharedPage) {
        while slots.len() >= self.capacity {
            // Evict the least recently used page nobody else holds.
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

    /// Drops every cached page (after check/repair rewrote tables on disk).
    pub fn clear(&self) {
        self.lock().clear();
        self.modified();
    }
}
