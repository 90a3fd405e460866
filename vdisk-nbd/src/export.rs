//! One exported image: its name, description, policy (read-only, discard) and the
//! translation of the image's block status into NBD metadata.

use crate::proto;
use std::sync::Arc;
use vdisk::chain::ChainExtent;
use vdisk::format::bitmap::DirtyBitmap;
use vdisk::{ExtentKind, Image};

/// What TRIM and unmapping zero writes do (`--discard`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscardMode {
    /// TRIM succeeds without touching the image; zero writes never deallocate.
    Ignore,
    /// TRIM discards; zero writes may deallocate unless the client says NO_HOLE.
    Unmap,
}

/// How the export behaves.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// Export name clients must ask for (`-x`, default empty).
    pub name: String,
    /// Free-text description (`-D`).
    pub description: Option<String>,
    /// Refuse writes (`-r`).
    pub read_only: bool,
    /// Several clients may connect (`-e N>1`): advertise CAN_MULTI_CONN.
    pub multi_conn: bool,
    /// Offer `qemu:allocation-depth` (`-A`).
    pub allocation_depth: bool,
    /// TRIM policy. (Zero detection, `--detect-zeroes`, is a write hook registered on
    /// the image: see [`vdisk::hook::DetectZeroes`].)
    pub discard: DiscardMode,
}

