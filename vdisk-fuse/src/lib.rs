//! FUSE export of a vdisk image (`vdisk serve --fuse MOUNTPOINT`), like
//! qemu-storage-daemon's `--export type=fuse`: a FUSE filesystem whose root is one
//! regular file, the image's guest view, mounted over an existing regular file. Any
//! program (`mkfs`, `fsck`, `dd`, `fio`, an emulator) then uses the image directly.
//!
//! - read/write at any offset (writes past the end grow the image when the export is
//!   growable, else they are cut at the end / fail with ENOSPC);
//! - `fallocate`: PUNCH_HOLE → zero write that may deallocate (discard, but reads stay
//!   zero even over a backing file), ZERO_RANGE → zero write, plain → size check;
//! - `fsync` → [`vdisk::Image::flush`];
//! - `lseek` SEEK_DATA / SEEK_HOLE from the image's block status;
//! - truncate only to the same size (or growing, when growable).
//!
//! The filesystem runs on several threads and every operation calls the `&self` I/O of
//! [`vdisk::Image`]: there is no lock here.
#![warn(missing_docs)]

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use vdisk::{ExtentKind, Image, ZeroFlags};

/// A FUSE export.
#[derive(Clone, Debug)]
pub struct FuseExport {
    /// An existing regular file to mount over.
    pub mountpoint: PathBuf,
    /// Refuse writes (mounted read-only).
    pub read_only: bool,
    /// Writes and fallocate past the end grow the image.
    pub growable: bool,
    /// Threads answering requests.
    pub threads: usize,
}

const ROOT: INodeNo = INodeNo(1);
const TTL: Duration = Duration::from_secs(1);

struct ImageFs {
    image: Arc<Image>,
    read_only: bool,
    growable: bool,
    uid: u32,
    gid: u32,
    mode: u16,
    born: SystemTime,
}

