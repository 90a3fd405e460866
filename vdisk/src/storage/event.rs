//! Named steps a format announces to its storage (QEMU's `BlkdebugEvent`).
//!
//! A format calls [`Storage::event`](super::Storage::event) just before the I/O of a
//! step (an L2 table write, a refcount block load, the guest data write, ...). Every
//! storage ignores it except the fault-injecting `blkdebug` protocol, whose rules
//! fire on these names; formats never know which storage they talk to. The names are
//! QEMU 10's, so a blkdebug configuration written for qemu-io works here unchanged.

/// Declares the events once: the enum, the list and the names.
macro_rules! events {
    ($($v:ident => $n:literal,)*) => {
        /// One announced step. Names and order follow QEMU's `BlkdebugEvent`
        /// enumeration; each variant is the QEMU event its [`name`](BlkEvent::name) gives.
        #[allow(missing_docs)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum BlkEvent {
            $($v,)*
        }

        impl BlkEvent {
            /// Every event, in QEMU's order.
            pub const ALL: &'static [BlkEvent] = &[$(BlkEvent::$v,)*];

            /// QEMU's name (`l2_update`).
            pub fn name(self) -> &'static str {
                match self {
                    $(BlkEvent::$v => $n,)*
                }
            }
        }
    };
}

events! {
    L1Update => "l1_update",
    L1GrowAllocTable => "l1_grow_alloc_table",
    L1GrowWriteTable => "l1_grow_write_table",
    L1GrowActivateTable => "l1_grow_activate_table",
    L2Load => "l2_load",
    L2Update => "l2_update",
    L2UpdateCompressed => "l2_update_compressed",
    L2AllocCowRead => "l2_alloc_cow_read",
    L2AllocWrite => "l2_alloc_write",
    ReadAio => "read_aio",
    ReadBackingAio => "read_backing_aio",
    ReadCompressed => "read_compressed",
    WriteAio => "write_aio",
    WriteCompressed => "write_compressed",
    VmstateLoad => "vmstate_load",
    VmstateSave => "vmstate_save",
    CowRead => "cow_read",
    CowWrite => "cow_write",
    ReftableLoad => "reftable_load",
    ReftableGrow => "reftable_grow",
    ReftableUpdate => "reftable_update",
    RefblockLoad => "refblock_load",
    RefblockUpdate => "refblock_update",
    RefblockUpdatePart => "refblock_update_part",
    RefblockAlloc => "refblock_alloc",
    RefblockAllocHookup => "refblock_alloc_hookup",
    RefblockAllocWrite => "refblock_alloc_write",
    RefblockAllocWriteBlocks => "refblock_alloc_write_blocks",
    RefblockAllocWriteTable => "refblock_alloc_write_table",
    RefblockAllocSwitchTable => "refblock_alloc_switch_table",
    ClusterAlloc => "cluster_alloc",
    ClusterAllocBytes => "cluster_alloc_bytes",
    ClusterFree => "cluster_free",
    FlushToOs => "flush_to_os",
    FlushToDisk => "flush_to_disk",
    PwritevRmwHead => "pwritev_rmw_head",
    PwritevRmwAfterHead => "pwritev_rmw_after_head",
    PwritevRmwTail => "pwritev_rmw_tail",
    PwritevRmwAfterTail => "pwritev_rmw_after_tail",
    Pwritev => "pwritev",
    PwritevZero => "pwritev_zero",
    PwritevDone => "pwritev_done",
    EmptyImagePrepare => "empty_image_prepare",
    L1ShrinkWriteTable => "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters => "l1_shrink_free_l2_clusters",
    CorWrite => "cor_write",
    ClusterAllocSpace => "cluster_alloc_space",
    None => "none",
}

impl BlkEvent {
    /// The event QEMU calls `name`.
    pub fn parse(name: &str) -> Option<BlkEvent> {
        BlkEvent::ALL.iter().copied().find(|e| e.name() == name)
    }

    /// Index into per-event tables.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_order() {
        for (i, e) in BlkEvent::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
            assert_eq!(BlkEvent::parse(e.name()), Some(*e));
        }
        assert_eq!(BlkEvent::parse("l2_alloc.write"), Option::None);
        assert_eq!(BlkEvent::parse("L2_UPDATE"), Option::None);
    }
}
