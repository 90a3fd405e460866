//! The raw format: guest offset = host offset.

use super::mapping::{DirectRange, InPlaceGuard};
use super::options::{OptionDesc, SIZE};
use super::registry::{Capabilities, CreateArgs, FormatDesc, OpenArgs, ProbeInput};
use super::{check_range, Driver, DriverOptions, Extent, ExtentKind, Format, ZeroFlags};
use crate::error::{Error, Invalid, Result};
use crate::storage::Storage;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A raw image.
#[derive(Debug)]
pub struct Raw {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    read_only: bool,
}

impl Raw {
    /// Opens a raw image: its size is the file's size.
    pub fn open(storage: Arc<dyn Storage>, opts: &DriverOptions) -> Result<Raw> {
        let size = storage.len()?;
        Ok(Raw {
            storage,
            size: AtomicU64::new(size),
            read_only: opts.read_only,
        })
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }
}

/// Raw preallocation modes.
fn preallocate(storage: &Arc<dyn Storage>, mode: &str, from: u64, to: u64) -> Result<()> {
    match mode {
        "off" => storage.set_len(to)?,
        "falloc" => {
            storage.set_len(to)?;
            storage.allocate(from, to - from)?;
        }
        "full" => {
            storage.set_len(from)?;
            let chunk = vec![0u8; 1 << 20];
            let mut off = from;
            while off < to {
                let n = (to - off).min(chunk.len() as u64) as usize;
                storage.write_at(&chunk[..n], off)?;
                off += n as u64;
            }
        }
        other => return Err(Invalid::UnknownOption(other.to_string()).into()),
    }
    Ok(())
}

/// Raw declares only the size; preallocation comes from the file protocol's options.
pub const CREATE_OPTIONS: &[OptionDesc] = &[SIZE];

/// Creates a raw image (the protocol's `preallocation=off|falloc|full` is applied here).
pub fn create(storage: &Arc<dyn Storage>, args: &CreateArgs) -> Result<()> {
    let prealloc = args.options.get_enum("preallocation")?.unwrap_or("off");
    if args.backing.is_some() {
        return Err(Invalid::BackingNotSupported("raw").into());
    }
    preallocate(storage, prealloc, 0, args.size)?;
    storage.flush()?;
    Ok(())
}

/// Raw claims anything, with the lowest score: it is the fallback.
fn probe(_p: &ProbeInput<'_>) -> u32 {
    1
}

fn open(args: OpenArgs<'_, '_>) -> Result<Arc<dyn Driver>> {
    Ok(Arc::new(Raw::open(args.data, args.opts)?))
}

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = FormatDesc {
    name: "raw",
    probe,
    open: Some(open),
    create: Some(create),
    create_options: CREATE_OPTIONS,
    amend_only_options: &[],
    amendable: false,
    caps: Capabilities {
        raw_data: true,
        qemu_shrinks: true,
        ..Capabilities::NONE
    },
};

impl Driver for Raw {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        Ok(self.storage.read_at(buf, offset)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size())?;
        Ok(self.storage.write_at(buf, offset)?)
    }
    fn direct(&self, offset: u64, len: u64, write: bool) -> Option<DirectRange<'_>> {
        if !super::direct_gate(write, self.writable(), offset, len, self.size()) {
            return None;
        }
        let fd = self.storage.direct_fd(offset, len, write)?;
        // Guest bytes are the file's bytes: nothing can move under the transfer.
        Some(DirectRange::new(fd, offset, len, InPlaceGuard::none()))
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        if flags.may_unmap {
            self.storage.punch_hole(offset, len)?;
        } else {
            self.storage.write_zeroes(offset, len)?;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        Ok(self.storage.punch_hole(offset, len)?)
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage.event(crate::storage::BlkEvent::FlushToOs);
        self.storage.event(crate::storage::BlkEvent::FlushToDisk);
        Ok(self.storage.flush()?)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size())?;
        let (data, n) = self.storage.extent_at(offset)?;
        // Past the end of a short file (size changed under us) the disk reads as zeroes.
        let n = if n == 0 { len } else { n.min(len) };
        Ok(Extent {
            len: n,
            kind: if data {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            },
            offset: Some(offset),
            compressed: false,
        })
    }
    fn resize(&self, new_size: u64, shrink: bool) -> Result<()> {
        self.writable()?;
        let cur = self.size();
        if new_size < cur && !shrink {
            return Err(Invalid::ShrinkNeedsFlag.into());
        }
        self.storage.set_len(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}
