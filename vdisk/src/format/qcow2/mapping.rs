//! The mapping walk: L2 entries decoded into typed runs ([`Run`]), for standard and
//! extended L2 alike (one walk; a standard entry is a cluster of one subcluster), and
//! qcow2's side of the [`Mapper`] contract.
//!
//! Concurrency: the walk runs under the metadata mutex (`Qcow2::lock`) and does bounded
//! work per call (at most `4 * l2_entries` entries; runs of unallocated L1 entries cost
//! one comparison each). Nothing here writes metadata, so there are no crash rules to
//! keep; an invalid entry marks the image corrupt (see `Meta::mark_corrupt`).

use super::l2entry::{EntryFormat, EntryProblem, L2Entry, SubState, Subclusters};
use super::tables::entry;
use super::{compress, Meta, Qcow2};
use crate::error::{Corruption, Problem, Result, Structure};
use crate::format::mapping::{
    Allocation, Compression, GuestOffset, HostOffset, Mapper, Mapping, Run, Store, WriteTarget,
};
use crate::format::Driver;
use crate::storage::Storage;
use std::sync::Arc;

impl Meta {
    /// How this image's L2 entries are laid out.
    pub(crate) fn entry_format(&self) -> EntryFormat {
        EntryFormat {
            cluster_bits: self.g.cluster_bits,
            extended: self.g.ext_l2,
            zero_flag: self.g.version >= 3 && !self.g.ext_l2,
            data_file: self.ext_data,
        }
    }

    /// Decodes the L2 entry (`word`, and `bitmap` with extended L2) of guest cluster
    /// `gc`; an invalid one marks the image corrupt.
    pub(crate) fn decode(&mut self, word: u64, bitmap: u64, gc: u64) -> Result<L2Entry> {
        match L2Entry::decode(word, bitmap, &self.entry_format()) {
            Ok(e) => Ok(self.data_file_entry(word, e)),
            Err(p) => {
                let problem = match p {
                    EntryProblem::Reserved => Problem::ReservedBits {
                        raw: word,
                        guest_cluster: Some(gc),
                    },
                    EntryProblem::Unaligned(host) => Problem::UnalignedHost {
                        guest_cluster: gc,
                        host,
                    },
                    EntryProblem::Bitmap(bitmap) | EntryProblem::CompressedBitmap(bitmap) => {
                        Problem::InvalidBitmap {
                            guest_cluster: gc,
                            bitmap,
                        }
                    }
                    EntryProblem::Unencodable => Problem::Unencodable {
                        guest_cluster: gc,
                        raw: word,
                    },
                };
                Err(self.mark_corrupt(Corruption::new(Structure::L2Table, problem)))
            }
        }
    }

    /// With an external data file, offset 0 with COPIED set (and no zero flag: that
    /// is a plain zero cluster) is guest cluster 0's data at data file offset 0
    /// (QEMU's rule; without a data file, offset 0 means "no host cluster").
    fn data_file_entry(&self, word: u64, e: L2Entry) -> L2Entry {
        match e {
            L2Entry::Normal {
                host: None,
                copied: true,
                sub,
            } if self.ext_data
                && !self.g.ext_l2
                && sub == Subclusters::UNALLOCATED
                && word & super::COMPRESSED == 0 =>
            {
                L2Entry::Normal {
                    host: Some(HostOffset(0)),
                    copied: true,
                    sub: Subclusters::ALLOCATED,
                }
            }
            e => e,
        }
    }

    /// The decoded L2 entry of guest cluster `gc` (unallocated when its L2 table is).
    pub(crate) fn entry_of(&mut self, gc: u64) -> Result<L2Entry> {
        let l1i = (gc >> self.g.l2_bits) as usize;
        let off = self.l1_offset(l1i)?;
        if off == 0 {
            return Ok(L2Entry::UNALLOCATED);
        }
        let s = self.l2_slot(off, l1i)?;
        let (word, bitmap) = self.words(s, gc);
        self.decode(word, bitmap, gc)
    }

    /// The raw words of guest cluster `gc`'s entry in the cached table `slot`.
    fn words(&self, slot: usize, gc: u64) -> (u64, u64) {
        let d = &self.l2.slot(slot).data;
        let w = self.g.l2_word((gc & (self.g.l2_entries - 1)) as usize);
        (entry(d, w), if self.g.ext_l2 { entry(d, w + 1) } else { 0 })
    }

    /// The compression algorithm of this image.
    pub(crate) fn algorithm(&self) -> Compression {
        if self.hdr.compression_type == 1 {
            Compression::Zstd
        } else {
            Compression::Deflate
        }
    }

    /// What byte `q` of a cluster with entry `e` reads as (the copy-on-write source
    /// of an allocation, positioned at `q`).
    pub(crate) fn source_at(&self, e: &L2Entry, q: u64) -> Mapping {
        match *e {
            L2Entry::Compressed { host, sectors } => Mapping::Compressed {
                store: Store::Data,
                host,
                len: L2Entry::compressed_len(sectors, host),
                algorithm: self.algorithm(),
                skip: q,
            },
            L2Entry::Normal { host, sub, .. } => {
                let k = (q / self.g.subcluster()) as u32;
                match (sub.state(k), host) {
                    (SubState::Allocated, Some(h)) => Mapping::Data {
                        store: Store::Data,
                        host: h.add(q),
                        in_place: false,
                    },
                    (SubState::Zero, _) => Mapping::Zero { host: None },
                    _ => Mapping::Unallocated,
                }
            }
        }
    }

