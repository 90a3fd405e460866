//! Persistent dirty bitmaps through the image door: list, add, remove, enable,
//! disable, clear, merge, dirty extents, and the incremental-backup primitive.

use super::Image;
use crate::error::{BitmapError, Result};
use crate::format::bitmap::{BitmapInfo, DirtyBitmap, PersistentBitmaps};
use crate::format::ZeroFlags;

/// Granularity used when none is given: the cluster size, clamped to 4 KiB..64 KiB
/// (QEMU's default for a new bitmap).
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(cs) if cs > 0 => cs.clamp(4096, 65536),
        _ => 65536,
    }
}

impl Image {
    fn pb(&self) -> Result<&dyn PersistentBitmaps> {
        self.driver
            .bitmaps()
            .ok_or_else(|| BitmapError::NotSupported(self.format().name()).into())
    }
    /// Whether the format stores persistent bitmaps.
    pub fn supports_bitmaps(&self) -> bool {
        self.driver.bitmaps().is_some()
    }
    /// The image's persistent bitmaps, in directory order (none for formats without).
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.driver.bitmaps().map(|b| b.list()).unwrap_or_default()
    }
    /// Adds a persistent bitmap, all clean; enabled bitmaps record every later write.
    /// `granularity` defaults to [`default_granularity`].
    pub fn add_bitmap(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        let g = granularity.unwrap_or_else(|| default_granularity(self.cluster_size()));
        self.pb()?.add(name, g, enabled)
    }
    /// Removes a persistent bitmap (its clusters are freed).
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.pb()?.remove(name)
    }
    /// Starts (`true`) or stops recording guest writes in a bitmap.
    pub fn set_bitmap_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.pb()?.set_enabled(name, enabled)
    }
    /// Clears every bit of a bitmap.
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.pb()?.clear(name)
    }
    /// ORs the bits of bitmap `src_name` of `src` (this image or another) into bitmap
    /// `name` of this image.
    pub fn merge_bitmap(&self, name: &str, src: &Image, src_name: &str) -> Result<()> {
        let bits = src.bitmap(src_name)?;
        self.pb()?.merge(name, &bits)
    }
    /// A copy of a bitmap's bits (an inconsistent bitmap is refused).
    pub fn bitmap(&self, name: &str) -> Result<DirtyBitmap> {
        self.pb()?.get(name)
    }
    /// The bitmap `name` itself, shared and live (an enabled bitmap of a read-write
    /// image records later writes in it): what an export reads.
    pub fn bitmap_view(&self, name: &str) -> Result<std::sync::Arc<DirtyBitmap>> {
        self.pb()?.view(name)
    }
    /// The runs of `[offset, offset + len)` as bitmap `name` sees them: `(offset,
    /// length, dirty)`, consecutive.
    pub fn dirty_extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, bool)>> {
        Ok(self.bitmap(name)?.extents(offset, len))
    }
    /// Incremental backup: copies every range dirty in bitmap `name` of this image into
    /// `target` (same guest offsets; zeroes are written as zero writes), then flushes
    /// the target. Returns the bytes copied. The bitmap is read once at the start, so
    /// writes racing with the copy are caught by the next backup.
    pub fn backup_dirty(&self, name: &str, target: &Image) -> Result<u64> {
        let bits = self.bitmap(name)?;
        let mut copied = 0u64;
        let mut buf = Vec::new();
        const CHUNK: u64 = 4 << 20;
        for (off, len, dirty) in bits.extents(0, self.size()) {
            if !dirty {
                continue;
            }
            let end = (off + len).min(self.size()).min(target.size());
            let mut pos = off;
            while pos < end {
                let n = (end - pos).min(CHUNK);
                buf.resize(n as usize, 0);
                self.read_at(&mut buf, pos)?;
                if crate::hook::is_zero(&buf) {
                    target.write_zeroes(pos, n, ZeroFlags::default())?;
                } else {
                    target.write_at(&buf, pos)?;
                }
                copied += n;
                pos += n;
            }
        }
        target.flush()?;
        Ok(copied)
    }
}
