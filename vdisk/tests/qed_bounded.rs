//! Memory stays bounded whatever the geometry: a legal but hostile header (64 MiB
//! clusters, 16-cluster tables: a 1 GiB L1 and 1 GiB L2 tables) must not make any
//! operation read, write or build gigabyte buffers, nor allocate a whole table on disk.
//!
//! The storage under test refuses every single I/O larger than [`MAX_IO`] (before any
//! data moves), so a driver that loads or writes a table whole fails here instead of
//! quietly allocating gigabytes; the file's allocated blocks show what reached the disk.

mod qed_util;

use qed_util::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vdisk::format::qed::Qed;
use vdisk::format::{BackingSpec, CreateSpec, Driver, DriverOptions, ExtentKind, ZeroFlags};
use vdisk::storage::{
    FileStorage, OpenFileOptions, Storage, StorageError, StorageOp, StorageResult,
};
use vdisk::Repair;

/// Largest single read or write allowed (the driver's bounded pieces are 1 MiB).
const MAX_IO: u64 = 1 << 20;

/// Passes I/O through, refusing (and counting) oversized requests.
#[derive(Debug)]
struct Bounded {
    inner: Arc<dyn Storage>,
    refused: AtomicU64,
    largest: AtomicU64,
}

impl Bounded {
    fn check(&self, len: usize, op: StorageOp, offset: u64) -> StorageResult<()> {
        self.largest.fetch_max(len as u64, Ordering::Relaxed);
        if len as u64 > MAX_IO {
            self.refused.fetch_add(1, Ordering::Relaxed);
            // The op, the offset and ENOMEM say it: an unbounded access of `len` bytes.
            return Err(StorageError::op(
                op,
                "test storage",
                Some(offset),
                std::io::Error::from_raw_os_error(12), // ENOMEM
            ));
        }
        Ok(())
    }
}

impl Storage for Bounded {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        self.check(buf.len(), StorageOp::Read, offset)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        self.check(buf.len(), StorageOp::Write, offset)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> StorageResult<()> {
        self.inner.flush()
    }
    fn len(&self) -> StorageResult<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> StorageResult<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.inner.allocate(offset, len)
    }
    fn extent_at(&self, offset: u64) -> StorageResult<(bool, u64)> {
        self.inner.extent_at(offset)
    }
}

fn file_storage(path: &Path, create: bool) -> Arc<dyn Storage> {
    Arc::new(
        FileStorage::open(
            path,
            &OpenFileOptions {
                create,
                ..OpenFileOptions::default()
            },
        )
        .expect("open file storage"),
    )
}

fn create(path: &Path, size: u64, cluster: &str, table: &str) {
    let st = file_storage(path, true);
    vdisk::format::qed::create(
        &st,
        &CreateSpec {
            size,
            backing: None,
            options: vec![
                ("cluster_size".into(), cluster.into()),
                ("table_size".into(), table.into()),
            ],
        },
    )
    .expect("create");
    st.flush().expect("flush");
}

fn open_bounded(path: &Path) -> (Qed, Arc<Bounded>) {
    let b = Arc::new(Bounded {
        inner: file_storage(path, false),
        refused: AtomicU64::new(0),
        largest: AtomicU64::new(0),
    });
    let st: Arc<dyn Storage> = b.clone();
    let d = Qed::open(st, &DriverOptions::default(), &mut |_s: &BackingSpec| {
        Err(vdisk::error::Invalid::BackingDisabled.into())
    })
    .expect("open a huge-table image with bounded I/O");
    (d, b)
}

/// Bytes of disk the file really uses.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

#[test]
fn huge_tables_are_paged_not_loaded() {
    let dir = tmp();
    let path = path_in(&dir, "s.qed");
    create(&path, 1 << 30, "64M", "16");
    let (d, b) = open_bounded(&path);
    let mut buf = vec![0u8; 65536];
    d.read_at(&mut buf, 8 << 20).expect("read");
    assert!(buf.iter().all(|x| *x == 0));
    d.write_at(&[3u8; 65536], 8 << 20).expect("write");
    d.write_at(&[4u8; 4096], 200 << 20)
        .expect("write in a second cluster");
    d.read_at(&mut buf, 8 << 20).expect("read back");
    assert!(buf.iter().all(|x| *x == 3));
    // Zeroing part of a (64 MiB) cluster and whole clusters.
    d.write_zeroes(8 << 20, 4096, ZeroFlags::default())
        .expect("partial zeroes");
    d.write_zeroes(128 << 20, 64 << 20, ZeroFlags::default())
        .expect("cluster zeroes");
    let e = d.block_status(0, d.size()).expect("status");
    assert_eq!(e.kind, ExtentKind::Data);
    let r = d.check(Repair::default()).expect("check");
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    assert_eq!(r.allocated_clusters, Some(2), "{r:?}");
    let r = d
        .check(Repair {
            leaks: true,
            errors: true,
        })
        .expect("repair");
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    d.resize(128 << 20, true).expect("shrink");
    d.read_at(&mut buf, 8 << 20).expect("read after shrink");
    assert_eq!(buf[4096..], [3u8; 61440][..]);
    d.close().expect("close");
    drop(d);
    assert_eq!(
        b.refused.load(Ordering::Relaxed),
        0,
        "unbounded I/O (largest {} bytes)",
        b.largest.load(Ordering::Relaxed)
    );
    drop(b);
    // Header + L1 (1 GiB, sparse) + one 64 MiB data cluster + an L2 table that must
    // not be written whole (1 GiB).
    let used = allocated(&path);
    assert!(used < 200 << 20, "file uses {used} bytes of disk");
    // A fresh open finds everything consistent and in place.
    let (d, _) = open_bounded(&path);
    let r = d.check(Repair::default()).expect("check after reopen");
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    d.read_at(&mut buf, 8 << 20).expect("read after reopen");
    assert_eq!(buf[..4096], [0u8; 4096][..]);
    assert_eq!(buf[4096..], [3u8; 61440][..]);
}