fn errno(e: &vdisk::Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl ImageFs {
    fn attr(&self) -> FileAttr {
        let size = self.image.size();
        let blocks = self.image.file_length().unwrap_or(size).div_ceil(512);
        let mut perm = self.mode & 0o7777;
        if self.read_only {
            perm &= !0o222;
        }
        FileAttr {
            ino: ROOT,
            size,
            blocks,
            atime: self.born,
            mtime: self.born,
            ctime: self.born,
            crtime: self.born,
            kind: FileType::RegularFile,
            perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self
                .image
                .cluster_size()
                .unwrap_or(4096)
                .clamp(512, 1 << 20) as u32,
            flags: 0,
        }
    }

    /// Makes `[offset, offset+len)` fit: grows the image when allowed; returns the
    /// length that fits.
    fn fit(&self, offset: u64, len: u64) -> Result<u64, Errno> {
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        let size = self.image.size();
        if end <= size {
            return Ok(len);
        }
        if self.growable {
            self.image.resize(end, false).map_err(|e| errno(&e))?;
            return Ok(len);
        }
        if offset >= size {
            return Err(Errno::ENOSPC);
        }
        Ok(size - offset)
    }

    /// SEEK_DATA (`data`) or SEEK_HOLE from `offset`.
    fn seek(&self, offset: u64, data: bool) -> Result<u64, Errno> {
        let size = self.image.size();
        if offset >= size {
            return Err(Errno::ENXIO);
        }
        let mut at = offset;
        // Every extent covers at least one byte, so this ends; the count bounds it
        // against a broken block status all the same.
        for _ in 0..(1u64 << 24) {
            if at >= size {
                return if data { Err(Errno::ENXIO) } else { Ok(size) };
            }
            let e = self
                .image
                .block_status(at, size - at)
                .map_err(|e| errno(&e))?;
            let is_data = e.kind == ExtentKind::Data;
            if is_data == data {
                return Ok(at);
            }
            if e.len == 0 {
                return Err(Errno::EIO);
            }
            at = at.saturating_add(e.len);
        }
        Err(Errno::EIO)
    }
}

impl Filesystem for ImageFs {
    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino != ROOT {
            return reply.error(Errno::ENOENT);
        }
        reply.attr(&TTL, &self.attr());
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let Some(n) = size {
            let cur = self.image.size();
            if n != cur {
                if self.read_only {
                    return reply.error(Errno::EROFS);
                }
                if !self.growable || n < cur {
                    return reply.error(Errno::EPERM);
                }
                if let Err(e) = self.image.resize(n, false) {
                    return reply.error(errno(&e));
                }
            }
        }
        reply.attr(&TTL, &self.attr());
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let acc = flags.0 & libc::O_ACCMODE;
        if self.read_only && acc != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = self.image.size();
        if offset >= end {
            return reply.data(&[]);
        }
        let n = u64::from(size).min(end - offset) as usize;
        let mut buf = vec![0u8; n];
        match self.image.read_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let n = match self.fit(offset, data.len() as u64) {
            Ok(n) => n as usize,
            Err(e) => return reply.error(e),
        };
        match self.image.write_at(&data[..n], offset) {
            Ok(()) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): durability is fsync's business, as for a local file.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.image.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let op = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let size = self.image.size();
        let Some(end) = offset.checked_add(length) else {
            return reply.error(Errno::EINVAL);
        };
        // The part inside the image; past it, grow unless KEEP_SIZE (or refuse).
        let len = if keep {
            if offset >= size {
                return reply.ok();
            }
            end.min(size) - offset
        } else {
            match self.fit(offset, length) {
                Ok(n) if n == length => n,
                Ok(_) | Err(_) if op == libc::FALLOC_FL_PUNCH_HOLE => {
                    return reply.error(Errno::EINVAL)
                }
                Ok(_) => return reply.error(Errno::ENOSPC),
                Err(e) => return reply.error(e),
            }
        };
        let r = match op {
            // Plain allocation: the range exists (and reads as it did).
            0 => Ok(()),
            libc::FALLOC_FL_PUNCH_HOLE if keep => self.image.write_zeroes(
                offset,
                len,
                ZeroFlags {
                    may_unmap: true,
                    fast: false,
                },
            ),
            libc::FALLOC_FL_ZERO_RANGE => {
                self.image.write_zeroes(offset, len, ZeroFlags::default())
            }
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if offset < 0 {
            return reply.error(Errno::EINVAL);
        }
        let r = match whence {
            libc::SEEK_DATA => self.seek(offset as u64, true),
            libc::SEEK_HOLE => self.seek(offset as u64, false),
            _ => Err(Errno::EINVAL),
        };
        match r {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(e),
        }
    }
}

/// Waits until `fd` is readable.
fn wait_readable(fd: RawFd) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, exclusively borrowed for the call.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Mounts `image` over `export.mountpoint`, calls `ready`, serves until `stop` is
/// readable, then unmounts (waiting for the request threads) and flushes the image.
pub fn serve(
    image: Arc<Image>,
    export: &FuseExport,
    stop: &UnixStream,
    ready: &dyn Fn(),
) -> io::Result<()> {
    let meta = std::fs::metadata(&export.mountpoint)?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "'{}' is not a regular file (the FUSE export mounts over one)",
                export.mountpoint.display()
            ),
        ));
    }
    let fs = ImageFs {
        image: image.clone(),
        read_only: export.read_only,
        growable: export.growable,
        uid: meta.uid(),
        gid: meta.gid(),
        mode: (meta.mode() & 0o7777) as u16,
        born: SystemTime::now(),
    };
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("vdisk".into()),
        MountOption::Subtype("vdisk".into()),
        MountOption::DefaultPermissions,
    ];
    if export.read_only {
        cfg.mount_options.push(MountOption::RO);
    } else {
        cfg.mount_options.push(MountOption::RW);
    }
    cfg.n_threads = Some(export.threads.clamp(1, 64));
    let session = fuser::Session::new(fs, &export.mountpoint, &cfg)?;
    let bg = session.spawn()?;
    ready();
    let waited = wait_readable(stop.as_raw_fd());
    let unmounted = bg.umount_and_join();
    let flushed = image.flush().map_err(|e| io::Error::other(e.to_string()));
    waited.and(unmounted).and(flushed)
}
