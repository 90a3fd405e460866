//! Storage layer: a host file (or an in-memory stand-in) addressed by byte offset.
//!
//! Formats only ever talk to a [`Storage`]; that is what lets the crash simulation
//! ([`trace::TraceStorage`]) replace the real file underneath qcow2 or QED unchanged.
//!
//! Image names become storage in two steps: [`spec`] parses every form of name (plain
//! path, `file:`, protocol URL, `json:{…}`, key=value) into one [`options::Node`]
//! tree, and [`registry`] opens a protocol node with the protocol its `driver` names.

pub mod blkdebug;
mod cache;
mod error;
mod event;
mod file;
pub mod http;
pub mod lock;
mod mem;
pub mod nbd;
pub mod options;
pub mod pool;
pub mod registry;
pub mod s3;
pub mod spec;
pub mod trace;
pub mod uri;
mod uring;
pub mod work;
mod writeback;

pub use error::{LockConflict, StorageError, StorageOp};
pub use event::BlkEvent;
pub use file::{FileStorage, OpenFileOptions};
pub use lock::{LockMode, Perm};
pub use mem::MemStorage;
pub use pool::AlignedBuf;
/// Set in the environment, makes io_uring setup fail (tests of the threaded fallback).
pub use uring::REFUSE_ENV as IO_URING_REFUSE_ENV;

use std::fmt;

/// Result of storage operations.
pub type StorageResult<T> = std::result::Result<T, StorageError>;

/// Host cache modes, as qemu-img's `-t` / `-T`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// O_DIRECT; flushes reach the disk.
    None,
    /// Page cache; flushes reach the disk (the default).
    #[default]
    Writeback,
    /// Page cache; every write is followed by a flush.
    Writethrough,
    /// O_DIRECT and every write flushed.
    Directsync,
    /// Page cache and flushes ignored: fast, not crash safe.
    Unsafe,
}

/// QEMU's `aio` modes: how a host file runs its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AioMode {
    /// Plain system calls on the caller's threads (QEMU's thread pool; the default).
    #[default]
    Threads,
    /// Linux native AIO in QEMU; here the same system calls as `threads`. Accepted
    /// only with O_DIRECT, as QEMU accepts it.
    Native,
    /// io_uring, falling back to `threads` where the kernel refuses it.
    IoUring,
}

impl AioMode {
    /// Parses qemu's spelling (`threads`, `native`, `io_uring`).
    pub fn parse(s: &str) -> Option<AioMode> {
        Some(match s {
            "threads" => AioMode::Threads,
            "native" => AioMode::Native,
            "io_uring" => AioMode::IoUring,
            _ => return None,
        })
    }
}

impl CacheMode {
    /// Parses qemu's spelling (`none`, `off`, `writeback`, `writethrough`, `directsync`, `unsafe`).
    pub fn parse(s: &str) -> Option<CacheMode> {
        Some(match s {
            "none" | "off" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => return None,
        })
    }
    /// Whether the file is opened with O_DIRECT.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }
    /// Whether each write must be made durable before it completes.
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
    /// Whether flushes are skipped.
    pub fn ignore_flush(self) -> bool {
        matches!(self, CacheMode::Unsafe)
    }
}