#[test]
fn sparse_64t_image_maps_a_page_of_l1_per_step() {
    let dir = tmp();
    let path = path_in(&dir, "t.qed");
    // Default geometry: 32768 L1 entries of 2 GiB each for 64 TiB.
    create(&path, 64 << 40, "64k", "4");
    let (d, b) = open_bounded(&path);
    d.write_at(&[1u8; 4096], 40 << 40).expect("write far out");
    let mut calls = 0;
    let mut off = 0;
    let mut data = 0;
    while off < d.size() {
        let e = d.block_status(off, d.size() - off).expect("status");
        if e.kind == ExtentKind::Data {
            data += e.len;
        }
        off += e.len;
        calls += 1;
        assert!(
            calls < 64,
            "block status walks the empty L1 entries one by one"
        );
    }
    assert_eq!(data, 65536);
    let r = d.check(Repair::default()).expect("check");
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    d.close().expect("close");
    drop(d);
    assert_eq!(b.refused.load(Ordering::Relaxed), 0);
    drop(b);
    assert_qemu_clean(&path);
}

/// Allocating writes into 64 MiB clusters over a backing file copy the backing data
/// around the write in bounded pieces, zeroes past the backing file's end.
#[test]
fn huge_cluster_fill_from_backing() {
    let dir = tmp();
    let path = path_in(&dir, "b.qed");
    create(&path, 256 << 20, "64M", "16");
    // Name a backing file in the header (the resolver below supplies it).
    {
        let (d, _) = open_bounded(&path);
        d.set_backing_spec(Some(&BackingSpec {
            name: "base.raw".into(),
            format: Some(vdisk::Format::Raw),
        }))
        .expect("set backing");
        d.close().expect("close");
    }
    let backing_len = (9 << 20) + 5000; // ends inside a fill piece
    let pattern: Vec<u8> = (0..backing_len)
        .map(|i| (i / 4096 % 251) as u8 + 1)
        .collect();
    let open = |path: &Path| {
        let b = Arc::new(Bounded {
            inner: file_storage(path, false),
            refused: AtomicU64::new(0),
            largest: AtomicU64::new(0),
        });
        let st: Arc<dyn Storage> = b.clone();
        let backing = raw_backing(pattern.clone());
        let d = Qed::open(st, &DriverOptions::default(), &mut |_s: &BackingSpec| {
            Ok(backing.clone())
        })
        .expect("open with backing");
        (d, b)
    };
    let mut want = vec![0u8; 128 << 20];
    want[..backing_len].copy_from_slice(&pattern);
    {
        let (d, b) = open(&path);
        // Inside the backing data, and in a second cluster past its end.
        d.write_at(&[0xAAu8; 8192], (4 << 20) + 512).expect("write");
        want[(4 << 20) + 512..(4 << 20) + 512 + 8192].fill(0xAA);
        d.write_at(&[0xBBu8; 4096], 100 << 20).expect("write");
        want[100 << 20..(100 << 20) + 4096].fill(0xBB);
        d.close().expect("close");
        drop(d);
        assert_eq!(b.refused.load(Ordering::Relaxed), 0);
    }
    let (d, b) = open(&path);
    let e = d.block_status(0, 64 << 20).expect("status");
    assert_eq!((e.kind, e.len), (ExtentKind::Data, 64 << 20));
    let mut got = vec![0u8; 1 << 20];
    for off in (0..want.len()).step_by(got.len()) {
        d.read_at(&mut got, off as u64).expect("read");
        assert!(
            got[..] == want[off..off + got.len()],
            "contents differ in the MiB at {off:#x}"
        );
    }
    let r = d.check(Repair::default()).expect("check");
    assert_eq!(
        (r.corruptions, r.leaks, r.allocated_clusters),
        (0, 0, Some(2)),
        "{r:?}"
    );
    drop(d);
    assert_eq!(b.refused.load(Ordering::Relaxed), 0);
}
