//! Compressed clusters: raw deflate (window bits 12) and zstd.

use crate::error::{Corruption, Error, Problem, Result, Structure};
use std::io::Read;

/// Compresses one cluster; `None` if the result would not be smaller than the input.
pub(crate) fn compress(data: &[u8], zstd: bool) -> Result<Option<Vec<u8>>> {
    let out = if zstd {
        zstd::bulk::compress(data, 0).map_err(|source| Error::Compress { zstd: true, source })?
    } else {
        let mut c =
            flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
        let mut out = Vec::with_capacity(data.len());
        match c.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => out,
            // Output buffer full before the end: it did not shrink.
            Ok(_) => return Ok(None),
            Err(e) => {
                return Err(Error::Compress {
                    zstd: false,
                    source: std::io::Error::other(e),
                })
            }
        }
    };
    if out.len() >= data.len() {
        return Ok(None);
    }
    Ok(Some(out))
}

/// Decompresses a cluster of `cs` bytes from `src` (which may run past the end of the
/// compressed stream: the tail of its last sector is ignored).
pub(crate) fn decompress(src: &[u8], cs: usize, zstd: bool, what: u64) -> Result<Vec<u8>> {
    let bad = |problem: Problem| {
        Error::from(Corruption::new(Structure::CompressedCluster, problem).at(what))
    };
    let lib = |e: &dyn std::fmt::Display| {
        bad(Problem::Undecompressable {
            library: e.to_string(),
        })
    };
    let mut out = vec![0u8; cs];
    if zstd {
        // The frame may be followed by padding; a streaming decoder stops at its end.
        let mut d = zstd::stream::read::Decoder::with_buffer(src)
            .map_err(|e| lib(&e))?
            .single_frame();
        let mut filled = 0;
        while filled < cs {
            match d.read(&mut out[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Err(lib(&e)),
            }
        }
        if filled != cs {
            return Err(bad(Problem::DecompressedSize {
                got: filled as u64,
                want: cs as u64,
            }));
        }
    } else {
        let mut d = flate2::Decompress::new_with_window_bits(false, 15);
        match d.decompress(src, &mut out, flate2::FlushDecompress::Finish) {
            Ok(_) => {}
            Err(e) => return Err(lib(&e)),
        }
        if d.total_out() as usize != cs {
            return Err(bad(Problem::DecompressedSize {
                got: d.total_out(),
                want: cs as u64,
            }));
        }
    }
    Ok(out)
}
