//! Image creation with QEMU's layout: header cluster, refcount table, one refcount
//! block, then the L1 table (allocated by growing an empty image to its size, as QEMU
//! does), then preallocated metadata/data if asked.

use super::header::*;
use super::prealloc::{preallocate, Prealloc};
use super::{Geom, Qcow2};
use crate::error::{Invalid, Result, V3Feature};
use crate::format::registry::CreateArgs;
use crate::format::{BackingSpec, CreateSpec, Driver, DriverOptions, Format};
use crate::storage::Storage;
use std::sync::Arc;

struct Opts {
    cluster_bits: u32,
    version: u32,
    refcount_order: u32,
    zstd: bool,
    lazy: bool,
    prealloc: Prealloc,
    extended_l2: bool,
    backing: Option<BackingSpec>,
    encrypt: Option<super::crypto::Wanted>,
    /// The external data file name to record, and whether it is kept raw.
    data_file: Option<(String, bool)>,
}

fn parse_opts(args: &CreateArgs) -> Result<Opts> {
    let o = &args.options;
    let cluster_size = o.size("cluster_size").unwrap_or(65536);
    let version = match o.get_enum("compat")? {
        Some("0.10" | "v2") => Some(2),
        Some(_) => Some(3),
        None => None,
    };
    let refcount_bits = o.number("refcount_bits").unwrap_or(16);
    let zstd = o.get_enum("compression_type")? == Some("zstd");
    let lazy = o.bool("lazy_refcounts").unwrap_or(false);
    let extended_l2 = o.bool("extended_l2").unwrap_or(false);
    let prealloc = match o.get_enum("preallocation")? {
        None | Some("off") => Prealloc::Off,
        Some("metadata") => Prealloc::Metadata,
        Some("falloc") => Prealloc::Falloc,
        Some(_) => Prealloc::Full,
    };
    let backing_file = o.str("backing_file").map(str::to_string);
    let backing_fmt = o.str("backing_fmt").map(str::to_string);
    let encrypt = super::crypto::wanted(o)?;
    if encrypt.is_some() {
        super::crypto::check_secret(o)?;
    }
    let data_file = o
        .str("data_file")
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    let data_raw = o.bool("data_file_raw").unwrap_or(false);
    if data_raw && data_file.is_none() {
        return Err(Invalid::DataFile("data-file-raw requires data-file").into());
    }
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(Invalid::Qcow2ClusterSize.into());
    }
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(Invalid::RefcountWidth.into());
    }
    let version = version.unwrap_or(3);
    if version == 2 {
        if refcount_bits != 16 {
            return Err(Invalid::NeedsV3(V3Feature::RefcountWidth).into());
        }
        if lazy {
            return Err(Invalid::NeedsV3(V3Feature::LazyRefcounts).into());
        }
        if zstd {
            return Err(Invalid::NeedsV3(V3Feature::CompressionType).into());
        }
        if extended_l2 {
            return Err(Invalid::NeedsV3(V3Feature::ExtendedL2).into());
        }
        if data_file.is_some() {
            return Err(Invalid::DataFile(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            )
            .into());
        }
    }
    if extended_l2 && cluster_size < 16384 {
        return Err(Invalid::ExtendedL2ClusterSize.into());
    }
    let backing = match (&args.backing, backing_file) {
        (Some(b), _) => Some(b.clone()),
        (None, Some(name)) => {
            let format = match backing_fmt {
                Some(f) => Some(Format::parse(&f)?),
                None => None,
            };
            Some(BackingSpec { name, format })
        }
        (None, None) => None,
    };
    if let Some(b) = &backing {
        if b.format.is_none() {
            return Err(Invalid::BackingWithoutFormat.into());
        }
        if b.name.len() > MAX_BACKING_NAME as usize {
            return Err(Invalid::CreateBackingNameTooLong {
                len: b.name.len() as u64,
                max: u64::from(MAX_BACKING_NAME),
            }
            .into());
        }
        if data_raw {
            return Err(Invalid::DataFile(
                "Backing file and data-file-raw cannot be used at the same time",
            )
            .into());
        }
        if prealloc != Prealloc::Off {
            return Err(Invalid::BackingWithPreallocation.into());
        }
    }
    // A raw data file is mapped whole from the start (QEMU: at least metadata
    // preallocation), so that every guest offset is its data file offset.
    let prealloc = if data_raw && prealloc == Prealloc::Off {
        Prealloc::Metadata
    } else {
        prealloc
    };
    Ok(Opts {
        cluster_bits: cluster_size.trailing_zeros(),
        version,
        refcount_order: refcount_bits.trailing_zeros(),
        zstd,
        lazy,
        prealloc,
        extended_l2,
        backing,
        encrypt,
        data_file: data_file.map(|n| (n, data_raw)),
    })
}

