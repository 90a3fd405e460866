//! Image locking compatible with QEMU's `file` driver.
//!
//! QEMU marks each permission it holds by a shared OFD lock on byte `100 + bit`, and each
//! permission it refuses to share by a shared lock on byte `200 + bit`. A newcomer checks
//! the opposite bytes with `F_OFD_GETLK`: a permission it wants that someone refuses to
//! share, or a permission it refuses to share that someone holds, is a conflict. Using the
//! same bytes makes `qemu-img`/`qemu-io` and vdisk refuse each other's writers.

use super::{LockConflict, StorageError, StorageOp, StorageResult};
use std::os::fd::RawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// A set of QEMU block permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perm(pub u8);

impl Perm {
    /// Reads that see consistent data.
    pub const CONSISTENT_READ: Perm = Perm(1);
    /// Writes that change the data.
    pub const WRITE: Perm = Perm(2);
    /// Writes that leave the guest-visible data unchanged.
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// Changing the size.
    pub const RESIZE: Perm = Perm(8);
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// All permissions QEMU 10 knows.
    pub const ALL: Perm = Perm(0xf);
    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    fn has(self, bit: u32) -> bool {
        self.0 & (1 << bit) != 0
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, o: Perm) -> Perm {
        Perm(self.0 | o.0)
    }
}

/// How an image file is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// No locks at all (`locking=off`).
    Off,
    /// Hold `perm` and refuse to share everything not in `shared`.
    On {
        /// Permissions this opener uses.
        perm: Perm,
        /// Permissions others may hold at the same time.
        shared: Perm,
    },
}

impl LockMode {
    /// The locks qemu-img takes: a writer refuses other writers and resizers; a reader
    /// refuses writers unless `force_share` (`-U`), which shares everything.
    pub fn for_open(read_only: bool, force_share: bool) -> LockMode {
        let perm = if read_only {
            Perm::CONSISTENT_READ
        } else {
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED | Perm::RESIZE
        };
        let shared = if force_share {
            Perm::ALL
        } else {
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
        };
        LockMode::On { perm, shared }
    }
}

fn flock(ty: libc::c_short, start: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set_lock(fd: RawFd, start: i64, ty: libc::c_short) -> std::io::Result<()> {
    let fl = flock(ty, start);
    // SAFETY: fd is an open descriptor and fl a valid flock for the call's duration.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether some other open file description holds a lock on byte `start`.
fn held_by_other(fd: RawFd, start: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, start);
    // SAFETY: as above; F_OFD_GETLK writes into fl.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Drops every QEMU lock byte held through `fd` (before taking a different set).
pub fn release(fd: RawFd) -> StorageResult<()> {
    for base in [PERM_BASE, SHARED_BASE] {
        for bit in 0..4 {
            set_lock(fd, base + bit, libc::F_UNLCK as libc::c_short).map_err(|e| {
                StorageError::Io {
                    op: StorageOp::Unlock,
                    path: None,
                    offset: None,
                    source: e,
                }
            })?;
        }
    }
    Ok(())
}

/// Attempts before a conflict is reported, and the pause between them.
const CONFLICT_RETRIES: u32 = 5;
const CONFLICT_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Takes QEMU-compatible locks on `fd`, failing with [`StorageError::Locked`] when another
/// process's locks conflict. `path` only names the file in the message.
///
/// A conflict is retried briefly: OFD locks belong to the open file description, and a
/// child forked by any thread of this process shares every description until it execs.
/// A file this process just closed can so look locked for a moment by ourselves.
pub fn apply(fd: RawFd, mode: LockMode, path: &str) -> StorageResult<()> {
    let mut attempt = 0;
    loop {
        match apply_once(fd, mode, path) {
            Err(StorageError::Locked(_)) if attempt < CONFLICT_RETRIES => {
                let _ = release(fd);
                attempt += 1;
                std::thread::sleep(CONFLICT_PAUSE);
            }
            other => return other,
        }
    }
}

fn apply_once(fd: RawFd, mode: LockMode, path: &str) -> StorageResult<()> {
    let LockMode::On { perm, shared } = mode else {
        return Ok(());
    };
    let io = |e| StorageError::op(StorageOp::Lock, path, None, e);
    let conflict = |bit: u32, shared: bool| {
        StorageError::Locked(LockConflict {
            perm: Perm::NAMES[bit as usize],
            shared,
            path: path.to_string(),
        })
    };
    for bit in 0..4 {
        // Report in QEMU's order: a held lock first, then a refused share.
        if perm.has(bit) {
            let r = set_lock(fd, PERM_BASE + bit as i64, libc::F_RDLCK as libc::c_short);
            if let Err(e) = r {
                if e.raw_os_error() == Some(libc::EAGAIN) || e.raw_os_error() == Some(libc::EACCES)
                {
                    return Err(conflict(bit, false));
                }
                return Err(io(e));
            }
        }
        if !shared.has(bit) {
            let r = set_lock(fd, SHARED_BASE + bit as i64, libc::F_RDLCK as libc::c_short);
            if let Err(e) = r {
                if e.raw_os_error() == Some(libc::EAGAIN) || e.raw_os_error() == Some(libc::EACCES)
                {
                    return Err(conflict(bit, true));
                }
                return Err(io(e));
            }
        }
    }
    for bit in 0..4 {
        if perm.has(bit) && held_by_other(fd, SHARED_BASE + bit as i64).map_err(io)? {
            return Err(conflict(bit, false));
        }
        if !shared.has(bit) && held_by_other(fd, PERM_BASE + bit as i64).map_err(io)? {
            return Err(conflict(bit, true));
        }
    }
    Ok(())
}
