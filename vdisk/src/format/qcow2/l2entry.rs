//! Decoded qcow2 L2 entries, standard (8 bytes) and extended (16 bytes: the entry and a
//! 32-subcluster bitmap) in one type, with encoding back and the validation rules.
//!
//! A standard entry decodes as if it had subclusters: every one of its 32 subclusters
//! has the cluster's state (allocated, zero, unallocated), so the mapping walk treats
//! both widths alike, with a subcluster size of the whole cluster for standard entries.

use crate::format::mapping::HostOffset;
use std::fmt;

/// L1/L2 entry flag: refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag: reads as zeroes (v3, standard entries).
const ZERO: u64 = 1;
/// Offset bits of a standard entry.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a standard (not compressed) L2 entry (bits 1-8 and 56-61).
const STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// How the L2 entries of an image are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryFormat {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// 16-byte entries with a subcluster bitmap.
    pub extended: bool,
    /// Bit 0 is the zero flag (v3 standard entries); otherwise it is ignored.
    pub zero_flag: bool,
    /// Extended entries of an image with an external data file: offset 0 with
    /// COPIED is a host cluster (data file offset 0, guest cluster 0), as QEMU's
    /// `qcow2_get_cluster_type` reads it (every data file cluster has COPIED).
    /// (Standard entries get the same rule in `Meta::decode`, which also weighs the
    /// zero flag.)
    pub data_file: bool,
}

impl EntryFormat {
    /// Bit position of the sector count in a compressed entry.
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

/// The state of one subcluster (of the whole cluster, for standard entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SubState {
    /// Reads from the backing file (or as zeroes without one).
    Unallocated,
    /// Reads as zeroes.
    Zero,
    /// Stored at the entry's host cluster.
    Allocated,
}

/// The allocation and zero bitmaps of 32 subclusters (bit `k` = subcluster `k`). Never
/// both set for one subcluster (decoding refuses that).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Subclusters {
    alloc: u32,
    zero: u32,
}

impl Subclusters {
    /// Every subcluster allocated.
    pub const ALLOCATED: Subclusters = Subclusters {
        alloc: u32::MAX,
        zero: 0,
    };
    /// Every subcluster reads as zeroes.
    pub const ZERO: Subclusters = Subclusters {
        alloc: 0,
        zero: u32::MAX,
    };
    /// Nothing allocated.
    pub const UNALLOCATED: Subclusters = Subclusters { alloc: 0, zero: 0 };

    /// State of subcluster `k` (< 32).
    #[inline]
    pub fn state(&self, k: u32) -> SubState {
        if self.alloc >> k & 1 != 0 {
            SubState::Allocated
        } else if self.zero >> k & 1 != 0 {
            SubState::Zero
        } else {
            SubState::Unallocated
        }
    }

    /// Subclusters from `k` on (up to 32) sharing subcluster `k`'s state.
    #[inline]
    pub fn run_from(&self, k: u32) -> u32 {
        let st = self.state(k);
        let mut e = k + 1;
        while e < 32 && self.state(e) == st {
            e += 1;
        }
        e - k
    }

    /// The state every subcluster has, if they agree.
    pub fn uniform(&self) -> Option<SubState> {
        match *self {
            Subclusters::ALLOCATED => Some(SubState::Allocated),
            Subclusters::ZERO => Some(SubState::Zero),
            Subclusters::UNALLOCATED => Some(SubState::Unallocated),
            _ => None,
        }
    }

    /// States from the allocation and zero masks (a subcluster in both reads as
    /// allocated: callers keep them disjoint).
    pub fn from_masks(alloc: u32, zero: u32) -> Subclusters {
        Subclusters {
            alloc,
            zero: zero & !alloc,
        }
    }

    /// The allocation mask (bit `k`: subcluster `k` allocated).
    pub fn alloc_mask(&self) -> u32 {
        self.alloc
    }

    /// The zero mask (bit `k`: subcluster `k` reads as zeroes).
    pub fn zero_mask(&self) -> u32 {
        self.zero
    }

    /// The on-disk bitmap word (bits 0-31 allocated, 32-63 zero).
    pub fn bitmap(&self) -> u64 {
        u64::from(self.alloc) | u64::from(self.zero) << 32
    }
}

