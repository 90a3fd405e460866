//! VMDK and VHDX against qemu-img / qemu-io 10: files qemu creates in every subformat
//! and option combination read bit-exact; files vdisk creates are byte-for-byte
//! qemu's layout, pass `qemu-img check` and read bit-exact in qemu; the same random
//! write scripts give the same contents through both tools; the cloud upload
//! conversions (qcow2 → streamOptimized VMDK, → VHDX) and back are bit-exact; hostile
//! headers and tables give clear errors; a dirty VHDX log is refused read-only and
//! replayed read-write, as qemu does.

mod cli_support;
use cli_support::*;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// A hostile edit of a good file: name, the edit, what the error must say.
type Mutation<'a> = (&'static str, Box<dyn Fn(&mut Vec<u8>) + 'a>, &'static str);

/// Bytes of `file` as raw, read by `tool` ("vdisk" or "qemu").
fn raw_of(dir: &Path, tool: &str, file: &str) -> Vec<u8> {
    let out = format!("{file}.{tool}.raw");
    let _ = std::fs::remove_file(dir.join(&out));
    let args = ["convert", "-O", "raw", file, out.as_str()];
    let r = if tool == "vdisk" {
        vdisk(dir, &args)
    } else {
        qemu_img(dir, &args)
    };
    ok(r, &format!("{tool} convert {file}"));
    let b = std::fs::read(dir.join(&out)).unwrap();
    std::fs::remove_file(dir.join(&out)).unwrap();
    b
}

/// `info` of both tools on the same file, JSON and human, equal.
fn same_info(dir: &Path, file: &str) {
    for out in ["--output=json", "--output=human"] {
        let v = ok(vdisk(dir, &["info", out, file]), "vdisk info");
        let q = ok(qemu_img(dir, &["info", out, file]), "qemu info");
        assert_eq!(v, q, "info {out} of {file}");
    }
}

/// qemu-io / vdisk io write commands: `n` random writes of whole `unit`s (distinct
/// units when `distinct`), with patterns, a few zero writes when `zeroes`.
fn script(seed: u64, size: u64, unit: u64, n: usize, distinct: bool, zeroes: bool) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let units = size / unit;
    let mut used = std::collections::BTreeSet::new();
    let mut cmds = Vec::new();
    while cmds.len() < n {
        let u = rng.gen_range(0..units);
        let k = rng.gen_range(1..=3u64).min(units - u);
        if distinct && (u..u + k).any(|x| used.contains(&x)) {
            continue;
        }
        (u..u + k).for_each(|x| {
            used.insert(x);
        });
        let (off, len) = if distinct {
            (u * unit, k * unit)
        } else {
            // Unaligned, to exercise partial-grain copy-on-write.
            let a = u * unit + rng.gen_range(0..unit / 512) * 512;
            (a, (k * unit).min(size - a).max(512))
        };
        if zeroes && rng.gen_ratio(1, 5) {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            cmds.push(format!("write -P {} {off} {len}", rng.gen_range(1..255u8)));
        }
    }
    cmds
}

fn vdisk_io(dir: &Path, fmt: &str, file: &str, cmds: &[String]) {
    let mut args = vec!["io", "-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(file);
    let r = vdisk(dir, &args);
    assert_eq!(r.code, 0, "vdisk io on {file}: {}{}", r.out, r.err);
    assert!(
        !r.out.contains("failed") && !r.err.contains("failed"),
        "{}{}",
        r.out,
        r.err
    );
}

fn check_clean(dir: &Path, file: &str) {
    let q = qemu_img(dir, &["check", file]);
    assert_eq!(q.code, 0, "qemu-img check {file}: {}{}", q.out, q.err);
    assert!(
        q.out.contains("No errors were found on the image."),
        "{}",
        q.out
    );
    let v = vdisk(dir, &["check", file]);
    assert_eq!((v.code, v.out), (q.code, q.out), "vdisk check {file}");
}

/// Creates the same image with both tools (same options), runs the same write script
/// on each (qemu-io on qemu's, vdisk io on vdisk's), and compares: contents through both
/// tools, layout of the fresh files (all but the random IDs), check, info.
fn both_tools(fmt: &str, opts: &str, size: &str, unit: u64, distinct: bool, seed: u64) {
    let d = tmp();
    let dir = d.path();
    let ext = fmt;
    let (q, v) = (format!("q.{ext}"), format!("v.{ext}"));
    let mut a = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        a.extend_from_slice(&["-o", opts]);
    }
    for (tool, f) in [("qemu", &q), ("vdisk", &v)] {
        let mut args = a.clone();
        args.extend_from_slice(&[f.as_str(), size]);
        let r = if tool == "qemu" {
            qemu_img(dir, &args)
        } else {
            vdisk(dir, &args)
        };
        ok(r, &format!("{tool} create {opts}"));
    }
    let (lq, lv) = (
        std::fs::metadata(dir.join(&q)).unwrap().len(),
        std::fs::metadata(dir.join(&v)).unwrap().len(),
    );
    assert_eq!(lq, lv, "{fmt} {opts}: fresh file sizes");
    let bytes = vdisk::format::parse_size(size).unwrap();
    let cmds = script(seed, bytes, unit, 24, distinct, fmt == "vmdk" || distinct);
    let cmds_ref: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(dir, fmt, &q, &cmds_ref);
    vdisk_io(dir, fmt, &v, &cmds);
    let expect = raw_of(dir, "qemu", &q);
    assert_eq!(
        raw_of(dir, "vdisk", &q),
        expect,
        "{fmt} {opts}: vdisk reads qemu's file"
    );
    assert_eq!(
        raw_of(dir, "qemu", &v),
        expect,
        "{fmt} {opts}: qemu reads vdisk's file"
    );
    assert_eq!(
        raw_of(dir, "vdisk", &v),
        expect,
        "{fmt} {opts}: vdisk reads its file"
    );
    check_clean(dir, &v);
    check_clean(dir, &q);
    same_info(dir, &v);
    same_info(dir, &q);
    let c = qemu_img(dir, &["compare", &q, &v]);
    assert_eq!(c.code, 0, "{}", c.out);
    let c = vdisk(dir, &["compare", &q, &v]);
    assert_eq!(c.code, 0, "{}", c.out);
}

