//! VHD (`vpc`) and VDI against qemu-img / qemu-io 10 as oracles: files qemu-img makes
//! in every option combination read bit-exact here; files made here read bit-exact in
//! qemu-img and pass its check (vdi); `info`/`map --output=json` are qemu-img's on both
//! tools' files; random qemu-io write scripts give the same contents through both
//! tools; hostile headers and tables fail with clear errors; the Azure upload shape
//! (fixed VHD, exact whole-MiB size) survives qcow2 → vhd → qcow2 bit-exact.

mod cli_support;
use cli_support::*;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every creation combination: (format, `-o` options, file name).
const COMBOS: &[(&str, &str, &str)] = &[
    ("vpc", "", "dyn.vhd"),
    ("vpc", "subformat=dynamic,force_size=on", "dynf.vhd"),
    ("vpc", "subformat=fixed", "fix.vhd"),
    ("vpc", "subformat=fixed,force_size=on", "fixf.vhd"),
    ("vdi", "", "dyn.vdi"),
    ("vdi", "static=on", "sta.vdi"),
];

/// Sizes to create: a whole MiB, an odd sector count, one not sector aligned.
const SIZES: &[&str] = &["5M", "3146240", "1000000"];

fn create(tool: &str, dir: &Path, fmt: &str, opts: &str, file: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend_from_slice(&["-o", opts]);
    }
    args.extend_from_slice(&[file, size]);
    let r = if tool == "qemu" {
        qemu_img(dir, &args)
    } else {
        vdisk(dir, &args)
    };
    assert_eq!(r.code, 0, "{tool} create {args:?}: {}", r.err);
}

/// The guest contents as raw bytes, converted by `tool`.
fn contents(tool: &str, dir: &Path, fmt: &str, file: &str) -> Vec<u8> {
    let out = format!("{file}.{tool}.raw");
    let args = ["convert", "-f", fmt, "-O", "raw", file, &out];
    let r = if tool == "qemu" {
        qemu_img(dir, &args)
    } else {
        vdisk(dir, &args)
    };
    assert_eq!(r.code, 0, "{tool} convert {file}: {}", r.err);
    let b = std::fs::read(dir.join(&out)).unwrap();
    std::fs::remove_file(dir.join(&out)).unwrap();
    b
}

