//! LUKS1 volumes as QEMU reads and writes them: algorithm names, validation of an
//! untrusted header, unlocking a key slot with a passphrase, creating a new volume,
//! and the details `qemu-img info` shows.
//!
//! Every count and offset of the header is checked before use: key material must lie
//! inside the header area and past the 592-byte header, iteration counts are bounded by
//! [`MAX_ITERATIONS`] (so a hostile header cannot keep an open busy for hours) and
//! stripes by [`MAX_STRIPES`] (bounding the memory of the split key).

pub mod amend;
pub mod header;

use super::afsplit;
use super::cipher::{CipherAlg, CipherMode, CipherSpec, IvGenAlg, SectorCipher, SECTOR_SIZE};
use super::error::HeaderField;
use super::{CryptoError, HashAlg};
use crate::error::{Error, Result};
pub use header::{KeySlot, LuksHeader, HEADER_LEN, NUM_SLOTS};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Highest PBKDF2 iteration count accepted (per slot and for the master-key digest):
/// about 30 times what qemu-img's default 2 s gives on a current core.
pub const MAX_ITERATIONS: u32 = 1 << 26;
/// Highest stripe count accepted (LUKS uses 4000).
pub const MAX_STRIPES: u32 = 64_000;
/// Stripes of new key slots.
pub const STRIPES: u32 = 4000;
/// Where key material starts in new volumes (QEMU's `QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET`).
pub const KEY_SLOT_OFFSET: u64 = 4096;
/// Minimum iterations (LUKS spec) for new volumes.
pub const MIN_ITERATIONS: u64 = 1000;
/// qemu-img's default `iter-time`, in milliseconds.
pub const DEFAULT_ITER_TIME: u64 = 2000;

/// A parsed, validated LUKS header.
#[derive(Clone, Debug)]
pub struct Luks {
    /// The header as stored.
    pub header: LuksHeader,
    /// The payload cipher it names.
    pub spec: CipherSpec,
    /// The PBKDF2 / AF hash.
    pub hash: HashAlg,
    /// Bytes of header area key material must lie in.
    pub area: u64,
}

/// Maps a header's cipher name and key size to an algorithm (QEMU's table: `aes`,
/// `serpent`, `twofish` with 16/24/32-byte keys, `cast5` with 16; XTS keys are twice
/// that).
fn cipher_alg(name: &str, mode: CipherMode, key_bytes: u32) -> Result<CipherAlg, CryptoError> {
    let per = if mode == CipherMode::Xts {
        key_bytes / 2
    } else {
        key_bytes
    };
    let ok = mode != CipherMode::Xts || key_bytes.is_multiple_of(2);
    match CipherAlg::from_family(name, per as usize) {
        Some(a) if ok => Ok(a),
        _ => Err(CryptoError::CipherSize {
            name: name.to_string(),
            key_bytes: per,
        }),
    }
}

/// Parses `<mode>-<ivgen>[:<hash>]`.
fn parse_mode(s: &str) -> Result<(CipherMode, IvGenAlg, Option<HashAlg>), CryptoError> {
    let (mode, rest) = s
        .split_once('-')
        .ok_or_else(|| CryptoError::ModeFormat(s.to_string()))?;
    let (iv, hash) = match rest.split_once(':') {
        Some((i, h)) => (i, Some(HashAlg::parse(h)?)),
        None => (rest, None),
    };
    Ok((CipherMode::parse(mode)?, IvGenAlg::parse(iv)?, hash))
}

fn too_large(field: HeaderField, value: u64, limit: u64) -> CryptoError {
    CryptoError::TooLarge {
        field,
        value,
        limit,
    }
}

fn bad(field: HeaderField, value: u64) -> CryptoError {
    CryptoError::BadHeader { field, value }
}