/// A byte-addressed backing store for an image: positional I/O, flush, space management.
///
/// All methods take `&self`: implementations must allow concurrent calls on disjoint
/// ranges (a file does, via pread/pwrite).
pub trait Storage: Send + Sync + fmt::Debug {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the storage read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()>;
    /// Reads into several buffers from consecutive bytes starting at `offset`.
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], mut offset: u64) -> StorageResult<()> {
        for b in bufs.iter_mut() {
            self.read_at(b, offset)?;
            offset += b.len() as u64;
        }
        Ok(())
    }
    /// Writes several buffers to consecutive bytes starting at `offset`.
    fn write_vectored_at(&self, bufs: &[&[u8]], mut offset: u64) -> StorageResult<()> {
        for b in bufs {
            self.write_at(b, offset)?;
            offset += b.len() as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable.
    fn flush(&self) -> StorageResult<()>;
    /// Current size in bytes.
    fn len(&self) -> StorageResult<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> StorageResult<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeroes).
    fn set_len(&self, len: u64) -> StorageResult<()>;
    /// Deallocates a range; it reads as zeroes afterwards. The size does not change.
    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()>;
    /// Makes a range read as zeroes, keeping it allocated where possible. May extend.
    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    /// Makes a freshly allocated range read as zeroes without writing zero bytes, in
    /// one cheap call where this storage can: reserving it when it lies past the end
    /// of a file nobody else writes (it reads as zeroes already), else a zero-range
    /// fallocate. The storage covers the whole range afterwards. Returns false when it
    /// cannot (the caller writes the zeroes); the default always returns false.
    /// Allocating writes use it for copy-on-write regions that read as zeroes, as
    /// QEMU's qcow2 does with a zero write of the cluster.
    fn zero_fresh(&self, _offset: u64, _len: u64) -> StorageResult<bool> {
        Ok(false)
    }
    /// Reserves space for a range (fallocate); it reads as zeroes if it was a hole.
    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()>;
    /// Returns whether `offset` lies in data (true) or a hole (false), and how many bytes
    /// from `offset` share that state (clamped to the end of the storage). Storage that
    /// cannot tell reports data.
    fn extent_at(&self, offset: u64) -> StorageResult<(bool, u64)> {
        let len = self.len()?;
        Ok((true, len.saturating_sub(offset)))
    }
    /// Replaces the image locks held (used when an open turns out to need fewer
    /// permissions than first taken, e.g. a metadata-only look at a raw file).
    fn relock(&self, _mode: LockMode) -> StorageResult<()> {
        Ok(())
    }
    /// The alignment O_DIRECT imposes (1 when buffered). Formats may use it to size I/O.
    fn alignment(&self) -> usize {
        1
    }
    /// Copies `len` bytes at `offset` into `dst` at `dst_offset` inside the kernel
    /// (`copy_file_range`: a reflink or a server-side copy where the file system has
    /// one), when both are host files. Returns how many bytes were copied: fewer than
    /// `len` (possibly 0) when offload is impossible here (different file systems, no
    /// support, the end of this file) — the caller copies the rest itself.
    fn copy_range_to(
        &self,
        _offset: u64,
        _dst: &dyn Storage,
        _dst_offset: u64,
        _len: u64,
    ) -> StorageResult<u64> {
        Ok(0)
    }
    /// The host descriptor on which a caller may transfer `[offset, offset + len)` of
    /// this storage itself, at the same offsets (`write`: writing it), or `None` (the
    /// default): use [`Storage::read_at`] and [`Storage::write_at`]. Only a plain host
    /// file opened with O_DIRECT answers, for a non-empty range that is aligned as
    /// O_DIRECT needs and lies inside the file (so such a write never extends it and a
    /// read never needs the zero fill past the end). Front-ends submit these transfers
    /// asynchronously (the NBD server's io_uring path) while holding the driver's guard
    /// for the range ([`crate::format::mapping::DirectRange`]).
    fn direct_fd(&self, _offset: u64, _len: u64, _write: bool) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The host file descriptor, for storage that is one host file (copy offload).
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The protocol's name as `info` shows it (`file`, `nbd`).
    fn protocol_name(&self) -> &'static str {
        "file"
    }
    /// QEMU's canonical name of a storage that is not a host file
    /// (`nbd+unix:///e?socket=s`); `None` for files, which keep the name they were
    /// opened by.
    fn exact_filename(&self) -> Option<String> {
        None
    }
    /// The image is closed (its format wrote everything back and flushed): storage that
    /// holds writes elsewhere until the end (an S3 object's local spool) finishes them
    /// now; an error means they are lost. The default does nothing.
    fn close(&self) -> StorageResult<()> {
        Ok(())
    }
    /// A format announces the step whose I/O comes next ([`BlkEvent`]); only the
    /// fault-injecting `blkdebug` storage acts on it.
    fn event(&self, _event: BlkEvent) {}
    /// The `blkdebug` filter this storage is, whose breakpoints qemu-io's `break`
    /// family sets (QEMU looks for one down the node's file children).
    fn blkdebug(&self) -> Option<&blkdebug::BlkdebugStorage> {
        None
    }
}
