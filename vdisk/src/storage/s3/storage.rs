//! [`S3Storage`]: an object in an S3 bucket as a [`Storage`].
//!
//! Read-only (the usual case: a golden image, a convert source): the size comes from
//! `HEAD`, reads go through the block cache the HTTP storage uses (a miss fetches the
//! run of missing blocks around it in one ranged GET; large reads bypass it).
//!
//! Writable (a `convert`/`create` target): an object cannot be written in place, and
//! formats write out of order, so the image lives in a local sparse spool file (an
//! unlinked temporary file) while open: the existing object is downloaded into it
//! first (parallel ranged GETs; an object that does not exist yet starts empty), every
//! I/O goes to the spool, and `flush` uploads the whole spool when it changed since the
//! last upload (multipart, parts in parallel). A failed upload fails the flush, so the
//! close that ends a convert fails and nothing is claimed written. Writes not followed
//! by a flush are not uploaded (a warning says so when the storage is dropped).

use super::client::Client;
use super::upload;
use crate::storage::cache::{BlockCache, ReadPolicy};
use crate::storage::{
    CacheMode, FileStorage, LockMode, OpenFileOptions, Storage, StorageError, StorageOp,
    StorageResult,
};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Cache block (and readahead) size.
const BLOCK: u64 = 1 << 20;
/// Memory the block cache may hold.
const CACHE_BYTES: u64 = 64 << 20;
/// Longest run of blocks fetched by one GET.
const MAX_FETCH: u64 = 8 << 20;
/// Reads of at least this many bytes bypass the cache.
const BYPASS: u64 = 1 << 20;

/// An S3 object.
#[derive(Debug)]
pub struct S3Storage {
    client: Client,
    mode: Mode,
    /// `cache=unsafe`: flushes do not upload (the close does).
    ignore_flush: bool,
}

#[derive(Debug)]
enum Mode {
    Read { size: u64, cache: BlockCache },
    Write(Spool),
}

/// The local copy of an object open for writing.
#[derive(Debug)]
struct Spool {
    file: FileStorage,
    /// Written since the last upload.
    dirty: AtomicBool,
    /// Serialises uploads (two flushes must not upload at once).
    upload: Mutex<()>,
}

impl S3Storage {
    /// Opens the object read-only (it must exist).
    pub fn open_read(client: Client) -> StorageResult<S3Storage> {
        let size = client
            .size()
            .and_then(|s| {
                s.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "No such key in the bucket")
                })
            })
            .map_err(StorageError::from)?;
        Ok(S3Storage {
            client,
            mode: Mode::Read {
                size,
                cache: BlockCache::new(BLOCK, (CACHE_BYTES / BLOCK) as usize),
            },
            ignore_flush: false,
        })
    }

    /// Opens the object for writing: its contents (if `keep` and it exists) in a new
    /// spool file. Without `keep` the image starts empty (a create).
    pub fn open_write(client: Client, keep: bool, cache: CacheMode) -> StorageResult<S3Storage> {
        let open_err = StorageError::from;
        // Checks the bucket and the credentials before anything is spooled.
        let existing = client.size().map_err(open_err)?;
        let file = spool_file()?;
        if let (true, Some(len)) = (keep, existing) {
            upload::download(&client, &file, len).map_err(open_err)?;
        }
        Ok(S3Storage {
            client,
            mode: Mode::Write(Spool {
                file,
                dirty: AtomicBool::new(!keep || existing.is_none()),
                upload: Mutex::new(()),
            }),
            ignore_flush: cache.ignore_flush(),
        })
    }

    fn spool(&self, op: StorageOp, offset: Option<u64>) -> StorageResult<&Spool> {
        match &self.mode {
            Mode::Write(s) => Ok(s),
            Mode::Read { .. } => Err(StorageError::op(
                op,
                self.client.url(),
                offset,
                io::Error::from_raw_os_error(libc::EROFS),
            )),
        }
    }

    /// Runs a change on the spool, then marks it to be uploaded (after: a flush
    /// that ran meanwhile did not include it).
    fn written<T>(
        &self,
        op: StorageOp,
        offset: Option<u64>,
        f: impl FnOnce(&FileStorage) -> StorageResult<T>,
    ) -> StorageResult<T> {
        let s = self.spool(op, offset)?;
        let r = f(&s.file);
        s.dirty.store(true, Ordering::Release);
        r
    }
}

