//! qcow2 (QEMU copy-on-write v2 and v3).
//!
//! Layout of the driver:
//! - [`header`]: header + extensions, parsed and serialised in one place.
//! - `cache`: bounded LRU of metadata clusters (L2 tables, refcount blocks).
//! - `tables`: L1/L2 lookup and update, L2 copy-on-write, metadata write-back ordering.
//! - `refcount`: refcount entries of every width, refcount blocks and table growth.
//! - `alloc`: free-cluster search and contiguous allocation, deferred frees.
//! - `l2entry`: decoded L2 entries (standard and extended, one type), encode/decode.
//! - `mapping`: the L2 walk into typed runs; qcow2's side of the
//!   [`Mapper`](crate::format::mapping::Mapper) contract.
//! - `allocate`: write targets: in place, or new clusters with their COW regions;
//!   commit/abort (guest data itself goes through [`crate::format::datapath`]).
//! - `l2update`: L2 entry updates and the release of what they referenced.
//! - `subcluster`: writes to images with extended L2 entries (which subclusters a
//!   write allocates, its COW regions, the bitmap update at commit).
//! - `zero`: zero writes and discards. `zero_ext`: zero writes per subcluster.
//!   `status`: block status from the mapping runs.
//! - `resize`: guest size changes. `compressed`: compressed cluster writes.
//! - `compress`: deflate/zstd clusters.
//! - `snapshot`: the snapshot table (decode, encode). `snapshot_ops`: create, apply
//!   and delete internal snapshots.
//! - `bitmap`: persistent dirty bitmaps (extension, directory, tables, write-back).
//! - `check`: consistency check, repair and refcount rebuild.
//! - `amend`: option changes of an existing image (compat, refcount width, lazy
//!   refcounts, size).
//! - `create`: image creation. `measure`: sizes for `measure`.
//! - `crypto`: encryption (the LUKS header extension, legacy AES); the data path applies
//!   the cipher.
//!
//! Concurrency: all metadata lives in one `Meta` behind a mutex that is held only for
//! metadata work; guest data I/O (reads, writes to allocated clusters, copy-on-write of
//! new clusters) runs without it, in the generic data path. Allocating writes register
//! their guest clusters in the in-flight list so overlapping requests wait for them and
//! then see the result.
//!
//! Crash ordering (see the reference): refcount increases and new clusters' data are
//! flushed once before any batch of L2/L1 updates is written (`Meta::barrier`); frees
//! are deferred until the mapping that dropped them is durable (`pending_frees`).
//! With lazy refcounts the dirty bit is made durable before the first change
//! (`Meta::before_alloc`); from then on refcount blocks take no part in that order
//! (`Meta::lazy_counting`: a guest flush leaves them in cache), and close writes them
//! back and flushes before it clears the bit. New data is still durable before the
//! mapping naming it. With an external data file the data storage is flushed before
//! the image file (`Meta::flush_storages`), and data clusters released by zero writes
//! and discards are punched (zeroed, with `data_file_raw`) under the metadata lock, so
//! no new allocation of the same guest cluster can race with the release.
//!
//! Extended L2 entries (subclusters) are read and written (`subcluster`). External
//! data files (`data_file`): guest data goes to the data storage at the guest offset
//! (QEMU's rule), data clusters take no refcounts, and zero writes and discards release
//! them in the data file itself (zeroing them with `data_file_raw`). Encrypted images
//! (LUKS, legacy AES) are read and
//! written through the data path's cipher (see `crypto`).
//!
//! Default caches: the L2 cache covers the whole disk up to 32 MiB of tables (QEMU's
//! Linux default maximum), at least 4 tables; the refcount cache holds a quarter of
//! that, at least 4 blocks.

mod alloc;
mod allocate;
mod amend;
mod bitmap;
mod cache;
mod check;
mod compress;
mod compressed;
mod create;
mod crypto;
pub mod descriptor;
pub mod header;
mod l2entry;
mod l2update;
mod mapping;
pub(crate) mod measure;
pub mod options;
mod prealloc;
mod refcount;
mod resize;
mod snapshot;
mod snapshot_ops;
mod status;
mod subcluster;
mod tables;
mod vmstate;
mod zero;
mod zero_ext;

