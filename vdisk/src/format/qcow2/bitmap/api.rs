//! [`PersistentBitmaps`] for qcow2: the operations behind `vdisk bitmap` and the
//! write-tracking entry points of the dirty-bitmap hook.

use super::dir::{DirEntry, FLAG_AUTO, MAX_NAME, MAX_PHYS_BYTES, TYPE_DIRTY};
use super::ext::{MAX_BITMAPS, MAX_DIR_SIZE};
use super::store::{load, read_table};
use super::table::table_entries;
use super::Entry;
use crate::error::{BitmapError, Error, Result};
use crate::format::bitmap::{
    BitmapInfo, DirtyBitmap, PersistentBitmaps, MAX_GRANULARITY, MIN_GRANULARITY,
};
use crate::format::qcow2::{Meta, Qcow2};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn find(m: &Meta, name: &str) -> Result<usize> {
    m.bm.entries
        .iter()
        .position(|e| e.dir.name == name.as_bytes())
        .ok_or_else(|| BitmapError::NotFound(name.to_string()).into())
}

/// The bitmap may be changed: not left inconsistent by another writer, no extra data
/// we do not understand.
fn usable(m: &Meta, i: usize) -> Result<()> {
    let e = &m.bm.entries[i];
    if e.dir.in_use() && !e.owned {
        return Err(BitmapError::Inconsistent(e.dir.name()).into());
    }
    if e.dir.has_unknown_extra() {
        return Err(BitmapError::Unknown(e.dir.name()).into());
    }
    Ok(())
}

impl Qcow2 {
    fn bm_writable(&self, m: &Meta) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        m.check_writable()
    }

    /// Rebuilds the list of bitmaps guest changes are recorded in.
    pub(crate) fn bm_refresh_active(&self, m: &Meta) {
        let active: Vec<Arc<DirtyBitmap>> =
            m.bm.entries
                .iter()
                .filter(|e| e.dir.auto())
                .filter_map(|e| e.mem.clone())
                .collect();
        let mut a = self.bm.active.write().unwrap_or_else(|p| p.into_inner());
        *a = active;
        // Bitmaps not yet marked in use get marked before the next change.
        let all_owned =
            m.bm.entries
                .iter()
                .all(|e| !(e.dir.auto() && e.mem.is_some()) || e.owned);
        self.bm.armed.store(all_owned, Ordering::Release);
    }

    /// Loads bitmap `i` if needed and marks it in use, so its contents may change.
    fn bm_take(&self, m: &mut Meta, i: usize) -> Result<Arc<DirtyBitmap>> {
        usable(m, i)?;
        if m.bm.entries[i].mem.is_none() {
            let b = Arc::new(load(m, i)?);
            m.bm.entries[i].mem = Some(b);
        }
        m.bm_own(&[i])?;
        Ok(m.bm.entries[i].mem.clone().expect("loaded above"))
    }

    /// Before a resize: every bitmap is loaded, marked in use and resized in memory
    /// (stored with tables of the new size at close). Refused while an inconsistent
    /// bitmap exists (its table could not follow the new size).
    pub(crate) fn bm_resize(&self, m: &mut Meta, new_size: u64) -> Result<()> {
        if m.bm.entries.is_empty() {
            return Ok(());
        }
        for i in 0..m.bm.entries.len() {
            let e = &m.bm.entries[i];
            if (e.dir.in_use() && !e.owned) || e.dir.has_unknown_extra() {
                return Err(BitmapError::ResizeInconsistent(e.dir.name()).into());
            }
            let gran = 1u64 << e.dir.granularity_bits;
            let bytes = new_size.div_ceil(gran).div_ceil(8);
            if table_entries(new_size, e.dir.granularity_bits.into(), m.cs()) * m.cs()
                > MAX_PHYS_BYTES
            {
                return Err(BitmapError::TooLarge {
                    name: e.dir.name(),
                    bytes,
                    max: MAX_PHYS_BYTES,
                }
                .into());
            }
        }
        for i in 0..m.bm.entries.len() {
            if m.bm.entries[i].mem.is_none() {
                let b = Arc::new(load(m, i)?);
                m.bm.entries[i].mem = Some(b);
            }
        }
        let all: Vec<usize> = (0..m.bm.entries.len()).collect();
        m.bm_own(&all)?;
        for e in &m.bm.entries {
            if let Some(b) = &e.mem {
                b.resize(new_size);
            }
        }
        self.bm_refresh_active(m);
        Ok(())
    }
}

impl PersistentBitmaps for Qcow2 {
    fn list(&self) -> Vec<BitmapInfo> {
        let m = self.lock();
        m.bm.entries
            .iter()
            .map(|e| BitmapInfo {
                name: e.dir.name(),
                granularity: 1 << e.dir.granularity_bits,
                enabled: e.dir.auto(),
                in_use: e.dir.in_use(),
            })
            .collect()
    }

    fn before_change(&self) -> Result<()> {
        if self.read_only || self.bm.armed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.lock();
        if self.bm.armed.load(Ordering::Acquire) {
            return Ok(());
        }
        let idx: Vec<usize> = (0..m.bm.entries.len())
            .filter(|&i| {
                let e = &m.bm.entries[i];
                e.dir.auto() && e.mem.is_some() && !e.owned
            })
            .collect();
        m.check_writable()?;
        m.bm_own(&idx)?;
        self.bm.armed.store(true, Ordering::Release);
        Ok(())
    }

