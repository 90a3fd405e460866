//! VMDK (VMware virtual disk), as QEMU reads and writes it.
//!
//! Layout and rules: VMware's "Virtual Disk Format 1.1" specification, and QEMU's
//! behaviour where qemu-img's output is the reference. Files by concern:
//! - [`header`]: the sparse extent header, the stream footer and grain markers, parsed
//!   and serialised in one place;
//! - [`text`]: the text descriptor (parsed as QEMU does, rendered as qemu-img writes it);
//! - [`extent`]: flat and sparse extents, the grain directory, the bounded grain table
//!   cache with write-back, one grain's lookup;
//! - `io`: reads, writes, zero writes and block status across extents;
//! - `stream`: writes to stream-optimized (compressed) extents: grains gathered until
//!   whole, compressed, appended;
//! - `create`: new images; `check`: QEMU's check; [`options`]: the declared options.
//!
//! Extents live in several files: the image's own storage (monolithic files) or files
//! the descriptor names, opened through the [`FileResolver`](crate::format::FileResolver)
//! the chain layer passes to `open` (never by this module). Because guest data spans
//! several storages, the driver moves its bytes itself instead of through the
//! single-storage [`crate::format::datapath`].
//!
//! Crash rules: a new grain is written (data and its copy-on-write fill) before its
//! grain table entry, and grain table entries changed in memory reach the file only in
//! [`Driver::flush`] (or when the table cache is full), after a flush of the data: no
//! table on disk ever points at a grain that may not be there. Stream-optimized grains
//! follow the same rule.
//!
//! Concurrency: reads and in-place writes take no lock beyond the grain table cache's
//! for the moment of a lookup; allocations are ordered by one allocation mutex (they
//! re-check the grain under it).

pub mod descriptor;
pub mod extent;
pub mod header;
pub mod options;
pub mod text;

mod check;
mod create;
mod io;
mod stream;

use super::{
    BackingSpec, CheckReport, Driver, Extent as BlockExtent, Format, FormatSpecific, Repair,
    VmdkExtentInfo, ZeroFlags,
};
use crate::error::{Corruption, Error, Problem, Result, Structure, Unsupported, VmdkProblem};
use crate::format::registry::OpenArgs;
use crate::storage::Storage;
use extent::{Extent, Layout};
use header::SECTOR;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes of descriptor QEMU reads and rewrites (20 sectors).
const DESC_SIZE: usize = 20 * 512;