impl Luks {
    /// Decodes and checks a header; `area` is the length of the header area (key
    /// material must end inside it): the payload offset for a raw volume, the
    /// encryption header extension's length in qcow2.
    pub fn parse(bytes: &[u8], area: Option<u64>) -> Result<Luks, CryptoError> {
        let header = LuksHeader::decode(bytes)?;
        let (mode, ivgen, ivgen_hash) = parse_mode(&header.cipher_mode)?;
        let alg = cipher_alg(&header.cipher_name, mode, header.key_bytes)?;
        let hash = HashAlg::parse(&header.hash_spec)?;
        let spec = CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash,
        };
        spec.essiv_alg()?;
        let area = area.unwrap_or(header.payload_offset as u64 * SECTOR_SIZE);
        let luks = Luks {
            header,
            spec,
            hash,
            area,
        };
        luks.validate(area)?;
        Ok(luks)
    }

    fn validate(&self, area: u64) -> Result<(), CryptoError> {
        let h = &self.header;
        if h.mk_iterations == 0 {
            return Err(bad(HeaderField::MasterKeyIterations, 0));
        }
        if h.mk_iterations > MAX_ITERATIONS {
            return Err(too_large(
                HeaderField::MasterKeyIterations,
                h.mk_iterations as u64,
                MAX_ITERATIONS as u64,
            ));
        }
        for (i, s) in h.slots.iter().enumerate().filter(|(_, s)| s.active) {
            if s.iterations == 0 {
                return Err(bad(HeaderField::SlotIterations(i), 0));
            }
            if s.iterations > MAX_ITERATIONS {
                return Err(too_large(
                    HeaderField::SlotIterations(i),
                    s.iterations as u64,
                    MAX_ITERATIONS as u64,
                ));
            }
            if s.stripes == 0 {
                return Err(bad(HeaderField::SlotStripes(i), 0));
            }
            if s.stripes > MAX_STRIPES {
                return Err(too_large(
                    HeaderField::SlotStripes(i),
                    s.stripes as u64,
                    MAX_STRIPES as u64,
                ));
            }
            let start = s.key_offset as u64 * SECTOR_SIZE;
            let end = start + self.split_len(s) as u64;
            if start < HEADER_LEN as u64 || end > area {
                return Err(bad(HeaderField::SlotKeyOffset(i), start));
            }
        }
        Ok(())
    }

    pub(crate) fn split_len(&self, s: &KeySlot) -> usize {
        self.header.key_bytes as usize * s.stripes as usize
    }

    /// Bytes of header area a new volume with `key_len`-byte keys takes (QEMU's
    /// layout: eight slots of 4000 stripes from 4096, each rounded up to 4096).
    pub fn area_for(key_len: usize) -> u64 {
        let slot = (key_len as u64 * STRIPES as u64).div_ceil(4096) * 4096;
        KEY_SLOT_OFFSET + NUM_SLOTS as u64 * slot
    }

    /// The payload offset in bytes.
    pub fn payload_offset(&self) -> u64 {
        self.header.payload_offset as u64 * SECTOR_SIZE
    }

    /// Tries every active slot with `passphrase`; `read(offset, buf)` reads the
    /// volume's header area. Returns the payload cipher.
    pub fn unlock(
        &self,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<SectorCipher> {
        let key = self.unlock_key(passphrase, read)?.1;
        Ok(SectorCipher::new(self.spec, &key)?)
    }

    /// Like [`Luks::unlock`], returning the slot and the master key itself.
    pub fn unlock_key(
        &self,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<(usize, Zeroizing<Vec<u8>>)> {
        for i in 0..NUM_SLOTS {
            if let Some(key) = self.try_slot(i, passphrase, read)? {
                return Ok((i, key));
            }
        }
        Err(Error::Crypto(CryptoError::BadPassword))
    }

    /// The master key if key slot `i` is active and `passphrase` opens it (QEMU's
    /// `qcrypto_block_luks_load_key`); `None` for an inactive slot or another
    /// passphrase. A failing read is an error.
    pub fn try_slot(
        &self,
        i: usize,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let n = self.header.key_bytes as usize;
        let Some(s) = self.header.slots.get(i).filter(|s| s.active) else {
            return Ok(None);
        };
        let mut slot_key = Zeroizing::new(vec![0u8; n]);
        self.hash
            .pbkdf2(passphrase, &s.salt, s.iterations, &mut slot_key);
        let mut split = Zeroizing::new(vec![0u8; self.split_len(s)]);
        read(s.key_offset as u64 * SECTOR_SIZE, &mut split)?;
        // Key material is encrypted like the payload, sector numbers from 0.
        let c = SectorCipher::new(self.spec, &slot_key)?;
        let whole = split.len() / SECTOR_SIZE as usize * SECTOR_SIZE as usize;
        c.decrypt(0, &mut split[..whole])?;
        if whole < split.len() {
            // A last partial sector (aes-192: 24 * 4000 bytes): as QEMU, the sector's
            // first bytes (CBC and XTS give them the same way whatever follows).
            let mut last = Zeroizing::new(vec![0u8; SECTOR_SIZE as usize]);
            let tail = split.len() - whole;
            last[..tail].copy_from_slice(&split[whole..]);
            c.decrypt((whole as u64) / SECTOR_SIZE, &mut last)?;
            split[whole..].copy_from_slice(&last[..tail]);
        }
        let key = afsplit::merge(self.hash, &split, n, s.stripes as usize);
        Ok(self.digest_matches(&key).then_some(key))
    }

    pub(crate) fn digest_matches(&self, key: &[u8]) -> bool {
        let mut d = [0u8; header::DIGEST_LEN];
        self.hash
            .pbkdf2(key, &self.header.mk_salt, self.header.mk_iterations, &mut d);
        d.ct_eq(&self.header.mk_digest).into()
    }

    /// The first inactive key slot.
    pub fn free_slot(&self) -> Option<usize> {
        self.header.slots.iter().position(|s| !s.active)
    }

    /// What `info` shows.
    pub fn info(&self) -> LuksInfo {
        LuksInfo {
            cipher_alg: self.spec.alg.name(),
            cipher_mode: self.spec.mode.name(),
            ivgen_alg: self.spec.ivgen.name(),
            ivgen_hash_alg: self.spec.ivgen_hash.map(HashAlg::name),
            hash_alg: self.hash.name(),
            uuid: self.header.uuid.clone(),
            payload_offset: self.payload_offset(),
            master_key_iters: self.header.mk_iterations,
            slots: self
                .header
                .slots
                .iter()
                .map(|s| SlotInfo {
                    active: s.active,
                    iters: s.active.then_some(s.iterations),
                    stripes: s.active.then_some(s.stripes),
                    key_offset: s.key_offset as u64 * SECTOR_SIZE,
                })
                .collect(),
            detached_header: false,
        }
    }
}

/// One key slot as `info` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// Enabled.
    pub active: bool,
    /// Iterations (active slots).
    pub iters: Option<u32>,
    /// Stripes (active slots).
    pub stripes: Option<u32>,
    /// Key material offset in bytes.
    pub key_offset: u64,
}

