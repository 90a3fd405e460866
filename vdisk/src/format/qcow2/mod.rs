//! qcow2 (placeholder until the driver lands).

use super::{BackingResolver, CreateSpec, DriverOptions};
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::sync::Arc;

/// Whether `head` starts with the qcow2 magic.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 8
        && &head[..4] == b"QFI\xfb"
        && matches!(
            u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
            2 | 3
        )
}

/// A qcow2 image.
#[derive(Debug)]
pub struct Qcow2;

impl Qcow2 {
    /// Opens a qcow2 image.
    pub fn open(
        _s: Arc<dyn Storage>,
        _o: &DriverOptions,
        _b: &mut BackingResolver<'_>,
    ) -> Result<Qcow2> {
        Err(Error::unsupported("qcow2 driver pending"))
    }
}

impl super::Driver for Qcow2 {
    fn format(&self) -> super::Format {
        super::Format::Qcow2
    }
    fn size(&self) -> u64 {
        0
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        unreachable!()
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> Result<()> {
        unreachable!()
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        unreachable!()
    }
    fn write_zeroes(&self, _: u64, _: u64, _: super::ZeroFlags) -> Result<()> {
        unreachable!()
    }
    fn discard(&self, _: u64, _: u64) -> Result<()> {
        unreachable!()
    }
    fn flush(&self) -> Result<()> {
        unreachable!()
    }
    fn block_status(&self, _: u64, _: u64) -> Result<super::Extent> {
        unreachable!()
    }
    fn resize(&self, _: u64, _: bool) -> Result<()> {
        unreachable!()
    }
}

/// Creates a qcow2 image.
pub fn create(_s: &Arc<dyn Storage>, _spec: &CreateSpec) -> Result<()> {
    Err(Error::unsupported("qcow2 driver pending"))
}
