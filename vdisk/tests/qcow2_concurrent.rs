//! Many threads on one image: allocating writes to shared clusters and tables,
//! in-place rewrites, zeroes, discards and compressed writes.

mod qcow2_util;
use qcow2_util::*;
use std::sync::Arc;
use vdisk::ZeroFlags;

#[test]
fn threads_writing_overlapping_clusters() {
    let d = tmp();
    let f = path(&d, "c.qcow2");
    let base = path(&d, "base.qcow2");
    qemu_create(&base, "cluster_size=65536", "4M");
    qemu_io(&base, &["write -P 0x77 0 4M"]);
    vdisk_create(
        &f,
        4 << 20,
        &[("cluster_size", "4096")],
        Some(("base.qcow2", "qcow2")),
    );
    let img = Arc::new(open(&f, true));
    // Each thread owns the bytes i mod 8 == t of every 8-byte group... too fine for
    // clusters: instead each thread owns 512-byte sectors s with s % 8 == t, so every
    // cluster is shared by all threads and every write is partial.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for round in 0..3u64 {
                    for s in (t..(4 << 20) / 512).step_by(8 * 3) {
                        let v = (t * 16 + round + 1) as u8;
                        img.write_at(&[v; 512], s * 512).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut want = vec![0x77u8; 4 << 20];
    for t in 0..8u64 {
        for s in (t..(4 << 20) / 512).step_by(8 * 3) {
            want[(s * 512) as usize..(s * 512 + 512) as usize].fill((t * 16 + 3) as u8);
        }
    }
    assert_same(&read_all(&img), &want, "after concurrent writes");
    let img = Arc::try_unwrap(img).unwrap();
    img.close().unwrap();
    drop(img);
    assert_clean(&f);
    assert_same(&qemu_raw(&f), &want, "qemu view");
}

#[test]
fn threads_mixed_ops_disjoint_ranges() {
    let d = tmp();
    let f = path(&d, "m.qcow2");
    vdisk_create(&f, 8 << 20, &[("cluster_size", "65536")], None);
    let img = Arc::new(open(&f, true));
    let region = 1u64 << 20;
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let base = t * region;
                let mut model = vec![0u8; region as usize];
                for i in 0..40u64 {
                    let off = (i * 7919 * (t + 1)) % region;
                    let len = ((i * 104_729) % 150_000 + 1).min(region - off);
                    match i % 5 {
                        0..=2 => {
                            let v = (i as u8) | 1;
                            img.write_at(&vec![v; len as usize], base + off).unwrap();
                            model[off as usize..(off + len) as usize].fill(v);
                        }
                        3 => {
                            img.write_zeroes(
                                base + off,
                                len,
                                ZeroFlags {
                                    may_unmap: i % 2 == 0,
                                    fast: false,
                                },
                            )
                            .unwrap();
                            model[off as usize..(off + len) as usize].fill(0);
                        }
                        _ => {
                            let c = 65536u64;
                            let s = off.div_ceil(c) * c;
                            let e = (off + len) / c * c;
                            if e > s {
                                img.write_compressed(&vec![(i as u8) ^ 0x55; c as usize], base + s)
                                    .unwrap();
                                model[s as usize..(s + c) as usize].fill((i as u8) ^ 0x55);
                            }
                        }
                    }
                    if i % 13 == 0 {
                        img.flush().unwrap();
                    }
                }
                let mut got = vec![0u8; region as usize];
                img.read_at(&mut got, base).unwrap();
                assert!(got == model, "thread {t} region differs");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let img = Arc::try_unwrap(img).unwrap();
    let r = img.check(Default::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.findings);
    drop(img);
    assert_clean(&f);
}

#[test]
fn racing_overlapping_ops_keep_metadata_consistent() {
    racing("4096", None);
    // Tiny caches: L2 tables and refcount blocks are evicted all the time.
    racing("512", Some(2048));
}

fn racing(cs: &str, cache: Option<u64>) {
    // Contents are up to the races; metadata must stay consistent whatever happens.
    let d = tmp();
    let f = path(&d, "r.qcow2");
    let base = path(&d, "base.qcow2");
    qemu_create(&base, "cluster_size=4096", "1M");
    qemu_io(&base, &["write -P 0x31 0 1M"]);
    vdisk_create(
        &f,
        1 << 20,
        &[("cluster_size", cs)],
        Some(("base.qcow2", "qcow2")),
    );
    let csz: u64 = cs.parse().unwrap();
    let img = Arc::new(
        open_with(
            &f,
            true,
            vdisk::format::DriverOptions {
                l2_cache_size: cache,
                refcount_cache_size: cache,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut rnd = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                for _ in 0..300 {
                    let off = rnd() % (1 << 20);
                    let len = (rnd() % 20_000 + 1).min((1 << 20) - off);
                    match rnd() % 7 {
                        0..=2 => img.write_at(&vec![t as u8; len as usize], off).unwrap(),
                        3 => img
                            .write_zeroes(
                                off,
                                len,
                                ZeroFlags {
                                    may_unmap: true,
                                    fast: false,
                                },
                            )
                            .unwrap(),
                        4 => img.discard(off, len).unwrap(),
                        5 => {
                            let c = off / csz * csz;
                            img.write_compressed(&vec![t as u8 + 1; csz as usize], c)
                                .unwrap();
                        }
                        _ => {
                            let mut b = vec![0u8; len as usize];
                            img.read_at(&mut b, off).unwrap();
                            if rnd() % 8 == 0 {
                                img.flush().unwrap();
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let img = Arc::try_unwrap(img).unwrap();
    let before = read_all(&img);
    let r = img.check(Default::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.findings);
    drop(img);
    assert_clean(&f);
    assert_same(&qemu_raw(&f), &before, "qemu sees what vdisk saw");
}
