//! What `check` finds and repairs, as facts: each problem is a [`Finding`] naming the
//! structure, entry, offsets and counts. Front-ends word them (the CLI prints
//! qemu-img's sentences); the library never does.

use crate::error::{Corruption, Structure};

/// What `check` should repair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repair {
    /// Fix leaked clusters.
    pub leaks: bool,
    /// Fix corruptions too (`-r all`).
    pub errors: bool,
}

/// The kind of a problem `check` found (or of a repair it made).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FindingKind {
    /// A reference to `length` bytes at `host_offset` that ends a cluster or more past
    /// the end of the file (counted as a corruption).
    ReferencePastEnd,
    /// An L1 or L2 entry (`entry_value`) has reserved bits set.
    ReservedBits,
    /// A table or cluster offset (`host_offset`) is not cluster aligned: an L2 table
    /// named by L1 entry `entry`, a data cluster named by an L2 entry, a refcount block
    /// named by refcount table entry `entry`.
    Unaligned,
    /// A compressed cluster's L2 entry has the COPIED flag (`cluster` is its host cluster).
    CompressedCopied,
    /// An extended L2 entry's subcluster bitmap is invalid (`entry_value` the entry
    /// word, `entry` its index in the table): a compressed cluster with a nonzero bitmap
    /// (`structure` compressed cluster), subclusters both allocated and zero in an
    /// allocated cluster (`structure` data cluster, at `host_offset`), or allocated
    /// subclusters without a host cluster (`structure` L2 table). Counted as a
    /// corruption; not repaired (as qemu-img).
    SubclusterBitmap,
    /// The bitmaps extension is shorter than its fixed fields (`length` bytes).
    BitmapExtensionTooShort,
    /// The bitmaps extension names an impossible directory (`length` bytes).
    BitmapExtensionInvalid {
        /// The number of bitmaps it claims.
        bitmaps: u32,
    },
    /// Bitmap directory entry `entry` runs past the directory.
    BitmapEntryPastDirectory,
    /// Bitmap `entry`'s table is larger than the format allows (`length` entries).
    BitmapTableTooLarge,
    /// The refcount table is unusable (why, as an error); the structure must be rebuilt.
    RefcountStructureUnusable(Corruption),
    /// Refcount block `entry` lies outside the image (`host_offset`).
    RefcountBlockOutsideImage,
    /// Refcount block `entry` is referenced `references` times instead of once.
    RefcountBlockShared,
    /// The refcount of host cluster `cluster` could not be read (a check error).
    RefcountUnreadable,
    /// Host cluster `cluster` has a refcount (`refcount`) below its references
    /// (`references`): a corruption.
    RefcountTooLow,
    /// Host cluster `cluster` has a refcount above its references: a leak.
    LeakedCluster,
    /// The refcount structure was rebuilt from the references (a repair event).
    RefcountRebuild,
    /// The refcounts need a rebuild that this repair mode may not do (the check stops).
    RebuildNeeded,
    /// The COPIED flag of an L1 entry (`structure` L2 table, `entry` the L1 index) or of
    /// an L2 entry (`structure` data cluster) disagrees with the refcount (`refcount`).
    CopiedFlag,
    /// A QED L1 or L2 entry (`entry_value`) points where no table or cluster may be:
    /// unaligned, inside the header or the L1 table, or past the end of the file.
    InvalidOffset,
    /// QED: `references` clusters of a table or data cluster at `host_offset` are
    /// already referenced by another structure.
    ReferencedTwice,
    /// A table could not be read (`host_offset`; a check error).
    Unreadable,
    /// VDI: block map entry `entry` names data block `entry_value`, which an earlier
    /// entry names too.
    VdiBlockShared,
    /// VDI: block map entry `entry` names data block `entry_value`, outside the image.
    VdiBlockOutOfRange,
    /// VDI: `references` blocks are mapped but the header counts `refcount`.
    VdiAllocatedMismatch,
    /// A repaired table page could not be written back (`host_offset`; a check error).
    WriteBackFailed,
}

/// Whether a finding is only reported or is being repaired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// Found and left as it is.
    #[default]
    Found,
    /// Found and repaired by this check.
    Repairing,
}

