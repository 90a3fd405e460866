//! The bitmaps header extension (type 0x23852875): where the bitmap directory is.
//!
//! ```text
//! 0..4   nb_bitmaps               (1..=65535)
//! 4..8   reserved                 (0)
//! 8..16  bitmap_directory_size    (bytes, at most 64 MiB)
//! 16..24 bitmap_directory_offset  (cluster aligned)
//! ```

use crate::error::{Corruption, Field, Problem, Result, Structure};

/// Bytes of the extension's data.
pub(crate) const EXT_LEN: usize = 24;
/// Most bitmaps QEMU allows in one image.
pub(crate) const MAX_BITMAPS: u32 = 65535;
/// Largest directory QEMU reads.
pub(crate) const MAX_DIR_SIZE: u64 = 64 << 20;

/// The decoded extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub dir_size: u64,
    pub dir_offset: u64,
}

fn bad(problem: Problem) -> crate::error::Error {
    Corruption::new(Structure::BitmapExtension, problem).into()
}

impl BitmapsExt {
    /// Decodes and validates the extension's data (untrusted) for an image with
    /// clusters of `cs` bytes and a file of `file_len` bytes.
    pub(crate) fn parse(data: &[u8], cs: u64, file_len: u64) -> Result<BitmapsExt> {
        if data.len() != EXT_LEN {
            return Err(bad(Problem::Invalid {
                field: Field::Length,
                value: data.len() as u64,
            }));
        }
        let be32 = |o: usize| u32::from_be_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
        let be64 = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&data[o..o + 8]);
            u64::from_be_bytes(a)
        };
        let e = BitmapsExt {
            nb_bitmaps: be32(0),
            dir_size: be64(8),
            dir_offset: be64(16),
        };
        if be32(4) != 0 {
            return Err(bad(Problem::Invalid {
                field: Field::Length,
                value: be32(4).into(),
            }));
        }
        if e.nb_bitmaps == 0 || e.nb_bitmaps > MAX_BITMAPS {
            return Err(bad(Problem::OutOfRange {
                field: Field::Count,
                value: e.nb_bitmaps.into(),
                min: 1,
                max: MAX_BITMAPS.into(),
            }));
        }
        // Each entry takes at least 24 bytes.
        if e.dir_size > MAX_DIR_SIZE || e.dir_size < 24 * u64::from(e.nb_bitmaps) {
            return Err(Corruption::new(
                Structure::BitmapDirectory,
                Problem::OutOfRange {
                    field: Field::Length,
                    value: e.dir_size,
                    min: 24 * u64::from(e.nb_bitmaps),
                    max: MAX_DIR_SIZE,
                },
            )
            .at(e.dir_offset)
            .into());
        }
        crate::format::qcow2::validate_table(
            Structure::BitmapDirectory,
            None,
            e.dir_offset,
            e.dir_size,
            cs,
            file_len,
        )?;
        Ok(e)
    }

    /// Encodes the extension's data.
    pub(crate) fn encode(&self) -> [u8; EXT_LEN] {
        let mut b = [0u8; EXT_LEN];
        b[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        b[8..16].copy_from_slice(&self.dir_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.dir_offset.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(nb: u32, reserved: u32, size: u64, off: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&nb.to_be_bytes());
        v.extend_from_slice(&reserved.to_be_bytes());
        v.extend_from_slice(&size.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
        v
    }

    #[test]
    fn round_trip() {
        let r = raw(2, 0, 64, 0x30000);
        let e = BitmapsExt::parse(&r, 65536, 1 << 20).unwrap();
        assert_eq!(
            e,
            BitmapsExt {
                nb_bitmaps: 2,
                dir_size: 64,
                dir_offset: 0x30000
            }
        );
        assert_eq!(e.encode().to_vec(), r);
    }

    #[test]
    fn rejects() {
        let cs = 65536;
        let fl = 1 << 20;
        assert!(BitmapsExt::parse(&raw(1, 0, 32, 0x10000)[..20], cs, fl).is_err());
        assert!(BitmapsExt::parse(&raw(1, 1, 32, 0x10000), cs, fl).is_err());
        assert!(BitmapsExt::parse(&raw(0, 0, 32, 0x10000), cs, fl).is_err());
        assert!(BitmapsExt::parse(&raw(65536, 0, 32 << 20, 0x10000), cs, fl).is_err());
        assert!(BitmapsExt::parse(&raw(2, 0, 24, 0x10000), cs, fl).is_err());
        assert!(BitmapsExt::parse(&raw(1, 0, (64 << 20) + 8, 0x10000), cs, fl).is_err());
        assert!(BitmapsExt::parse(&raw(1, 0, 32, 0x10200), cs, fl).is_err());
        assert!(BitmapsExt::parse(&raw(1, 0, 32, 0), cs, fl).is_err());
        assert!(BitmapsExt::parse(&raw(1, 0, 32, fl), cs, fl).is_err());
    }
}
