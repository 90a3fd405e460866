//! `amend` of a LUKS header area's key slots, for raw volumes and qcow2's
//! `encrypt.format=luks`: the options read (QEMU's `QCryptoBlockAmendOptionsLUKS`
//! names, with `encrypt.` before them in qcow2) and the header area reached on the
//! image's storage. The rules and the write order are
//! [`crate::crypto::luks::amend`]'s.

use crate::crypto::luks::amend::{HeaderArea, KeyAmend, SlotState};
use crate::crypto::luks::Luks;
use crate::crypto::CryptoError;
use crate::error::Result;
use crate::format::options::OptionValues;
use crate::storage::Storage;

/// The header area at `at` on a storage.
pub(crate) struct Area<'a> {
    /// The image's file.
    pub storage: &'a dyn Storage,
    /// Where the LUKS header starts.
    pub at: u64,
}

impl HeaderArea for Area<'_> {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self.storage.read_at(buf, self.at + offset)?)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        Ok(self.storage.write_at(buf, self.at + offset)?)
    }
    fn flush(&self) -> Result<()> {
        Ok(self.storage.flush()?)
    }
}

/// Reads the key-slot request from amend options named `prefix` + QEMU's names,
/// checked as QEMU's QAPI visitor checks them (`state` first).
pub(crate) fn request(o: &OptionValues, prefix: &str) -> Result<KeyAmend> {
    let k = |n: &str| format!("{prefix}{n}");
    let state = match o.str(&k("state")) {
        None => return Err(CryptoError::Option("Parameter 'state' is missing".into()).into()),
        Some("active") => SlotState::Active,
        Some("inactive") => SlotState::Inactive,
        Some(v) => {
            return Err(CryptoError::Option(format!(
                "Parameter 'state' does not accept value '{v}'"
            ))
            .into())
        }
    };
    let keyslot = match o.given().iter().find(|g| g.desc.name == k("keyslot")) {
        // The value passed the number check; QAPI reads it again as a signed int.
        Some(g) => Some(
            g.raw
                .parse::<i64>()
                .map_err(|_| CryptoError::Option("Parameter 'keyslot' expects integer".into()))?,
        ),
        None => None,
    };
    Ok(KeyAmend {
        state,
        keyslot,
        new_secret: o.str(&k("new-secret")).map(str::to_string),
        old_secret: o.str(&k("old-secret")).map(str::to_string),
        iter_time: o.number(&k("iter-time")),
    })
}

/// Applies the key-slot options of `o` to the header `luks` at `at` on `storage`.
pub(crate) fn amend(
    storage: &dyn Storage,
    at: u64,
    luks: &mut Luks,
    o: &OptionValues,
    prefix: &str,
    open_secret: Option<&str>,
    force: bool,
) -> Result<()> {
    let req = request(o, prefix)?;
    luks.amend(&req, open_secret, force, &Area { storage, at })
}
