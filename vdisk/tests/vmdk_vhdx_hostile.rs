//! Hostile VMDK and VHDX metadata, fuzzed: random byte corruption of the VMDK header,
//! descriptor, grain directory and tables (sparse and stream-optimized), and of the
//! VHDX BAT and metadata region (the parts no CRC protects) is refused with an error
//! or read, written and checked — never a panic, a hang or an unbounded allocation.

use proptest::prelude::*;
use std::sync::Arc;
use vdisk::format::{BackingSpec, CreateSpec, Driver, DriverOptions, Format, ZeroFlags};
use vdisk::storage::{MemStorage, Storage};
use vdisk::Repair;

fn image(fmt: Format, opts: &[(&str, &str)], size: u64) -> Vec<u8> {
    let m: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let spec = CreateSpec {
        size,
        backing: None,
        options: opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    vdisk::format::registry::create_named(fmt, &m, &spec, Some("x.img")).expect("create");
    {
        let d = open(m.clone(), fmt, false).expect("open");
        d.write_at(&[7u8; 65536], 0).expect("write");
        d.write_at(&[9u8; 65536], size - 65536).expect("write");
        d.close().expect("close");
    }
    let mut b = vec![0u8; m.len().unwrap() as usize];
    m.read_at(&mut b, 0).unwrap();
    b
}

fn open(st: Arc<dyn Storage>, fmt: Format, read_only: bool) -> vdisk::Result<Arc<dyn Driver>> {
    vdisk::format::open(
        fmt,
        st,
        &DriverOptions {
            read_only,
            ..DriverOptions::default()
        },
        &mut |_: &BackingSpec| Err(vdisk::error::Invalid::BackingDisabled.into()),
    )
}

/// Reads everything, walks block status, writes (read-write opens), checks: errors are
/// fine, panics are not.
fn exercise(d: &dyn Driver, read_only: bool) {
    let size = d.size().min(64 << 20);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = d.read_at(&mut buf[..n], off);
        off += n as u64;
    }
    let mut off = 0;
    for _ in 0..10_000 {
        if off >= size {
            break;
        }
        match d.block_status(off, size - off) {
            Ok(e) => off += e.len.max(1),
            Err(_) => break,
        }
    }
    if !read_only && size >= 8192 {
        let _ = d.write_at(&[3u8; 4096], 4096);
        let _ = d.write_at(&[4u8; 4096], size - 8192);
        let _ = d.write_zeroes(0, 4096, ZeroFlags::default());
        let _ = d.flush();
    }
    let _ = d.check(Repair::default());
}

fn fuzz(base: &[u8], fmt: Format, ranges: &[(usize, usize)], edits: &[(usize, u8)], ro: bool) {
    let mut img = base.to_vec();
    for (i, &(at, b)) in edits.iter().enumerate() {
        let (lo, len) = ranges[i % ranges.len()];
        let off = lo + at % len;
        if off < img.len() {
            img[off] = b;
        }
    }
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
    if let Ok(d) = open(st, fmt, ro) {
        exercise(&*d, ro);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn fuzzed_vmdk_sparse_never_panics(
        edits in prop::collection::vec((0usize..1 << 20, any::<u8>()), 1..24),
        ro in any::<bool>(),
    ) {
        thread_local!(static BASE: Vec<u8> = image(Format::Vmdk, &[("zeroed_grain", "on")], 4 << 20));
        // Header, descriptor, directories and tables (sectors 0..64), first grains.
        BASE.with(|b| fuzz(b, Format::Vmdk, &[(0, 512), (512, 10240), (10752, 22000), (65536, 4096)], &edits, ro));
    }

    #[test]
    fn fuzzed_vmdk_stream_never_panics(
        edits in prop::collection::vec((0usize..1 << 20, any::<u8>()), 1..24),
        ro in any::<bool>(),
    ) {
        thread_local!(static BASE: Vec<u8> = image(Format::Vmdk, &[("subformat", "streamOptimized")], 4 << 20));
        // Header, tables, the compressed grains' markers and streams.
        BASE.with(|b| fuzz(b, Format::Vmdk, &[(0, 512), (10752, 22000), (65536, 2048)], &edits, ro));
    }

    #[test]
    fn fuzzed_vhdx_never_panics(
        edits in prop::collection::vec((0usize..1 << 20, any::<u8>()), 1..24),
        ro in any::<bool>(),
    ) {
        thread_local!(static BASE: Vec<u8> = image(Format::Vhdx, &[("block_size", "1M")], 4 << 20));
        // BAT (2 MiB), metadata table and items (3 MiB).
        BASE.with(|b| fuzz(b, Format::Vhdx, &[(2 << 20, 64), (3 << 20, 256), ((3 << 20) + 65536, 48)], &edits, ro));
    }
}
