//! `vdisk resize`: sizes, relative sizes, --shrink, messages and results like qemu-img.

mod cli_support;
use cli_support::*;
use std::path::Path;

fn size_of(dir: &Path, name: &str) -> u64 {
    let j = json(&ok(qemu_img(dir, &["info", "--output=json", name]), "info"));
    j["virtual-size"].as_u64().unwrap()
}

#[test]
fn raw_resize_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "a.raw", "1M"]),
        "create",
    );
    qemu_io(dir, "raw", "a.raw", &["write -P 7 0 1M"]);
    let v = vdisk(dir, &["resize", "-f", "raw", "a.raw", "+1M"]);
    assert_eq!((v.code, v.out.as_str()), (0, "Image resized.\n"));
    assert_eq!(size_of(dir, "a.raw"), 2 << 20);
    // Shrinking needs --shrink; the messages match qemu-img's.
    let v = vdisk(dir, &["resize", "-f", "raw", "a.raw", "512k"]);
    let q = qemu_img(dir, &["resize", "-f", "raw", "a.raw", "512k"]);
    assert_eq!(v.code, 1);
    assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err);
    assert_eq!(size_of(dir, "a.raw"), 2 << 20);
    let v = vdisk(
        dir,
        &["resize", "-q", "-f", "raw", "--shrink", "a.raw", "-1536k"],
    );
    assert_eq!((v.code, v.out.as_str()), (0, ""), "{}", v.err);
    assert_eq!(size_of(dir, "a.raw"), 512 << 10);
    // The kept data is intact; the regrown tail reads as zeroes.
    ok(vdisk(dir, &["resize", "-f", "raw", "a.raw", "1M"]), "grow");
    qemu_io(
        dir,
        "raw",
        "a.raw",
        &["read -P 7 0 512k", "read -P 0 512k 512k"],
    );
    // Bad sizes.
    let v = vdisk(dir, &["resize", "-f", "raw", "a.raw", "1x"]);
    let q = qemu_img(dir, &["resize", "-f", "raw", "a.raw", "1x"]);
    assert_eq!(
        (v.code, v.err.replace("vdisk:", "qemu-img:")),
        (q.code, q.err)
    );
    // Preallocated growth.
    ok(
        vdisk(
            dir,
            &[
                "resize",
                "-f",
                "raw",
                "--preallocation=falloc",
                "a.raw",
                "5M",
            ],
        ),
        "falloc",
    );
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(dir.join("a.raw")).unwrap().blocks() * 512;
    assert!(blocks >= 4 << 20, "allocated {blocks}");
}

#[test]
fn qcow2_and_qed_resize() {
    let d = tmp();
    let dir = d.path();
    for fmt in ["qcow2", "qed"] {
        let name = format!("a.{fmt}");
        ok(
            qemu_img(dir, &["create", "-q", "-f", fmt, &name, "1M"]),
            "create",
        );
        qemu_io(dir, fmt, &name, &["write -P 7 0 1M"]);
        ok(vdisk(dir, &["resize", &name, "+3M"]), "grow");
        assert_eq!(size_of(dir, &name), 4 << 20);
        qemu_io(dir, fmt, &name, &["read -P 7 0 1M", "read -P 0 1M 3M"]);
        let r = qemu_img(dir, &["check", &name]);
        assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    }
    ok(
        vdisk(dir, &["resize", "--shrink", "a.qcow2", "512k"]),
        "shrink",
    );
    assert_eq!(size_of(dir, "a.qcow2"), 512 << 10);
    let r = qemu_img(dir, &["check", "a.qcow2"]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
}
