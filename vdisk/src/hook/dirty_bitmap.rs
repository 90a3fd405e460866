//! The persistent dirty bitmap hook: every guest change through [`crate::Image`] is
//! recorded in the image's enabled bitmaps.
//!
//! The format keeps the bitmaps (qcow2: [`crate::format::bitmap::PersistentBitmaps`]);
//! this hook is the one place that tells it about changes, for every front-end alike
//! (`io`, `serve`, `convert` targets, `commit`...). [`crate::Image::open`] registers it,
//! after the caller's hooks, on every read-write open of a format that stores bitmaps,
//! so it sees each request in its final form.
//!
//! - `before`: the first change marks the enabled bitmaps in use on disk, durably,
//!   before the driver writes anything (a failure refuses the request).
//! - `after`: the changed range is marked in every enabled bitmap, whether or not the
//!   driver succeeded (a failed write may have changed part of its range). Lock-free:
//!   atomic words, no metadata lock.
//! - Resizes are handled by the format (it resizes every bitmap with the disk).
//!
//! The bitmaps are written back (and their in-use flags cleared) when the image closes.

use super::{Change, Request, WriteHook};
use crate::error::Result;
use crate::format::Driver;
use std::sync::Arc;

/// Records guest changes in the persistent bitmaps of `driver`.
#[derive(Debug)]
pub struct DirtyBitmapHook {
    driver: Arc<dyn Driver>,
}

impl DirtyBitmapHook {
    /// A hook for `driver`, or `None` when its format stores no bitmaps.
    pub fn for_driver(driver: &Arc<dyn Driver>) -> Option<DirtyBitmapHook> {
        driver.bitmaps()?;
        Some(DirtyBitmapHook {
            driver: driver.clone(),
        })
    }
}

impl WriteHook for DirtyBitmapHook {
    fn before(&self, req: &mut Request<'_>) -> Result<()> {
        if matches!(req, Request::Resize { .. }) {
            return Ok(());
        }
        match self.driver.bitmaps() {
            Some(b) => b.before_change(),
            None => Ok(()),
        }
    }
    fn range_only(&self) -> bool {
        true
    }
    fn before_direct_write(&self, _offset: u64, _len: u64) -> Result<()> {
        match self.driver.bitmaps() {
            Some(b) => b.before_change(),
            None => Ok(()),
        }
    }
    fn after(&self, change: &Change, _ok: bool) {
        if matches!(change, Change::Resize { .. }) {
            return;
        }
        if let Some(b) = self.driver.bitmaps() {
            let (offset, len) = change.range();
            b.mark(offset, len);
        }
    }
}
