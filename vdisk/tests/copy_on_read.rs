//! Copy-on-read through the library (`OpenOptions::copy_on_read`): reads copy what the
//! backing file provides into the top image without changing what any read returns,
//! and never overwrite a guest write made at the same time.

mod qcow2_util;

use qcow2_util::*;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use vdisk::{Image, OpenOptions};

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;

fn base_pattern(off: u64) -> u8 {
    (off / 65536 % 251) as u8 + 1
}

/// A qcow2 base with data everywhere (by qemu-io), under an empty overlay.
fn chain(d: &tempfile::TempDir) -> std::path::PathBuf {
    let base = path(d, "base.qcow2");
    qemu_create(&base, "cluster_size=65536", "8M");
    let mut cmds = Vec::new();
    for off in (0..SIZE).step_by(65536) {
        cmds.push(format!("write -q -P {} {off} 64k", base_pattern(off)));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&base, &refs);
    let top = path(d, "top.qcow2");
    vdisk_create(&top, SIZE, &[], Some(("base.qcow2", "qcow2")));
    top
}

#[test]
fn reads_copy_up_and_return_the_same_bytes() {
    let d = tmp();
    let top = chain(&d);
    let before = qemu_raw(&top);
    let img = Image::open(
        &top,
        &OpenOptions {
            copy_on_read: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 100_000];
    img.read_at(&mut buf, 1_000_000).unwrap();
    assert_same(
        &buf,
        &before[1_000_000..1_100_000],
        "read through copy-on-read",
    );
    img.close().unwrap();
    drop(img);
    assert_clean(&top);
    // The clusters around the read are in the top image now, whole.
    let map = vdisk::Image::open(&top, &OpenOptions::default()).unwrap();
    let e = map.layer_block_status(983_040, 1 << 20).unwrap();
    assert_eq!(e.kind, vdisk::ExtentKind::Data, "{e:?}");
    assert!(e.len >= 1_114_112 - 983_040, "{e:?}");
    drop(map);
    assert_same(&qemu_raw(&top), &before, "contents after copy-on-read");
}

#[test]
fn copies_never_overwrite_concurrent_writes() {
    let d = tmp();
    let top = chain(&d);
    let img = Arc::new(
        Image::open(
            &top,
            &OpenOptions {
                copy_on_read: true,
                ..OpenOptions::default()
            },
        )
        .unwrap(),
    );
    let blocks = SIZE / BLOCK;
    let mut handles = Vec::new();
    // Writers own disjoint blocks (block % 4 == writer), so the result is fixed.
    for w in 0..4u64 {
        let img = Arc::clone(&img);
        handles.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            let mut written = Vec::new();
            for _ in 0..300 {
                let b = rng.gen_range(0..blocks / 4) * 4 + w;
                let data = vec![0xa0 + w as u8; BLOCK as usize];
                img.write_at(&data, b * BLOCK).unwrap();
                written.push(b);
            }
            written
        }));
    }
    let readers: Vec<_> = (0..3u64)
        .map(|r| {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + r);
                let mut buf = vec![0u8; 20_000];
                for _ in 0..300 {
                    let off = rng.gen_range(0..SIZE - buf.len() as u64);
                    img.read_at(&mut buf, off).unwrap();
                }
            })
        })
        .collect();
    let mut owner = vec![None; blocks as usize];
    for (w, h) in handles.into_iter().enumerate() {
        for b in h.join().unwrap() {
            owner[b as usize] = Some(w as u8);
        }
    }
    for r in readers {
        r.join().unwrap();
    }
    img.close().unwrap();
    drop(img);
    assert_clean(&top);
    let got = qemu_raw(&top);
    for (b, o) in owner.iter().enumerate() {
        let at = b as u64 * BLOCK;
        for i in (0..BLOCK).step_by(512) {
            let want = match o {
                Some(w) => 0xa0 + w,
                None => base_pattern(at + i),
            };
            let have = got[(at + i) as usize];
            assert_eq!(have, want, "byte {} (block {b}, writer {o:?})", at + i);
        }
    }
}

#[test]
fn refused_read_only() {
    let d = tmp();
    let top = chain(&d);
    let e = Image::open(
        &top,
        &OpenOptions {
            copy_on_read: true,
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "Can't use copy-on-read on read-only device");
}