#[test]
fn vmdk_monolithic_sparse_matrix() {
    for (i, o) in [
        "",
        "zeroed_grain=on",
        "adapter_type=lsilogic,hwversion=7",
        "adapter_type=buslogic,toolsversion=10240",
        "compat6=on,adapter_type=legacyESX",
    ]
    .iter()
    .enumerate()
    {
        both_tools("vmdk", o, "9M", 64 << 10, false, i as u64);
    }
}

#[test]
fn vmdk_stream_optimized_matrix() {
    // qemu writes a stream-optimized extent only in whole, fresh grains.
    for (i, o) in [
        "subformat=streamOptimized",
        "subformat=streamOptimized,adapter_type=lsilogic,zeroed_grain=on",
    ]
    .iter()
    .enumerate()
    {
        both_tools("vmdk", o, "7M", 64 << 10, true, 10 + i as u64);
    }
}

#[test]
fn vhdx_matrix() {
    for (i, o) in [
        "",
        "subformat=fixed",
        "block_state_zero=off",
        "subformat=fixed,block_state_zero=off",
        "block_size=1M,log_size=2M",
        "block_size=2M",
    ]
    .iter()
    .enumerate()
    {
        both_tools("vhdx", o, "20M", 1 << 20, false, 20 + i as u64);
    }
}

#[test]
fn qemu_vmdk_subformats_read_bit_exact() {
    // Every subformat qemu creates (flat and split too) reads as qemu reads it, with
    // qemu-io writes into each of their extents.
    let d = tmp();
    let dir = d.path();
    for (i, sub) in [
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "monolithicSparse",
        "streamOptimized",
    ]
    .iter()
    .enumerate()
    {
        let f = format!("{sub}.vmdk");
        ok(
            qemu_img(
                dir,
                &[
                    "create",
                    "-q",
                    "-f",
                    "vmdk",
                    "-o",
                    &format!("subformat={sub}"),
                    &f,
                    "5M",
                ],
            ),
            "create",
        );
        let cmds = script(30 + i as u64, 5 << 20, 64 << 10, 10, true, false);
        let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(dir, "vmdk", &f, &c);
        assert_eq!(raw_of(dir, "vdisk", &f), raw_of(dir, "qemu", &f), "{sub}");
        same_info(dir, &f);
        // vdisk writes into qemu's file (not stream: its grains are written once),
        // and qemu reads them back.
        if *sub != "streamOptimized" {
            let cmds = script(40 + i as u64, 5 << 20, 64 << 10, 8, false, false);
            vdisk_io(dir, "vmdk", &f, &cmds);
            assert_eq!(
                raw_of(dir, "vdisk", &f),
                raw_of(dir, "qemu", &f),
                "{sub} after vdisk writes"
            );
        }
    }
}

/// A qcow2 image of `mib` MiB, about half data (random-ish pattern), half holes.
fn half_data_qcow2(dir: &Path, name: &str, mib: u64) {
    ok(
        qemu_img(
            dir,
            &["create", "-q", "-f", "qcow2", name, &format!("{mib}M")],
        ),
        "qcow2",
    );
    let mut cmds = Vec::new();
    for i in (0..mib).step_by(2) {
        cmds.push(format!("write -P {} {}M 1M", (i % 250) + 1, i));
    }
    cmds.push(format!("write -P 0x33 {} 4096", (mib << 20) - 4096));
    let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(dir, "qcow2", name, &c);
}