/// A decoded L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum L2Entry {
    /// A standard cluster: its host cluster (if any) and the state of its subclusters.
    Normal {
        /// Host cluster (cluster aligned), `None` when the entry holds offset 0.
        host: Option<HostOffset>,
        /// COPIED: refcount exactly one, writable in place.
        copied: bool,
        /// Subcluster states (uniform for standard entries).
        sub: Subclusters,
    },
    /// A compressed cluster.
    Compressed {
        /// Host byte offset of the compressed stream (not aligned).
        host: HostOffset,
        /// 512-byte sectors the stream touches, counted from the one holding `host`.
        sectors: u64,
    },
}

/// Why an L2 entry is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EntryProblem {
    /// Reserved bits set in a standard entry.
    Reserved,
    /// The host offset of a standard entry is not cluster aligned.
    Unaligned(u64),
    /// Subclusters both allocated and zero, or allocated without a host cluster.
    Bitmap(u64),
    /// A compressed entry with a nonzero subcluster bitmap.
    CompressedBitmap(u64),
    /// The entry cannot be written in this format (encoding only).
    Unencodable,
}

impl fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryProblem::Reserved => write!(f, "reserved bits set"),
            EntryProblem::Unaligned(o) => write!(f, "unaligned host offset {o:#x}"),
            EntryProblem::Bitmap(b) => write!(f, "invalid subcluster bitmap {b:#x}"),
            EntryProblem::CompressedBitmap(b) => {
                write!(f, "compressed cluster with a subcluster bitmap {b:#x}")
            }
            EntryProblem::Unencodable => write!(f, "not representable in this entry format"),
        }
    }
}

impl L2Entry {
    /// The entry of an unallocated cluster.
    pub const UNALLOCATED: L2Entry = L2Entry::Normal {
        host: None,
        copied: false,
        sub: Subclusters::UNALLOCATED,
    };

    /// Decodes an entry (`bitmap`: the second word of an extended entry, ignored
    /// otherwise).
    pub fn decode(word: u64, bitmap: u64, f: &EntryFormat) -> Result<L2Entry, EntryProblem> {
        if word & COMPRESSED != 0 {
            if f.extended && bitmap != 0 {
                return Err(EntryProblem::CompressedBitmap(bitmap));
            }
            let shift = f.csize_shift();
            let host = word & ((1u64 << shift) - 1);
            let nsec = (word >> shift) & ((1u64 << (62 - shift)) - 1);
            return Ok(L2Entry::Compressed {
                host: HostOffset(host),
                sectors: nsec + 1,
            });
        }
        if word & STD_RESERVED != 0 {
            return Err(EntryProblem::Reserved);
        }
        let off = word & OFFSET_MASK;
        if off & ((1u64 << f.cluster_bits) - 1) != 0 {
            return Err(EntryProblem::Unaligned(off));
        }
        let copied = word & COPIED != 0;
        let host = (off != 0 || (f.extended && f.data_file && copied)).then_some(HostOffset(off));
        let sub = if f.extended {
            let s = Subclusters {
                alloc: bitmap as u32,
                zero: (bitmap >> 32) as u32,
            };
            if s.alloc & s.zero != 0 || (host.is_none() && s.alloc != 0) {
                return Err(EntryProblem::Bitmap(bitmap));
            }
            s
        } else if f.zero_flag && word & ZERO != 0 {
            Subclusters::ZERO
        } else if host.is_some() {
            Subclusters::ALLOCATED
        } else {
            Subclusters::UNALLOCATED
        };
        Ok(L2Entry::Normal { host, copied, sub })
    }

    /// Encodes the entry: (entry word, bitmap word; 0 for standard entries).
    pub fn encode(&self, f: &EntryFormat) -> Result<(u64, u64), EntryProblem> {
        match *self {
            L2Entry::Compressed { host, sectors } => {
                let shift = f.csize_shift();
                let h = host.get();
                if sectors == 0 || sectors > 1u64 << (62 - shift) || h >= 1u64 << shift {
                    return Err(EntryProblem::Unencodable);
                }
                Ok((COMPRESSED | (sectors - 1) << shift | h, 0))
            }
            L2Entry::Normal { host, copied, sub } => {
                let off = host.map_or(0, HostOffset::get);
                if off & !OFFSET_MASK != 0 || off & ((1u64 << f.cluster_bits) - 1) != 0 {
                    return Err(EntryProblem::Unaligned(off));
                }
                let base = off | if copied { COPIED } else { 0 };
                if f.extended {
                    if sub.alloc & sub.zero != 0 || (host.is_none() && sub.alloc != 0) {
                        return Err(EntryProblem::Bitmap(sub.bitmap()));
                    }
                    return Ok((base, sub.bitmap()));
                }
                match (sub.uniform(), host) {
                    (Some(SubState::Allocated), Some(_)) => Ok((base, 0)),
                    (Some(SubState::Unallocated), None) => Ok((base, 0)),
                    (Some(SubState::Zero), _) if f.zero_flag => Ok((base | ZERO, 0)),
                    _ => Err(EntryProblem::Unencodable),
                }
            }
        }
    }

