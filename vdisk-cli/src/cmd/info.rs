//! `vdisk info`: image information, human or JSON, exactly as `qemu-img info`.

use crate::common::{self, allocated_size};
use crate::output::{size_to_str, to_json_pretty, QDict, QValue};
use std::path::{Path, PathBuf};
use vdisk::format::{FormatSpecific, SnapshotInfo};
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
    actual_size: Option<u64>,
    virtual_size: u64,
    cluster_size: Option<u64>,
    backing_filename: Option<String>,
    full_backing_filename: Option<String>,
    backing_format: Option<Format>,
    specific: FormatSpecific,
    snapshots: Vec<SnapshotInfo>,
    file_length: u64,
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
    let local = d.file_protocol() == "file";
    Ok(ImageInfo {
        filename: d.exact_filename().unwrap_or_else(|| filename.to_string()),
        protocol: d.file_protocol(),
        format: d.format(),
        dirty: d.is_dirty(),
        actual_size: local.then(|| allocated_size(Path::new(filename))).flatten(),
        virtual_size,
        cluster_size: d.cluster_size(),
        full_backing_filename: spec.as_ref().map(|s| {
            vdisk::chain::resolve_backing_path(Path::new(filename), &s.name)
                .display()
                .to_string()
        }),
        backing_filename: spec.as_ref().map(|s| s.name.clone()),
        backing_format: spec.as_ref().and_then(|s| s.format),
        specific: d.format_specific(),
        snapshots: d.snapshots(),
        file_length,
    })
}

fn open_one(
    filename: &str,
    format: Option<Format>,
    force_share: bool,
    image_opts: bool,
) -> Result<Image, String> {
    let opts = OpenOptions {
        format,
        image_opts,
        read_only: true,
        force_share,
        no_backing: true,
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

fn specific_json(s: &FormatSpecific) -> Option<QDict> {
    let FormatSpecific::Qcow2 {
        compat,
        compression_type,
        lazy_refcounts,
        refcount_bits,
        corrupt,
        extended_l2,
    } = s
    else {
        return None;
    };
    let mut data = QDict::new();
    data.str("compat", compat.clone());
    let v3 = compat != "0.10";
    if v3 {
        data.bool("lazy-refcounts", *lazy_refcounts);
    }
    data.int("refcount-bits", *refcount_bits);
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

fn to_qdict(i: &ImageInfo) -> QDict {
    // A network protocol (nbd) has no image info of its own: no dirty flag, no
    // format-specific block, as qemu-img shows it.
    let local = i.protocol == "file";
    let mut file = QDict::new();
    file.str("filename", i.filename.clone());
    file.str("format", i.protocol);
    if local {
        file.bool("dirty-flag", false);
    }
    if let Some(a) = i.actual_size {
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
    let mut child = QDict::new();
    child.str("name", "file");
    child.put("info", QValue::Dict(file));

    let mut d = QDict::new();
    d.str("filename", i.filename.clone());
    d.str("format", i.format.name());
    if local {
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
    if let Some(fs) = specific_json(&i.specific) {
        d.put("format-specific", QValue::Dict(fs));
    }
    d.put("children", QValue::List(vec![QValue::Dict(child)]));
    d
}

fn human(i: &ImageInfo) -> String {
    let mut s = String::new();
    let disk = |a: Option<u64>| a.map(size_to_str).unwrap_or_else(|| "unavailable".into());
    s.push_str(&format!("image: {}\n", i.filename));
    s.push_str(&format!("file format: {}\n", i.format));
    s.push_str(&format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(i.virtual_size),
        i.virtual_size
    ));
    s.push_str(&format!("disk size: {}\n", disk(i.actual_size)));
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
        s.push_str("Snapshot list:\n");
        s.push_str(&snapshot_row(None));
        s.push('\n');
        for sn in &i.snapshots {
            s.push_str(&snapshot_row(Some(sn)));
            s.push('\n');
        }
    }
    s.push_str(&specific_human(&i.specific));
    s.push_str("Child node '/file':\n");
    s.push_str(&format!("    filename: {}\n", i.filename));
    s.push_str(&format!("    protocol type: {}\n", i.protocol));
    s.push_str(&format!(
        "    file length: {} ({} bytes)\n",
        size_to_str(i.file_length),
        i.file_length
    ));
    s.push_str(&format!("    disk size: {}\n", disk(i.actual_size)));
    s
}

/// The "Format specific information" block of the human output (empty when the format
/// has none); `vdisk io`'s `info` prints the same block.
pub(crate) fn specific_human(spec: &FormatSpecific) -> String {
    let mut s = String::new();
    if let FormatSpecific::Qcow2 {
        compat,
        compression_type,
        lazy_refcounts,
        refcount_bits,
        corrupt,
        extended_l2,
    } = spec
    {
        s.push_str("Format specific information:\n");
        s.push_str(&format!("    compat: {compat}\n"));
        s.push_str(&format!("    compression type: {compression_type}\n"));
        let v3 = compat != "0.10";
        if v3 {
            s.push_str(&format!("    lazy refcounts: {lazy_refcounts}\n"));
        }
        s.push_str(&format!("    refcount bits: {refcount_bits}\n"));
        if v3 {
            s.push_str(&format!("    corrupt: {corrupt}\n"));
            s.push_str(&format!("    extended l2: {extended_l2}\n"));
        }
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
        println!("{}", to_json_pretty(&v));
    } else {
        let parts: Vec<String> = infos.iter().map(human).collect();
        print!("{}", parts.join("\n"));
    }
    0
}
