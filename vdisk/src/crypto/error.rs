//! What goes wrong unlocking, creating or reading an encrypted volume. Messages follow
//! QEMU's wording where qemu-img prints one; none holds key material.

/// A LUKS header field, for [`CryptoError::BadHeader`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderField {
    /// `key_bytes`.
    KeyBytes,
    /// `payload_offset`.
    PayloadOffset,
    /// The master-key digest iterations.
    MasterKeyIterations,
    /// A key slot's `active` word.
    SlotState(usize),
    /// A key slot's iteration count.
    SlotIterations(usize),
    /// A key slot's anti-forensic stripe count.
    SlotStripes(usize),
    /// A key slot's key material offset (and its extent).
    SlotKeyOffset(usize),
    /// A string field that is not NUL-terminated text.
    Text(&'static str),
}

impl std::fmt::Display for HeaderField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderField::KeyBytes => write!(f, "key bytes"),
            HeaderField::PayloadOffset => write!(f, "payload offset"),
            HeaderField::MasterKeyIterations => write!(f, "master key iterations"),
            HeaderField::SlotState(i) => write!(f, "key slot {i} state"),
            HeaderField::SlotIterations(i) => write!(f, "key slot {i} iterations"),
            HeaderField::SlotStripes(i) => write!(f, "key slot {i} stripes"),
            HeaderField::SlotKeyOffset(i) => write!(f, "key slot {i} key material offset"),
            HeaderField::Text(n) => write!(f, "{n}"),
        }
    }
}

/// QEMU's spelling of a cipher family in messages.
fn family_title(f: &str) -> &'static str {
    match f {
        "serpent" => "Serpent",
        "twofish" => "Twofish",
        _ => "AES",
    }
}

/// An encryption failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The image is encrypted and no key secret was named (QEMU's wording, with the
    /// option's prefix: `encrypt.` for qcow2).
    #[error("Parameter '{0}key-secret' is required for cipher")]
    NoKeySecret(&'static str),
    /// No `--object secret` with this id.
    #[error("No secret with id '{0}'")]
    UnknownSecret(String),
    /// A secret defined twice.
    #[error("attempt to add duplicate property '{0}' to object (type 'container')")]
    DuplicateSecret(String),
    /// A secret that must be text is not UTF-8.
    #[error("Data from secret {0} is not valid UTF-8")]
    SecretNotUtf8(String),
    /// A bad `--object` definition.
    #[error("{0}")]
    BadObject(String),
    /// No key slot opens with the passphrase.
    #[error("Invalid password, cannot unlock any keyslot")]
    BadPassword,
    /// The volume does not start with the LUKS magic.
    #[error("Volume is not in LUKS format")]
    NotLuks,
    /// Not LUKS version 1.
    #[error("LUKS version {0} is not supported")]
    Version(u16),
    /// A cipher name/key size pair QEMU does not support either.
    #[error("Algorithm {name} with key size {key_bytes} bytes not supported")]
    CipherSize {
        /// The header's cipher name.
        name: String,
        /// The key size per cipher (half of `key_bytes` for XTS).
        key_bytes: u32,
    },
    /// An unknown or unsupported cipher algorithm (`cipher-alg`).
    #[error("Cipher algorithm '{0}' not supported")]
    CipherAlg(String),
    /// An unknown or unsupported cipher mode.
    #[error("Cipher mode {0} not supported")]
    CipherMode(String),
    /// An unknown hash algorithm.
    #[error("Hash algorithm {0} not supported")]
    Hash(String),
    /// An unknown IV generator.
    #[error("IV generator {0} not supported")]
    IvGen(String),
    /// The cipher-mode string lacks `-ivgen`.
    #[error("Unexpected cipher mode string format {0}")]
    ModeFormat(String),
    /// essiv without a hash.
    #[error("Missing IV generator hash specification")]
    EssivNoHash,
    /// essiv's hash gives a key size no cipher of the family has.
    #[error("No {title} cipher with key size {len} available", title = family_title(.0), len = .1)]
    EssivKeySize(&'static str, usize),
    /// A cipher essiv cannot use (CAST5 with a hash of another length).
    #[error("Cipher {0} not supported with essiv")]
    EssivCipher(&'static str),
    /// A mode the cipher has not (XTS needs 16-byte blocks).
    #[error("Unsupported cipher mode {0}")]
    ModeUnsupported(&'static str),
    /// A header field out of its range (hostile or damaged header).
    #[error("LUKS header {field} is invalid ({value})")]
    BadHeader {
        /// Which field.
        field: HeaderField,
        /// Its value.
        value: u64,
    },
    /// A header field bigger than vdisk agrees to work through (iteration counts that
    /// would take hours, stripes that would take gigabytes).
    #[error("LUKS header {field} {value} exceeds the limit {limit}")]
    TooLarge {
        /// Which field.
        field: HeaderField,
        /// Its value.
        value: u64,
        /// The bound.
        limit: u64,
    },
    /// The header is shorter than a LUKS header.
    #[error("LUKS header truncated: {got} bytes, need {need}")]
    Truncated {
        /// Bytes there.
        got: u64,
        /// Bytes needed.
        need: u64,
    },
    /// A request not in whole encryption sectors.
    #[error("encrypted I/O at {offset}+{len} is not a multiple of {sector} bytes")]
    Unaligned {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The sector size.
        sector: u64,
    },
    /// A bad creation option value.
    #[error("{0}")]
    Option(String),
    /// The system's random source failed.
    #[error("Unable to read random bytes: {0}")]
    Random(String),
}

impl CryptoError {
    /// The errno QEMU reports for it.
    pub fn errno(&self) -> i32 {
        match self {
            CryptoError::BadPassword => libc::EACCES,
            CryptoError::Version(_)
            | CryptoError::CipherSize { .. }
            | CryptoError::CipherAlg(_)
            | CryptoError::CipherMode(_)
            | CryptoError::Hash(_)
            | CryptoError::IvGen(_)
            | CryptoError::EssivKeySize(..)
            | CryptoError::EssivCipher(_)
            | CryptoError::ModeUnsupported(_) => libc::ENOTSUP,
            CryptoError::Random(_) => libc::EIO,
            _ => libc::EINVAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wording() {
        assert_eq!(
            CryptoError::BadPassword.to_string(),
            "Invalid password, cannot unlock any keyslot"
        );
        assert_eq!(
            CryptoError::NoKeySecret("encrypt.").to_string(),
            "Parameter 'encrypt.key-secret' is required for cipher"
        );
        assert_eq!(
            CryptoError::TooLarge {
                field: HeaderField::SlotIterations(3),
                value: 4_000_000_000,
                limit: 1 << 24
            }
            .to_string(),
            "LUKS header key slot 3 iterations 4000000000 exceeds the limit 16777216"
        );
        assert_eq!(CryptoError::BadPassword.errno(), libc::EACCES);
    }
}
