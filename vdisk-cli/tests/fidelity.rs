//! Drop-in fidelity: cases where a side-by-side audit found vdisk differing from
//! qemu-img/qemu-io 10, each compared with the QEMU tool on the same input — output,
//! exit code and the resulting file (`stat` length and allocation, `qemu-img map`,
//! `check`, `compare`). Deliberate differences are in `docs/differences.md`.

mod cli_support;
use cli_support::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// qemu's message with its program name replaced by ours.
fn as_vdisk(s: &str) -> String {
    s.replace("qemu-img:", "vdisk:")
        .replace("qemu-io:", "vdisk:")
}

/// A file's length and the bytes allocated to it.
fn footprint(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap();
    (m.len(), m.blocks() * 512)
}

fn map_json(dir: &Path, fmt: &str, name: &str) -> String {
    ok(
        qemu_img(dir, &["map", "-f", fmt, "--output=json", name]),
        "qemu-img map",
    )
}

/// Makes `q-NAME` and `v-NAME` with `make`, runs vdisk on `v-NAME` and qemu-img on
/// `q-NAME` with the arguments `args(file)` gives, and asserts the same exit code,
/// stdout and stderr (file names aside).
fn run_both(
    dir: &Path,
    name: &str,
    make: impl Fn(&str),
    args: impl Fn(&str) -> Vec<String>,
) -> (Run, Run) {
    let (q, v) = (format!("q-{name}"), format!("v-{name}"));
    make(&q);
    make(&v);
    let qa = args(&q);
    let va = args(&v);
    let qr = qemu_img(dir, &qa.iter().map(String::as_str).collect::<Vec<_>>());
    let vr = vdisk(dir, &va.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(vr.code, qr.code, "{va:?}: vdisk {} qemu {}", vr.err, qr.err);
    assert_eq!(vr.out, qr.out.replace(&q, &v), "{va:?}");
    assert_eq!(vr.err, as_vdisk(&qr.err).replace(&q, &v), "{va:?}");
    (vr, qr)
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn resize_preallocation_grows_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    for (fmt, modes) in [
        ("qcow2", &["off", "metadata", "falloc", "full"][..]),
        ("raw", &["off", "metadata", "falloc", "full"][..]),
        ("qed", &["metadata", "falloc", "full"][..]),
    ] {
        for mode in modes {
            let pre = format!("--preallocation={mode}");
            let name = format!("grow-{mode}.{fmt}");
            let make = |n: &str| {
                ok(
                    qemu_img(dir, &["create", "-q", "-f", fmt, n, "64M"]),
                    "create",
                );
            };
            let (v, _) = run_both(dir, &name, make, |f| {
                strs(&["resize", "-f", fmt, &pre, f, "128M"])
            });
            if v.code != 0 {
                continue; // refused the same way (QED; raw with metadata)
            }
            let (q, vn) = (dir.join(format!("q-{name}")), dir.join(format!("v-{name}")));
            let ((vl, va), (ql, qa)) = (footprint(&vn), footprint(&q));
            assert_eq!(vl, ql, "{fmt} {mode}: length");
            // The host file system may spend a block or two more on extent trees.
            assert!(
                va.abs_diff(qa) <= 256 << 10,
                "{fmt} {mode}: allocated {va} vs {qa}"
            );
            assert_eq!(
                map_json(dir, fmt, &format!("v-{name}")),
                map_json(dir, fmt, &format!("q-{name}")),
                "{fmt} {mode}"
            );
            if fmt == "qcow2" {
                ok(qemu_img(dir, &["check", &format!("v-{name}")]), "check");
            }
        }
    }
}

#[test]
fn resize_shrink_truncates_the_file_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    let make = |n: &str| {
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", n, "64M"]),
            "create",
        );
        qemu_io(dir, "qcow2", n, &["write -P 3 0 8M", "write -P 4 60M 4M"]);
    };
    run_both(dir, "shrink.qcow2", make, |f| {
        strs(&["resize", "-q", "--shrink", "-f", "qcow2", f, "1M"])
    });
    let (q, v) = (dir.join("q-shrink.qcow2"), dir.join("v-shrink.qcow2"));
    assert_eq!(footprint(&v).0, footprint(&q).0, "file length");
    ok(qemu_img(dir, &["check", "v-shrink.qcow2"]), "check");
    ok(
        qemu_img(dir, &["compare", "q-shrink.qcow2", "v-shrink.qcow2"]),
        "compare",
    );
}