#[test]
fn cloud_uploads_round_trip() {
    let d = tmp();
    let dir = d.path();
    half_data_qcow2(dir, "src.qcow2", 24);
    let src = raw_of(dir, "qemu", "src.qcow2");
    // AWS VM import: streamOptimized VMDK. Azure/Hyper-V: VHDX (dynamic and fixed).
    for (fmt, opts, out) in [
        ("vmdk", "subformat=streamOptimized", "aws.vmdk"),
        (
            "vmdk",
            "subformat=streamOptimized,adapter_type=lsilogic",
            "aws2.vmdk",
        ),
        ("vhdx", "subformat=dynamic", "hv.vhdx"),
        ("vhdx", "subformat=fixed", "hvf.vhdx"),
    ] {
        ok(
            vdisk(dir, &["convert", "-O", fmt, "-o", opts, "src.qcow2", out]),
            "vdisk convert to",
        );
        check_clean(dir, out);
        same_info(dir, out);
        assert_eq!(raw_of(dir, "qemu", out), src, "qemu reads vdisk's {out}");
        let c = qemu_img(dir, &["compare", "src.qcow2", out]);
        assert_eq!(c.code, 0, "{}", c.out);
        // And back to qcow2, with both tools.
        let back = format!("{out}.qcow2");
        ok(
            vdisk(dir, &["convert", "-O", "qcow2", out, &back]),
            "vdisk convert back",
        );
        check_clean(dir, &back);
        assert_eq!(raw_of(dir, "qemu", &back), src, "{back}");
        let qback = format!("{out}.q.qcow2");
        ok(
            qemu_img(dir, &["convert", "-O", "qcow2", out, &qback]),
            "qemu convert back",
        );
        assert_eq!(raw_of(dir, "vdisk", &qback), src, "{qback}");
        // qemu's own conversion of the source reads the same in vdisk.
        let qout = format!("q-{out}");
        ok(
            qemu_img(dir, &["convert", "-O", fmt, "-o", opts, "src.qcow2", &qout]),
            "qemu convert",
        );
        assert_eq!(
            raw_of(dir, "vdisk", &qout),
            src,
            "vdisk reads qemu's {qout}"
        );
    }
    // The stream file's grains are compressed (AWS rejects uncompressed ones) and
    // vdisk's file is no larger than qemu's by more than a little.
    let v = std::fs::metadata(dir.join("aws.vmdk")).unwrap().len();
    let q = std::fs::metadata(dir.join("q-aws.vmdk")).unwrap().len();
    assert!(v <= q + q / 20, "vdisk {v} vs qemu {q}");
    let m = ok(vdisk(dir, &["map", "--output=json", "aws.vmdk"]), "map");
    assert!(m.contains("\"compressed\": true"), "{m}");
}

#[test]
fn stream_refuses_rewrites_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        vdisk(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                "s.vmdk",
                "1M",
            ],
        ),
        "create",
    );
    vdisk_io(dir, "vmdk", "s.vmdk", &["write -P 1 0 64k".into()]);
    let r = vdisk(dir, &["io", "-c", "write -P 2 0 64k", "s.vmdk"]);
    let q = qemu_io_run(dir, &["-c", "write -P 2 0 64k", "s.vmdk"]);
    assert!(
        q.err
            .contains("Could not write to allocated cluster for streamOptimized"),
        "{}",
        q.err
    );
    assert!(
        (r.out.clone() + &r.err)
            .contains("Could not write to allocated cluster for streamOptimized"),
        "{}{}",
        r.out,
        r.err
    );
    // Partial grains are gathered until flush: one compressed grain, reading back.
    vdisk_io(
        dir,
        "vmdk",
        "s.vmdk",
        &[
            "write -P 3 65536 4096".into(),
            "write -P 4 73728 4096".into(),
        ],
    );
    qemu_io(
        dir,
        "vmdk",
        "s.vmdk",
        &[
            "read -P 3 65536 4096",
            "read -P 0 69632 4096",
            "read -P 4 73728 4096",
            "read -P 1 0 64k",
        ],
    );
    check_clean(dir, "s.vmdk");
}

