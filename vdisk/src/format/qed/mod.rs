//! QED (QEMU Enhanced Disk).
//!
//! Layout and rules: the QED specification published with QEMU.
//! Files by concern:
//! - [`header`]: the header, parsed, validated and serialised in one place;
//! - [`table`]: L1/L2 table encoding and the bounded page cache;
//! - `paging`: entry lookups and updates through that cache (no table is ever loaded
//!   whole: a hostile geometry of 1 GiB tables costs a few pages of memory);
//! - `map`: what the tables say about a guest range, as the mapping contract's typed
//!   runs ([`crate::format::mapping`]), and block status derived from them;
//! - `io`: reads and `write`: writes, both through the generic data path
//!   ([`crate::format::datapath`]); `write` is QED's [`crate::format::mapping::Mapper`]
//!   (in-place targets, allocations with their COW regions, commit = L2/L1 update);
//! - `zero`: zero writes and discard;
//! - `need_check`: the NEED_CHECK (dirty) lifecycle and the idle timer that clears it;
//! - `check`: consistency check and repair;
//! - `create`: new images; `resize`: size and backing file changes.
//!
//! Concurrency: every request holds a shared "quiesce" lock that only check/resize/
//! set_backing take exclusively. Requests to allocated clusters never take another lock
//! across data I/O. Requests that change an L2 table (allocations, zero entries) take
//! that table's own mutex, so allocations in different tables proceed in parallel, while
//! two allocations of the same cluster are ordered (the second sees the first's result).

mod check;
mod create;
pub mod descriptor;
mod direct;
mod flush;
pub mod header;
mod io;
mod map;
mod need_check;
pub mod options;
mod paging;
mod resize;
pub mod table;
mod write;
mod zero;

pub use create::create;

use super::{
    BackingResolver, BackingSpec, CheckReport, Driver, DriverOptions, Extent, Format,
    FormatSpecific, Repair, ZeroFlags,
};
use crate::error::{Error, Invalid, NoSpace, Result};
use crate::storage::Storage;
use header::Header;
use need_check::DirtyState;
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use table::PageCache;

/// Whether `head` starts with the QED magic.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 4 && head[..4] == header::MAGIC.to_le_bytes()
}

/// Default number of L2 tables' worth of pages cached (QEMU caches 50 tables).
const DEFAULT_L2_TABLES: u64 = 50;
/// Upper bound of the default L2 cache, for images with very large tables.
const DEFAULT_L2_CACHE_BYTES: u64 = 16 << 20;
/// Bytes of L1 pages cached (the L1 table is read on demand, a page at a time).
const L1_CACHE_BYTES: u64 = 2 << 20;
/// Idle period after which NEED_CHECK is cleared (as QEMU's timer).
pub const DEFAULT_CLEAN_DELAY: Duration = Duration::from_secs(5);

/// A QED image.
#[derive(Debug)]
pub struct Qed {
    inner: Arc<Inner>,
}

/// State shared by requests (and the idle timer, which holds a weak reference).
#[derive(Debug)]
pub(crate) struct Inner {
    /// Metadata: header, L1 and L2 tables.
    storage: Arc<dyn Storage>,
    /// Guest data clusters (the same storage: QED has no external data file).
    data: Arc<dyn Storage>,
    backing: Option<Arc<dyn Driver>>,
    read_only: bool,
    cluster_size: u64,
    /// Entries per table.
    nelems: u64,
    /// Clusters per table.
    table_clusters: u64,
    l1_offset: u64,
    /// Entries per cached page of a table.
    page_entries: u64,
    /// The header as opened: its geometry fields (cluster, table and header sizes) never
    /// change, so offset validation reads them without locking.
    geo: Header,
    /// Shared flushes for allocating writes over a backing file.
    flush_gate: flush::FlushGate,
    image_size: AtomicU64,
    /// The allocation cursor: the file's size rounded down to whole clusters, grown by
    /// every allocation.
    file_size: AtomicU64,
    /// Cached pages of the L1 table.
    l1: PageCache,
    /// Serialises L1 writes so two updates of entries sharing a sector never
    /// write stale snapshots of each other.
    l1_write: Mutex<()>,
    /// Cached pages of L2 tables.
    l2: PageCache,
    /// File offsets of the L2 tables looked up this session (bounded): data is never
    /// written over one of them, whatever a (double-referencing) L2 entry says.
    known_tables: Mutex<std::collections::BTreeSet<u64>>,
    /// Per-L2-table (by L1 index) metadata locks and in-flight allocation lists.
    table_locks: Mutex<HashMap<u64, Arc<write::TableSync>>>,
    /// Shared by requests, exclusive for check/resize/set_backing.
    quiesce: RwLock<()>,
    /// Direct ranges in flight, which [`Inner::quiesce_exclusive`] waits for.
    direct: direct::DirectGate,
    dirty: Mutex<DirtyState>,
    /// Wakes the idle timer thread early (stop requests).
    dirty_cv: std::sync::Condvar,
}

