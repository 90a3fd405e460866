//! The storage fast paths (issue 16): allocating writes whose copy-on-write regions read
//! as zeroes write only the guest's bytes (fresh space past the end of the file is
//! reserved, space inside it zeroed by a zero-range fallocate), O_DIRECT requests of whole blocks go down in
//! one call whatever their pieces' alignment, and the length is not re-read per request.
//! Every case is checked against qemu: `qemu-img check` and `qemu-img compare` with the
//! same writes made by qemu-io.

mod qcow2_util;

use qcow2_util::*;
use std::io::IoSlice;
use vdisk::storage::{CacheMode, FileStorage, LockMode, OpenFileOptions, Storage};
use vdisk::{Image, OpenOptions};

/// Writes (offset, length, pattern byte) every case makes: cluster starts, middles and
/// ends, sub-sector and unaligned requests, requests across clusters and a long one.
const WRITES: &[(u64, u64, u8)] = &[
    (0, 4096, 0x11),
    (65536 + 32768, 4096, 0x22),
    (3 * 65536 - 4096, 4096, 0x33),
    (5 * 65536 + 1000, 512, 0x44),
    (7 * 65536 + 100, 3, 0x55),
    (9 * 65536 - 8192, 16384, 0x66),
    (20 * 65536 + 4096, 3 << 20, 0x77),
    // Into clusters already allocated above (in place, not allocating).
    (4096, 4096, 0x88),
    (5 * 65536, 512, 0x99),
    // Far past everything written so far, then back below it.
    (900 * 65536 + 12288, 4096, 0xaa),
    (400 * 65536 + 512, 1024, 0xbb),
];

fn qemu_io_writes(path: &std::path::Path) {
    let cmds: Vec<String> = WRITES
        .iter()
        .map(|(o, l, b)| format!("write -P {b} {o} {l}"))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(path, &refs);
}

fn vdisk_writes(path: &std::path::Path, cache: CacheMode, locking: bool) {
    let img = Image::open(
        path,
        &OpenOptions {
            cache,
            locking,
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    for &(o, l, b) in WRITES {
        let data = vec![b; l as usize];
        // Split in two pieces so the vectored path (and its gathering) is exercised.
        let cut = (l / 3) as usize;
        img.write_vectored(&[IoSlice::new(&data[..cut]), IoSlice::new(&data[cut..])], o)
            .unwrap_or_else(|e| panic!("write {o}+{l}: {e}"));
    }
    img.flush().unwrap();
    img.close().unwrap();
}

fn compare(a: &std::path::Path, b: &std::path::Path) {
    let (code, out, err) = run_status("qemu-img", &["compare", p(a), p(b)]);
    assert_eq!(code, 0, "qemu-img compare {} {}: {out}{err}", p(a), p(b));
}

#[test]
fn fresh_allocations_match_qemu_in_every_cache_mode() {
    let d = tmp();
    let want = path(&d, "qemu.qcow2");
    qemu_create(&want, "", "64M");
    qemu_io_writes(&want);
    assert_clean(&want);
    for cache in [CacheMode::None, CacheMode::Writeback] {
        // locking on: the length bound is trusted and fresh space is not touched;
        // locking off: the same requests take the zero-range path.
        for locking in [true, false] {
            let img = path(&d, &format!("v-{cache:?}-{locking}.qcow2"));
            qemu_create(&img, "", "64M");
            vdisk_writes(&img, cache, locking);
            assert_clean(&img);
            let len = std::fs::metadata(&img).unwrap().len();
            assert_eq!(len % 65536, 0, "the file ends on a cluster boundary");
            compare(&want, &img);
            // Bit-exact through vdisk's own reader as well.
            assert_same(
                &read_all(&open(&img, false)),
                &qemu_raw(&want),
                &format!("{cache:?} locking={locking}"),
            );
        }
    }
}

#[test]
fn allocations_over_a_backing_file_copy_what_it_holds() {
    // The backing file covers only the first 4 MiB: COW regions below its end are
    // real data (the bytes must be copied), above it they read as zeroes.
    let d = tmp();
    let base = path(&d, "base.qcow2");
    qemu_create(&base, "", "4M");
    qemu_io(&base, &["write -P 0xc3 0 4M"]);
    let mk = |name: &str| {
        let img = path(&d, name);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                p(&base),
                "-F",
                "qcow2",
                p(&img),
                "64M",
            ],
        );
        img
    };
    let want = mk("qemu.qcow2");
    qemu_io_writes(&want);
    for cache in [CacheMode::None, CacheMode::Writeback] {
        let img = mk(&format!("v-{cache:?}.qcow2"));
        vdisk_writes(&img, cache, true);
        assert_clean(&img);
        compare(&want, &img);
    }
}

