//! qcow2 external data files (`data_file`, `data_file_raw`) side by side with qemu-img
//! and qemu-io: the same scripts on images each tool made leave equal images (guest
//! contents, `map --output=json`, the data file's bytes), clean for `qemu-img check`;
//! each tool reads the other's images, also as backing files; options, errors and
//! `info` as qemu-img's.

mod cli_support;
use cli_support::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

const SIZE: u64 = 4 << 20;

/// A random script of writes, zero writes (with and without unmap) and discards,
/// cluster aligned and not.
fn script(seed: u64, n: usize) -> Vec<String> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (off, len) = if r.gen_bool(0.5) {
                let off = r.gen_range(0..SIZE / 65536) * 65536;
                (off, r.gen_range(1..4u64) * 65536)
            } else {
                let off = r.gen_range(0..SIZE / 512) * 512;
                (off, r.gen_range(1..300u64) * 512)
            };
            let len = len.min(SIZE - off);
            match r.gen_range(0..6) {
                0..=2 => format!("write -P {} {off} {len}", r.gen_range(1..255)),
                3 => format!("write -z {off} {len}"),
                4 => format!("write -z -u {off} {len}"),
                _ => format!("discard {off} {len}"),
            }
        })
        .collect()
}

fn run_io(dir: &Path, tool: &str, file: &str, cmds: &[String]) {
    let mut args: Vec<&str> = Vec::new();
    if tool == "vdisk" {
        args.push("io");
    }
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(file);
    let r = if tool == "vdisk" {
        vdisk(dir, &args)
    } else {
        qemu_io_run(dir, &args)
    };
    assert_eq!(r.code, 0, "{tool} io: {}{}", r.out, r.err);
    assert!(!r.out.contains("failed"), "{tool} io: {}{}", r.out, r.err);
}

fn create(dir: &Path, tool: &str, opts: &str) -> Run {
    let args = ["create", "-f", "qcow2", "-o", opts, "img.qcow2", "4M"];
    if tool == "vdisk" {
        vdisk(dir, &args)
    } else {
        qemu_img(dir, &args)
    }
}

fn map(dir: &Path, file: &str) -> String {
    ok(
        qemu_img(dir, &["map", "--output=json", file]),
        "qemu-img map",
    )
}

fn check_clean(dir: &Path, file: &str) {
    let r = qemu_img(dir, &["check", file]);
    assert_eq!(r.code, 0, "qemu-img check {file}: {}{}", r.out, r.err);
    assert!(r.out.contains("No errors were found"), "{}", r.out);
}

/// One image made and written by qemu, one by vdisk, same options and script: equal
/// "Formatting" lines, guest contents, maps and data files; both clean; and each
/// tool reads the other's image as its own.
fn both_ways(opts: &str, seed: u64) {
    both_ways_with(opts, seed, false)
}

