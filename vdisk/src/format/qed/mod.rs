//! QED (placeholder until the driver lands).

use super::{BackingResolver, CreateSpec, DriverOptions};
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::sync::Arc;

/// Whether `head` starts with the QED magic.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 4 && &head[..4] == b"QED\0"
}

/// A QED image.
#[derive(Debug)]
pub struct Qed;

impl Qed {
    /// Opens a QED image.
    pub fn open(
        _s: Arc<dyn Storage>,
        _o: &DriverOptions,
        _b: &mut BackingResolver<'_>,
    ) -> Result<Qed> {
        Err(Error::unsupported("qed driver pending"))
    }
}

impl super::Driver for Qed {
    fn format(&self) -> super::Format {
        super::Format::Qed
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

/// Creates a QED image.
pub fn create(_s: &Arc<dyn Storage>, _spec: &CreateSpec) -> Result<()> {
    Err(Error::unsupported("qed driver pending"))
}
