//! One layer of an open image's backing chain, seen from the image: what `info
//! --backing-chain`, `map`, `compare`, `convert` and `rebase` need to know about a layer
//! (format, size, name, cluster size, status) and read-only access to it.
//!
//! A layer view never writes: guest writes and metadata changes go through
//! [`crate::Image`] only, where write hooks see them. Reads through a layer go to its
//! driver (and its own backing chain) without the image's hooks: hooks belong to the
//! image, not to the files below it.

use crate::chain::{self, MAX_CHAIN_DEPTH};
use crate::error::Result;
use crate::format::{BackingSpec, Driver, Extent, Format, FormatSpecific, SnapshotInfo};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A read-only view of one image of a chain. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ImageLayer {
    driver: Arc<dyn Driver>,
    path: PathBuf,
    depth: usize,
}

impl ImageLayer {
    /// The chain starting at `top` (opened as `path`), top first. Backing names are
    /// resolved against the directory of the image naming them, as QEMU's
    /// `full-backing-filename`, and a `json:` backing is shown by its host file; a
    /// layer without a recorded name gets an empty path.
    pub(crate) fn chain(top: &Arc<dyn Driver>, path: &Path) -> Vec<ImageLayer> {
        let mut out = vec![ImageLayer {
            driver: top.clone(),
            path: path.to_path_buf(),
            depth: 0,
        }];
        while let Some(last) = out.last() {
            let Some(b) = last.driver.backing().cloned() else {
                break;
            };
            let path = match last.driver.backing_spec() {
                Some(spec) => chain::backing_file_path(&last.path, &spec.name),
                None => PathBuf::new(),
            };
            let depth = last.depth + 1;
            out.push(ImageLayer {
                driver: b,
                path,
                depth,
            });
            if out.len() > MAX_CHAIN_DEPTH + 1 {
                break;
            }
        }
        out
    }

    /// Position in the chain: 0 = the image itself, 1 = its backing file, ...
    pub fn depth(&self) -> usize {
        self.depth
    }
    /// The file name: the image's name as opened for the top layer, otherwise the
    /// backing name resolved against the directory of the image naming it.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The layer's format.
    pub fn format(&self) -> Format {
        self.driver.format()
    }
    /// The layer's guest size.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }
    /// Allocation unit, if the format has one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.driver.cluster_size()
    }
    /// Format-specific information (`info`'s `format-specific`).
    pub fn format_specific(&self) -> FormatSpecific {
        self.driver.format_specific()
    }
    /// Whether block status of the layer's data runs is refined by the host file's own
    /// status (QEMU's `BDRV_BLOCK_RECURSE`).
    pub fn file_status_refines(&self) -> bool {
        self.driver.file_status_refines()
    }
    /// Whether holes of the host file under the layer's data runs read as zeroes, so
    /// a copy may skip them ([`Driver::file_holes_read_zero`]).
    pub fn file_holes_read_zero(&self) -> bool {
        self.driver.file_holes_read_zero()
    }
    /// The external data file holding this layer's guest data (host offsets of its
    /// block status are in that file), if it has one.
    pub fn external_data(&self) -> Option<String> {
        self.driver.external_data()
    }
    /// The file holding the data at guest `offset` when the image names several (VMDK
    /// extent files; see [`crate::format::Driver::data_file_at`]).
    pub fn data_file_at(&self, offset: u64) -> Option<crate::format::DataFileAt> {
        self.driver.data_file_at(offset)
    }
    /// How the image is encrypted (`None`: it is not).
    pub fn encryption(&self) -> Option<crate::format::EncryptionInfo> {
        self.driver.encryption()
    }
    /// Whether the layer is marked dirty.
    pub fn is_dirty(&self) -> bool {
        self.driver.is_dirty()
    }
    /// The layer's internal snapshots.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.driver.snapshots()
    }
    /// The backing file this layer's header names.
    pub fn backing_spec(&self) -> Option<BackingSpec> {
        self.driver.backing_spec()
    }
    /// Whether a backing image is open below this layer.
    pub fn has_backing(&self) -> bool {
        self.driver.backing().is_some()
    }
    /// Status of the range starting at `offset` in this layer only (unallocated means
    /// "read from below").
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.driver.block_status(offset, len)
    }
    /// Reads what the image above sees of this layer: the layer's contents (through its
    /// own backing chain), with bytes past its end reading as zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::format::read_backing(Some(&self.driver), buf, offset)
    }
    /// The name a tool shows for this layer's file: QEMU's canonical name of a network
    /// storage (`nbd+unix:///e?socket=s`), else [`ImageLayer::path`].
    pub fn display_name(&self) -> String {
        self.driver
            .storage()
            .exact_filename()
            .unwrap_or_else(|| self.path.display().to_string())
    }
    /// Length of the layer's host file.
    pub fn file_length(&self) -> Result<u64> {
        Ok(self.driver.storage().len()?)
    }
    /// Whether the host file has data at `offset`, and for how many bytes that holds
    /// (SEEK_DATA/SEEK_HOLE).
    pub fn file_extent_at(&self, offset: u64) -> Result<(bool, u64)> {
        Ok(self.driver.storage().extent_at(offset)?)
    }
}
