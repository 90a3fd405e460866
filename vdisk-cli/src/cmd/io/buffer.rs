//! I/O buffers aligned for O_DIRECT, so requests through `-t none` reach the file
//! without the storage layer's bounce buffer (an extra allocation and copy each). They
//! come from the storage layer's shared aligned pool (`vdisk::storage::pool`), so a
//! long qemu-io script or a bench run does not allocate per request.

use std::ops::{Deref, DerefMut};
use vdisk::storage::pool::{self, AlignedBuf};

/// Alignment that satisfies O_DIRECT on every device the storage layer supports.
#[cfg(test)]
const ALIGN: usize = pool::BUF_ALIGN;

/// A zeroed byte buffer whose first byte is 4 KiB aligned.
pub struct IoBuf(AlignedBuf);

impl IoBuf {
    /// Allocates `len` zero bytes; fails with ENOMEM instead of aborting.
    pub fn new(len: u64) -> vdisk::Result<IoBuf> {
        let len = usize::try_from(len).map_err(|_| no_memory())?;
        let mut b = pool::try_get(len).ok_or_else(no_memory)?;
        b.fill(0);
        Ok(IoBuf(b))
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
        &self.0
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
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