fn vdisk_io(dir: &Path, fmt: &str, file: &str, cmds: &[String]) {
    let mut args = vec!["io".to_string(), "-f".into(), fmt.into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(file.into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = vdisk(dir, &a);
    assert_eq!(r.code, 0, "vdisk io {cmds:?}: {}{}", r.out, r.err);
    assert!(!r.out.contains("failed"), "{}", r.out);
}

fn same_json(dir: &Path, args: &[&str]) {
    let q = qemu_img(dir, args);
    let v = vdisk(dir, args);
    assert_eq!(q.code, 0, "qemu-img {args:?}: {}", q.err);
    assert_eq!(v.code, 0, "vdisk {args:?}: {}", v.err);
    assert_eq!(json(&v.out), json(&q.out), "{args:?}");
}

fn same_info_and_map(dir: &Path, fmt: &str, file: &str) {
    same_json(dir, &["info", "-f", fmt, "--output=json", file]);
    same_json(dir, &["map", "-f", fmt, "--output=json", file]);
    let q = qemu_img(dir, &["info", "-f", fmt, file]);
    let v = vdisk(dir, &["info", "-f", fmt, file]);
    assert_eq!(v.out, q.out, "info {file}");
}

const WRITES: &[&str] = &[
    "write -P 0x11 0 4096",
    "write -P 0x22 1000 70000",
    "write -P 0x33 2095000 10000",
    "write -z 2097152 512",
    "write -P 0x44 3145728 512",
];

#[test]
fn qemu_made_files_read_bit_exact() {
    let d = tmp();
    let dir = d.path();
    for &(fmt, opts, file) in COMBOS {
        for size in SIZES {
            create("qemu", dir, fmt, opts, file, size);
            same_info_and_map(dir, fmt, file);
            assert_eq!(
                contents("vdisk", dir, fmt, file),
                contents("qemu", dir, fmt, file)
            );
            let info = json(&qemu_img(dir, &["info", "-f", fmt, "--output=json", file]).out);
            let vsize = info["virtual-size"].as_u64().unwrap();
            let cmds: Vec<&str> = WRITES
                .iter()
                .copied()
                .filter(|c| {
                    let w: Vec<u64> = c
                        .split(' ')
                        .rev()
                        .take(2)
                        .map(|x| x.parse().unwrap())
                        .collect();
                    w[1] + w[0] <= vsize
                })
                .collect();
            qemu_io(dir, fmt, file, &cmds);
            same_info_and_map(dir, fmt, file);
            assert_eq!(
                contents("vdisk", dir, fmt, file),
                contents("qemu", dir, fmt, file),
                "{fmt} {opts} {size}"
            );
            std::fs::remove_file(dir.join(file)).unwrap();
        }
    }
}

#[test]
fn vdisk_made_files_read_bit_exact_in_qemu() {
    let d = tmp();
    let dir = d.path();
    for &(fmt, opts, file) in COMBOS {
        for size in SIZES {
            // Same geometry and size as qemu-img's file, same guest view.
            let qfile = format!("q{file}");
            create("qemu", dir, fmt, opts, &qfile, size);
            create("vdisk", dir, fmt, opts, file, size);
            assert_eq!(
                std::fs::metadata(dir.join(file)).unwrap().len(),
                std::fs::metadata(dir.join(&qfile)).unwrap().len(),
                "{fmt} {opts} {size}: file length"
            );
            same_info_and_map(dir, fmt, file);
            let vsize = json(&vdisk(dir, &["info", "-f", fmt, "--output=json", file]).out)
                ["virtual-size"]
                .as_u64()
                .unwrap();
            let cmds: Vec<String> = WRITES
                .iter()
                .filter(|c| {
                    let w: Vec<u64> = c
                        .split(' ')
                        .rev()
                        .take(2)
                        .map(|x| x.parse().unwrap())
                        .collect();
                    w[1] + w[0] <= vsize
                })
                .map(|c| c.to_string())
                .collect();
            vdisk_io(dir, fmt, file, &cmds);
            same_info_and_map(dir, fmt, file);
            assert_eq!(
                contents("qemu", dir, fmt, file),
                contents("vdisk", dir, fmt, file),
                "{fmt} {opts} {size}"
            );
            if fmt == "vdi" {
                let r = qemu_img(dir, &["check", file]);
                assert_eq!(r.code, 0, "qemu-img check {file}: {}{}", r.out, r.err);
                let v = vdisk(dir, &["check", file]);
                assert_eq!((v.code, &v.out), (r.code, &r.out));
            }
            let r = qemu_img(dir, &["compare", "-f", fmt, "-F", fmt, file, &qfile]);
            assert_eq!(r.code, 1, "the written image differs from the fresh one");
            std::fs::remove_file(dir.join(file)).unwrap();
            std::fs::remove_file(dir.join(&qfile)).unwrap();
        }
    }
}

/// A random qemu-io script inside `size` bytes.
fn script(rng: &mut impl Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let len = match rng.gen_range(0..4) {
                0 => rng.gen_range(1..=8u64) * 512,
                1 => rng.gen_range(1..=64u64) * 4096,
                2 => rng.gen_range(1..=3u64) << 20,
                _ => rng.gen_range(1..=300_000u64) & !511,
            }
            .clamp(512, size);
            let off = (rng.gen_range(0..=size - len) / 512) * 512;
            match rng.gen_range(0..10) {
                0 => format!("write -z {off} {len}"),
                1 => format!("discard {off} {len}"),
                _ => format!("write -P {} {off} {len}", rng.gen_range(1..255)),
            }
        })
        .collect()
}

