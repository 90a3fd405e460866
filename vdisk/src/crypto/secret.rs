//! Secrets as QEMU takes them: `--object secret,id=ID,data=…|file=…[,format=raw|base64]`,
//! optionally encrypted (`keyid=MASTER,iv=…`: AES-256-CBC under another secret).
//!
//! Like QEMU's object tree, the secrets of a process live in one table: a front-end
//! defines them once (every subcommand parses `--object`), and images name them by id
//! (`encrypt.key-secret=ID` for qcow2, `key-secret=ID` for LUKS). Values are held in
//! zeroized buffers and never printed (`Debug` shows only the id).

use super::CryptoError;
use base64::Engine;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use zeroize::Zeroizing;

/// A secret's bytes.
#[derive(Clone)]
pub struct Secret {
    id: String,
    data: Arc<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({:?}, <redacted>)", self.id)
    }
}

impl Secret {
    /// A secret from bytes.
    pub fn new(id: &str, data: Vec<u8>) -> Secret {
        Secret {
            id: id.to_string(),
            data: Arc::new(Zeroizing::new(data)),
        }
    }
    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
    /// The bytes as a passphrase: UTF-8 (QEMU's `qcrypto_secret_lookup_as_utf8`), cut
    /// at the first NUL as QEMU's `strlen` does.
    pub fn passphrase(&self) -> Result<&[u8], CryptoError> {
        let b = self.bytes();
        std::str::from_utf8(b).map_err(|_| CryptoError::SecretNotUtf8(self.id.clone()))?;
        Ok(b.split(|&c| c == 0).next().unwrap_or(b))
    }
}

/// The passphrase secret an image names: `key_secret` from its options, `prefix` the
/// option's prefix in QEMU's "required" message (`encrypt.` for qcow2, empty for LUKS).
pub fn key_secret(key_secret: Option<&str>, prefix: &'static str) -> Result<Secret, CryptoError> {
    lookup(key_secret.ok_or(CryptoError::NoKeySecret(prefix))?)
}

fn table() -> &'static RwLock<HashMap<String, Secret>> {
    static T: OnceLock<RwLock<HashMap<String, Secret>>> = OnceLock::new();
    T.get_or_init(|| RwLock::new(HashMap::new()))
}

/// Adds a secret to the process's table; an id already defined is an error.
pub fn define(secret: Secret) -> Result<(), CryptoError> {
    let mut t = table().write().unwrap_or_else(|e| e.into_inner());
    if t.contains_key(secret.id()) {
        return Err(CryptoError::DuplicateSecret(secret.id.clone()));
    }
    t.insert(secret.id.clone(), secret);
    Ok(())
}

/// The secret with this id.
pub fn lookup(id: &str) -> Result<Secret, CryptoError> {
    table()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(id)
        .cloned()
        .ok_or_else(|| CryptoError::UnknownSecret(id.to_string()))
}

/// Parses one `--object` argument and, for `secret`, defines it. QEMU's syntax:
/// `secret,id=ID,data=STRING` or `secret,id=ID,file=PATH`, with `format=raw`
/// (default) or `format=base64`; `,,` is a literal comma in a value.
pub fn define_object(spec: &str) -> Result<(), CryptoError> {
    let pairs = split_opts(spec);
    let mut it = pairs.into_iter();
    let kind = match it.next() {
        Some((k, None)) => k,
        Some((k, Some(v))) if k == "qom-type" => v,
        _ => {
            return Err(CryptoError::BadObject(
                "Parameter 'qom-type' is missing".into(),
            ))
        }
    };
    if kind != "secret" {
        return Err(CryptoError::BadObject(format!(
            "invalid object type: {kind}"
        )));
    }
    let (mut id, mut data, mut file, mut format) = (None, None, None, None);
    let (mut keyid, mut iv) = (None, None);
    for (k, v) in it {
        let v = v.ok_or_else(|| CryptoError::BadObject(format!("Invalid parameter '{k}'")))?;
        match k.as_str() {
            "id" => id = Some(v),
            "data" => data = Some(v),
            "file" => file = Some(v),
            "format" => format = Some(v),
            "keyid" => keyid = Some(v),
            "iv" => iv = Some(v),
            _ => {
                return Err(CryptoError::BadObject(format!(
                    "Property 'secret.{k}' not found"
                )))
            }
        }
    }
    let id = id.ok_or_else(|| CryptoError::BadObject("Parameter 'id' is missing".into()))?;
    let raw = match (data, file) {
        (Some(d), None) => Zeroizing::new(d.into_bytes()),
        (None, Some(f)) => Zeroizing::new(
            std::fs::read(&f)
                .map_err(|e| CryptoError::BadObject(format!("Unable to read {f}: {e}")))?,
        ),
        (Some(_), Some(_)) => {
            return Err(CryptoError::BadObject(
                "'data' and 'file' are mutually exclusive".into(),
            ))
        }
        (None, None) => {
            return Err(CryptoError::BadObject(
                "Either 'data' or 'file' must be provided".into(),
            ))
        }
    };
    let base64 = match format.as_deref() {
        None | Some("raw") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(CryptoError::BadObject(format!(
                "Parameter 'format' does not accept value '{other}'"
            )))
        }
    };
    let bytes = match keyid {
        Some(k) => decrypt(&k, iv.as_deref(), &raw, base64)?,
        None if base64 => Zeroizing::new(b64(&raw)?),
        None => raw,
    };
    define(Secret::new(&id, bytes.to_vec()))
}

