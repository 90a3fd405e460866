//! Encrypted qcow2 images (qcow2 spec, "Full disk encryption header pointer" and
//! `crypt_method`):
//! - `crypt_method` 2, LUKS: the header extension `0x0537be77` points at a LUKS1 header
//!   area inside the image (offset and length, cluster-aligned offset); its clusters are
//!   refcounted like any metadata (`check` counts them). Data clusters are encrypted in
//!   512-byte sectors whose IV is the **host** offset's sector (QEMU's
//!   `crypt_physical_offset`).
//! - `crypt_method` 1, the legacy AES scheme: AES-128-CBC with plain64 IVs from the
//!   **guest** offset, the key being the passphrase's first 16 bytes (zero-padded).
//!
//! Compressed clusters are never written in an encrypted image (as QEMU, which refuses
//! compression and encryption together).

use super::header::{Header, EXT_CRYPTO};
use super::Qcow2;
use crate::crypto::luks::{Luks, HEADER_LEN};
use crate::crypto::{
    secret, CipherAlg, CipherMode, CipherSpec, CryptoError, DataCipher, IvGenAlg, IvOffset,
    SectorCipher,
};
use crate::error::{Corruption, Problem, Result, Structure, Unsupported};
use crate::format::options::OptionValues;
use crate::format::{DriverOptions, EncryptionInfo};
use crate::storage::Storage;
use zeroize::Zeroizing;

/// `crypt_method`: not encrypted.
pub const CRYPT_NONE: u32 = 0;
/// `crypt_method`: legacy AES.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method`: LUKS.
pub const CRYPT_LUKS: u32 = 2;
/// The QEMU prefix of the encryption options.
const PREFIX: &str = "encrypt.";

/// An open image's encryption.
#[derive(Debug)]
pub(crate) struct Encryption {
    /// The data cipher (`None`: opened without a key, for metadata only).
    pub data: Option<DataCipher>,
    /// The scheme.
    pub kind: Kind,
    /// The id of the secret the image was opened with (`amend` adding a key slot
    /// recovers the master key with it).
    pub key_secret: Option<String>,
}

/// An image's encryption scheme (one per image: the size difference does not matter).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Kind {
    /// Legacy AES.
    Aes,
    /// LUKS: the header area's offset in the image file and the header (`amend`
    /// changes its key slots).
    Luks {
        /// Offset of the header area.
        at: u64,
        /// The header.
        luks: std::sync::Mutex<Luks>,
    },
}

impl Encryption {
    /// What `info` shows.
    pub fn info(&self) -> EncryptionInfo {
        match &self.kind {
            Kind::Aes => EncryptionInfo::Aes,
            Kind::Luks { luks, .. } => {
                EncryptionInfo::Luks(luks.lock().unwrap_or_else(|p| p.into_inner()).info())
            }
        }
    }
}

/// Decodes the encryption header extension: (offset, length) of the LUKS area.
pub(crate) fn extent(h: &Header) -> Result<Option<(u64, u64)>> {
    let Some((_, d)) = h.other_exts.iter().find(|(t, _)| *t == EXT_CRYPTO) else {
        return Ok(None);
    };
    if d.len() != 16 {
        return Err(bad(
            0,
            Problem::Truncated {
                have: Some(d.len() as u64),
                need: 16,
            },
        ));
    }
    let off = u64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8]));
    let len = u64::from_be_bytes(d[8..].try_into().unwrap_or([0; 8]));
    Ok(Some((off, len)))
}

fn bad(off: u64, p: Problem) -> crate::error::Error {
    Corruption::new(Structure::CryptoHeader, p).at(off).into()
}

/// The extension's bytes.
pub(crate) fn encode_extent(off: u64, len: u64) -> Vec<u8> {
    [off.to_be_bytes(), len.to_be_bytes()].concat()
}

/// The legacy scheme's cipher from a passphrase.
fn aes_cipher(pass: &[u8]) -> Result<SectorCipher> {
    let mut key = Zeroizing::new([0u8; 16]);
    let n = pass.len().min(16);
    key[..n].copy_from_slice(&pass[..n]);
    Ok(SectorCipher::new(
        CipherSpec {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Cbc,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: None,
        },
        &key[..],
    )?)
}

/// Reads an image's encryption: the LUKS header (checked against the file), and the
/// key unless `opts.no_io`.
pub(crate) fn open(
    st: &dyn Storage,
    h: &Header,
    cs: u64,
    file_len: u64,
    opts: &DriverOptions,
) -> Result<Option<Encryption>> {
    let ext = extent(h)?;
    match h.crypt_method {
        CRYPT_NONE => Ok(None),
        CRYPT_AES => {
            let data = if opts.no_io {
                None
            } else {
                let s = secret::key_secret(opts.key_secret.as_deref(), PREFIX)?;
                Some(DataCipher::new(
                    aes_cipher(s.passphrase()?)?,
                    IvOffset::Guest,
                ))
            };
            Ok(Some(Encryption {
                data,
                kind: Kind::Aes,
                key_secret: opts.key_secret.clone(),
            }))
        }
        CRYPT_LUKS => {
            let (off, len) = ext.ok_or_else(|| bad(0, Problem::Missing))?;
            if off == 0 || !off.is_multiple_of(cs) {
                return Err(bad(off, Problem::Unaligned));
            }
            if len < HEADER_LEN as u64 || off.checked_add(len).is_none_or(|e| e > file_len) {
                return Err(bad(
                    off,
                    Problem::PastEnd {
                        bytes: len,
                        end: file_len,
                    },
                ));
            }
            let luks = crate::format::luks::read_header(st, off, Some(len))?;
            let data = if opts.no_io {
                None
            } else {
                let c = crate::format::luks::unlock(
                    st,
                    off,
                    &luks,
                    opts.key_secret.as_deref(),
                    PREFIX,
                )?;
                Some(DataCipher::new(c, IvOffset::Host))
            };
            Ok(Some(Encryption {
                data,
                kind: Kind::Luks {
                    at: off,
                    luks: std::sync::Mutex::new(luks),
                },
                key_secret: opts.key_secret.clone(),
            }))
        }
        m => Err(Unsupported::Encryption(m).into()),
    }
}

