//! qcow2 extended L2 entries (subclusters) side by side with qemu-img / qemu-io: the
//! same random scripts (unaligned writes, zero writes, discards, compressed clusters)
//! run by `vdisk io` and `qemu-io` on images `qemu-img` created, at several cluster
//! sizes, with and without a backing file. The results must pass `qemu-img check` (no
//! leaks), be equal for `qemu-img compare`, and have the same `qemu-img map
//! --output=json`; vdisk must read qemu-io's image bit-exact and map it as qemu-img
//! does. Plus creation, convert, resize, snapshots, amend and check of invalid bitmaps.
//!
//! Map equality is exact (host offsets included) for scripts that free nothing. A
//! script that frees clusters (discard, zero writes with unmap, overwriting compressed
//! clusters) is compared with host offsets left out (runs merged again): QEMU hands a
//! freed cluster out again at once, vdisk only once the mapping that dropped it is
//! durable (its deferred frees), so later allocations may land elsewhere. That
//! difference is the allocator's, the same with standard L2 entries.

mod cli_support;
use cli_support::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::Path;

const SIZE: u64 = 1 << 20;

/// A random script for an image of `cs`-byte clusters; whether it frees clusters.
fn script(rng: &mut StdRng, cs: u64, frees: bool) -> (Vec<String>, bool) {
    let sc = cs / 32;
    let mut cmds = Vec::new();
    let mut compressed = Vec::new();
    let mut freed = false;
    let n = rng.gen_range(3..25);
    for _ in 0..n {
        let pat = rng.gen_range(1..=255u8);
        let kind = rng.gen_range(0..if frees { 12 } else { 8 });
        if frees && kind == 11 && cs <= SIZE / 2 {
            // Compressed clusters first, while the clusters are still unallocated.
            let c = rng.gen_range(0..SIZE / cs) * cs;
            if !compressed.contains(&c) {
                compressed.push(c);
                cmds.insert(0, format!("write -c -P {pat} {c} {cs}"));
                freed = true;
            }
            continue;
        }
        let (off, len) = if kind < 2 {
            // Subcluster aligned.
            let off = rng.gen_range(0..SIZE / sc) * sc;
            (off, (rng.gen_range(1..40) * sc).min(SIZE - off))
        } else {
            let off = rng.gen_range(0..SIZE / 512) * 512;
            let len = if rng.gen_bool(0.5) {
                rng.gen_range(1..10) * 512
            } else {
                rng.gen_range(1..400) * 512
            };
            (off, len.min(SIZE - off))
        };
        cmds.push(match kind {
            0..=4 => format!("write -P {pat} {off} {len}"),
            5..=7 => format!("write -z {off} {len}"),
            8 => {
                freed = true;
                format!("write -z -u {off} {len}")
            }
            _ => {
                freed = true;
                format!("discard {off} {len}")
            }
        });
    }
    (cmds, freed)
}

fn io(dir: &Path, tool: &str, file: &str, cmds: &[String]) -> Run {
    let mut args: Vec<&str> = Vec::new();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(file);
    if tool == "qemu-io" {
        qemu_io_run(dir, &args)
    } else {
        let mut a = vec!["io"];
        a.extend(args);
        vdisk(dir, &a)
    }
}

/// `qemu-img map --output=json`, without host offsets (and runs merged again) unless
/// `exact`.
fn map(dir: &Path, file: &str, exact: bool) -> Vec<Value> {
    let v = json(&ok(
        qemu_img(dir, &["map", "--output=json", file]),
        "qemu-img map",
    ));
    let mut out: Vec<Value> = Vec::new();
    for mut e in v.as_array().expect("map array").iter().cloned() {
        if exact {
            out.push(e);
            continue;
        }
        e.as_object_mut().expect("map entry").remove("offset");
        let len = e["length"].as_u64().expect("length");
        if let Some(last) = out.last_mut() {
            let mut a = last.clone();
            let mut b = e.clone();
            for x in [&mut a, &mut b] {
                let o = x.as_object_mut().expect("entry");
                o.remove("start");
                o.remove("length");
            }
            if a == b {
                let l = last["length"].as_u64().expect("length") + len;
                last["length"] = l.into();
                continue;
            }
        }
        out.push(e);
    }
    out
}