/// [`both_ways`], with (`backing`) a raw backing file `base.raw` beside each image,
/// written with a pattern by qemu-io (the options name it).
fn both_ways_with(opts: &str, seed: u64, backing: bool) {
    let d = tmp();
    let (q, v) = (d.path().join("q"), d.path().join("v"));
    std::fs::create_dir_all(&q).unwrap();
    std::fs::create_dir_all(&v).unwrap();
    if backing {
        for dir in [&q, &v] {
            ok(
                qemu_img(dir, &["create", "-q", "-f", "raw", "base.raw", "4M"]),
                "qemu-img create base",
            );
            qemu_io(dir, "raw", "base.raw", &["write -P 0xb5 0 4M"]);
        }
    }
    let cq = ok(create(&q, "qemu", opts), "qemu-img create");
    let cv = ok(create(&v, "vdisk", opts), "vdisk create");
    assert_eq!(cq, cv, "{opts}");
    assert_eq!(
        std::fs::read(q.join("img.qcow2")).unwrap(),
        std::fs::read(v.join("img.qcow2")).unwrap(),
        "{opts}: freshly created image files differ"
    );
    assert_eq!(
        std::fs::read(q.join("d.raw")).unwrap(),
        std::fs::read(v.join("d.raw")).unwrap(),
        "{opts}: freshly created data files differ"
    );
    let cmds = script(seed, 40);
    run_io(&q, "qemu", "img.qcow2", &cmds);
    run_io(&v, "vdisk", "img.qcow2", &cmds);
    check_clean(&v, "img.qcow2");
    assert_eq!(
        map(&q, "img.qcow2"),
        map(&v, "img.qcow2"),
        "{opts} seed {seed}"
    );
    assert_eq!(
        std::fs::read(q.join("d.raw")).unwrap(),
        std::fs::read(v.join("d.raw")).unwrap(),
        "{opts} seed {seed}: data files differ"
    );
    // Run from q/: each image's data file name resolves in its own directory only
    // when run from there, so compare through json: names with explicit data files.
    let node = |dir: &Path| {
        format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"data-file":{{"driver":"file","filename":"{}"}}}}"#,
            dir.join("img.qcow2").display(),
            dir.join("d.raw").display()
        )
    };
    let (nq, nv) = (node(&q), node(&v));
    let r = qemu_img(&q, &["compare", &nq, &nv]);
    assert_eq!(r.code, 0, "qemu-img compare: {}{}", r.out, r.err);
    let r = vdisk(&q, &["compare", "img.qcow2", &nv]);
    assert_eq!(
        r.code, 0,
        "vdisk compare (qemu's image): {}{}",
        r.out, r.err
    );
    // vdisk's check agrees with qemu-img's on both images.
    for dir in [&q, &v] {
        let a = qemu_img(dir, &["check", "--output=json", "img.qcow2"]);
        let b = vdisk(dir, &["check", "--output=json", "img.qcow2"]);
        assert_eq!((a.code, json(&a.out)), (b.code, json(&b.out)), "{opts}");
    }
    // With data_file_raw, the data file is the guest disk.
    if opts.contains("data_file_raw=on") {
        let r = qemu_img(
            &v,
            &["compare", "-f", "raw", "-F", "qcow2", "d.raw", "img.qcow2"],
        );
        assert_eq!(r.code, 0, "raw data file vs guest: {}{}", r.out, r.err);
    }
}

#[test]
fn data_file_scripts_match_qemu() {
    for (i, opts) in [
        "data_file=d.raw",
        "data_file=d.raw,cluster_size=4096",
        "data_file=d.raw,preallocation=metadata",
        "data_file=d.raw,preallocation=falloc,lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        both_ways(opts, 10 + i as u64);
    }
}

#[test]
fn data_file_raw_scripts_match_qemu() {
    for (i, opts) in [
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,data_file_raw=on,cluster_size=16384",
        "data_file=d.raw,data_file_raw=on,preallocation=full",
    ]
    .iter()
    .enumerate()
    {
        both_ways(opts, 20 + i as u64);
    }
}

#[test]
fn info_shows_the_data_file_like_qemu() {
    let d = tmp();
    let dir = d.path();
    for (opts, raw) in [
        ("data_file=d.raw", false),
        ("data_file=d.raw,data_file_raw=on", true),
    ] {
        ok(create(dir, "qemu", opts), "create");
        qemu_io(dir, "qcow2", "img.qcow2", &["write -P 3 64k 64k"]);
        let q = ok(qemu_img(dir, &["info", "img.qcow2"]), "qemu-img info");
        let v = ok(vdisk(dir, &["info", "img.qcow2"]), "vdisk info");
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.contains("disk size"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&q), strip(&v));
        assert!(v.contains(&format!("    data file: d.raw\n    data file raw: {raw}\n")));
        let mut qj = json(&ok(
            qemu_img(dir, &["info", "--output=json", "img.qcow2"]),
            "info",
        ));
        let mut vj = json(&ok(
            vdisk(dir, &["info", "--output=json", "img.qcow2"]),
            "info",
        ));
        strip_keys(&mut qj, &["actual-size"]);
        strip_keys(&mut vj, &["actual-size"]);
        assert_eq!(qj, vj);
        let h = vdisk(dir, &["map", "img.qcow2"]);
        let hq = qemu_img(dir, &["map", "img.qcow2"]);
        assert_eq!(h.out, hq.out);
        assert!(h.out.contains("d.raw"), "{}", h.out);
    }
}