/// A LUKS header as `qemu-img info` shows it (QEMU's `QCryptoBlockInfoLUKS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksInfo {
    /// `aes-256`…
    pub cipher_alg: &'static str,
    /// `xts`, `cbc`.
    pub cipher_mode: &'static str,
    /// `plain64`…
    pub ivgen_alg: &'static str,
    /// essiv's hash, when the header names one.
    pub ivgen_hash_alg: Option<&'static str>,
    /// The PBKDF2 hash.
    pub hash_alg: &'static str,
    /// The volume UUID.
    pub uuid: String,
    /// Payload offset in bytes.
    pub payload_offset: u64,
    /// Master-key digest iterations.
    pub master_key_iters: u32,
    /// The eight slots.
    pub slots: Vec<SlotInfo>,
    /// The header is in a file of its own (the payload from 0 of the data file).
    pub detached_header: bool,
}

/// Creation parameters (QEMU's `encrypt.*` / luks options).
#[derive(Clone, Copy, Debug)]
pub struct CreateParams {
    /// The payload cipher.
    pub spec: CipherSpec,
    /// PBKDF2 / AF hash.
    pub hash: HashAlg,
    /// Milliseconds of PBKDF2 per slot unlock.
    pub iter_time_ms: u64,
}

impl Default for CreateParams {
    fn default() -> Self {
        CreateParams {
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                ivgen: IvGenAlg::Plain64,
                ivgen_hash: None,
            },
            hash: HashAlg::Sha256,
            iter_time_ms: DEFAULT_ITER_TIME,
        }
    }
}

impl CreateParams {
    /// From QEMU's option values (`None`: default). essiv's hash defaults to sha256;
    /// a hash given with plain/plain64 is kept (dm-crypt ignores it).
    pub fn from_options(
        cipher_alg: Option<&str>,
        cipher_mode: Option<&str>,
        ivgen_alg: Option<&str>,
        ivgen_hash_alg: Option<&str>,
        hash_alg: Option<&str>,
        iter_time: Option<u64>,
    ) -> Result<CreateParams, CryptoError> {
        let d = CreateParams::default();
        let ivgen = ivgen_alg
            .map(IvGenAlg::parse)
            .transpose()?
            .unwrap_or(d.spec.ivgen);
        let mut ivgen_hash = ivgen_hash_alg.map(HashAlg::parse).transpose()?;
        if ivgen == IvGenAlg::Essiv && ivgen_hash.is_none() {
            ivgen_hash = Some(HashAlg::Sha256);
        }
        let p = CreateParams {
            spec: CipherSpec {
                alg: cipher_alg
                    .map(CipherAlg::parse)
                    .transpose()?
                    .unwrap_or(d.spec.alg),
                mode: cipher_mode
                    .map(CipherMode::parse)
                    .transpose()?
                    .unwrap_or(d.spec.mode),
                ivgen,
                ivgen_hash,
            },
            hash: hash_alg.map(HashAlg::parse).transpose()?.unwrap_or(d.hash),
            iter_time_ms: iter_time.unwrap_or(d.iter_time_ms),
        };
        p.spec.essiv_alg()?;
        Ok(p)
    }

