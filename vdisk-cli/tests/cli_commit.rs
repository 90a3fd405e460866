//! `vdisk commit` side by side with `qemu-img commit`: qcow2 and QED tops over qcow2,
//! QED and raw bases, a base further down (-b), -d, a base smaller than the top; the
//! resulting images compared with qemu-img's (`qemu-img compare`) and checked clean,
//! messages and exit codes as qemu-img's.

mod cli_support;
use cli_support::*;
use std::path::Path;

fn create(dir: &Path, fmt: &str, name: &str, size: &str, backing: Option<(&str, &str)>) {
    let mut a = vec!["create", "-q", "-f", fmt];
    if let Some((b, bf)) = backing {
        a.extend_from_slice(&["-b", b, "-F", bf]);
    }
    a.push(name);
    a.push(size);
    ok(qemu_img(dir, &a), &format!("create {name}"));
}

fn ext(fmt: &str) -> &str {
    fmt
}

/// Builds `prefix-base.FMT` (+ `prefix-mid.FMT` when `mid`) and `prefix-top.FMT` with
/// data in every layer, zeroes written in the top, and returns (top, [mid], base).
fn chain(dir: &Path, prefix: &str, top_fmt: &str, base_fmt: &str, mid: bool) -> Vec<String> {
    let base = format!("{prefix}-base.{}", ext(base_fmt));
    create(dir, base_fmt, &base, "4M", None);
    qemu_io(dir, base_fmt, &base, &["write -P 1 0 4M"]);
    let mut names = vec![base.clone()];
    let mut below = (base, base_fmt.to_string());
    if mid {
        let m = format!("{prefix}-mid.qcow2");
        create(dir, "qcow2", &m, "4M", Some((&below.0, &below.1)));
        qemu_io(dir, "qcow2", &m, &["write -P 2 1M 1M"]);
        names.insert(0, m.clone());
        below = (m, "qcow2".into());
    }
    let top = format!("{prefix}-top.{}", ext(top_fmt));
    create(dir, top_fmt, &top, "4M", Some((&below.0, &below.1)));
    qemu_io(
        dir,
        top_fmt,
        &top,
        &[
            "write -P 3 100k 300k",
            "write -z 1536k 128k",
            "write -P 4 3M 4k",
        ],
    );
    names.insert(0, top);
    names
}

fn check_clean(dir: &Path, name: &str) {
    if !name.ends_with(".raw") {
        ok(qemu_img(dir, &["check", name]), &format!("check {name}"));
    }
}

fn same(dir: &Path, a: &str, b: &str, what: &str) {
    ok(qemu_img(dir, &["compare", a, b]), what);
}

#[test]
fn commit_into_the_backing_file_like_qemu() {
    let d = tmp();
    let dir = d.path();
    for top_fmt in ["qcow2", "qed"] {
        for base_fmt in ["qcow2", "qed", "raw"] {
            for args in [&[][..], &["-d"][..], &["-q", "-t", "none"][..]] {
                let tag = format!("{top_fmt}-{base_fmt}-{}", args.len());
                let v = chain(dir, &format!("v{tag}"), top_fmt, base_fmt, false);
                let q = chain(dir, &format!("q{tag}"), top_fmt, base_fmt, false);
                let mut va = vec!["commit"];
                va.extend_from_slice(args);
                let mut qa = va.clone();
                va.push(&v[0]);
                qa.push(&q[0]);
                let rv = vdisk(dir, &va);
                let rq = qemu_img(dir, &qa);
                assert_eq!(
                    (rv.code, rv.out.as_str()),
                    (rq.code, rq.out.as_str()),
                    "{tag}: {}",
                    rv.err
                );
                for (a, b) in v.iter().zip(&q) {
                    check_clean(dir, a);
                    same(dir, a, b, &format!("{tag}: {a} vs {b}"));
                }
                // The base alone (without the top) reads what the top did.
                let vb = format!("{}.raw", v[1]);
                let qb = format!("{}.raw", q[1]);
                ok(
                    qemu_img(dir, &["convert", "-O", "raw", &v[1], &vb]),
                    "convert",
                );
                ok(
                    qemu_img(dir, &["convert", "-O", "raw", &q[1], &qb]),
                    "convert",
                );
                same(dir, &vb, &qb, &format!("{tag}: bases"));
                // Emptied or not as qemu-img left it.
                let mv = qemu_img(dir, &["map", "--output=json", &v[0]]);
                let mq = qemu_img(dir, &["map", "--output=json", &q[0]]);
                let data = |s: &str| {
                    json(s)
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|e| e["depth"] == 0 && e["data"] == true)
                        .count()
                        > 0
                };
                assert_eq!(data(&mv.out), data(&mq.out), "{tag}: top emptied?");
            }
        }
    }
}