fn create(dir: &Path, file: &str, cs: u64, backing: bool) {
    let o = format!("extended_l2=on,cluster_size={cs}");
    let mut a = vec!["create", "-q", "-f", "qcow2", "-o", &o];
    if backing {
        a.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    a.extend([file, "1M"]);
    ok(qemu_img(dir, &a), "qemu-img create");
}

fn base(dir: &Path) {
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]),
        "create base",
    );
    qemu_io(
        dir,
        "qcow2",
        "base.qcow2",
        &["write -P 7 0 1M", "write -z 256k 128k", "discard 700k 64k"],
    );
}

/// One script on both tools; every property of the module documentation.
fn same_script(dir: &Path, cs: u64, backing: bool, cmds: &[String], freed: bool, what: &str) {
    for f in ["q.qcow2", "v.qcow2"] {
        let _ = std::fs::remove_file(dir.join(f));
        create(dir, f, cs, backing);
    }
    let q = io(dir, "qemu-io", "q.qcow2", cmds);
    let v = io(dir, "vdisk", "v.qcow2", cmds);
    assert_eq!(q.code, 0, "{what}: qemu-io: {}{}", q.out, q.err);
    assert_eq!(v.code, 0, "{what}: vdisk io: {}{}", v.out, v.err);
    assert!(!v.out.contains("failed"), "{what}: {}", v.out);
    let c = qemu_img(dir, &["check", "--output=json", "v.qcow2"]);
    assert_eq!(c.code, 0, "{what}: qemu-img check: {}{}", c.out, c.err);
    let cj = json(&c.out);
    assert_eq!(cj["leaks"].as_u64().unwrap_or(0), 0, "{what}: {}", c.out);
    let cmp = qemu_img(dir, &["compare", "q.qcow2", "v.qcow2"]);
    assert_eq!(cmp.code, 0, "{what}: compare: {}{}", cmp.out, cmp.err);
    assert_eq!(
        map(dir, "q.qcow2", !freed),
        map(dir, "v.qcow2", !freed),
        "{what}: qemu-img map differs"
    );
    // vdisk reads and maps qemu-io's image as qemu-img does.
    ok(
        qemu_img(dir, &["convert", "-O", "raw", "q.qcow2", "q.raw"]),
        "qemu-img convert",
    );
    ok(
        vdisk(dir, &["convert", "-O", "raw", "q.qcow2", "v.raw"]),
        "vdisk convert",
    );
    assert!(
        std::fs::read(dir.join("q.raw")).unwrap() == std::fs::read(dir.join("v.raw")).unwrap(),
        "{what}: vdisk reads qemu-io's image differently"
    );
    let qm = ok(
        qemu_img(dir, &["map", "--output=json", "q.qcow2"]),
        "qemu map",
    );
    let vm = ok(
        vdisk(dir, &["map", "--output=json", "q.qcow2"]),
        "vdisk map",
    );
    assert_eq!(json(&qm), json(&vm), "{what}: vdisk map of qemu-io's image");
}

fn scripts(cs: u64, seeds: u64) {
    let d = tmp();
    base(d.path());
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed * 7919 + cs);
        let backing = seed % 2 == 1;
        let frees = seed % 3 != 0;
        let (cmds, freed) = script(&mut rng, cs, frees);
        let what = format!("cs {cs} backing {backing} seed {seed}: {cmds:?}");
        same_script(d.path(), cs, backing, &cmds, freed, &what);
    }
}

#[test]
fn scripts_16k() {
    scripts(16 << 10, 6);
}

#[test]
fn scripts_64k() {
    scripts(64 << 10, 8);
}

#[test]
fn scripts_128k() {
    scripts(128 << 10, 6);
}

#[test]
fn scripts_2m() {
    scripts(2 << 20, 4);
}

