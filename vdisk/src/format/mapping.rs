//! The typed mapping contract between a format driver and the generic data path
//! ([`super::datapath`]).
//!
//! A driver that implements [`Mapper`] gets guest reads and writes for free: the data
//! path asks it what lies at a guest range ([`Mapper::map`], one [`Run`] per call), and
//! how a guest range can be written ([`Mapper::prepare_write`]: in place behind an
//! [`InPlaceGuard`], or as a new [`Allocation`] with its copy-on-write regions), then
//! reports back ([`Mapper::commit`] once the data and COW are on disk, [`Mapper::abort`]
//! on an I/O error). The data path does every guest byte of I/O (vectored, no bounce
//! buffer for guest data); the driver owns every metadata byte.
//!
//! Rules a driver keeps behind this contract (the data path cannot see them):
//! - **Crash ordering**: refcounts (or the allocation cursor) durable before the mapping
//!   that uses them; data complete before the mapping that points at it (`commit` is
//!   called only after the data write returned, the driver adds whatever barrier its
//!   format needs); a mapping removed before the space it pointed at is reused.
//! - **Ordering of overlapping allocations**: `prepare_write` must not hand out a second
//!   allocation (or an in-place target) overlapping an allocation still in flight; it
//!   waits for that one to be committed or aborted and then looks at the mapping again
//!   (QEMU's `QCowL2Meta` discipline). [`super::datapath::InFlight`] is the list to do
//!   that with; where the list lives (one per image, one per L2 table) and under which
//!   lock is the driver's choice.
//! - **In-place writes vs. frees**: the host range of an [`WriteTarget::InPlace`] must not
//!   be released or reused (discard, zero with unmap) until its guard is dropped.
//! - Request-wide locks (e.g. a "quiesce" lock shared by every request) are taken by the
//!   driver's [`super::Driver`] entry points around the call into the data path.
//!
//! All offsets are typed: a [`GuestOffset`] can never be passed where a [`HostOffset`]
//! is expected. Lengths stay plain `u64` bytes.

use super::Driver;
use crate::crypto::DataCipher;
use crate::error::{Result, Unsupported};
use crate::storage::Storage;
use std::fmt;
use std::sync::Arc;

macro_rules! offset_type {
    ($(#[$doc:meta])* $name:ident, $label:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            #[inline]
            pub const fn get(self) -> u64 {
                self.0
            }
            /// `self + n` bytes.
            #[inline]
            pub const fn add(self, n: u64) -> Self {
                $name(self.0 + n)
            }
            /// `self + n` bytes, `None` on overflow.
            #[inline]
            pub fn checked_add(self, n: u64) -> Option<Self> {
                self.0.checked_add(n).map($name)
            }
            /// Bytes from `earlier` to `self` (`earlier <= self`).
            #[inline]
            pub const fn since(self, earlier: Self) -> u64 {
                self.0 - earlier.0
            }
            /// Index of the cluster of `1 << cluster_bits` bytes holding this byte.
            #[inline]
            pub const fn cluster(self, cluster_bits: u32) -> ClusterIndex {
                ClusterIndex(self.0 >> cluster_bits)
            }
            /// Offset of this byte inside its cluster of `cs` bytes (a power of two).
            #[inline]
            pub const fn in_cluster(self, cs: u64) -> u64 {
                self.0 & (cs - 1)
            }
            /// Whether this is a multiple of `align` (a power of two).
            #[inline]
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($label, " {:#x}"), self.0)
            }
        }
    };
}

offset_type!(
    /// A byte offset in the guest disk (what the guest sees).
    GuestOffset,
    "guest offset"
);
offset_type!(
    /// A byte offset in an image's storage (metadata or data storage, see [`Store`]).
    HostOffset,
    "host offset"
);

/// The index of a cluster (guest or host: the context says which).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterIndex(pub u64);

