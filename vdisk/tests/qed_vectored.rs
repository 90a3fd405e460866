//! The generic vectored data path through QED: writes and reads made of many uneven
//! buffers, crossing allocated, unallocated (over a backing file that ends early) and
//! zero clusters and L2 table boundaries, checked against a model after every request
//! and against qemu-img's view and check at the end.

mod qed_util;

use qed_util::*;
use std::io::{IoSlice, IoSliceMut};

/// 4 KiB clusters and 2-cluster tables (QEMU refuses 1-cluster ones): an L2 table
/// spans 4 MiB, so some requests cross tables.
const CS: u64 = 4096;
const SIZE: u64 = 6 << 20;
/// The backing file covers only part of the image.
const BACKING: u64 = (3 << 20) + 1536;

/// Lengths of the buffers a request of `len` bytes is cut into (empty ones included).
fn splits(rng: &mut Rng, len: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = match rng.below(6) {
            0 => 0,
            1 => 1 + rng.below(16) as usize,
            2 => 512,
            3 => rng.below(CS * 3) as usize,
            _ => rng.below(64 << 10) as usize,
        }
        .min(left);
        v.push(n);
        left -= n;
    }
    v
}

#[test]
fn vectored_io_matches_the_model_and_qemu() {
    let dir = tmp();
    let base = path_in(&dir, "base.raw");
    let top = path_in(&dir, "top.qed");
    let mut rng = Rng(0x5eed_0bad_cafe_f00d);
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i / 512 % 199) as u8 + 1).collect();
    std::fs::write(&base, &model[..BACKING as usize]).expect("write base");
    model[BACKING as usize..].fill(0);
    let create = format!(
        "create -q -f qed -o cluster_size=4096,table_size=2 -b {} -F raw {} {SIZE}",
        p(&base),
        p(&top)
    );
    run("qemu-img", &create.split(' ').collect::<Vec<_>>());
    // Zero clusters (QEMU's extension) over backing data, and some data of the top's own.
    run(
        "qemu-io",
        &["-f", "qed", "-c", "write -z 8192 16384", p(&top)],
    );
    model[8192..8192 + 16384].fill(0);
    run(
        "qemu-io",
        &["-f", "qed", "-c", "write -P 0x5a 4186112 12288", p(&top)],
    );
    model[4_186_112..4_186_112 + 12288].fill(0x5a);

    let img = open(&top, false);
    for i in 0..60 {
        let len = 1 + rng.below(if i % 4 == 0 { 300_000 } else { 20_000 }) as usize;
        let off = rng.below(SIZE - len as u64) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let mut pos = 0;
        let bufs: Vec<IoSlice<'_>> = splits(&mut rng, len)
            .into_iter()
            .map(|n| {
                pos += n;
                IoSlice::new(&data[pos - n..pos])
            })
            .collect();
        img.write_vectored(&bufs, off as u64)
            .expect("vectored write");
        model[off..off + len].copy_from_slice(&data);

        // Read back a window around the write, through uneven buffers.
        let from = off.saturating_sub(rng.below(3 * CS) as usize);
        let to = (off + len + rng.below(3 * CS) as usize).min(SIZE as usize);
        let mut got = vec![0xeeu8; to - from];
        {
            let cut = splits(&mut rng, got.len());
            let mut rest: &mut [u8] = &mut got;
            let mut bufs = Vec::new();
            for n in cut {
                let (a, b) = rest.split_at_mut(n);
                bufs.push(IoSliceMut::new(a));
                rest = b;
            }
            img.read_vectored(&mut bufs, from as u64)
                .expect("vectored read");
        }
        assert!(got == model[from..to], "request {i}: {len} bytes at {off}");
    }
    assert!(vdisk_read_all(&img) == model, "whole image");
    img.close().expect("close");
    drop(img);
    assert_qemu_clean(&top);
    assert!(qemu_raw(&top, "qed") == model, "qemu-img's view");
}