/// The cases QEMU's rules single out, each with exact maps.
#[test]
fn subcluster_cases() {
    let d = tmp();
    base(d.path());
    let cases: &[&[&str]] = &[
        // Partial subcluster head and tail COW over the backing file.
        &[
            "write -P 2 4k 1k",
            "write -P 3 70k 10k",
            "write -P 4 130k 100",
        ],
        // A second write into a cluster with a host cluster: in place where allocated,
        // bits set elsewhere.
        &["write -P 1 0 4k", "write -P 2 2k 8k", "write -P 3 60k 8k"],
        // Zero writes: aligned (zero bits), unaligned (data or zero bit), whole
        // clusters with and without unmap, inside allocated clusters (offset printed).
        &[
            "write -P 1 64k 64k",
            "write -z 72k 4k",
            "write -z 80k 1k",
            "write -z 200k 1k",
            "write -z 256k 128k",
            "write -z -u 64k 64k",
        ],
        // Writes over zero subclusters and zero clusters.
        &["write -z 0 128k", "write -P 5 1k 3k", "write -P 6 64k 64k"],
        // A write across several unallocated clusters.
        &["write -P 9 10k 300k", "write -P 8 500k 2k"],
        // Discard of part of a cluster (ignored, as QEMU) and of whole ones.
        &["write -P 1 0 256k", "discard 8k 8k", "discard 64k 128k"],
    ];
    for backing in [false, true] {
        for cmds in cases {
            let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
            let freed = cmds
                .iter()
                .any(|c| c.contains("-u") || c.starts_with("discard"));
            let what = format!("backing {backing}: {cmds:?}");
            same_script(d.path(), 64 << 10, backing, &cmds, freed, &what);
        }
    }
}