#[test]
fn data_file_errors_match_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]),
        "base",
    );
    for args in [
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file_raw=on",
            "x.qcow2",
            "1M",
        ],
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=x.raw,compat=0.10",
            "x.qcow2",
            "1M",
        ],
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=x.raw,data_file_raw=on",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "x.qcow2",
        ],
    ] {
        let q = qemu_img(dir, &args);
        let v = vdisk(dir, &args);
        assert_eq!(q.code, v.code, "{args:?}: {} / {}", q.err, v.err);
        assert_eq!(q.out, v.out, "{args:?}");
        assert_eq!(q.err, v.err.replace("vdisk:", "qemu-img:"), "{args:?}");
    }
    // A data-file child on an image without an external data file.
    let spec = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"},"data-file":{"driver":"file","filename":"base.qcow2"}}"#;
    let v = vdisk(dir, &["info", spec]);
    assert_ne!(v.code, 0);
    assert!(
        v.err
            .contains("'data-file' can only be set for images with an external data file"),
        "{}",
        v.err
    );
    // Compressed writes and internal snapshots are refused, as qemu does.
    ok(create(dir, "vdisk", "data_file=d.raw"), "create");
    let v = vdisk(dir, &["io", "-c", "write -c 0 64k", "img.qcow2"]);
    let q = qemu_io_run(dir, &["-c", "write -c 0 64k", "img.qcow2"]);
    assert_eq!(v.out, q.out);
    assert!(v.out.contains("Operation not supported"), "{}", v.out);
    let v = vdisk(dir, &["snapshot", "-c", "s1", "img.qcow2"]);
    let q = qemu_img(dir, &["snapshot", "-c", "s1", "img.qcow2"]);
    assert_eq!(v.code, q.code);
    assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err);
    // A missing data file is named when I/O needs it; `info` does not open it (as
    // QEMU since its CVE-2024-4467 fix).
    std::fs::remove_file(dir.join("d.raw")).unwrap();
    let v = vdisk(dir, &["check", "img.qcow2"]);
    let q = qemu_img(dir, &["check", "img.qcow2"]);
    assert_eq!(v.code, q.code);
    assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err);
    let v = vdisk(dir, &["info", "img.qcow2"]);
    let q = qemu_img(dir, &["info", "img.qcow2"]);
    assert_eq!((v.code, v.out.contains("data file: d.raw")), (q.code, true));
}

/// The data file name is opened as QEMU opens it: as recorded, from the working
/// directory (not from the image's directory).
#[test]
fn data_file_name_resolves_like_qemu() {
    let d = tmp();
    let dir = d.path();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let r = vdisk(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=x.raw",
            "sub/i.qcow2",
            "1M",
        ],
    );
    ok(r, "create");
    assert!(
        dir.join("x.raw").exists(),
        "created from the working directory"
    );
    assert!(!dir.join("sub/x.raw").exists());
    let v = vdisk(dir, &["io", "-c", "write -P 9 0 4k", "sub/i.qcow2"]);
    ok(v, "io");
    qemu_io(dir, "qcow2", "sub/i.qcow2", &["read -P 9 0 4k"]);
    // From sub/ neither tool finds x.raw.
    let v = vdisk(&dir.join("sub"), &["check", "i.qcow2"]);
    let q = qemu_img(&dir.join("sub"), &["check", "i.qcow2"]);
    assert_ne!(q.code, 0);
    assert_eq!(v.code, q.code);
    assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err);
}

