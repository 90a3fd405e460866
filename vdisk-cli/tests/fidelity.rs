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

/// QED header fields (little-endian).
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn put_le64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn qed_check_leaks_repairs_the_corruption_too() {
    let d = tmp();
    let dir = d.path();
    let make = |n: &str| {
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qed", n, "10M"]),
            "create",
        );
        qemu_io(dir, "qed", n, &["write -P 7 0 320k"]);
        // Four leaks (entries 1-4 dropped) and one corruption (entry 5 past the end).
        let p = dir.join(n);
        let mut b = std::fs::read(&p).unwrap();
        let l1 = le64(&b, 40) as usize;
        let l2 = le64(&b, l1) as usize;
        for i in 1..5 {
            put_le64(&mut b, l2 + 8 * i, 0);
        }
        put_le64(&mut b, l2 + 8 * 5, 1 << 40);
        std::fs::write(&p, b).unwrap();
    };
    make("q.qed");
    make("v.qed");
    // Both find the same problems.
    let qc = qemu_img(dir, &["check", "q.qed"]);
    let vc = vdisk(dir, &["check", "v.qed"]);
    assert_eq!(
        (vc.code, &vc.out),
        (qc.code, &qc.out.replace("q.qed", "v.qed"))
    );
    assert_eq!(vc.code, 2, "{}", vc.out);
    let q = qemu_img(dir, &["check", "-r", "leaks", "q.qed"]);
    let v = vdisk(dir, &["check", "-r", "leaks", "v.qed"]);
    // qemu repairs the table and keeps the leaks (exit 3); vdisk also frees them
    // (docs/differences.md): both repaired the corruption.
    assert_eq!(q.code, 3, "{}{}", q.out, q.err);
    assert_eq!(v.code, 0, "{}{}", v.out, v.err);
    assert!(q.out.contains("    1 corruptions\n"), "{}", q.out);
    assert!(v.out.contains("    1 corruptions\n"), "{}", v.out);
    assert!(v.out.contains("    4 leaked clusters\n"), "{}", v.out);
    let after = qemu_img(dir, &["check", "v.qed"]);
    assert_eq!(after.code, 0, "{}", after.out);
    ok(qemu_img(dir, &["compare", "q.qed", "v.qed"]), "compare");
}

#[test]
fn qed_info_shows_no_dirty_mark_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qed", "d.qed", "1M"]),
        "create",
    );
    let p = dir.join("d.qed");
    let mut b = std::fs::read(&p).unwrap();
    let f = le64(&b, 16) | 2; // QED_F_NEED_CHECK
    put_le64(&mut b, 16, f);
    std::fs::write(&p, b).unwrap();
    for out in ["--output=human", "--output=json"] {
        let q = ok(qemu_img(dir, &["info", out, "d.qed"]), "qemu-img info");
        let v = ok(vdisk(dir, &["info", out, "d.qed"]), "vdisk info");
        assert_eq!(v, q, "{out}");
    }
}

/// `vdisk io` and `qemu-io` on copies of one image: same exit code, same output
/// (qemu-io's timing lines aside), then the same contents.
fn io_both(dir: &Path, fmt: &str, make: impl Fn(&str), cmds: &[&str]) {
    let strip = |s: &str| -> String {
        s.lines()
            .filter(|l| !(l.contains(" ops; ") && l.ends_with("ops/sec)")))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    make("q.img");
    make("v.img");
    let mut qa = vec!["-f", fmt];
    let mut va = vec!["io", "-f", fmt];
    for c in cmds {
        qa.extend(["-c", c]);
        va.extend(["-c", c]);
    }
    qa.push("q.img");
    va.push("v.img");
    let q = qemu_io_run(dir, &qa);
    let v = vdisk(dir, &va);
    assert_eq!(
        v.code, q.code,
        "{cmds:?}: vdisk {}{} qemu {}{}",
        v.out, v.err, q.out, q.err
    );
    assert_eq!(strip(&v.out), strip(&q.out), "{cmds:?}");
    assert_eq!(v.err, as_vdisk(&q.err), "{cmds:?}");
    ok(
        qemu_img(dir, &["compare", "-f", fmt, "-F", fmt, "q.img", "v.img"]),
        "compare",
    );
}

#[test]
fn qemu_io_edge_commands_like_qemu_io() {
    let d = tmp();
    let dir = d.path();
    let qcow2 = |n: &str| {
        let _ = std::fs::remove_file(dir.join(n));
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", n, "4M"]),
            "create",
        );
    };
    // A compressed write never replaces an allocated cluster (EIO), but fills a free one.
    io_both(
        dir,
        "qcow2",
        qcow2,
        &[
            "write -P 1 0 64k",
            "write -c 0 64k",
            "write -c 64k 64k",
            "write -c 64k 64k",
        ],
    );
    // -i injects an invalid request: accounted, nothing done.
    io_both(
        dir,
        "qcow2",
        qcow2,
        &[
            "aio_write -i 0 4k",
            "aio_read -i 0 4k",
            "aio_flush",
            "read -P 0 0 4k",
        ],
    );
    // QEMU's QED driver cannot shrink.
    let qed = |n: &str| {
        let _ = std::fs::remove_file(dir.join(n));
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qed", n, "4M"]),
            "create",
        );
    };
    io_both(dir, "qed", qed, &["truncate 1M", "truncate 8M"]);
}