#[test]
fn create_matches_qemu() {
    let d = tmp();
    let dir = d.path();
    for o in [
        "extended_l2=on,cluster_size=16k",
        "extended_l2=on",
        "extended_l2=on,cluster_size=2M",
        "extended_l2=on,preallocation=metadata",
        "extended_l2=on,lazy_refcounts=on,refcount_bits=1",
    ] {
        let q = ok(
            qemu_img(dir, &["create", "-f", "qcow2", "-o", o, "q.qcow2", "3M"]),
            o,
        );
        let v = ok(
            vdisk(dir, &["create", "-f", "qcow2", "-o", o, "v.qcow2", "3M"]),
            o,
        );
        assert_eq!(q.replace("q.qcow2", "X"), v.replace("v.qcow2", "X"), "{o}");
        assert!(
            std::fs::read(dir.join("q.qcow2")).unwrap()
                == std::fs::read(dir.join("v.qcow2")).unwrap(),
            "{o}: created images differ"
        );
        // Host allocation ("disk size") depends on how each tool wrote the file.
        let info = |s: String, name: &str| -> String {
            s.replace(name, "X")
                .lines()
                .filter(|l| !l.contains("disk size"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let qi = info(qemu_img(dir, &["info", "q.qcow2"]).out, "q.qcow2");
        let vi = info(vdisk(dir, &["info", "v.qcow2"]).out, "v.qcow2");
        assert_eq!(qi, vi, "{o}");
    }
    for o in [
        "extended_l2=on,cluster_size=8k",
        "extended_l2=on,cluster_size=512",
        "extended_l2=on,compat=0.10",
    ] {
        let q = qemu_img(dir, &["create", "-f", "qcow2", "-o", o, "bad.qcow2", "3M"]);
        let v = vdisk(dir, &["create", "-f", "qcow2", "-o", o, "bad.qcow2", "3M"]);
        assert_ne!(q.code, 0, "{o}");
        assert_eq!(q.code, v.code, "{o}");
        assert_eq!(
            q.err.replace("qemu-img:", ""),
            v.err.replace("vdisk:", ""),
            "{o}"
        );
    }
}

#[test]
fn convert_resize_snapshot_amend() {
    let d = tmp();
    let dir = d.path();
    base(dir);
    create(dir, "src.qcow2", 64 << 10, true);
    qemu_io(
        dir,
        "qcow2",
        "src.qcow2",
        &[
            "write -P 2 4k 1k",
            "write -z 136k 4k",
            "write -P 3 300k 100k",
        ],
    );
    // Convert to extended L2 (from a chain) and back to standard.
    for (o, out) in [
        ("extended_l2=on,cluster_size=32k", "c.qcow2"),
        ("extended_l2=off", "s.qcow2"),
    ] {
        let qout = format!("q{out}");
        ok(
            vdisk(dir, &["convert", "-O", "qcow2", "-o", o, "src.qcow2", out]),
            "vdisk convert",
        );
        ok(
            qemu_img(
                dir,
                &["convert", "-O", "qcow2", "-o", o, "src.qcow2", &qout],
            ),
            "qemu convert",
        );
        ok(qemu_img(dir, &["check", out]), "check converted");
        ok(
            qemu_img(dir, &["compare", "src.qcow2", out]),
            "compare converted",
        );
        assert_eq!(map(dir, out, true), map(dir, &qout, true), "convert {o}");
    }
    // Resize up and down, next to qemu-img.
    std::fs::copy(dir.join("src.qcow2"), dir.join("r.qcow2")).unwrap();
    std::fs::copy(dir.join("src.qcow2"), dir.join("qr.qcow2")).unwrap();
    for (shrink, size) in [(false, "3M"), (true, "512k")] {
        for (tool, f) in [("vdisk", "r.qcow2"), ("qemu-img", "qr.qcow2")] {
            let mut a = vec!["resize"];
            if shrink {
                a.push("--shrink");
            }
            a.extend([f, size]);
            let r = if tool == "vdisk" {
                vdisk(dir, &a)
            } else {
                qemu_img(dir, &a)
            };
            ok(r, "resize");
        }
        ok(qemu_img(dir, &["check", "r.qcow2"]), "check resized");
        ok(
            qemu_img(dir, &["compare", "r.qcow2", "qr.qcow2"]),
            "compare",
        );
        assert_eq!(map(dir, "r.qcow2", true), map(dir, "qr.qcow2", true));
    }
    // Snapshots: writes into clusters shared with a snapshot, then revert.
    ok(vdisk(dir, &["snapshot", "-c", "s1", "r.qcow2"]), "snapshot");
    ok(
        qemu_img(dir, &["snapshot", "-c", "s1", "qr.qcow2"]),
        "snapshot",
    );
    let w: Vec<String> = ["write -P 8 1k 5k", "write -P 9 100k 1k", "write -z 300k 2k"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(io(dir, "vdisk", "r.qcow2", &w).code, 0);
    assert_eq!(io(dir, "qemu-io", "qr.qcow2", &w).code, 0);
    ok(
        qemu_img(dir, &["check", "r.qcow2"]),
        "check after snapshot writes",
    );
    ok(
        qemu_img(dir, &["compare", "r.qcow2", "qr.qcow2"]),
        "compare",
    );
    assert_eq!(map(dir, "r.qcow2", true), map(dir, "qr.qcow2", true));
    ok(vdisk(dir, &["snapshot", "-a", "s1", "r.qcow2"]), "revert");
    ok(
        qemu_img(dir, &["snapshot", "-a", "s1", "qr.qcow2"]),
        "revert",
    );
    ok(qemu_img(dir, &["check", "r.qcow2"]), "check after revert");
    ok(
        qemu_img(dir, &["compare", "r.qcow2", "qr.qcow2"]),
        "compare",
    );
    ok(vdisk(dir, &["snapshot", "-d", "s1", "r.qcow2"]), "delete");
    ok(qemu_img(dir, &["check", "r.qcow2"]), "check after delete");
    // Amend refuses what qemu-img refuses, with its words.
    for o in ["compat=0.10", "extended_l2=off", "extended_l2=on"] {
        let q = qemu_img(dir, &["amend", "-o", o, "qr.qcow2"]);
        let v = vdisk(dir, &["amend", "-o", o, "r.qcow2"]);
        assert_ne!(q.code, 0, "{o}");
        assert_eq!(q.code, v.code, "{o}");
        assert_eq!(
            q.err.replace("qemu-img:", ""),
            v.err.replace("vdisk:", ""),
            "{o}"
        );
    }
}

/// Writes the 8 bytes of `v` (big endian) at `off` of `file`.
fn poke(file: &Path, off: u64, v: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&v.to_be_bytes()).unwrap();
}

#[test]
fn invalid_bitmaps_checked_as_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on",
                "c.qcow2",
                "1M",
            ],
        ),
        "create",
    );
    qemu_io(
        dir,
        "qcow2",
        "c.qcow2",
        &[
            "write -P 1 0 4k",
            "write -c -P 2 64k 64k",
            "write -z 256k 4k",
        ],
    );
    // The only L2 table of this layout; entries are 16 bytes.
    let l2 = 0x40000u64;
    let cases = [
        ("allocated and zero", l2 + 8, 0x0000_0001_0000_0003u64, true),
        ("compressed with a bitmap", l2 + 16 + 8, 0x5, true),
        ("allocated without a host", l2 + 32 + 8, 0x3, true),
        ("bit 0 of an extended entry (ignored)", l2 + 64, 0x1, false),
    ];
    for (what, off, v, corrupt) in cases {
        std::fs::copy(dir.join("c.qcow2"), dir.join("q.qcow2")).unwrap();
        poke(&dir.join("q.qcow2"), off, v);
        std::fs::copy(dir.join("q.qcow2"), dir.join("v.qcow2")).unwrap();
        for repair in [false, true] {
            let mut qa = vec!["check"];
            if repair {
                qa.extend(["-r", "all"]);
            }
            let mut va = qa.clone();
            qa.push("q.qcow2");
            va.push("v.qcow2");
            let q = qemu_img(dir, &qa);
            let v = vdisk(dir, &va);
            assert_eq!(q.code, v.code, "{what} repair {repair}: {}{}", v.out, v.err);
            assert_eq!(q.out, v.out, "{what} repair {repair}");
            assert_eq!(q.err, v.err, "{what} repair {repair}");
            assert_eq!(q.code != 0, corrupt, "{what}");
        }
        if corrupt && !what.starts_with("compressed") {
            // Refused on read, as QEMU does.
            let r = vdisk(dir, &["io", "-r", "-c", "read 0 1M", "v.qcow2"]);
            assert!(
                r.out.contains("failed") || r.err.contains("bitmap") || r.code != 0,
                "{what}: {}{}",
                r.out,
                r.err
            );
        }
    }
}