fn file(path: &std::path::Path, cache: CacheMode, lock: LockMode) -> FileStorage {
    FileStorage::open(
        path,
        &OpenFileOptions {
            read_only: false,
            cache,
            lock,
            create: true,
        },
    )
    .unwrap()
}

#[test]
fn zero_fresh_never_leaves_stale_bytes() {
    let d = tmp();
    for cache in [CacheMode::None, CacheMode::Writeback] {
        for lock in [LockMode::for_open(false, false), LockMode::Off] {
            let f = path(&d, "f.raw");
            let st = file(&f, cache, lock);
            let junk = vdisk::storage::pool::get(256 << 10);
            let mut junk = junk;
            junk.fill(0xee);
            st.write_at(&junk, 0).unwrap();
            // Inside the file: stale bytes must read as zeroes afterwards.
            assert!(st.zero_fresh(64 << 10, 64 << 10).unwrap());
            let mut back = vec![1u8; 256 << 10];
            st.read_at(&mut back, 0).unwrap();
            assert!(back[..64 << 10].iter().all(|&b| b == 0xee));
            assert!(back[64 << 10..128 << 10].iter().all(|&b| b == 0));
            assert!(back[128 << 10..].iter().all(|&b| b == 0xee));
            // Past the end: reads as zeroes with or without a call.
            let end = st.len().unwrap();
            assert!(st.zero_fresh(end + 65536, 65536).unwrap());
            // The storage covers the whole range (formats allocating at the end of the
            // file count on whole clusters).
            assert_eq!(st.len().unwrap(), end + 131072);
            let mut tail = vec![1u8; 65536];
            st.read_at(&mut tail, end + 65536).unwrap();
            assert!(tail.iter().all(|&b| b == 0));
            // A shrink lowers the bound; the space freed reads as zeroes after regrowing.
            st.set_len(64 << 10).unwrap();
            assert!(st.zero_fresh(128 << 10, 4096).unwrap());
            st.write_at(&junk[..4096], 192 << 10).unwrap();
            let mut mid = vec![1u8; 4096];
            st.read_at(&mut mid, 128 << 10).unwrap();
            assert!(mid.iter().all(|&b| b == 0));
            drop(st);
            std::fs::remove_file(&f).unwrap();
        }
    }
}

#[test]
fn direct_whole_blocks_from_unaligned_pieces() {
    let d = tmp();
    let f = path(&d, "d.raw");
    let st = file(&f, CacheMode::None, LockMode::for_open(false, false));
    // Pieces of 1000 + 7192 + 8192 bytes, the first two not aligned: 16 KiB in all.
    let a = vec![1u8; 1000];
    let b = vec![2u8; 7192];
    let c = vdisk::storage::pool::get(8192);
    let mut c = c;
    c.fill(3);
    st.write_vectored_at(&[&a, &b, &c], 8192).unwrap();
    let mut x = vec![0u8; 3000];
    let mut y = vec![0u8; 13384];
    st.read_vectored_at(&mut [&mut x, &mut y], 8192).unwrap();
    let mut all = x.clone();
    all.extend_from_slice(&y);
    assert!(all[..1000].iter().all(|&v| v == 1));
    assert!(all[1000..8192].iter().all(|&v| v == 2));
    assert!(all[8192..].iter().all(|&v| v == 3));
    // Unaligned ends still work (read-modify-write).
    st.write_vectored_at(&[&a[..10], &b[..20]], 8192 + 5)
        .unwrap();
    let mut z = vec![0u8; 40];
    st.read_at(&mut z, 8192).unwrap();
    assert_eq!(&z[..5], &[1; 5]);
    assert_eq!(&z[5..15], &[1; 10]);
    assert_eq!(&z[15..35], &[2; 20]);
    assert_eq!(st.len().unwrap(), 8192 + 16384);
    // A padded direct write past the end is trimmed back to its intended end.
    st.write_at(&[9u8; 100], 8192 + 16384).unwrap();
    assert_eq!(st.len().unwrap(), 8192 + 16384 + 100);
}
