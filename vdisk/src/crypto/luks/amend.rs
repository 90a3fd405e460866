//! Key-slot management of an existing LUKS1 volume (`amend -o state=…`, QEMU's
//! `qcrypto_block_luks_amend_options`): adding a passphrase to a slot
//! (`state=active,new-secret=ID[,keyslot=N][,iter-time=MS]`) and erasing slots
//! (`state=inactive`, by `keyslot=N` and/or the passphrase they hold, `old-secret=ID`),
//! with QEMU's rules, refusals and messages, `force` lifting the same checks.
//!
//! Crash rules (every passphrase that worked before keeps working at every crash
//! point, and no slot is ever marked active before its key material is durable):
//! - adding: the new slot's key material is written into the (inactive) slot's area
//!   and flushed, then the header marking the slot active is written and flushed. A
//!   crash before the header write leaves the slot inactive; other slots are never
//!   touched. (With `force` on an active slot the material is overwritten in place, as
//!   in QEMU: that slot's old passphrase is what `force` gives up.)
//! - erasing: the header marking the slot inactive is written and flushed first, then
//!   the slot's key material is overwritten [`ERASE_PASSES`] times with random bytes
//!   (QEMU's 40 passes, also when the header write failed), then flushed. A crash in
//!   between leaves the slot disabled with material that no passphrase opens.
//!
//! The header is rewritten whole (592 bytes) with only the changed slot differing, so a
//! torn header write can only affect the slot being changed.

use super::{header, KeySlot, Luks, HEADER_LEN, MAX_ITERATIONS, MAX_STRIPES, MIN_ITERATIONS};
use super::{random, NUM_SLOTS};
use crate::crypto::error::HeaderField;
use crate::crypto::{secret, CryptoError, SECTOR_SIZE};
use crate::error::Result;
use zeroize::Zeroizing;

/// Overwrite passes over erased key material (QEMU's `QCRYPTO_BLOCK_LUKS_ERASE_ITERATIONS`).
pub const ERASE_PASSES: usize = 40;

/// The new state of the selected slots (`state=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// `active`: add a passphrase.
    Active,
    /// `inactive`: erase slots.
    Inactive,
}

/// One `amend` of a volume's key slots, as QEMU's `QCryptoBlockAmendOptionsLUKS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyAmend {
    /// `state`.
    pub state: SlotState,
    /// `keyslot` as given (QAPI's int; QEMU keeps it in a C `int`).
    pub keyslot: Option<i64>,
    /// `new-secret`: id of the passphrase to add.
    pub new_secret: Option<String>,
    /// `old-secret`: id of the passphrase whose slots are erased.
    pub old_secret: Option<String>,
    /// `iter-time` in milliseconds (default 2000).
    pub iter_time: Option<u64>,
}

/// Where the header area is: reads, writes and flushes at offsets from its start.
pub trait HeaderArea {
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Makes the writes so far durable.
    fn flush(&self) -> Result<()>;
}

fn opt_err(msg: impl Into<String>) -> crate::error::Error {
    CryptoError::Option(msg.into()).into()
}

fn passphrase(id: &str) -> Result<Zeroizing<Vec<u8>>> {
    let s = secret::lookup(id)?;
    Ok(Zeroizing::new(s.passphrase()?.to_vec()))
}

impl Luks {
    /// Applies `req`; `open_secret` is the id of the secret the volume was opened with
    /// (it recovers the master key for a new slot). `io` reaches the header area.
    /// The in-memory header follows what was written.
    pub fn amend(
        &mut self,
        req: &KeyAmend,
        open_secret: Option<&str>,
        force: bool,
        io: &dyn HeaderArea,
    ) -> Result<()> {
        match req.state {
            SlotState::Active => self.amend_add(req, open_secret, force, io),
            SlotState::Inactive => self.amend_erase(req, force, io),
        }
    }

    fn active_slots(&self) -> usize {
        self.header.slots.iter().filter(|s| s.active).count()
    }