/// What `-o` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wanted {
    /// `encrypt.format=luks`.
    Luks,
    /// `encrypt.format=aes` or `encryption=on`.
    Aes,
}

/// Reads `encryption` / `encrypt.format` (QEMU refuses both together).
pub(crate) fn wanted(o: &OptionValues) -> Result<Option<Wanted>> {
    let legacy = o.bool("encryption").unwrap_or(false);
    match (o.str("encrypt.format"), legacy) {
        (Some(_), true) => Err(CryptoError::Option(
            "Options \"encryption\" and \"encrypt.format\" are mutually exclusive".into(),
        )
        .into()),
        (Some("luks"), _) => Ok(Some(Wanted::Luks)),
        (Some("aes"), _) | (None, true) => Ok(Some(Wanted::Aes)),
        (Some(f), _) => Err(CryptoError::Option(format!(
            "Parameter 'encrypt.format' does not accept value '{f}'"
        ))
        .into()),
        (None, false) => {
            if let Some(g) = o.given().iter().find(|g| g.desc.name.starts_with(PREFIX)) {
                return Err(CryptoError::Option(format!(
                    "Parameter '{}' is unexpected without encrypt.format",
                    g.desc.name
                ))
                .into());
            }
            Ok(None)
        }
    }
}

/// Checks the key secret before anything is written (QEMU's message when absent).
pub(crate) fn check_secret(o: &OptionValues) -> Result<()> {
    secret::key_secret(o.str("encrypt.key-secret"), PREFIX)?.passphrase()?;
    Ok(())
}

impl Qcow2 {
    /// `amend`'s key-slot options (`encrypt.state`, …) on the LUKS header area.
    pub(crate) fn amend_keys(&self, o: &OptionValues, force: bool) -> Result<()> {
        match &self.crypto {
            Some(Encryption {
                kind: Kind::Luks { at, luks },
                key_secret,
                ..
            }) => {
                let mut l = luks.lock().unwrap_or_else(|p| p.into_inner());
                crate::format::luks::amend_keys(
                    &*self.storage,
                    *at,
                    &mut l,
                    o,
                    PREFIX,
                    key_secret.as_deref(),
                    force,
                )
            }
            _ => Err(crate::error::Invalid::AmendEncryption.into()),
        }
    }

    /// Sets up encryption on a freshly created image (no data yet): for LUKS, the
    /// header area in newly allocated clusters and the extension pointing at it.
    pub(crate) fn set_up_encryption(&self, w: Wanted, o: &OptionValues) -> Result<()> {
        let mut m = self.lock();
        match w {
            Wanted::Aes => {
                check_secret(o)?;
                m.hdr.crypt_method = CRYPT_AES;
            }
            Wanted::Luks => {
                let p = crate::format::luks::create_params(o, PREFIX)?;
                let cs = self.g.cs;
                // The area's size depends only on the key size: reserve it first.
                let area = Luks::area_for(p.spec.key_len());
                let n = area.div_ceil(cs);
                let off = m.alloc(n)?;
                crate::format::luks::write_volume(
                    &*self.storage,
                    off,
                    &p,
                    o.str("encrypt.key-secret"),
                    PREFIX,
                )?;
                if self.storage.len()? < off + n * cs {
                    self.storage.set_len(off + n * cs)?;
                }
                m.writeback()?;
                m.flush_storages()?;
                m.hdr.crypt_method = CRYPT_LUKS;
                m.hdr
                    .other_exts
                    .push((EXT_CRYPTO, encode_extent(off, area)));
            }
        }
        m.write_header()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_round_trip() {
        let mut h = Header::parse(&minimal(), 1 << 20).unwrap();
        assert_eq!(extent(&h).unwrap(), None);
        h.other_exts
            .push((EXT_CRYPTO, encode_extent(0x40000, 2068480)));
        assert_eq!(extent(&h).unwrap(), Some((0x40000, 2068480)));
        h.other_exts[0].1.pop();
        assert!(extent(&h).is_err());
    }

    #[test]
    fn aes_key_is_the_padded_passphrase() {
        let a = aes_cipher(b"abc").unwrap();
        let b = aes_cipher(b"abc\0\0\0\0\0\0\0\0\0\0\0\0\0").unwrap();
        let mut x = [7u8; 512];
        let mut y = x;
        a.encrypt(3, &mut x).unwrap();
        b.encrypt(3, &mut y).unwrap();
        assert_eq!(x, y);
        // Only the first 16 bytes count.
        let c = aes_cipher(b"0123456789abcdefXYZ").unwrap();
        let d = aes_cipher(b"0123456789abcdef").unwrap();
        let mut x = [7u8; 512];
        let mut y = x;
        c.encrypt(0, &mut x).unwrap();
        d.encrypt(0, &mut y).unwrap();
        assert_eq!(x, y);
    }

    fn minimal() -> Vec<u8> {
        let mut b = vec![0u8; 104];
        b[..4].copy_from_slice(b"QFI\xfb");
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b.resize(65536, 0);
        b
    }
}