    /// Host bytes to read for a compressed entry (may run past the stream's end).
    pub fn compressed_len(sectors: u64, host: HostOffset) -> u64 {
        sectors * 512 - (host.get() & 511)
    }

    /// The host cluster a standard entry references (allocated or preallocated zero).
    pub fn host(&self) -> Option<HostOffset> {
        match *self {
            L2Entry::Normal { host, .. } => host,
            L2Entry::Compressed { .. } => None,
        }
    }

    /// The whole cluster's state, when uniform and not compressed.
    pub fn state(&self) -> Option<SubState> {
        match self {
            L2Entry::Normal { sub, .. } => sub.uniform(),
            L2Entry::Compressed { .. } => None,
        }
    }

    /// A standard cluster with every subcluster allocated and COPIED set: writable in
    /// place. Returns its host cluster.
    pub fn in_place(&self) -> Option<HostOffset> {
        match *self {
            L2Entry::Normal {
                host: Some(h),
                copied: true,
                sub: Subclusters::ALLOCATED,
            } => Some(h),
            _ => None,
        }
    }

    /// Reads as zeroes as a whole (zero flag / every subcluster zero).
    pub fn is_zero(&self) -> bool {
        self.state() == Some(SubState::Zero)
    }

    /// Unallocated as a whole (reads the backing file).
    pub fn is_unallocated(&self) -> bool {
        self.state() == Some(SubState::Unallocated)
    }