/// Creates a qcow2 image on `storage` (which should be empty), with untyped `-o` pairs
/// (checked against [`super::options::CREATE_OPTIONS`]).
pub fn create(storage: &Arc<dyn Storage>, spec: &CreateSpec) -> Result<()> {
    crate::format::create(Format::Qcow2, storage, spec)
}

/// Creates a qcow2 image on `storage` (which should be empty) from typed options.
pub fn create_typed(storage: &Arc<dyn Storage>, spec: &CreateArgs) -> Result<()> {
    let o = parse_opts(spec)?;
    let cs = 1u64 << o.cluster_bits;
    let g = Geom::new(o.cluster_bits, o.refcount_order, o.version, o.extended_l2);
    let l1 = g.l1_entries_for(spec.size);
    if l1 * 8 > MAX_L1_BYTES || spec.size > (1u64 << 62) {
        // qemu-img's wording for every "too large" (EFBIG) failure of qcow2 creation
        // (here: the L1 table would exceed 32 MiB, or the size exceeds 2^62).
        return Err(Invalid::ImageTooLarge("qcow2").into());
    }
    let mut h = Header {
        version: o.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: o.cluster_bits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: if o.zstd { INCOMPAT_COMPRESSION } else { 0 }
            | if o.extended_l2 { INCOMPAT_EXTL2 } else { 0 },
        compatible: if o.lazy { COMPAT_LAZY_REFCOUNTS } else { 0 },
        autoclear: 0,
        refcount_order: o.refcount_order,
        header_length: if o.version == 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN as u32
        },
        compression_type: u8::from(o.zstd),
        tail: vec![0u8; (V3_HEADER_LEN - 105) as usize],
        backing_format: o
            .backing
            .as_ref()
            .and_then(|b| b.format)
            .map(|f| f.name().to_string()),
        // QEMU 10 leaves the feature table out of images with clusters below 16 KiB
        // (observed: 512..8192 without, 16384 and up with).
        features: if o.version == 3 && cs >= 16384 {
            Header::default_features()
        } else {
            Vec::new()
        },
        has_data_file_ext: false,
        other_exts: Vec::new(),
        backing_file: o.backing.as_ref().map(|b| b.name.clone()),
    };
    let data = match &o.data_file {
        Some((name, raw)) => {
            h.incompatible |= INCOMPAT_DATA_FILE;
            if *raw {
                h.autoclear |= AUTOCLEAR_DATA_FILE_RAW;
            }
            h.set_data_file_name(Some(name));
            // The caller creates the data file (it knows where names resolve).
            let d = spec.data.clone().ok_or(Invalid::DataFile(
                "An external data file needs a file to be created in",
            ))?;
            d.set_len(0)?;
            Some(d)
        }
        None => None,
    };
    let mut head = h.serialize()?;
    // The whole header cluster, as QEMU writes it: its host allocation is what QEMU's
    // metadata-preallocation guess (block status of `map`) looks at.
    head.resize(cs as usize, 0);
    storage.set_len(0)?;
    storage.write_at(&head, 0)?;
    let mut rt = vec![0u8; cs as usize];
    rt[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    storage.write_at(&rt, cs)?;
    let mut rb = vec![0u8; cs as usize];
    for c in 0..3 {
        super::refcount::set_entry(&mut rb, c, o.refcount_order, 1);
    }
    storage.write_at(&rb, 2 * cs)?;
    storage.flush()?;

    let img = Qcow2::open_with(
        storage.clone(),
        super::DataSource {
            child: data,
            files: None,
        },
        &DriverOptions {
            no_backing: true,
            ..DriverOptions::default()
        },
        &mut |_s: &BackingSpec| Err(Invalid::BackingWhileCreating.into()),
    )?;
    img.do_resize(spec.size, false)?;
    if let Some(w) = o.encrypt {
        img.set_up_encryption(w, &spec.options)?;
    }
    if o.prealloc != Prealloc::Off {
        preallocate(&img, 0, spec.size.div_ceil(img.g.cs), o.prealloc)?;
    }
    img.close()?;
    Ok(())
}
