//! The LUKS anti-forensic information splitter (LUKS1 spec §2.4): key material is
//! spread over `stripes` blocks so that destroying any one block destroys the key.

use super::HashAlg;
use zeroize::Zeroizing;

/// The diffusion function H: each digest-sized piece `j` of `block` becomes
/// `hash(be32(j) || piece)`, cut to the piece's length.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let n = hash.digest_len();
    for (j, piece) in block.chunks_mut(n).enumerate() {
        let d = Zeroizing::new(hash.digest(&[&(j as u32).to_be_bytes(), piece]));
        let len = piece.len();
        piece.copy_from_slice(&d[..len]);
    }
}

/// Splits `key` into `stripes` blocks of `key.len()` bytes; `random` fills the first
/// `stripes - 1` blocks. `stripes` must be at least 1.
pub fn split(
    hash: HashAlg,
    key: &[u8],
    stripes: usize,
    random: impl FnOnce(&mut [u8]),
) -> Zeroizing<Vec<u8>> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    random(&mut out[..n * (stripes - 1)]);
    let mut d = Zeroizing::new(vec![0u8; n]);
    for i in 0..stripes - 1 {
        for (a, b) in d.iter_mut().zip(&out[i * n..(i + 1) * n]) {
            *a ^= b;
        }
        diffuse(hash, &mut d);
    }
    for ((o, a), b) in out[(stripes - 1) * n..].iter_mut().zip(d.iter()).zip(key) {
        *o = a ^ b;
    }
    out
}

/// Joins `stripes` blocks of `key_len` bytes back into the key.
pub fn merge(hash: HashAlg, split: &[u8], key_len: usize, stripes: usize) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    for i in 0..stripes - 1 {
        for (a, b) in d.iter_mut().zip(&split[i * key_len..(i + 1) * key_len]) {
            *a ^= b;
        }
        diffuse(hash, &mut d);
    }
    for (a, b) in d.iter_mut().zip(&split[(stripes - 1) * key_len..]) {
        *a ^= b;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_is_the_key() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            for len in [16usize, 32, 48, 64] {
                let key: Vec<u8> = (0..len as u8).collect();
                let mut seed = 7u8;
                let s = split(hash, &key, 4000, |b| {
                    b.iter_mut().for_each(|x| {
                        seed = seed.wrapping_mul(31).wrapping_add(11);
                        *x = seed
                    })
                });
                assert_eq!(s.len(), len * 4000);
                assert_eq!(&merge(hash, &s, len, 4000)[..], &key[..]);
                let mut bad = s.clone();
                bad[5] ^= 1;
                assert_ne!(&merge(hash, &bad, len, 4000)[..], &key[..]);
            }
        }
    }

    #[test]
    fn one_stripe_is_the_key_itself() {
        let key = [9u8; 32];
        let s = split(HashAlg::Sha256, &key, 1, |_| {});
        assert_eq!(&s[..], &key[..]);
    }

    #[test]
    fn diffuse_is_hash_of_index_and_piece() {
        // 40 bytes with sha256: one 32-byte piece and one 8-byte piece.
        let mut b = [1u8; 40];
        diffuse(HashAlg::Sha256, &mut b);
        let h0 = HashAlg::Sha256.digest(&[&[0, 0, 0, 0], &[1u8; 32]]);
        let h1 = HashAlg::Sha256.digest(&[&[0, 0, 0, 1], &[1u8; 8]]);
        assert_eq!(&b[..32], &h0[..]);
        assert_eq!(&b[32..], &h1[..8]);
    }
}
