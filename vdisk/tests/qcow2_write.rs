//! Images vdisk creates and writes pass `qemu-img check` and compare equal to a raw
//! reference written with the same operations.

mod qcow2_util;
use qcow2_util::*;
use rand::{Rng, SeedableRng};
use vdisk::ZeroFlags;

struct Model {
    data: Vec<u8>,
    backing: Option<Vec<u8>>,
    cs: u64,
    v2: bool,
}

impl Model {
    fn discard(&mut self, off: u64, len: u64) {
        let size = self.data.len() as u64;
        let first = off.div_ceil(self.cs);
        let end = off + len;
        let last = if end == size {
            end.div_ceil(self.cs)
        } else {
            end / self.cs
        };
        // v2 over a backing file cannot express zeroes: like QEMU, the discard then
        // changes nothing (deallocating would expose the backing file).
        if self.backing.is_some() && self.v2 {
            return;
        }
        for c in first..last {
            let s = (c * self.cs) as usize;
            let e = ((c + 1) * self.cs).min(size) as usize;
            self.data[s..e].fill(0);
        }
    }
}

fn workload(opts: &[(&str, &str)], cs: u64, v2: bool, with_backing: bool, seed: u64) {
    let d = tmp();
    let size: u64 = 3 << 20;
    let f = path(&d, "img.qcow2");
    let mut backing = None;
    if with_backing {
        let b = path(&d, "base.qcow2");
        qemu_create(&b, "cluster_size=65536", "3M");
        qemu_io(&b, &["write -P 0x5a 0 3M", "write -P 0x6b 100000 300000"]);
        backing = Some(qemu_raw(&b));
        vdisk_create(&f, size, opts, Some(("base.qcow2", "qcow2")));
    } else {
        vdisk_create(&f, size, opts, None);
    }
    assert_clean(&f);
    let mut model = Model {
        data: backing.clone().unwrap_or_else(|| vec![0u8; size as usize]),
        backing,
        cs,
        v2,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    {
        let img = open(&f, true);
        for i in 0..150 {
            let op = rng.gen_range(0..10);
            let align = if rng.gen_bool(0.5) { cs } else { 1 };
            let off = rng.gen_range(0..size) / align * align;
            let max = (size - off).min(4 * cs + 5000);
            let len = rng.gen_range(1..=max);
            match op {
                0..=5 => {
                    let buf: Vec<u8> = (0..len).map(|j| (j as u8) ^ (i as u8) ^ 0x80).collect();
                    img.write_at(&buf, off).unwrap();
                    model.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
                }
                6 | 7 => {
                    let flags = ZeroFlags {
                        may_unmap: op == 6,
                        fast: false,
                    };
                    img.write_zeroes(off, len, flags).unwrap();
                    model.data[off as usize..(off + len) as usize].fill(0);
                }
                8 => {
                    img.discard(off, len).unwrap();
                    model.discard(off, len);
                }
                _ => img.flush().unwrap(),
            }
            if std::env::var("QCOW2_DEBUG").is_ok() {
                let got = read_all(&img);
                if got != model.data {
                    panic!("op {i} kind {op} off {off} len {len} broke it");
                }
            }
            if i % 50 == 49 {
                assert_same(&read_all(&img), &model.data, "during workload");
            }
        }
        assert_same(&read_all(&img), &model.data, "before close");
        let rep = img.check(Default::default()).unwrap();
        assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.findings);
        img.close().unwrap();
    }
    assert_clean(&f);
    let raw = path(&d, "ref.raw");
    std::fs::write(&raw, &model.data).unwrap();
    run(
        "qemu-img",
        &["compare", "-q", "-f", "qcow2", "-F", "raw", p(&f), p(&raw)],
    );
    let img = open(&f, false);
    assert_same(&read_all(&img), &model.data, "reopened");
}

#[test]
fn random_ops_cluster_sizes() {
    for (cs, s) in [
        (512u64, "512"),
        (4096, "4096"),
        (65536, "65536"),
        (2 << 20, "2097152"),
    ] {
        workload(&[("cluster_size", s)], cs, false, false, cs);
    }
}

#[test]
fn random_ops_v2_and_refcount_widths() {
    workload(
        &[("compat", "0.10"), ("cluster_size", "4096")],
        4096,
        true,
        false,
        1,
    );
    for bits in ["1", "2", "8", "64"] {
        workload(
            &[("refcount_bits", bits), ("cluster_size", "1024")],
            1024,
            false,
            false,
            2,
        );
    }
}

#[test]
fn random_ops_with_backing() {
    workload(&[("cluster_size", "4096")], 4096, false, true, 3);
    workload(
        &[("compat", "0.10"), ("cluster_size", "4096")],
        4096,
        true,
        true,
        4,
    );
    workload(&[("cluster_size", "65536")], 65536, false, true, 5);
}

#[test]
fn random_ops_lazy_refcounts() {
    workload(
        &[("lazy_refcounts", "on"), ("cluster_size", "4096")],
        4096,
        false,
        false,
        6,
    );
}