#[test]
fn random_write_scripts_agree_with_qemu_io() {
    let d = tmp();
    let dir = d.path();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x005e_ed15);
    for &(fmt, opts, file) in COMBOS {
        for round in 0..3 {
            create("qemu", dir, fmt, opts, file, "9M");
            let a = format!("a.{file}");
            let b = format!("b.{file}");
            std::fs::copy(dir.join(file), dir.join(&a)).unwrap();
            std::fs::copy(dir.join(file), dir.join(&b)).unwrap();
            let size = json(&qemu_img(dir, &["info", "-f", fmt, "--output=json", file]).out)
                ["virtual-size"]
                .as_u64()
                .unwrap();
            let cmds = script(&mut rng, size, 24);
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(dir, fmt, &a, &refs);
            vdisk_io(dir, fmt, &b, &cmds);
            let want = contents("qemu", dir, fmt, &a);
            assert_eq!(
                contents("qemu", dir, fmt, &b),
                want,
                "{fmt} {opts} round {round}"
            );
            assert_eq!(contents("vdisk", dir, fmt, &b), want);
            assert_eq!(contents("vdisk", dir, fmt, &a), want);
            let r = qemu_img(dir, &["compare", "-f", fmt, "-F", fmt, &a, &b]);
            assert_eq!(r.code, 0, "{}", r.err);
            if fmt == "vdi" {
                ok(qemu_img(dir, &["check", &b]), "qemu-img check");
            }
            for f in [file, a.as_str(), b.as_str()] {
                std::fs::remove_file(dir.join(f)).unwrap();
            }
        }
    }
}

#[test]
fn azure_fixed_vhd_round_trip() {
    // Azure takes fixed VHDs whose virtual size is a whole number of MiB: force_size.
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "37M"]),
        "src",
    );
    qemu_io(
        dir,
        "qcow2",
        "src.qcow2",
        &[
            "write -P 0x5a 0 3M",
            "write -P 0x17 20M 1M",
            "write -P 0x99 37748224 4096",
        ],
    );
    ok(
        vdisk(
            dir,
            &[
                "convert",
                "-O",
                "vpc",
                "-o",
                "subformat=fixed,force_size=on",
                "src.qcow2",
                "az.vhd",
            ],
        ),
        "convert to vhd",
    );
    let len = std::fs::metadata(dir.join("az.vhd")).unwrap().len();
    assert_eq!(len, (37 << 20) + 512, "data plus the footer");
    let foot = std::fs::read(dir.join("az.vhd")).unwrap();
    let foot = &foot[foot.len() - 512..];
    assert_eq!(&foot[..8], b"conectix");
    assert_eq!(&foot[28..32], b"qem2");
    assert_eq!(
        u64::from_be_bytes(foot[48..56].try_into().unwrap()),
        37 << 20
    );
    let info = json(&qemu_img(dir, &["info", "-f", "vpc", "--output=json", "az.vhd"]).out);
    assert_eq!(info["virtual-size"].as_u64(), Some(37 << 20));
    let r = qemu_img(dir, &["compare", "-F", "vpc", "src.qcow2", "az.vhd"]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    ok(
        vdisk(
            dir,
            &[
                "convert",
                "-f",
                "vpc",
                "-O",
                "qcow2",
                "az.vhd",
                "back.qcow2",
            ],
        ),
        "convert back",
    );
    let r = qemu_img(dir, &["compare", "-s", "src.qcow2", "back.qcow2"]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    ok(qemu_img(dir, &["check", "back.qcow2"]), "check");
    assert_eq!(
        contents("qemu", dir, "qcow2", "src.qcow2"),
        contents("vdisk", dir, "qcow2", "back.qcow2")
    );
    // vdisk compare agrees, and qemu-img's own conversion of the vhd is the same.
    ok(
        vdisk(dir, &["compare", "-F", "vpc", "src.qcow2", "az.vhd"]),
        "vdisk compare",
    );
    ok(
        qemu_img(
            dir,
            &[
                "convert",
                "-O",
                "vpc",
                "-o",
                "subformat=fixed,force_size=on",
                "src.qcow2",
                "qaz.vhd",
            ],
        ),
        "qemu convert",
    );
    assert_eq!(
        std::fs::metadata(dir.join("qaz.vhd")).unwrap().len(),
        len,
        "same layout as qemu-img's"
    );
}

#[test]
fn convert_both_ways_through_every_combination() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "6M"]),
        "src",
    );
    qemu_io(
        dir,
        "qcow2",
        "src.qcow2",
        &["write -P 0x61 0 1M", "write -P 0x62 4100k 300k"],
    );
    for &(fmt, opts, file) in COMBOS {
        let mut args = vec!["convert", "-O", fmt];
        if !opts.is_empty() {
            args.extend_from_slice(&["-o", opts]);
        }
        args.extend_from_slice(&["src.qcow2", file]);
        ok(vdisk(dir, &args), "convert to");
        // CHS rounding may grow the VHD: compare in qemu's non-strict mode.
        let r = qemu_img(dir, &["compare", "-F", fmt, "src.qcow2", file]);
        assert_eq!(r.code, 0, "{fmt} {opts}: {}{}", r.out, r.err);
        let back = format!("{file}.qcow2");
        ok(
            vdisk(dir, &["convert", "-f", fmt, "-O", "qcow2", file, &back]),
            "convert back",
        );
        let r = qemu_img(dir, &["compare", "src.qcow2", &back]);
        assert_eq!(r.code, 0, "{fmt} {opts} back: {}{}", r.out, r.err);
        let r = vdisk(dir, &["compare", "-f", fmt, "-F", "qcow2", file, &back]);
        assert_eq!(r.code, 0, "{}", r.err);
    }
}

