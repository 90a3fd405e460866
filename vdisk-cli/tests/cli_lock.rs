//! Image locks against a running `qemu-io` (which holds its image open while it reads
//! commands from a pipe): the errors qemu-img gives, in the same cases.

mod cli_support;
use cli_support::*;

#[test]
fn qemu_io_writer_blocks_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "L.qcow2", "1M"]),
        "create",
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "L.raw", "1M"]),
        "create",
    );
    let _h1 = Holder::new(dir, "qcow2", "L.qcow2", false);
    let _h2 = Holder::new(dir, "raw", "L.raw", false);
    let cases: &[&[&str]] = &[
        &["info", "L.qcow2"],
        &["check", "L.qcow2"],
        &["map", "L.qcow2"],
        &["compare", "L.qcow2", "L.raw"],
        &["convert", "-O", "raw", "L.qcow2", "out1.raw"],
        &["convert", "-f", "raw", "-O", "raw", "L.raw", "out2.raw"],
        &["resize", "L.qcow2", "2M"],
        &["map", "-f", "raw", "L.raw"],
        &["info", "-f", "raw", "L.raw"],
    ];
    for c in cases {
        let q = qemu_img(dir, c);
        let v = vdisk(dir, c);
        assert_eq!(
            v.code, q.code,
            "{c:?}: vdisk {} / qemu-img {}",
            v.err, q.err
        );
        if q.err.contains("lock") {
            assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "{c:?}");
        }
    }
    let v = vdisk(dir, &["info", "L.qcow2"]);
    assert!(
        v.err.contains(
            "Failed to get shared \"write\" lock\nIs another process using the image [L.qcow2]?"
        ),
        "{}",
        v.err
    );
    // -U shares everything: info works beside the writer.
    let q = ok(
        qemu_img(dir, &["info", "-U", "--output=json", "L.raw"]),
        "qemu -U",
    );
    let v = ok(
        vdisk(dir, &["info", "-U", "--output=json", "L.raw"]),
        "vdisk -U",
    );
    assert_eq!(json(&v)["virtual-size"], json(&q)["virtual-size"]);
}

#[test]
fn qemu_io_reader_blocks_writers() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "R.qcow2", "1M"]),
        "create",
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "other.raw", "1M"]),
        "create",
    );
    let _h = Holder::new(dir, "qcow2", "R.qcow2", true);
    for c in [
        &["resize", "R.qcow2", "2M"][..],
        &["check", "-r", "all", "R.qcow2"][..],
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            "-f",
            "raw",
            "other.raw",
            "R.qcow2",
        ][..],
    ] {
        let q = qemu_img(dir, c);
        let v = vdisk(dir, c);
        assert_eq!(
            v.code, q.code,
            "{c:?}: vdisk {} / qemu-img {}",
            v.err, q.err
        );
        assert!(
            v.err.contains("Failed to get \"write\" lock"),
            "{c:?}: {}",
            v.err
        );
    }
}

#[test]
fn vdisk_holder_blocks_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "V.qcow2", "1M"]),
        "create",
    );
    {
        let _h = Holder::vdisk(dir, "qcow2", "V.qcow2", false);
        let q = qemu_img(dir, &["info", "V.qcow2"]);
        assert_eq!(q.code, 1);
        assert!(
            q.err.contains("Failed to get shared \"write\" lock\nIs another process using the image [V.qcow2]?"),
            "{}",
            q.err
        );
        let q = qemu_img(dir, &["check", "V.qcow2"]);
        assert_eq!(q.code, 1, "{}", q.err);
        // And vdisk itself is refused the same way.
        let v = vdisk(dir, &["info", "V.qcow2"]);
        assert_eq!(
            v.err.replace("vdisk:", "qemu-img:"),
            qemu_img(dir, &["info", "V.qcow2"]).err
        );
        // -U still reads.
        ok(
            qemu_img(dir, &["info", "-U", "V.qcow2"]),
            "qemu-img info -U",
        );
        ok(vdisk(dir, &["info", "-U", "V.qcow2"]), "vdisk info -U");
    }
    {
        // A read-only holder lets readers in but keeps writers out.
        let _h = Holder::vdisk(dir, "qcow2", "V.qcow2", true);
        ok(
            qemu_img(dir, &["info", "V.qcow2"]),
            "qemu-img info beside a reader",
        );
        let q = qemu_img(dir, &["resize", "V.qcow2", "2M"]);
        assert_eq!(q.code, 1);
        assert!(q.err.contains("Failed to get \"write\" lock"), "{}", q.err);
    }
    // Once the holder is gone, everything works again.
    ok(qemu_img(dir, &["resize", "V.qcow2", "2M"]), "resize");
}
