//! Concurrent writers on dynamic VHD and VDI images: threads write interleaved sectors
//! of the same blocks (so allocations of one block race), then every byte reads back
//! as written, each block is allocated once, and the image reopens to the same contents.

use std::sync::Arc;
use vdisk::format::{CreateSpec, Driver, DriverOptions, Format, Repair};
use vdisk::storage::{MemStorage, Storage};

fn open(fmt: Format, st: Arc<dyn Storage>) -> Arc<dyn Driver> {
    vdisk::format::open(fmt, st, &DriverOptions::default(), &mut |_| {
        panic!("no backing file")
    })
    .expect("open")
}

fn run(fmt: Format, options: &[(&str, &str)]) {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
    vdisk::format::create(
        fmt,
        &st,
        &CreateSpec {
            size: 12 << 20,
            backing: None,
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
    )
    .expect("create");
    let d = open(fmt, st.clone());
    let size = d.size();
    const THREADS: u64 = 4;
    const PIECE: u64 = 8192;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let d = d.clone();
            s.spawn(move || {
                // Thread t writes pieces t, t+4, t+8, ... of every block, in an order
                // that differs per thread.
                let pieces = size / PIECE;
                let mut i = t;
                let mut order: Vec<u64> = Vec::new();
                while i < pieces {
                    order.push(i);
                    i += THREADS;
                }
                if t % 2 == 1 {
                    order.reverse();
                }
                for p in order {
                    let fill = (p % 251) as u8 + 1;
                    d.write_at(&vec![fill; PIECE as usize], p * PIECE)
                        .expect("write");
                }
            });
        }
    });
    let check = |d: &dyn Driver| {
        let mut got = vec![0u8; size as usize];
        d.read_at(&mut got, 0).expect("read");
        // Whole pieces only: a CHS-rounded VHD ends in a partial one, never written.
        for (p, chunk) in got.chunks_exact(PIECE as usize).enumerate() {
            let fill = (p as u64 % 251) as u8 + 1;
            assert!(chunk.iter().all(|&b| b == fill), "{fmt}: piece {p}");
        }
    };
    check(&*d);
    d.flush().expect("flush");
    if fmt == Format::Vdi {
        let r = d.check(Repair::default()).expect("check");
        assert_eq!(r.corruptions, 0, "{r:?}");
    }
    drop(d);
    // Each block allocated once: the file holds no more blocks than the disk has.
    let bs = if fmt == Format::Vdi { 1 << 20 } else { 2 << 20 };
    let len = st.len().unwrap();
    assert!(
        len <= size.div_ceil(bs) * (bs + 512) + 64 * 1024,
        "{fmt}: {len} bytes for {size}"
    );
    let d = open(fmt, st);
    check(&*d);
}

#[test]
fn concurrent_allocations_vhd() {
    run(Format::Vpc, &[]);
}

#[test]
fn concurrent_allocations_vdi() {
    run(Format::Vdi, &[]);
    run(Format::Vdi, &[("static", "on")]);
}
