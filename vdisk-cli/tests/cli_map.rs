//! `vdisk map` against `qemu-img map`: identical output, JSON and human, through chains.

mod cli_support;
use cli_support::*;
use std::path::Path;

fn same_map(dir: &Path, args: &[&str]) {
    for out in ["json", "human"] {
        let o = format!("--output={out}");
        let mut a = vec!["map", o.as_str()];
        a.extend_from_slice(args);
        let q = qemu_img(dir, &a);
        let v = vdisk(dir, &a);
        assert_eq!(v.code, q.code, "map {a:?}: {} vs {}", v.err, q.err);
        assert_eq!(v.out, q.out, "map {a:?}");
        assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "map {a:?}");
    }
}

#[test]
fn raw_map_matches_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "a.raw", "16M"]),
        "create",
    );
    qemu_io(
        dir,
        "raw",
        "a.raw",
        &[
            "write -P 1 0 64k",
            "write -P 2 1M 4k",
            "write -P 3 3M 1M",
            "write -z 3M 64k",
        ],
    );
    same_map(dir, &["-f", "raw", "a.raw"]);
    same_map(
        dir,
        &[
            "-f",
            "raw",
            "--start-offset",
            "1000",
            "--max-length",
            "2M",
            "a.raw",
        ],
    );
    same_map(dir, &["-f", "raw", "--start-offset=3M", "a.raw"]);
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "e.raw", "0"]),
        "create",
    );
    same_map(dir, &["-f", "raw", "e.raw"]);
    let j = json(&ok(
        vdisk(dir, &["map", "--output=json", "-f", "raw", "a.raw"]),
        "map",
    ));
    assert!(j.as_array().unwrap().len() >= 4);
}

#[test]
fn qcow2_chain_map_matches_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]),
        "create",
    );
    qemu_io(
        dir,
        "qcow2",
        "base.qcow2",
        &[
            "write -P 1 0 64k",
            "write -z 1M 128k",
            "write -P 2 2M 192k",
            "write -c -P 3 4M 64k",
        ],
    );
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                "12M",
            ],
        ),
        "create top",
    );
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 5 32k 64k",
            "write -z 2M 64k",
            "write -P 6 10M 64k",
        ],
    );
    same_map(dir, &["base.qcow2"]);
    same_map(dir, &["top.qcow2"]);
    same_map(
        dir,
        &["--start-offset", "2M", "--max-length", "1M", "top.qcow2"],
    );
}

#[test]
fn qed_over_raw_map_matches_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "base.raw", "4M"]),
        "create",
    );
    qemu_io(
        dir,
        "raw",
        "base.raw",
        &["write -P 1 0 64k", "write -P 2 2M 4k"],
    );
    ok(
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "t.qed", "6M",
            ],
        ),
        "create",
    );
    qemu_io(
        dir,
        "qed",
        "t.qed",
        &["write -P 3 1M 64k", "write -P 4 5M 4k"],
    );
    same_map(dir, &["t.qed"]);
    same_map(dir, &["base.raw"]);
}

#[test]
fn qcow2_preallocated_metadata_map_matches_qemu() {
    let d = tmp();
    let dir = d.path();
    // qemu asks the host file about clusters of such images: holes read as zeroes.
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "p.qcow2",
                "4M",
            ],
        ),
        "create",
    );
    // Whole clusters only: how a file system reports the unwritten tail of a partly
    // written cluster depends on writeback timing, for qemu as for us.
    qemu_io(
        dir,
        "qcow2",
        "p.qcow2",
        &["write -P 1 0 64k", "write -P 2 1M 128k"],
    );
    same_map(dir, &["p.qcow2"]);
    let m = ok(vdisk(dir, &["map", "--output=json", "p.qcow2"]), "map");
    assert!(m.contains("\"zero\": true, \"data\": true"), "{m}");
}