#[test]
fn vmdk_hostile_headers() {
    let d = tmp();
    let dir = d.path();
    ok(
        vdisk(dir, &["create", "-q", "-f", "vmdk", "good.vmdk", "4M"]),
        "create",
    );
    let good = std::fs::read(dir.join("good.vmdk")).unwrap();
    fn put(b: &mut [u8], at: usize, v: &[u8]) {
        b[at..at + v.len()].copy_from_slice(v)
    }
    let cases: Vec<Mutation> = vec![
        (
            "version",
            Box::new(|b| put(b, 4, &9u32.to_le_bytes())),
            "Unsupported VMDK version 9",
        ),
        (
            "gtes",
            Box::new(|b| put(b, 44, &4096u32.to_le_bytes())),
            "L2 table size too big",
        ),
        (
            "grain0",
            Box::new(|b| put(b, 20, &0u64.to_le_bytes())),
            "L1 entry size is invalid",
        ),
        (
            "granularity",
            Box::new(|b| put(b, 20, &(1u64 << 30).to_le_bytes())),
            "Invalid granularity",
        ),
        (
            "capacity",
            Box::new(|b| put(b, 12, &(1u64 << 60).to_le_bytes())),
            "L1 size too big",
        ),
        (
            "gd-past-end",
            Box::new(|b| put(b, 56, &(1u64 << 40).to_le_bytes())),
            "past the end of the file",
        ),
        (
            "footer",
            Box::new(|b| put(b, 56, &u64::MAX.to_le_bytes())),
            "Invalid footer",
        ),
        (
            "overhead",
            Box::new(|b| put(b, 64, &(1u64 << 30).to_le_bytes())),
            "File truncated",
        ),
        (
            "gt-past-end",
            Box::new(|b| put(b, 26 * 512, &0x7fff_ffffu32.to_le_bytes())),
            "past the end of the file",
        ),
        (
            "truncated",
            Box::new(|b| b.truncate(3)),
            "not in vmdk format",
        ),
    ];
    for (name, f, want) in cases {
        let mut b = good.clone();
        f(&mut b);
        let file = format!("{name}.vmdk");
        std::fs::write(dir.join(&file), &b).unwrap();
        let r = vdisk(dir, &["convert", "-f", "vmdk", "-O", "raw", &file, "o.raw"]);
        assert_ne!(r.code, 0, "{name}");
        assert!(r.err.contains(want), "{name}: {}", r.err);
        assert!(!r.err.contains("panicked"), "{name}: {}", r.err);
        let _ = std::fs::remove_file(dir.join("o.raw"));
    }
    // Descriptor files: unknown create type, bad extent line, missing extent file.
    for (name, text, want) in [
        ("t1", "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"custom\"\n", "Unsupported image type 'custom'"),
        ("t2", "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"x\"\n", "Invalid extent line"),
        ("t3", "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"nothere\" 0\n", "nothere"),
        ("t4", "version=1\nCID=1\nparentCID=ffffffff\n", "invalid VMDK image descriptor"),
    ] {
        let file = format!("{name}.vmdk");
        std::fs::write(dir.join(&file), text).unwrap();
        let r = vdisk(dir, &["info", &file]);
        let q = qemu_img(dir, &["info", &file]);
        assert_ne!(q.code, 0, "qemu opens {name}");
        assert_ne!(r.code, 0, "{name}");
        assert!(r.err.contains(want), "{name}: {}", r.err);
    }
}

#[test]
fn vhdx_hostile_headers() {
    let d = tmp();
    let dir = d.path();
    ok(
        vdisk(dir, &["create", "-q", "-f", "vhdx", "good.vhdx", "4M"]),
        "create",
    );
    let good = std::fs::read(dir.join("good.vhdx")).unwrap();
    let cases: Vec<Mutation> = vec![
        (
            "headers",
            Box::new(|b| {
                b[65536 + 100] ^= 1;
                b[131072 + 100] ^= 1;
            }),
            "No valid VHDX header found",
        ),
        (
            "regions",
            Box::new(|b| {
                b[196608 + 40] ^= 1;
                b[262144 + 40] ^= 1;
            }),
            "No valid VHDX region table found",
        ),
        ("truncated", Box::new(|b| b.truncate(3 << 20)), "VHDX"),
        ("signature", Box::new(|b| b[0] = b'x'), "not in vhdx format"),
        (
            "bat-in-header",
            Box::new(|b| {
                b[2 << 20..(2 << 20) + 8].copy_from_slice(&(6u64 | 1 << 16).to_le_bytes())
            }),
            "invalid file offset",
        ),
        (
            "bat-past-end",
            Box::new(|b| {
                b[2 << 20..(2 << 20) + 8].copy_from_slice(&(6u64 | 1 << 40).to_le_bytes())
            }),
            "invalid file offset",
        ),
    ];
    for (name, f, want) in cases {
        let mut b = good.clone();
        f(&mut b);
        let file = format!("{name}.vhdx");
        std::fs::write(dir.join(&file), &b).unwrap();
        let r = vdisk(dir, &["info", "-f", "vhdx", &file]);
        assert_ne!(r.code, 0, "{name}");
        assert!(r.err.contains(want), "{name}: {}", r.err);
        assert!(!r.err.contains("panicked"), "{name}: {}", r.err);
        let q = qemu_img(dir, &["info", "-f", "vhdx", &file]);
        assert_ne!(q.code, 0, "qemu opens {name}");
    }
}