pub use create::create;

use self::cache::Cache;
use self::header::*;
use self::snapshot::Snapshot;
use super::{
    BackingResolver, BackingSpec, CheckReport, Driver, DriverOptions, Extent, Format,
    FormatSpecific, PreallocMode, Repair, SnapshotInfo, ZeroFlags,
};
use crate::error::{Corruption, Error, Field, Invalid, Problem, Result, Structure, Unsupported};
use crate::format::datapath::{self, InFlight, Waiters};
use crate::format::mapping::DirectRange;
use crate::storage::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Offset bits of L1/L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 entry flag: refcount is exactly one.
pub(crate) const COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag: reads as zeroes (v3).
pub(crate) const ZERO: u64 = 1;
/// Reserved bits of an L1 entry (bits 0-8 and 56-62); set means a corrupt entry.
pub(crate) const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard (not compressed) L2 entry (bits 1-8 and 56-61).
pub(crate) const L2E_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry offset bits.
pub(crate) const REFT_OFFSET_MASK: u64 = !0x1ff;
/// Largest host offset an entry can hold.
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Whether `head` starts with the qcow2 magic. The version is deliberately not
/// looked at: a qcow2 file with a version we cannot handle must still be recognised
/// (and refused by `open` with "Unsupported qcow2 version N"), never treated as raw
/// and written over.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 4 && head[..4] == MAGIC
}

/// Where an image's external data file comes from, if the header says it has one.
#[derive(Default)]
pub(crate) struct DataSource<'a, 'b> {
    /// The node's `data-file` child, opened by the chain.
    pub child: Option<Arc<dyn Storage>>,
    /// Opens the name the header records (with the image's access and locks).
    pub files: Option<&'a mut super::FileResolver<'b>>,
}

/// Fixed geometry of an open image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geom {
    pub cluster_bits: u32,
    pub cs: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    pub l2_bits: u32,
    pub rc_order: u32,
    /// Refcount entries per block.
    pub rc_per_block: u64,
    pub rc_block_bits: u32,
    pub version: u32,
    /// Extended L2 entries (16 bytes: entry + subcluster bitmap).
    pub ext_l2: bool,
}

impl Geom {
    pub(crate) fn new(cluster_bits: u32, rc_order: u32, version: u32, ext_l2: bool) -> Geom {
        let cs = 1u64 << cluster_bits;
        let l2_bits = cluster_bits - 3 - u32::from(ext_l2);
        let rc_block_bits = cluster_bits + 3 - rc_order;
        Geom {
            cluster_bits,
            cs,
            l2_entries: 1 << l2_bits,
            l2_bits,
            rc_order,
            rc_per_block: 1 << rc_block_bits,
            rc_block_bits,
            version,
            ext_l2,
        }
    }
    /// Largest refcount value.
    pub(crate) fn rc_max(&self) -> u64 {
        if self.rc_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.rc_order)) - 1
        }
    }
    /// Bit position of the sector count in a compressed L2 entry.
    pub(crate) fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
    /// Index of the 8-byte word holding entry `i` of an L2 table.
    pub(crate) fn l2_word(&self, i: usize) -> usize {
        i << u32::from(self.ext_l2)
    }
    /// Bytes of one subcluster (the cluster itself without extended L2).
    pub(crate) fn subcluster(&self) -> u64 {
        if self.ext_l2 {
            self.cs / 32
        } else {
            self.cs
        }
    }
    /// L1 entries needed to map `size` bytes.
    pub(crate) fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.cs).div_ceil(self.l2_entries)
    }
}

