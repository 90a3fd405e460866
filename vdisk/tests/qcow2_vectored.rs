//! The generic vectored data path through qcow2: vectored writes and reads split at
//! mapping boundaries (allocated, unallocated over a backing file, zero, compressed),
//! compared with a model and with qemu-img's view of the result.

mod qcow2_util;

use qcow2_util::{assert_clean, qemu_io, qemu_raw, run};
use std::io::{IoSlice, IoSliceMut};
use vdisk::format::ZeroFlags;
use vdisk::{Image, OpenOptions};

const CS: usize = 64 << 10;
const SIZE: usize = 16 * CS + 4096;

/// Deterministic bytes.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Splits `len` bytes into uneven pieces (1 byte .. a few KiB, some empty).
fn cuts(seed: u32, len: usize) -> Vec<usize> {
    let p = pattern(seed, 64);
    let mut v = Vec::new();
    let mut left = len;
    let mut i = 0;
    while left > 0 {
        let n = match p[i % p.len()] % 5 {
            0 => 0,
            1 => 1,
            2 => 511,
            3 => 4096,
            _ => 3 * CS / 2,
        }
        .min(left);
        v.push(n);
        left -= n;
        i += 1;
    }
    v
}

fn write_v(img: &Image, data: &[u8], off: u64, seed: u32) {
    let mut slices = Vec::new();
    let mut p = 0;
    for n in cuts(seed, data.len()) {
        slices.push(IoSlice::new(&data[p..p + n]));
        p += n;
    }
    img.write_vectored(&slices, off).unwrap();
}

fn read_v(img: &Image, len: usize, off: u64, seed: u32) -> Vec<u8> {
    let mut out = vec![0xaau8; len];
    {
        let mut slices = Vec::new();
        let mut rest: &mut [u8] = &mut out;
        for n in cuts(seed, len) {
            let (a, b) = rest.split_at_mut(n);
            slices.push(IoSliceMut::new(a));
            rest = b;
        }
        img.read_vectored(&mut slices, off).unwrap();
    }
    out
}

#[test]
fn vectored_io_over_a_backing_file_matches_the_model_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let b = base.to_str().unwrap();
    let t = top.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", b, &SIZE.to_string()],
    );
    // Base: data in clusters 1-3, a compressed cluster 6, a tail in the last cluster.
    qemu_io(
        &base,
        &[
            "write -P 0x11 65536 196608",
            "write -c -P 0x22 393216 65536",
            "write -P 0x33 1048576 4096",
        ],
    );
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t],
    );
    qemu_io(
        &top,
        &["write -c -P 0x44 524288 65536", "write -z 655360 65536"],
    );

    let mut model = vec![0u8; SIZE];
    model[65536..65536 + 196608].fill(0x11);
    model[393216..393216 + 65536].fill(0x22);
    model[1048576..1048576 + 4096].fill(0x33);
    model[524288..524288 + 65536].fill(0x44);
    model[655360..655360 + 65536].fill(0);

    let img = Image::open(&top, &OpenOptions::default()).unwrap();
    assert_eq!(read_v(&img, SIZE, 0, 1), model, "initial vectored read");
    // Writes crossing allocated/unallocated/compressed/zero clusters, partial at
    // both ends (COW from the backing file, the compressed cluster, zero cluster).
    let cases: [(usize, usize); 8] = [
        // Inside the top's compressed cluster and the base's compressed cluster.
        (530_000, 10_000),
        (395_000, 100),
        (1000, 70_000),
        (60_000, 400_000),
        (500_000, 100_000),
        (650_000, 20_000),
        (SIZE - 5000, 5000),
        (3, 1),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u32 + 7, len);
        write_v(&img, &data, off as u64, i as u32 + 3);
        model[off..off + len].copy_from_slice(&data);
        assert_eq!(
            read_v(&img, SIZE, 0, i as u32 + 11),
            model,
            "after write {i} at {off}+{len}"
        );
    }
    img.write_zeroes(70_000, 3000, ZeroFlags::default())
        .unwrap();
    model[70_000..73_000].fill(0);
    // Plain reads agree with vectored ones.
    let mut plain = vec![0u8; SIZE];
    img.read_at(&mut plain, 0).unwrap();
    assert_eq!(plain, model);
    img.close().unwrap();
    drop(img);

    assert_clean(&top);
    assert_eq!(qemu_raw(&top), model, "qemu-img's view");
}
