//! I/O buffers aligned for O_DIRECT, so requests through `-t none` reach the file
//! without the storage layer's bounce buffer (an extra allocation and copy each).

use std::ops::{Deref, DerefMut};

/// Alignment that satisfies O_DIRECT on every device the storage layer supports.
const ALIGN: usize = 4096;

/// A zeroed byte buffer whose first byte is 4 KiB aligned.
pub struct IoBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl IoBuf {
    /// Allocates `len` zero bytes; fails with ENOMEM instead of aborting.
    pub fn new(len: u64) -> vdisk::Result<IoBuf> {
        let len = usize::try_from(len).map_err(|_| no_memory())?;
        let total = len.checked_add(ALIGN).ok_or_else(no_memory)?;
        let mut raw = Vec::new();
        raw.try_reserve_exact(total).map_err(|_| no_memory())?;
        raw.resize(total, 0);
        let off = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        Ok(IoBuf { raw, off, len })
    }

    /// A buffer of `len` bytes all equal to `byte`.
    pub fn filled(len: u64, byte: u8) -> vdisk::Result<IoBuf> {
        let mut b = IoBuf::new(len)?;
        b.fill(byte);
        Ok(b)
    }
}

fn no_memory() -> vdisk::Error {
    std::io::Error::from_raw_os_error(libc::ENOMEM).into()
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_sized() {
        for len in [0u64, 1, 4095, 4096, 100_000] {
            let b = IoBuf::filled(len, 7).unwrap();
            assert_eq!(b.len() as u64, len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b.iter().all(|&x| x == 7));
        }
    }
}