/// All mutable metadata of an open image. Guarded by `Qcow2::meta`.
#[derive(Debug)]
pub(crate) struct Meta {
    /// Metadata storage (the image file).
    pub st: Arc<dyn Storage>,
    /// Guest data storage (the same `Arc` as `st` unless an external data file is
    /// configured).
    pub data: Arc<dyn Storage>,
    /// Guest data lives in an external data file (incompatible bit 2): host offsets
    /// are data file offsets equal to the guest offsets, and data clusters are not
    /// refcounted.
    pub ext_data: bool,
    /// The data file is kept a valid raw image (autoclear bit 1): zeroed and discarded
    /// clusters are zeroed in the data file too.
    pub data_raw: bool,
    pub g: Geom,
    pub hdr: Header,
    pub l1: Vec<u64>,
    /// Dirty L1 entry range `[lo, hi)` not yet written.
    pub l1_dirty: Option<(usize, usize)>,
    pub l2: Cache,
    pub rc_table: Vec<u64>,
    pub rc: Cache,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    /// Guest cluster ranges `[start, end)` being allocated right now.
    pub inflight: InFlight,
    /// Guest cluster ranges with an in-place data write in progress: their host
    /// clusters must not be released (and reused) until it completes.
    pub direct: InFlight,
    /// Requests blocked on `Qcow2::alloc_done`; wake-ups are skipped when none.
    pub waiters: Waiters,
    /// Host clusters whose mapping was dropped in cache: one refcount decrement each,
    /// applied once the mapping change is durable.
    pub pending_frees: Vec<u64>,
    /// Something was written since the last flush (so a barrier must flush).
    pub unflushed: bool,
    /// End of the host file as far as we know (bounds table offsets).
    pub file_end: u64,
    /// Next free byte in the host cluster receiving compressed data (0 = none).
    pub compress_cursor: u64,
    pub read_only: bool,
    /// Refuse writes (corrupt bit set).
    pub corrupt: bool,
    /// Why the refcount table is unusable (opened for check/repair only); writes are
    /// refused until a rebuild replaces it.
    pub rc_broken: Option<Corruption>,
    /// The header has a backing file (whether or not it was opened).
    pub has_backing: bool,
    pub snapshots: Vec<Snapshot>,
    /// We set the dirty bit (lazy refcounts) and must clear it on close.
    pub set_dirty: bool,
    /// Persistent dirty bitmaps.
    pub bm: bitmap::State,
}

impl Meta {
    pub(crate) fn cs(&self) -> u64 {
        self.g.cs
    }

    /// Flushes guest data, then metadata (data must be complete before the mapping
    /// pointing at it is durable).
    pub(crate) fn flush_storages(&self) -> Result<()> {
        if !Arc::ptr_eq(&self.data, &self.st) {
            self.data.flush()?;
        }
        self.st.flush()?;
        Ok(())
    }

    /// Rewrites cluster 0 from `hdr` (preserving unknown extensions) and flushes.
    pub(crate) fn write_header(&mut self) -> Result<()> {
        let bytes = self.hdr.serialize()?;
        self.st.write_at(&bytes, 0)?;
        self.st.flush()?;
        self.unflushed = false;
        Ok(())
    }

    /// Sets the corrupt bit (unless read-only) and returns the error to report.
    pub(crate) fn mark_corrupt(&mut self, c: Corruption) -> Error {
        if !self.read_only && !self.corrupt {
            tracing::error!("qcow2: marking image as corrupt: {c}; further corruption events will be suppressed");
            self.corrupt = true;
            if self.g.version == 3 {
                self.hdr.incompatible |= INCOMPAT_CORRUPT;
                let _ = self.write_header();
            }
        }
        c.into()
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.corrupt {
            return Err(Corruption::new(Structure::Image, Problem::MarkedCorrupt).into());
        }
        if let Some(why) = &self.rc_broken {
            return Err(Corruption::new(
                Structure::RefcountTable,
                Problem::WritesRefused(Box::new(why.clone())),
            )
            .into());
        }
        Ok(())
    }
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    /// Metadata storage (the image file).
    storage: Arc<dyn Storage>,
    /// Guest data storage: the same file, or the external data file.
    data: Arc<dyn Storage>,
    /// The external data file's name as opened (`None`: no data file).
    data_name: Option<String>,
    backing: Option<Arc<dyn Driver>>,
    backing_spec: Mutex<Option<BackingSpec>>,
    g: Geom,
    size: AtomicU64,
    read_only: bool,
    zstd: bool,
    meta: Mutex<Meta>,
    /// Signalled whenever an in-flight allocation finishes.
    alloc_done: Condvar,
    closed: AtomicBool,
    /// The image's encryption, if any.
    crypto: Option<crypto::Encryption>,
    /// The bitmaps guest changes are recorded in (read without the metadata lock).
    bm: bitmap::Tracking,
}