/// Extended L2 images in chains with other layouts: over raw, QED and standard qcow2,
/// and a standard qcow2 over an extended one; the same script on both tools.
#[test]
fn chains_mixing_layouts() {
    let d = tmp();
    let dir = d.path();
    let cmds: Vec<String> = [
        "write -P 2 4k 1k",
        "write -P 3 70k 10k",
        "write -z 200k 6k",
        "write -P 4 300k 100",
        "write -P 5 800k 200k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (bfmt, bopts, topts) in [
        ("raw", "", "extended_l2=on"),
        ("qed", "", "extended_l2=on"),
        (
            "qcow2",
            "cluster_size=4k",
            "extended_l2=on,cluster_size=128k",
        ),
        (
            "qcow2",
            "extended_l2=on,cluster_size=16k",
            "extended_l2=off",
        ),
        ("qcow2", "extended_l2=on,cluster_size=32k", "extended_l2=on"),
    ] {
        let what = format!("{bfmt} {bopts} under {topts}");
        let _ = std::fs::remove_file(dir.join("b"));
        let mut a = vec!["create", "-q", "-f", bfmt];
        if !bopts.is_empty() {
            a.extend(["-o", bopts]);
        }
        a.extend(["b", "1M"]);
        ok(qemu_img(dir, &a), &what);
        qemu_io(
            dir,
            bfmt,
            "b",
            &["write -P 7 0 1M", "write -z 256k 128k", "write -P 6 3k 3k"],
        );
        for f in ["q.qcow2", "v.qcow2"] {
            let _ = std::fs::remove_file(dir.join(f));
            ok(
                qemu_img(
                    dir,
                    &[
                        "create", "-q", "-f", "qcow2", "-o", topts, "-b", "b", "-F", bfmt, f,
                    ],
                ),
                &what,
            );
        }
        let q = io(dir, "qemu-io", "q.qcow2", &cmds);
        assert_eq!(q.code, 0, "{what}: {}{}", q.out, q.err);
        let v = io(dir, "vdisk", "v.qcow2", &cmds);
        assert_eq!(v.code, 0, "{what}: {}{}", v.out, v.err);
        ok(qemu_img(dir, &["check", "v.qcow2"]), &what);
        ok(qemu_img(dir, &["compare", "q.qcow2", "v.qcow2"]), &what);
        assert_eq!(
            map(dir, "q.qcow2", true),
            map(dir, "v.qcow2", true),
            "{what}"
        );
        let qm = ok(qemu_img(dir, &["map", "--output=json", "q.qcow2"]), &what);
        let vm = ok(vdisk(dir, &["map", "--output=json", "q.qcow2"]), &what);
        assert_eq!(json(&qm), json(&vm), "{what}: vdisk map");
    }
}

