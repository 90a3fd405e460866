//! VM state: the `savevm` data QEMU keeps in a qcow2 image beside the guest disk
//! (qemu-io's `read -b`/`write -b`). It lives in guest-address space past the disk,
//! from the first L1 entry the disk does not use (QEMU's `qcow2_vm_state_offset`), and
//! goes through the ordinary data path: allocation, COW, encryption and refcounts as
//! for any cluster. Guest reads never reach it (they stop at the disk's size), so
//! `map` shows nothing there while `check` counts its clusters.
//!
//! Crash rules: those of any allocating write, plus the L1 growth's (the grown table is
//! durable before the header names it: [`Meta::grow_l1`](super::Meta::grow_l1)).

use super::header::MAX_L1_BYTES;
use super::Qcow2;
use crate::error::Error;
use crate::error::{Invalid, Result};
use crate::format::{datapath, Driver};
use std::io::{IoSlice, IoSliceMut};

impl Qcow2 {
    /// The image offset where the VM state area starts.
    fn vm_state_offset(&self) -> u64 {
        self.g.l1_entries_for(self.size()) << (self.g.cluster_bits + self.g.l2_bits)
    }

    /// The image range `[off, end)` of `len` VM state bytes at `pos`, refused (EFBIG,
    /// as QEMU) when it does not fit in 64 bits.
    fn vm_state_range(&self, pos: u64, len: u64) -> Result<(u64, u64)> {
        let base = self.vm_state_offset();
        let too_large = || Error::from(Invalid::VmStateTooLarge { offset: pos });
        let off = base.checked_add(pos).ok_or_else(too_large)?;
        let end = off.checked_add(len).ok_or_else(too_large)?;
        Ok((off, end))
    }

    /// Writes VM state at `pos`, first growing the L1 table to reach it. As QEMU, the
    /// table grows by half again until it is large enough (fewer regrowths while a
    /// VM state streams in), and a table past the 32 MiB limit is EFBIG.
    pub(super) fn do_save_vmstate(&self, buf: &[u8], pos: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (off, end) = self.vm_state_range(pos, buf.len() as u64)?;
        let need = ((end - 1) >> (self.g.cluster_bits + self.g.l2_bits)) + 1;
        {
            let mut m = self.lock();
            m.check_writable()?;
            let have = m.l1.len() as u64;
            if need > have {
                let mut entries = have.max(1);
                while entries < need {
                    entries = (entries * 3).div_ceil(2);
                }
                if entries * 8 > MAX_L1_BYTES {
                    return Err(Invalid::VmStateTooLarge { offset: end - 1 }.into());
                }
                m.grow_l1(entries, None)?;
            }
        }
        datapath::write_vectored(self, &[IoSlice::new(buf)], off)
    }

    /// Reads VM state at `pos`; bytes never written (past the L1 table too) are zeroes.
    pub(super) fn do_load_vmstate(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (off, _) = self.vm_state_range(pos, buf.len() as u64)?;
        datapath::read_vectored(self, &mut [IoSliceMut::new(buf)], off)
    }
}