    fn amend_add(
        &mut self,
        req: &KeyAmend,
        open_secret: Option<&str>,
        force: bool,
        io: &dyn HeaderArea,
    ) -> Result<()> {
        let Some(new_secret) = &req.new_secret else {
            return Err(opt_err("'new-secret' is required to activate a keyslot"));
        };
        if req.old_secret.is_some() {
            return Err(opt_err(
                "'old-secret' must not be given when activating keyslots",
            ));
        }
        let slot = match req.keyslot {
            Some(k) => {
                let k = k as i32;
                if !(0..NUM_SLOTS as i32).contains(&k) {
                    // QEMU prints this one unsigned.
                    return Err(opt_err(format!(
                        "Invalid keyslot {} specified, must be between 0 and {}",
                        k as u32,
                        NUM_SLOTS - 1
                    )));
                }
                k as usize
            }
            None => self
                .free_slot()
                .ok_or_else(|| opt_err("Can't add a keyslot - all keyslots are in use"))?,
        };
        if !force && self.header.slots[slot].active {
            return Err(opt_err(format!(
                "Refusing to overwrite active keyslot {slot} - please erase it first"
            )));
        }
        let old = passphrase(secret::key_secret(open_secret, "")?.id())?;
        let (_, master) = self.unlock_key(&old, &mut |off, buf| io.read(off, buf))?;
        let new = passphrase(new_secret)?;
        self.store_key(
            slot,
            &master,
            &new,
            req.iter_time.unwrap_or(super::DEFAULT_ITER_TIME),
            io,
        )
    }

    /// Writes `master` under `pass` into slot `slot`: key material first (flushed),
    /// then the header.
    fn store_key(
        &mut self,
        slot: usize,
        master: &[u8],
        pass: &[u8],
        iter_time: u64,
        io: &dyn HeaderArea,
    ) -> Result<()> {
        let n = self.header.key_bytes as usize;
        if master.len() != n || !self.digest_matches(master) {
            return Err(CryptoError::BadPassword.into());
        }
        let old = self.header.slots[slot].clone();
        let (start, len) = self.slot_extent(slot)?;
        let mut salt = [0u8; header::SALT_LEN];
        random(&mut salt)?;
        let iterations = self
            .hash
            .iterations_for(n, iter_time.max(1))
            .clamp(MIN_ITERATIONS, MAX_ITERATIONS as u64) as u32;
        let split = super::slot_material(
            self.spec,
            self.hash,
            master,
            old.stripes,
            pass,
            &salt,
            iterations,
        )?;
        debug_assert_eq!(split.len() as u64, len);
        io.write(start, &split)?;
        io.flush()?;
        let mut h = self.header.clone();
        h.slots[slot] = KeySlot {
            active: true,
            iterations,
            salt,
            ..old
        };
        io.write(0, &h.encode())?;
        io.flush()?;
        self.header = h;
        Ok(())
    }

    /// Offset and length of slot `slot`'s key material, checked against the header
    /// area (inactive slots are not checked at open).
    fn slot_extent(&self, slot: usize) -> Result<(u64, u64)> {
        let s = &self.header.slots[slot];
        if s.stripes == 0 || s.stripes > MAX_STRIPES {
            return Err(CryptoError::BadHeader {
                field: HeaderField::SlotStripes(slot),
                value: s.stripes as u64,
            }
            .into());
        }
        let start = s.key_offset as u64 * SECTOR_SIZE;
        let len = self.split_len(s) as u64;
        if start < HEADER_LEN as u64 || start + len > self.area {
            return Err(CryptoError::BadHeader {
                field: HeaderField::SlotKeyOffset(slot),
                value: start,
            }
            .into());
        }
        Ok((start, len))
    }

    fn amend_erase(&mut self, req: &KeyAmend, force: bool, io: &dyn HeaderArea) -> Result<()> {
        if req.new_secret.is_some() {
            return Err(opt_err(
                "'new-secret' must not be given when erasing keyslots",
            ));
        }
        if req.iter_time.is_some() {
            return Err(opt_err(
                "'iter-time' must not be given when erasing keyslots",
            ));
        }
        let old = req.old_secret.as_deref().map(passphrase).transpose()?;
        let mut read = |off, buf: &mut [u8]| io.read(off, buf);
        if let Some(k) = req.keyslot {
            let k = k as i32;
            if !(0..NUM_SLOTS as i32).contains(&k) {
                return Err(opt_err(format!(
                    "Invalid keyslot {k} specified, must be between 0 and {}",
                    NUM_SLOTS - 1
                )));
            }
            let k = k as usize;
            if let Some(pass) = &old {
                if self.try_slot(k, pass, &mut read)?.is_none() {
                    return Err(opt_err(format!(
                        "Given keyslot {k} doesn't contain the given old password for erase operation"
                    )));
                }
            }
            if !force && !self.header.slots[k].active {
                return Err(opt_err(format!(
                    "Given keyslot {k} is already erased (inactive) "
                )));
            }
            if !force && self.active_slots() == 1 {
                return Err(opt_err(format!(
                    "Attempt to erase the only active keyslot {k} which will erase all the data in the image irreversibly - refusing operation"
                )));
            }
            return self.erase_key(k, io);
        }
        let Some(pass) = &old else {
            return Err(opt_err(
                "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given",
            ));
        };
        let mut matching = Vec::new();
        for i in 0..NUM_SLOTS {
            if self.try_slot(i, pass, &mut read)?.is_some() {
                matching.push(i);
            }
        }
        if matching.is_empty() {
            return Err(opt_err(
                "No keyslots match given (old) password for erase operation",
            ));
        }
        if !force && matching.len() == self.active_slots() {
            return Err(opt_err(
                "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation",
            ));
        }
        for i in matching {
            self.erase_key(i, io)?;
        }
        Ok(())
    }

