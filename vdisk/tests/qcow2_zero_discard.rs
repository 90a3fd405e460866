//! Zero writes and discards have QEMU's semantics: the same random script (cluster
//! aligned, plus unaligned zero writes) run through
//! vdisk's `Image` API and through qemu-io on two copies of one image gives the same
//! `qemu-img map` (cluster by cluster: allocation, zero flag, preallocated host
//! cluster, depth) and the same contents, for v2 and v3, with and without a backing file.

mod qcow2_util;
use qcow2_util::*;
use rand::{Rng, SeedableRng};
use vdisk::ZeroFlags;

const CS: u64 = 4096;
/// Two L2 tables' worth and a bit (512 entries per 4 KiB table).
const SIZE: u64 = 1100 * CS;

#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u8),
    Zero,
    ZeroUnmap,
    Discard,
}

fn script(seed: u64, n: usize) -> Vec<(Op, u64, u64)> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let clusters = SIZE / CS;
    (0..n)
        .map(|i| {
            let op = match r.gen_range(0..9) {
                // (Compressed writes only go to unallocated clusters in QEMU: they are
                // part of the initial state instead.)
                0..=3 => Op::Write(1 + (i % 250) as u8),
                4 | 5 => Op::Zero,
                6 => Op::ZeroUnmap,
                _ => Op::Discard,
            };
            let start = r.gen_range(0..clusters);
            let len = match op {
                // Sometimes long ranges, crossing into the second L2 table.
                _ if r.gen_bool(0.15) => r.gen_range(1..=600),
                _ => r.gen_range(1..=24),
            }
            .min(clusters - start);
            let (mut off, mut len) = (start * CS, len * CS);
            if matches!(op, Op::Zero | Op::ZeroUnmap) && r.gen_bool(0.3) {
                // Unaligned (sector granularity) zero writes: partial clusters.
                let head = r.gen_range(0..CS / 512) * 512;
                let tail = r.gen_range(0..CS / 512) * 512;
                off += head;
                len = (len - head).saturating_sub(tail).max(512);
            }
            (op, off, len)
        })
        .collect()
}

fn qemu_cmd(op: Op, off: u64, len: u64) -> String {
    match op {
        Op::Write(p) => format!("write -P {p} {off} {len}"),
        Op::Zero => format!("write -z {off} {len}"),
        Op::ZeroUnmap => format!("write -z -u {off} {len}"),
        Op::Discard => format!("discard {off} {len}"),
    }
}

/// `qemu-img map` expanded to one record per cluster; the host offset itself is left
/// out (allocation order may differ), only whether there is one.
fn map_per_cluster(f: &std::path::Path) -> Vec<String> {
    let out = run("qemu-img", &["map", "--output=json", p(f)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut cl = Vec::new();
    for e in v.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let rec = format!(
            "depth={} present={} zero={} data={} compressed={} offset={}",
            e["depth"],
            e["present"],
            e["zero"],
            e["data"],
            e["compressed"],
            e.get("offset").is_some()
        );
        let mut c = start;
        while c < start + len {
            cl.push(rec.clone());
            c += CS;
        }
    }
    cl
}

fn compare(compat: &str, backing: bool, seed: u64) {
    let d = tmp();
    let base = path(&d, "base.qcow2");
    let a = path(&d, "a.qcow2");
    let b = path(&d, "b.qcow2");
    let mut opts = format!("cluster_size={CS},compat={compat}");
    if backing {
        qemu_create(&base, "cluster_size=65536", &SIZE.to_string());
        // Data in the first half only: the rest of the backing file reads as zeroes.
        qemu_io(&base, &[&format!("write -P 170 0 {}", SIZE / 2)]);
        opts.push_str(&format!(",backing_file={},backing_fmt=qcow2", p(&base)));
    }
    qemu_create(&a, &opts, &SIZE.to_string());
    // Some initial state: data, compressed clusters, zeroes.
    // (Compressed writes first: QEMU refuses them over allocated clusters.)
    let mut init: Vec<String> = (50..1100)
        .step_by(37)
        .map(|c| format!("write -c -P 8 {} {CS}", c * CS))
        .collect();
    init.push(format!("write -P 7 0 {}", 40 * CS));
    init.push(format!("write -P 9 {} {}", 600 * CS, 20 * CS));
    init.push(format!("write -z {} {}", 700 * CS, 20 * CS));
    let init: Vec<&str> = init.iter().map(String::as_str).collect();
    qemu_io(&a, &init);
    std::fs::copy(&a, &b).unwrap();
    let ops = script(seed, 60);
    {
        let img = open(&a, true);
        for &(op, off, len) in &ops {
            let what = qemu_cmd(op, off, len);
            match op {
                Op::Write(pat) => img.write_at(&vec![pat; len as usize], off),
                Op::Zero => img.write_zeroes(off, len, ZeroFlags::default()),
                Op::ZeroUnmap => img.write_zeroes(
                    off,
                    len,
                    ZeroFlags {
                        may_unmap: true,
                        fast: false,
                    },
                ),
                Op::Discard => img.discard(off, len),
            }
            .unwrap_or_else(|e| panic!("vdisk {what}: {e}"));
        }
        img.close().unwrap();
    }
    let cmds: Vec<String> = ops.iter().map(|&(o, off, l)| qemu_cmd(o, off, l)).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&b, &refs);
    assert_clean(&a);
    let (ma, mb) = (map_per_cluster(&a), map_per_cluster(&b));
    assert_eq!(ma.len(), mb.len());
    if let Some(i) = (0..ma.len()).find(|&i| ma[i] != mb[i]) {
        panic!(
            "compat={compat} backing={backing} seed={seed}: map differs at cluster {i}:\n vdisk: {}\n qemu:  {}\nscript:\n{}",
            ma[i],
            mb[i],
            cmds.join("\n")
        );
    }
    assert_same(&qemu_raw(&a), &qemu_raw(&b), "contents");
}

#[test]
fn v3_no_backing() {
    for seed in [1, 2, 3] {
        compare("1.1", false, seed);
    }
}

#[test]
fn v3_backing() {
    for seed in [4, 5, 6] {
        compare("1.1", true, seed);
    }
}

#[test]
fn v2_no_backing() {
    for seed in [7, 8] {
        compare("0.10", false, seed);
    }
}

#[test]
fn v2_backing() {
    for seed in [9, 10] {
        compare("0.10", true, seed);
    }
}