/// [`Inner::quiesce_exclusive`]'s hold. Field order is drop order: the exclusive lock
/// goes before direct ranges may start again.
struct Quiesced<'a> {
    _excl: std::sync::RwLockWriteGuard<'a, ()>,
    _drained: direct::Drained<'a>,
}

impl Inner {
    fn header(&self) -> Header {
        self.dirty_lock().header.clone()
    }

    fn dirty_lock(&self) -> std::sync::MutexGuard<'_, DirtyState> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn quiesce_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.quiesce.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The image to oneself: no request runs (shared holders gone, direct ranges ended
    /// and refused) until the value is dropped.
    fn quiesce_exclusive(&self) -> Quiesced<'_> {
        // Direct ranges first, holding nothing: the thread that reaps their completions
        // may take the shared lock meanwhile (see `direct`).
        let drained = self.direct.drain();
        Quiesced {
            _excl: self.quiesce.write().unwrap_or_else(|p| p.into_inner()),
            _drained: drained,
        }
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    fn file_size(&self) -> u64 {
        self.file_size.load(Ordering::Acquire)
    }

    /// Reserves `n` contiguous clusters at the end of the file.
    fn alloc_clusters(&self, n: u64) -> Result<u64> {
        let bytes = n
            .checked_mul(self.cluster_size)
            .ok_or(NoSpace::QedAllocation { clusters: n })?;
        let mut cur = self.file_size();
        loop {
            let end = cur
                .checked_add(bytes)
                .filter(|e| *e <= i64::MAX as u64)
                .ok_or(NoSpace::QedFileSize)?;
            match self
                .file_size
                .compare_exchange(cur, end, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(cur),
                Err(now) => cur = now,
            }
        }
    }

    /// Drops every cached table page and every remembered table location: check,
    /// repair, shrink and leak reclaim rewrite tables on disk, release them or move them
    /// (their old clusters can then hold data).
    fn forget_tables(&self) {
        self.l1.clear();
        self.l2.clear();
        self.known_tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The metadata lock of the L2 table at L1 index `l1i`.
    fn table_lock(&self, l1i: u64) -> Arc<write::TableSync> {
        let mut m = self.table_locks.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 4096 {
            // Forget locks nobody holds so the map stays bounded; a table with an
            // allocation in flight keeps its lock (the allocation holds no reference to
            // it between prepare_write and commit, and its in-flight list is what
            // orders the next allocation of those clusters).
            m.retain(|_, l| Arc::strong_count(l) > 1 || l.busy());
        }
        m.entry(l1i).or_default().clone()
    }

    /// Makes every completed write durable: guest data first, then metadata, so no
    /// durable mapping points at data that is not (a no-op difference while both are
    /// the same storage).
    fn flush_all(&self) -> Result<()> {
        if !Arc::ptr_eq(&self.data, &self.storage) {
            self.data.flush()?;
        }
        self.storage.flush()?;
        Ok(())
    }

    /// Writes the fixed header fields (one sector, atomic on disk).
    fn write_header(&self, h: &Header) -> Result<()> {
        self.storage.write_at(&h.to_bytes(), 0)?;
        Ok(())
    }
}

impl Qed {
    /// Opens a QED image, validating the header; a read-write open of an image with
    /// NEED_CHECK set checks and repairs it first (unless `opts.skip_repair`).
    pub fn open(
        storage: Arc<dyn Storage>,
        opts: &DriverOptions,
        backing: &mut BackingResolver<'_>,
    ) -> Result<Qed> {
        let file_len = storage.len()?;
        let mut head = [0u8; header::HEADER_LEN];
        if file_len < header::HEADER_LEN as u64 {
            return Err(Invalid::FileTooShort {
                format: "QED",
                len: file_len,
            }
            .into());
        }
        storage.read_at(&mut head, 0)?;
        let mut h = Header::parse(&head)?;
        h.validate(file_len)?;
        let cs = h.cluster_size as u64;
        let file_size = file_len & !(cs - 1);
        let name = header::read_backing_name(&*storage, &h)?;
        let spec = name.map(|name| BackingSpec {
            name,
            format: if h.features & header::F_BACKING_FORMAT_NO_PROBE != 0 {
                Some(Format::Raw)
            } else {
                None
            },
        });
        let backing_drv = match &spec {
            Some(s) if !opts.no_backing => Some(backing(s)?),
            _ => None,
        };
        let nelems = h.table_nelems();
        let table_bytes = h.table_bytes();
        let page_bytes = table::page_bytes(table_bytes);
        // Memory stays bounded whatever the geometry: pages, not tables, are cached.
        let l2_bytes = match opts.l2_cache_size {
            Some(b) => b,
            None => DEFAULT_L2_TABLES
                .saturating_mul(table_bytes)
                .min(DEFAULT_L2_CACHE_BYTES),
        };
        let l2_pages = (l2_bytes / page_bytes).max(1);
        let l1_pages = (L1_CACHE_BYTES / page_bytes).max(1);
        let read_only = opts.read_only;
        let inner = Arc::new(Inner {
            data: storage.clone(),
            storage,
            backing: backing_drv,
            read_only,
            cluster_size: cs,
            nelems,
            table_clusters: h.table_size as u64,
            l1_offset: h.l1_table_offset,
            geo: h.clone(),
            flush_gate: flush::FlushGate::default(),
            image_size: AtomicU64::new(h.image_size),
            file_size: AtomicU64::new(file_size),
            page_entries: page_bytes / 8,
            l1: PageCache::new(l1_pages as usize),
            l1_write: Mutex::new(()),
            l2: PageCache::new(l2_pages.min(1 << 20) as usize),
            known_tables: Mutex::new(std::collections::BTreeSet::new()),
            table_locks: Mutex::new(HashMap::new()),
            quiesce: RwLock::new(()),
            direct: direct::DirectGate::default(),
            dirty: Mutex::new(DirtyState::new(h.clone(), spec)),
            dirty_cv: std::sync::Condvar::new(),
        });
        let qed = Qed { inner };
        if !read_only {
            if h.autoclear_features & !header::AUTOCLEAR_KNOWN != 0 {
                // A writer that does not know an autoclear feature must clear it: the
                // data it describes is about to go stale.
                h.autoclear_features &= header::AUTOCLEAR_KNOWN;
                qed.inner.dirty_lock().header.autoclear_features = h.autoclear_features;
                qed.inner.write_header(&h)?;
                qed.inner.storage.flush()?;
            }
            if h.need_check() && !opts.skip_repair {
                qed.check(Repair {
                    leaks: true,
                    errors: true,
                })?;
            }
            // After any repair, which forgets table locations.
            qed.inner.note_tables_at_open()?;
        }
        Ok(qed)
    }

