//! Temporary snapshot overlays (`qemu-nbd -s`, `qemu-io -s`, `open -s`): the image is
//! opened through a new qcow2 overlay in the temporary directory, so every write lands
//! in the overlay and is gone when the image is closed; the image itself is only read.

use super::{CreateOptions, Image, OpenOptions};
use crate::error::Error;
use crate::format::Format;
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a snapshot overlay could not be set up; front-ends word each stage as their
/// QEMU tool does.
#[derive(Debug)]
pub enum OverlayError {
    /// The image itself does not open (read-only).
    Base(Error),
    /// The name cannot be made into the overlay's backing file name.
    Name(String),
    /// The overlay file cannot be created.
    Create {
        /// The overlay's path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The overlay was created but does not open.
    Overlay(Error),
}

impl fmt::Display for OverlayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverlayError::Base(e) | OverlayError::Overlay(e) => write!(f, "{e}"),
            OverlayError::Name(m) => write!(f, "{m}"),
            OverlayError::Create { path, source } => write!(
                f,
                "Could not create temporary overlay '{}': {source}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for OverlayError {}

impl Image {
    /// Opens `name` (a file name, or with [`OpenOptions::image_opts`] an option list)
    /// under a temporary qcow2 overlay in `$TMPDIR` (default `/var/tmp`): writes go to
    /// the overlay, whose name is removed at once (the open descriptor keeps it until
    /// the image is dropped), as QEMU's snapshot mode does. `opts` apply to the overlay;
    /// the image below is opened read-only, like a backing file.
    pub fn open_temp_overlay(name: &Path, opts: &OpenOptions) -> Result<Image, OverlayError> {
        let tmp = Image::create_temp_overlay(name, opts)?;
        let result = Image::open(
            &tmp,
            &OpenOptions {
                format: Some(Format::Qcow2),
                image_opts: false,
                ..opts.clone()
            },
        );
        let _ = std::fs::remove_file(&tmp);
        result.map_err(OverlayError::Overlay)
    }

    /// Creates the temporary overlay [`Image::open_temp_overlay`] opens and returns its
    /// path, for a caller that must open it more than once (qemu-io's `reopen`); the
    /// caller removes it.
    pub fn create_temp_overlay(name: &Path, opts: &OpenOptions) -> Result<PathBuf, OverlayError> {
        use std::os::unix::fs::OpenOptionsExt;
        // Open errors read as for the image itself, not as a backing file's; the open
        // also tells the format to record for the overlay's backing file.
        let base = Image::open(
            name,
            &OpenOptions {
                read_only: true,
                force_share: true,
                copy_on_read: false,
                hooks: Vec::new(),
                ..opts.clone()
            },
        )
        .map_err(OverlayError::Base)?;
        let format = opts.format.unwrap_or(base.format());
        drop(base);
        let backing = if opts.image_opts {
            // The overlay names its backing file by the same options, as a json: name,
            // with relative file names made absolute (the overlay lives elsewhere).
            let text = name
                .to_str()
                .ok_or_else(|| OverlayError::Name("options are not valid UTF-8".into()))?;
            let mut tree = crate::storage::spec::parse_image_opts(text)
                .map_err(|e| OverlayError::Base(e.into()))?;
            let cwd = std::env::current_dir().map_err(|e| OverlayError::Name(e.to_string()))?;
            tree.absolutize_filenames(&cwd);
            tree.to_json_filename()
        } else if crate::storage::spec::is_plain_path(&name.to_string_lossy()) {
            let abs = std::fs::canonicalize(name).map_err(|e| {
                OverlayError::Name(format!("Could not open '{}': {e}", name.display()))
            })?;
            abs.to_str()
                .ok_or_else(|| {
                    OverlayError::Name(format!("'{}': path is not valid UTF-8", abs.display()))
                })?
                .to_string()
        } else {
            // A protocol URL or json: name stands for itself anywhere.
            name.to_string_lossy().into_owned()
        };
        let dir = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!(
            "vdisk-overlay-{}-{stamp}.qcow2",
            std::process::id()
        ));
        // Claim the name exclusively first: never follow something planted there.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| OverlayError::Create {
                path: tmp.clone(),
                source,
            })?;
        let created = Image::create(
            &tmp,
            &CreateOptions {
                format: Format::Qcow2,
                size: None,
                options: Vec::new(),
                backing_file: Some(backing),
                backing_format: Some(format),
                unsafe_backing: false,
            },
        );
        match created {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(OverlayError::Overlay(e))
            }
        }
    }
}