    fn mark(&self, offset: u64, len: u64) {
        let a = self.bm.active.read().unwrap_or_else(|p| p.into_inner());
        for b in a.iter() {
            b.mark(offset, len);
        }
    }

    fn add(&self, name: &str, granularity: u64, enabled: bool) -> Result<()> {
        let mut m = self.lock();
        if name.is_empty() {
            return Err(BitmapError::EmptyName.into());
        }
        if name.len() > MAX_NAME {
            return Err(BitmapError::NameTooLong(name.to_string()).into());
        }
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
        {
            return Err(BitmapError::Granularity(granularity).into());
        }
        if m.bm.entries.iter().any(|e| e.dir.name == name.as_bytes()) {
            return Err(BitmapError::Exists(name.to_string()).into());
        }
        if m.g.version < 3 {
            return Err(BitmapError::V2Image(name.to_string()).into());
        }
        self.bm_writable(&m)?;
        if m.bm.entries.len() >= MAX_BITMAPS as usize {
            return Err(BitmapError::TooMany.into());
        }
        let cs = m.cs();
        let gbits = granularity.trailing_zeros();
        let ts = table_entries(m.hdr.size, gbits, cs);
        if ts * cs > MAX_PHYS_BYTES {
            return Err(BitmapError::TooLarge {
                name: name.to_string(),
                bytes: ts * cs,
                max: MAX_PHYS_BYTES,
            }
            .into());
        }
        let d = DirEntry {
            table_offset: 0,
            table_size: ts as u32,
            flags: if enabled { FLAG_AUTO } else { 0 },
            kind: TYPE_DIRTY,
            granularity_bits: gbits as u8,
            name: name.as_bytes().to_vec(),
            extra: Vec::new(),
        };
        let dir_len: u64 =
            m.bm.entries
                .iter()
                .map(|e| e.dir.encoded_len() as u64)
                .sum::<u64>()
                + d.encoded_len() as u64;
        if dir_len > MAX_DIR_SIZE {
            return Err(BitmapError::TooMany.into());
        }
        // An all-zero table (every cluster of bits reads as zeroes).
        let tclusters = (ts * 8).div_ceil(cs);
        let toff = m.alloc(tclusters)?;
        m.st.write_at(&vec![0u8; (tclusters * cs) as usize], toff)?;
        m.unflushed = true;
        let mem = Arc::new(DirtyBitmap::new(granularity, m.hdr.size));
        m.bm.entries.push(Entry {
            dir: DirEntry {
                table_offset: toff,
                ..d
            },
            mem: enabled.then_some(mem),
            owned: false,
        });
        if let Err(e) = m.bm_write_dir() {
            m.bm.entries.pop();
            return Err(e);
        }
        self.bm_refresh_active(&m);
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<()> {
        let mut m = self.lock();
        let i = find(&m, name)?;
        self.bm_writable(&m)?;
        let table = read_table(&m, i).unwrap_or_default();
        let e = m.bm.entries.remove(i);
        if let Err(err) = m.bm_write_dir() {
            m.bm.entries.insert(i, e);
            return Err(err);
        }
        m.bm_release(&e.dir, &table)?;
        m.writeback()?;
        self.bm_refresh_active(&m);
        Ok(())
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let mut m = self.lock();
        let i = find(&m, name)?;
        self.bm_writable(&m)?;
        usable(&m, i)?;
        if m.bm.entries[i].dir.auto() == enabled {
            return Ok(());
        }
        if enabled && m.bm.entries[i].mem.is_none() {
            let b = Arc::new(load(&m, i)?);
            m.bm.entries[i].mem = Some(b);
        }
        let e = &mut m.bm.entries[i];
        if enabled {
            e.dir.flags |= FLAG_AUTO;
        } else {
            e.dir.flags &= !FLAG_AUTO;
            if !e.owned {
                e.mem = None;
            }
        }
        m.bm_write_dir()?;
        self.bm_refresh_active(&m);
        Ok(())
    }

    fn clear(&self, name: &str) -> Result<()> {
        let mut m = self.lock();
        let i = find(&m, name)?;
        self.bm_writable(&m)?;
        let b = self.bm_take(&mut m, i)?;
        b.clear();
        self.bm_refresh_active(&m);
        Ok(())
    }

    fn merge(&self, name: &str, src: &DirtyBitmap) -> Result<()> {
        let mut m = self.lock();
        let i = find(&m, name)?;
        self.bm_writable(&m)?;
        let b = self.bm_take(&mut m, i)?;
        b.merge_from(src);
        self.bm_refresh_active(&m);
        Ok(())
    }

    fn get(&self, name: &str) -> Result<DirtyBitmap> {
        let m = self.lock();
        let i = find(&m, name)?;
        let e = &m.bm.entries[i];
        if let Some(b) = &e.mem {
            return Ok(b.snapshot());
        }
        if e.dir.in_use() {
            return Err(BitmapError::Inconsistent(e.dir.name()).into());
        }
        load(&m, i)
    }

    fn view(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        let mut m = self.lock();
        let i = find(&m, name)?;
        if let Some(b) = &m.bm.entries[i].mem {
            return Ok(b.clone());
        }
        if m.bm.entries[i].dir.in_use() {
            return Err(BitmapError::Inconsistent(m.bm.entries[i].dir.name()).into());
        }
        let b = Arc::new(load(&m, i)?);
        // Kept, so that later views (and a later enable) share it.
        m.bm.entries[i].mem = Some(b.clone());
        Ok(b)
    }

    fn store(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.lock();
        m.bm_store()?;
        self.bm_refresh_active(&m);
        Ok(())
    }
}
