//! Creating the files an image consists of besides its own (VMDK's flat and split
//! extents): the [`SiblingFiles`] that `Image::create` hands a format's create.

use crate::error::Result;
use crate::format::SiblingFiles;
use crate::storage::{FileStorage, OpenFileOptions, Storage};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Host files next to the image being created, opened as the image's own file was
/// (same cache mode and locks); remembers the ones it made so a failed create can
/// remove them.
#[derive(Debug)]
pub(crate) struct FileSiblings {
    image: PathBuf,
    opts: OpenFileOptions,
    created: Mutex<Vec<PathBuf>>,
}

impl FileSiblings {
    /// Siblings of the image file at `image`.
    pub(crate) fn new(image: &Path, opts: OpenFileOptions) -> FileSiblings {
        FileSiblings {
            image: image.to_path_buf(),
            opts,
            created: Mutex::new(Vec::new()),
        }
    }

    /// Removes every file this made that did not exist before (after a failed create).
    pub(crate) fn remove_created(&self) {
        let created = std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        for p in created {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl SiblingFiles for FileSiblings {
    fn create(&self, name: &str) -> Result<Arc<dyn Storage>> {
        // Resolved as the image's extents are resolved when it is opened.
        let path = crate::chain::resolve_backing_path(&self.image, name);
        let existed = path.exists();
        let file = FileStorage::open(&path, &self.opts)?;
        if !existed {
            self.created
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(path);
        }
        Ok(Arc::new(file))
    }
}