    /// The longest run at guest byte `guest` (at most `len > 0` bytes) with one mapping,
    /// looking at no more than `4 * l2_entries` L2 entries.
    pub(crate) fn map_run(&mut self, guest: u64, len: u64) -> Result<Run> {
        let g = self.g;
        let cs = g.cs;
        let scs = g.subcluster();
        let end = guest + len;
        let max_entries = 4 * g.l2_entries;
        let mut run: Option<Run> = None;
        let mut pos = guest;
        let mut examined = 0u64;
        'tables: while pos < end && examined < max_entries {
            let gc = pos >> g.cluster_bits;
            let l1i = (gc >> g.l2_bits) as usize;
            let table_end = ((l1i as u64 + 1) << g.l2_bits << g.cluster_bits).min(end);
            let l2off = self.l1_offset(l1i)?;
            if l2off == 0 {
                if !extend(&mut run, Mapping::Unallocated, table_end - pos) {
                    break;
                }
                pos = table_end;
                continue;
            }
            // One cache lookup per table, not per entry.
            let slot = self.l2_slot(l2off, l1i)?;
            while pos < table_end && examined < max_entries {
                let gc = pos >> g.cluster_bits;
                let (word, bitmap) = self.words(slot, gc);
                examined += 1;
                let in_off = pos & (cs - 1);
                let n = (cs - in_off).min(table_end - pos);
                if word == 0 && bitmap == 0 {
                    // Unallocated (the most common entry of a sparse image): no
                    // decoding needed.
                    if !extend(&mut run, Mapping::Unallocated, n) {
                        break 'tables;
                    }
                    pos += n;
                    continue;
                }
                let e = self.decode(word, bitmap, gc)?;
                let (host, copied, sub) = match e {
                    L2Entry::Compressed { .. } => {
                        // Never part of a longer run.
                        if run.is_none() {
                            run = Some(Run {
                                len: n,
                                mapping: self.source_at(&e, in_off),
                            });
                        }
                        break 'tables;
                    }
                    L2Entry::Normal { host, copied, sub } => (host, copied, sub),
                };
                let mut q = in_off;
                while q < in_off + n {
                    let k = (q / scs) as u32;
                    let piece_end = ((u64::from(k + sub.run_from(k).min(32 - k))) * scs)
                        .min(in_off + n)
                        .max(q + 1);
                    let m = match (sub.state(k), host) {
                        (SubState::Allocated, Some(h)) => Mapping::Data {
                            store: Store::Data,
                            host: h.add(q),
                            in_place: copied && !g.ext_l2,
                        },
                        (SubState::Allocated, None) => {
                            return Err(Corruption::new(
                                Structure::L2Table,
                                Problem::NoHostOffset { guest_cluster: gc },
                            )
                            .into())
                        }
                        (SubState::Zero, h) => Mapping::Zero {
                            host: h.map(|h| h.add(q)),
                        },
                        (SubState::Unallocated, _) => Mapping::Unallocated,
                    };
                    if !extend(&mut run, m, piece_end - q) {
                        break 'tables;
                    }
                    q = piece_end;
                }
                pos += n;
            }
        }
        Ok(run.unwrap_or(Run {
            len,
            mapping: Mapping::Unallocated,
        }))
    }
}

/// Adds `n` bytes mapped as `m` to `run` if they continue it; false if they do not.
#[inline]
fn extend(run: &mut Option<Run>, m: Mapping, n: u64) -> bool {
    match run {
        None => {
            *run = Some(Run { len: n, mapping: m });
            true
        }
        Some(r) if r.mapping.continues(r.len, m) => {
            r.len += n;
            true
        }
        Some(_) => false,
    }
}

impl Mapper for Qcow2 {
    fn guest_size(&self) -> u64 {
        self.size()
    }
    fn store(&self, which: Store) -> &Arc<dyn Storage> {
        match which {
            Store::Metadata => &self.storage,
            Store::Data => &self.data,
        }
    }
    fn backing_image(&self) -> Option<&Arc<dyn Driver>> {
        self.backing.as_ref()
    }
    fn map(&self, guest: GuestOffset, len: u64) -> Result<Run> {
        self.lock().map_run(guest.get(), len)
    }
    fn decompress(
        &self,
        store: Store,
        host: HostOffset,
        len: u64,
        algorithm: Compression,
    ) -> Result<Vec<u8>> {
        // `len` comes from the entry's sector count: at most two clusters.
        let mut src = vec![0u8; len.min(2 * self.g.cs) as usize];
        self.store(store).read_at(&mut src, host.get())?;
        compress::decompress(
            &src,
            self.g.cs as usize,
            algorithm == Compression::Zstd,
            host.get(),
        )
    }
    fn prepare_write(&self, guest: GuestOffset, len: u64) -> Result<WriteTarget<'_>> {
        self.prepare(guest, len)
    }
    fn prepare_in_place(&self, guest: GuestOffset, len: u64) -> Result<Option<WriteTarget<'_>>> {
        self.prepare_in_place_only(guest, len)
    }
    fn data_cipher(&self) -> Option<&crate::crypto::DataCipher> {
        Qcow2::data_cipher(self)
    }
    fn commit(&self, alloc: Allocation) -> Result<()> {
        self.commit_alloc(alloc)
    }
    fn abort(&self, alloc: Allocation) {
        self.abort_alloc(alloc)
    }
}
