//! `vdisk snapshot -l|-c|-a|-d` side by side with `qemu-img snapshot`: the same
//! listing byte for byte, the same messages and exit codes, images qemu-img reads
//! (and checks clean) after vdisk changed them, and the other way round.

mod cli_support;
use cli_support::*;
use std::path::Path;

/// qemu-img's stderr wording with vdisk's program name.
fn as_qemu(s: &str) -> String {
    s.replace("vdisk:", "qemu-img:")
        .replace("'vdisk snapshot --help'", "'qemu-img snapshot --help'")
}

/// Runs the same snapshot command with both tools on copies of `file`; asserts the
/// same exit code, stdout and stderr; returns the two copies.
fn both(dir: &Path, file: &str, args: &[&str], what: &str) -> (String, String) {
    let (v, q) = (format!("v-{file}"), format!("q-{file}"));
    std::fs::copy(dir.join(file), dir.join(&v)).unwrap();
    std::fs::copy(dir.join(file), dir.join(&q)).unwrap();
    let mut va: Vec<&str> = vec!["snapshot"];
    va.extend_from_slice(args);
    let mut qa = va.clone();
    va.push(&v);
    qa.push(&q);
    let rv = vdisk(dir, &va);
    let rq = qemu_img(dir, &qa);
    assert_eq!(rv.code, rq.code, "{what}: exit code; vdisk: {}", rv.err);
    assert_eq!(rv.out, rq.out.replace(&q, &v), "{what}: stdout");
    assert_eq!(as_qemu(&rv.err), rq.err.replace(&q, &v), "{what}: stderr");
    (v, q)
}

fn list(dir: &Path, tool: &str, file: &str) -> String {
    let r = if tool == "vdisk" {
        vdisk(dir, &["snapshot", "-l", file])
    } else {
        qemu_img(dir, &["snapshot", "-l", file])
    };
    assert_eq!(r.code, 0, "{tool} -l: {}", r.err);
    r.out
}

fn clean(dir: &Path, file: &str) {
    ok(qemu_img(dir, &["check", file]), &format!("check {file}"));
}

fn image(dir: &Path) {
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
                "a.qcow2",
                "4M",
            ],
        ),
        "create",
    );
    qemu_io(
        dir,
        "qcow2",
        "a.qcow2",
        &["write -P 1 0 1M", "write -c -P 2 2M 64k"],
    );
    ok(
        qemu_img(dir, &["snapshot", "-c", "first", "a.qcow2"]),
        "snap",
    );
    qemu_io(dir, "qcow2", "a.qcow2", &["write -P 3 512k 1M"]);
    ok(
        qemu_img(dir, &["snapshot", "-c", "second", "a.qcow2"]),
        "snap",
    );
    ok(
        qemu_img(dir, &["snapshot", "-c", "first", "a.qcow2"]),
        "snap",
    );
}

#[test]
fn listing_is_qemus_byte_for_byte() {
    let d = tmp();
    let dir = d.path();
    image(dir);
    for args in [
        &["-l"][..],
        &[][..],
        &["-l", "-q"][..],
        &["-U", "-l"][..],
        &["-f", "qcow2", "-l"][..],
        &["-f", "raw", "-l"][..],
        &["-l", "--object", "secret,id=s0,data=x"][..],
    ] {
        both(dir, "a.qcow2", args, &format!("{args:?}"));
    }
    let r = vdisk(
        dir,
        &[
            "snapshot",
            "-l",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
        ],
    );
    assert_eq!(r.out, list(dir, "qemu-img", "a.qcow2"));
    // No snapshots, and formats without them: nothing at all.
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "e.qcow2", "1M"]),
        "create",
    );
    both(dir, "e.qcow2", &["-l"], "empty");
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]),
        "create",
    );
    both(dir, "r.raw", &["-l", "-f", "raw"], "raw");
}

#[test]
fn refusals_and_messages_like_qemu() {
    let d = tmp();
    let dir = d.path();
    image(dir);
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]),
        "create",
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qed", "q.qed", "1M"]),
        "create",
    );
    let cases: [(&str, &[&str]); 11] = [
        ("a.qcow2", &["-a", "nosuch"]),
        ("a.qcow2", &["-d", "nosuch"]),
        ("a.qcow2", &["-c", "x", "-d", "y"]),
        ("a.qcow2", &["-l", "-l"]),
        ("a.qcow2", &["-c", "a", "-c", "b"]),
        ("a.qcow2", &["-U", "-c", "x"]),
        ("r.raw", &["-f", "raw", "-c", "x"]),
        ("r.raw", &["-f", "raw", "-a", "x"]),
        ("r.raw", &["-f", "raw", "-d", "x"]),
        ("q.qed", &["-c", "x"]),
        ("q.qed", &["-a", "x"]),
    ];
    for (file, args) in cases {
        both(dir, file, args, &format!("{file} {args:?}"));
    }
    let v = vdisk(dir, &["snapshot", "-l"]);
    let q = qemu_img(dir, &["snapshot", "-l"]);
    assert_eq!((v.code, as_qemu(&v.err)), (q.code, q.err));
    let v = vdisk(dir, &["snapshot", "-l", "a.qcow2", "b"]);
    let q = qemu_img(dir, &["snapshot", "-l", "a.qcow2", "b"]);
    assert_eq!((v.code, as_qemu(&v.err)), (q.code, q.err));
    let v = vdisk(dir, &["snapshot", "-l", "nofile.qcow2"]);
    let q = qemu_img(dir, &["snapshot", "-l", "nofile.qcow2"]);
    assert_eq!((v.code, as_qemu(&v.err)), (q.code, q.err));
}