/// Rewrites the current header of a VHDX file with `log_guid` (sequence + 1).
fn set_log_guid(b: &mut [u8], log_guid: [u8; 16]) -> (u64, u32) {
    use vdisk::format::vhdx::header::{Header, HEADER_OFFSETS};
    let h0 = Header::parse(&b[65536..65536 + 4096]).unwrap();
    let h1 = Header::parse(&b[131072..131072 + 4096]).unwrap();
    let (slot, mut h) = if h0.sequence > h1.sequence {
        (0, h0)
    } else {
        (1, h1)
    };
    h.sequence += 1;
    h.log_guid = log_guid;
    let other = HEADER_OFFSETS[1 - slot] as usize;
    b[other..other + 4096].copy_from_slice(&h.to_bytes());
    (h.log_offset, h.log_length)
}

#[test]
fn vhdx_dirty_log_replay_like_qemu() {
    use vdisk::format::vhdx::log::{encode_entry, Descriptor};
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "vhdx",
                "-o",
                "block_size=1M",
                "base.vhdx",
                "8M",
            ],
        ),
        "create",
    );
    qemu_io(dir, "vhdx", "base.vhdx", &["write -P 0x11 0 1M"]);
    // Find block 0's file offset (BAT at 2 MiB for a 1 MiB log).
    let mut b = std::fs::read(dir.join("base.vhdx")).unwrap();
    let bat0 = u64::from_le_bytes(b[2 << 20..(2 << 20) + 8].try_into().unwrap());
    assert_eq!(bat0 & 7, 6, "block 0 present");
    let block0 = bat0 & !0xfffff;
    // A log entry writing one sector of 0x22 into block 0 and zeroing 4 KiB after it.
    let g = [0x42u8; 16];
    let (log_off, _) = set_log_guid(&mut b, g);
    let mut sector = Box::new([0x22u8; 4096]);
    sector[0] = 0x99;
    let e = encode_entry(
        5,
        0,
        &g,
        b.len() as u64,
        &[
            Descriptor::Data {
                offset: block0 + 8192,
                sector,
            },
            Descriptor::Zero {
                offset: block0 + 12288,
                len: 4096,
            },
        ],
    );
    b[log_off as usize..log_off as usize + e.len()].copy_from_slice(&e);
    std::fs::write(dir.join("dirty.vhdx"), &b).unwrap();
    for n in ["q.vhdx", "v.vhdx", "v2.vhdx"] {
        std::fs::copy(dir.join("dirty.vhdx"), dir.join(n)).unwrap();
    }
    // Read-only: both refuse.
    let q = qemu_io_run(dir, &["-r", "-f", "vhdx", "-c", "read 0 512", "q.vhdx"]);
    assert!(q.err.contains("needs to be replayed"), "{}", q.err);
    let v = vdisk(dir, &["info", "v.vhdx"]);
    assert_ne!(v.code, 0);
    assert!(v.err.contains("needs to be replayed"), "{}", v.err);
    // Read-write: both replay; the same bytes result.
    let q = qemu_img(dir, &["check", "-r", "all", "q.vhdx"]);
    assert_eq!(q.code, 0, "{}{}", q.out, q.err);
    let v = vdisk(dir, &["check", "-r", "all", "v.vhdx"]);
    assert_eq!(v.code, 0, "{}{}", v.out, v.err);
    vdisk_io(dir, "vhdx", "v2.vhdx", &["read -P 0x22 8193 4095".into()]);
    let expect = {
        let mut e = vec![0x11u8; 1 << 20];
        e[8192] = 0x99;
        e[8193..12288].fill(0x22);
        e[12288..16384].fill(0);
        e.resize(8 << 20, 0);
        e
    };
    for f in ["q.vhdx", "v.vhdx", "v2.vhdx"] {
        assert_eq!(raw_of(dir, "qemu", f), expect, "qemu reads replayed {f}");
        assert_eq!(raw_of(dir, "vdisk", f), expect, "vdisk reads replayed {f}");
        check_clean(dir, f);
    }
}