/// An unlinked temporary file in `TMPDIR` (sparse; gone when closed).
fn spool_file() -> StorageResult<FileStorage> {
    let dir = std::env::temp_dir();
    let opts = OpenFileOptions {
        read_only: false,
        cache: CacheMode::Writeback,
        lock: LockMode::Off,
        create: true,
    };
    for _ in 0..16 {
        let p = dir.join(format!(
            "vdisk-s3-spool-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        if p.exists() {
            continue;
        }
        let f = FileStorage::open(&p, &opts)?;
        let _ = std::fs::remove_file(&p);
        return Ok(f);
    }
    Err(StorageError::op(
        StorageOp::Open,
        dir.display().to_string(),
        None,
        io::Error::new(io::ErrorKind::AlreadyExists, "no free spool file name"),
    ))
}

impl S3Storage {
    /// Uploads the spool if it changed since the last upload.
    fn upload(&self) -> StorageResult<()> {
        let Mode::Write(s) = &self.mode else {
            return Ok(());
        };
        let _one = s.upload.lock().unwrap_or_else(|p| p.into_inner());
        if !s.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let r = s.file.len().and_then(|len| {
            upload::upload(&self.client, &s.file, len)
                .map_err(|e| StorageError::op(StorageOp::Flush, self.client.url(), None, e))
        });
        if r.is_err() {
            // Still to be uploaded.
            s.dirty.store(true, Ordering::Release);
        }
        r
    }
}

impl Storage for S3Storage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        match &self.mode {
            Mode::Write(s) => s.file.read_at(buf, offset),
            Mode::Read { size, cache } => {
                let policy = ReadPolicy {
                    size: *size,
                    max_fetch: MAX_FETCH,
                    bypass: BYPASS,
                };
                cache
                    .read(&policy, buf, offset, |off, dst| self.client.get(off, dst))
                    .map_err(|e| {
                        StorageError::op(StorageOp::Read, self.client.url(), Some(offset), e)
                    })
            }
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        self.written(StorageOp::Write, Some(offset), |f| f.write_at(buf, offset))
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> StorageResult<()> {
        self.written(StorageOp::Write, Some(offset), |f| {
            f.write_vectored_at(bufs, offset)
        })
    }

    fn flush(&self) -> StorageResult<()> {
        // With `cache=unsafe` (convert's default for its target) flushes are skipped
        // and the close uploads once; otherwise a flush makes the writes durable,
        // which here means uploading them.
        if self.ignore_flush {
            return Ok(());
        }
        self.upload()
    }

    fn close(&self) -> StorageResult<()> {
        self.upload()
    }

    fn len(&self) -> StorageResult<u64> {
        match &self.mode {
            Mode::Write(s) => s.file.len(),
            Mode::Read { size, .. } => Ok(*size),
        }
    }

    fn set_len(&self, len: u64) -> StorageResult<()> {
        self.written(StorageOp::Truncate, None, |f| f.set_len(len))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.written(StorageOp::PunchHole, Some(offset), |f| {
            f.punch_hole(offset, len)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.written(StorageOp::WriteZeroes, Some(offset), |f| {
            f.write_zeroes(offset, len)
        })
    }

    fn zero_fresh(&self, offset: u64, len: u64) -> StorageResult<bool> {
        match &self.mode {
            Mode::Write(_) => self.written(StorageOp::WriteZeroes, Some(offset), |f| {
                f.zero_fresh(offset, len)
            }),
            Mode::Read { .. } => Ok(false),
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.written(StorageOp::Allocate, Some(offset), |f| {
            f.allocate(offset, len)
        })
    }

    fn extent_at(&self, offset: u64) -> StorageResult<(bool, u64)> {
        match &self.mode {
            Mode::Write(s) => s.file.extent_at(offset),
            Mode::Read { size, .. } => Ok((true, size.saturating_sub(offset))),
        }
    }

    fn protocol_name(&self) -> &'static str {
        super::PROTOCOL.name
    }

    fn exact_filename(&self) -> Option<String> {
        Some(self.client.url().to_string())
    }
}

impl Drop for S3Storage {
    fn drop(&mut self) {
        if let Mode::Write(s) = &self.mode {
            if s.dirty.load(Ordering::Acquire) {
                tracing::warn!(
                    "{}: writes not flushed were not uploaded",
                    self.client.url()
                );
            }
        }
    }
}

/// Opens a node's object (the protocol's open; `create`: a new, empty image).
pub fn open(
    client: Client,
    read_only: bool,
    create: bool,
    cache: CacheMode,
) -> StorageResult<Arc<dyn Storage>> {
    Ok(Arc::new(if read_only {
        S3Storage::open_read(client)?
    } else {
        S3Storage::open_write(client, !create, cache)?
    }))
}