#[test]
fn compressed_writes_packed_and_readable_by_qemu() {
    for ct in ["zlib", "zstd"] {
        let d = tmp();
        let f = path(&d, "c.qcow2");
        let cs = 65536usize;
        let size = 40 * cs as u64 + 1024; // a partial last cluster
        vdisk_create(&f, size, &[("compression_type", ct)], None);
        let mut model = vec![0u8; size as usize];
        {
            let img = std::sync::Arc::new(open(&f, true));
            // Compressible clusters from four threads (compression runs in parallel).
            let ts: Vec<_> = (0..4usize)
                .map(|t| {
                    let img = img.clone();
                    std::thread::spawn(move || {
                        for c in (t..32).step_by(4) {
                            let buf: Vec<u8> =
                                (0..65536).map(|i| ((i / 100) as u8) ^ c as u8).collect();
                            img.write_compressed(&buf, (c * 65536) as u64).unwrap();
                        }
                    })
                })
                .collect();
            for t in ts {
                t.join().unwrap();
            }
            for c in 0..32usize {
                for i in 0..cs {
                    model[c * cs + i] = ((i / 100) as u8) ^ c as u8;
                }
            }
            // Incompressible data is stored normally.
            let mut x = 12345u32;
            let noise: Vec<u8> = (0..cs)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            img.write_compressed(&noise, 33 * cs as u64).unwrap();
            model[33 * cs..34 * cs].copy_from_slice(&noise);
            assert!(
                !img.block_status(33 * cs as u64, cs as u64)
                    .unwrap()
                    .compressed
            );
            // The final partial cluster.
            img.write_compressed(&[0x3c; 1024], 40 * cs as u64).unwrap();
            model[40 * cs..].fill(0x3c);
            // Overwrite part of a compressed cluster (copy-on-write from it).
            img.write_at(&[0xff; 100], 5 * cs as u64 + 7).unwrap();
            model[5 * cs + 7..5 * cs + 107].fill(0xff);
            assert!(img.block_status(0, cs as u64).unwrap().compressed);
            assert_same(&read_all(&img), &model, ct);
        }
        assert_clean(&f);
        let raw = path(&d, "ref.raw");
        std::fs::write(&raw, &model).unwrap();
        let (code, o, e) = run_status(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", p(&f), p(&raw)],
        );
        assert_eq!(code, 0, "{ct}: {o}{e}");
        let (_, q) = qemu_check(&f);
        assert_eq!(q["compressed-clusters"], 32, "{q}");
        // Packed: 32 compressed clusters take far fewer than 32 host clusters.
        assert!(
            std::fs::metadata(&f).unwrap().len() < 20 * cs as u64,
            "not packed"
        );
    }
}

#[test]
fn fast_zeroes_refuse_partial_data_clusters() {
    let d = tmp();
    let f = path(&d, "z.qcow2");
    vdisk_create(&f, 1 << 20, &[("cluster_size", "4096")], None);
    let img = open(&f, true);
    img.write_at(&[1u8; 16384], 0).unwrap();
    let fast = ZeroFlags {
        may_unmap: false,
        fast: true,
    };
    // Whole clusters: zero flag, fine.
    img.write_zeroes(4096, 4096, fast).unwrap();
    // A partial cluster holding data would need zero bytes written: refused, untouched.
    let e = img.write_zeroes(100, 8192, fast).unwrap_err();
    assert!(matches!(e, vdisk::Error::Unsupported(_)), "{e}");
    let mut b = vec![0u8; 16384];
    img.read_at(&mut b, 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 1));
    assert!(b[4096..8192].iter().all(|&x| x == 0));
    assert!(b[8192..].iter().all(|&x| x == 1));
    // Partial clusters that already read as zeroes are fine.
    img.write_zeroes(4096 + 10, 100, fast).unwrap();
    img.write_zeroes(500_000, 10, fast).unwrap();
    let st = img.block_status(4096, 4096).unwrap();
    assert_eq!(st.kind, vdisk::ExtentKind::Zero);
    assert!(
        st.offset.is_some(),
        "zeroes without unmap keep the cluster allocated"
    );
    img.write_zeroes(
        4096,
        4096,
        ZeroFlags {
            may_unmap: true,
            fast: true,
        },
    )
    .unwrap();
    let st = img.block_status(4096, 4096).unwrap();
    assert_eq!((st.kind, st.offset), (vdisk::ExtentKind::Zero, None));
    drop(img);
    assert_clean(&f);
}

#[test]
fn zeroed_clusters_keep_their_host_cluster_on_rewrite() {
    let d = tmp();
    let f = path(&d, "k.qcow2");
    vdisk_create(&f, 1 << 20, &[("cluster_size", "4096")], None);
    {
        let img = open(&f, true);
        img.write_at(&[1u8; 8192], 0).unwrap();
        let h = img.block_status(0, 4096).unwrap().offset.unwrap();
        img.write_zeroes(
            0,
            8192,
            ZeroFlags {
                may_unmap: false,
                fast: false,
            },
        )
        .unwrap();
        img.write_at(&[2u8; 100], 10).unwrap();
        let st = img.block_status(0, 4096).unwrap();
        assert_eq!((st.kind, st.offset), (vdisk::ExtentKind::Data, Some(h)));
        let mut b = vec![9u8; 8192];
        img.read_at(&mut b, 0).unwrap();
        assert!(b[..10].iter().all(|&x| x == 0));
        assert!(b[10..110].iter().all(|&x| x == 2));
        assert!(b[110..].iter().all(|&x| x == 0));
    }
    assert_clean(&f);
}

#[test]
fn compressed_with_one_bit_refcounts() {
    let d = tmp();
    let f = path(&d, "b.qcow2");
    vdisk_create(
        &f,
        1 << 20,
        &[("refcount_bits", "1"), ("cluster_size", "4096")],
        None,
    );
    {
        let img = open(&f, true);
        for c in 0..20u64 {
            img.write_compressed(&[c as u8 + 1; 4096], c * 4096)
                .unwrap();
        }
    }
    assert_clean(&f);
    let raw = qemu_raw(&f);
    for c in 0..20usize {
        assert!(raw[c * 4096..(c + 1) * 4096]
            .iter()
            .all(|&b| b == c as u8 + 1));
    }
}
