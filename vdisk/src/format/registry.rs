//! The list of formats. Each format module exposes one [`FormatDesc`] — its name, its
//! probe, its create and open functions, its declared options and its capabilities — and
//! [`FORMATS`] lists them. Everything above the format layer decides by a format's
//! descriptor (its capabilities and option table), never by naming a format.
//!
//! Adding a format: write its module with a `DESCRIPTOR`, add one line to [`FORMATS`].
//!
//! Probing follows QEMU's `bdrv_probe_all`: every format scores the first
//! [`PROBE_BYTES`] of the file (and its name) from 0 to 100, the highest score wins, and
//! raw, which scores 1 for anything, is the fallback. Formats vdisk recognises but cannot
//! read yet are listed with no `open`: opening one is an error naming the format, never
//! a silent fallback to raw.

use super::options::{OptionDesc, OptionValues, FILE_PROTOCOL_OPTIONS};
use super::DriverOptions;
use super::{foreign, luks, qcow2, qed, raw, vdi, vpc};
use super::{BackingResolver, BackingSpec, CreateSpec, Driver};
use crate::error::{Error, Invalid, Result, Unsupported};
use crate::storage::Storage;
use std::sync::Arc;

/// Bytes of the file head the probes see (QEMU's `BLOCK_PROBE_BUF_SIZE`); a shorter file
/// reads as zero-padded.
pub const PROBE_BYTES: usize = 2048;

/// What a probe looks at.
#[derive(Clone, Copy, Debug)]
pub struct ProbeInput<'a> {
    /// The first bytes of the file ([`PROBE_BYTES`] when read by [`probe_storage`],
    /// zero-padded past the end of the file).
    pub head: &'a [u8],
    /// The file name, when known (dmg is recognised by its name, as in QEMU).
    pub filename: Option<&'a str>,
}

/// What a format can do, for the layers above to decide by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// An image can name a backing file.
    pub backing: bool,
    /// Clusters can be written compressed.
    pub compression: bool,
    /// Storage is allocated in clusters (`info` shows a cluster size).
    pub clusters: bool,
    /// Guest bytes are stored as they are, at their own offset, with no metadata (raw):
    /// probing such a file is ambiguous, any file is a valid image, sizes are the file's.
    pub raw_data: bool,
    /// Metadata can be preallocated without the data (`preallocation=metadata`), so a
    /// fully mapped image may still have holes in its file.
    pub metadata_prealloc: bool,
    /// `info` reports the image's dirty mark (qcow2's dirty bit; QEMU does not report
    /// QED's NEED_CHECK there, so neither does vdisk).
    pub dirty_flag: bool,
    /// QEMU's driver for the format can shrink an image: qemu-io's `truncate` follows
    /// it (vdisk's own `resize --shrink` may do more).
    pub qemu_shrinks: bool,
    /// QEMU's driver works in 512-byte sectors (QED): its exports advertise a 512-byte
    /// minimum block, and so do vdisk's.
    pub sector_aligned: bool,
    /// Some valid images score 0 in the probe (a fixed VHD keeps its footer at the end,
    /// where QEMU's probe does not look): a zero score does not mean "not this format".
    pub probe_misses: bool,
    /// Guest data can live in an external data file (qcow2 `data_file`): the node
    /// takes a `data-file` child.
    pub data_file: bool,
}

impl Capabilities {
    /// Nothing beyond reading and writing guest bytes.
    pub const NONE: Capabilities = Capabilities {
        backing: false,
        compression: false,
        clusters: false,
        raw_data: false,
        metadata_prealloc: false,
        dirty_flag: false,
        qemu_shrinks: false,
        sector_aligned: false,
        probe_misses: false,
        data_file: false,
    };
    /// These, plus backing files.
    pub const fn with_backing(self) -> Capabilities {
        Capabilities {
            backing: true,
            ..self
        }
    }
    /// These, plus images the probe does not recognise.
    pub const fn with_probe_misses(self) -> Capabilities {
        Capabilities {
            probe_misses: true,
            ..self
        }
    }
    /// These, plus compressed clusters.
    pub const fn with_compression(self) -> Capabilities {
        Capabilities {
            compression: true,
            ..self
        }
    }
    /// These, plus allocation in clusters.
    pub const fn with_clusters(self) -> Capabilities {
        Capabilities {
            clusters: true,
            ..self
        }
    }
}

