//! `vdisk create`: the same `Formatting ...` line as qemu-img, and images qemu accepts.

mod cli_support;
use cli_support::*;
use std::path::Path;

/// Creates `name` with vdisk and `q_name` with qemu-img using the same arguments;
/// the printed lines must match (modulo the file name) and qemu must accept ours.
fn same_create(dir: &Path, args: &[&str], name: &str, size: Option<&str>) {
    let q_name = format!("q-{name}");
    let mut va = vec!["create"];
    va.extend_from_slice(args);
    va.push(name);
    let mut qa = vec!["create"];
    qa.extend_from_slice(args);
    qa.push(&q_name);
    if let Some(s) = size {
        va.push(s);
        qa.push(s);
    }
    let q = ok(qemu_img(dir, &qa), "qemu-img create");
    let v = ok(vdisk(dir, &va), "vdisk create");
    assert_eq!(
        v.replace(name, "X"),
        q.replace(&q_name, "X"),
        "create {args:?}"
    );
    // qemu-img sees the same image.
    let qi = ok(qemu_img(dir, &["info", "--output=json", name]), "info ours");
    let qq = ok(
        qemu_img(dir, &["info", "--output=json", &q_name]),
        "info theirs",
    );
    let mut a = json(&qi);
    let mut b = json(&qq);
    // The host file's layout (its length) is the driver's business.
    strip_keys(&mut a, &["actual-size", "filename", "children"]);
    strip_keys(&mut b, &["actual-size", "filename", "children"]);
    assert_eq!(a, b, "qemu-img info of {name} vs {q_name}");
    let fmt = a["format"].as_str().unwrap().to_string();
    if fmt != "raw" {
        let c = qemu_img(dir, &["check", name]);
        assert_eq!(c.code, 0, "qemu-img check {name}: {}{}", c.out, c.err);
    }
}

#[test]
fn raw_create_like_qemu() {
    let d = tmp();
    let dir = d.path();
    same_create(dir, &["-f", "raw"], "a.raw", Some("1G"));
    same_create(dir, &[], "b.raw", Some("1536k"));
    same_create(
        dir,
        &["-f", "raw", "-o", "preallocation=falloc"],
        "c.raw",
        Some("1M"),
    );
    same_create(
        dir,
        &["-f", "raw", "-o", "preallocation=full"],
        "d.raw",
        Some("64k"),
    );
    same_create(dir, &["-f", "raw", "-o", "size=2M"], "e.raw", None);
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir.join("d.raw")).unwrap();
    assert_eq!(m.len(), 65536);
    assert!(m.blocks() * 512 >= 65536, "preallocation=full allocates");
}

#[test]
fn qcow2_create_like_qemu() {
    let d = tmp();
    let dir = d.path();
    same_create(dir, &["-f", "qcow2"], "a.qcow2", Some("1G"));
    same_create(
        dir,
        &["-f", "qcow2", "-o", "compat=0.10,cluster_size=4096"],
        "b.qcow2",
        Some("10M"),
    );
    same_create(
        dir,
        &[
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,refcount_bits=8",
            "-o",
            "cluster_size=2M",
        ],
        "c.qcow2",
        Some("3G"),
    );
    same_create(
        dir,
        &["-f", "qcow2", "-o", "compression_type=zstd"],
        "d.qcow2",
        Some("100M"),
    );
    same_create(
        dir,
        &["-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2"],
        "e.qcow2",
        None,
    );
    same_create(
        dir,
        &["-f", "qcow2", "-o", "preallocation=metadata"],
        "f.qcow2",
        Some("4M"),
    );
}

#[test]
fn qed_create_like_qemu() {
    let d = tmp();
    let dir = d.path();
    same_create(dir, &["-f", "qed"], "a.qed", Some("1G"));
    same_create(
        dir,
        &["-f", "qed", "-o", "cluster_size=16k,table_size=8"],
        "b.qed",
        Some("10M"),
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "base.raw", "7M"]),
        "base",
    );
    same_create(
        dir,
        &["-f", "qed", "-b", "base.raw", "-F", "raw"],
        "c.qed",
        None,
    );
}

#[test]
fn create_errors_like_qemu() {
    let d = tmp();
    let dir = d.path();
    let cases: &[&[&str]] = &[
        &["create", "-f", "raw", "x.raw"],
        &["create", "-f", "raw", "x.raw", "1x"],
        &["create", "-f", "raw", "x.raw", "--", "-1"],
        &["create", "-f", "foo", "x.raw", "1M"],
        &["create", "-f", "raw", "-o", "bogus=1", "x.raw", "1M"],
        &["create", "-f", "qcow2", "-o", "bogus=1", "x.raw", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "x.qcow2",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "x.qcow2",
        ],
    ];
    for c in cases {
        let q = qemu_img(dir, c);
        let v = vdisk(dir, c);
        assert_eq!(v.code, q.code, "{c:?}: {} vs {}", v.err, q.err);
        assert_eq!(v.out, q.out, "{c:?}");
        assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "{c:?}");
    }
}