/// Create types QEMU opens from a descriptor file.
const DESCRIPTOR_TYPES: &[&str] = &[
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

/// The last decompressed grain: extent index, host offset, bytes.
type LastGrain = (usize, u64, Arc<Vec<u8>>);

/// An open VMDK image.
#[derive(Debug)]
pub struct Vmdk {
    /// The image's own file (descriptor, and the extent of a monolithic image).
    meta: Arc<dyn Storage>,
    /// Where the descriptor text starts in `meta`.
    desc_offset: u64,
    extents: Vec<Extent>,
    size: u64,
    create_type: String,
    cid: AtomicU32,
    parent_cid: u32,
    /// The CID was rewritten after the first write of this session (as QEMU does).
    cid_updated: AtomicBool,
    backing_spec: Option<BackingSpec>,
    backing: Option<Arc<dyn Driver>>,
    /// The parent's CID matches `parent_cid` (reads through the parent fail otherwise).
    parent_ok: bool,
    read_only: bool,
    /// Orders allocations (all extents).
    alloc: Mutex<()>,
    /// Pending and in-flight compressed grains.
    stream: stream::StreamState,
    /// The last decompressed grain: (extent, host offset, bytes).
    last_grain: Mutex<Option<LastGrain>>,
}

fn bad(s: Structure, p: VmdkProblem) -> Error {
    Corruption::new(s, Problem::Vmdk(p)).into()
}

/// Reads up to `max` bytes at `off` (fewer at the end of the file).
fn read_head(st: &dyn Storage, off: u64, max: usize) -> Result<Vec<u8>> {
    let len = st.len()?;
    let n = len.saturating_sub(off).min(max as u64) as usize;
    let mut b = vec![0u8; n];
    st.read_at(&mut b, off)?;
    Ok(b)
}

impl Vmdk {
    /// Whether the extents agree as QEMU's `vmdk_co_get_info` requires (all flat, or
    /// all sparse with one grain size and compression); it fails otherwise, and
    /// qemu-img then shows no cluster size and no dirty flag.
    fn extents_agree(&self) -> bool {
        let Some(first) = self.extents.first() else {
            return false;
        };
        self.extents
            .iter()
            .all(|e| match (&e.layout, &first.layout) {
                (Layout::Flat(_), Layout::Flat(_)) => true,
                (Layout::Sparse(a), Layout::Sparse(b)) => {
                    a.compressed == b.compressed && a.grain == b.grain
                }
                _ => false,
            })
    }

    /// Opens a VMDK image: a sparse extent (monolithic, stream-optimized) or a text
    /// descriptor naming its extents.
    pub fn open(args: OpenArgs<'_, '_>) -> Result<Vmdk> {
        let OpenArgs {
            meta,
            opts,
            backing,
            files,
            ..
        } = args;
        let read_only = opts.read_only;
        if meta.len()? < 4 {
            return Err(bad(Structure::VmdkHeader, VmdkProblem::TooSmall));
        }
        let head = read_head(&*meta, 0, 512)?;
        let mut extents = Vec::new();
        let (create_type, desc_offset, desc) = match header::magic(&head) {
            header::VMDK3_MAGIC | header::VMDK4_MAGIC => {
                let h = header::Header::parse(&pad512(&head));
                let embedded = h
                    .as_ref()
                    .ok()
                    .filter(|h| header::magic(&head) == header::VMDK4_MAGIC && h.capacity == 0)
                    .map(|h| h.desc_offset)
                    .filter(|&d| d != 0);
                if let Some(d) = embedded {
                    // A descriptor-only sparse header: the descriptor lies at `d`.
                    let off = d.saturating_mul(SECTOR);
                    let text = read_head(&*meta, off, text::MAX_DESC)?;
                    let (ct, desc) = Self::descriptor(&text, &mut extents, files, read_only)?;
                    (ct, 0, desc)
                } else {
                    let (s, sectors, h) = extent::open_sparse(&*meta, &pad512(&head), read_only)?;
                    let ct = if s.compressed {
                        "streamOptimized"
                    } else {
                        "monolithicSparse"
                    };
                    let _ = h;
                    extents.push(Extent {
                        storage: meta.clone(),
                        filename: None,
                        kind: String::new(),
                        start: 0,
                        len: sectors.saturating_mul(SECTOR),
                        layout: Layout::Sparse(s),
                    });
                    let desc = text::Descriptor::parse(&read_head(&*meta, 0x200, DESC_SIZE)?)?;
                    (ct.to_string(), 0x200, desc)
                }
            }
            _ => {
                let raw = read_head(&*meta, 0, text::MAX_DESC)?;
                let (ct, desc) = Self::descriptor(&raw, &mut extents, files, read_only)?;
                (ct, 0, desc)
            }
        };
        let size = extents.last().map_or(0, |e| e.start + e.len);
        let cid = desc
            .cid
            .ok_or_else(|| bad(Structure::VmdkDescriptor, VmdkProblem::BadDescriptor))?;
        let parent_cid = desc
            .parent_cid
            .ok_or_else(|| bad(Structure::VmdkDescriptor, VmdkProblem::BadDescriptor))?;
        let backing_spec = desc.parent_hint.map(|name| BackingSpec {
            name,
            format: Some(Format::Vmdk),
        });
        let backing_drv = match &backing_spec {
            Some(s) if !opts.no_backing => Some(backing(s)?),
            _ => None,
        };
        let parent_ok = match backing_drv.as_ref().map(|b| b.format_specific()) {
            Some(FormatSpecific::Vmdk { cid, .. }) => cid == parent_cid,
            _ => false,
        };
        Ok(Vmdk {
            meta,
            desc_offset,
            extents,
            size,
            create_type,
            cid: AtomicU32::new(cid),
            parent_cid,
            cid_updated: AtomicBool::new(false),
            backing_spec,
            backing: backing_drv,
            parent_ok,
            read_only,
            alloc: Mutex::new(()),
            stream: stream::StreamState::default(),
            last_grain: Mutex::new(None),
        })
    }

    /// Opens the extents a descriptor file names; returns its create type and text.
    fn descriptor(
        raw: &[u8],
        extents: &mut Vec<Extent>,
        mut files: Option<&mut crate::format::FileResolver<'_>>,
        read_only: bool,
    ) -> Result<(String, text::Descriptor)> {
        let desc = text::Descriptor::parse(raw)?;
        let ct = desc
            .create_type
            .clone()
            .ok_or_else(|| bad(Structure::VmdkDescriptor, VmdkProblem::BadDescriptor))?;
        if !DESCRIPTOR_TYPES.contains(&ct.as_str()) {
            return Err(bad(Structure::VmdkDescriptor, VmdkProblem::ImageType(ct)));
        }
        let mut start = 0u64;
        for line in &desc.extents {
            let Some(open) = files.as_deref_mut() else {
                return Err(bad(
                    Structure::VmdkDescriptor,
                    VmdkProblem::RelativeExtent(line.file.clone()),
                ));
            };
            let (st, name) = open(&line.file)?;
            let (layout, len) = match line.kind.as_str() {
                "FLAT" | "VMFS" => (
                    Layout::Flat(line.offset.saturating_mul(SECTOR)),
                    line.sectors.saturating_mul(SECTOR),
                ),
                "SPARSE" | "VMFSSPARSE" => {
                    let head = read_head(&*st, 0, 512)?;
                    if head.len() < 4 {
                        return Err(bad(Structure::VmdkHeader, VmdkProblem::TooSmall));
                    }
                    let (s, sectors, _) = extent::open_sparse(&*st, &pad512(&head), read_only)?;
                    (Layout::Sparse(s), sectors.saturating_mul(SECTOR))
                }
                other => {
                    return Err(bad(
                        Structure::VmdkDescriptor,
                        VmdkProblem::ExtentType(other.to_string()),
                    ))
                }
            };
            extents.push(Extent {
                storage: st,
                filename: Some(name),
                kind: line.kind.clone(),
                start,
                len,
                layout,
            });
            start = start.saturating_add(len);
        }
        Ok((ct, desc))
    }

    /// Index of the extent holding guest byte `off` (< size).
    fn extent_at(&self, off: u64) -> Result<usize> {
        let i = self.extents.partition_point(|e| e.start + e.len <= off);
        if i < self.extents.len() {
            Ok(i)
        } else {
            Err(crate::error::Invalid::PastEnd {
                offset: off,
                len: 1,
                size: self.size,
            }
            .into())
        }
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The backing image for reads of unallocated grains (`None`: zeroes); a parent
    /// whose CID does not match fails, as in QEMU.
    fn parent(&self) -> Result<Option<&Arc<dyn Driver>>> {
        match &self.backing {
            Some(_) if !self.parent_ok => {
                Err(bad(Structure::VmdkDescriptor, VmdkProblem::BadDescriptor))
            }
            b => Ok(b.as_ref()),
        }
    }

    /// Rewrites the CID with a new random value on the first write of the session.
    fn touch_cid(&self) -> Result<()> {
        if self.cid_updated.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let raw = read_head(&*self.meta, self.desc_offset, DESC_SIZE)?;
        let cid = random_u32();
        if let Some(mut new) = text::with_cid(&raw, cid) {
            new.resize(DESC_SIZE, 0);
            self.meta.write_at(&new, self.desc_offset)?;
            self.meta.flush()?;
            self.cid.store(cid, Ordering::Release);
        }
        Ok(())
    }
}

/// A random 32-bit value (std's per-process random hasher keys, with the time).
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish() as u32
}

/// `b` padded with zeroes to one sector.
fn pad512(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    if v.len() < 512 {
        v.resize(512, 0);
    }
    v
}

impl Driver for Vmdk {
    fn format(&self) -> Format {
        Format::Vmdk
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> Option<u64> {
        // QEMU's `vmdk_co_get_info`: the first extent's grain when all extents agree.
        match &self.extents.first()?.layout {
            Layout::Sparse(s) if self.extents_agree() => Some(s.grain),
            _ => None,
        }
    }
    fn info_available(&self) -> bool {
        self.extents_agree()
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        &self.meta
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::format::check_range(offset, buf.len() as u64, self.size)?;
        io::read(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        crate::format::check_range(offset, buf.len() as u64, self.size)?;
        self.touch_cid()?;
        io::write(self, buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        crate::format::check_range(offset, len, self.size)?;
        self.touch_cid()?;
        io::write_zeroes(self, offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // QEMU's VMDK driver has no discard: nothing changes.
        crate::format::check_range(offset, len, self.size)
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        stream::flush_pending(self)?;
        let _a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        for e in &self.extents {
            if let Layout::Sparse(s) = &e.layout {
                if s.has_dirty() {
                    // Grains first, then the tables that point at them.
                    e.storage.flush()?;
                    s.write_back(&*e.storage)?;
                }
            }
            e.storage.flush()?;
        }
        self.meta.flush()?;
        Ok(())
    }
    fn data_file_at(&self, offset: u64) -> Option<crate::format::DataFileAt> {
        let e = &self.extents[self.extent_at(offset).ok()?];
        Some(crate::format::DataFileAt {
            storage: Arc::clone(&e.storage),
            name: e.filename.clone()?,
            raw: matches!(e.layout, Layout::Flat(_)),
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockExtent> {
        crate::format::check_range(offset, len, self.size)?;
        if len == 0 {
            return Err(crate::error::Invalid::EmptyBlockStatus { offset }.into());
        }
        io::block_status(self, offset, len)
    }
    fn backing_spec(&self) -> Option<BackingSpec> {
        self.backing_spec.clone()
    }
    fn backing(&self) -> Option<&Arc<dyn Driver>> {
        self.backing.as_ref()
    }
    fn format_specific(&self) -> FormatSpecific {
        FormatSpecific::Vmdk {
            cid: self.cid.load(Ordering::Acquire),
            parent_cid: self.parent_cid,
            create_type: self.create_type.clone(),
            extents: self
                .extents
                .iter()
                .map(|e| {
                    let (compressed, cluster_size) = match &e.layout {
                        Layout::Flat(_) => (false, None),
                        Layout::Sparse(s) => (s.compressed, Some(s.grain)),
                    };
                    VmdkExtentInfo {
                        filename: e.filename.clone(),
                        format: e.kind.clone(),
                        virtual_size: e.len,
                        compressed,
                        cluster_size,
                    }
                })
                .collect(),
        }
    }
    fn check(&self, repair: Repair) -> Result<CheckReport> {
        check::check(self, repair)
    }
    fn compresses_writes(&self) -> bool {
        self.extents
            .iter()
            .all(|e| matches!(&e.layout, Layout::Sparse(s) if s.compressed))
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        // As QEMU: a compressed write is a plain write (stream-optimized extents
        // compress every grain they store).
        self.write_at(buf, offset)
    }
    fn resize(&self, _new_size: u64, _shrink: bool) -> Result<()> {
        Err(Unsupported::NoResize("vmdk").into())
    }
    fn close(&self) -> Result<()> {
        self.flush()
    }
}

impl Drop for Vmdk {
    fn drop(&mut self) {
        if !self.read_only {
            if let Err(e) = self.flush() {
                tracing::warn!("VMDK: could not flush on drop: {e}");
            }
        }
    }
}
