//! Raw LUKS1 volumes (`-f luks`, QEMU's `block/crypto.c`): a LUKS header and key
//! material, then the encrypted payload. Guest byte `g` is stored at
//! `payload_offset + g`, encrypted in 512-byte sectors whose IV is the guest sector
//! number `g / 512` (the payload-relative offset, unlike qcow2, which uses the host
//! offset).
//!
//! Files: `probe.rs` (recognising a header), `options.rs` (declared options),
//! `create.rs` (new volumes), `amend.rs` (key-slot management, also qcow2's); the header itself, key slots and ciphers are in
//! [`crate::crypto::luks`].
//!
//! Guest I/O not aligned to 512 bytes is read-modify-written under a lock that aligned
//! writes share, so a partial-sector update never interleaves with a write of the same
//! sector. Opened with [`DriverOptions::no_io`] and no key secret (`info`), the header is
//! read and guest I/O fails.

mod amend;
pub(crate) use amend::amend as amend_keys;
mod create;
pub(crate) use create::{params as create_params, write_volume};
pub mod options;
pub mod probe;

use super::options::OptionDesc;
use super::registry::{Capabilities, FormatDesc, OpenArgs};
use super::{
    check_range, Driver, DriverOptions, EncryptionInfo, Extent, ExtentKind, Format, ZeroFlags,
};
use crate::crypto::luks::{Luks, HEADER_LEN};
use crate::crypto::{secret, CryptoError, SectorCipher, SECTOR_SIZE};
use crate::error::{Error, Invalid, Result, Unsupported, ZeroLimit};
use crate::storage::Storage;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// An open raw LUKS volume.
#[derive(Debug)]
pub struct LuksVolume {
    /// The payload's storage.
    storage: Arc<dyn Storage>,
    /// The header's: `storage` itself, or a detached header file.
    header: Arc<dyn Storage>,
    /// The header; `amend` changes its key slots.
    luks: Mutex<Luks>,
    /// The id of the secret the volume was opened with (`amend` adding a slot
    /// recovers the master key with it).
    key_secret: Option<String>,
    payload: u64,
    size: AtomicU64,
    cipher: Option<SectorCipher>,
    read_only: bool,
    /// Aligned writes share it; partial-sector read-modify-writes hold it alone.
    rmw: RwLock<()>,
}

/// Reads and checks the header of a LUKS volume on `storage`; `area` bounds the key
/// material (`None`: the payload offset).
pub(crate) fn read_header(storage: &dyn Storage, at: u64, area: Option<u64>) -> Result<Luks> {
    let mut head = [0u8; HEADER_LEN];
    storage.read_at(&mut head, at)?;
    Ok(Luks::parse(&head, area)?)
}

/// Unlocks `luks` (its header area at `at` on `storage`) with the secret `key_secret`
/// names; `prefix` is the option prefix for the "required" message.
pub(crate) fn unlock(
    storage: &dyn Storage,
    at: u64,
    luks: &Luks,
    key_secret: Option<&str>,
    prefix: &'static str,
) -> Result<SectorCipher> {
    let s = secret::key_secret(key_secret, prefix)?;
    let pass = s.passphrase()?;
    let len = storage.len()?;
    luks.unlock(pass, &mut |off, buf| {
        let end = at + off + buf.len() as u64;
        if end > len {
            return Err(CryptoError::Truncated {
                got: len,
                need: end,
            }
            .into());
        }
        Ok(storage.read_at(buf, at + off)?)
    })
}

impl LuksVolume {
    /// Opens a volume: parses the header and, unless `opts.no_io` without a key,
    /// unlocks a key slot with the named secret.
    pub fn open(storage: Arc<dyn Storage>, opts: &DriverOptions) -> Result<LuksVolume> {
        LuksVolume::open_detached(storage.clone(), storage, opts)
    }

    /// Opens a volume whose header is on `header` and payload on `storage` (the same
    /// storage: an ordinary volume). As QEMU, the payload starts at the header's
    /// payload offset on `storage` either way (QEMU's detached headers record 0), and
    /// a detached header's key material may fill the header file.
    pub fn open_detached(
        header: Arc<dyn Storage>,
        storage: Arc<dyn Storage>,
        opts: &DriverOptions,
    ) -> Result<LuksVolume> {
        let detached = !Arc::ptr_eq(&header, &storage);
        let hlen = header.len()?;
        if hlen < HEADER_LEN as u64 {
            return Err(CryptoError::Truncated {
                got: hlen,
                need: HEADER_LEN as u64,
            }
            .into());
        }
        let luks = read_header(&*header, 0, detached.then_some(hlen))?;
        let len = storage.len()?;
        let payload = luks.payload_offset();
        if payload > len {
            return Err(CryptoError::BadHeader {
                field: crate::crypto::error::HeaderField::PayloadOffset,
                value: payload,
            }
            .into());
        }
        let cipher = if opts.no_io {
            None
        } else {
            Some(unlock(&*header, 0, &luks, opts.key_secret.as_deref(), "")?)
        };
        Ok(LuksVolume {
            storage,
            header,
            luks: Mutex::new(luks),
            key_secret: opts.key_secret.clone(),
            payload,
            size: AtomicU64::new(len - payload),
            cipher,
            read_only: opts.read_only,
            rmw: RwLock::new(()),
        })
    }