/// `vdisk serve` exports an extended L2 image read-write: qemu-io's writes over NBD
/// leave the image qemu-io makes locally.
#[test]
fn serve_read_write() {
    let d = tmp();
    let dir = d.path();
    base(dir);
    create(dir, "s.qcow2", 64 << 10, true);
    create(dir, "q.qcow2", 64 << 10, true);
    let sock = dir.join("s.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .current_dir(dir)
        .args(["serve", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg("s.qcow2")
        .spawn()
        .expect("spawn vdisk serve");
    let mut waited = 0;
    while !sock.exists() {
        assert!(waited < 200, "vdisk serve did not create its socket");
        std::thread::sleep(std::time::Duration::from_millis(25));
        waited += 1;
    }
    let cmds = [
        "write -P 2 4k 1k",
        "write -P 3 70k 10k",
        "write -z 200k 6k",
        "write -P 4 300k 100",
        "flush",
    ];
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    let r = qemu_io_run(dir, &args);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.code, 0, "qemu-io over NBD: {}{}", r.out, r.err);
    assert!(!r.out.contains("failed"), "{}", r.out);
    qemu_io(dir, "qcow2", "q.qcow2", &cmds);
    ok(qemu_img(dir, &["check", "s.qcow2"]), "check served image");
    ok(qemu_img(dir, &["compare", "q.qcow2", "s.qcow2"]), "compare");
    assert_eq!(map(dir, "q.qcow2", true), map(dir, "s.qcow2", true));
}

/// `rebase` onto no backing file copies the old backing data per subcluster, as
/// qemu-img does (not whole clusters).
#[test]
fn rebase_per_subcluster() {
    let d = tmp();
    let dir = d.path();
    base(dir);
    for f in ["v.qcow2", "q.qcow2"] {
        create(dir, f, 64 << 10, true);
        qemu_io(
            dir,
            "qcow2",
            f,
            &[
                "write -P 9 10k 5k",
                "write -z 100k 4k",
                "write -P 8 500k 1k",
            ],
        );
    }
    ok(vdisk(dir, &["rebase", "-b", "", "v.qcow2"]), "vdisk rebase");
    ok(
        qemu_img(dir, &["rebase", "-b", "", "q.qcow2"]),
        "qemu rebase",
    );
    ok(qemu_img(dir, &["check", "v.qcow2"]), "check rebased");
    ok(qemu_img(dir, &["compare", "q.qcow2", "v.qcow2"]), "compare");
    assert_eq!(map(dir, "q.qcow2", true), map(dir, "v.qcow2", true));
}