/// Data-file images in chains: as backing files of ordinary overlays (each tool's
/// overlay over each tool's data-file image), and with backing files of their own.
#[test]
fn data_file_images_in_chains() {
    let d = tmp();
    let dir = d.path();
    ok(create(dir, "qemu", "data_file=d.raw"), "create");
    qemu_io(
        dir,
        "qcow2",
        "img.qcow2",
        &["write -P 5 0 1M", "write -z 128k 64k"],
    );
    qemu_overlay(dir, "qcow2", "img.qcow2", "qcow2", "top.qcow2");
    qemu_overlay(dir, "qcow2", "img.qcow2", "qcow2", "ref.qcow2");
    let w = ["write -P 6 96k 64k", "discard 256k 64k", "write -z 512k 4k"];
    let cmds: Vec<String> = w.iter().map(|s| s.to_string()).collect();
    run_io(dir, "vdisk", "top.qcow2", &cmds);
    run_io(dir, "qemu", "ref.qcow2", &cmds);
    check_clean(dir, "top.qcow2");
    ok(
        qemu_img(dir, &["compare", "top.qcow2", "ref.qcow2"]),
        "compare",
    );
    ok(
        vdisk(dir, &["compare", "top.qcow2", "ref.qcow2"]),
        "vdisk compare",
    );
    assert_eq!(map(dir, "top.qcow2"), map(dir, "ref.qcow2"));
    let vm = ok(
        vdisk(dir, &["map", "--output=json", "top.qcow2"]),
        "vdisk map",
    );
    assert_eq!(vm, map(dir, "top.qcow2"));
    // A data-file image over a standard backing file (written by vdisk, checked and
    // compared by qemu against the same writes by qemu-io).
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"]),
        "base",
    );
    qemu_io(dir, "qcow2", "b.qcow2", &["write -P 1 0 4M"]);
    for (tool, name, data) in [
        ("vdisk", "o1.qcow2", "o1.raw"),
        ("qemu", "o2.qcow2", "o2.raw"),
    ] {
        let opts = format!("data_file={data}");
        let args = [
            "create", "-q", "-f", "qcow2", "-o", &opts, "-b", "b.qcow2", "-F", "qcow2", name,
        ];
        ok(
            if tool == "vdisk" {
                vdisk(dir, &args)
            } else {
                qemu_img(dir, &args)
            },
            "create",
        );
        let c: Vec<String> = [
            "write -P 2 1000 3000",
            "write -z 70000 70000",
            "discard 200k 128k",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        run_io(dir, "vdisk", name, &c);
    }
    check_clean(dir, "o1.qcow2");
    ok(
        qemu_img(dir, &["compare", "o1.qcow2", "o2.qcow2"]),
        "compare",
    );
    assert_eq!(map(dir, "o1.qcow2"), map(dir, "o2.qcow2"));
}

/// resize changes both files; convert writes to a data file; amend renames it and
/// refuses what qemu refuses.
#[test]
fn resize_convert_amend() {
    let d = tmp();
    let dir = d.path();
    ok(create(dir, "vdisk", "data_file=d.raw"), "create");
    qemu_io(dir, "qcow2", "img.qcow2", &["write -P 4 0 64k"]);
    ok(vdisk(dir, &["resize", "img.qcow2", "8M"]), "grow");
    assert_eq!(std::fs::metadata(dir.join("d.raw")).unwrap().len(), 8 << 20);
    ok(
        vdisk(dir, &["resize", "--shrink", "img.qcow2", "2M"]),
        "shrink",
    );
    assert_eq!(std::fs::metadata(dir.join("d.raw")).unwrap().len(), 2 << 20);
    check_clean(dir, "img.qcow2");
    qemu_io(dir, "qcow2", "img.qcow2", &["read -P 4 0 64k"]);
    // convert to a data-file image, and from one.
    let r = vdisk(
        dir,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "data_file=c.raw",
            "img.qcow2",
            "c.qcow2",
        ],
    );
    ok(r, "convert to");
    check_clean(dir, "c.qcow2");
    ok(
        qemu_img(dir, &["compare", "img.qcow2", "c.qcow2"]),
        "compare",
    );
    ok(
        vdisk(dir, &["convert", "-O", "raw", "c.qcow2", "c.img"]),
        "convert from",
    );
    ok(
        qemu_img(dir, &["compare", "-F", "raw", "img.qcow2", "c.img"]),
        "compare",
    );
    // amend: a new name (not opened), data_file_raw only off; neither on an image
    // without a data file.
    std::fs::rename(dir.join("c.raw"), dir.join("c2.raw")).unwrap();
    let spec = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"c.qcow2"},"data-file":{"driver":"file","filename":"c2.raw"}}"#;
    ok(
        vdisk(dir, &["amend", "-o", "data_file=c2.raw", spec]),
        "amend rename",
    );
    qemu_io(dir, "qcow2", "c.qcow2", &["read -P 4 0 64k"]);
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "n.qcow2", "1M"]),
        "plain",
    );
    for (file, o) in [
        ("n.qcow2", "data_file=n.raw"),
        ("n.qcow2", "data_file_raw=on"),
        ("c.qcow2", "data_file_raw=on"),
    ] {
        let q = qemu_img(dir, &["amend", "-o", o, file]);
        let v = vdisk(dir, &["amend", "-o", o, file]);
        assert_eq!(q.code, v.code, "{o}: {} / {}", q.err, v.err);
        assert_eq!(q.err, v.err.replace("vdisk:", "qemu-img:"), "{o}");
    }
}

