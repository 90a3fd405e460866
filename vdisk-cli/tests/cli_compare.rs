//! `vdisk compare`: the messages and exit codes (0 same, 1 different, 2 error) of
//! `qemu-img compare`.

mod cli_support;
use cli_support::*;
use std::path::Path;

fn same_compare(dir: &Path, args: &[&str]) -> i32 {
    let mut a = vec!["compare"];
    a.extend_from_slice(args);
    let q = qemu_img(dir, &a);
    let v = vdisk(dir, &a);
    assert_eq!(
        v.code, q.code,
        "compare {a:?}: {}{} vs {}{}",
        v.out, v.err, q.out, q.err
    );
    assert_eq!(v.out, q.out, "compare {a:?}");
    assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "compare {a:?}");
    v.code
}

#[test]
fn raw_compare_codes_and_messages() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "a.raw", "4M"]),
        "create",
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "b.raw", "6M"]),
        "create",
    );
    qemu_io(dir, "raw", "a.raw", &["write -P 9 1M 1M"]);
    qemu_io(dir, "raw", "b.raw", &["write -P 9 1M 1M"]);
    assert_eq!(
        same_compare(dir, &["-f", "raw", "-F", "raw", "a.raw", "b.raw"]),
        0
    );
    assert_eq!(
        same_compare(dir, &["-s", "-f", "raw", "-F", "raw", "a.raw", "b.raw"]),
        1
    );
    assert_eq!(
        same_compare(dir, &["-q", "-f", "raw", "-F", "raw", "a.raw", "b.raw"]),
        0
    );
    // Data past the smaller image's end.
    qemu_io(dir, "raw", "b.raw", &["write -P 1 5000k 1"]);
    assert_eq!(
        same_compare(dir, &["-f", "raw", "-F", "raw", "a.raw", "b.raw"]),
        1
    );
    assert_eq!(
        same_compare(dir, &["-f", "raw", "-F", "raw", "b.raw", "a.raw"]),
        1
    );
    // A difference inside: reported at its 512-byte sector.
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "c.raw", "4M"]),
        "create",
    );
    qemu_io(
        dir,
        "raw",
        "c.raw",
        &["write -P 9 1M 1M", "write -P 8 1500000 3"],
    );
    assert_eq!(
        same_compare(dir, &["-f", "raw", "-F", "raw", "a.raw", "c.raw"]),
        1
    );
    // Data on one side, hole on the other.
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "z.raw", "4M"]),
        "create",
    );
    assert_eq!(
        same_compare(dir, &["-f", "raw", "-F", "raw", "a.raw", "z.raw"]),
        1
    );
    // Explicit zeroes on one side equal a hole.
    qemu_io(dir, "raw", "z.raw", &["write -P 0 0 2M"]);
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "h.raw", "4M"]),
        "create",
    );
    assert_eq!(
        same_compare(dir, &["-f", "raw", "-F", "raw", "z.raw", "h.raw"]),
        0
    );
    // Errors: exit 2.
    assert_eq!(same_compare(dir, &["a.raw", "missing.raw"]), 2);
    assert_eq!(same_compare(dir, &["-f", "qcow2", "a.raw", "a.raw"]), 2);
}

#[test]
fn qcow2_compare_against_raw() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]),
        "create",
    );
    qemu_io(
        dir,
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 1M", "write -c -P 2 2M 64k"],
    );
    qemu_overlay(dir, "qcow2", "base.qcow2", "qcow2", "top.qcow2");
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &["write -z 0 64k", "write -P 3 3M 4k"],
    );
    ok(
        qemu_img(dir, &["convert", "-O", "raw", "top.qcow2", "flat.raw"]),
        "convert",
    );
    assert_eq!(same_compare(dir, &["top.qcow2", "flat.raw"]), 0);
    assert_eq!(
        same_compare(dir, &["-F", "raw", "flat.raw", "base.qcow2"]),
        1
    );
    assert_eq!(same_compare(dir, &["top.qcow2", "base.qcow2"]), 1);
    // Strict mode also compares allocation.
    ok(
        qemu_img(dir, &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"]),
        "convert",
    );
    assert_eq!(same_compare(dir, &["-s", "top.qcow2", "flat.raw"]), 1);
    assert_eq!(same_compare(dir, &["-s", "flat.qcow2", "top.qcow2"]), 1);
    assert_eq!(same_compare(dir, &["-s", "flat.qcow2", "flat.qcow2"]), 0);
    assert_eq!(same_compare(dir, &["-s", "-q", "top.qcow2", "flat.raw"]), 1);
}

#[test]
fn qed_unallocated_against_raw_zero_data() {
    let d = tmp();
    let dir = d.path();
    // Unallocated in the QED image, explicit zero bytes in the raw one, then equal data.
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qed", "a.qed", "8M"]),
        "create",
    );
    qemu_io(dir, "qed", "a.qed", &["write -P 5 4M 1M"]);
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "b.raw", "8M"]),
        "create",
    );
    qemu_io(
        dir,
        "raw",
        "b.raw",
        &["write -P 0 0 3M", "write -P 5 4M 1M"],
    );
    assert_eq!(same_compare(dir, &["a.qed", "b.raw"]), 0);
    assert_eq!(same_compare(dir, &["b.raw", "a.qed"]), 0);
    qemu_io(dir, "raw", "b.raw", &["write -P 1 2M 512"]);
    assert_eq!(same_compare(dir, &["a.qed", "b.raw"]), 1);
}