#[test]
fn create_help_lists_options() {
    let d = tmp();
    for f in ["raw", "qcow2", "qed"] {
        let q = ok(
            qemu_img(d.path(), &["create", "-f", f, "-o", "help"]),
            "help",
        );
        let v = ok(vdisk(d.path(), &["create", "-f", f, "-o", "help"]), "help");
        // Every declared option is listed, encryption included (creating with it is
        // refused when asked for).
        assert_eq!(v, q, "{f}");
    }
}

#[test]
fn create_over_an_image_in_use_fails_and_keeps_it() {
    use std::io::{BufRead, BufReader, Write};
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"]),
        "create",
    );
    qemu_io(dir, "qcow2", "t.qcow2", &["write -P 1 0 64k"]);
    let before = std::fs::read(dir.join("t.qcow2")).unwrap();
    let mut child = std::process::Command::new("qemu-io")
        .current_dir(dir)
        .args(["-f", "qcow2", "t.qcow2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"length\n").unwrap();
    stdin.flush().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("MiB") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "qemu-io exited");
    }
    let v = vdisk(dir, &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"]);
    let v2 = vdisk(
        dir,
        &["convert", "-O", "raw", "-f", "raw", "/dev/null", "t.qcow2"],
    );
    drop(stdin);
    child.wait().unwrap();
    assert_eq!(v.code, 1);
    assert!(v.err.contains("Failed to get \"write\" lock"), "{}", v.err);
    assert_eq!(v2.code, 1, "{}", v2.err);
    assert_eq!(
        std::fs::read(dir.join("t.qcow2")).unwrap(),
        before,
        "image destroyed"
    );
}

/// New files take the space qemu-img's take (`info`'s "disk size", `actual-size`): the
/// same blocks are written, not only the same bytes.
#[test]
fn created_files_use_the_space_qemu_img_uses() {
    let d = tmp();
    let specs: &[(&str, &str)] = &[
        ("qcow2", ""),
        ("qcow2", "cluster_size=4k"),
        ("qcow2", "cluster_size=2M"),
        ("qcow2", "preallocation=metadata"),
        ("qcow2", "compat=0.10"),
        ("qed", ""),
        ("qed", "cluster_size=16k,table_size=2"),
        ("raw", ""),
        ("raw", "preallocation=falloc"),
        ("vmdk", ""),
        ("vmdk", "subformat=streamOptimized"),
        ("vpc", ""),
        ("vpc", "subformat=fixed"),
        ("vdi", ""),
        ("vdi", "static=on"),
        ("vhdx", ""),
        ("vhdx", "subformat=fixed"),
        ("vhdx", "block_state_zero=on"),
        ("luks", "key-secret=s0,iter-time=10"),
    ];
    let actual = |name: &str| {
        let info = ok(
            qemu_img(
                d.path(),
                &[
                    "info",
                    "--output=json",
                    "--object",
                    "secret,id=s0,data=x",
                    name,
                ],
            ),
            "info",
        );
        json(&info)["actual-size"].as_u64().expect("actual-size")
    };
    for (i, (fmt, opts)) in specs.iter().enumerate() {
        let (v, q) = (format!("v{i}.img"), format!("q{i}.img"));
        let mut args = vec!["create", "-q", "--object", "secret,id=s0,data=x", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        ok(
            vdisk(d.path(), &[&args[..], &[&v, "64M"]].concat()),
            "vdisk create",
        );
        ok(
            qemu_img(d.path(), &[&args[..], &[&q, "64M"]].concat()),
            "qemu-img create",
        );
        assert_eq!(actual(&v), actual(&q), "-f {fmt} -o {opts:?}");
    }
    // A raw file grown from nothing gets its first block, whoever grows it.
    for (tool, name) in [("vdisk", "v.raw"), ("qemu-img", "q.raw")] {
        std::fs::write(d.path().join(name), b"").unwrap();
        let r = if tool == "vdisk" {
            vdisk(d.path(), &["resize", "-f", "raw", name, "1M"])
        } else {
            qemu_img(d.path(), &["resize", "-f", "raw", name, "1M"])
        };
        ok(r, "resize");
    }
    assert_eq!(actual("v.raw"), actual("q.raw"), "raw grown from empty");
}