fn b64(data: &[u8]) -> Result<Vec<u8>, CryptoError> {
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| CryptoError::BadObject("Invalid base64 data".into()))
}

/// An encrypted secret (`keyid=MASTER,iv=B64`): `data` (base64-decoded first with
/// `format=base64`) is AES-256-CBC ciphertext under the 32-byte secret `keyid` names,
/// with PKCS#7 padding, as QEMU's `qcrypto_secret_decrypt` reads it (its checks and
/// messages, in its order).
fn decrypt(
    keyid: &str,
    iv: Option<&str>,
    input: &[u8],
    base64: bool,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    use aes::cipher::{generic_array::GenericArray, BlockDecryptMut, KeyIvInit};
    let key = lookup(keyid)?;
    if key.bytes().len() != 32 {
        return Err(CryptoError::BadObject(
            "Key should be 32 bytes in length".into(),
        ));
    }
    let iv = iv.ok_or_else(|| CryptoError::BadObject("IV is required to decrypt secret".into()))?;
    let iv = b64(iv.as_bytes())?;
    if iv.len() != 16 {
        return Err(CryptoError::BadObject(format!(
            "IV should be 16 bytes in length not {}",
            iv.len()
        )));
    }
    let mut text = Zeroizing::new(if base64 { b64(input)? } else { input.to_vec() });
    if !text.len().is_multiple_of(16) {
        return Err(CryptoError::BadObject(format!(
            "Length {} must be a multiple of block size 16",
            text.len()
        )));
    }
    let mut d = cbc::Decryptor::<aes::Aes256>::new(
        GenericArray::from_slice(key.bytes()),
        GenericArray::from_slice(&iv),
    );
    for b in text.chunks_exact_mut(16) {
        d.decrypt_block_mut(GenericArray::from_mut_slice(b));
    }
    // QEMU reads the last byte as the padding length (an empty ciphertext, which it
    // would read before its buffer, is refused here).
    let pad = text.last().copied().unwrap_or(0) as usize;
    if text.is_empty() || pad > 16 || pad > text.len() {
        return Err(CryptoError::BadObject(format!(
            "Incorrect number of padding bytes ({pad}) found on decrypted data"
        )));
    }
    let n = text.len() - pad;
    text.truncate(n);
    Ok(text)
}

/// QEMU's option-string splitting: `key=value` pairs at `,`, `,,` escaping a comma.
/// A bare word has no value.
pub(crate) fn split_opts(s: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), Some(v.to_string()))),
            None => out.push((p, None)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_define_secrets() {
        define_object("secret,id=t-raw,data=pa,,ss").unwrap();
        assert_eq!(lookup("t-raw").unwrap().bytes(), b"pa,ss");
        define_object("secret,id=t-b64,data=aGVsbG8=,format=base64").unwrap();
        assert_eq!(lookup("t-b64").unwrap().passphrase().unwrap(), b"hello");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, b"from-file\n").unwrap();
        define_object(&format!("secret,id=t-file,file={}", f.display())).unwrap();
        // The file's bytes as they are (QEMU keeps a trailing newline too).
        assert_eq!(lookup("t-file").unwrap().bytes(), b"from-file\n");
        assert_eq!(
            define_object("secret,id=t-raw,data=x").unwrap_err(),
            CryptoError::DuplicateSecret("t-raw".into())
        );
        assert_eq!(
            lookup("nope").unwrap_err().to_string(),
            "No secret with id 'nope'"
        );
        assert!(define_object("secret,id=t-x").is_err());
        assert!(define_object("secret,data=x").is_err());
        assert!(define_object("iothread,id=x").is_err());
        assert!(define_object("secret,id=t-y,data=x,format=hex").is_err());
        let s = lookup("t-raw").unwrap();
        assert!(!format!("{s:?}").contains("pa"));
    }

    #[test]
    fn passphrases_are_utf8_up_to_a_nul() {
        assert_eq!(
            Secret::new("a", b"ab\0cd".to_vec()).passphrase().unwrap(),
            b"ab"
        );
        assert!(Secret::new("a", vec![0xff]).passphrase().is_err());
    }
}