#[test]
fn create_apply_delete_match_qemu_results() {
    let d = tmp();
    let dir = d.path();
    image(dir);
    // Create: both list the same IDs and names; qemu reads vdisk's snapshot.
    let (v, q) = both(dir, "a.qcow2", &["-c", "third"], "create");
    clean(dir, &v);
    let strip = |s: String| -> Vec<String> {
        s.lines()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(
        strip(list(dir, "vdisk", &v)),
        strip(list(dir, "qemu-img", &q))
    );
    assert_eq!(list(dir, "vdisk", &v), list(dir, "qemu-img", &v));
    ok(qemu_img(dir, &["compare", &v, &q]), "compare after create");
    // Apply by ID and by name (the ID wins; a name is looked up when no ID matches).
    for which in ["1", "second", "first", "3"] {
        let (v, q) = both(dir, "a.qcow2", &["-a", which], &format!("apply {which}"));
        clean(dir, &v);
        ok(
            qemu_img(dir, &["compare", &v, &q]),
            &format!("compare after apply {which}"),
        );
        assert_eq!(list(dir, "vdisk", &v), list(dir, "qemu-img", &q));
    }
    // Delete by name (the first of two with the same name); an ID is no name.
    for which in ["first", "2", "second"] {
        let (v, q) = both(dir, "a.qcow2", &["-d", which], &format!("delete {which}"));
        clean(dir, &v);
        ok(
            qemu_img(dir, &["compare", &v, &q]),
            &format!("compare after delete {which}"),
        );
        assert_eq!(list(dir, "vdisk", &v), list(dir, "qemu-img", &q));
        // Every remaining snapshot reads the same in both.
        let out = list(dir, "qemu-img", &q);
        for id in out
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().next())
        {
            let opt = format!("snapshot.id={id}");
            let a = format!("{v}.{id}.raw");
            let b = format!("{q}.{id}.raw");
            ok(
                qemu_img(dir, &["convert", "-l", &opt, "-O", "raw", &v, &a]),
                "convert v",
            );
            ok(
                qemu_img(dir, &["convert", "-l", &opt, "-O", "raw", &q, &b]),
                "convert q",
            );
            ok(
                qemu_img(dir, &["compare", "-f", "raw", "-F", "raw", &a, &b]),
                &format!("snapshot {id} after delete {which}"),
            );
        }
    }
    // vdisk reads back what it wrote; -q silences nothing qemu-img prints.
    let r = vdisk(dir, &["snapshot", "-q", "-c", "quiet", "a.qcow2"]);
    assert_eq!((r.code, r.out.as_str(), r.err.as_str()), (0, "", ""));
    clean(dir, "a.qcow2");
    assert!(list(dir, "qemu-img", "a.qcow2").contains(" quiet "));
}

#[test]
fn snapshots_read_by_convert_measure_and_serve() {
    let d = tmp();
    let dir = d.path();
    image(dir);
    // qemu-img's reference contents of snapshot 2 ("second").
    ok(
        qemu_img(
            dir,
            &[
                "convert",
                "-l",
                "snapshot.id=2",
                "-O",
                "raw",
                "a.qcow2",
                "ref.raw",
            ],
        ),
        "convert",
    );
    for (i, l) in [
        "snapshot.id=2",
        "snapshot.name=second",
        "snapshot.id=2,snapshot.name=second",
        "second",
        "2",
    ]
    .iter()
    .enumerate()
    {
        let out = format!("v{i}.raw");
        ok(
            vdisk(dir, &["convert", "-l", l, "-O", "raw", "a.qcow2", &out]),
            l,
        );
        ok(
            qemu_img(dir, &["compare", "-f", "raw", "-F", "raw", &out, "ref.raw"]),
            l,
        );
    }
    // Refusals.
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]),
        "create",
    );
    for (file, l) in [
        ("a.qcow2", "nosuch"),
        ("a.qcow2", "snapshot.id=9"),
        ("a.qcow2", "snapshot.id=1,snapshot.name=second"),
        ("a.qcow2", "snapshot.bogus=1"),
        ("r.raw", "x"),
    ] {
        let args = ["convert", "-l", l, "-O", "raw", file, "x.raw"];
        let v = vdisk(dir, &args);
        let q = qemu_img(dir, &args);
        assert_eq!((v.code, as_qemu(&v.err)), (q.code, q.err), "{l}");
    }
    // measure -l.
    for l in ["first", "snapshot.name=second"] {
        let args = ["measure", "-l", l, "-O", "qcow2", "a.qcow2"];
        let v = vdisk(dir, &args);
        let q = qemu_img(dir, &args);
        assert_eq!((v.code, v.out), (q.code, q.out), "measure -l {l}");
    }
    // serve -l: a read-only export of the snapshot.
    let sock = dir.join("s.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["serve", "-l", "second", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg("a.qcow2")
        .current_dir(dir)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let got = qemu_img(
        dir,
        &["convert", "-f", "raw", "-O", "raw", &uri, "served.raw"],
    );
    let w = qemu_io_run(dir, &["-f", "raw", "-c", "write 0 512", &uri]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got.code, 0, "{}", got.err);
    ok(
        qemu_img(
            dir,
            &["compare", "-f", "raw", "-F", "raw", "served.raw", "ref.raw"],
        ),
        "served snapshot",
    );
    assert!(
        w.out.contains("failed") || w.err.contains("failed") || w.code != 0,
        "the export is read-only: {} {}",
        w.out,
        w.err
    );
}
