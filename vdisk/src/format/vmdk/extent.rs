//! VMDK extents: flat (a range of a plain file) and sparse (grain directory → grain
//! tables → grains), their tables, the bounded grain table cache and the lookup of one
//! grain, as QEMU's `get_cluster_offset` reads them.
//!
//! Memory: the grain directory is read whole (QEMU's limit: 32 Mi entries, and it must
//! lie inside the file, so a hostile header cannot make us allocate more than the file
//! holds); grain tables are cached, at most `GT_CACHE` (64) of them.

use super::header::{self, Header, Vmdk3Header, SECTOR};
use crate::error::{Corruption, Problem, Result, Structure, VmdkProblem};
use crate::storage::Storage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Grain tables kept in memory per extent.
const GT_CACHE: usize = 64;
/// QEMU's bound of the grain directory (entries).
const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// QEMU's bound of a grain (sectors).
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;

/// What a grain table entry says about one grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Not allocated (backing file or zeroes).
    Unallocated,
    /// Reads as zeroes (zeroed-grain entry).
    Zero,
    /// Stored at this byte offset of the extent file.
    Data(u64),
    /// Compressed, its marker at this byte offset.
    Compressed(u64),
}

/// A sparse extent's geometry and tables.
#[derive(Debug)]
pub struct Sparse {
    /// Grain size in bytes.
    pub grain: u64,
    /// Entries per grain table.
    pub gtes: u64,
    /// Grain directory: sector offsets of the grain tables.
    pub gd: Vec<u32>,
    /// Redundant grain directory, if any.
    pub rgd: Option<Vec<u32>>,
    /// Grains compressed (stream-optimized).
    pub compressed: bool,
    /// Grains carry markers.
    pub markers: bool,
    /// Entry 1 means a zeroed grain.
    pub zero_grain: bool,
    /// The header version.
    pub version: u32,
    /// Grain table cache (sector offset → table), with entries not yet written back.
    cache: Mutex<HashMap<u32, Table>>,
    /// Next free byte of the extent file (grain aligned), under the allocation lock.
    pub next: Mutex<u64>,
}

/// A cached grain table.
#[derive(Debug)]
struct Table {
    entries: Vec<u32>,
    /// Changed in memory since it was last written.
    dirty: bool,
}

/// How an extent stores its bytes.
#[derive(Debug)]
pub enum Layout {
    /// A plain range of the file starting at this byte.
    Flat(u64),
    /// Grain tables.
    Sparse(Sparse),
}

/// One extent of the disk.
#[derive(Debug)]
pub struct Extent {
    /// Its file.
    pub storage: Arc<dyn Storage>,
    /// The file's name as resolved (`None`: the image's own file).
    pub filename: Option<String>,
    /// The extent line's type (`SPARSE`, `FLAT`...; empty for a monolithic sparse file).
    pub kind: String,
    /// First guest byte.
    pub start: u64,
    /// Size in bytes.
    pub len: u64,
    /// Its layout.
    pub layout: Layout,
}

fn bad(s: Structure, p: VmdkProblem) -> crate::Error {
    Corruption::new(s, Problem::Vmdk(p)).into()
}