#[test]
fn unsupported_subcommands_as_qemu() {
    let d = tmp();
    let dir = d.path();
    for &(fmt, opts, file) in COMBOS {
        create("qemu", dir, fmt, opts, file, "2M");
        let mut cases: Vec<Vec<&str>> = vec![
            vec!["resize", "-f", fmt, file, "4M"],
            vec!["resize", "-f", fmt, "--shrink", file, "1M"],
            vec!["check", "-r", "all", "-f", fmt, file],
        ];
        if fmt == "vpc" {
            cases.push(vec!["check", "-f", fmt, file]);
        }
        for args in &cases {
            let q = qemu_img(dir, args);
            let v = vdisk(dir, args);
            assert_eq!(
                (v.code, v.out.clone(), v.err.replace("vdisk:", "qemu-img:")),
                (q.code, q.out.clone(), q.err.clone()),
                "{args:?}"
            );
        }
    }
}

/// Writes `bytes` at `off` of `file`.
fn poke(dir: &Path, file: &str, off: usize, bytes: &[u8]) {
    let mut b = std::fs::read(dir.join(file)).unwrap();
    b[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(dir.join(file), b).unwrap();
}

/// Fixes the footer checksum of a VHD footer at `off`.
fn fix_checksum(dir: &Path, file: &str, off: usize) {
    let mut b = std::fs::read(dir.join(file)).unwrap();
    b[off + 64..off + 68].fill(0);
    let sum: u32 = b[off..off + 512].iter().map(|&x| x as u32).sum();
    b[off + 64..off + 68].copy_from_slice(&(!sum).to_be_bytes());
    std::fs::write(dir.join(file), b).unwrap();
}

/// vdisk refuses to open `file`, with `want` in the message, quickly.
fn refused(dir: &Path, fmt: &str, file: &str, want: &str) {
    let t = Instant::now();
    for args in [
        vec!["info", "-f", fmt, file],
        vec!["convert", "-f", fmt, "-O", "raw", file, "out.raw"],
    ] {
        let r = vdisk(dir, &args);
        assert_eq!(r.code, 1, "{args:?} on hostile {file}: {}", r.out);
        assert!(r.err.contains(want), "{args:?}: {} (wanted {want})", r.err);
        assert!(!r.err.contains("panicked"), "{}", r.err);
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    let _ = std::fs::remove_file(dir.join("out.raw"));
}

#[test]
fn hostile_vhd_headers() {
    let d = tmp();
    let dir = d.path();
    let fresh = |name: &str| {
        create("qemu", dir, "vpc", "", name, "8M");
        name.to_string()
    };
    // Footer checksum (qemu refuses too).
    let f = fresh("sum.vhd");
    poke(dir, &f, 100, &[1]);
    refused(dir, "vpc", &f, "Incorrect header checksum");
    // A fixed VHD whose footer claims more than the file holds.
    create("qemu", dir, "vpc", "subformat=fixed", "fx.vhd", "1M");
    let n = std::fs::metadata(dir.join("fx.vhd")).unwrap().len() as usize;
    poke(dir, "fx.vhd", n - 512 + 28, b"win ");
    poke(dir, "fx.vhd", n - 512 + 48, &(1u64 << 40).to_be_bytes());
    fix_checksum(dir, "fx.vhd", n - 512);
    refused(dir, "vpc", "fx.vhd", "past the end of the file");
    // Huge size in the footer (2040 GiB is the limit).
    let f = fresh("huge.vhd");
    poke(dir, &f, 28, b"win ");
    poke(dir, &f, 48, &(u64::MAX / 2).to_be_bytes());
    fix_checksum(dir, &f, 0);
    refused(dir, "vpc", &f, "too large");
    // Dynamic header out of the file.
    let f = fresh("hdr.vhd");
    poke(dir, &f, 16, &(1u64 << 50).to_be_bytes());
    fix_checksum(dir, &f, 0);
    refused(dir, "vpc", &f, "VHD dynamic disk header");
    // Bad dynamic header magic, block size.
    let f = fresh("magic.vhd");
    poke(dir, &f, 512, b"xxsparse");
    refused(dir, "vpc", &f, "Invalid header magic");
    let f = fresh("bs.vhd");
    poke(dir, &f, 512 + 32, &3000u32.to_be_bytes());
    refused(dir, "vpc", &f, "Invalid block size 3000");
    // Huge BAT (max table entries), BAT too small for the disk.
    let f = fresh("ents.vhd");
    poke(dir, &f, 512 + 28, &u32::MAX.to_be_bytes());
    refused(dir, "vpc", &f, "Max Table Entries too large");
    let f = fresh("small.vhd");
    poke(dir, &f, 512 + 28, &1u32.to_be_bytes());
    refused(dir, "vpc", &f, "Page table too small");
    // BAT entries pointing past the end of the file and into the metadata.
    let f = fresh("past.vhd");
    poke(dir, &f, 1536, &0x0100_0000u32.to_be_bytes());
    refused(dir, "vpc", &f, "The image has been truncated");
    let f = fresh("meta.vhd");
    poke(dir, &f, 1536 + 4, &1u32.to_be_bytes());
    refused(dir, "vpc", &f, "inside the image metadata");
    // BAT over the dynamic header.
    let f = fresh("batover.vhd");
    poke(dir, &f, 512 + 16, &1024u64.to_be_bytes());
    refused(dir, "vpc", &f, "overlaps the image metadata");
    // BAT offset past the end of the file.
    let f = fresh("bat.vhd");
    poke(dir, &f, 512 + 16, &(1u64 << 40).to_be_bytes());
    refused(dir, "vpc", &f, "VHD block allocation table");
    // Truncated file.
    std::fs::write(dir.join("tiny.vhd"), b"conectix").unwrap();
    refused(dir, "vpc", "tiny.vhd", "File too small for a VHD header");
    // Not a VHD at all.
    std::fs::write(dir.join("junk.vhd"), vec![7u8; 4096]).unwrap();
    refused(dir, "vpc", "junk.vhd", "invalid VPC image");
}

#[test]
fn hostile_vdi_headers() {
    let d = tmp();
    let dir = d.path();
    let fresh = |name: &str| {
        create("qemu", dir, "vdi", "", name, "4M");
        name.to_string()
    };
    let f = fresh("ver.vdi");
    poke(dir, &f, 68, &0x0002_0000u32.to_le_bytes());
    refused(dir, "vdi", &f, "unsupported VDI image (version 2.0)");
    let f = fresh("bs.vdi");
    poke(dir, &f, 376, &4096u32.to_le_bytes());
    refused(dir, "vdi", &f, "block size 4096 is not 1048576");
    let f = fresh("size.vdi");
    poke(dir, &f, 368, &(1u64 << 60).to_le_bytes());
    refused(dir, "vdi", &f, "Unsupported VDI image size");
    let f = fresh("room.vdi");
    poke(dir, &f, 384, &1u32.to_le_bytes());
    refused(dir, "vdi", &f, "image bitmap has room for 1048576");
    // Many blocks, a block map past the end of the file: bounded, refused.
    let f = fresh("many.vdi");
    poke(dir, &f, 368, &(1u64 << 44).to_le_bytes());
    poke(dir, &f, 384, &(1u32 << 24).to_le_bytes());
    refused(dir, "vdi", &f, "VDI block map");
    let f = fresh("toomany.vdi");
    poke(dir, &f, 368, &(1u64 << 48).to_le_bytes());
    poke(dir, &f, 384, &(1u32 << 28).to_le_bytes());
    refused(dir, "vdi", &f, "too many blocks");
    let f = fresh("map0.vdi");
    poke(dir, &f, 340, &0u32.to_le_bytes());
    refused(
        dir,
        "vdi",
        &f,
        "VDI block map at offset 0x0 overlaps the image metadata",
    );
    let f = fresh("data0.vdi");
    poke(dir, &f, 344, &512u32.to_le_bytes());
    refused(dir, "vdi", &f, "overlaps the header or the block map");
    let f = fresh("par.vdi");
    poke(dir, &f, 440, &[1]);
    refused(dir, "vdi", &f, "non-NULL parent UUID");
    // A block map entry outside the image: opens (as in qemu), reads fail clearly,
    // check reports it as qemu-img does.
    let f = fresh("ent.vdi");
    poke(dir, &f, 512 + 4, &1000u32.to_le_bytes());
    let r = vdisk(dir, &["convert", "-f", "vdi", "-O", "raw", &f, "out.raw"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("outside the image's blocks"), "{}", r.err);
    let q = qemu_img(dir, &["check", &f]);
    let v = vdisk(dir, &["check", &f]);
    assert_eq!(
        (v.code, v.out, v.err.replace("vdisk:", "qemu-img:")),
        (q.code, q.out, q.err)
    );
    // Two entries naming one block, and a count mismatch.
    let f = fresh("dup.vdi");
    poke(dir, &f, 512, &[0, 0, 0, 0, 0, 0, 0, 0]);
    let q = qemu_img(dir, &["check", &f]);
    let v = vdisk(dir, &["check", &f]);
    assert_ne!(q.code, 0);
    assert_eq!(
        (v.code, v.out, v.err.replace("vdisk:", "qemu-img:")),
        (q.code, q.out, q.err)
    );
    std::fs::write(dir.join("short.vdi"), vec![0u8; 100]).unwrap();
    refused(dir, "vdi", "short.vdi", "not in vdi format");
}

/// A running `vdisk serve`, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, fmt: &str, file: &str, sock: &str) -> Server {
    let pid = dir.join(format!("{sock}.pid"));
    let child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["serve", "-t", "-f", fmt, "-k", sock, "--pid-file"])
        .arg(&pid)
        .arg(file)
        .current_dir(dir)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn vdisk serve");
    let s = Server(child);
    let until = Instant::now() + Duration::from_secs(20);
    while !pid.exists() {
        assert!(Instant::now() < until, "vdisk serve did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    s
}

#[test]
fn served_over_nbd() {
    let d = tmp();
    let dir = d.path();
    for &(fmt, opts, file) in COMBOS {
        create("qemu", dir, fmt, opts, file, "4M");
        let sock = format!("{file}.sock");
        let uri = format!("nbd+unix:///?socket={}", dir.join(&sock).display());
        {
            let _s = serve(dir, fmt, file, &sock);
            let r = qemu_io_run(
                dir,
                &[
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x3c 4096 100000",
                    "-c",
                    "write -P 0x3d 2000000 300000",
                    &uri,
                ],
            );
            assert_eq!(r.code, 0, "{}{}", r.out, r.err);
            let r = qemu_io_run(dir, &["-f", "raw", "-c", "read -P 0x3c 4096 100000", &uri]);
            assert!(!r.out.contains("fail"), "{}", r.out);
        }
        // The writes reached the file: qemu-io reads them there.
        qemu_io(
            dir,
            fmt,
            file,
            &[
                "read -P 0x3c 4096 100000",
                "read -P 0x3d 2000000 300000",
                "read -P 0 0 4096",
            ],
        );
        std::fs::remove_file(dir.join(file)).unwrap();
    }
}
