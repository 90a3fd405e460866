//! The LUKS1 on-disk header (592 bytes, big-endian; LUKS1 spec §2.4, QEMU's
//! `QCryptoBlockLUKSHeader`): decoded and encoded here only.

use crate::crypto::error::HeaderField;
use crate::crypto::CryptoError;

/// `LUKS\xba\xbe`.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Header bytes.
pub const HEADER_LEN: usize = 592;
/// Key slots.
pub const NUM_SLOTS: usize = 8;
/// A key slot's `active` word when enabled.
pub const SLOT_ENABLED: u32 = 0x00AC_71F3;
/// A key slot's `active` word when disabled.
pub const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Length of the master-key digest.
pub const DIGEST_LEN: usize = 20;
/// Length of salts.
pub const SALT_LEN: usize = 32;
/// Length of the UUID text field.
pub const UUID_LEN: usize = 40;
const NAME_LEN: usize = 32;
const SLOT_BASE: usize = 208;
const SLOT_LEN: usize = 48;

/// One key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// Enabled ([`SLOT_ENABLED`]) or not.
    pub active: bool,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// First sector (512 bytes) of the key material.
    pub key_offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// The header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher name (`aes`).
    pub cipher_name: String,
    /// Cipher mode spec (`xts-plain64`, `cbc-essiv:sha256`).
    pub cipher_mode: String,
    /// Hash (`sha256`).
    pub hash_spec: String,
    /// Start of the payload in 512-byte sectors.
    pub payload_offset: u32,
    /// Master key length.
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub mk_salt: [u8; SALT_LEN],
    /// Its iterations.
    pub mk_iterations: u32,
    /// UUID text.
    pub uuid: String,
    /// The key slots.
    pub slots: [KeySlot; NUM_SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn text(b: &[u8], name: &'static str) -> Result<String, CryptoError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(CryptoError::BadHeader {
            field: HeaderField::Text(name),
            value: b.len() as u64,
        })?;
    std::str::from_utf8(&b[..end])
        .map(str::to_string)
        .map_err(|_| CryptoError::BadHeader {
            field: HeaderField::Text(name),
            value: end as u64,
        })
}