/// Everything a format's `open` receives.
pub struct OpenArgs<'a, 'b> {
    /// Where the format's metadata (header, tables) lives.
    pub meta: Arc<dyn Storage>,
    /// Where guest data lives: the same storage as `meta` unless an external data file
    /// is configured.
    pub data: Arc<dyn Storage>,
    /// Open-time options.
    pub opts: &'a DriverOptions,
    /// Opens the backing file the header names.
    pub backing: &'a mut BackingResolver<'b>,
    /// Opens other files the image names (VMDK extents); `None`: the image is not a
    /// named file, so it can name none.
    pub files: Option<&'a mut super::FileResolver<'b>>,
    /// Opens the external data file a header names (qcow2 `data_file`), by the name
    /// as recorded (QEMU opens it as given: relative to the working directory), with
    /// the image's access and locks.
    pub data_files: Option<&'a mut super::FileResolver<'b>>,
}

/// Everything a format's `create` receives, options already type-checked against its
/// table.
#[derive(Clone, Debug)]
pub struct CreateArgs {
    /// Guest size in bytes.
    pub size: u64,
    /// Backing file to record (from the caller; formats may also read
    /// `backing_file`/`backing_fmt` from `options`).
    pub backing: Option<BackingSpec>,
    /// The `-o` options, typed.
    pub options: OptionValues,
    /// The name of the file being created (its last component), when it is a named
    /// file: formats that record their own file name (VMDK's extent line) use it.
    pub filename: Option<String>,
    /// The external data file the caller created for a `data_file` option (formats
    /// with [`Capabilities::data_file`]).
    pub data: Option<Arc<dyn Storage>>,
    /// Creates further files next to the image (VMDK extents); `None` when the image
    /// is not a named file (formats needing siblings then refuse).
    pub siblings: Option<Arc<dyn super::SiblingFiles>>,
    /// What the backing image's format reports about it (`info`'s format-specific
    /// block), when the caller opened it: VMDK records its parent's CID.
    pub parent: Option<super::FormatSpecific>,
}

/// A format's `open`.
pub type OpenFn = fn(OpenArgs<'_, '_>) -> Result<Arc<dyn Driver>>;
/// A format's `create`.
pub type CreateFn = fn(&Arc<dyn Storage>, &CreateArgs) -> Result<()>;

