//! An in-memory storage, for tests and for building images before they hit a file.

use super::{Storage, StorageResult};
use std::sync::RwLock;

/// Storage held in a `Vec<u8>`; flush is a no-op.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }
    /// A storage holding `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            data: RwLock::new(bytes),
        }
    }
    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Applies a write to a byte vector (shared with the trace replayer).
pub(crate) fn apply_write(v: &mut Vec<u8>, buf: &[u8], offset: u64) {
    let end = offset as usize + buf.len();
    if v.len() < end {
        v.resize(end, 0);
    }
    v[offset as usize..end].copy_from_slice(buf);
}

/// Copies bytes of `v` at `offset` into `buf`; bytes past its end read as zero.
pub(crate) fn read_from(v: &[u8], buf: &mut [u8], offset: u64) {
    let start = (offset as usize).min(v.len());
    let end = (offset as usize).saturating_add(buf.len()).min(v.len());
    let n = end - start;
    buf[..n].copy_from_slice(&v[start..end]);
    buf[n..].fill(0);
}

/// Zeroes a range of a byte vector without growing it.
pub(crate) fn apply_zero(v: &mut [u8], offset: u64, len: u64) {
    let start = (offset as usize).min(v.len());
    let end = ((offset + len) as usize).min(v.len());
    v[start..end].fill(0);
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        read_from(
            &self.data.read().unwrap_or_else(|p| p.into_inner()),
            buf,
            offset,
        );
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        apply_write(
            &mut self.data.write().unwrap_or_else(|p| p.into_inner()),
            buf,
            offset,
        );
        Ok(())
    }
    fn flush(&self) -> StorageResult<()> {
        Ok(())
    }
    fn len(&self) -> StorageResult<u64> {
        Ok(self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> StorageResult<()> {
        self.data
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .resize(len as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()> {
        apply_zero(
            &mut self.data.write().unwrap_or_else(|p| p.into_inner()),
            offset,
            len,
        );
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        if d.len() < (offset + len) as usize {
            d.resize((offset + len) as usize, 0);
        }
        apply_zero(&mut d, offset, len);
        Ok(())
    }
    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()> {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        if d.len() < (offset + len) as usize {
            d.resize((offset + len) as usize, 0);
        }
        Ok(())
    }
}
