//! Format layer: maps guest offsets to host offsets and owns each format's metadata.
//!
//! A format implements [`Driver`] on top of a [`Storage`](crate::storage::Storage). It
//! never opens files itself: its backing file reaches it through the [`BackingResolver`]
//! the chain layer passes to `open`, so a format knows nothing of paths, probing or
//! front-ends.
//!
//! - [`bitmap`]: persistent dirty bitmaps (in memory, and what a format offers).
//! - [`driver`]: the contract ([`Driver`] and the types it speaks).
//! - [`mapping`]: the typed mapping contract a driver implements for the data path.
//! - [`datapath`]: the generic vectored read/write path, in-flight ordering, chain
//!   status and zero detection, written once above the drivers.
//! - [`registry`]: the list of formats, probing, dispatch of create/open.
//! - [`measure`]: `measure`'s required and fully allocated sizes.
//! - [`options`]: declared creation/amend options, their parsing and `-o help`.
//! - [`foreign`]: formats recognised by their probes but not supported yet.
//! - [`report`]: check results.
//! - [`util`]: helpers shared by the formats.
//! - `raw`, `qcow2`, `qed`, `vmdk`, `vhdx`, `vpc` (VHD), `vdi`, `luks`: the formats.

pub mod bitmap;
pub mod datapath;
pub mod driver;
pub mod foreign;
pub mod luks;
pub mod mapping;
pub mod measure;
pub mod options;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod registry;
pub mod report;
pub mod util;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

pub use driver::*;
pub use registry::{create, open, open_with, Format, FormatDesc};
pub use report::*;
pub use util::*;