#[test]
fn vmdk_parent_links_read_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "vmdk", "base.vmdk", "4M"]),
        "base",
    );
    qemu_io(dir, "vmdk", "base.vmdk", &["write -P 0x61 0 2M"]);
    qemu_overlay(dir, "vmdk", "base.vmdk", "vmdk", "top.vmdk");
    qemu_io(
        dir,
        "vmdk",
        "top.vmdk",
        &["write -P 0x62 64k 4k", "write -P 0x63 3M 64k"],
    );
    assert_eq!(
        raw_of(dir, "vdisk", "top.vmdk"),
        raw_of(dir, "qemu", "top.vmdk")
    );
    same_info(dir, "top.vmdk");
    // vdisk writes into the child with copy-on-write from the parent.
    vdisk_io(dir, "vmdk", "top.vmdk", &["write -P 0x64 1000 512".into()]);
    qemu_io(
        dir,
        "vmdk",
        "top.vmdk",
        &[
            "read -P 0x61 0 1000",
            "read -P 0x64 1000 512",
            "read -P 0x61 1512 64024",
        ],
    );
    assert_eq!(
        raw_of(dir, "vdisk", "top.vmdk"),
        raw_of(dir, "qemu", "top.vmdk")
    );
    // A parent whose CID changed: both refuse to read through it.
    qemu_io(dir, "vmdk", "base.vmdk", &["write -P 0x65 3M 4k"]);
    let q = qemu_io_run(dir, &["-c", "read 2M 4k", "top.vmdk"]);
    let v = vdisk(dir, &["io", "-c", "read 2M 4k", "top.vmdk"]);
    assert!(
        (q.out.clone() + &q.err).contains("failed"),
        "{}{}",
        q.out,
        q.err
    );
    assert!(
        (v.out.clone() + &v.err).contains("failed") || v.code != 0,
        "{}{}",
        v.out,
        v.err
    );
}

#[test]
fn resize_refused_like_qemu() {
    let d = tmp();
    let dir = d.path();
    for (fmt, f) in [("vmdk", "r.vmdk"), ("vhdx", "r.vhdx")] {
        ok(vdisk(dir, &["create", "-q", "-f", fmt, f, "4M"]), "create");
        let q = qemu_img(dir, &["resize", f, "8M"]);
        let v = vdisk(dir, &["resize", f, "8M"]);
        assert_eq!(
            (v.code, v.err.replace("vdisk:", "qemu-img:")),
            (q.code, q.err),
            "{fmt}"
        );
    }
}

