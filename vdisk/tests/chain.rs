//! Backing chains across formats, built by qemu-img/qemu-io and read through vdisk:
//! depth, relative names, short backing files, mixed formats, loops.

use std::path::Path;
use std::process::Command;
use vdisk::{ExtentKind, Image, OpenOptions};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

/// Reads the whole guest disk through qemu-img (the oracle).
fn qemu_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("oracle.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

fn vdisk_raw(img: &Path) -> Vec<u8> {
    let i = Image::open(img, &ro()).unwrap();
    let mut v = vec![0u8; i.size() as usize];
    i.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn deep_mixed_chain_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // raw <- qcow2 <- qed <- qcow2(v2) <- ... 12 levels, each writing its own sectors.
    run(
        "qemu-img",
        &["create", "-f", "raw", d.join("l0").to_str().unwrap(), "4M"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 4M",
            d.join("l0").to_str().unwrap(),
        ],
    );
    let fmts = ["qcow2", "qed", "qcow2", "qed"];
    let mut prev = ("l0".to_string(), "raw");
    for i in 1..12 {
        let fmt = fmts[i % fmts.len()];
        let name = format!("l{i}");
        let p = d.join(&name);
        let mut args = vec!["create", "-f", fmt, "-b", &prev.0, "-F", prev.1];
        let o;
        if fmt == "qcow2" && i % 3 == 0 {
            o = "compat=0.10,cluster_size=4k".to_string();
            args.extend(["-o", &o]);
        }
        let ps = p.to_str().unwrap().to_string();
        args.push(&ps);
        run("qemu-img", &args);
        let w = format!("write -P {} {} 100k", i + 1, i * 300 * 1024 + 512);
        run("qemu-io", &["-f", fmt, "-c", &w, &ps]);
        prev = (name, fmt);
    }
    let top = d.join("l11");
    assert_eq!(vdisk_raw(&top), qemu_raw(&top));
    let img = Image::open(&top, &ro()).unwrap();
    assert_eq!(img.backing_chain().len(), 11);
    // Offset 0 was only ever written in the raw base: depth 11.
    let st = img.block_status(0, 4096).unwrap();
    assert_eq!((st.kind, st.depth), (ExtentKind::Data, 11));
    let st = img.block_status(11 * 300 * 1024 + 4096, 4096).unwrap();
    assert_eq!((st.kind, st.depth), (ExtentKind::Data, 0));
}

#[test]
fn relative_backing_names_resolve_against_the_image_dir() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("a/b");
    std::fs::create_dir_all(&sub).unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            sub.join("base.qcow2").to_str().unwrap(),
            "1M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 9 0 64k",
            sub.join("base.qcow2").to_str().unwrap(),
        ],
    );
    let top = sub.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    // Open from another working directory by a relative-to-cwd path.
    let img = Image::open(&top, &ro()).unwrap();
    let mut b = vec![0u8; 65536];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 9));
}

#[test]
fn short_backing_reads_zeroes_past_its_end() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["qcow2", "qed"] {
        let base = dir.path().join(format!("base-{fmt}.raw"));
        std::fs::write(&base, vec![0x77u8; 100 * 1024]).unwrap();
        let top = dir.path().join(format!("top.{fmt}"));
        run(
            "qemu-img",
            &[
                "create",
                "-f",
                fmt,
                "-b",
                base.to_str().unwrap(),
                "-F",
                "raw",
                top.to_str().unwrap(),
                "1M",
            ],
        );
        // A partial write into the cluster straddling the backing file's end.
        run(
            "qemu-io",
            &["-f", fmt, "-c", "write -P 3 98k 1k", top.to_str().unwrap()],
        );
        assert_eq!(vdisk_raw(&top), qemu_raw(&top), "{fmt}");
        // And the same write made by vdisk.
        let top2 = dir.path().join(format!("top2.{fmt}"));
        run(
            "qemu-img",
            &[
                "create",
                "-f",
                fmt,
                "-b",
                base.to_str().unwrap(),
                "-F",
                "raw",
                top2.to_str().unwrap(),
                "1M",
            ],
        );
        {
            let img = Image::open(&top2, &OpenOptions::default()).unwrap();
            img.write_at(&[3u8; 1024], 98 * 1024).unwrap();
            img.flush().unwrap();
        }
        run("qemu-img", &["check", top2.to_str().unwrap()]);
        run(
            "qemu-img",
            &["compare", top.to_str().unwrap(), top2.to_str().unwrap()],
        );
    }
}

#[test]
fn backing_loops_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    run("qemu-img", &["create", "-f", "qcow2", sa, "1M"]);
    run(
        "qemu-img",
        &[
            "create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", sb, "1M",
        ],
    );
    run(
        "qemu-img",
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", sa],
    );
    let e = Image::open(&a, &ro()).unwrap_err();
    assert!(matches!(e, vdisk::Error::BackingLoop(_)), "{e}");
    // An image that is its own backing file.
    let c = dir.path().join("c.qed");
    run(
        "qemu-img",
        &["create", "-f", "qed", c.to_str().unwrap(), "1M"],
    );
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-b",
            "c.qed",
            "-F",
            "qed",
            c.to_str().unwrap(),
        ],
    );
    let e = Image::open(&c, &ro()).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
}

#[test]
fn no_backing_option_reads_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x11u8; 65536]).unwrap();
    let top = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            top.to_str().unwrap(),
        ],
    );
    let img = Image::open(
        &top,
        &OpenOptions {
            read_only: true,
            no_backing: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut b = vec![1u8; 4096];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // A missing backing file is a clear error naming it.
    std::fs::remove_file(&base).unwrap();
    let e = Image::open(&top, &ro()).unwrap_err().to_string();
    assert!(e.contains("base.raw"), "{e}");
}