/// One format, as registered.
#[derive(Debug)]
pub struct FormatDesc {
    /// The name qemu-img uses (`-f`, `info`'s "file format").
    pub name: &'static str,
    /// Scores a file from 0 (not this format) to 100 (certainly this format).
    pub probe: fn(&ProbeInput<'_>) -> u32,
    /// Opens an image; `None`: recognised but not supported by vdisk.
    pub open: Option<OpenFn>,
    /// Creates an image; `None`: creation not supported.
    pub create: Option<CreateFn>,
    /// Creation options, in the order qemu-img's `Formatting` line prints them; those
    /// marked [`OptionDesc::amend`] may also be changed by `amend`.
    pub create_options: &'static [OptionDesc],
    /// Options only `amend` takes (none for most formats).
    pub amend_only_options: &'static [OptionDesc],
    /// Whether `amend` applies to the format at all.
    pub amendable: bool,
    /// What the format can do.
    pub caps: Capabilities,
}

/// Every format vdisk knows, supported or only recognised. Order breaks probe ties.
pub static FORMATS: &[&FormatDesc] = &[
    &raw::DESCRIPTOR,
    &qcow2::descriptor::DESCRIPTOR,
    &qed::descriptor::DESCRIPTOR,
    &foreign::qcow::DESCRIPTOR,
    &super::vmdk::descriptor::DESCRIPTOR,
    &super::vhdx::descriptor::DESCRIPTOR,
    &vpc::descriptor::DESCRIPTOR,
    &vdi::descriptor::DESCRIPTOR,
    &luks::DESCRIPTOR,
    &foreign::parallels::DESCRIPTOR,
    &foreign::dmg::DESCRIPTOR,
    &foreign::cloop::DESCRIPTOR,
    &foreign::bochs::DESCRIPTOR,
];

/// An image format: a small handle on its registered [`FormatDesc`]. Compare formats
/// with `==`; decide behaviour by [`Format::caps`] and [`Format::create_options`].
#[derive(Clone, Copy)]
pub struct Format(pub(crate) &'static FormatDesc);

// The handles of the formats the library itself names (its tests, the NBD server's
// snapshot overlay, QED's raw-backing flag). Named like the former enum variants so
// `Format::Qcow2` keeps reading naturally.
#[allow(non_upper_case_globals)]
impl Format {
    /// A plain file: guest offset = host offset.
    pub const Raw: Format = Format(&raw::DESCRIPTOR);
    /// QEMU copy-on-write v2 (compat=0.10) and v3 (compat=1.1).
    pub const Qcow2: Format = Format(&qcow2::descriptor::DESCRIPTOR);
    /// QEMU enhanced disk.
    pub const Qed: Format = Format(&qed::descriptor::DESCRIPTOR);
    /// VMware virtual disk.
    pub const Vmdk: Format = Format(&super::vmdk::descriptor::DESCRIPTOR);
    /// Hyper-V virtual hard disk v2.
    pub const Vhdx: Format = Format(&super::vhdx::descriptor::DESCRIPTOR);
    /// Virtual PC / Hyper-V VHD.
    pub const Vpc: Format = Format(&vpc::descriptor::DESCRIPTOR);
    /// VirtualBox VDI.
    pub const Vdi: Format = Format(&vdi::descriptor::DESCRIPTOR);
}

impl Format {
    /// The name qemu-img uses (`raw`, `qcow2`, `qed`, `vmdk`, ...).
    pub fn name(self) -> &'static str {
        self.0.name
    }
    /// The registered descriptor.
    pub fn desc(self) -> &'static FormatDesc {
        self.0
    }
    /// What the format can do.
    pub fn caps(self) -> Capabilities {
        self.0.caps
    }
    /// The declared creation options.
    pub fn create_options(self) -> &'static [OptionDesc] {
        self.0.create_options
    }
    /// The options `amend` takes (`None`: the format has no `amend`), in declaration order.
    pub fn amend_options(self) -> Option<Vec<&'static OptionDesc>> {
        self.0.amendable.then(|| {
            self.0
                .create_options
                .iter()
                .filter(|d| d.amend)
                .chain(self.0.amend_only_options)
                .collect()
        })
    }
    /// The error for a format without `amend` (qemu-img's wording).
    pub fn no_amend_error(self) -> Error {
        Unsupported::NoAmend(self.0.name).into()
    }
    /// The declared options of the protocol images are created on (the host file).
    pub fn protocol_options(self) -> &'static [OptionDesc] {
        FILE_PROTOCOL_OPTIONS
    }
    /// Whether vdisk can open images of this format.
    pub fn can_open(self) -> bool {
        self.0.open.is_some()
    }
    /// Whether vdisk can create images of this format.
    pub fn can_create(self) -> bool {
        self.0.create.is_some()
    }
    /// The error for a format vdisk recognises but cannot read.
    pub fn unsupported_error(self) -> Error {
        Unsupported::Format(self.0.name).into()
    }
    /// The error for a format vdisk cannot create (qemu-img's wording).
    pub fn no_create_error(self) -> Error {
        Unsupported::NoCreate(self.0.name).into()
    }
    /// Every registered format.
    pub fn all() -> impl Iterator<Item = Format> {
        FORMATS.iter().map(|d| Format(d))
    }
    /// Looks a format up by its qemu-img name.
    pub fn by_name(s: &str) -> Option<Format> {
        Format::all().find(|f| f.name() == s)
    }
    /// Parses a qemu-img format name.
    pub fn parse(s: &str) -> Result<Format> {
        Format::by_name(s).ok_or_else(|| Invalid::UnknownDriver(s.to_string()).into())
    }
    /// This format's probe score for a file (0..=100).
    pub fn score(self, head: &[u8], filename: Option<&str>) -> u32 {
        (self.0.probe)(&ProbeInput { head, filename })
    }
    /// Guesses the format from the first bytes of a file (ideally [`PROBE_BYTES`]).
    pub fn probe(head: &[u8]) -> Format {
        Format::probe_named(head, None)
    }
    /// Guesses the format from the first bytes of a file and its name: the highest
    /// score wins, the first registered on a tie; raw when nothing else claims it.
    pub fn probe_named(head: &[u8], filename: Option<&str>) -> Format {
        let mut best = (0, Format::Raw);
        for f in Format::all() {
            let s = f.score(head, filename);
            if s > best.0 {
                best = (s, f);
            }
        }
        best.1
    }
}

