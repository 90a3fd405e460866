//! Whole-object transfers between a local spool file and the bucket: the upload
//! (one PUT when small, else a multipart upload with parts in flight in parallel) and
//! the download (parallel ranged GETs).
//!
//! A multipart upload that fails is aborted, so no half object is left behind and the
//! old object (if any) stays as it was: S3 makes the new object visible only when the
//! upload completes.

use super::client::{describe, Client};
use crate::storage::Storage;
use bytes::Bytes;
use futures::StreamExt;
use object_store::{MultipartUpload, ObjectStore, WriteMultipart};
use std::io;

/// Objects up to this size go in one PUT.
const SINGLE_PUT: u64 = 16 << 20;
/// The smallest part (S3's minimum is 5 MiB, except the last one).
const PART: u64 = 16 << 20;
/// S3's most parts in one upload (with a margin).
const MAX_PARTS: u64 = 9_000;
/// Parts (and download requests) in flight at once.
const PARALLEL: usize = 8;
/// One ranged GET of a download.
const DOWNLOAD_CHUNK: u64 = 8 << 20;

/// Uploads the first `len` bytes of `spool` as the object.
pub fn upload(client: &Client, spool: &dyn Storage, len: u64) -> io::Result<()> {
    let read = |off: u64, n: u64| -> io::Result<Bytes> {
        let mut buf = vec![0u8; n as usize];
        spool.read_at(&mut buf, off).map_err(io::Error::other)?;
        Ok(Bytes::from(buf))
    };
    if len <= SINGLE_PUT {
        return client.put(read(0, len)?);
    }
    let part = PART.max(len.div_ceil(MAX_PARTS).next_multiple_of(1 << 20));
    let (store, path) = client.store();
    client.block_on(async {
        let up: Box<dyn MultipartUpload> = store.put_multipart(path).await.map_err(describe)?;
        let mut w = WriteMultipart::new_with_chunk_size(up, part as usize);
        let mut off = 0;
        while off < len {
            if let Err(e) = w.wait_for_capacity(PARALLEL).await {
                // The part that failed was retried already; give the upload up.
                let _ = w.abort().await;
                return Err(describe(e));
            }
            let n = (len - off).min(part);
            match read(off, n) {
                Ok(b) => w.put(b),
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(e);
                }
            }
            off += n;
        }
        w.finish().await.map(|_| ()).map_err(describe)
    })
}

/// Downloads the object's `len` bytes into `spool` (GETs in parallel; all-zero chunks
/// are left as holes).
pub fn download(client: &Client, spool: &dyn Storage, len: u64) -> io::Result<()> {
    let (store, path) = client.store();
    let chunks = (0..len.div_ceil(DOWNLOAD_CHUNK)).map(|i| {
        let off = i * DOWNLOAD_CHUNK;
        let end = (off + DOWNLOAD_CHUNK).min(len);
        async move { (off, store.get_range(path, off..end).await) }
    });
    client.block_on(async {
        let mut s = futures::stream::iter(chunks).buffer_unordered(PARALLEL);
        while let Some((off, r)) = s.next().await {
            let b = r.map_err(describe)?;
            let want = (len - off).min(DOWNLOAD_CHUNK) as usize;
            if b.len() != want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("asked for {want} bytes at {off}, got {}", b.len()),
                ));
            }
            if b.iter().any(|&x| x != 0) {
                spool.write_at(&b, off).map_err(io::Error::other)?;
            }
        }
        Ok(())
    })?;
    spool.set_len(len).map_err(io::Error::other)
}
