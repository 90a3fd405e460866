//! Preallocation: guest clusters mapped to host clusters ahead of any write, for
//! `create -o preallocation=…` and `resize --preallocation=…`, as QEMU lays it out (L2
//! table first, then its data, table by table).
//!
//! `metadata` writes no data: the new clusters must read as zeroes, which clusters past
//! the end of the file do (the file is extended, sparse). A cluster the allocator takes
//! from a free hole inside the file may hold old bytes, so it is zeroed first; every
//! mode maps a cluster only after its data area is in its final state. With an
//! external data file the data area is the data file's range at the guest offset.

use super::{Qcow2, COPIED};
use crate::error::Result;

/// A preallocation mode (QEMU's `preallocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prealloc {
    /// Nothing.
    Off,
    /// Tables and refcounts only.
    Metadata,
    /// Also reserve the data area (`fallocate`).
    Falloc,
    /// Also write the data area (zeroes).
    Full,
}

/// Maps the unallocated guest clusters in `[first, end)` to new host clusters and
/// prepares their data area as `mode` says.
pub(crate) fn preallocate(img: &Qcow2, first: u64, end: u64, mode: Prealloc) -> Result<()> {
    let cs = img.g.cs;
    let per_table = img.g.l2_entries;
    let old_len = img.storage.len()?;
    let mut file_end = 0u64;
    let mut gc = first;
    while gc < end {
        let l1i = (gc / per_table) as usize;
        let table_end = ((gc / per_table) + 1) * per_table;
        let mut m = img.lock();
        m.l2_for_write(l1i)?;
        // The run of unallocated clusters from `gc` (allocated ones are kept).
        if m.l2_entry(gc)? != 0 {
            drop(m);
            gc += 1;
            continue;
        }
        let mut k = 1;
        while gc + k < end.min(table_end) && m.l2_entry(gc + k)? == 0 {
            k += 1;
        }
        // An external data file holds each guest cluster at its own offset, without
        // refcounts; its data area ends with the guest disk.
        let ext = m.ext_data;
        let host = if ext { gc * cs } else { m.alloc(k)? };
        drop(m);
        let len = k * cs;
        let data_len = if ext {
            len.min(crate::format::Driver::size(img).saturating_sub(host))
        } else {
            len
        };
        match mode {
            Prealloc::Falloc => img.data.allocate(host, data_len)?,
            Prealloc::Full => img.data.write_zeroes(host, data_len)?,
            Prealloc::Metadata | Prealloc::Off if !ext && host < old_len => {
                // Reused space inside the file: make it read zeroes.
                img.storage.write_zeroes(host, (old_len - host).min(len))?;
            }
            Prealloc::Metadata | Prealloc::Off => {}
        }
        let mut m = img.lock();
        for i in 0..k {
            m.set_entry(l1i, gc + i, (host + i * cs) | COPIED)?;
        }
        m.maybe_writeback()?;
        if !ext {
            file_end = file_end.max(host + len);
        }
        gc += k;
    }
    let mut m = img.lock();
    m.writeback()?;
    if img.storage.len()? < file_end {
        img.storage.set_len(file_end)?;
    }
    m.barrier()?;
    Ok(())
}