impl PartialEq for Format {
    fn eq(&self, other: &Format) -> bool {
        self.0.name == other.0.name
    }
}
impl Eq for Format {}
impl std::hash::Hash for Format {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state)
    }
}
impl std::fmt::Debug for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Format({})", self.0.name)
    }
}
impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads the head of a storage and guesses its format; `filename` lets name-based
/// probes (dmg) take part. An empty file is raw, as in QEMU.
pub fn probe_storage(storage: &dyn Storage, filename: Option<&str>) -> Result<Format> {
    if storage.len()? == 0 {
        return Ok(Format::Raw);
    }
    let mut head = vec![0u8; PROBE_BYTES];
    storage.read_at(&mut head, 0)?;
    Ok(Format::probe_named(&head, filename))
}

/// Type-checks `-o` pairs against a format's table and its protocol's.
pub fn parse_create_options(format: Format, pairs: &[(String, String)]) -> Result<OptionValues> {
    OptionValues::parse(&[format.create_options(), format.protocol_options()], pairs)
}

/// Creates an empty image of `format` on `storage` (which should be empty).
pub fn create(format: Format, storage: &Arc<dyn Storage>, spec: &CreateSpec) -> Result<()> {
    create_named(format, storage, spec, None)
}

/// [`create`] of a named file (`filename`: its last component).
pub fn create_named(
    format: Format,
    storage: &Arc<dyn Storage>,
    spec: &CreateSpec,
    filename: Option<&str>,
) -> Result<()> {
    create_with_data(format, storage, spec, filename, None)
}

/// [`create_named`] with the external data file the caller created for the format's
/// `data_file` option.
pub fn create_with_data(
    format: Format,
    storage: &Arc<dyn Storage>,
    spec: &CreateSpec,
    filename: Option<&str>,
    data: Option<Arc<dyn Storage>>,
) -> Result<()> {
    create_with_files(format, storage, spec, filename, data, None, None)
}

/// [`create_with_data`], a creator of sibling files (VMDK extents) and what the opened
/// backing image reports about itself.
pub fn create_with_files(
    format: Format,
    storage: &Arc<dyn Storage>,
    spec: &CreateSpec,
    filename: Option<&str>,
    data: Option<Arc<dyn Storage>>,
    siblings: Option<Arc<dyn super::SiblingFiles>>,
    parent: Option<super::FormatSpecific>,
) -> Result<()> {
    let create = format.0.create.ok_or_else(|| format.no_create_error())?;
    let args = CreateArgs {
        size: spec.size,
        backing: spec.backing.clone(),
        options: parse_create_options(format, &spec.options)?,
        filename: filename.map(str::to_string),
        data,
        siblings,
        parent,
    };
    create(storage, &args)
}

/// Opens an image of a known format on `storage` (metadata and data on the same
/// storage).
pub fn open(
    format: Format,
    storage: Arc<dyn Storage>,
    opts: &DriverOptions,
    backing: &mut BackingResolver<'_>,
) -> Result<Arc<dyn Driver>> {
    open_with(
        format,
        OpenArgs {
            data: storage.clone(),
            meta: storage,
            opts,
            backing,
            files: None,
            data_files: None,
        },
    )
}

/// Opens an image of a known format with separate metadata and data storages.
pub fn open_with(format: Format, args: OpenArgs<'_, '_>) -> Result<Arc<dyn Driver>> {
    let open = format.0.open.ok_or_else(|| format.unsupported_error())?;
    open(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parse() {
        for f in Format::all() {
            assert_eq!(Format::parse(f.name()).unwrap(), f);
            assert_eq!(Format::all().filter(|g| g.name() == f.name()).count(), 1);
        }
        assert!(Format::parse("nope").is_err());
    }

    #[test]
    fn zeroes_probe_as_raw() {
        assert_eq!(Format::probe(&[0u8; PROBE_BYTES]), Format::Raw);
        assert_eq!(Format::probe(&[]), Format::Raw);
    }

    #[test]
    fn unsupported_formats_name_themselves() {
        let f = Format::parse("cloop").unwrap();
        assert!(!f.can_open());
        assert_eq!(
            f.unsupported_error().to_string(),
            "the cloop format is not supported by vdisk"
        );
    }
}