impl ClusterIndex {
    /// The raw value.
    #[inline]
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The next cluster.
    #[inline]
    pub const fn next(self) -> ClusterIndex {
        ClusterIndex(self.0 + 1)
    }
    /// Byte offset of the cluster's first byte, for clusters of `1 << cluster_bits`.
    #[inline]
    pub const fn start(self, cluster_bits: u32) -> u64 {
        self.0 << cluster_bits
    }
}

impl fmt::Display for ClusterIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cluster {}", self.0)
    }
}

/// Which of a driver's two storages a host offset refers to. Metadata (headers,
/// tables) always lives in the metadata storage; guest data lives in the data storage,
/// which is the same storage unless the image has an external data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// The image file itself (metadata; compressed clusters of qcow2).
    Metadata,
    /// Where guest data clusters live.
    Data,
}

/// Compression algorithm of a compressed cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (qcow2 compression type 0).
    Deflate,
    /// zstd (qcow2 compression type 1).
    Zstd,
}

/// What one layer says about a guest range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Guest bytes stored at `host` (the run's first byte) in `store`, contiguously for
    /// the whole run.
    Data {
        /// Which storage.
        store: Store,
        /// Host offset of the run's first byte.
        host: HostOffset,
        /// Can be overwritten in place (e.g. qcow2 COPIED: refcount exactly one).
        in_place: bool,
    },
    /// Reads as zeroes, decided by this layer; `host`: preallocated space of the run's
    /// first byte (contiguous for the run) in the data storage, if any.
    Zero {
        /// Preallocated host space, if any.
        host: Option<HostOffset>,
    },
    /// Not allocated in this layer: read the backing image (zeroes past its end or
    /// without one).
    Unallocated,
    /// One compressed cluster. A run with this mapping never spans more than the one
    /// guest cluster; `skip` says where in the decompressed cluster the run starts.
    Compressed {
        /// Which storage holds the compressed bytes.
        store: Store,
        /// Host byte offset of the compressed stream (not aligned).
        host: HostOffset,
        /// Bytes to read from `host` (may run past the end of the stream).
        len: u64,
        /// Algorithm.
        algorithm: Compression,
        /// Offset of the run's first byte inside the decompressed cluster.
        skip: u64,
    },
}

impl Mapping {
    /// The mapping `n` bytes further into the same run.
    pub fn advance(self, n: u64) -> Mapping {
        match self {
            Mapping::Data {
                store,
                host,
                in_place,
            } => Mapping::Data {
                store,
                host: host.add(n),
                in_place,
            },
            Mapping::Zero { host } => Mapping::Zero {
                host: host.map(|h| h.add(n)),
            },
            Mapping::Unallocated => Mapping::Unallocated,
            Mapping::Compressed {
                store,
                host,
                len,
                algorithm,
                skip,
            } => Mapping::Compressed {
                store,
                host,
                len,
                algorithm,
                skip: skip + n,
            },
        }
    }

    /// Whether a piece mapped as `next` directly continues a run of `len` bytes mapped
    /// as `self` (same kind, host contiguous); compressed runs never continue.
    pub fn continues(self, len: u64, next: Mapping) -> bool {
        match (self, next) {
            (
                Mapping::Data {
                    store: s1,
                    host: h1,
                    in_place: p1,
                },
                Mapping::Data {
                    store: s2,
                    host: h2,
                    in_place: p2,
                },
            ) => s1 == s2 && p1 == p2 && h1.checked_add(len) == Some(h2),
            (Mapping::Zero { host: None }, Mapping::Zero { host: None }) => true,
            (Mapping::Zero { host: Some(a) }, Mapping::Zero { host: Some(b) }) => {
                a.checked_add(len) == Some(b)
            }
            (Mapping::Unallocated, Mapping::Unallocated) => true,
            _ => false,
        }
    }
}

/// A run of guest bytes with one [`Mapping`]: the answer to [`Mapper::map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Bytes covered (> 0, at most what was asked).
    pub len: u64,
    /// What they are.
    pub mapping: Mapping,
}