    /// The cipher-mode string of the header.
    fn mode_spec(&self) -> String {
        let s = &self.spec;
        match s.ivgen_hash {
            Some(h) => format!("{}-{}:{}", s.mode.name(), s.ivgen.name(), h.name()),
            None => format!("{}-{}", s.mode.name(), s.ivgen.name()),
        }
    }
}

/// A new volume, ready to be written: the header at 0, the first slot's key material
/// at its offset; [`NewVolume::area`] bytes of header area in all.
pub struct NewVolume {
    /// The parsed header.
    pub luks: Luks,
    /// The encoded header.
    pub header: [u8; HEADER_LEN],
    /// Offset and bytes of slot 0's (encrypted, split) key material.
    pub key_material: (u64, Zeroizing<Vec<u8>>),
    /// The payload cipher.
    pub cipher: SectorCipher,
}

impl std::fmt::Debug for NewVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewVolume")
            .field("luks", &self.luks)
            .finish_non_exhaustive()
    }
}

impl NewVolume {
    /// Bytes of the header area (= the payload offset of a raw volume).
    pub fn area(&self) -> u64 {
        self.luks.payload_offset()
    }
}

/// A key slot's material: `master` split into `stripes` (random ones, the last
/// making the difference), encrypted like the payload (sectors from 0) under the key
/// PBKDF2 derives from `pass` with `salt` and `iterations`. Exactly `key_len *
/// stripes` bytes; a last partial sector is encrypted as the front of a whole one,
/// which gives the bytes QEMU's shorter last chunk gives (every mode here encrypts a
/// sector front to back).
pub(crate) fn slot_material(
    spec: CipherSpec,
    hash: HashAlg,
    master: &[u8],
    stripes: u32,
    pass: &[u8],
    salt: &[u8],
    iterations: u32,
) -> Result<Zeroizing<Vec<u8>>> {
    let mut rnd_err = None;
    let mut split = afsplit::split(hash, master, stripes as usize, |b| {
        if let Err(e) = random(b) {
            rnd_err = Some(e);
        }
    });
    if let Some(e) = rnd_err {
        return Err(e.into());
    }
    let len = split.len();
    split.resize(
        (len as u64).div_ceil(SECTOR_SIZE) as usize * SECTOR_SIZE as usize,
        0,
    );
    let mut slot_key = Zeroizing::new(vec![0u8; master.len()]);
    hash.pbkdf2(pass, salt, iterations, &mut slot_key);
    SectorCipher::new(spec, &slot_key)?.encrypt(0, &mut split)?;
    split.truncate(len);
    Ok(split)
}

