//! `vdisk rebase`: safe rebases keep the guest contents (checked with qemu-img), `-u`
//! rewrites only the header; messages like qemu-img's.

mod cli_support;
use cli_support::*;
use std::path::Path;

fn chain(dir: &Path, fmt: &str) {
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "b0.qcow2", "8M"]),
        "b0",
    );
    qemu_io(
        dir,
        "qcow2",
        "b0.qcow2",
        &["write -P 1 0 2M", "write -P 2 4M 1M"],
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "b1.qcow2", "6M"]),
        "b1",
    );
    qemu_io(
        dir,
        "qcow2",
        "b1.qcow2",
        &["write -P 1 0 1M", "write -P 3 1M 100k", "write -P 2 4M 1M"],
    );
    ok(
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", fmt, "-b", "b0.qcow2", "-F", "qcow2", "top", "8M",
            ],
        ),
        "top",
    );
    qemu_io(
        dir,
        fmt,
        "top",
        &["write -P 9 512k 64k", "write -P 8 7M 4k"],
    );
    ok(
        qemu_img(dir, &["convert", "-O", "raw", "top", "before.raw"]),
        "flatten",
    );
}

fn same_guest(dir: &Path) {
    let r = qemu_img(dir, &["compare", "before.raw", "top"]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    let r = qemu_img(dir, &["check", "top"]);
    assert!(r.code == 0, "{}{}", r.out, r.err);
}

#[test]
fn safe_rebase_keeps_contents() {
    for fmt in ["qcow2", "qed"] {
        let d = tmp();
        let dir = d.path();
        chain(dir, fmt);
        let v = vdisk(dir, &["rebase", "-b", "b1.qcow2", "-F", "qcow2", "top"]);
        assert_eq!(
            (v.code, v.out.as_str(), v.err.as_str()),
            (0, "", ""),
            "{fmt}"
        );
        same_guest(dir);
        let info = json(&ok(
            qemu_img(dir, &["info", "--output=json", "top"]),
            "info",
        ));
        assert_eq!(info["backing-filename"], "b1.qcow2");
        if fmt == "qcow2" {
            // QED records a backing format only for raw backing files.
            assert_eq!(info["backing-filename-format"], "qcow2");
        }
        // Removing the backing file copies everything still needed.
        ok(vdisk(dir, &["rebase", "-b", "", "top"]), "rebase to none");
        same_guest(dir);
        let info = json(&ok(
            qemu_img(dir, &["info", "--output=json", "top"]),
            "info",
        ));
        assert!(info.get("backing-filename").is_none(), "{info}");
    }
}

#[test]
fn unsafe_rebase_only_renames() {
    let d = tmp();
    let dir = d.path();
    chain(dir, "qcow2");
    std::fs::rename(dir.join("b0.qcow2"), dir.join("moved.qcow2")).unwrap();
    ok(
        vdisk(
            dir,
            &["rebase", "-u", "-b", "moved.qcow2", "-F", "qcow2", "top"],
        ),
        "rebase -u",
    );
    same_guest(dir);
}

#[test]
fn rebase_errors_like_qemu() {
    let d = tmp();
    let dir = d.path();
    chain(dir, "qcow2");
    for c in [
        &["rebase", "-b", "b1.qcow2", "top"][..],
        &["rebase", "-u", "-b", "b1.qcow2", "top"][..],
        &["rebase", "-b", "b1.qcow2", "-F", "qcow2", "missing.qcow2"][..],
    ] {
        let q = qemu_img(dir, c);
        let v = vdisk(dir, c);
        assert_eq!(v.code, q.code, "{c:?}: {} vs {}", v.err, q.err);
        assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "{c:?}");
    }
}