/// A metadata context the server offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: hole and zero bits.
    BaseAllocation,
    /// `qemu:allocation-depth`: 0 unallocated, 1 top image, 2 its backing file...
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME` (`-B NAME`): 1 = dirty; the index of the export's
    /// bitmap.
    DirtyBitmap(u32),
}

/// Context ids of dirty bitmaps start here.
const BITMAP_ID_BASE: u32 = 3;

impl MetaContext {
    /// The context's name on the wire (a dirty bitmap's name is the export's:
    /// [`Export::context_name`]).
    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => "base:allocation",
            MetaContext::AllocationDepth => "qemu:allocation-depth",
            MetaContext::DirtyBitmap(_) => "qemu:dirty-bitmap:",
        }
    }
    /// Context id used in SET_META_CONTEXT replies and status chunks (fixed: the
    /// protocol lets them be per-connection, but stable ids are simpler to trace).
    pub fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 1,
            MetaContext::AllocationDepth => 2,
            MetaContext::DirtyBitmap(i) => BITMAP_ID_BASE.saturating_add(i),
        }
    }
    /// Looks a context up by id.
    pub fn from_id(id: u32) -> Option<MetaContext> {
        match id {
            1 => Some(MetaContext::BaseAllocation),
            2 => Some(MetaContext::AllocationDepth),
            i if i >= BITMAP_ID_BASE => Some(MetaContext::DirtyBitmap(i - BITMAP_ID_BASE)),
            _ => None,
        }
    }
    /// The status value this context gives a run of the chain.
    pub fn status(self, e: &ChainExtent) -> u32 {
        match self {
            MetaContext::BaseAllocation => match e.kind {
                ExtentKind::Data => 0,
                // Zero clusters, holes and unallocated ranges (with nothing below)
                // all read as zeroes and occupy nothing in the top file's data.
                ExtentKind::Zero | ExtentKind::Unallocated => proto::STATE_HOLE | proto::STATE_ZERO,
            },
            MetaContext::AllocationDepth => match e.kind {
                ExtentKind::Unallocated => 0,
                _ => e.depth.saturating_add(1),
            },
            // Dirty bitmaps are answered from the bitmap, not the chain.
            MetaContext::DirtyBitmap(_) => 0,
        }
    }
}

/// An image being served, shared by every connection.
#[derive(Debug)]
pub struct Export {
    /// The image.
    pub image: Arc<Image>,
    /// Policy.
    pub cfg: ExportConfig,
    /// Dirty bitmaps exported as `qemu:dirty-bitmap:NAME` contexts (`-B`), in the
    /// order qemu-nbd lists them. Live: an enabled bitmap of a writable export goes on
    /// recording writes, as in qemu-nbd.
    pub bitmaps: Vec<(String, Arc<DirtyBitmap>)>,
    /// Reads and writes of at most this many bytes are served by the connection's
    /// reader thread itself, their replies batched into one `writev` (0, the default of
    /// [`Export::new`]: never). Only for images whose every layer is a local file in
    /// the page cache (`vdisk serve` decides, see [`inline_max_for`]): a request that
    /// can wait long in the driver (O_DIRECT, a network backing file) would hold up
    /// every request behind it, so those go to the worker pool.
    pub inline_max: u64,
    /// Connections try an io_uring of their own for the reads and writes the image
    /// hands out as direct ranges ([`vdisk::Image::direct`]: O_DIRECT files), see
    /// [`crate::uring`]; false (the default of [`Export::new`]): the worker pool only.
    /// `vdisk serve` sets it with `--cache=none` / `directsync`.
    pub async_io: bool,
}

/// The [`Export::inline_max`] of a buffered image on local files.
pub const INLINE_MAX: u64 = 32 << 10;

/// The [`Export::inline_max`] for `image`: [`INLINE_MAX`] when it is buffered
/// (`direct` false) and every layer of its chain is a local file, else 0.
pub fn inline_max_for(image: &Image, direct: bool) -> u64 {
    let local = matches!(image.protocol(), "file" | "host_device")
        && image
            .layers()
            .iter()
            .all(|l| std::fs::metadata(l.path()).is_ok());
    if local && !direct {
        INLINE_MAX
    } else {
        0
    }
}

impl Export {
    /// Wraps an open image.
    pub fn new(image: Arc<Image>, cfg: ExportConfig) -> Export {
        Export {
            image,
            cfg,
            bitmaps: Vec::new(),
            inline_max: 0,
            async_io: false,
        }
    }

    /// Sets [`Export::async_io`].
    pub fn with_async_io(mut self, on: bool) -> Export {
        self.async_io = on;
        self
    }

    /// Sets [`Export::inline_max`].
    pub fn with_inline_max(mut self, n: u64) -> Export {
        self.inline_max = n;
        self
    }

    /// Exports the image's persistent bitmaps `names` (`-B`, in command-line order;
    /// qemu-nbd lists them last first). Fails naming a missing or inconsistent bitmap.
    pub fn with_bitmaps(self, names: &[String]) -> Result<Export, String> {
        let image = self.image.clone();
        self.with_bitmaps_of(&image, names)
    }

    /// [`Export::with_bitmaps`], the bitmaps taken from `source` rather than from the
    /// exported image: with `-s`, qemu-nbd exports the bitmaps of the image under the
    /// temporary overlay, as they were when it opened (writes land in the overlay and
    /// mark nothing; checked against qemu-nbd 10).
    pub fn with_bitmaps_of(mut self, source: &Image, names: &[String]) -> Result<Export, String> {
        for n in names.iter().rev() {
            if self.bitmaps.iter().any(|(x, _)| x == n) {
                continue;
            }
            let b = source.bitmap_view(n).map_err(|e| match e {
                vdisk::Error::Bitmap(vdisk::error::BitmapError::NotFound(_)) => {
                    format!("Bitmap '{n}' is not found")
                }
                e => e.to_string(),
            })?;
            self.bitmaps.push((n.clone(), b));
        }
        Ok(self)
    }

    /// A context's name on the wire.
    pub fn context_name(&self, c: MetaContext) -> String {
        match c {
            MetaContext::DirtyBitmap(i) => format!(
                "qemu:dirty-bitmap:{}",
                self.bitmaps.get(i as usize).map_or("", |b| b.0.as_str())
            ),
            c => c.name().to_string(),
        }
    }

    /// Descriptors `(length, status)` of exported bitmap `i` over `[offset, offset+len)`
    /// (status 1 = dirty), at most `max` of them.
    pub fn bitmap_descriptors(&self, i: u32, offset: u64, len: u64, max: usize) -> Vec<(u64, u32)> {
        let Some((_, b)) = self.bitmaps.get(i as usize) else {
            return vec![(len, 0)];
        };
        let mut d: Vec<(u64, u32)> = b
            .extents_max(offset, len, max)
            .into_iter()
            .map(|(_, l, dirty)| (l, u32::from(dirty)))
            .collect();
        if d.is_empty() {
            d.push((len, 0));
        }
        d
    }

    /// Guest size.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// The minimum block size advertised (NBD_INFO_BLOCK_SIZE), as qemu-nbd's: 512 where
    /// QEMU's block layer aligns requests to sectors (QED, and a raw image whose format
    /// was probed), else 1. Requests need not honour it: any alignment is served.
    pub fn min_block(&self) -> u32 {
        let caps = self.image.format().caps();
        if caps.sector_aligned || (caps.raw_data && self.image.format_probed()) {
            512
        } else {
            1
        }
    }

    /// Transmission flags, as qemu-nbd advertises them for the same configuration and
    /// negotiation (`contexts`: metadata contexts were selected).
    pub fn transmission_flags(&self, structured: bool, extended: bool, contexts: bool) -> u16 {
        let mut f = proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_CACHE;
        if self.cfg.read_only {
            f |= proto::TFLAG_READ_ONLY;
        } else {
            f |= proto::TFLAG_SEND_TRIM
                | proto::TFLAG_SEND_WRITE_ZEROES
                | proto::TFLAG_SEND_FAST_ZERO;
        }
        if structured {
            f |= proto::TFLAG_SEND_DF;
        }
        // Only useful (and only advertised by qemu-nbd) with contexts to filter.
        if extended && contexts {
            f |= proto::TFLAG_BLOCK_STATUS_PAYLOAD;
        }
        if self.cfg.multi_conn {
            f |= proto::TFLAG_CAN_MULTI_CONN;
        }
        f
    }

    /// Every context this export offers.
    pub fn contexts(&self) -> Vec<MetaContext> {
        let mut v = vec![MetaContext::BaseAllocation];
        if self.cfg.allocation_depth {
            v.push(MetaContext::AllocationDepth);
        }
        for i in 0..self.bitmaps.len() {
            v.push(MetaContext::DirtyBitmap(i as u32));
        }
        v
    }

    /// Resolves one SET_META_CONTEXT query to a context (unknown queries select nothing).
    pub fn select_context(&self, query: &str) -> Option<MetaContext> {
        self.contexts()
            .into_iter()
            .find(|c| self.context_name(*c) == query)
    }

    /// Contexts matching a LIST_META_CONTEXT query: exact names, or a namespace
    /// wildcard (`base:`, `qemu:`).
    pub fn list_contexts(&self, query: &str) -> Vec<MetaContext> {
        self.contexts()
            .into_iter()
            .filter(|c| {
                let name = self.context_name(*c);
                let name = name.as_str();
                name == query
                    || (query.ends_with(':') && name.starts_with(query) && !query.is_empty())
            })
            .collect()
    }

    /// Status runs of the chain covering `[offset, offset+len)` from `offset`, at most
    /// `max_runs` of them (the last may then end before `offset+len`). The range must
    /// lie inside the export. At least one run is returned unless the first lookup fails.
    pub fn status_runs(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> vdisk::Result<Vec<ChainExtent>> {
        let mut runs: Vec<ChainExtent> = Vec::new();
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end && runs.len() < max_runs {
            let e = match self.image.block_status(pos, end - pos) {
                Ok(e) => e,
                // A partial answer is still a correct answer for what it covers.
                Err(_) if !runs.is_empty() => break,
                Err(e) => return Err(e),
            };
            // A driver answering zero bytes would never make progress.
            let n = e.len.min(end - pos);
            if n == 0 {
                break;
            }
            let e = ChainExtent { len: n, ..e };
            match runs.last_mut() {
                Some(last) if last.kind == e.kind && last.depth == e.depth => last.len += n,
                _ => runs.push(e),
            }
            pos += n;
        }
        if runs.is_empty() {
            return Err(vdisk::error::Invalid::NoBlockStatus { offset, len }.into());
        }
        Ok(runs)
    }
}

/// Turns runs into (length, status) descriptors for one context, merging neighbours
/// with the same status.
pub fn descriptors(ctx: MetaContext, runs: &[ChainExtent]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for r in runs {
        let s = ctx.status(r);
        match out.last_mut() {
            Some(last) if last.1 == s => last.0 += r.len,
            _ => out.push((r.len, s)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(len: u64, kind: ExtentKind, depth: u32) -> ChainExtent {
        ChainExtent {
            len,
            kind,
            depth,
            offset: None,
            compressed: false,
        }
    }

    #[test]
    fn descriptors_merge_by_context() {
        let runs = [
            run(10, ExtentKind::Data, 0),
            run(20, ExtentKind::Zero, 0),
            run(30, ExtentKind::Unallocated, 1),
            run(5, ExtentKind::Data, 1),
        ];
        assert_eq!(
            descriptors(MetaContext::BaseAllocation, &runs),
            vec![(10, 0), (50, 3), (5, 0)]
        );
        assert_eq!(
            descriptors(MetaContext::AllocationDepth, &runs),
            vec![(30, 1), (30, 0), (5, 2)]
        );
    }
}