    fn detached(&self) -> bool {
        !Arc::ptr_eq(&self.header, &self.storage)
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher
            .as_ref()
            .ok_or_else(|| CryptoError::NoKeySecret("").into())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Reads and decrypts whole sectors at guest `offset` (aligned).
    fn read_sectors(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.storage.read_at(buf, self.payload + offset)?;
        self.cipher()?.decrypt(offset / SECTOR_SIZE, buf)?;
        Ok(())
    }

    /// Encrypts and writes whole sectors at guest `offset` (aligned); `buf` is consumed
    /// as scratch.
    fn write_sectors(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.cipher()?.encrypt(offset / SECTOR_SIZE, buf)?;
        Ok(self.storage.write_at(buf, self.payload + offset)?)
    }

    /// The 512-aligned span around `[offset, offset + len)`.
    fn span(offset: u64, len: u64) -> (u64, u64) {
        let a = offset / SECTOR_SIZE * SECTOR_SIZE;
        let e = (offset + len).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        (a, e)
    }

    /// Writes plaintext `data` at guest `offset` (any alignment).
    fn write_plain(&self, data: &[u8], offset: u64) -> Result<()> {
        let (a, e) = Self::span(offset, data.len() as u64);
        let mut buf = vec![0u8; (e - a) as usize];
        if a == offset && e == offset + data.len() as u64 {
            let _g = self.rmw.read().unwrap_or_else(|p| p.into_inner());
            buf.copy_from_slice(data);
            return self.write_sectors(&mut buf, a);
        }
        let _g = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        let head = (offset - a) as usize;
        // Only the first and last sector keep old bytes.
        self.read_sectors(&mut buf[..SECTOR_SIZE as usize], a)?;
        if buf.len() > SECTOR_SIZE as usize {
            let last = buf.len() - SECTOR_SIZE as usize;
            self.read_sectors(&mut buf[last..], e - SECTOR_SIZE)?;
        }
        buf[head..head + data.len()].copy_from_slice(data);
        self.write_sectors(&mut buf, a)
    }
}

fn open(args: OpenArgs<'_, '_>) -> Result<Arc<dyn Driver>> {
    // `meta` is a detached header when the node has a `header` child.
    Ok(Arc::new(LuksVolume::open_detached(
        args.meta, args.data, args.opts,
    )?))
}

/// Declared options.
pub const CREATE_OPTIONS: &[OptionDesc] = options::CREATE_OPTIONS;

/// The registered descriptor.
pub static DESCRIPTOR: FormatDesc = FormatDesc {
    name: "luks",
    probe: probe::probe,
    open: Some(open),
    create: Some(create::create),
    create_options: CREATE_OPTIONS,
    amend_only_options: options::AMEND_ONLY_OPTIONS,
    amendable: true,
    caps: Capabilities::NONE,
};

impl Driver for LuksVolume {
    fn format(&self) -> Format {
        Format(&DESCRIPTOR)
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        let (a, e) = Self::span(offset, buf.len() as u64);
        if a == offset && e == offset + buf.len() as u64 {
            return self.read_sectors(buf, offset);
        }
        let mut b = vec![0u8; (e - a) as usize];
        self.read_sectors(&mut b, a)?;
        let head = (offset - a) as usize;
        buf.copy_from_slice(&b[head..head + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size())?;
        self.write_plain(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        if flags.fast {
            return Err(Unsupported::ZeroesNeedData(ZeroLimit::Encrypted).into());
        }
        // Zeroes must be stored encrypted: write them in bounded pieces.
        const PIECE: u64 = 1 << 20;
        let zero = vec![0u8; PIECE.min(len) as usize];
        let mut off = offset;
        while off < offset + len {
            let n = (offset + len - off).min(PIECE);
            self.write_plain(&zero[..n as usize], off)?;
            off += n;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // QEMU's crypto driver has no discard: the contents stay.
        self.writable()?;
        check_range(offset, len, self.size())
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.detached() {
            self.header.flush()?;
        }
        Ok(self.storage.flush()?)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size())?;
        // As QEMU: everything is data, with no host offset to show.
        Ok(Extent {
            len,
            kind: ExtentKind::Data,
            offset: None,
            compressed: false,
        })
    }
    fn encryption(&self) -> Option<EncryptionInfo> {
        let mut i = self.luks.lock().unwrap_or_else(|p| p.into_inner()).info();
        i.detached_header = self.detached();
        Some(EncryptionInfo::Luks(i))
    }
    fn amend(
        &self,
        opts: &super::options::OptionValues,
        force: bool,
        _status: &dyn Fn(u64, u64),
    ) -> Result<()> {
        self.writable()?;
        let mut l = self.luks.lock().unwrap_or_else(|p| p.into_inner());
        amend::amend(
            &*self.header,
            0,
            &mut l,
            opts,
            "",
            self.key_secret.as_deref(),
            force,
        )
    }
    fn resize(&self, new_size: u64, shrink: bool) -> Result<()> {
        self.writable()?;
        if new_size < self.size() && !shrink {
            return Err(Invalid::ShrinkNeedsFlag.into());
        }
        self.storage.set_len(self.payload + new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}
