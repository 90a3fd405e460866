//! Hostile images: every malformed field gives an error naming the problem, never a
//! panic, a hang or a huge allocation.

mod qcow2_util;
use proptest::prelude::*;
use qcow2_util::*;
use std::sync::Arc;
use vdisk::format::DriverOptions;
use vdisk::storage::MemStorage;
use vdisk::{Format, Image, Repair, ZeroFlags};

/// A small valid image: 4 KiB clusters, 1 MiB, some data, one compressed cluster.
fn base() -> Vec<u8> {
    let d = tmp();
    let f = path(&d, "b.qcow2");
    qemu_create(&f, "cluster_size=4096", "1M");
    qemu_io(
        &f,
        &[
            "write -P 1 0 8k",
            "write -c -P 2 64k 4k",
            "write -P 3 900k 4k",
        ],
    );
    std::fs::read(&f).unwrap()
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
fn get64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

fn open_mem(bytes: Vec<u8>, rw: bool) -> vdisk::Result<Image> {
    Image::open_storage(
        Arc::new(MemStorage::from_vec(bytes)),
        Format::Qcow2,
        &DriverOptions {
            read_only: !rw,
            ..DriverOptions::default()
        },
    )
}

fn open_err(bytes: Vec<u8>, rw: bool) -> String {
    match open_mem(bytes, rw) {
        Ok(_) => panic!("hostile image opened"),
        Err(e) => e.to_string(),
    }
}

/// A named header damage and the error it must produce.
type HeaderCase = (&'static str, Box<dyn Fn(&mut Vec<u8>)>, &'static str);

#[test]
fn header_fields() {
    let b = base();
    let cases: Vec<HeaderCase> = vec![
        (
            "truncated",
            Box::new(|b: &mut Vec<u8>| b.truncate(50)),
            "truncated",
        ),
        ("magic", Box::new(|b: &mut Vec<u8>| b[0] = b'X'), "magic"),
        (
            "version",
            Box::new(|b: &mut Vec<u8>| put32(b, 4, 7)),
            "version",
        ),
        (
            "cluster_bits big",
            Box::new(|b: &mut Vec<u8>| put32(b, 20, 30)),
            "cluster",
        ),
        (
            "cluster_bits small",
            Box::new(|b: &mut Vec<u8>| put32(b, 20, 8)),
            "cluster",
        ),
        (
            "l1 past eof",
            Box::new(|b: &mut Vec<u8>| put64(b, 40, 1 << 40)),
            "L1 table",
        ),
        (
            "l1 unaligned",
            Box::new(|b: &mut Vec<u8>| put64(b, 40, 0x3008)),
            "L1 table",
        ),
        (
            "l1 on header",
            Box::new(|b: &mut Vec<u8>| put64(b, 40, 0)),
            "L1 table",
        ),
        (
            "l1 huge",
            Box::new(|b: &mut Vec<u8>| put32(b, 36, 0x7fff_ffff)),
            "L1 table too large",
        ),
        (
            "l1 too small",
            Box::new(|b: &mut Vec<u8>| put64(b, 24, 1 << 40)),
            "L1 table is too small",
        ),
        (
            "reftable huge",
            Box::new(|b: &mut Vec<u8>| put32(b, 56, 0xffff_ffff)),
            "count table too large",
        ),
        (
            "reftable past eof",
            Box::new(|b: &mut Vec<u8>| put64(b, 48, 1 << 50)),
            "count table",
        ),
        (
            "reftable unaligned",
            Box::new(|b: &mut Vec<u8>| put64(b, 48, 4097)),
            "count table",
        ),
        (
            "snapshots",
            Box::new(|b: &mut Vec<u8>| put32(b, 60, 0x7fff_ffff)),
            "snapshots",
        ),
        (
            "snapshot table eof",
            Box::new(|b: &mut Vec<u8>| {
                put32(b, 60, 3);
                put64(b, 64, 1 << 40)
            }),
            "Snapshot table",
        ),
        (
            "refcount order",
            Box::new(|b: &mut Vec<u8>| put32(b, 96, 7)),
            "refcount",
        ),
        (
            "header_length",
            Box::new(|b: &mut Vec<u8>| put32(b, 100, 0x10_0000)),
            "header_length",
        ),
        (
            "backing name oob",
            Box::new(|b: &mut Vec<u8>| {
                put64(b, 8, 4000);
                put32(b, 16, 500)
            }),
            "Backing file name",
        ),
        (
            "backing name long",
            Box::new(|b: &mut Vec<u8>| {
                put64(b, 8, 512);
                put32(b, 16, 5000)
            }),
            "Backing file name",
        ),
        (
            "unknown incompat",
            Box::new(|b: &mut Vec<u8>| b[78] |= 0x80),
            "Unknown incompatible feature: 8000",
        ),
        (
            "unknown encryption method",
            Box::new(|b: &mut Vec<u8>| put32(b, 32, 3)),
            "encrypted qcow2 images are not supported (crypt_method 3)",
        ),
        (
            "LUKS without its header extension",
            Box::new(|b: &mut Vec<u8>| put32(b, 32, 2)),
            "crypto header at offset 0x0 is missing",
        ),
        (
            "extension overflow",
            Box::new(|b: &mut Vec<u8>| {
                put32(b, 112, 0x1234_5678);
                put32(b, 116, 0xffff_fff0)
            }),
            "extension",
        ),
    ];
    for (name, patch, want) in cases {
        let mut v = b.clone();
        patch(&mut v);
        let e = match open_mem(v, false) {
            Ok(_) => panic!("{name}: hostile image opened"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(want),
            "{name}: error '{e}' should mention '{want}'"
        );
    }
}

#[test]
fn unknown_feature_named_from_table() {
    let d = tmp();
    let f = path(&d, "t.qcow2");
    qemu_create(&f, "cluster_size=65536", "1M");
    let mut b = std::fs::read(&f).unwrap();
    // Rename feature table entry "extended L2 entries" (incompat bit 4) to bit 9.
    let pos = b
        .windows(19)
        .position(|w| w == b"extended L2 entries")
        .unwrap();
    b[pos - 1] = 9;
    b[78] |= 0x02; // incompatible bit 9
    let e = open_err(b, false);
    assert!(e.contains("extended L2 entries"), "{e}");
}

#[test]
fn corrupt_bit_only_read_only() {
    let mut b = base();
    b[79] |= 2;
    let e = open_err(b.clone(), true);
    assert!(e.contains("corrupt"), "{e}");
    let img = open_mem(b, false).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf[0], 1);
}

#[test]
fn autoclear_unknown_bits_cleared_on_rw_open_and_unknown_extension_kept() {
    let d = tmp();
    let f = path(&d, "a.qcow2");
    qemu_create(&f, "cluster_size=4096", "1M");
    let mut b = std::fs::read(&f).unwrap();
    b[95] |= 0x84; // autoclear bits 2 and 7
                   // Insert an unknown extension in front of the feature table.
    let ext_at = 112;
    let mut ext = vec![];
    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    ext.extend_from_slice(&5u32.to_be_bytes());
    ext.extend_from_slice(b"hello\0\0\0");
    b.splice(ext_at..ext_at, ext.iter().copied());
    b.drain(4096 - ext.len()..4096);
    std::fs::write(&f, &b).unwrap();
    {
        let img = open(&f, true);
        img.write_at(&[1, 2, 3], 0).unwrap();
        img.set_backing(None).unwrap();
    }
    let a = std::fs::read(&f).unwrap();
    assert_eq!(a[95] & 0x84, 0, "unknown autoclear bits cleared");
    let pos = a[..4096]
        .windows(8)
        .position(|w| w == b"hello\0\0\0")
        .expect("unknown extension preserved");
    assert_eq!(&a[pos - 8..pos], &[0x12, 0x34, 0x56, 0x78, 0, 0, 0, 5]);
    assert_clean(&f);
}

#[test]
fn bad_tables_error_on_use() {
    let b = base();
    let l1 = get64(&b, 40) as usize;
    // L2 offset past the end of the file.
    let mut v = b.clone();
    put64(&mut v, l1, (1u64 << 63) | (1 << 40));
    let img = open_mem(v, false).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = img.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(e.contains("L2 table"), "{e}");
    // L2 offset unaligned.
    let mut v = b.clone();
    put64(&mut v, l1, (1u64 << 63) | 0x3200);
    let img = open_mem(v, false).unwrap();
    assert!(img
        .read_at(&mut buf, 0)
        .unwrap_err()
        .to_string()
        .contains("L2 table"));
    // Data cluster entry unaligned.
    let mut v = b.clone();
    let l2 = (get64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    put64(&mut v, l2, (1u64 << 63) | 0x5000 | 0x600);
    let img = open_mem(v, false).unwrap();
    assert!(img
        .read_at(&mut buf, 0)
        .unwrap_err()
        .to_string()
        .contains("unaligned"));
    // Garbage compressed entry.
    let mut v = b.clone();
    put64(&mut v, l2 + 16 * 8, (1u64 << 62) | 0x123);
    let img = open_mem(v, false).unwrap();
    assert!(img.read_at(&mut buf, 64 << 10).is_err());
    // Refcount table entry unaligned: writes fail cleanly, check reports it.
    let mut v = b.clone();
    let rt = get64(&b, 48) as usize;
    put64(&mut v, rt, 0x2200);
    let img = open_mem(v, true).unwrap();
    assert!(img.write_at(&[1u8; 4096], 500 << 10).is_err());
    let r = img.check(Repair::default()).unwrap();
    assert!(r.corruptions > 0);
}

/// Opens, reads everything, writes a little and checks; errors are fine, panics not.
fn exercise(bytes: Vec<u8>) {
    if let Ok(img) = open_mem(bytes.clone(), false) {
        let size = img.size().min(2 << 20);
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..n], off);
            off += n as u64;
        }
        let mut off = 0;
        for _ in 0..64 {
            if off >= size {
                break;
            }
            match img.block_status(off, size - off) {
                Ok(e) => off += e.len.max(1),
                Err(_) => break,
            }
        }
        let _ = img.check(Repair::default());
    }
    if let Ok(img) = open_mem(bytes, true) {
        let size = img.size();
        if size > 0 {
            let _ = img.write_at(&[9u8; 5000], size / 3);
            let _ = img.write_zeroes(0, size.min(10000), ZeroFlags::default());
            let _ = img.discard(0, size.min(1 << 20));
            let _ = img.flush();
            let _ = img.check(Repair {
                leaks: true,
                errors: true,
            });
        }
    }
}

