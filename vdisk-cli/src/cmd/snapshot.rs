//! `vdisk snapshot`: lists, creates, applies and deletes internal snapshots, as
//! `qemu-img snapshot` (same lookups, messages and exit codes).

use crate::common;
use vdisk::format::SnapshotInfo;
use vdisk::{Error, OpenOptions, SnapshotError};

/// Arguments of `vdisk snapshot`.
#[derive(clap::Args)]
pub struct Args {
    /// List the snapshots (the default).
    #[arg(short = 'l', action = clap::ArgAction::Count)]
    pub list: u8,
    /// Apply (revert the disk to) a snapshot, by ID or name.
    #[arg(short = 'a', action = clap::ArgAction::Append, allow_hyphen_values = true)]
    pub apply: Vec<String>,
    /// Create a snapshot with this name.
    #[arg(short = 'c', action = clap::ArgAction::Append, allow_hyphen_values = true)]
    pub create: Vec<String>,
    /// Delete a snapshot, by name.
    #[arg(short = 'd', action = clap::ArgAction::Append, allow_hyphen_values = true)]
    pub delete: Vec<String>,
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format", action = clap::ArgAction::Append)]
    pub format: Vec<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Open in shared mode (ignore other users' locks); listing only.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Treat the image name as a key=value option list (`driver=qcow2,file.filename=X`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Image file.
    pub filenames: Vec<String>,
}

/// Longest name qemu-img keeps (its `QEMUSnapshotInfo.name` holds 256 bytes).
const MAX_NAME: usize = 255;

enum Action {
    List,
    Apply(String),
    Create(String),
    Delete(String),
}

/// Prints a usage error the way qemu-img does and returns the empty error.
fn usage(msg: &str) -> String {
    common::error(msg);
    eprintln!("Try 'vdisk snapshot --help' for more info");
    String::new()
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    common::exit_code(run_inner(a))
}

/// The name cut to qemu-img's buffer (at a character boundary).
fn cut(name: &str) -> String {
    let mut n = name.len().min(MAX_NAME);
    while !name.is_char_boundary(n) {
        n -= 1;
    }
    name[..n].to_string()
}

/// The current time as qemu-img stamps a snapshot (microsecond precision).
fn now() -> (u64, u32) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_secs(), t.subsec_micros() * 1000)
}

/// The errno text qemu-img prints after "Could not create snapshot".
fn strerror(e: &Error) -> String {
    common::strip_os_error(&std::io::Error::from_raw_os_error(e.errno()).to_string())
}

fn run_inner(a: Args) -> Result<(), String> {
    let actions = usize::from(a.list) + a.apply.len() + a.create.len() + a.delete.len();
    if actions > 1 {
        return Err(usage("Cannot mix '-l', '-a', '-c', '-d'"));
    }
    let action = if let Some(n) = a.apply.first() {
        Action::Apply(n.clone())
    } else if let Some(n) = a.create.first() {
        Action::Create(n.clone())
    } else if let Some(n) = a.delete.first() {
        Action::Delete(n.clone())
    } else {
        Action::List
    };
    if a.filenames.len() != 1 {
        return Err(usage("Expecting one image file name"));
    }
    let filename = &a.filenames[0];
    // The last -f wins, as with QEMU's getopt.
    let format = common::parse_format(a.format.last().map(String::as_str))
        .map_err(|e| format!("Could not open '{filename}': {e}"))?;
    // Listing prints even with -q, as qemu-img does.
    let _ = a.quiet;
    let list = matches!(action, Action::List);
    let img = common::open_image_with(
        filename,
        &OpenOptions {
            format,
            read_only: list,
            force_share: a.force_share,
            image_opts: a.image_opts,
            ..OpenOptions::default()
        },
    )?;
    let r = match action {
        Action::List => {
            let snaps = img.snapshots();
            if !snaps.is_empty() {
                crate::outp!("{}", crate::cmd::info::snapshot_list(&snaps));
            }
            Ok(())
        }
        Action::Create(name) => {
            let (date_sec, date_nsec) = now();
            let sn = SnapshotInfo {
                id: String::new(),
                name: cut(&name),
                vm_state_size: 0,
                date_sec,
                date_nsec,
                vm_clock_nsec: 0,
                icount: Some(0),
            };
            img.snapshot_create(&sn)
                .map(|_| ())
                .map_err(|e| format!("Could not create snapshot '{name}': {}", strerror(&e)))
        }
        Action::Apply(name) => img.snapshot_apply(&name).map(|_| ()).map_err(|e| {
            let why = match &e {
                Error::Snapshot(SnapshotError::NotSupported) => e.to_string(),
                _ => format!("Failed to load snapshot: {}", strerror(&e)),
            };
            format!("Could not apply snapshot '{name}': {why}")
        }),
        Action::Delete(name) => {
            // qemu-img looks the snapshot up by name only (`bdrv_snapshot_find`),
            // then deletes the entry with that ID and name.
            let snaps = img.snapshots();
            let found = snaps.iter().find(|s| s.name == name);
            match found {
                None => Err(format!(
                    "Could not delete snapshot '{name}': snapshot not found"
                )),
                Some(s) => img
                    .snapshot_delete(Some(&s.id), Some(&s.name))
                    .map(|_| ())
                    .map_err(|e| format!("Could not delete snapshot '{name}': {e}")),
            }
        }
    };
    let closed = img.close().map_err(|e| e.to_string());
    r.and(closed)
}

/// Loads the snapshot a `-l` parameter names into a read-only image (`convert -l`,
/// `measure -l`): `snapshot.id=…,snapshot.name=…`, else an ID or name. Errors read
/// like qemu-img's.
pub fn load(img: &vdisk::Image, param: &str) -> Result<(), String> {
    let p = vdisk::SnapshotParam::parse(param).map_err(|key| {
        common::error(format!("Invalid parameter '{key}'"));
        format!("Failed in parsing snapshot param '{param}'")
    })?;
    img.snapshot_load_param(&p).map(|_| ()).map_err(|e| match e {
        Error::Snapshot(SnapshotError::NotSupported) => format!(
            "Failed to load snapshot: Block format '{}' used by device '' does not support temporarily loading internal snapshots",
            img.format().name()
        ),
        e => format!("Failed to load snapshot: {e}"),
    })
}