fn put_text(out: &mut [u8], s: &str) {
    // Callers keep names shorter than the field (one NUL at least).
    let n = s.len().min(out.len() - 1);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl LuksHeader {
    /// Decodes the first [`HEADER_LEN`] bytes of `b`.
    pub fn decode(b: &[u8]) -> Result<LuksHeader, CryptoError> {
        if b.len() < HEADER_LEN {
            return Err(CryptoError::Truncated {
                got: b.len() as u64,
                need: HEADER_LEN as u64,
            });
        }
        if b[..6] != MAGIC {
            return Err(CryptoError::NotLuks);
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(CryptoError::Version(version));
        }
        let mut slots = Vec::with_capacity(NUM_SLOTS);
        for i in 0..NUM_SLOTS {
            let s = &b[SLOT_BASE + i * SLOT_LEN..SLOT_BASE + (i + 1) * SLOT_LEN];
            let state = be32(s, 0);
            let active = match state {
                SLOT_ENABLED => true,
                SLOT_DISABLED => false,
                v => {
                    return Err(CryptoError::BadHeader {
                        field: HeaderField::SlotState(i),
                        value: v as u64,
                    })
                }
            };
            slots.push(KeySlot {
                active,
                iterations: be32(s, 4),
                salt: s[8..40].try_into().unwrap_or([0; SALT_LEN]),
                key_offset: be32(s, 40),
                stripes: be32(s, 44),
            });
        }
        Ok(LuksHeader {
            cipher_name: text(&b[8..40], "cipher name")?,
            cipher_mode: text(&b[40..72], "cipher mode")?,
            hash_spec: text(&b[72..104], "hash spec")?,
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest: b[112..132].try_into().unwrap_or([0; DIGEST_LEN]),
            mk_salt: b[132..164].try_into().unwrap_or([0; SALT_LEN]),
            mk_iterations: be32(b, 164),
            uuid: text(&b[168..208], "uuid")?,
            slots: slots.try_into().map_err(|_| CryptoError::NotLuks)?,
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b[8..40], &self.cipher_name);
        put_text(&mut b[40..72], &self.cipher_mode);
        put_text(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        put_text(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = SLOT_BASE + i * SLOT_LEN;
            let state = if s.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }
}

/// Longest name a header text field holds (one byte stays NUL).
pub const MAX_NAME: usize = NAME_LEN - 1;

#[cfg(test)]
mod tests {
    use super::*;

    /// A header as qemu-img 10 writes it for `-f luks -o iter-time=10` (first slot
    /// active), built by hand.
    fn sample() -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..8].copy_from_slice(b"LUKS\xba\xbe\0\x01");
        b[8..11].copy_from_slice(b"aes");
        b[40..51].copy_from_slice(b"xts-plain64");
        b[72..78].copy_from_slice(b"sha256");
        b[104..108].copy_from_slice(&0x0fc8u32.to_be_bytes());
        b[108..112].copy_from_slice(&64u32.to_be_bytes());
        b[112..132].fill(0xd1);
        b[132..164].fill(0x5a);
        b[164..168].copy_from_slice(&0x266cu32.to_be_bytes());
        b[168..204].copy_from_slice(b"2feff03f-f6f6-465b-9718-85745c433b0a");
        for i in 0..8 {
            let o = 208 + i * 48;
            let state: u32 = if i == 0 { 0x00ac71f3 } else { 0xdead };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            if i == 0 {
                b[o + 4..o + 8].copy_from_slice(&0x9d71u32.to_be_bytes());
                b[o + 8..o + 40].fill(0x22);
            }
            b[o + 40..o + 44].copy_from_slice(&(8 + i as u32 * 0x1f8).to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&4000u32.to_be_bytes());
        }
        b
    }

    #[test]
    fn decodes_and_encodes_bit_exact() {
        let b = sample();
        let h = LuksHeader::decode(&b).unwrap();
        assert_eq!(h.cipher_name, "aes");
        assert_eq!(h.cipher_mode, "xts-plain64");
        assert_eq!(h.hash_spec, "sha256");
        assert_eq!(h.payload_offset, 4040);
        assert_eq!(h.key_bytes, 64);
        assert_eq!(h.mk_iterations, 9836);
        assert_eq!(h.uuid, "2feff03f-f6f6-465b-9718-85745c433b0a");
        assert!(h.slots[0].active && !h.slots[1].active);
        assert_eq!(h.slots[0].iterations, 40305);
        assert_eq!(h.slots[7].key_offset, 8 + 7 * 504);
        assert_eq!(&h.encode()[..], &b[..]);
    }

    #[test]
    fn refuses_bad_magic_version_length_state_and_text() {
        let b = sample();
        assert!(matches!(
            LuksHeader::decode(&b[..591]),
            Err(CryptoError::Truncated {
                got: 591,
                need: 592
            })
        ));
        let mut x = b.clone();
        x[0] = b'X';
        assert_eq!(LuksHeader::decode(&x), Err(CryptoError::NotLuks));
        let mut x = b.clone();
        x[7] = 2;
        assert_eq!(LuksHeader::decode(&x), Err(CryptoError::Version(2)));
        let mut x = b.clone();
        x[208 + 48 * 3..208 + 48 * 3 + 4].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            LuksHeader::decode(&x),
            Err(CryptoError::BadHeader {
                field: HeaderField::SlotState(3),
                value: 7
            })
        );
        let mut x = b;
        x[8..40].fill(b'a');
        assert!(matches!(
            LuksHeader::decode(&x),
            Err(CryptoError::BadHeader {
                field: HeaderField::Text("cipher name"),
                ..
            })
        ));
    }
}