    /// Changes how long the image must be idle (no allocating writes in flight) before
    /// NEED_CHECK is cleared automatically. Default [`DEFAULT_CLEAN_DELAY`].
    pub fn set_clean_delay(&self, delay: Duration) {
        self.inner.dirty_lock().clean_delay = delay;
        self.inner.dirty_cv.notify_all();
    }

    /// The decoded header as currently in memory.
    pub fn header(&self) -> Header {
        self.inner.header()
    }
}

impl Drop for Qed {
    fn drop(&mut self) {
        // A drop without close is still an orderly shutdown: leave the image clean.
        if !self.inner.read_only {
            if let Err(e) = need_check::mark_clean(&self.inner) {
                tracing::warn!("QED: could not mark image clean on drop: {e}");
            }
        }
        need_check::stop_timer(&self.inner);
    }
}

impl Driver for Qed {
    fn format(&self) -> Format {
        Format::Qed
    }
    fn size(&self) -> u64 {
        self.inner.image_size.load(Ordering::Acquire)
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.inner.cluster_size)
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        io::read_vectored(&self.inner, &mut [IoSliceMut::new(buf)], offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        write::write_vectored(&self.inner, &[IoSlice::new(buf)], offset)
    }
    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        io::read_vectored(&self.inner, bufs, offset)
    }
    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        write::write_vectored(&self.inner, bufs, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        zero::write_zeroes(&self.inner, offset, len, flags)
    }
    fn direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Option<super::mapping::DirectRange<'_>> {
        direct::direct(&self.inner, offset, len, write)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        zero::discard(&self.inner, offset, len)
    }
    fn flush(&self) -> Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        self.inner
            .storage
            .event(crate::storage::BlkEvent::FlushToOs);
        self.inner
            .storage
            .event(crate::storage::BlkEvent::FlushToDisk);
        self.inner.flush_all()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        map::block_status(&self.inner, offset, len)
    }
    fn backing_spec(&self) -> Option<BackingSpec> {
        self.inner.dirty_lock().backing.clone()
    }
    fn backing(&self) -> Option<&Arc<dyn Driver>> {
        self.inner.backing.as_ref()
    }
    fn format_specific(&self) -> FormatSpecific {
        FormatSpecific::Qed
    }
    fn is_dirty(&self) -> bool {
        self.inner.dirty_lock().header.need_check()
    }
    fn check(&self, repair: Repair) -> Result<CheckReport> {
        check::check(&self.inner, repair)
    }
    fn resize(&self, new_size: u64, shrink: bool) -> Result<()> {
        resize::resize(&self.inner, new_size, shrink)
    }
    fn set_backing_spec(&self, spec: Option<&BackingSpec>) -> Result<()> {
        resize::set_backing_spec(&self.inner, spec)
    }
    fn close(&self) -> Result<()> {
        if self.inner.read_only {
            need_check::stop_timer(&self.inner);
            return Ok(());
        }
        self.inner.flush_all()?;
        need_check::mark_clean(&self.inner)?;
        need_check::stop_timer(&self.inner);
        Ok(())
    }
}
