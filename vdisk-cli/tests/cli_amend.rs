//! `vdisk amend` side by side with `qemu-img amend`: compat up and down (zero
//! clusters with and without a backing file, snapshots), refcount_bits to every
//! width, lazy_refcounts, size; the same messages and exit codes for refusals; every
//! image vdisk changed passes `qemu-img check` and `qemu-img compare` against qemu's
//! result of the same amend, and `info` reports the same options.

mod cli_support;
use cli_support::*;
use std::path::Path;

/// The options `info` reports (compat, refcount bits, lazy refcounts, size).
fn summary(dir: &Path, f: &str) -> (String, u64, bool, u64) {
    let j = json(&ok(
        qemu_img(dir, &["info", "-U", "--output=json", f]),
        "info",
    ));
    let d = &j["format-specific"]["data"];
    (
        d["compat"].as_str().unwrap().to_string(),
        d["refcount-bits"].as_u64().unwrap_or(16),
        d["lazy-refcounts"].as_bool().unwrap_or(false),
        j["virtual-size"].as_u64().unwrap(),
    )
}

/// Runs `amend args` with both tools on copies of `file`; same code/stdout/stderr;
/// on success both results checked and compared. Returns the copies.
fn both(dir: &Path, file: &str, args: &[&str], what: &str) -> (String, String) {
    let (v, q) = (format!("v{what}-{file}"), format!("q{what}-{file}"));
    std::fs::copy(dir.join(file), dir.join(&v)).unwrap();
    std::fs::copy(dir.join(file), dir.join(&q)).unwrap();
    let mut va = vec!["amend"];
    va.extend_from_slice(args);
    let mut qa = va.clone();
    va.push(&v);
    qa.push(&q);
    let rv = vdisk(dir, &va);
    let rq = qemu_img(dir, &qa);
    assert_eq!(rv.code, rq.code, "{what} {args:?}: vdisk said {}", rv.err);
    if args.contains(&"-p") {
        // qemu's progress steps depend on its internal phases: only the frame.
        assert!(
            rv.out.starts_with("    (0.00/100%)\r"),
            "{what}: {:?}",
            rv.out
        );
        assert!(
            rv.out.ends_with("    (100.00/100%)\r\n"),
            "{what}: {:?}",
            rv.out
        );
        assert!(
            rq.out.ends_with("    (100.00/100%)\r\n"),
            "{what}: {:?}",
            rq.out
        );
    } else {
        assert_eq!(rv.out, rq.out, "{what} {args:?}: stdout");
    }
    assert_eq!(
        rv.err
            .replace("vdisk:", "qemu-img:")
            .replace("'vdisk ", "'qemu-img ")
            .replace(&v, &q),
        rq.err,
        "{what} {args:?}: stderr"
    );
    if rv.code == 0 {
        ok(qemu_img(dir, &["check", &v]), &format!("{what}: check"));
        ok(
            qemu_img(dir, &["compare", &v, &q]),
            &format!("{what}: compare"),
        );
        assert_eq!(summary(dir, &v), summary(dir, &q), "{what}: options");
    }
    (v, q)
}

fn image(dir: &Path, name: &str, opts: &str, backing: Option<&str>) {
    let mut a = vec!["create", "-q", "-f", "qcow2", "-o", opts];
    if let Some(b) = backing {
        a.extend_from_slice(&["-b", b, "-F", "qcow2"]);
    }
    a.push(name);
    a.push("2M");
    ok(qemu_img(dir, &a), "create");
    qemu_io(
        dir,
        "qcow2",
        name,
        &[
            "write -P 1 0 300k",
            "write -z 400k 200k",
            "write -c -P 2 1M 64k",
            "write -P 3 1536k 4k",
            "write -z 1536k 4k",
        ],
    );
}

