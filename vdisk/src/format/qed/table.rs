//! L1/L2 tables: on-disk encoding, sector-granular writes, and the bounded page cache.
//!
//! Tables can be huge (16 clusters of 64 MiB: 1 GiB, 128 Mi entries), so no table is
//! ever held whole in memory: tables are read, cached and written in pages of at most
//! [`PAGE_BYTES`], and only the pages a request needs are loaded.

use super::header::{cluster_offset_valid, table_offset_valid, Header};
use crate::error::Result;
use crate::storage::Storage;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Unallocated entry: read through to the backing file.
pub const UNALLOCATED: u64 = 0;
/// Zero-cluster entry (data cluster entries only): reads as zeroes.
pub const ZERO_CLUSTER: u64 = 1;

/// What one L2 entry says about its cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Not allocated: read the backing file (zeroes without one).
    Unallocated,
    /// Reads as zeroes, whatever the backing file holds.
    Zero,
    /// Stored at this (validated) host offset.
    Data(u64),
}

/// An entry holding an offset that no table or cluster may have: misaligned, inside
/// the header or the L1 table, or past the end of the file. Callers name the table and
/// entry in the error they build from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidOffset(pub u64);

impl Entry {
    /// Decodes an L2 entry of an image with geometry `geo` and `file_size` bytes of
    /// whole clusters.
    pub fn decode(
        value: u64,
        geo: &Header,
        file_size: u64,
    ) -> std::result::Result<Entry, InvalidOffset> {
        match value {
            UNALLOCATED => Ok(Entry::Unallocated),
            ZERO_CLUSTER => Ok(Entry::Zero),
            v if cluster_offset_valid(geo, v, file_size) => Ok(Entry::Data(v)),
            v => Err(InvalidOffset(v)),
        }
    }

    /// The on-disk value.
    pub fn encode(self) -> u64 {
        match self {
            Entry::Unallocated => UNALLOCATED,
            Entry::Zero => ZERO_CLUSTER,
            Entry::Data(off) => off,
        }
    }
}