/// One problem found (or repair made) by `check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// What it is.
    pub kind: FindingKind,
    /// Reported or repaired.
    pub outcome: Outcome,
    /// The structure it is in (or about).
    pub structure: Structure,
    /// Index of the entry in its table (L1 index, refcount table index, bitmap...).
    pub entry: Option<u64>,
    /// The raw entry value, where the entry is at fault.
    pub entry_value: Option<u64>,
    /// Host offset of the structure, table or cluster.
    pub host_offset: Option<u64>,
    /// Size of the region (bytes; entries for a bitmap table).
    pub length: Option<u64>,
    /// Guest offset the entry maps, where there is one.
    pub guest_offset: Option<u64>,
    /// Host cluster index (refcount findings).
    pub cluster: Option<u64>,
    /// The refcount on disk.
    pub refcount: Option<u64>,
    /// The references counted.
    pub references: Option<u64>,
}

impl Finding {
    /// A finding of `kind` in `structure`, every other field empty.
    pub fn new(kind: FindingKind, structure: Structure) -> Self {
        Finding {
            kind,
            outcome: Outcome::Found,
            structure,
            entry: None,
            entry_value: None,
            host_offset: None,
            length: None,
            guest_offset: None,
            cluster: None,
            refcount: None,
            references: None,
        }
    }
    /// Marks it repaired when `repairing`.
    pub fn repairing(mut self, repairing: bool) -> Self {
        self.outcome = if repairing {
            Outcome::Repairing
        } else {
            Outcome::Found
        };
        self
    }
    /// With the entry index.
    pub fn entry(mut self, i: u64) -> Self {
        self.entry = Some(i);
        self
    }
    /// With the raw entry value.
    pub fn value(mut self, v: u64) -> Self {
        self.entry_value = Some(v);
        self
    }
    /// With the host offset.
    pub fn at(mut self, off: u64) -> Self {
        self.host_offset = Some(off);
        self
    }
    /// With the region size.
    pub fn length(mut self, n: u64) -> Self {
        self.length = Some(n);
        self
    }
    /// With the guest offset.
    pub fn guest(mut self, off: u64) -> Self {
        self.guest_offset = Some(off);
        self
    }
    /// With the host cluster index.
    pub fn cluster(mut self, c: u64) -> Self {
        self.cluster = Some(c);
        self
    }
    /// With the refcount on disk and the references counted.
    pub fn counts(mut self, refcount: Option<u64>, references: Option<u64>) -> Self {
        self.refcount = refcount;
        self.references = references;
        self
    }
}

/// Why a check stopped before producing a report (QEMU's check returns an error there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckAborted {
    /// The refcounts need a rebuild that the repair mode asked for may not do
    /// (`-r leaks`, or a read-only image).
    RebuildNeeded,
}

impl CheckAborted {
    /// The errno QEMU's check returns for it.
    pub fn errno(self) -> i32 {
        match self {
            CheckAborted::RebuildNeeded => libc::EIO,
        }
    }
}

/// Most findings a QED check keeps (its problems are only counted by QEMU, never
/// listed; the cap bounds memory on a hostile image with millions of bad entries).
pub const MAX_QED_FINDINGS: usize = 1 << 16;

/// The result of a consistency check, with the fields of `qemu-img check --output=json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions left after repair.
    pub corruptions: u64,
    /// Leaked clusters left after repair.
    pub leaks: u64,
    /// Errors that stopped the check from completing (I/O errors...).
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// First byte after the last cluster in use.
    pub image_end_offset: Option<u64>,
    /// Guest clusters.
    pub total_clusters: Option<u64>,
    /// Guest clusters allocated in this image.
    pub allocated_clusters: Option<u64>,
    /// Allocated guest clusters not contiguous with their predecessor.
    pub fragmented_clusters: Option<u64>,
    /// Compressed guest clusters.
    pub compressed_clusters: Option<u64>,
    /// Every problem found and repair made, in the order the check met them.
    pub findings: Vec<Finding>,
    /// Findings dropped beyond a format's cap ([`MAX_QED_FINDINGS`]); the counts above
    /// still include them.
    pub findings_omitted: u64,
    /// Set when the check stopped early the way QEMU's fails: `findings` holds what was
    /// found up to that point and no report is printed.
    pub aborted: Option<CheckAborted>,
}

impl CheckReport {
    /// Records a finding.
    pub fn push(&mut self, f: Finding) {
        self.findings.push(f);
    }
    /// Records a finding unless `cap` findings are held already (then only counts it).
    pub fn push_capped(&mut self, f: Finding, cap: usize) {
        if self.findings.len() < cap {
            self.findings.push(f);
        } else {
            self.findings_omitted += 1;
        }
    }
    /// The findings of one kind.
    pub fn of_kind<'a>(&'a self, kind: &'a FindingKind) -> impl Iterator<Item = &'a Finding> {
        self.findings.iter().filter(move |f| &f.kind == kind)
    }
}