/// `struct fsxattr` flags and extent size of a file (FS_IOC_FSGETXATTR).
fn fsxattr(path: &Path) -> (u32, u32) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let mut a = [0u32; 7];
    // SAFETY: FS_IOC_FSGETXATTR writes a 28-byte struct fsxattr into `a`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x801c_581f, a.as_mut_ptr()) };
    if r < 0 {
        return (u32::MAX, u32::MAX); // not supported here: the same for both tools
    }
    (a[0], a[1])
}

#[test]
fn create_applies_the_file_hints_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    for opts in ["", "extent_size_hint=2M", "extent_size_hint=0", "nocow=on"] {
        for fmt in ["raw", "qcow2"] {
            let mut args = vec!["create", "-q", "-f", fmt];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            let (qa, va) = (
                [&args[..], &["q.img", "1M"]].concat(),
                [&args[..], &["v.img", "1M"]].concat(),
            );
            let _ = std::fs::remove_file(dir.join("q.img"));
            let _ = std::fs::remove_file(dir.join("v.img"));
            let q = qemu_img(dir, &qa);
            let v = vdisk(dir, &va);
            assert_eq!(
                (v.code, &v.err),
                (q.code, &as_vdisk(&q.err)),
                "{fmt} {opts}"
            );
            assert_eq!(
                fsxattr(&dir.join("v.img")),
                fsxattr(&dir.join("q.img")),
                "{fmt} {opts}: extent size hint"
            );
        }
    }
}

#[test]
fn convert_copy_offload_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    // Odd length: the sector-rounded tail past the file's end is not offloaded.
    std::fs::write(dir.join("src.raw"), pattern(3_000_001, 9)).unwrap();
    let q = qemu_img(
        dir,
        &["convert", "-C", "-c", "-O", "qcow2", "src.raw", "x.qcow2"],
    );
    let v = vdisk(
        dir,
        &["convert", "-C", "-c", "-O", "qcow2", "src.raw", "x.qcow2"],
    );
    assert_eq!((v.code, v.err), (q.code, as_vdisk(&q.err)));
    for (to, fmt) in [("q.raw", "raw"), ("q.qcow2", "qcow2")] {
        ok(
            qemu_img(
                dir,
                &["convert", "-C", "-f", "raw", "-O", fmt, "src.raw", to],
            ),
            "qemu-img convert -C",
        );
        let vto = to.replacen('q', "v", 1);
        ok(
            vdisk(
                dir,
                &["convert", "-C", "-f", "raw", "-O", fmt, "src.raw", &vto],
            ),
            "vdisk convert -C",
        );
        assert_eq!(
            footprint(&dir.join(&vto)).0,
            footprint(&dir.join(to)).0,
            "{fmt} length"
        );
        ok(
            qemu_img(dir, &["compare", "-f", fmt, "-F", fmt, to, &vto]),
            "compare",
        );
    }
    let src = std::fs::read(dir.join("src.raw")).unwrap();
    let out = std::fs::read(dir.join("v.raw")).unwrap();
    assert_eq!(&out[..src.len()], &src[..]);
    assert!(out[src.len()..].iter().all(|&b| b == 0));
}

/// `-p` prints qemu-img's `    (NN.NN/100%)\r` lines on stdout (not a terminal here),
/// byte for byte, for convert, rebase (safe and unsafe) and compare (equal and not).
#[test]
fn progress_lines_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "big.qcow2", "64M"]),
        "create",
    );
    qemu_io(dir, "qcow2", "big.qcow2", &["write -P 3 0 64M"]);
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "small.qcow2", "64M"]),
        "create",
    );
    let overlay = || {
        let _ = std::fs::remove_file(dir.join("o.qcow2"));
        qemu_overlay(dir, "qcow2", "big.qcow2", "qcow2", "o.qcow2");
    };
    let cases: &[&[&str]] = &[
        &["convert", "-p", "-O", "raw", "big.qcow2", "out.raw"],
        &["convert", "-p", "-O", "qcow2", "big.qcow2", "out.qcow2"],
        &["rebase", "-p", "-u", "-b", "", "o.qcow2"],
        &["rebase", "-p", "-b", "", "o.qcow2"],
        &["compare", "-p", "big.qcow2", "big.qcow2"],
        &["compare", "-p", "big.qcow2", "small.qcow2"],
    ];
    for args in cases {
        overlay();
        let v = vdisk(dir, args);
        overlay();
        let q = qemu_img(dir, args);
        assert_eq!(v.out, q.out, "stdout of {args:?}");
        assert_eq!(v.code, q.code, "status of {args:?}");
    }
}

