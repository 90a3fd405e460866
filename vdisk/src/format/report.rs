//! What `check` finds and repairs.

/// What `check` should repair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repair {
    /// Fix leaked clusters.
    pub leaks: bool,
    /// Fix corruptions too (`-r all`).
    pub errors: bool,
}

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
    /// One line per problem found, as qemu-img prints them
    /// (e.g. `Leaked cluster 9 refcount=1 reference=0`).
    pub messages: Vec<String>,
    /// Set when the check stopped early the way QEMU's fails (the errno it returns,
    /// e.g. EIO for `-r leaks` on refcounts that need a rebuild): `messages` holds the
    /// lines up to that point and no report is printed.
    pub failed: Option<i32>,
}