impl Run {
    /// The run as block status reports it ([`super::Extent`]).
    pub fn extent(&self) -> super::Extent {
        use super::{Extent, ExtentKind};
        let (kind, offset, compressed) = match self.mapping {
            Mapping::Data { host, .. } => (ExtentKind::Data, Some(host.get()), false),
            Mapping::Zero { host } => (ExtentKind::Zero, host.map(HostOffset::get), false),
            Mapping::Unallocated => (ExtentKind::Unallocated, None, false),
            Mapping::Compressed { .. } => (ExtentKind::Data, None, true),
        };
        Extent {
            len: self.len,
            kind,
            offset,
            compressed,
        }
    }
}

/// Releases what an [`InPlaceGuard`] holds. Implemented by drivers.
pub trait ReleaseInPlace: Sync {
    /// Called once when the guard carrying `token` is dropped.
    fn release_in_place(&self, token: (u64, u64));
}

/// Keeps the host clusters of an in-place write from being released or reused (by a
/// concurrent discard or zero write) until dropped. `token` is the driver's own record
/// of what it protects (qcow2: a guest cluster range in its in-place list).
#[must_use = "dropping the guard ends the protection of the in-place write"]
pub struct InPlaceGuard<'a> {
    owner: Option<&'a dyn ReleaseInPlace>,
    token: (u64, u64),
}

impl<'a> InPlaceGuard<'a> {
    /// A guard that calls `owner.release_in_place(token)` when dropped.
    pub fn new(owner: &'a dyn ReleaseInPlace, token: (u64, u64)) -> Self {
        InPlaceGuard {
            owner: Some(owner),
            token,
        }
    }
    /// A guard protecting nothing (for drivers that order in-place writes otherwise,
    /// e.g. by a request-wide lock).
    pub fn none() -> InPlaceGuard<'static> {
        InPlaceGuard {
            owner: None,
            token: (0, 0),
        }
    }
}

impl Drop for InPlaceGuard<'_> {
    fn drop(&mut self) {
        if let Some(o) = self.owner {
            o.release_in_place(self.token);
        }
    }
}

impl fmt::Debug for InPlaceGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InPlaceGuard")
            .field("active", &self.owner.is_some())
            .field("token", &self.token)
            .finish()
    }
}

/// A guest range that lies whole in one contiguous run of a host file, which the
/// holder may read (or, when asked for writing, overwrite) with its own I/O on `fd` at
/// `host`: the asynchronous path of a front-end (the NBD server submits it to its own
/// io_uring and answers from the completion). Handed out by [`Driver::direct`] and
/// [`crate::Image::direct`]. For a write, the driver's in-place guard comes with it
/// (no concurrent discard or zero write frees or reuses those clusters): the range
/// must be dropped only once the transfer has completed. A read holds nothing, as a
/// read through the data path does not (a read racing a write of the same bytes
/// returns the old or the new data).
#[must_use = "dropping the range ends the protection of an in-place write"]
pub struct DirectRange<'a> {
    /// The host file to transfer on.
    pub fd: std::os::fd::RawFd,
    /// Host offset of the range's first byte.
    pub host: u64,
    /// Bytes: the whole guest range asked for.
    pub len: u64,
    _guard: InPlaceGuard<'a>,
    /// A second guard: what the driver holds for any transfer of its own (QED: that
    /// no quiescer moves clusters meanwhile). Dropped after `_guard`.
    _held: InPlaceGuard<'a>,
}

impl<'a> DirectRange<'a> {
    /// A range on `fd` at `host`, protected by `guard` until dropped.
    pub fn new(fd: std::os::fd::RawFd, host: u64, len: u64, guard: InPlaceGuard<'a>) -> Self {
        DirectRange {
            fd,
            host,
            len,
            _guard: guard,
            _held: InPlaceGuard::none(),
        }
    }
    /// The same range, also holding `held` until dropped (replacing any earlier one).
    pub fn holding(mut self, held: InPlaceGuard<'a>) -> Self {
        self._held = held;
        self
    }
}

