//! Throughput benchmark, not a test: run with
//! `cargo test --release -p vdisk --test qcow2_bench -- --ignored --nocapture`
//! and compare with `qemu-img bench -w -c 16384 -s 65536 -f qcow2` on the same disk.

mod qcow2_util;
use qcow2_util::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use vdisk::{CacheMode, Image, OpenOptions};

fn bench(img: &Arc<Image>, count: u64, bs: u64, threads: usize) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let img = img.clone();
            let next = next.clone();
            std::thread::spawn(move || {
                let buf = vec![0xa5u8; bs as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    img.write_at(&buf, i * bs).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    img.flush().unwrap();
    t0.elapsed().as_secs_f64()
}

#[test]
#[ignore]
fn write_throughput() {
    let dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
    let d = tempfile::tempdir_in(dir).unwrap();
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let f = path(&d, "b.qcow2");
        let _ = std::fs::remove_file(&f);
        vdisk_create(&f, 4 << 30, &[], None);
        let img = Arc::new(
            Image::open(
                &f,
                &OpenOptions {
                    cache,
                    locking: false,
                    ..OpenOptions::default()
                },
            )
            .unwrap(),
        );
        let a = bench(&img, 16384, 65536, threads);
        let r = bench(&img, 16384, 65536, threads);
        let r4 = bench(&img, 100_000, 4096, threads);
        drop(img);
        let raw = path(&d, "b.raw");
        std::fs::write(&raw, b"").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&raw)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let rimg = Arc::new(
            Image::open(
                &raw,
                &OpenOptions {
                    cache,
                    format: Some(vdisk::Format::Raw),
                    locking: false,
                    ..OpenOptions::default()
                },
            )
            .unwrap(),
        );
        let ra = bench(&rimg, 16384, 65536, threads);
        let r4raw = bench(&rimg, 100_000, 4096, threads);
        println!(
            "cache={cache:?} threads={threads}: qcow2 alloc 64k {a:.3}s, rewrite 64k {r:.3}s, rewrite 4k {r4:.3}s | raw 64k {ra:.3}s, raw 4k {r4raw:.3}s"
        );
        assert_clean(&f);
    }
}