#[test]
fn served_over_nbd() {
    use std::process::{Command, Stdio};
    let d = tmp();
    let dir = d.path();
    half_data_qcow2(dir, "src.qcow2", 6);
    for (fmt, opts, f) in [
        ("vmdk", "subformat=streamOptimized", "s.vmdk"),
        ("vmdk", "subformat=monolithicSparse", "m.vmdk"),
        ("vhdx", "subformat=dynamic", "x.vhdx"),
    ] {
        ok(
            vdisk(dir, &["convert", "-O", fmt, "-o", opts, "src.qcow2", f]),
            "convert",
        );
        let sock = dir.join(format!("{f}.sock"));
        let pid = dir.join(format!("{f}.pid"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .args(["serve", "-r", "-k"])
            .arg(&sock)
            .arg("--pid-file")
            .arg(&pid)
            .arg(dir.join(f))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn serve");
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !pid.exists() {
            assert!(std::time::Instant::now() < until, "serve did not start");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let c = qemu_img(
            dir,
            &["compare", "-f", "raw", "-F", "qcow2", &uri, "src.qcow2"],
        );
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(c.code, 0, "{f}: {}{}", c.out, c.err);
    }
}

/// `bytes` with the value of a `CID=` line removed and the names `q…`/`v…` of the
/// two tools' files made the same, so two tools' descriptors compare. A CID is printed
/// without leading zeros (by both tools), so the descriptor text's length varies with
/// it: an embedded descriptor is compared as its text plus the size of the area it
/// and its zero padding fill.
fn mask_vmdk(bytes: &[u8]) -> Vec<u8> {
    let Some(s) = bytes
        .windows(21)
        .position(|w| w == b"# Disk DescriptorFile")
    else {
        return mask_text(bytes);
    };
    let Some(e) = bytes[s..].iter().position(|&b| b == 0).map(|n| s + n) else {
        // A descriptor file: text only.
        return mask_text(bytes);
    };
    let z = bytes[e..]
        .iter()
        .position(|&b| b != 0)
        .map_or(bytes.len(), |n| e + n);
    let mut out = bytes[..s].to_vec();
    out.extend(mask_text(&bytes[s..e]));
    out.extend_from_slice(format!("<area of {} bytes>", z - s).as_bytes());
    out.extend_from_slice(&bytes[z..]);
    out
}

fn mask_text(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        if rest.starts_with(b"\nCID=") {
            out.extend_from_slice(b"\nCID=");
            i += 5;
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if rest.starts_with(b"\"v-") || rest.starts_with(b"\"v.vmdk") {
            out.extend_from_slice(b"\"q");
            i += 2;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// qemu's files `q.vmdk`, `q-…` and vdisk's `v.vmdk`, `v-…` are the same files, but
/// for the random CID of each descriptor.
fn same_vmdk_files(dir: &Path, what: &str) -> usize {
    let (qf, vf) = (vmdk_files(dir, "q"), vmdk_files(dir, "v"));
    assert_eq!(qf.len(), vf.len(), "{what}: files {qf:?} {vf:?}");
    for (a, b) in qf.iter().zip(&vf) {
        let (x, y) = (
            std::fs::read(dir.join(a)).unwrap(),
            std::fs::read(dir.join(b)).unwrap(),
        );
        assert!(
            mask_vmdk(&x) == mask_vmdk(&y),
            "{what}: {b} differs from qemu's {a} (CID masked)"
        );
    }
    qf.len()
}

/// The files of a VMDK made of a descriptor and extents (`NAME.vmdk`, `NAME-…`), sorted.
fn vmdk_files(dir: &Path, stem: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n == &format!("{stem}.vmdk") || n.starts_with(&format!("{stem}-")))
        .collect();
    v.sort();
    v
}

/// monolithicFlat, twoGbMaxExtentFlat and twoGbMaxExtentSparse created by both tools
/// (the split ones spanning several 2 GiB extents): every extent file byte-identical
/// to qemu-img's, the descriptor too but for the random CID; the same writes (across
/// the 2 GiB extent boundaries) through qemu-io and vdisk io give the same contents
/// read by either tool; vdisk's files pass `qemu-img check`; `info` equal.
#[test]
fn vmdk_flat_and_split_create_like_qemu() {
    let g = 1u64 << 30;
    for (i, (sub, opts, size)) in [
        ("monolithicFlat", "", "5M"),
        (
            "monolithicFlat",
            "adapter_type=lsilogic,hwversion=7,toolsversion=10240",
            "5M",
        ),
        ("twoGbMaxExtentFlat", "", "2049M"),
        (
            "twoGbMaxExtentFlat",
            "compat6=on,adapter_type=buslogic",
            "2049M",
        ),
        ("twoGbMaxExtentSparse", "", "4608M"),
        (
            "twoGbMaxExtentSparse",
            "zeroed_grain=on,adapter_type=legacyESX",
            "4608M",
        ),
    ]
    .iter()
    .enumerate()
    {
        let d = tmp();
        let dir = d.path();
        let o = if opts.is_empty() {
            format!("subformat={sub}")
        } else {
            format!("subformat={sub},{opts}")
        };
        let args = |f: &'static str| ["create", "-q", "-f", "vmdk", "-o", o.as_str(), f, size];
        ok(qemu_img(dir, &args("q.vmdk")), "qemu create");
        ok(vdisk(dir, &args("v.vmdk")), "vdisk create");
        let n = same_vmdk_files(dir, &o);
        assert!(sub == &"monolithicFlat" || n >= 3, "{o}: {n} files");
        let bytes = vdisk::format::parse_size(size).unwrap();
        let mut cmds = script(60 + i as u64, bytes.min(8 << 20), 64 << 10, 8, false, false);
        // Across each 2 GiB extent boundary and at the end.
        for b in [2 * g, 4 * g] {
            if b + (1 << 20) <= bytes {
                cmds.push(format!("write -P {} {} 12288", 70 + i, b - 4096));
                cmds.push(format!("write -P {} {} 1024", 90 + i, b - 512));
            }
        }
        cmds.push(format!("write -P 33 {} 4096", bytes - 4096));
        let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(dir, "vmdk", "q.vmdk", &c);
        vdisk_io(dir, "vmdk", "v.vmdk", &cmds);
        for tool in ["qemu", "vdisk"] {
            let r = if tool == "qemu" {
                qemu_img(dir, &["compare", "q.vmdk", "v.vmdk"])
            } else {
                vdisk(dir, &["compare", "q.vmdk", "v.vmdk"])
            };
            assert_eq!(r.code, 0, "{o}: {tool} compare: {}{}", r.out, r.err);
        }
        // vdisk's reading of qemu's file, checked by qemu.
        ok(
            vdisk(dir, &["convert", "-O", "qcow2", "q.vmdk", "x.qcow2"]),
            "convert",
        );
        let r = qemu_img(dir, &["compare", "q.vmdk", "x.qcow2"]);
        assert_eq!(r.code, 0, "{o}: vdisk read of qemu's file: {}", r.out);
        check_clean(dir, "v.vmdk");
        same_info(dir, "v.vmdk");
        same_info(dir, "q.vmdk");
    }
}

/// A create that fails midway (no room for the second extent's name: the directory
/// is read-only after the first) leaves none of its files behind.
#[test]
fn vmdk_failed_create_removes_its_files() {
    let d = tmp();
    let dir = d.path();
    // An existing directory where the second extent's file must go.
    std::fs::create_dir(dir.join("v-f002.vmdk")).unwrap();
    let r = vdisk(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentFlat",
            "v.vmdk",
            "3G",
        ],
    );
    assert_ne!(r.code, 0, "create over a directory succeeded: {}", r.out);
    assert_eq!(
        vmdk_files(dir, "v"),
        vec!["v-f002.vmdk".to_string()],
        "{}",
        r.err
    );
}

/// `create -b parent.vmdk` in each sparse subformat: the descriptor records the
/// parent's CID and name as qemu-img's does (byte-identical but for the child's own
/// random CID), the extents are identical, and the child reads the parent's data
/// through both tools, before and after the same writes.
#[test]
fn vmdk_create_with_backing_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "vmdk", "p.vmdk", "6M"]),
        "parent",
    );
    qemu_io(
        dir,
        "vmdk",
        "p.vmdk",
        &["write -P 5 0 3M", "write -P 6 5M 64k"],
    );
    for sub in [
        "monolithicSparse",
        "twoGbMaxExtentSparse",
        "streamOptimized",
    ] {
        let o = format!("subformat={sub}");
        for f in ["q.vmdk", "v.vmdk"] {
            let args = [
                "create", "-q", "-f", "vmdk", "-o", &o, "-b", "p.vmdk", "-F", "vmdk", f,
            ];
            if f == "q.vmdk" {
                ok(qemu_img(dir, &args), "qemu create");
            } else {
                ok(vdisk(dir, &args), "vdisk create");
            }
        }
        same_vmdk_files(dir, sub);
        for f in ["q.vmdk", "v.vmdk"] {
            same_info(dir, f);
            for tool in ["qemu", "vdisk"] {
                let r = if tool == "qemu" {
                    qemu_img(dir, &["compare", "p.vmdk", f])
                } else {
                    vdisk(dir, &["compare", "p.vmdk", f])
                };
                assert_eq!(r.code, 0, "{sub}: {tool}: {f} does not read as its parent");
            }
        }
        if sub != "streamOptimized" {
            let cmds = script(80, 6 << 20, 64 << 10, 6, false, false);
            let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(dir, "vmdk", "q.vmdk", &c);
            vdisk_io(dir, "vmdk", "v.vmdk", &cmds);
            let r = qemu_img(dir, &["compare", "q.vmdk", "v.vmdk"]);
            assert_eq!(r.code, 0, "{sub}: after writes: {}", r.out);
            check_clean(dir, "v.vmdk");
        }
        for f in vmdk_files(dir, "q").iter().chain(&vmdk_files(dir, "v")) {
            std::fs::remove_file(dir.join(f)).unwrap();
        }
    }
}