/// A small image with extended L2 entries (64 KiB clusters, subclusters of 2 KiB).
fn base_ext() -> Vec<u8> {
    let d = tmp();
    let f = path(&d, "e.qcow2");
    qemu_create(&f, "extended_l2=on,cluster_size=65536", "1M");
    qemu_io(
        &f,
        &[
            "write -P 1 0 5k",
            "write -z 70k 8k",
            "write -c -P 2 128k 64k",
        ],
    );
    std::fs::read(&f).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn fuzz_header_bytes(edits in prop::collection::vec((0usize..512, any::<u8>()), 1..8)) {
        thread_local!(static BASE: Vec<u8> = base());
        let mut b = BASE.with(|b| b.clone());
        for (i, v) in edits { b[i] = v; }
        exercise(b);
    }

    #[test]
    fn fuzz_extended_l2(edits in prop::collection::vec((0usize..6 * 65536, any::<u8>()), 1..16)) {
        thread_local!(static BASE: Vec<u8> = base_ext());
        let mut b = BASE.with(|b| b.clone());
        for (i, v) in edits { if i < b.len() { b[i] = v; } }
        exercise(b);
    }

    #[test]
    fn fuzz_tables(edits in prop::collection::vec((4096usize..7 * 4096, any::<u8>()), 1..16)) {
        thread_local!(static BASE: Vec<u8> = base());
        let mut b = BASE.with(|b| b.clone());
        for (i, v) in edits { if i < b.len() { b[i] = v; } }
        exercise(b);
    }
}