#[test]
fn compat_up_and_down_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "2M"]),
        "create",
    );
    qemu_io(dir, "qcow2", "base.qcow2", &["write -P 9 0 2M"]);
    for cs in ["512", "64k"] {
        image(
            dir,
            &format!("a{cs}.qcow2"),
            &format!("cluster_size={cs}"),
            None,
        );
        image(
            dir,
            &format!("b{cs}.qcow2"),
            &format!("cluster_size={cs}"),
            Some("base.qcow2"),
        );
        for f in [format!("a{cs}.qcow2"), format!("b{cs}.qcow2")] {
            let (v, _) = both(dir, &f, &["-o", "compat=0.10"], "down");
            assert_eq!(summary(dir, &v).0, "0.10");
            // And back up.
            both(dir, &v, &["-o", "compat=1.1"], "up");
            both(dir, &f, &["-o", "compat=v2", "-p"], "downp");
        }
    }
    // Zero clusters inside snapshots (shared tables, preallocated zeroes kept after
    // the snapshot) are expanded too, and the snapshot keeps its contents. (qemu-img
    // 10 zeroes a preallocated zero cluster in place even when the snapshot still
    // maps it as data, so its snapshot reads zeroes there: compared with the image
    // before the amend instead.)
    for b in [None, Some("base.qcow2")] {
        let f = format!("s{}.qcow2", b.is_some());
        image(dir, &f, "cluster_size=4k", b);
        ok(qemu_img(dir, &["snapshot", "-c", "s", &f]), "snap");
        qemu_io(dir, "qcow2", &f, &["write -z 0 8k", "write -P 7 500k 4k"]);
        let (v, _) = both(dir, &f, &["-o", "compat=0.10"], "downsnap");
        for (x, o) in [(&v, "v.raw"), (&f, "orig.raw")] {
            ok(
                qemu_img(
                    dir,
                    &["convert", "-l", "snapshot.name=s", "-O", "raw", x, o],
                ),
                "convert",
            );
        }
        ok(
            qemu_img(
                dir,
                &["compare", "-f", "raw", "-F", "raw", "v.raw", "orig.raw"],
            ),
            "snapshot after downgrade",
        );
    }
    // A v2 image created by qemu, with a snapshot, upgraded.
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2.qcow2",
                "1M",
            ],
        ),
        "create",
    );
    qemu_io(dir, "qcow2", "v2.qcow2", &["write -P 4 0 64k"]);
    ok(qemu_img(dir, &["snapshot", "-c", "s", "v2.qcow2"]), "snap");
    both(dir, "v2.qcow2", &["-o", "compat=1.1"], "upsnap");
    both(
        dir,
        "v2.qcow2",
        &["-o", "compat=1.1,lazy_refcounts=on"],
        "uplazy",
    );
}

#[test]
fn refcount_widths_like_qemu() {
    let d = tmp();
    let dir = d.path();
    image(dir, "r.qcow2", "cluster_size=4k", None);
    for bits in ["1", "2", "4", "8", "32", "64", "16"] {
        both(
            dir,
            "r.qcow2",
            &["-o", &format!("refcount_bits={bits}")],
            bits,
        );
    }
    // Shared clusters (a snapshot) cannot go below their refcount.
    ok(qemu_img(dir, &["snapshot", "-c", "s", "r.qcow2"]), "snap");
    ok(qemu_img(dir, &["snapshot", "-c", "t", "r.qcow2"]), "snap");
    both(dir, "r.qcow2", &["-o", "refcount_bits=1"], "narrow");
    both(dir, "r.qcow2", &["-o", "refcount_bits=2"], "narrow2");
    both(dir, "r.qcow2", &["-o", "refcount_bits=8"], "wide");
}

#[test]
fn lazy_refcounts_and_size_like_qemu() {
    let d = tmp();
    let dir = d.path();
    image(dir, "l.qcow2", "cluster_size=64k", None);
    let (v, _) = both(dir, "l.qcow2", &["-o", "lazy_refcounts=on"], "on");
    both(dir, &v, &["-o", "lazy_refcounts=off"], "off");
    both(dir, "l.qcow2", &["-o", "size=5M"], "grow");
    both(dir, "l.qcow2", &["-o", "size=1M"], "shrink");
    both(
        dir,
        "l.qcow2",
        &["-q", "-o", "size=3M", "-o", "lazy_refcounts=on"],
        "both",
    );
}

#[test]
fn refusals_like_qemu() {
    let d = tmp();
    let dir = d.path();
    image(dir, "e.qcow2", "cluster_size=64k", None);
    image(dir, "z.qcow2", "compression_type=zstd", None);
    image(dir, "w.qcow2", "refcount_bits=8", None);
    let cases: [(&str, &[&str]); 11] = [
        ("e.qcow2", &["-o", "cluster_size=4k"]),
        ("e.qcow2", &["-o", "nosuch=1"]),
        ("e.qcow2", &["-o", "backing_file=base.qcow2"]),
        ("e.qcow2", &["-o", "compat=0.10,lazy_refcounts=on"]),
        ("e.qcow2", &["-o", "compat=0.10,refcount_bits=8"]),
        ("e.qcow2", &["-o", "refcount_bits=3"]),
        ("e.qcow2", &["-o", "compat=bad"]),
        ("z.qcow2", &["-o", "compat=0.10"]),
        ("w.qcow2", &["-o", "compat=0.10"]),
        ("e.qcow2", &[]),
        ("e.qcow2", &["-f", "qcow2", "-o", "size=1M", "-o", "help"]),
    ];
    for (i, (file, args)) in cases.iter().enumerate() {
        both(dir, file, args, &format!("r{i}"));
    }
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "x.raw", "1M"]),
        "create",
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qed", "x.qed", "1M"]),
        "create",
    );
    both(dir, "x.raw", &["-f", "raw", "-o", "size=2M"], "raw");
    both(dir, "x.qed", &["-o", "size=2M"], "qed");
    let v = vdisk(dir, &["amend", "-f", "qcow2", "-o", "help"]);
    let q = qemu_img(dir, &["amend", "-f", "qcow2", "-o", "help"]);
    assert_eq!((v.code, v.out), (q.code, q.out));
}