#[test]
fn data_file_is_locked_like_the_image() {
    let d = tmp();
    let dir = d.path();
    ok(create(dir, "vdisk", "data_file=d.raw"), "create");
    // `vdisk io` holding the image read-write: its data file is locked too.
    let h = Holder::vdisk(dir, "qcow2", "img.qcow2", false);
    // qemu refuses to open the data file for writing while vdisk writes through it.
    let q = qemu_io_run(dir, &["-f", "raw", "-c", "read 0 4k", "d.raw"]);
    assert_ne!(
        q.code, 0,
        "qemu-io opened a data file vdisk holds: {}",
        q.out
    );
    assert!(q.err.contains("lock"), "{}", q.err);
    drop(h);
    qemu_io(dir, "raw", "d.raw", &["read 0 4k"]);
}

/// commit and rebase across data-file images, checked by qemu.
#[test]
fn commit_and_rebase_with_data_files() {
    let d = tmp();
    let dir = d.path();
    let o = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=b.raw",
        "b.qcow2",
        "4M",
    ];
    ok(vdisk(dir, &o), "base");
    run_io(dir, "vdisk", "b.qcow2", &["write -P 1 0 4M".to_string()]);
    qemu_overlay(dir, "qcow2", "b.qcow2", "qcow2", "t.qcow2");
    let w: Vec<String> = ["write -P 2 64k 128k", "write -z 1M 64k"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    run_io(dir, "vdisk", "t.qcow2", &w);
    ok(
        vdisk(dir, &["commit", "t.qcow2"]),
        "commit into a data-file base",
    );
    check_clean(dir, "b.qcow2");
    qemu_io(
        dir,
        "qcow2",
        "b.qcow2",
        &["read -P 2 64k 128k", "read -P 0 1M 64k", "read -P 1 2M 64k"],
    );
    // A data-file overlay committed into its standard backing file.
    let o = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=o.raw",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "o.qcow2",
    ];
    ok(vdisk(dir, &o), "overlay");
    run_io(dir, "vdisk", "o.qcow2", &["write -P 7 0 4k".to_string()]);
    ok(
        vdisk(dir, &["commit", "o.qcow2"]),
        "commit a data-file overlay",
    );
    check_clean(dir, "o.qcow2");
    qemu_io(
        dir,
        "qcow2",
        "b.qcow2",
        &["read -P 7 0 4k", "read -P 2 64k 128k"],
    );
    qemu_io(dir, "qcow2", "o.qcow2", &["read -P 7 0 4k"]);
    // rebase the overlay onto another data-file image: the guest view is kept.
    let o = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=c.raw",
        "c.qcow2",
        "4M",
    ];
    ok(qemu_img(dir, &o), "other base");
    qemu_io(dir, "qcow2", "c.qcow2", &["write -P 3 0 64k"]);
    ok(
        vdisk(dir, &["rebase", "-b", "c.qcow2", "-F", "qcow2", "o.qcow2"]),
        "rebase",
    );
    check_clean(dir, "o.qcow2");
    qemu_io(
        dir,
        "qcow2",
        "o.qcow2",
        &["read -P 7 0 4k", "read -P 2 64k 128k", "read -P 1 2M 64k"],
    );
}

