//! `vdisk info`: image information, human or JSON, exactly as `qemu-img info`.

use crate::common::{self, allocated_size};
use crate::output::{dump_human, size_to_str, to_json_pretty, QDict, QValue};
use std::path::{Path, PathBuf};
use vdisk::format::bitmap::BitmapInfo;
use vdisk::format::{DriverOptions, EncryptionInfo, FormatSpecific, SnapshotInfo};
use vdisk::{Format, Image, OpenOptions};

/// Arguments of `vdisk info`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Show every image of the backing chain.
    #[arg(short = 'b', long = "backing-chain")]
    pub backing_chain: bool,
    /// Open in shared mode (ignore other users' locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Treat the image name as a key=value option list (`driver=qcow2,file.filename=X`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Image file.
    pub filename: String,
}

/// What `info` reports about one image (qemu's `ImageInfo`).
struct ImageInfo {
    filename: String,
    /// The protocol of the image's file (`file`, `nbd`).
    protocol: &'static str,
    format: Format,
    dirty: bool,
    /// QEMU's `bdrv_get_info` succeeds: the JSON has a dirty flag.
    info_available: bool,
    actual_size: Option<u64>,
    virtual_size: u64,
    cluster_size: Option<u64>,
    backing_filename: Option<String>,
    full_backing_filename: Option<String>,
    backing_format: Option<Format>,
    specific: FormatSpecific,
    snapshots: Vec<SnapshotInfo>,
    bitmaps: Vec<BitmapInfo>,
    file_length: u64,
    /// Opened as a bare protocol node: qemu shows the protocol as the format.
    protocol_root: Option<&'static str>,
    /// Files of the image besides its own (VMDK extents): `extents.N` child nodes.
    children: Vec<ChildFile>,
    encryption: Option<EncryptionInfo>,
}

/// A child node that is a host file of its own (a VMDK extent).
struct ChildFile {
    name: String,
    filename: String,
    file_length: u64,
    actual_size: Option<u64>,
}

