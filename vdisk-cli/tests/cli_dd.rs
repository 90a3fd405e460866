//! `vdisk dd` side by side with `qemu-img dd`: bs/count/skip (qemu's size rule
//! included), input and output formats, the output compared with qemu-img's and
//! checked clean; operand errors with qemu-img's messages and exit codes.

mod cli_support;
use cli_support::*;
use std::path::Path;

fn both(dir: &Path, args: &[&str], out: &str) -> (String, String) {
    let (v, q) = (format!("v-{out}"), format!("q-{out}"));
    let mut va = vec!["dd".to_string()];
    va.extend(args.iter().map(|s| s.to_string()));
    let mut qa = va.clone();
    va.push(format!("of={v}"));
    qa.push(format!("of={q}"));
    let va: Vec<&str> = va.iter().map(String::as_str).collect();
    let qa: Vec<&str> = qa.iter().map(String::as_str).collect();
    let rv = vdisk(dir, &va);
    let rq = qemu_img(dir, &qa);
    assert_eq!(rv.code, rq.code, "{args:?}: {}", rv.err);
    assert_eq!(rv.out, rq.out, "{args:?}");
    assert_eq!(
        rv.err.replace("vdisk:", "qemu-img:").replace(&v, &q),
        rq.err,
        "{args:?}"
    );
    (v, q)
}

#[test]
fn copies_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "in.qcow2", "1M"]),
        "create",
    );
    qemu_io(
        dir,
        "qcow2",
        "in.qcow2",
        &[
            "write -P 1 0 100k",
            "write -P 2 500k 3000",
            "write -P 3 1020k 4k",
        ],
    );
    let cases: [&[&str]; 9] = [
        &["if=in.qcow2"],
        &["if=in.qcow2", "bs=4k"],
        &["if=in.qcow2", "bs=4k", "count=3"],
        &["if=in.qcow2", "bs=4k", "count=3", "skip=1"],
        &["if=in.qcow2", "bs=1000", "skip=7"],
        &["if=in.qcow2", "bs=64k", "count=100"],
        &["if=in.qcow2", "bs=1000", "count=1", "skip=2"],
        &["if=in.qcow2", "skip=100000"],
        &["-f", "qcow2", "bs=3", "count=5000", "if=in.qcow2"],
    ];
    for (i, args) in cases.iter().enumerate() {
        let (v, q) = both(dir, args, &format!("o{i}.raw"));
        ok(
            qemu_img(dir, &["compare", "-f", "raw", "-F", "raw", &v, &q]),
            &format!("{args:?}"),
        );
        assert_eq!(
            std::fs::metadata(dir.join(&v)).unwrap().len(),
            std::fs::metadata(dir.join(&q)).unwrap().len(),
            "{args:?}: output size"
        );
    }
    for fmt in ["qcow2", "qed"] {
        let (v, q) = both(
            dir,
            &["-O", fmt, "if=in.qcow2", "bs=64k", "skip=2"],
            &format!("o.{fmt}"),
        );
        ok(qemu_img(dir, &["check", &v]), "check");
        ok(qemu_img(dir, &["compare", &v, &q]), fmt);
    }
}

#[test]
fn operand_errors_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "in.qcow2", "1M"]),
        "create",
    );
    let cases: [&[&str]; 8] = [
        &["bs=0", "if=in.qcow2"],
        &["bs=1x", "if=in.qcow2"],
        &["count=x", "if=in.qcow2"],
        &["skip=-1", "if=in.qcow2"],
        &["foo=1", "if=in.qcow2"],
        &["bare", "if=in.qcow2"],
        &["bs=3000000000", "if=in.qcow2"],
        &["if=nofile"],
    ];
    for (i, args) in cases.iter().enumerate() {
        both(dir, args, &format!("e{i}.raw"));
    }
    let v = vdisk(dir, &["dd", "if=in.qcow2"]);
    let q = qemu_img(dir, &["dd", "if=in.qcow2"]);
    assert_eq!(
        (v.code, v.err.replace("vdisk:", "qemu-img:")),
        (q.code, q.err)
    );
}
