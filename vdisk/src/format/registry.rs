//! The list of formats: names, probing, and dispatch of `create` / `open` to the
//! format modules.

use super::{qcow2, qed, raw, BackingResolver, CreateSpec, Driver, DriverOptions};
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::sync::Arc;

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// A plain file: guest offset = host offset.
    Raw,
    /// QEMU copy-on-write v2 (compat=0.10) and v3 (compat=1.1).
    Qcow2,
    /// QEMU enhanced disk.
    Qed,
}

impl Format {
    /// The name qemu-img uses (`raw`, `qcow2`, `qed`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
        }
    }
    /// Parses a qemu-img format name.
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "qed" => Ok(Format::Qed),
            other => Err(Error::invalid(format!("Unknown driver '{other}'"))),
        }
    }
    /// Guesses the format from the first bytes of a file (at least 512 wanted).
    pub fn probe(head: &[u8]) -> Format {
        if qcow2::probe(head) {
            Format::Qcow2
        } else if qed::probe(head) {
            Format::Qed
        } else {
            Format::Raw
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Creates an empty image of `format` on `storage` (which should be empty).
pub fn create(format: Format, storage: &Arc<dyn Storage>, spec: &CreateSpec) -> Result<()> {
    match format {
        Format::Raw => raw::create(storage, spec),
        Format::Qcow2 => qcow2::create(storage, spec),
        Format::Qed => qed::create(storage, spec),
    }
}

/// Opens an image of a known format on `storage`.
pub fn open(
    format: Format,
    storage: Arc<dyn Storage>,
    opts: &DriverOptions,
    backing: &mut BackingResolver<'_>,
) -> Result<Arc<dyn Driver>> {
    match format {
        Format::Raw => Ok(Arc::new(raw::Raw::open(storage, opts)?)),
        Format::Qcow2 => Ok(Arc::new(qcow2::Qcow2::open(storage, opts, backing)?)),
        Format::Qed => Ok(Arc::new(qed::Qed::open(storage, opts, backing)?)),
    }
}
