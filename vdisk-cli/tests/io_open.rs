//! `vdisk io`'s `open` and `close` against qemu-io: the same scripts print the same
//! lines (timing lines aside, `qemu-io:` read as `vdisk:`) and leave the same data.

mod cli_support;
use cli_support::*;
use std::path::Path;

/// Drops qemu-io's timing lines, which differ run to run.
fn no_timing(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Runs the same `vdisk io`/`qemu-io` arguments on copies of the images in two
/// directories; output must match. Returns vdisk's run.
fn same(vdir: &Path, qdir: &Path, args: &[&str]) -> Run {
    let q = qemu_io_run(qdir, args);
    let v = vdisk(vdir, &[&["io"], args].concat());
    assert_eq!(no_timing(&v.out), no_timing(&q.out), "stdout of {args:?}");
    assert_eq!(
        v.err,
        q.err.replace("qemu-io:", "vdisk:"),
        "stderr of {args:?}"
    );
    v
}

fn setup(dir: &Path) {
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]),
        "create",
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "b.qcow2", "2M"]),
        "create",
    );
    std::fs::write(dir.join("r.img"), vec![0u8; 1 << 20]).unwrap();
}

#[test]
fn open_close_match_qemu_io() {
    let vd = tmp();
    let qd = tmp();
    let (v, q) = (vd.path(), qd.path());
    setup(v);
    setup(q);

    // Commands after close need a file; open brings one back, read-only or not.
    let r = same(
        v,
        q,
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 5 0 64k",
            "-c",
            "close",
            "-c",
            "read 0 512",
            "-c",
            "length",
            "-c",
            "flush",
            "-c",
            "close",
            "-c",
            "sleep 1",
            "-c",
            "open -r -o driver=qcow2 b.qcow2",
            "-c",
            "length",
            "-c",
            "write 0 512",
            "-c",
            "c",
            "-c",
            "o -n b.qcow2",
            "-c",
            "write -P 7 64k 4k",
            "-c",
            "length",
            "-c",
            "close",
            "-c",
            "open -t writethrough -U -r b.qcow2",
            "-c",
            "read -P 7 64k 4k",
            "-c",
            "help close",
            "a.qcow2",
        ],
    );
    assert_eq!(r.code, 1, "failed commands make the run fail");
    assert!(r.err.contains("no file open, try 'help open'"), "{}", r.err);
    // The data written through each open reached the image.
    for (img, pat, off) in [("a.qcow2", "5", "0"), ("b.qcow2", "7", "64k")] {
        for dir in [v, q] {
            let cmd = format!("read -P {pat} {off} 4k");
            let r = qemu_io_run(dir, &["-f", "qcow2", "-c", &cmd, img]);
            assert!(r.err.is_empty() && r.code == 0, "{img}: {}{}", r.out, r.err);
            assert!(!r.out.contains("Pattern verification failed"), "{}", r.out);
        }
    }
    assert_eq!(
        ok(
            qemu_img(
                v,
                &["compare", "b.qcow2", &q.join("b.qcow2").to_string_lossy()]
            ),
            "compare"
        ),
        "Images are identical.\n"
    );

    // Failures: no file open, one already open, bad options and arguments.
    same(
        v,
        q,
        &[
            "-c",
            "open",
            "-c",
            "open -r",
            "-c",
            "open -o driver=qcow2",
            "-c",
            "close",
            "-c",
            "open nope.qcow2",
            "-c",
            "open -t bogus a.qcow2",
            "-c",
            "open -d bogus a.qcow2",
            "-c",
            "open -o driver=raw,foo=bar a.qcow2",
            "-c",
            "open -o driver=bogus a.qcow2",
            "-c",
            "open -U a.qcow2",
            "-c",
            "open -k a.qcow2",
            "-c",
            "open -x a.qcow2",
            "-c",
            "open -r a.qcow2",
            "-c",
            "open b.qcow2",
            "-c",
            "open",
            "-c",
            "info",
        ],
    );
    // A probed raw image opened read-write warns, read-only it does not.
    let r = same(
        v,
        q,
        &[
            "-c",
            "open r.img",
            "-c",
            "c",
            "-c",
            "o -r r.img",
            "-c",
            "read 0 1k",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.err.contains("probing guessed raw"), "{}", r.err);
}

#[test]
fn usage_is_qemu_ios() {
    let d = tmp();
    let r = vdisk(d.path(), &["io", "-c", "open a b"]);
    assert_eq!(
        r.out,
        "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path\n"
    );
    assert_eq!(r.code, 1);
}

/// `open -o detect-zeroes=…` (with `-d` deciding whether `unmap` may deallocate): the
/// same messages as qemu-io, and the same zero clusters afterwards, for data and
/// compressed writes of zeroes.
#[test]
fn open_detect_zeroes_matches_qemu_io() {
    let vd = tmp();
    let qd = tmp();
    let (v, q) = (vd.path(), qd.path());
    for dir in [v, q] {
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", "z.qcow2", "1M"]),
            "create",
        );
        ok(
            qemu_io_run(dir, &["-f", "qcow2", "-c", "write -P 1 0 256k", "z.qcow2"]),
            "fill",
        );
    }
    let r = same(
        v,
        q,
        &[
            "-c",
            "open -o detect-zeroes=on z.qcow2",
            "-c",
            "write -P 0 0 64k",
            "-c",
            "write -c -P 0 64k 64k",
            "-c",
            "close",
            "-c",
            "open -o detect-zeroes=unmap z.qcow2",
            "-c",
            "write -P 0 128k 64k",
            "-c",
            "close",
            "-c",
            "open -d ignore -o detect-zeroes=unmap z.qcow2",
            "-c",
            "open -o detect-zeroes=bogus z.qcow2",
            "-c",
            "open -o detect-zeroes=on,foo=1 z.qcow2",
            "-c",
            "open -o detect-zeroes=on,detect-zeroes=off z.qcow2",
            "-c",
            "write -P 0 192k 64k",
        ],
    );
    assert_eq!(r.code, 1, "the refused opens fail the run");
    let map = |dir: &Path| ok(qemu_img(dir, &["map", "--output=json", "z.qcow2"]), "map");
    let (vm, qm) = (map(v), map(q));
    assert_eq!(vm, qm);
    // Zero detection did act: the first three writes left zero clusters.
    assert!(
        vm.starts_with(
            r#"[{ "start": 0, "length": 131072, "depth": 0, "present": true, "zero": true"#
        ),
        "{vm}"
    );
}
