//! `vdisk measure` side by side with `qemu-img measure`: every qcow2 cluster size,
//! refcount width, extended L2, preallocation mode and compat level, raw and QED
//! targets, sizes and input images (qcow2 with data, zeroes, compressed clusters and
//! a backing file; raw; QED), human and JSON, refusals: same stdout, stderr and exit
//! code.

mod cli_support;
use cli_support::*;
use std::path::Path;

fn same(dir: &Path, args: &[&str]) {
    let mut a = vec!["measure"];
    a.extend_from_slice(args);
    let v = vdisk(dir, &a);
    let q = qemu_img(dir, &a);
    assert_eq!(v.code, q.code, "{args:?}: exit code; vdisk: {}", v.err);
    assert_eq!(v.out, q.out, "{args:?}: stdout");
    assert_eq!(
        v.err
            .replace("vdisk:", "qemu-img:")
            .replace("'vdisk measure", "'qemu-img measure"),
        q.err,
        "{args:?}: stderr"
    );
}

#[test]
fn sizes_for_every_qcow2_layout() {
    let d = tmp();
    let dir = d.path();
    for size in ["0", "1", "1000", "1048577", "1G", "64G"] {
        same(dir, &["--size", size]);
        same(dir, &["-O", "qcow2", "--size", size, "--output=json"]);
        for cs in ["512", "4k", "64k", "2M"] {
            for rb in ["1", "16", "64"] {
                let o = format!("cluster_size={cs},refcount_bits={rb}");
                same(dir, &["-O", "qcow2", "-o", &o, "--size", size]);
            }
        }
    }
    for cs in ["16k", "64k", "2M"] {
        let o = format!("cluster_size={cs},extended_l2=on");
        same(dir, &["-O", "qcow2", "-o", &o, "--size", "10G"]);
    }
    for p in ["off", "metadata", "falloc", "full"] {
        let o = format!("preallocation={p}");
        same(dir, &["-O", "qcow2", "-o", &o, "--size", "100M"]);
        same(dir, &["-O", "raw", "-o", &o, "--size", "100M"]);
    }
    same(dir, &["-O", "qcow2", "-o", "compat=0.10", "--size", "5G"]);
    same(
        dir,
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-o",
            "refcount_bits=8",
            "--size",
            "3G",
        ],
    );
    same(dir, &["-O", "qcow2", "-o", "size=5M", "--size", "1M"]);
}

#[test]
fn sizes_for_input_images() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "b.qcow2",
                "8M",
            ],
        ),
        "create",
    );
    qemu_io(dir, "qcow2", "b.qcow2", &["write -P 1 1M 1M"]);
    ok(
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2", "10M",
            ],
        ),
        "create",
    );
    qemu_io(
        dir,
        "qcow2",
        "t.qcow2",
        &[
            "write -P 2 100k 5000",
            "write -z 1M 512k",
            "write -c -P 3 4M 64k",
            "write -P 4 9M 1",
        ],
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "3M"]),
        "create",
    );
    qemu_io(dir, "raw", "r.raw", &["write -P 5 1M 70000"]);
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qed", "q.qed", "6M"]),
        "create",
    );
    qemu_io(dir, "qed", "q.qed", &["write -P 6 0 300k"]);
    for input in ["t.qcow2", "b.qcow2", "r.raw", "q.qed"] {
        same(dir, &[input]);
        same(dir, &["-O", "qcow2", input]);
        same(dir, &["-O", "qcow2", "--output=json", input]);
        same(dir, &["-O", "qcow2", "-o", "compat=0.10", input]);
        for cs in ["512", "64k", "1M"] {
            let o = format!("cluster_size={cs}");
            same(dir, &["-O", "qcow2", "-o", &o, input]);
        }
        same(dir, &["-O", "qcow2", "-o", "preallocation=full", input]);
        same(dir, &["-O", "raw", "--output=json", input]);
    }
    same(dir, &["-f", "raw", "-O", "qcow2", "r.raw"]);
    same(dir, &["-U", "-O", "qcow2", "t.qcow2"]);
    same(
        dir,
        &[
            "--image-opts",
            "-O",
            "qcow2",
            "driver=qcow2,file.filename=t.qcow2",
        ],
    );
}

#[test]
fn refusals_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]),
        "create",
    );
    let cases: [&[&str]; 14] = [
        &[],
        &["--size", "1M", "a.qcow2"],
        &["-O", "qed", "--size", "1G"],
        &["-O", "bogus", "--size", "1M"],
        &["--size", "1x"],
        &["--output=bad", "--size", "0"],
        &["-O", "qcow2", "-o", "nosuch=1", "--size", "1M"],
        &["-O", "raw", "-o", "cluster_size=4k", "--size", "1M"],
        &["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1M"],
        &["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1M"],
        &[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=1",
            "--size",
            "1M",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,extended_l2=on",
            "--size",
            "1M",
        ],
        &["-O", "qcow2", "-o", "preallocation=bogus", "--size", "1M"],
        &["-O", "qcow2", "-o", "compat=bad", "--size", "1M"],
    ];
    for args in cases {
        same(dir, args);
    }
    same(dir, &["nofile.qcow2"]);
}