/// The VMDK extents in files of their own, as `extents.N` children (qemu's names), last
/// extent first: QEMU lists a node's children newest first (each is inserted at the head
/// of its list as it is attached, extent by extent).
fn extent_children(spec: &FormatSpecific) -> Vec<ChildFile> {
    let FormatSpecific::Vmdk { extents, .. } = spec else {
        return Vec::new();
    };
    extents
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let f = e.filename.clone()?;
            let len = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            Some(ChildFile {
                name: format!("extents.{i}"),
                actual_size: allocated_size(Path::new(&f)),
                filename: f,
                file_length: len.div_ceil(512) * 512,
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

fn collect(img: &Image, filename: &str) -> Result<ImageInfo, String> {
    let d = img;
    let spec = d.backing_spec();
    // qemu's block layer counts whole 512-byte sectors: lengths are rounded up.
    let file_length = d
        .file_length()
        .map_err(|e| format!("Could not get file length of '{filename}': {e}"))?
        .div_ceil(512)
        * 512;
    let virtual_size = if d.format().caps().raw_data {
        d.size().div_ceil(512) * 512
    } else {
        d.size()
    };
    let specific = d.format_specific();
    let children = extent_children(&specific);
    let actual_size = allocated_size(Path::new(filename))
        .map(|a| a + children.iter().filter_map(|c| c.actual_size).sum::<u64>());
    // A network protocol (nbd, http) has no file info of its own: no disk size.
    let local = matches!(d.protocol(), "file" | "host_device");
    Ok(ImageInfo {
        filename: d.exact_filename().unwrap_or_else(|| filename.to_string()),
        protocol: d.protocol(),
        format: d.format(),
        dirty: d.format().caps().dirty_flag && d.is_dirty(),
        info_available: d.info_available(),
        actual_size: if local { actual_size } else { None },
        virtual_size,
        cluster_size: d.cluster_size(),
        full_backing_filename: spec.as_ref().map(|s| {
            vdisk::chain::resolve_backing_path(Path::new(filename), &s.name)
                .display()
                .to_string()
        }),
        backing_filename: spec.as_ref().map(|s| s.name.clone()),
        backing_format: spec.as_ref().and_then(|s| s.format),
        specific,
        snapshots: d.snapshots(),
        bitmaps: d.bitmaps(),
        file_length,
        protocol_root: d.protocol_root(),
        children,
        encryption: d.encryption(),
    })
}

fn open_one(
    filename: &str,
    format: Option<Format>,
    force_share: bool,
    image_opts: bool,
) -> Result<Image, String> {
    let opts = OpenOptions {
        // qemu-img opens images without BDRV_O_UNMAP (only a convert target has it).
        discard: vdisk::policy::DiscardMode::Ignore,
        format,
        image_opts,
        read_only: true,
        force_share,
        no_backing: true,
        // As qemu-img (BDRV_O_NO_IO): an encrypted image's header without its key.
        driver: DriverOptions {
            no_io: true,
            ..DriverOptions::default()
        },
        ..OpenOptions::default()
    };
    common::open_image_with(filename, &opts)
}

/// Opens the image (and with `chain` every backing file, each without its own backing,
/// as qemu-img does) and collects the information of each.
fn collect_all(a: &Args, format: Option<Format>) -> Result<Vec<ImageInfo>, String> {
    let mut out: Vec<ImageInfo> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut name = a.filename.clone();
    let mut fmt = format;
    loop {
        let canon = std::fs::canonicalize(&name).unwrap_or_else(|_| PathBuf::from(&name));
        if seen.contains(&canon) {
            return Err(format!("Backing file '{name}' creates an infinite loop."));
        }
        seen.push(canon);
        // Only the top name is an option list; backing names are file names.
        let img = open_one(&name, fmt, a.force_share, a.image_opts && out.is_empty())?;
        // The host file's name, as qemu shows it for json:/--image-opts names too.
        let info = collect(&img, &img.path().display().to_string())?;
        drop(img);
        let next = info.full_backing_filename.clone();
        let next_fmt = info.backing_format;
        out.push(info);
        match next {
            Some(n) if a.backing_chain => {
                if seen.len() > vdisk::chain::MAX_CHAIN_DEPTH {
                    return Err("backing chain too deep".into());
                }
                name = n;
                fmt = next_fmt;
            }
            _ => break,
        }
    }
    Ok(out)
}

/// The `format-specific` object of a VMDK image (filenames: `own` for the image's
/// own file).
fn vmdk_json(s: &FormatSpecific, own: &str) -> Option<QDict> {
    let FormatSpecific::Vmdk {
        cid,
        parent_cid,
        create_type,
        extents,
    } = s
    else {
        return None;
    };
    let mut data = QDict::new();
    data.int("cid", *cid);
    data.int("parent-cid", *parent_cid);
    data.str("create-type", create_type.clone());
    let list = extents
        .iter()
        .map(|e| {
            let mut x = QDict::new();
            if e.compressed {
                x.bool("compressed", true);
            }
            x.int("virtual-size", e.virtual_size);
            x.str(
                "filename",
                e.filename.clone().unwrap_or_else(|| own.to_string()),
            );
            if let Some(c) = e.cluster_size {
                x.int("cluster-size", c);
            }
            x.str("format", e.format.clone());
            QValue::Dict(x)
        })
        .collect();
    data.put("extents", QValue::List(list));
    let mut d = QDict::new();
    d.str("type", "vmdk");
    d.put("data", QValue::Dict(data));
    Some(d)
}

/// A LUKS header as QEMU's `QCryptoBlockInfoLUKS` (plus `format` inside qcow2).
pub(crate) fn luks_dict(l: &vdisk::crypto::luks::LuksInfo, with_format: bool) -> QDict {
    let mut d = QDict::new();
    if with_format {
        d.str("format", "luks");
    }
    d.str("cipher-alg", l.cipher_alg);
    d.str("cipher-mode", l.cipher_mode);
    d.str("ivgen-alg", l.ivgen_alg);
    if let Some(h) = l.ivgen_hash_alg {
        d.str("ivgen-hash-alg", h);
    }
    d.str("hash-alg", l.hash_alg);
    d.bool("detached-header", l.detached_header);
    d.int("payload-offset", l.payload_offset as i128);
    d.int("master-key-iters", l.master_key_iters);
    d.str("uuid", l.uuid.clone());
    let slots = l
        .slots
        .iter()
        .map(|s| {
            let mut e = QDict::new();
            e.bool("active", s.active);
            if let Some(i) = s.iters {
                e.int("iters", i);
            }
            if let Some(st) = s.stripes {
                e.int("stripes", st);
            }
            e.int("key-offset", s.key_offset as i128);
            QValue::Dict(e)
        })
        .collect();
    d.put("slots", QValue::List(slots));
    d
}

/// qcow2's `encrypt` member.
fn encrypt_dict(e: &EncryptionInfo) -> QDict {
    match e {
        EncryptionInfo::Luks(l) => luks_dict(l, true),
        EncryptionInfo::Aes => {
            let mut d = QDict::new();
            d.str("format", "aes");
            d
        }
    }
}

/// The `bitmaps` list of qcow2's format-specific data (QEMU's `Qcow2BitmapInfo`).
fn bitmaps_json(bitmaps: &[BitmapInfo]) -> QValue {
    QValue::List(
        bitmaps
            .iter()
            .map(|b| {
                let mut d = QDict::new();
                d.str("name", b.name.clone());
                d.int("granularity", b.granularity);
                d.put(
                    "flags",
                    QValue::List(
                        b.flags()
                            .iter()
                            .map(|f| QValue::Str(f.to_string()))
                            .collect(),
                    ),
                );
                QValue::Dict(d)
            })
            .collect(),
    )
}

fn specific_json(
    s: &FormatSpecific,
    enc: Option<&EncryptionInfo>,
    bitmaps: &[BitmapInfo],
) -> Option<QDict> {
    if let (FormatSpecific::None, Some(EncryptionInfo::Luks(l))) = (s, enc) {
        let mut d = QDict::new();
        d.str("type", "luks");
        d.put("data", QValue::Dict(luks_dict(l, false)));
        return Some(d);
    }
    let FormatSpecific::Qcow2 {
        compat,
        compression_type,
        lazy_refcounts,
        refcount_bits,
        corrupt,
        extended_l2,
        data_file,
        data_file_raw,
    } = s
    else {
        return None;
    };
    let mut data = QDict::new();
    data.str("compat", compat.clone());
    let v3 = compat != "0.10";
    if v3 {
        data.bool("lazy-refcounts", *lazy_refcounts);
        if !bitmaps.is_empty() {
            data.put("bitmaps", bitmaps_json(bitmaps));
        }
    }
    data.int("refcount-bits", *refcount_bits);
    if let Some(f) = data_file {
        data.str("data-file", f.clone());
        data.bool("data-file-raw", *data_file_raw);
    }
    if let Some(e) = enc {
        data.put("encrypt", QValue::Dict(encrypt_dict(e)));
    }
    if v3 {
        data.bool("corrupt", *corrupt);
        data.bool("extended-l2", *extended_l2);
    }
    data.str("compression-type", compression_type.clone());
    let mut d = QDict::new();
    d.str("type", "qcow2");
    d.put("data", QValue::Dict(data));
    Some(d)
}

/// One snapshot as qemu's `SnapshotInfo` object. QEMU holds the sizes and counts as
/// signed 64-bit integers, hence the casts.
fn snapshot_json(sn: &SnapshotInfo) -> QValue {
    let mut d = QDict::new();
    d.str("id", sn.id.clone());
    d.str("name", sn.name.clone());
    d.int("vm-state-size", sn.vm_state_size as i64);
    d.int("date-sec", sn.date_sec as i64);
    d.int("date-nsec", sn.date_nsec);
    d.int("vm-clock-sec", (sn.vm_clock_nsec / 1_000_000_000) as i64);
    d.int("vm-clock-nsec", (sn.vm_clock_nsec % 1_000_000_000) as i64);
    if let Some(c) = sn.icount {
        d.int("icount", c as i64);
    }
    QValue::Dict(d)
}

/// `s` padded with spaces to `width` bytes, like C's `%-Ns` (left) or `%Ns`.
fn c_pad(s: &str, width: usize, left: bool) -> String {
    let fill = " ".repeat(width.saturating_sub(s.len()));
    if left {
        format!("{s}{fill}")
    } else {
        format!("{fill}{s}")
    }
}

/// `secs` since the epoch as local `YYYY-MM-DD HH:MM:SS` (qemu formats with glib in
/// the local time zone, `TZ` honoured).
fn local_date(secs: u64) -> String {
    let t = secs as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value; localtime_r only writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return String::new();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// qemu's snapshot table: "Snapshot list:", the heading and one row per snapshot.
pub(crate) fn snapshot_list(snaps: &[SnapshotInfo]) -> String {
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&snapshot_row(None));
    s.push('\n');
    for sn in snaps {
        s.push_str(&snapshot_row(Some(sn)));
        s.push('\n');
    }
    s
}

/// One row of qemu's snapshot table (`None`: the heading), without the newline.
fn snapshot_row(sn: Option<&SnapshotInfo>) -> String {
    let cols: [String; 6] = match sn {
        None => ["ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"].map(String::from),
        Some(sn) => {
            let secs = (sn.vm_clock_nsec / 1_000_000_000) as i64;
            let clock = format!(
                "{:04}:{:02}:{:02}.{:03}",
                (secs / 3600) as i32,
                ((secs / 60) % 60) as i32,
                (secs % 60) as i32,
                ((sn.vm_clock_nsec / 1_000_000) % 1000) as i32
            );
            [
                sn.id.clone(),
                sn.name.clone(),
                size_to_str(sn.vm_state_size),
                local_date(sn.date_sec),
                clock,
                sn.icount
                    .map(|c| (c as i64).to_string())
                    .unwrap_or_else(|| "--".into()),
            ]
        }
    };
    format!(
        "{} {} {} {} {} {}",
        c_pad(&cols[0], 7, true),
        c_pad(&cols[1], 16, true),
        c_pad(&cols[2], 8, false),
        c_pad(&cols[3], 19, false),
        c_pad(&cols[4], 15, false),
        c_pad(&cols[5], 10, false)
    )
}

/// A protocol-level child node (`file`, `extents.N`) as qemu's JSON shows it.
fn file_child(name: &str, filename: &str, actual: Option<u64>, length: u64) -> QDict {
    let mut file = QDict::new();
    file.str("filename", filename.to_string());
    file.str("format", "file");
    file.bool("dirty-flag", false);
    if let Some(a) = actual {
        file.int("actual-size", a);
    }
    file.int("virtual-size", length);
    let mut fs = QDict::new();
    fs.str("type", "file");
    fs.put("data", QValue::Dict(QDict::new()));
    file.put("format-specific", QValue::Dict(fs));
    file.put("children", QValue::List(Vec::new()));
    let mut child = QDict::new();
    child.str("name", name.to_string());
    child.put("info", QValue::Dict(file));
    child
}

fn to_qdict(i: &ImageInfo) -> QDict {
    // A network protocol (nbd) has no image info of its own: no dirty flag, no
    // format-specific block, as qemu-img shows it.
    let local = matches!(i.protocol, "file" | "host_device");
    let own_actual = i
        .actual_size
        .map(|a| a - i.children.iter().filter_map(|c| c.actual_size).sum::<u64>());
    let mut file = QDict::new();
    file.str("filename", i.filename.clone());
    file.str("format", i.protocol);
    if local {
        file.bool("dirty-flag", false);
    }
    if let Some(a) = own_actual {
        file.int("actual-size", a);
    }
    file.int("virtual-size", i.file_length);
    if local {
        let mut fs = QDict::new();
        fs.str("type", "file");
        fs.put("data", QValue::Dict(QDict::new()));
        file.put("format-specific", QValue::Dict(fs));
    }
    file.put("children", QValue::List(Vec::new()));
    if i.protocol_root.is_some() {
        // The protocol node is the image: qemu shows its own info, nothing above it.
        return file;
    }
    let mut child = QDict::new();
    child.str("name", "file");
    child.put("info", QValue::Dict(file));

    let mut d = QDict::new();
    d.str("filename", i.filename.clone());
    d.str("format", i.format.name());
    if local && i.info_available {
        d.bool("dirty-flag", i.dirty);
    }
    if let Some(a) = i.actual_size {
        d.int("actual-size", a);
    }
    d.int("virtual-size", i.virtual_size);
    if let Some(c) = i.cluster_size {
        d.int("cluster-size", c);
    }
    if let Some(b) = &i.backing_filename {
        d.str("backing-filename", b.clone());
    }
    if let Some(b) = &i.full_backing_filename {
        d.str("full-backing-filename", b.clone());
    }
    if let Some(f) = i.backing_format {
        d.str("backing-filename-format", f.name());
    }
    if !i.snapshots.is_empty() {
        d.put(
            "snapshots",
            QValue::List(i.snapshots.iter().map(snapshot_json).collect()),
        );
    }
    if i.encryption.is_some() {
        d.bool("encrypted", true);
    }
    if let Some(fs) = specific_json(&i.specific, i.encryption.as_ref(), &i.bitmaps)
        .or_else(|| vmdk_json(&i.specific, &i.filename))
    {
        d.put("format-specific", QValue::Dict(fs));
    }
    let mut children: Vec<QValue> = i
        .children
        .iter()
        .map(|c| {
            QValue::Dict(file_child(
                &c.name,
                &c.filename,
                c.actual_size,
                c.file_length,
            ))
        })
        .collect();
    children.push(QValue::Dict(child));
    d.put("children", QValue::List(children));
    d
}

fn human(i: &ImageInfo) -> String {
    let mut s = String::new();
    let disk = |a: Option<u64>| a.map(size_to_str).unwrap_or_else(|| "unavailable".into());
    s.push_str(&format!("image: {}\n", i.filename));
    match i.protocol_root {
        Some(p) => s.push_str(&format!("file format: {p}\n")),
        None => s.push_str(&format!("file format: {}\n", i.format)),
    }
    s.push_str(&format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(i.virtual_size),
        i.virtual_size
    ));
    s.push_str(&format!("disk size: {}\n", disk(i.actual_size)));
    if i.encryption.is_some() {
        s.push_str("encrypted: yes\n");
    }
    if let Some(c) = i.cluster_size {
        s.push_str(&format!("cluster_size: {c}\n"));
    }
    if i.dirty {
        s.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = &i.backing_filename {
        s.push_str(&format!("backing file: {b}"));
        match &i.full_backing_filename {
            Some(full) if full != b => s.push_str(&format!(" (actual path: {full})\n")),
            _ => s.push('\n'),
        }
    }
    if let Some(f) = i.backing_format {
        s.push_str(&format!("backing file format: {f}\n"));
    }
    if !i.snapshots.is_empty() {
        s.push_str(&snapshot_list(&i.snapshots));
    }
    s.push_str(&specific_human_full(
        &i.specific,
        i.encryption.as_ref(),
        &i.bitmaps,
    ));
    if i.protocol_root.is_some() {
        return s;
    }
    s.push_str(&vmdk_human(&i.specific, &i.filename));
    for c in &i.children {
        s.push_str(&format!("Child node '/{}':\n", c.name));
        s.push_str(&format!("    filename: {}\n", c.filename));
        s.push_str("    protocol type: file\n");
        s.push_str(&format!(
            "    file length: {} ({} bytes)\n",
            size_to_str(c.file_length),
            c.file_length
        ));
        s.push_str(&format!("    disk size: {}\n", disk(c.actual_size)));
    }
    s.push_str("Child node '/file':\n");
    s.push_str(&format!("    filename: {}\n", i.filename));
    s.push_str(&format!("    protocol type: {}\n", i.protocol));
    s.push_str(&format!(
        "    file length: {} ({} bytes)\n",
        size_to_str(i.file_length),
        i.file_length
    ));
    let own = i
        .actual_size
        .map(|a| a - i.children.iter().filter_map(|c| c.actual_size).sum::<u64>());
    s.push_str(&format!("    disk size: {}\n", disk(own)));
    s
}

/// The "Format specific information" block of the human output (empty when the format
/// has none); `vdisk io`'s `info` prints the same block.
pub(crate) fn specific_human_with(spec: &FormatSpecific, bitmaps: &[BitmapInfo]) -> String {
    specific_human_full(spec, None, bitmaps)
}

/// The block with the image's encryption (qcow2's `encrypt:` block, a LUKS volume's
/// header) and persistent bitmaps (after lazy refcounts, as qemu-img lists them).
pub(crate) fn specific_human_full(
    spec: &FormatSpecific,
    enc: Option<&EncryptionInfo>,
    bitmaps: &[BitmapInfo],
) -> String {
    let mut s = String::new();
    if let (FormatSpecific::None, Some(EncryptionInfo::Luks(l))) = (spec, enc) {
        s.push_str("Format specific information:\n");
        s.push_str(&dump_human(&luks_dict(l, false), 1));
        return s;
    }
    if let FormatSpecific::Qcow2 {
        compat,
        compression_type,
        lazy_refcounts,
        refcount_bits,
        corrupt,
        extended_l2,
        data_file,
        data_file_raw,
    } = spec
    {
        s.push_str("Format specific information:\n");
        s.push_str(&format!("    compat: {compat}\n"));
        s.push_str(&format!("    compression type: {compression_type}\n"));
        let v3 = compat != "0.10";
        if v3 {
            s.push_str(&format!("    lazy refcounts: {lazy_refcounts}\n"));
            if !bitmaps.is_empty() {
                s.push_str("    bitmaps:\n");
                for (i, b) in bitmaps.iter().enumerate() {
                    s.push_str(&format!("        [{i}]:\n            flags:\n"));
                    for (k, f) in b.flags().iter().enumerate() {
                        s.push_str(&format!("                [{k}]: {f}\n"));
                    }
                    s.push_str(&format!(
                        "            name: {}\n            granularity: {}\n",
                        b.name, b.granularity
                    ));
                }
            }
        }
        s.push_str(&format!("    refcount bits: {refcount_bits}\n"));
        if let Some(f) = data_file {
            s.push_str(&format!("    data file: {f}\n"));
            s.push_str(&format!("    data file raw: {data_file_raw}\n"));
        }
        if let Some(e) = enc {
            s.push_str("    encrypt:\n");
            s.push_str(&dump_human(&encrypt_dict(e), 2));
        }
        if v3 {
            s.push_str(&format!("    corrupt: {corrupt}\n"));
            s.push_str(&format!("    extended l2: {extended_l2}\n"));
        }
    }
    s
}

/// The "Format specific information" block of a VMDK image.
fn vmdk_human(spec: &FormatSpecific, own: &str) -> String {
    let FormatSpecific::Vmdk {
        cid,
        parent_cid,
        create_type,
        extents,
    } = spec
    else {
        return String::new();
    };
    let mut s = String::from("Format specific information:\n");
    s.push_str(&format!("    cid: {cid}\n"));
    s.push_str(&format!("    parent cid: {parent_cid}\n"));
    s.push_str(&format!("    create type: {create_type}\n"));
    s.push_str("    extents:\n");
    for (n, e) in extents.iter().enumerate() {
        s.push_str(&format!("        [{n}]:\n"));
        if e.compressed {
            s.push_str("            compressed: true\n");
        }
        s.push_str(&format!("            virtual size: {}\n", e.virtual_size));
        s.push_str(&format!(
            "            filename: {}\n",
            e.filename.as_deref().unwrap_or(own)
        ));
        if let Some(c) = e.cluster_size {
            s.push_str(&format!("            cluster size: {c}\n"));
        }
        s.push_str(&format!("            format: {}\n", e.format));
    }
    s
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    let json = match common::parse_output(&a.output) {
        Ok(j) => j,
        Err(e) => {
            common::error(e);
            return 1;
        }
    };
    let format = match common::parse_format(a.format.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            common::error(format!("Could not open '{}': {e}", a.filename));
            return 1;
        }
    };
    let infos = match collect_all(&a, format) {
        Ok(v) => v,
        Err(e) => {
            common::error(e);
            return 1;
        }
    };
    if json {
        let v = if a.backing_chain {
            QValue::List(infos.iter().map(|i| QValue::Dict(to_qdict(i))).collect())
        } else {
            QValue::Dict(to_qdict(&infos[0]))
        };
        crate::outln!("{}", to_json_pretty(&v));
    } else {
        let parts: Vec<String> = infos.iter().map(human).collect();
        crate::outp!("{}", parts.join("\n"));
    }
    0
}