fn read_table(st: &dyn Storage, off: u64, n: u64, file_len: u64) -> Result<Vec<u32>> {
    let bytes = n * 4;
    if off.checked_add(bytes).is_none_or(|e| e > file_len) {
        return Err(bad(
            Structure::VmdkGrainDirectory,
            VmdkProblem::PastEnd {
                sector: off / SECTOR,
                file_len,
            },
        ));
    }
    let mut b = vec![0u8; bytes as usize];
    st.read_at(&mut b, off)?;
    Ok(b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl Sparse {
    fn new(
        st: &dyn Storage,
        sectors: u64,
        gd_sector: u64,
        rgd_sector: Option<u64>,
        gtes: u64,
        grain_sectors: u64,
    ) -> Result<Sparse> {
        if grain_sectors > MAX_GRAIN_SECTORS {
            return Err(bad(Structure::VmdkHeader, VmdkProblem::Granularity));
        }
        let l1_entry = gtes * grain_sectors;
        if l1_entry == 0 {
            return Err(bad(Structure::VmdkHeader, VmdkProblem::L1EntryInvalid));
        }
        let l1_size = sectors.div_ceil(l1_entry);
        if l1_size > MAX_GD_ENTRIES {
            return Err(bad(Structure::VmdkHeader, VmdkProblem::L1TooBig));
        }
        let file_len = st.len()?;
        let gd_off = gd_sector
            .checked_mul(SECTOR)
            .ok_or_else(|| past(gd_sector, file_len))?;
        let gd = read_table(st, gd_off, l1_size, file_len)?;
        let rgd = match rgd_sector {
            Some(r) if r != 0 => Some(read_table(
                st,
                r.checked_mul(SECTOR).ok_or_else(|| past(r, file_len))?,
                l1_size,
                file_len,
            )?),
            _ => None,
        };
        let grain = grain_sectors * SECTOR;
        Ok(Sparse {
            grain,
            gtes,
            gd,
            rgd,
            compressed: false,
            markers: false,
            zero_grain: false,
            version: 1,
            cache: Mutex::new(HashMap::new()),
            next: Mutex::new(file_len.div_ceil(grain) * grain),
        })
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Table>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the grain table at `sector` (read into the cache if needed; a full
    /// cache writes its changed tables back first, after a data flush).
    fn with_table<R>(
        &self,
        st: &dyn Storage,
        sector: u32,
        f: impl FnOnce(&mut Table) -> R,
    ) -> Result<R> {
        let mut c = self.lock_cache();
        if !c.contains_key(&sector) {
            let file_len = st.len()?;
            let entries =
                read_table(st, sector as u64 * SECTOR, self.gtes, file_len).map_err(|_| {
                    bad(
                        Structure::VmdkGrainTable,
                        VmdkProblem::PastEnd {
                            sector: sector as u64,
                            file_len,
                        },
                    )
                })?;
            if c.len() >= GT_CACHE {
                if c.values().any(|t| t.dirty) {
                    st.flush()?;
                    self.write_back_locked(st, &mut c)?;
                }
                c.clear();
            }
            c.insert(
                sector,
                Table {
                    entries,
                    dirty: false,
                },
            );
        }
        let t = c
            .get_mut(&sector)
            .ok_or(Corruption::new(Structure::VmdkGrainTable, Problem::Missing))?;
        Ok(f(t))
    }

    fn write_back_locked(&self, st: &dyn Storage, c: &mut HashMap<u32, Table>) -> Result<()> {
        for (&sector, t) in c.iter_mut().filter(|(_, t)| t.dirty) {
            let b: Vec<u8> = t.entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            st.write_at(&b, sector as u64 * SECTOR)?;
            // The redundant table of the same directory entry.
            if let Some(r) = self.rgd.as_ref() {
                if let Some(i) = self.gd.iter().position(|&g| g == sector) {
                    if let Some(&rs) = r.get(i).filter(|&&rs| rs != 0 && rs != sector) {
                        st.write_at(&b, rs as u64 * SECTOR)?;
                    }
                }
            }
            t.dirty = false;
        }
        Ok(())
    }

    /// Writes the changed grain tables (and their redundant copies). The caller has
    /// made the grains they point at durable first.
    pub fn write_back(&self, st: &dyn Storage) -> Result<()> {
        let mut c = self.lock_cache();
        self.write_back_locked(st, &mut c)
    }

    /// Whether some grain table entry has not been written back.
    pub fn has_dirty(&self) -> bool {
        self.lock_cache().values().any(|t| t.dirty)
    }

    /// Grain directory index and grain table index of extent byte `rel`.
    pub fn split(&self, rel: u64) -> (usize, usize) {
        let g = rel / self.grain;
        ((g / self.gtes) as usize, (g % self.gtes) as usize)
    }

    fn gd_entry(&self, l1: usize) -> Result<u32> {
        self.gd.get(l1).copied().ok_or_else(|| {
            Corruption::new(
                Structure::VmdkGrainDirectory,
                Problem::IndexOutOfRange {
                    entries: self.gd.len() as u64,
                },
            )
            .entry(l1 as u64)
            .into()
        })
    }

    /// What the tables say about the grain holding extent byte `rel`.
    pub fn lookup(&self, st: &dyn Storage, rel: u64) -> Result<Grain> {
        let (l1, l2) = self.split(rel);
        let gt = self.gd_entry(l1)?;
        if gt == 0 {
            return Ok(Grain::Unallocated);
        }
        let e = self.with_table(st, gt, |t| t.entries[l2])?;
        Ok(match e {
            0 => Grain::Unallocated,
            header::GTE_ZEROED if self.zero_grain => Grain::Zero,
            s if self.compressed => Grain::Compressed(s as u64 * SECTOR),
            s => Grain::Data(s as u64 * SECTOR),
        })
    }

    /// Sets the grain table entry of extent byte `rel` to `value` in the cache; it
    /// reaches the file (and the redundant table) with [`Sparse::write_back`].
    pub fn set_entry(&self, st: &dyn Storage, rel: u64, value: u32) -> Result<()> {
        let (l1, l2) = self.split(rel);
        let gt = self.gd_entry(l1)?;
        if gt == 0 {
            return Err(
                Corruption::new(Structure::VmdkGrainDirectory, Problem::Missing)
                    .entry(l1 as u64)
                    .into(),
            );
        }
        self.with_table(st, gt, |t| {
            t.entries[l2] = value;
            t.dirty = true;
        })
    }
}

fn past(sector: u64, file_len: u64) -> crate::Error {
    bad(
        Structure::VmdkHeader,
        VmdkProblem::PastEnd { sector, file_len },
    )
}

/// Opens the sparse extent in `st` (its first bytes in `head`): VMDK4 (with a stream
/// footer when the directory is at the end) or VMware 3. Returns the layout and the
/// extent's capacity in sectors, and for VMDK4 the header.
pub fn open_sparse(
    st: &dyn Storage,
    head: &[u8],
    read_only: bool,
) -> Result<(Sparse, u64, Option<Header>)> {
    match header::magic(head) {
        header::VMDK3_MAGIC => {
            let h = Vmdk3Header::parse(head)?;
            let s = Sparse::new(
                st,
                h.disk_sectors as u64,
                h.l1dir_offset as u64,
                None,
                4096,
                h.granularity as u64,
            )?;
            Ok((s, h.disk_sectors as u64, None))
        }
        header::VMDK4_MAGIC => {
            let mut h = Header::parse(head)?;
            let file_len = st.len()?;
            if h.gd_offset == header::GD_AT_END {
                let mut f = vec![0u8; 1536];
                let at = (file_len / SECTOR * SECTOR)
                    .checked_sub(1536)
                    .ok_or_else(|| bad(Structure::VmdkHeader, VmdkProblem::InvalidFooter))?;
                st.read_at(&mut f, at)?;
                h = header::parse_footer(&f)?;
            }
            let compressed = h.compressed();
            if h.version > 3 {
                return Err(bad(Structure::VmdkHeader, VmdkProblem::Version(h.version)));
            }
            if h.version == 3 && !read_only && !compressed {
                return Err(bad(Structure::VmdkHeader, VmdkProblem::Version3ReadOnly));
            }
            if h.num_gtes_per_gt > 512 {
                return Err(bad(Structure::VmdkHeader, VmdkProblem::L2TooBig));
            }
            if file_len.div_ceil(SECTOR) < h.grain_offset {
                return Err(bad(
                    Structure::VmdkHeader,
                    VmdkProblem::Truncated {
                        need: h.grain_offset.saturating_mul(SECTOR),
                    },
                ));
            }
            let rgd = (h.flags & header::FLAG_RGD != 0).then_some(h.rgd_offset);
            let mut s = Sparse::new(
                st,
                h.capacity,
                h.gd_offset,
                rgd,
                h.num_gtes_per_gt as u64,
                h.granularity,
            )?;
            s.compressed = compressed;
            s.markers = h.flags & header::FLAG_MARKER != 0;
            s.zero_grain = h.flags & header::FLAG_ZERO_GRAIN != 0;
            s.version = h.version;
            Ok((s, h.capacity, Some(h)))
        }
        _ => Err(bad(Structure::VmdkHeader, VmdkProblem::NotVmdk)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn image() -> MemStorage {
        // One grain table at sector 2 (grain size 1 sector, 4 entries per table),
        // directory at sector 1.
        let m = MemStorage::new();
        let mut h = Header::new_sparse(8, false, true);
        h.granularity = 1;
        h.num_gtes_per_gt = 4;
        h.gd_offset = 1;
        h.flags &= !header::FLAG_RGD;
        h.grain_offset = 3;
        m.write_at(&h.to_bytes(), 0).unwrap();
        m.write_at(&[2, 0, 0, 0, 0, 0, 0, 0], 512).unwrap();
        m.write_at(&[0, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0], 1024)
            .unwrap();
        m.set_len(4096).unwrap();
        m
    }

    #[test]
    fn lookups() {
        let m = image();
        let mut head = vec![0u8; 512];
        m.read_at(&mut head, 0).unwrap();
        let (s, cap, _) = open_sparse(&m, &head, true).unwrap();
        assert_eq!(cap, 8);
        assert_eq!(s.gd, vec![2, 0]);
        assert_eq!(s.lookup(&m, 0).unwrap(), Grain::Unallocated);
        assert_eq!(s.lookup(&m, 512).unwrap(), Grain::Zero);
        assert_eq!(s.lookup(&m, 1024).unwrap(), Grain::Data(9 * 512));
        assert_eq!(s.lookup(&m, 4 * 512).unwrap(), Grain::Unallocated);
        s.set_entry(&m, 0, 7).unwrap();
        assert_eq!(s.lookup(&m, 0).unwrap(), Grain::Data(7 * 512));
        assert!(s.has_dirty());
        let mut b = [0u8; 4];
        m.read_at(&mut b, 1024).unwrap();
        assert_eq!(b, [0; 4]);
        s.write_back(&m).unwrap();
        m.read_at(&mut b, 1024).unwrap();
        assert_eq!(b, [7, 0, 0, 0]);
        assert!(!s.has_dirty());
        assert!(s.set_entry(&m, 4 * 512, 7).is_err());
    }

    #[test]
    fn hostile_headers() {
        let m = image();
        let mut head = vec![0u8; 512];
        m.read_at(&mut head, 0).unwrap();
        let mut h = Header::parse(&head).unwrap();
        h.num_gtes_per_gt = 513;
        let e = open_sparse(&m, &h.to_bytes(), true).unwrap_err();
        assert_eq!(e.to_string(), "L2 table size too big");
        h.num_gtes_per_gt = 4;
        h.capacity = u64::MAX / 2;
        let e = open_sparse(&m, &h.to_bytes(), true).unwrap_err();
        assert_eq!(e.to_string(), "L1 size too big");
        h.capacity = 1 << 20;
        assert!(open_sparse(&m, &h.to_bytes(), true).is_err());
        h.capacity = 8;
        h.version = 4;
        let e = open_sparse(&m, &h.to_bytes(), true).unwrap_err();
        assert_eq!(e.to_string(), "Unsupported VMDK version 4");
        h.version = 3;
        let e = open_sparse(&m, &h.to_bytes(), false).unwrap_err();
        assert_eq!(e.to_string(), "VMDK version 3 must be read only");
        h.version = 1;
        h.grain_offset = 100;
        let e = open_sparse(&m, &h.to_bytes(), true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "File truncated, expecting at least 51200 bytes"
        );
        h.grain_offset = 3;
        h.granularity = 0;
        let e = open_sparse(&m, &h.to_bytes(), true).unwrap_err();
        assert_eq!(e.to_string(), "L1 entry size is invalid");
        h.gd_offset = header::GD_AT_END;
        h.granularity = 1;
        let e = open_sparse(&m, &h.to_bytes(), true).unwrap_err();
        assert_eq!(e.to_string(), "Invalid footer");
    }
}