    /// Something of this layer is stored for it (data, preallocated zero, compressed).
    pub fn is_allocated(&self) -> bool {
        match self {
            L2Entry::Normal { host, .. } => host.is_some(),
            L2Entry::Compressed { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD3: EntryFormat = EntryFormat {
        cluster_bits: 16,
        extended: false,
        zero_flag: true,
        data_file: false,
    };
    const STD2: EntryFormat = EntryFormat {
        cluster_bits: 16,
        extended: false,
        zero_flag: false,
        data_file: false,
    };
    const EXT: EntryFormat = EntryFormat {
        cluster_bits: 16,
        extended: true,
        zero_flag: false,
        data_file: false,
    };

    fn round_trip(e: L2Entry, f: &EntryFormat) {
        let (w, b) = e.encode(f).expect("encodes");
        assert_eq!(L2Entry::decode(w, b, f), Ok(e), "{w:#x} {b:#x}");
    }

    #[test]
    fn standard_entries() {
        let h = Some(HostOffset(0x5_0000));
        assert_eq!(L2Entry::decode(0, 0, &STD3), Ok(L2Entry::UNALLOCATED));
        let data = L2Entry::decode(0x8000_0000_0005_0000, 0, &STD3).unwrap();
        assert_eq!(data.in_place(), h);
        let zero = L2Entry::decode(1, 0, &STD3).unwrap();
        assert!(zero.is_zero() && zero.host().is_none());
        let zalloc = L2Entry::decode(0x5_0001, 0, &STD3).unwrap();
        assert!(zalloc.is_zero() && zalloc.host() == h && zalloc.in_place().is_none());
        // v2: bit 0 is not a zero flag.
        assert_eq!(
            L2Entry::decode(0x5_0001, 0, &STD2).unwrap().state(),
            Some(SubState::Allocated)
        );
        for e in [L2Entry::UNALLOCATED, data, zero, zalloc] {
            round_trip(e, &STD3);
        }
        round_trip(
            L2Entry::Normal {
                host: h,
                copied: false,
                sub: Subclusters::ALLOCATED,
            },
            &STD2,
        );
        // Not representable without subclusters / without the zero flag.
        let partial = L2Entry::Normal {
            host: h,
            copied: true,
            sub: Subclusters { alloc: 1, zero: 2 },
        };
        assert_eq!(partial.encode(&STD3), Err(EntryProblem::Unencodable));
        assert_eq!(zero.encode(&STD2), Err(EntryProblem::Unencodable));
    }

    #[test]
    fn extended_entries() {
        let e = L2Entry::decode(0x8000_0000_0005_0000, 0x0000_00f0_0000_000f, &EXT).unwrap();
        let L2Entry::Normal { sub, .. } = e else {
            panic!("normal entry expected")
        };
        assert_eq!(sub.state(0), SubState::Allocated);
        assert_eq!(sub.state(4), SubState::Zero);
        assert_eq!(sub.state(8), SubState::Unallocated);
        assert_eq!(sub.run_from(0), 4);
        assert_eq!(sub.run_from(4), 4);
        assert_eq!(sub.run_from(8), 24);
        round_trip(e, &EXT);
        // Zero subclusters without a host cluster; all-zero bitmap = unallocated.
        round_trip(
            L2Entry::decode(0, 0xffff_ffff_0000_0000, &EXT).unwrap(),
            &EXT,
        );
        assert!(L2Entry::decode(0, 0, &EXT).unwrap().is_unallocated());
        // Host cluster but nothing allocated (allowed with subclusters).
        round_trip(
            L2Entry::Normal {
                host: Some(HostOffset(0x7_0000)),
                copied: true,
                sub: Subclusters::UNALLOCATED,
            },
            &EXT,
        );
    }

    #[test]
    fn compressed_every_cluster_size() {
        for bits in 9..=21u32 {
            for extended in [false, true] {
                let f = EntryFormat {
                    cluster_bits: bits,
                    extended,
                    zero_flag: !extended,
                    data_file: false,
                };
                let shift = 62 - (bits - 8);
                let max_host = (1u64 << shift) - 1;
                let max_sectors = 1u64 << (62 - shift);
                for (host, sectors) in [(0x1234_5601, 1), (max_host, max_sectors), (512, 2)] {
                    let e = L2Entry::Compressed {
                        host: HostOffset(host),
                        sectors,
                    };
                    round_trip(e, &f);
                }
                let too_many = L2Entry::Compressed {
                    host: HostOffset(0),
                    sectors: max_sectors + 1,
                };
                assert_eq!(too_many.encode(&f), Err(EntryProblem::Unencodable));
                let too_far = L2Entry::Compressed {
                    host: HostOffset(max_host + 1),
                    sectors: 1,
                };
                assert_eq!(too_far.encode(&f), Err(EntryProblem::Unencodable));
            }
        }
        let e = L2Entry::decode(COMPRESSED | 3 << 54 | 0x1_0200, 0, &STD3).unwrap();
        assert_eq!(
            e,
            L2Entry::Compressed {
                host: HostOffset(0x1_0200),
                sectors: 4
            }
        );
        assert_eq!(
            L2Entry::compressed_len(4, HostOffset(0x1_0201)),
            4 * 512 - 1
        );
    }

    #[test]
    fn rejects() {
        // Reserved bits (1-8, 56-61) of standard entries.
        for bit in [1u32, 8, 56, 61] {
            assert_eq!(
                L2Entry::decode(0x5_0000 | 1 << bit, 0, &STD3),
                Err(EntryProblem::Reserved)
            );
        }
        // Unaligned host offsets (512-aligned but not cluster aligned).
        assert_eq!(
            L2Entry::decode(0x5_0200, 0, &STD3),
            Err(EntryProblem::Unaligned(0x5_0200))
        );
        assert_eq!(
            L2Entry::decode(0x5_0200, 1, &EXT),
            Err(EntryProblem::Unaligned(0x5_0200))
        );
        // Allocated and zero at once; allocated without a host cluster.
        assert_eq!(
            L2Entry::decode(0x5_0000, 0x0000_0001_0000_0001, &EXT),
            Err(EntryProblem::Bitmap(0x0000_0001_0000_0001))
        );
        assert_eq!(L2Entry::decode(0, 1, &EXT), Err(EntryProblem::Bitmap(1)));
        // Compressed with a bitmap.
        assert_eq!(
            L2Entry::decode(COMPRESSED | 0x1_0000, 4, &EXT),
            Err(EntryProblem::CompressedBitmap(4))
        );
        // Encoding refuses what decoding would.
        let bad = L2Entry::Normal {
            host: None,
            copied: false,
            sub: Subclusters { alloc: 1, zero: 0 },
        };
        assert_eq!(bad.encode(&EXT), Err(EntryProblem::Bitmap(1)));
        let unaligned = L2Entry::Normal {
            host: Some(HostOffset(0x5_0200)),
            copied: false,
            sub: Subclusters::ALLOCATED,
        };
        assert_eq!(
            unaligned.encode(&STD3),
            Err(EntryProblem::Unaligned(0x5_0200))
        );
        let huge = L2Entry::Normal {
            host: Some(HostOffset(1 << 56)),
            copied: false,
            sub: Subclusters::ALLOCATED,
        };
        assert_eq!(huge.encode(&STD3), Err(EntryProblem::Unaligned(1 << 56)));
    }
}