/// `amend -p` prints qemu-img 10's steps byte for byte: a version change in two or
/// three steps, a downgrade one step per L1 entry (active and snapshots), a
/// refcount-width change three walks over the refcount table, their mix projected
/// as QEMU's driver projects it, and only the final newline when an option is
/// refused while parsing.
#[test]
fn amend_progress_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    let cases: &[(&str, &str, bool, &str)] = &[
        ("compat=1.1", "64M", false, "compat=0.10"),
        ("compat=0.10", "64M", false, "compat=1.1"),
        ("compat=1.1", "64M", false, "lazy_refcounts=on"),
        ("compat=1.1", "64M", false, "refcount_bits=64"),
        ("compat=1.1,cluster_size=4k", "1G", true, "compat=0.10"),
        ("compat=1.1,cluster_size=4k", "1G", true, "refcount_bits=2"),
        ("compat=1.1,cluster_size=4k", "1G", true, "refcount_bits=1"),
        ("compat=0.10", "1G", true, "compat=1.1,refcount_bits=2"),
        (
            "compat=1.1,refcount_bits=4",
            "1G",
            true,
            "refcount_bits=16,compat=0.10",
        ),
        (
            "compat=1.1,cluster_size=512",
            "1G",
            false,
            "refcount_bits=32",
        ),
        ("compat=1.1", "64M", false, "refcount_bits=3"),
        ("compat=1.1", "64M", false, "cluster_size=4k"),
        ("compat=1.1", "64M", false, "foo=1"),
    ];
    for (i, &(create, size, snaps, amend)) in cases.iter().enumerate() {
        let name = format!("a{i}.qcow2");
        let make = |n: &str| {
            ok(
                qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", create, n, size]),
                "create",
            );
            qemu_io(
                dir,
                "qcow2",
                n,
                &["write -P 1 0 1M", "write -z 2M 1M", "write -P 3 10M 5M"],
            );
            if snaps {
                for s in ["s1", "s2"] {
                    ok(qemu_img(dir, &["snapshot", "-c", s, n]), "snapshot");
                }
                qemu_io(dir, "qcow2", n, &["write -z 0 64k", "write -z 600M 64k"]);
            }
        };
        let (v, q) = run_both(dir, &name, make, |f| strs(&["amend", "-p", "-o", amend, f]));
        assert!(
            q.out.starts_with("    (0.00/100%)\r") || q.out == "\n",
            "{amend}: {:?}",
            q.out
        );
        if v.code == 0 {
            let (qf, vf) = (format!("q-{name}"), format!("v-{name}"));
            ok(qemu_img(dir, &["check", "-q", &vf]), "check");
            ok(qemu_img(dir, &["compare", "-q", &qf, &vf]), "compare");
        }
    }
}

/// `commit -p` goes through the shared progress printer: 0.00 first, one line per
/// further percent, 100.00 once the base is written, and the newline only after the
/// top is emptied, before "Image committed." — the frame qemu-img prints (its middle
/// lines depend on its job's timing, so only the frame is compared).
#[test]
fn commit_progress_frame_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    let mut outs = Vec::new();
    for (tool, p) in [("qemu", "q"), ("vdisk", "v")] {
        let (b, o) = (format!("{p}-b.qcow2"), format!("{p}-o.qcow2"));
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", &b, "64M"]),
            "create",
        );
        qemu_overlay(dir, "qcow2", &b, "qcow2", &o);
        qemu_io(dir, "qcow2", &o, &["write -P 3 0 1M", "write -P 4 20M 1M"]);
        let args = ["commit", "-p", &o];
        let r = if tool == "qemu" {
            qemu_img(dir, &args)
        } else {
            vdisk(dir, &args)
        };
        assert_eq!(r.code, 0, "{tool}: {}", r.err);
        outs.push(r.out);
    }
    let frame = |s: &str| {
        let body = s
            .strip_suffix("    (100.00/100%)\r\nImage committed.\n")
            .unwrap_or_else(|| panic!("ending of {s:?}"));
        assert!(body.starts_with("    (0.00/100%)\r"), "start of {s:?}");
        let pcts: Vec<f64> = body
            .split_terminator('\r')
            .map(|l| {
                l.trim()
                    .strip_prefix('(')
                    .and_then(|l| l.strip_suffix("/100%)"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("line {l:?} of {s:?}"))
            })
            .collect();
        assert!(pcts.windows(2).all(|w| w[0] <= w[1]), "{s:?}");
    };
    frame(&outs[0]);
    frame(&outs[1]);
}