#[test]
fn refcounts_claiming_metadata_free_do_not_destroy_it() {
    // A refcount table whose first entry is lost: the header, tables and data all look
    // free. Writes must fail instead of allocating over them.
    let d = tmp();
    let f = path(&d, "z.qcow2");
    qemu_create(&f, "cluster_size=4096", "1M");
    qemu_io(&f, &["write -P 1 0 8k"]);
    let mut b = std::fs::read(&f).unwrap();
    let rt = get64(&b, 48) as usize;
    put64(&mut b, rt, 0);
    let e = match open_mem(b, true) {
        Ok(img) => img.write_at(&[1, 2, 3], 500_000).unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("overlaps") || e.contains("corrupt"), "{e}");
}

#[test]
fn mappings_onto_metadata_are_refused() {
    let b = base();
    let l1 = get64(&b, 40) as usize;
    let rt = get64(&b, 48);
    // An L2 table placed on the refcount table.
    let mut v = b.clone();
    put64(&mut v, l1, (1u64 << 63) | rt);
    let img = open_mem(v, true).unwrap();
    let e = img.write_at(&[1u8; 10], 0).unwrap_err().to_string();
    assert!(e.contains("overlaps"), "{e}");
    // A data cluster mapped onto the L1 table.
    let mut v = b.clone();
    let l2 = (get64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    put64(&mut v, l2, (1u64 << 63) | l1 as u64);
    let img = open_mem(v, true).unwrap();
    let e = img.write_at(&[1u8; 10], 0).unwrap_err().to_string();
    assert!(e.contains("overlaps"), "{e}");
}

/// A qcow2 file with a version we cannot handle is still probed as qcow2 and refused
/// with qemu's message; it is never opened as raw (which would let writes destroy it).
/// Version 1 is qcow (v1), as in QEMU's probes: refused naming that format.
#[test]
fn unsupported_version_is_probed_as_qcow2_and_refused() {
    let d = tmp();
    let f = path(&d, "v.qcow2");
    for version in [1u32, 9] {
        let mut b = base();
        put32(&mut b, 4, version);
        std::fs::write(&f, &b).unwrap();
        let (want_fmt, want_err) = if version == 1 {
            (
                Format::parse("qcow").unwrap(),
                "the qcow format is not supported by vdisk".to_string(),
            )
        } else {
            (
                Format::Qcow2,
                format!("Unsupported qcow2 version {version}"),
            )
        };
        assert_eq!(Format::probe(&b[..512]), want_fmt, "version {version}");
        for rw in [false, true] {
            let e = match Image::open(
                &f,
                &vdisk::OpenOptions {
                    read_only: !rw,
                    locking: false,
                    ..vdisk::OpenOptions::default()
                },
            ) {
                Ok(img) => panic!("version {version} opened as {:?}", img.format()),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(&want_err), "{e}");
        }
        assert_eq!(std::fs::read(&f).unwrap(), b, "file untouched");
    }
}