/// Fills `buf` from the system's random source.
pub fn random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::getrandom(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

fn uuid() -> Result<String, CryptoError> {
    let mut b = [0u8; 16];
    random(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Creates a volume with a random master key, slot 0 holding it under `passphrase`,
/// laid out as QEMU lays it out (slots from 4096, each slot's material rounded up to
/// 4096 bytes, the payload after the eighth).
pub fn create(params: &CreateParams, passphrase: &[u8]) -> Result<NewVolume> {
    let spec = params.spec;
    let n = spec.key_len();
    // XTS with 8-byte blocks, essiv ciphers: refused before anything is made.
    SectorCipher::new(spec, &vec![0u8; n])?;
    if !(n as u64 * STRIPES as u64).is_multiple_of(SECTOR_SIZE) {
        // 24-byte keys outside XTS: QEMU cannot encrypt (nor read) key material that
        // is not whole sectors, and aborts; refuse instead.
        return Err(CryptoError::Option(format!(
            "{}-{} key material of {} bytes is not whole {SECTOR_SIZE}-byte sectors: QEMU cannot use such a volume",
            spec.alg.name(),
            spec.mode.name(),
            n as u64 * STRIPES as u64
        ))
        .into());
    }
    let mut master = Zeroizing::new(vec![0u8; n]);
    random(&mut master)?;
    let mut mk_salt = [0u8; header::SALT_LEN];
    random(&mut mk_salt)?;
    let mut slot_salt = [0u8; header::SALT_LEN];
    random(&mut slot_salt)?;
    let t = params.iter_time_ms;
    // As QEMU: the digest gets an eighth of the slot's time, both at least 1000.
    let mk_iters = (params.hash.iterations_for(header::DIGEST_LEN, t) / 8)
        .clamp(MIN_ITERATIONS, MAX_ITERATIONS as u64) as u32;
    let slot_iters = params
        .hash
        .iterations_for(n, t)
        .clamp(MIN_ITERATIONS, MAX_ITERATIONS as u64) as u32;
    let mut mk_digest = [0u8; header::DIGEST_LEN];
    params
        .hash
        .pbkdf2(&master, &mk_salt, mk_iters, &mut mk_digest);
    let split_sectors = (n as u64 * STRIPES as u64).div_ceil(4096) * 4096 / SECTOR_SIZE;
    let first = KEY_SLOT_OFFSET / SECTOR_SIZE;
    let slots: Vec<KeySlot> = (0..NUM_SLOTS as u64)
        .map(|i| KeySlot {
            active: i == 0,
            iterations: if i == 0 { slot_iters } else { 0 },
            salt: if i == 0 {
                slot_salt
            } else {
                [0; header::SALT_LEN]
            },
            key_offset: (first + i * split_sectors) as u32,
            stripes: STRIPES,
        })
        .collect();
    let payload = first + NUM_SLOTS as u64 * split_sectors;
    let header = LuksHeader {
        cipher_name: spec.alg.family().into(),
        cipher_mode: params.mode_spec(),
        hash_spec: params.hash.name().into(),
        payload_offset: payload as u32,
        key_bytes: n as u32,
        mk_digest,
        mk_salt,
        mk_iterations: mk_iters,
        uuid: uuid()?,
        slots: slots
            .try_into()
            .map_err(|_| Error::Crypto(CryptoError::NotLuks))?,
    };
    // Slot 0: split the master key, encrypt it under the passphrase's key.
    let split = slot_material(
        spec,
        params.hash,
        &master,
        STRIPES,
        passphrase,
        &slot_salt,
        slot_iters,
    )?;
    let encoded = header.encode();
    let luks = Luks {
        area: header.payload_offset as u64 * SECTOR_SIZE,
        header,
        spec,
        hash: params.hash,
    };
    Ok(NewVolume {
        cipher: SectorCipher::new(spec, &master)?,
        key_material: (first * SECTOR_SIZE, split),
        header: encoded,
        luks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(mode: &str, ivgen: &str, hash: &str) -> CreateParams {
        CreateParams::from_options(
            Some("aes-128"),
            Some(mode),
            Some(ivgen),
            None,
            Some(hash),
            Some(1),
        )
        .unwrap()
    }

    /// A volume in memory: header area bytes.
    fn image(v: &NewVolume) -> Vec<u8> {
        let mut img = vec![0u8; v.area() as usize];
        img[..HEADER_LEN].copy_from_slice(&v.header);
        let (off, km) = &v.key_material;
        img[*off as usize..*off as usize + km.len()].copy_from_slice(km);
        img
    }

    fn reader(img: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<()> + '_ {
        move |off, buf| {
            buf.copy_from_slice(&img[off as usize..off as usize + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn create_then_unlock_with_the_passphrase_only() {
        for (m, iv, h) in [
            ("xts", "plain64", "sha256"),
            ("cbc", "essiv", "sha1"),
            ("cbc", "plain", "sha512"),
        ] {
            let v = create(&params(m, iv, h), b"secret").unwrap();
            let img = image(&v);
            let l = Luks::parse(&img, None).unwrap();
            assert_eq!(l.spec, v.luks.spec);
            let c = l.unlock(b"secret", &mut reader(&img)).unwrap();
            let mut a = vec![3u8; 4096];
            let mut b = a.clone();
            c.encrypt(9, &mut a).unwrap();
            v.cipher.encrypt(9, &mut b).unwrap();
            assert_eq!(a, b);
            let e = l.unlock(b"wrong", &mut reader(&img)).unwrap_err();
            assert_eq!(e.to_string(), "Invalid password, cannot unlock any keyslot");
        }
    }

    #[test]
    fn layout_is_qemus() {
        // aes-256-xts: 64-byte keys, 4000 stripes = 256000 bytes -> 504 sectors a slot.
        let p = CreateParams {
            iter_time_ms: 1,
            ..CreateParams::default()
        };
        let v = create(&p, b"x").unwrap();
        let h = &v.luks.header;
        assert_eq!(h.cipher_mode, "xts-plain64");
        assert_eq!(h.key_bytes, 64);
        assert_eq!(
            h.slots.iter().map(|s| s.key_offset).collect::<Vec<_>>(),
            (0..8).map(|i| 8 + i * 504).collect::<Vec<_>>()
        );
        assert_eq!(v.area(), 2068480);
        assert!(h.slots[0].iterations >= 1000 && h.mk_iterations >= 1000);
    }

    #[test]
    fn hostile_headers_are_refused_quickly() {
        let v = create(&params("xts", "plain64", "sha256"), b"pw").unwrap();
        let img = image(&v);
        let slot0 = 208;
        let set = |at: usize, val: u32| {
            let mut x = img.clone();
            x[at..at + 4].copy_from_slice(&val.to_be_bytes());
            Luks::parse(&x, None).unwrap_err()
        };
        assert!(matches!(
            set(slot0 + 4, u32::MAX),
            CryptoError::TooLarge {
                field: HeaderField::SlotIterations(0),
                ..
            }
        ));
        assert!(matches!(
            set(slot0 + 4, 0),
            CryptoError::BadHeader {
                field: HeaderField::SlotIterations(0),
                ..
            }
        ));
        assert!(matches!(
            set(164, u32::MAX),
            CryptoError::TooLarge {
                field: HeaderField::MasterKeyIterations,
                ..
            }
        ));
        assert!(matches!(
            set(slot0 + 44, u32::MAX),
            CryptoError::TooLarge {
                field: HeaderField::SlotStripes(0),
                ..
            }
        ));
        assert!(matches!(
            set(slot0 + 44, 0),
            CryptoError::BadHeader {
                field: HeaderField::SlotStripes(0),
                ..
            }
        ));
        // Key material before the end of the header, or past the header area.
        assert!(matches!(
            set(slot0 + 40, 1),
            CryptoError::BadHeader {
                field: HeaderField::SlotKeyOffset(0),
                ..
            }
        ));
        assert!(matches!(
            set(slot0 + 40, u32::MAX),
            CryptoError::BadHeader {
                field: HeaderField::SlotKeyOffset(0),
                ..
            }
        ));
        // A payload offset inside the key material.
        assert!(matches!(
            set(104, 16),
            CryptoError::BadHeader {
                field: HeaderField::SlotKeyOffset(0),
                ..
            }
        ));
        // Key sizes and names no cipher has.
        assert!(matches!(set(108, 40), CryptoError::CipherSize { .. }));
        let mut x = img.clone();
        x[40..72].fill(0);
        x[40..48].copy_from_slice(b"xts-nope");
        assert_eq!(
            Luks::parse(&x, None).unwrap_err(),
            CryptoError::IvGen("nope".into())
        );
        let mut x = img.clone();
        x[40..72].fill(0);
        x[40..43].copy_from_slice(b"xts");
        assert_eq!(
            Luks::parse(&x, None).unwrap_err(),
            CryptoError::ModeFormat("xts".into())
        );
        // Truncated key material: the read fails, naming no key.
        let l = Luks::parse(&img, None).unwrap();
        let short = &img[..8192];
        let e = l
            .unlock(b"pw", &mut |off, buf: &mut [u8]| {
                let end = off as usize + buf.len();
                if end > short.len() {
                    return Err(crate::error::Invalid::NeedsSize.into());
                }
                buf.copy_from_slice(&short[off as usize..end]);
                Ok(())
            })
            .unwrap_err();
        assert!(!e.to_string().contains("pw"));
    }

    #[test]
    fn info_lists_slots() {
        let v = create(&params("cbc", "essiv", "sha256"), b"pw").unwrap();
        let i = v.luks.info();
        assert_eq!(i.cipher_alg, "aes-128");
        assert_eq!(i.ivgen_hash_alg, Some("sha256"));
        assert_eq!(i.slots.len(), 8);
        assert!(i.slots[0].active && i.slots[0].stripes == Some(4000));
        assert_eq!(i.slots[1].iters, None);
    }
}
