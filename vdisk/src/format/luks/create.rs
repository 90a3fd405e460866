//! Creating a raw LUKS volume: a new header with slot 0 keyed by the `key-secret`
//! passphrase, the payload area sized to the guest size (sparse: unwritten sectors read
//! as the decryption of zeroes, as with QEMU).

use crate::crypto::luks::{self, CreateParams};
use crate::crypto::{secret, CryptoError};
use crate::error::{Invalid, Result};
use crate::format::options::OptionValues;
use crate::format::registry::CreateArgs;
use crate::storage::Storage;
use std::sync::Arc;

/// Reads the LUKS creation parameters from option values whose keys are `prefix` +
/// QEMU's names (`encrypt.` for qcow2, empty for raw LUKS).
pub(crate) fn params(o: &OptionValues, prefix: &str) -> Result<CreateParams> {
    let k = |n: &str| format!("{prefix}{n}");
    let iter = o.number(&k("iter-time"));
    if iter == Some(0) {
        return Err(CryptoError::Option(format!("{}iter-time must be at least 1", prefix)).into());
    }
    Ok(CreateParams::from_options(
        o.str(&k("cipher-alg")),
        o.str(&k("cipher-mode")),
        o.str(&k("ivgen-alg")),
        o.str(&k("ivgen-hash-alg")),
        o.str(&k("hash-alg")),
        iter,
    )?)
}

/// Writes a new LUKS header area at `at` on `storage`; returns the new volume.
pub(crate) fn write_volume(
    storage: &dyn Storage,
    at: u64,
    params: &CreateParams,
    key_secret: Option<&str>,
    prefix: &'static str,
) -> Result<luks::NewVolume> {
    let s = secret::key_secret(key_secret, prefix)?;
    let v = luks::create(params, s.passphrase()?)?;
    storage.write_at(&v.header, at)?;
    let (off, km) = &v.key_material;
    storage.write_at(km, at + off)?;
    Ok(v)
}

/// `create` for `-f luks`.
pub fn create(storage: &Arc<dyn Storage>, args: &CreateArgs) -> Result<()> {
    let o = &args.options;
    if args.backing.is_some() {
        return Err(Invalid::BackingNotSupported("luks").into());
    }
    if o.is_set("detached-header") {
        return Err(CryptoError::Option("Parameter 'detached-header' is unexpected".into()).into());
    }
    let p = params(o, "")?;
    let v = write_volume(&**storage, 0, &p, o.str("key-secret"), "")?;
    storage.set_len(v.area() + args.size)?;
    storage.flush()?;
    Ok(())
}