impl fmt::Debug for DirectRange<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectRange")
            .field("fd", &self.fd)
            .field("host", &self.host)
            .field("len", &self.len)
            .finish()
    }
}

/// A copy-on-write region of an [`Allocation`]: guest bytes of the new clusters that the
/// request does not write, to be filled with what they read before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cow {
    /// Guest offset of the region's first byte.
    pub guest: GuestOffset,
    /// Bytes (0: no region).
    pub len: u64,
    /// What the region read as before the allocation, positioned at its first byte:
    /// backing (`Unallocated`), zeroes, the old data cluster, or a compressed cluster.
    pub source: Mapping,
}

/// New host space for a guest range, handed out by [`Mapper::prepare_write`] and
/// registered in the driver's in-flight list until [`Mapper::commit`] or
/// [`Mapper::abort`] takes it back. Exactly one of the two must be called.
///
/// Layout: guest `[guest, guest + len)` goes to host `[host, host + len)` in `store`;
/// `head` covers its start and `tail` its end; the request's own bytes are the middle
/// (`data_guest()`, `data_len()`), so data and both COW regions are one contiguous host
/// write.
#[derive(Debug)]
#[must_use = "an allocation must be committed or aborted"]
pub struct Allocation {
    /// First guest byte of the new run (cluster aligned).
    pub guest: GuestOffset,
    /// Bytes of the new run (whole clusters; may reach past the guest size inside the
    /// last cluster).
    pub len: u64,
    /// Which storage the new run lives in.
    pub store: Store,
    /// Host offset of the new run's first byte.
    pub host: HostOffset,
    /// COW before the request's bytes (starts at `guest`).
    pub head: Cow,
    /// COW after the request's bytes (ends at `guest + len`).
    pub tail: Cow,
    /// The driver's own bookkeeping (opaque to the data path).
    pub token: u64,
}

impl Allocation {
    /// Guest offset of the first byte the request writes.
    pub fn data_guest(&self) -> GuestOffset {
        self.guest.add(self.head.len)
    }
    /// Bytes of the request inside this allocation.
    pub fn data_len(&self) -> u64 {
        self.len - self.head.len - self.tail.len
    }
}

/// How a guest range is to be written: the answer to [`Mapper::prepare_write`].
#[derive(Debug)]
pub enum WriteTarget<'a> {
    /// Overwrite in place: the first `len` bytes of the range go to `host` in `store`
    /// (contiguous); the guard must be held until the write returned.
    InPlace {
        /// Which storage.
        store: Store,
        /// Host offset of the range's first byte.
        host: HostOffset,
        /// Bytes (> 0) covered, from the start of the asked range.
        len: u64,
        /// Protection against concurrent frees.
        guard: InPlaceGuard<'a>,
    },
    /// Write into new clusters; covers `data_len()` bytes from the start of the range.
    Allocate(Allocation),
}