#[test]
fn commit_into_a_base_further_down() {
    let d = tmp();
    let dir = d.path();
    for top_fmt in ["qcow2", "qed"] {
        let v = chain(dir, &format!("v{top_fmt}"), top_fmt, "qcow2", true);
        let q = chain(dir, &format!("q{top_fmt}"), top_fmt, "qcow2", true);
        let rv = vdisk(dir, &["commit", "-b", &v[2], &v[0]]);
        let rq = qemu_img(dir, &["commit", "-b", &q[2], &q[0]]);
        assert_eq!((rv.code, rv.out), (rq.code, rq.out), "{}", rv.err);
        for name in &v {
            check_clean(dir, name);
        }
        // The base holds the top's view; -b leaves the top as it was.
        same(dir, &v[0], &q[0], "tops");
        let vb = format!("{}.raw", v[2]);
        let qb = format!("{}.raw", q[2]);
        ok(
            qemu_img(dir, &["convert", "-O", "raw", &v[2], &vb]),
            "convert",
        );
        ok(
            qemu_img(dir, &["convert", "-O", "raw", &q[2], &qb]),
            "convert",
        );
        same(dir, &vb, &qb, "bases");
        same(dir, &vb, &v[0], "base holds the top's view");
    }
}

#[test]
fn base_smaller_than_top_grows() {
    let d = tmp();
    let dir = d.path();
    for tool in ["v", "q"] {
        create(dir, "qcow2", &format!("{tool}b.qcow2"), "1M", None);
        qemu_io(
            dir,
            "qcow2",
            &format!("{tool}b.qcow2"),
            &["write -P 1 0 1M"],
        );
        create(
            dir,
            "qcow2",
            &format!("{tool}t.qcow2"),
            "3M",
            Some((&format!("{tool}b.qcow2"), "qcow2")),
        );
        qemu_io(
            dir,
            "qcow2",
            &format!("{tool}t.qcow2"),
            &["write -P 2 2M 64k"],
        );
    }
    ok(vdisk(dir, &["commit", "vt.qcow2"]), "vdisk commit");
    ok(qemu_img(dir, &["commit", "qt.qcow2"]), "qemu commit");
    check_clean(dir, "vb.qcow2");
    check_clean(dir, "vt.qcow2");
    same(dir, "vb.qcow2", "qb.qcow2", "bases");
    same(dir, "vt.qcow2", "qt.qcow2", "tops");
    let info = |n: &str| json(&ok(qemu_img(dir, &["info", "--output=json", n]), "info"));
    assert_eq!(
        info("vb.qcow2")["virtual-size"],
        info("qb.qcow2")["virtual-size"]
    );
}

#[test]
fn refusals_like_qemu() {
    let d = tmp();
    let dir = d.path();
    let c = chain(dir, "e", "qcow2", "qcow2", false);
    create(dir, "qcow2", "alone.qcow2", "1M", None);
    let cases: [&[&str]; 6] = [
        &["-f", "qcow2", "-f", "qcow2", &c[0]],
        &["alone.qcow2"],
        &["-b", "nosuch.qcow2", &c[0]],
        &["-t", "bogus", &c[0]],
        &["-r", "x", &c[0]],
        &["nofile.qcow2"],
    ];
    for args in cases {
        let mut a = vec!["commit"];
        a.extend_from_slice(args);
        let rv = vdisk(dir, &a);
        let rq = qemu_img(dir, &a);
        assert_eq!(
            (rv.code, rv.err.replace("vdisk:", "qemu-img:")),
            (rq.code, rq.err),
            "{args:?}"
        );
    }
}