/// Extended L2 entries together with an external data file (QEMU's combination in
/// full): data at the guest offset, subclusters allocated per write, zero writes
/// (with and without unmap) and discards per subcluster, offset 0 read as data
/// file offset 0; at 16K, 64K and 2M clusters, with and without a backing file,
/// with `data_file_raw` off and on (qemu-img refuses a backing file with a raw data
/// file); both directions.
#[test]
fn extended_l2_data_file_scripts_match_qemu() {
    let mut seed = 40;
    for cs in ["16k", "64k", "2M"] {
        for raw in ["off", "on"] {
            let backings: &[bool] = if raw == "off" {
                &[false, true]
            } else {
                &[false]
            };
            for &backing in backings {
                let mut opts =
                    format!("extended_l2=on,cluster_size={cs},data_file=d.raw,data_file_raw={raw}");
                if backing {
                    opts.push_str(",backing_file=base.raw,backing_fmt=raw");
                }
                for _ in 0..2 {
                    both_ways_with(&opts, seed, backing);
                    seed += 1;
                }
            }
        }
    }
}

/// Extended L2 with a data file through the other commands, each tool on its own
/// copy: `convert` to such a target (equal guest contents, maps and data files; clean
/// check), `resize` growing and shrinking both files, `amend` refusing what qemu-img
/// refuses with its words, and `info` equal but for the file names.
#[test]
fn extended_l2_data_file_convert_resize_amend() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "src.raw", "3M"]),
        "qemu-img create",
    );
    qemu_io(
        dir,
        "raw",
        "src.raw",
        &["write -P 7 0 1M", "write -P 9 2M 100k"],
    );
    let run = |t: &str, args: &[&str]| {
        if t == "q" {
            qemu_img(dir, args)
        } else {
            vdisk(dir, args)
        }
    };
    for t in ["q", "v"] {
        let (img, dat) = (format!("{t}.qcow2"), format!("{t}.dat"));
        let o = format!("extended_l2=on,cluster_size=16k,data_file={dat}");
        ok(
            run(t, &["convert", "-O", "qcow2", "-o", &o, "src.raw", &img]),
            "convert",
        );
    }
    let same = |what: &str| {
        let r = qemu_img(dir, &["compare", "q.qcow2", "v.qcow2"]);
        assert_eq!(r.code, 0, "{what}: compare: {}{}", r.out, r.err);
        assert_eq!(map(dir, "q.qcow2"), map(dir, "v.qcow2"), "{what}: map");
        assert_eq!(
            std::fs::read(dir.join("q.dat")).unwrap(),
            std::fs::read(dir.join("v.dat")).unwrap(),
            "{what}: data files"
        );
        check_clean(dir, "v.qcow2");
        let info = |t: &str| {
            ok(run(t, &["info", &format!("{t}.qcow2")]), "info")
                .replace(&format!("{t}.qcow2"), "X")
                .replace(&format!("{t}.dat"), "D")
        };
        assert_eq!(info("q"), info("v"), "{what}: info");
    };
    same("convert");
    for (args, what) in [
        (&["resize", "IMG", "5M"][..], "grow"),
        (&["resize", "--shrink", "IMG", "2M"], "shrink"),
    ] {
        for t in ["q", "v"] {
            let img = format!("{t}.qcow2");
            let a: Vec<&str> = args
                .iter()
                .map(|&x| if x == "IMG" { img.as_str() } else { x })
                .collect();
            ok(run(t, &a), what);
        }
        same(what);
    }
    for o in ["extended_l2=off", "data_file_raw=on", "compat=0.10"] {
        let q = run("q", &["amend", "-o", o, "q.qcow2"]);
        let v = run("v", &["amend", "-o", o, "v.qcow2"]);
        assert_eq!(q.code, 1, "{o}: {}", q.err);
        assert_eq!(
            (v.code, v.err.replacen("vdisk:", "qemu-img:", 1)),
            (q.code, q.err.clone()),
            "amend -o {o}"
        );
    }
    same("amend refusals");
}
