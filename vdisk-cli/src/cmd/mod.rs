//! One module per subcommand.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod io;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod snapshot;