fn default_l2_tables(g: &Geom, size: u64, opt: Option<u64>) -> usize {
    let tables = match opt {
        Some(bytes) => bytes / g.cs,
        None => g.l1_entries_for(size).min((32 << 20) / g.cs),
    };
    tables.clamp(4, 1 << 16) as usize
}

impl Qcow2 {
    /// Opens a qcow2 image on `storage`. The backing file (if any and not disabled)
    /// is opened through `resolver`.
    pub fn open(
        storage: Arc<dyn Storage>,
        opts: &DriverOptions,
        resolver: &mut BackingResolver<'_>,
    ) -> Result<Qcow2> {
        Self::open_with(storage, DataSource::default(), opts, resolver)
    }

    /// [`Qcow2::open`] with where an external data file comes from.
    pub(crate) fn open_with(
        storage: Arc<dyn Storage>,
        data: DataSource<'_, '_>,
        opts: &DriverOptions,
        resolver: &mut BackingResolver<'_>,
    ) -> Result<Qcow2> {
        let file_len = storage.len()?;
        // The header and its extensions live in cluster 0, so read that much, not the
        // largest cluster size (2 MiB of zeroed buffer for every open of a 64 KiB
        // cluster image was a quarter of a small server's peak RSS). The first
        // sector names the cluster size; an invalid one is left to `Header::parse`.
        let mut head_len = file_len.min(4096) as usize;
        if head_len < V2_HEADER_LEN {
            return Err(Corruption::new(
                Structure::Image,
                Problem::Truncated {
                    have: Some(file_len),
                    need: V2_HEADER_LEN as u64,
                },
            )
            .into());
        }
        let mut head = vec![0u8; head_len];
        storage.read_at(&mut head, 0)?;
        let cluster_bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
        if (9..=21).contains(&cluster_bits) && (1u64 << cluster_bits) > head_len as u64 {
            // The rest of cluster 0, after the sector already read.
            let have = head_len;
            head_len = file_len.min(1 << cluster_bits) as usize;
            head.resize(head_len, 0);
            storage.read_at(&mut head[have..], have as u64)?;
        }
        let hdr = Header::parse(&head, file_len)?;
        let ext_l2 = hdr.incompatible & INCOMPAT_EXTL2 != 0;
        let g = Geom::new(hdr.cluster_bits, hdr.refcount_order, hdr.version, ext_l2);
        let cs = g.cs;

        let crypto = crypto::open(&*storage, &hdr, cs, file_len, opts)?;
        let unknown = hdr.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| match hdr.feature_name(0, b) {
                    Some(n) => n.to_string(),
                    None => format!("Unknown incompatible feature: {:x}", 1u64 << b),
                })
                .collect();
            return Err(Unsupported::Qcow2Features(names).into());
        }
        let ext_data = hdr.incompatible & INCOMPAT_DATA_FILE != 0;
        let data_raw = ext_data && hdr.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0;
        let mut data_name = None;
        let data: Arc<dyn Storage> = match (ext_data, data.child) {
            (false, Some(_)) => {
                return Err(Invalid::DataFile(
                    "'data-file' can only be set for images with an external data file",
                )
                .into())
            }
            (false, None) => storage.clone(),
            (true, Some(d)) => {
                data_name = d.exact_filename().or_else(|| hdr.data_file_name());
                d
            }
            // As QEMU (since its CVE-2024-4467 fix): an open without I/O (`info`)
            // does not open the file the header names; an empty stand-in takes its
            // place.
            (true, None) if opts.no_io => Arc::new(crate::storage::MemStorage::new()),
            // As QEMU: the header's name is opened as given (relative names from the
            // working directory, not from the image's directory).
            (true, None) => match (hdr.data_file_name(), data.files) {
                (Some(name), Some(open)) => {
                    let (st, opened) = open(&name)?;
                    data_name = Some(opened);
                    st
                }
                _ => return Err(Invalid::DataFile("'data-file' is required for this image").into()),
            },
        };
        if ext_l2 && hdr.cluster_bits < 14 {
            return Err(Corruption::new(
                Structure::Qcow2Header,
                Problem::TooSmall {
                    field: Field::ClusterBits,
                    value: hdr.cluster_bits.into(),
                    min: 14,
                },
            )
            .into());
        }
        // Like QEMU's BDRV_O_CHECK: `check` (which sets `skip_repair`) may open a corrupt
        // image read-write so that `-r` can repair it; the corrupt flag still refuses
        // every guest write until a successful repair clears it.
        if hdr.incompatible & INCOMPAT_CORRUPT != 0 && !opts.read_only && !opts.skip_repair {
            return Err(Corruption::new(Structure::Image, Problem::CorruptOnOpen).into());
        }
        if hdr.size > (1u64 << 62) {
            return Err(Corruption::new(
                Structure::Qcow2Header,
                Problem::TooLarge {
                    field: Field::ImageSize,
                    value: hdr.size,
                    max: 1 << 62,
                },
            )
            .into());
        }
        // L1 table.
        let need_l1 = g.l1_entries_for(hdr.size);
        if u64::from(hdr.l1_size) * 8 > MAX_L1_BYTES {
            return Err(Corruption::new(
                Structure::L1Table,
                Problem::TooLarge {
                    field: Field::Entries,
                    value: hdr.l1_size.into(),
                    max: MAX_L1_BYTES / 8,
                },
            )
            .at(hdr.l1_table_offset)
            .into());
        }
        if u64::from(hdr.l1_size) < need_l1 {
            return Err(Corruption::new(
                Structure::L1Table,
                Problem::L1TooSmall {
                    entries: hdr.l1_size.into(),
                    disk_size: hdr.size,
                    need: need_l1,
                },
            )
            .at(hdr.l1_table_offset)
            .into());
        }
        let l1_bytes = u64::from(hdr.l1_size) * 8;
        validate_table(
            Structure::L1Table,
            None,
            hdr.l1_table_offset,
            l1_bytes,
            cs,
            file_len,
        )?;
        let mut l1 = vec![0u64; hdr.l1_size as usize];
        if !l1.is_empty() {
            let mut raw = vec![0u8; l1_bytes as usize];
            storage.read_at(&mut raw, hdr.l1_table_offset)?;
            for (e, c) in l1.iter_mut().zip(raw.chunks_exact(8)) {
                *e = u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
            }
        }
        // Refcount table.
        let rt_bytes = u64::from(hdr.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Corruption::new(
                Structure::RefcountTable,
                Problem::TooLarge {
                    field: Field::Clusters,
                    value: hdr.refcount_table_clusters.into(),
                    max: MAX_REFTABLE_BYTES,
                },
            )
            .at(hdr.refcount_table_offset)
            .into());
        }
        // A missing or misplaced refcount table (no clusters, offset 0, past the end of
        // the file) makes the image unusable, but `check` may still open it: to report
        // it, and with `-r all` to rebuild the refcount structure from the tables (as
        // `qemu-img check -r all` does). Until then nothing may be written.
        let rc_problem = if hdr.refcount_table_clusters == 0 {
            Some(Error::from(Corruption::new(
                Structure::RefcountTable,
                Problem::Missing,
            )))
        } else {
            validate_table(
                Structure::RefcountTable,
                None,
                hdr.refcount_table_offset,
                rt_bytes,
                cs,
                file_len,
            )
            .err()
        };
        let rc_broken = match rc_problem {
            Some(Error::Corrupt(c))
                if opts.skip_repair && hdr.refcount_table_offset.is_multiple_of(cs) =>
            {
                Some(c)
            }
            Some(e) => return Err(e),
            None => None,
        };
        let rc_table: Vec<u64> = if rc_broken.is_some() {
            Vec::new()
        } else {
            let mut raw = vec![0u8; rt_bytes as usize];
            storage.event(crate::storage::BlkEvent::ReftableLoad);
            storage.read_at(&mut raw, hdr.refcount_table_offset)?;
            raw.chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        };
        // Snapshots.
        let snapshots = snapshot::read_table(&*storage, &hdr, &g, file_len)?;

        // Backing file.
        let has_backing = hdr.backing_file.is_some();
        let spec = match &hdr.backing_file {
            Some(name) => {
                let format = match hdr.backing_format.as_deref() {
                    None | Some("") => None,
                    Some(f) => Some(Format::parse(f).map_err(|_| {
                        Error::from(Unsupported::BackingFormat {
                            name: name.clone(),
                            format: f.to_string(),
                        })
                    })?),
                };
                Some(BackingSpec {
                    name: name.clone(),
                    format,
                })
            }
            None => None,
        };
        let backing = match (&spec, opts.no_backing) {
            (Some(s), false) => Some(resolver(s)?),
            _ => None,
        };

        let l2_tables = default_l2_tables(&g, hdr.size, opts.l2_cache_size);
        let rc_tables = match opts.refcount_cache_size {
            Some(b) => (b / cs).clamp(4, 1 << 16) as usize,
            None => (l2_tables / 4).max(4),
        };
        let zstd = hdr.compression_type == 1;
        let size = hdr.size;
        let dirty = hdr.incompatible & INCOMPAT_DIRTY != 0;
        let mut meta = Meta {
            st: storage.clone(),
            data,
            ext_data,
            data_raw,
            g,
            corrupt: hdr.incompatible & INCOMPAT_CORRUPT != 0,
            rc_broken,
            hdr,
            l1,
            l1_dirty: None,
            l2: Cache::new(l2_tables),
            rc_table,
            rc: Cache::new(rc_tables),
            free_hint: 0,
            inflight: InFlight::new(),
            direct: InFlight::new(),
            waiters: Waiters::default(),
            pending_frees: Vec::new(),
            unflushed: false,
            file_end: file_len,
            compress_cursor: 0,
            read_only: opts.read_only,
            has_backing,
            snapshots,
            set_dirty: false,
            bm: bitmap::State::default(),
        };
        let bm_rewrite = bitmap::open(&mut meta)?;
        if !opts.read_only {
            let mut rewrite = bm_rewrite;
            if meta.hdr.autoclear & !AUTOCLEAR_KNOWN != 0 {
                meta.hdr.autoclear &= AUTOCLEAR_KNOWN;
                rewrite = true;
            }
            if dirty && !opts.skip_repair {
                check::rebuild_refcounts(&mut meta)?;
                meta.hdr.incompatible &= !INCOMPAT_DIRTY;
                rewrite = true;
            }
            if rewrite {
                meta.write_header()?;
            }
        }
        let q = Qcow2 {
            data: meta.data.clone(),
            data_name,
            storage,
            backing,
            backing_spec: Mutex::new(spec),
            g,
            size: AtomicU64::new(size),
            read_only: opts.read_only,
            zstd,
            meta: Mutex::new(meta),
            alloc_done: Condvar::new(),
            closed: AtomicBool::new(false),
            crypto,
            bm: bitmap::Tracking::default(),
        };
        q.bm_refresh_active(&q.lock());
        Ok(q)
    }

    /// The data cipher of an encrypted image.
    pub(crate) fn data_cipher(&self) -> Option<&crate::crypto::DataCipher> {
        self.crypto.as_ref().and_then(|c| c.data.as_ref())
    }

    /// Guest data of an encrypted image opened without its key cannot be read or
    /// written.
    fn data_io(&self) -> Result<()> {
        match &self.crypto {
            Some(c) if c.data.is_none() => {
                Err(crate::crypto::CryptoError::NoKeySecret("encrypt.").into())
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }
}

/// Checks a table's offset: cluster aligned, not overlapping the header, inside the file.
/// `entry` is the snapshot a snapshot L1 table belongs to.
pub(crate) fn validate_table(
    what: Structure,
    entry: Option<u64>,
    offset: u64,
    bytes: u64,
    cs: u64,
    file_len: u64,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    if !offset.is_multiple_of(cs) {
        return Err(table_error(what, entry, offset, Problem::Unaligned));
    }
    if offset == 0 {
        return Err(table_error(what, entry, offset, Problem::OverlapsHeader));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len && end <= MAX_HOST_OFFSET => Ok(()),
        _ => Err(table_error(
            what,
            entry,
            offset,
            Problem::PastEnd {
                bytes,
                end: file_len,
            },
        )),
    }
}

/// The corruption of a misplaced table.
fn table_error(what: Structure, entry: Option<u64>, offset: u64, problem: Problem) -> Error {
    Error::Corrupt(Corruption {
        structure: what,
        entry,
        offset: Some(offset),
        problem,
    })
}

impl Driver for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.g.cs)
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        super::check_range(offset, buf.len() as u64, self.size())?;
        self.data_io()?;
        datapath::read_vectored(self, &mut [IoSliceMut::new(buf)], offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        super::check_range(offset, buf.len() as u64, self.size())?;
        self.data_io()?;
        datapath::write_vectored(self, &[IoSlice::new(buf)], offset)
    }
    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        super::check_range(offset, len, self.size())?;
        self.data_io()?;
        datapath::read_vectored(self, bufs, offset)
    }
    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.writable()?;
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        super::check_range(offset, len, self.size())?;
        self.data_io()?;
        datapath::write_vectored(self, bufs, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        super::check_range(offset, len, self.size())?;
        self.data_io()?;
        self.do_write_zeroes(offset, len, flags)
    }
    fn direct(&self, offset: u64, len: u64, write: bool) -> Option<DirectRange<'_>> {
        if !super::direct_gate(write, self.writable(), offset, len, self.size()) {
            return None;
        }
        self.data_io().ok()?;
        datapath::direct::direct(self, offset, len, write)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        super::check_range(offset, len, self.size())?;
        self.do_discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.lock();
        m.st.event(crate::storage::BlkEvent::FlushToOs);
        m.writeback_for_flush()?;
        // Under the lock: `unflushed` may only be cleared once the flush has happened,
        // or a concurrent barrier could skip a flush it needs.
        m.st.event(crate::storage::BlkEvent::FlushToDisk);
        m.flush_storages()?;
        m.unflushed = false;
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        super::check_range(offset, len, self.size())?;
        self.do_block_status(offset, len)
    }
    fn save_vmstate(&self, buf: &[u8], pos: u64) -> Result<()> {
        self.writable()?;
        self.data_io()?;
        self.do_save_vmstate(buf, pos)
    }
    fn load_vmstate(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        self.data_io()?;
        self.do_load_vmstate(buf, pos)
    }
    fn backing_spec(&self) -> Option<BackingSpec> {
        self.backing_spec
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn backing(&self) -> Option<&Arc<dyn Driver>> {
        self.backing.as_ref()
    }
    fn format_specific(&self) -> FormatSpecific {
        let m = self.lock();
        FormatSpecific::Qcow2 {
            compat: if m.g.version == 2 { "0.10" } else { "1.1" }.to_string(),
            compression_type: if self.zstd { "zstd" } else { "zlib" }.to_string(),
            lazy_refcounts: m.hdr.compatible & COMPAT_LAZY_REFCOUNTS != 0,
            refcount_bits: 1 << m.g.rc_order,
            corrupt: m.hdr.incompatible & INCOMPAT_CORRUPT != 0,
            extended_l2: m.hdr.incompatible & INCOMPAT_EXTL2 != 0,
            // QEMU shows the header's name (a `data-file` child given instead with no
            // name in the header shows none).
            data_file: if m.ext_data {
                m.hdr.data_file_name()
            } else {
                None
            },
            data_file_raw: m.data_raw,
        }
    }
    fn external_data(&self) -> Option<String> {
        self.data_name.clone()
    }
    fn encryption(&self) -> Option<super::EncryptionInfo> {
        self.crypto.as_ref().map(|c| c.info())
    }
    fn is_dirty(&self) -> bool {
        self.lock().hdr.incompatible & INCOMPAT_DIRTY != 0
    }
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.lock()
            .snapshots
            .iter()
            .map(|s| s.info.clone())
            .collect()
    }
    fn amend(
        &self,
        opts: &super::options::OptionValues,
        force: bool,
        status: &dyn Fn(u64, u64),
    ) -> Result<()> {
        self.do_amend(opts, force, status)
    }
    fn make_empty(&self) -> Result<()> {
        self.writable()?;
        self.storage
            .event(crate::storage::BlkEvent::EmptyImagePrepare);
        let last = self.size().div_ceil(self.g.cs);
        self.set_clusters(0, last, zero::Mode::Dealloc)?;
        self.flush()
    }
    fn snapshot_load(&self, id: Option<&str>, name: Option<&str>) -> Result<SnapshotInfo> {
        self.do_snapshot_load(id, name)
    }
    fn snapshot_create(&self, sn: &SnapshotInfo) -> Result<SnapshotInfo> {
        if self.lock().ext_data {
            // The spec: no internal snapshots with an external data file.
            return Err(Unsupported::ExternalDataFile.into());
        }
        self.do_snapshot_create(sn)
    }
    fn snapshot_apply(&self, id_or_name: &str) -> Result<SnapshotInfo> {
        self.do_snapshot_apply(id_or_name)
    }
    fn snapshot_delete(&self, id: Option<&str>, name: Option<&str>) -> Result<SnapshotInfo> {
        self.do_snapshot_delete(id, name)
    }
    fn check(&self, repair: Repair) -> Result<CheckReport> {
        if (repair.leaks || repair.errors) && self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut m = self.lock();
        if !self.read_only {
            m.writeback()?;
        }
        check::check(&mut m, self.size(), repair)
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        if self.lock().ext_data {
            // The spec: no compressed clusters with an external data file.
            return Err(Unsupported::ExternalDataFile.into());
        }
        if self.crypto.is_some() {
            return Err(Unsupported::CompressedEncrypted.into());
        }
        self.do_write_compressed(buf, offset)
    }
    fn resize(&self, new_size: u64, shrink: bool) -> Result<()> {
        self.writable()?;
        self.do_resize(new_size, shrink)
    }
    fn preallocate_grown(&self, offset: u64, len: u64, mode: PreallocMode) -> Result<()> {
        self.writable()?;
        crate::format::check_range(offset, len, self.size())?;
        let cs = self.g.cs;
        // Whole clusters only: a cluster the old end cuts keeps its mapping.
        let (first, end) = (offset.div_ceil(cs), (offset + len).div_ceil(cs));
        let mode = match mode {
            PreallocMode::Metadata => prealloc::Prealloc::Metadata,
            PreallocMode::Falloc => prealloc::Prealloc::Falloc,
            PreallocMode::Full => prealloc::Prealloc::Full,
        };
        prealloc::preallocate(self, first, end, mode)
    }
    fn set_backing_spec(&self, spec: Option<&BackingSpec>) -> Result<()> {
        self.writable()?;
        let mut m = self.lock();
        m.check_writable()?;
        let mut h = m.hdr.clone();
        h.backing_file = spec.map(|s| s.name.clone());
        h.backing_format = spec.and_then(|s| s.format).map(|f| f.name().to_string());
        // Fails (changing nothing) if the name does not fit in the header cluster.
        h.serialize()?;
        m.writeback()?;
        m.hdr = h;
        m.write_header()?;
        m.has_backing = spec.is_some();
        drop(m);
        *self.backing_spec.lock().unwrap_or_else(|p| p.into_inner()) = spec.cloned();
        Ok(())
    }
    fn bitmaps(&self) -> Option<&dyn super::bitmap::PersistentBitmaps> {
        Some(self)
    }
    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.closed.store(true, Ordering::Release);
        let mut m = self.lock();
        // Bitmaps first: they allocate, and their write-back ends with a flush.
        let stored = m.bm_store();
        m.writeback()?;
        m.flush_storages()?;
        m.unflushed = false;
        if m.set_dirty {
            m.hdr.incompatible &= !INCOMPAT_DIRTY;
            m.write_header()?;
            m.set_dirty = false;
        }
        stored.map(|_| ())
    }
}

impl Drop for Qcow2 {
    /// A driver dropped without `close` (e.g. by a front-end holding only the driver)
    /// still writes its cached metadata back, so no completed write is lost.
    fn drop(&mut self) {
        if !self.read_only && !self.closed.load(Ordering::Acquire) {
            if let Err(e) = Driver::close(self) {
                tracing::warn!("qcow2: closing on drop: {e}");
            }
        }
    }
}