/// A format driver as the generic data path sees it. See the module documentation for
/// the rules behind each call.
pub trait Mapper: Send + Sync {
    /// Guest size in bytes.
    fn guest_size(&self) -> u64;
    /// The storage `which` names (the same `Arc` for both unless the image has an
    /// external data file).
    fn store(&self, which: Store) -> &Arc<dyn Storage>;
    /// The backing image unallocated runs read from (`None`: they read as zeroes).
    fn backing_image(&self) -> Option<&Arc<dyn Driver>>;
    /// The longest run starting at `guest` (at most `len` bytes, `len > 0`, inside the
    /// guest size) with one mapping that can be determined with bounded work.
    fn map(&self, guest: GuestOffset, len: u64) -> Result<Run>;
    /// Decompresses one cluster of a [`Mapping::Compressed`] run.
    fn decompress(
        &self,
        _store: Store,
        _host: HostOffset,
        _len: u64,
        _algorithm: Compression,
    ) -> Result<Vec<u8>> {
        Err(Unsupported::NoCompressedClusters.into())
    }
    /// Largest copy-on-write region (head and tail of one allocation together) the data
    /// path builds in memory and writes with the guest bytes in one call; larger regions
    /// are filled a piece of at most this size at a time. Formats with huge clusters
    /// (QED: 64 MiB) bound their I/O with it.
    fn cow_buffer_limit(&self) -> u64 {
        super::datapath::write::MAX_COW_BUFFER
    }
    /// The cipher of an encrypted image (`None`: data is stored as it is). With one,
    /// the data path decrypts every data run it reads and encrypts every data run it
    /// writes, in whole 512-byte sectors (partial sectors are read-modify-written under
    /// [`DataCipher::rmw`]); compressed clusters are not transformed (encrypted images
    /// have none).
    fn data_cipher(&self) -> Option<&DataCipher> {
        None
    }
    /// Makes the start of `[guest, guest + len)` (inside the guest size, `len > 0`)
    /// writable: in place, or through a new allocation. The target covers a prefix of
    /// the range (at least one byte); the data path calls again for the rest.
    fn prepare_write(&self, guest: GuestOffset, len: u64) -> Result<WriteTarget<'_>>;
    /// [`Mapper::prepare_write`] for a range whose start is overwritten in place:
    /// `None` (nothing reserved or changed) where it would allocate. The default asks
    /// [`Mapper::map`] first; a driver that can tell from one lookup overrides it.
    fn prepare_in_place(&self, guest: GuestOffset, len: u64) -> Result<Option<WriteTarget<'_>>> {
        super::datapath::direct::in_place_by_map(self, guest, len)
    }
    /// Links an allocation into the mapping once its data and COW regions are written,
    /// and removes it from the in-flight list. On error the driver has given its
    /// clusters back (or left them to be found as leaks) and the image stays consistent.
    fn commit(&self, alloc: Allocation) -> Result<()>;
    /// Gives an allocation back after its data write failed (nothing points at it yet)
    /// and removes it from the in-flight list.
    fn abort(&self, alloc: Allocation);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_clusters() {
        let g = GuestOffset(0x12345);
        assert_eq!(g.cluster(16), ClusterIndex(1));
        assert_eq!(g.in_cluster(1 << 16), 0x2345);
        assert!(!g.is_aligned(512));
        assert!(GuestOffset(0x10000).is_aligned(1 << 16));
        assert_eq!(ClusterIndex(3).start(16), 0x30000);
        assert_eq!(HostOffset(10).add(5).since(HostOffset(10)), 5);
        assert_eq!(HostOffset(u64::MAX).checked_add(1), None);
        assert_eq!(HostOffset(0x200).to_string(), "host offset 0x200");
    }

    #[test]
    fn runs_continue_only_when_contiguous() {
        let d = |h| Mapping::Data {
            store: Store::Data,
            host: HostOffset(h),
            in_place: true,
        };
        assert!(d(0x1000).continues(0x1000, d(0x2000)));
        assert!(!d(0x1000).continues(0x1000, d(0x3000)));
        assert_eq!(d(0x1000).advance(0x10), d(0x1010));
        assert!(Mapping::Unallocated.continues(1, Mapping::Unallocated));
        assert!(Mapping::Zero { host: None }.continues(1, Mapping::Zero { host: None }));
        assert!(!Mapping::Zero { host: None }.continues(1, Mapping::Unallocated));
        let c = Mapping::Compressed {
            store: Store::Data,
            host: HostOffset(7),
            len: 9,
            algorithm: Compression::Deflate,
            skip: 0,
        };
        assert!(!c.continues(1, c));
        let e = Run {
            len: 4,
            mapping: Mapping::Zero {
                host: Some(HostOffset(0x5000)),
            },
        }
        .extent();
        assert_eq!(e.offset, Some(0x5000));
        assert_eq!(e.kind, super::super::ExtentKind::Zero);
    }
}