/// `map` of VMDK images with extent files, beside qemu-img's: each run names the extent
/// file its data is in, and a flat extent's holes are the file's own (zero, still
/// "data" at their offset, as QEMU's recursion into raw extents reports them), for
/// relative and absolute names; `convert` then skips those holes.
#[test]
fn vmdk_extent_files_map_like_qemu() {
    let d = tmp();
    let dir = d.path();
    let cases = [
        ("monolithicFlat", "4M", "f.vmdk"),
        ("twoGbMaxExtentFlat", "4300M", "tf.vmdk"),
        ("twoGbMaxExtentSparse", "4300M", "ts.vmdk"),
    ];
    for (sub, size, name) in cases {
        ok(
            qemu_img(
                dir,
                &[
                    "create",
                    "-q",
                    "-f",
                    "vmdk",
                    "-o",
                    &format!("subformat={sub}"),
                    name,
                    size,
                ],
            ),
            "create",
        );
        let mut cmds = vec!["-c", "write -P 1 0 64k", "-c", "write -P 2 1M 64k"];
        if size != "4M" {
            cmds.extend(["-c", "write -P 3 2047M 2M", "-c", "write -P 4 4200M 64k"]);
        }
        let mut args = vec!["-f", "vmdk"];
        args.extend(&cmds);
        args.push(name);
        ok(qemu_io_run(dir, &args), "qemu-io");
        let abs = dir.join(name).display().to_string();
        for file in [name, abs.as_str()] {
            for out in ["--output=human", "--output=json"] {
                let want = ok(qemu_img(dir, &["map", out, file]), "qemu-img map");
                let got = ok(vdisk(dir, &["map", out, file]), "vdisk map");
                assert_eq!(got, want, "map {out} of {sub} as {file}");
            }
        }
        let target = format!("{name}.qcow2");
        ok(
            vdisk(dir, &["convert", "-O", "qcow2", name, &target]),
            "convert",
        );
        ok(qemu_img(dir, &["compare", name, &target]), "compare");
        let info = json(&ok(
            qemu_img(dir, &["info", "--output=json", &target]),
            "info",
        ));
        let used = info["actual-size"].as_u64().unwrap();
        assert!(
            used < 8 << 20,
            "{sub}: holes were copied ({used} bytes on disk)"
        );
    }
}