/// Decodes an L1 entry: the offset of its L2 table (the whole table inside the file,
/// clear of the header and the L1 table), or `None` when unallocated. L1 entries have
/// no zero marker: 1 is a misaligned offset.
pub fn decode_l1(
    value: u64,
    geo: &Header,
    file_size: u64,
) -> std::result::Result<Option<u64>, InvalidOffset> {
    match value {
        UNALLOCATED => Ok(None),
        v if table_offset_valid(geo, v, file_size) => Ok(Some(v)),
        v => Err(InvalidOffset(v)),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    const CS: u64 = 64 * 1024;

    /// 64 KiB clusters, 4-cluster tables, two header clusters, L1 at cluster 2.
    fn geo() -> Header {
        Header {
            cluster_size: CS as u32,
            table_size: 4,
            header_size: 2,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 2 * CS,
            image_size: 1 << 30,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    /// A file of 20 clusters: header 0..2, L1 2..6, the rest tables and data.
    const FILE: u64 = 20 * CS;

    #[test]
    fn bytes_round_trip() {
        let entries = [0u64, 1, CS, 0x0102_0304_0506_0708, u64::MAX];
        let bytes = encode(&entries);
        assert_eq!(bytes.len(), 40);
        // Little-endian, one u64 per entry.
        assert_eq!(&bytes[24..32], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(decode(&bytes), entries);
        // A trailing partial entry is not an entry.
        assert_eq!(decode(&bytes[..39]), entries[..4]);
        assert!(decode(&[]).is_empty());
    }

    #[test]
    fn l2_entry_markers() {
        let g = geo();
        assert_eq!(Entry::decode(0, &g, FILE), Ok(Entry::Unallocated));
        assert_eq!(Entry::decode(1, &g, FILE), Ok(Entry::Zero));
        assert_eq!(Entry::Unallocated.encode(), UNALLOCATED);
        assert_eq!(Entry::Zero.encode(), ZERO_CLUSTER);
    }

    #[test]
    fn l2_entry_data_round_trip() {
        let g = geo();
        // Every cluster after the header and the L1 table, up to the end of the file.
        for c in 6..20 {
            let e = Entry::decode(c * CS, &g, FILE).unwrap();
            assert_eq!(e, Entry::Data(c * CS));
            assert_eq!(e.encode(), c * CS);
            assert_eq!(Entry::decode(e.encode(), &g, FILE), Ok(e));
        }
    }

    #[test]
    fn l2_entry_rejects() {
        let g = geo();
        let bad = [
            (2, "low bit pattern"),
            (6 * CS + 1, "misaligned by a byte"),
            (6 * CS + 512, "misaligned by a sector"),
            (
                6 * CS + 4096,
                "misaligned by 4 KiB (below the cluster size)",
            ),
            (CS, "inside the header"),
            (CS + 8, "inside the header, misaligned"),
            (2 * CS, "the L1 table's first cluster"),
            (5 * CS, "the L1 table's last cluster"),
            (FILE, "at the end of the file"),
            (FILE + CS, "past the end of the file"),
            (!(CS - 1), "near 2^64"),
            (u64::MAX, "all ones"),
        ];
        for (v, what) in bad {
            assert_eq!(
                Entry::decode(v, &g, FILE),
                Err(InvalidOffset(v)),
                "{what} ({v:#x}) accepted"
            );
        }
    }

    #[test]
    fn l1_entry_decode() {
        let g = geo();
        assert_eq!(decode_l1(0, &g, FILE), Ok(None));
        // The table must fit whole: 4 clusters from cluster 16 end at the file's end.
        for c in [6, 10, 16] {
            assert_eq!(decode_l1(c * CS, &g, FILE), Ok(Some(c * CS)));
        }
        let bad = [
            (1, "the zero marker has no meaning in L1"),
            (6 * CS + 512, "misaligned"),
            (CS, "inside the header"),
            (0x1000, "inside the header, 4 KiB aligned"),
            (2 * CS, "the L1 table itself"),
            (CS * 3, "overlapping the L1 table"),
            (17 * CS, "the table runs past the end of the file"),
            (FILE, "at the end of the file"),
            (!(CS - 1), "near 2^64"),
        ];
        for (v, what) in bad {
            assert_eq!(
                decode_l1(v, &g, FILE),
                Err(InvalidOffset(v)),
                "{what} ({v:#x}) accepted"
            );
        }
    }

    #[test]
    fn single_cluster_tables() {
        // table_size 1: a table is one cluster, so the last cluster of the file may hold
        // one (QEMU's overflow test rejects every such table; the format allows it).
        let mut g = geo();
        g.table_size = 1;
        assert_eq!(decode_l1(19 * CS, &g, FILE), Ok(Some(19 * CS)));
        assert_eq!(decode_l1(3 * CS, &g, FILE), Ok(Some(3 * CS)));
        assert_eq!(decode_l1(2 * CS, &g, FILE), Err(InvalidOffset(2 * CS)));
    }

    #[test]
    fn pages_tile_tables() {
        assert_eq!(page_bytes(4096), 4096);
        assert_eq!(page_bytes(PAGE_BYTES), PAGE_BYTES);
        assert_eq!(page_bytes(1 << 30), PAGE_BYTES);
    }

    #[test]
    fn write_units() {
        let s = MemStorage::new();
        // 512-byte units: 64 entries.
        assert_eq!(unit_entries(&s, 8192), 64);
        assert_eq!(unit_entries(&s, 10), 10);
        assert_eq!(write_unit_range(&s, 8192, 0, 1), (0, 64));
        assert_eq!(write_unit_range(&s, 8192, 63, 2), (0, 128));
        assert_eq!(write_unit_range(&s, 8192, 100, 1), (64, 128));
        assert_eq!(write_unit_range(&s, 8192, 8191, 1), (8128, 8192));
    }

    #[test]
    fn entries_written_by_whole_units() {
        let s = MemStorage::from_vec(vec![0xaa; 3 * 512]);
        let mut page = vec![0u64; 192];
        page[70] = 0x1122_3344_5566_7788;
        // Writing entry 70 rewrites its whole 512-byte unit (entries 64..128) and
        // nothing else.
        write_entries(&s, 0, &page, 70, 1).unwrap();
        let v = s.to_vec();
        assert!(v[..512].iter().all(|b| *b == 0xaa));
        assert_eq!(decode(&v[512..1024])[6], 0x1122_3344_5566_7788);
        assert!(decode(&v[512..1024])
            .iter()
            .enumerate()
            .all(|(i, e)| i == 6 || *e == 0));
        assert!(v[1024..].iter().all(|b| *b == 0xaa));
        assert_eq!(read_entries(&s, 512, 64).unwrap(), page[64..128]);
        // Nothing to write: nothing written.
        write_entries(&s, 0, &page, 0, 0).unwrap();
        assert!(s.to_vec()[..512].iter().all(|b| *b == 0xaa));

        // One entry by read-modify-write of its unit.
        write_one(&s, 0, 192, 130, 42).unwrap();
        let v = s.to_vec();
        let unit = decode(&v[1024..1536]);
        assert_eq!(unit[2], 42);
        assert_eq!(unit[0], 0xaaaa_aaaa_aaaa_aaaa);
    }

    #[test]
    fn cache_loads_once_and_stays_bounded() {
        let c = PageCache::new(2);
        let loads = std::sync::atomic::AtomicUsize::new(0);
        let load = |v: u64| {
            let loads = &loads;
            move || {
                loads.fetch_add(1, Ordering::Relaxed);
                Ok(vec![v; 4])
            }
        };
        assert_eq!(*c.get(0, load(7)).unwrap().read().unwrap(), vec![7; 4]);
        assert_eq!(*c.get(0, load(9)).unwrap().read().unwrap(), vec![7; 4]);
        assert_eq!(loads.load(Ordering::Relaxed), 1);
        // A page somebody holds is never evicted, whatever the capacity.
        let held = c.get(4096, load(1)).unwrap();
        c.get(8192, load(2)).unwrap();
        c.get(12288, load(3)).unwrap();
        held.write().unwrap()[0] = 100;
        c.modified();
        assert_eq!(c.get(4096, load(5)).unwrap().read().unwrap()[0], 100);
        assert_eq!(c.lock().len(), 2);
        // After clear every page is read again.
        drop(held);
        c.clear();
        assert_eq!(c.get(4096, load(5)).unwrap().read().unwrap()[0], 5);
    }

    #[test]
    fn cache_load_errors_are_returned() {
        let c = PageCache::new(1);
        let r = c.get(0, || {
            Err(crate::error::Corruption::new(
                crate::error::Structure::QedL2Table,
                crate::error::Problem::Missing,
            )
            .into())
        });
        assert!(r.is_err());
        // Nothing was cached by the failure.
        assert_eq!(c.get(0, || Ok(vec![3])).unwrap().read().unwrap()[0], 3);
    }
}