    /// Disables slot `slot` (header written and flushed first), then overwrites its
    /// key material [`ERASE_PASSES`] times.
    fn erase_key(&mut self, slot: usize, io: &dyn HeaderArea) -> Result<()> {
        let (start, len) = self.slot_extent(slot)?;
        let mut h = self.header.clone();
        let s = &mut h.slots[slot];
        s.active = false;
        s.iterations = 0;
        s.salt = [0; header::SALT_LEN];
        // As QEMU: the material is erased even when the header write failed.
        let written = io.write(0, &h.encode()).and_then(|()| io.flush());
        if written.is_ok() {
            self.header = h;
        }
        let mut garbage = Zeroizing::new(vec![0u8; len as usize]);
        for pass in 0..ERASE_PASSES {
            if let Err(e) = random(&mut garbage) {
                // Zeroes at least once when no random bytes come.
                if pass > 0 {
                    return Err(e.into());
                }
            }
            io.write(start, &garbage)?;
        }
        io.flush()?;
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::luks::{create, CreateParams, NewVolume};
    use std::sync::Mutex;

    struct Mem(Mutex<Vec<u8>>, Mutex<Vec<(u64, usize)>>);
    impl HeaderArea for Mem {
        fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
            let v = self.0.lock().unwrap();
            buf.copy_from_slice(&v[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
            self.0.lock().unwrap()[off as usize..off as usize + buf.len()].copy_from_slice(buf);
            self.1.lock().unwrap().push((off, buf.len()));
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            self.1.lock().unwrap().push((u64::MAX, 0));
            Ok(())
        }
    }

    fn volume(pass: &str) -> (Luks, Mem) {
        let p = CreateParams::from_options(Some("aes-128"), Some("xts"), None, None, None, Some(1))
            .unwrap();
        let v: NewVolume = create(&p, pass.as_bytes()).unwrap();
        let mut img = vec![0u8; v.area() as usize];
        img[..HEADER_LEN].copy_from_slice(&v.header);
        let (off, km) = &v.key_material;
        img[*off as usize..*off as usize + km.len()].copy_from_slice(km);
        (v.luks, Mem(Mutex::new(img), Mutex::new(Vec::new())))
    }

    fn req(state: SlotState) -> KeyAmend {
        KeyAmend {
            state,
            keyslot: None,
            new_secret: None,
            old_secret: None,
            iter_time: None,
        }
    }

    fn define(id: &str, data: &str) {
        let _ = secret::define(secret::Secret::new(id, data.as_bytes().to_vec()));
    }

    fn opens(l: &Luks, m: &Mem, pass: &str) -> Option<usize> {
        l.unlock_key(pass.as_bytes(), &mut |o, b| m.read(o, b))
            .ok()
            .map(|r| r.0)
    }

    #[test]
    fn add_then_erase_in_qemus_order() {
        define("amend-t-one", "one");
        define("amend-t-two", "two");
        let (mut l, m) = volume("one");
        let mut r = req(SlotState::Active);
        r.new_secret = Some("amend-t-two".into());
        r.iter_time = Some(1);
        l.amend(&r, Some("amend-t-one"), false, &m).unwrap();
        // Material (256000 bytes at slot 1), flush, header, flush.
        let w = std::mem::take(&mut *m.1.lock().unwrap());
        let slot1 = l.header.slots[1].key_offset as u64 * 512;
        assert_eq!(
            w,
            vec![(slot1, 32 * 4000), (u64::MAX, 0), (0, 592), (u64::MAX, 0)]
        );
        let disk = Luks::parse(&m.0.lock().unwrap()[..HEADER_LEN], Some(l.area)).unwrap();
        assert_eq!(opens(&disk, &m, "two"), Some(1));
        assert_eq!(opens(&disk, &m, "one"), Some(0));
        // Erase by passphrase: header first, then 40 passes.
        let mut e = req(SlotState::Inactive);
        e.old_secret = Some("amend-t-one".into());
        l.amend(&e, None, false, &m).unwrap();
        let w = std::mem::take(&mut *m.1.lock().unwrap());
        assert_eq!(w[..2], [(0, 592), (u64::MAX, 0)]);
        assert_eq!(w.len(), 2 + ERASE_PASSES + 1);
        assert!(w[2..2 + ERASE_PASSES]
            .iter()
            .all(|&x| x == (4096, 32 * 4000)));
        let disk = Luks::parse(&m.0.lock().unwrap()[..HEADER_LEN], Some(l.area)).unwrap();
        assert_eq!(opens(&disk, &m, "one"), None);
        assert_eq!(opens(&disk, &m, "two"), Some(1));
        assert_eq!(disk.header.slots[0].iterations, 0);
        assert_eq!(disk.header.slots[0].key_offset, 8);
    }

    #[test]
    fn refusals_are_qemus() {
        define("amend-r-one", "one");
        define("amend-r-two", "two");
        let (mut l, m) = volume("one");
        let err = |l: &mut Luks, r: &KeyAmend, force| {
            l.amend(r, Some("amend-r-one"), force, &m)
                .unwrap_err()
                .to_string()
        };
        let mut r = req(SlotState::Active);
        assert_eq!(
            err(&mut l, &r, false),
            "'new-secret' is required to activate a keyslot"
        );
        r.new_secret = Some("amend-r-two".into());
        r.keyslot = Some(-1);
        assert_eq!(
            err(&mut l, &r, false),
            "Invalid keyslot 4294967295 specified, must be between 0 and 7"
        );
        r.keyslot = Some(0);
        assert_eq!(
            err(&mut l, &r, false),
            "Refusing to overwrite active keyslot 0 - please erase it first"
        );
        r.old_secret = Some("amend-r-one".into());
        assert_eq!(
            err(&mut l, &r, false),
            "'old-secret' must not be given when activating keyslots"
        );
        let mut e = req(SlotState::Inactive);
        assert_eq!(
            err(&mut l, &e, false),
            "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given"
        );
        e.keyslot = Some(-1);
        assert_eq!(
            err(&mut l, &e, false),
            "Invalid keyslot -1 specified, must be between 0 and 7"
        );
        e.keyslot = Some(3);
        assert_eq!(
            err(&mut l, &e, false),
            "Given keyslot 3 is already erased (inactive) "
        );
        e.keyslot = Some(0);
        assert_eq!(
            err(&mut l, &e, false),
            "Attempt to erase the only active keyslot 0 which will erase all the data in the image irreversibly - refusing operation"
        );
        e.old_secret = Some("amend-r-two".into());
        assert_eq!(
            err(&mut l, &e, false),
            "Given keyslot 0 doesn't contain the given old password for erase operation"
        );
        e.keyslot = None;
        assert_eq!(
            err(&mut l, &e, false),
            "No keyslots match given (old) password for erase operation"
        );
        e.old_secret = Some("amend-r-one".into());
        assert_eq!(
            err(&mut l, &e, false),
            "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation"
        );
        e.iter_time = Some(5);
        assert_eq!(
            err(&mut l, &e, false),
            "'iter-time' must not be given when erasing keyslots"
        );
        e.new_secret = Some("x".into());
        assert_eq!(
            err(&mut l, &e, false),
            "'new-secret' must not be given when erasing keyslots"
        );
        assert!(m.1.lock().unwrap().is_empty(), "nothing written");
        // Full header.
        let mut a = req(SlotState::Active);
        a.new_secret = Some("amend-r-two".into());
        a.iter_time = Some(1);
        for _ in 1..NUM_SLOTS {
            l.amend(&a, Some("amend-r-one"), false, &m).unwrap();
        }
        assert_eq!(
            err(&mut l, &a, false),
            "Can't add a keyslot - all keyslots are in use"
        );
        // Force: the last slot goes.
        let mut e = req(SlotState::Inactive);
        e.old_secret = Some("amend-r-two".into());
        l.amend(&e, None, false, &m).unwrap();
        e.old_secret = Some("amend-r-one".into());
        l.amend(&e, None, true, &m).unwrap();
        assert_eq!(l.active_slots(), 0);
    }
}
