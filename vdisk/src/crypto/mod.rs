//! Disk encryption as QEMU does it: LUKS1 volumes (the raw `luks` format and qcow2's
//! `encrypt.format=luks`), the legacy qcow2 AES scheme, and the secrets that unlock them.
//!
//! - [`secret`]: `--object secret,id=…` values, held zeroized, looked up by id;
//! - [`hash`]: the hash algorithms LUKS names, PBKDF2 over them;
//! - [`afsplit`]: the anti-forensic splitter of key material;
//! - [`cipher`]: sector ciphers (AES-128/192/256 in XTS or CBC) with their IV generators
//!   (plain, plain64, essiv), in parallel across cores for large buffers;
//! - [`luks`]: the LUKS1 header (decoded and encoded in one place), key slots, unlock,
//!   creation and the details `info` shows.
//!
//! Keys live in [`zeroize::Zeroizing`] buffers; no key or passphrase byte ever reaches a
//! log or an error message.

pub mod afsplit;
pub mod cipher;
pub mod error;
pub mod hash;
pub mod luks;
pub mod secret;

pub use cipher::{
    CipherAlg, CipherMode, CipherSpec, DataCipher, IvGenAlg, IvOffset, SectorCipher, SECTOR_SIZE,
};
pub use error::CryptoError;
pub use hash::HashAlg;
