//! `amend` key-slot management (`state`, `keyslot`, `new-secret`, `old-secret`,
//! `iter-time`, `--force`) of raw LUKS volumes and qcow2 `encrypt.format=luks`,
//! against qemu-img / qemu-io 10: the same requests give the same messages, exit
//! codes and slot states; slots vdisk adds open in qemu-io and slots it erases no
//! longer do; slots qemu-img adds or erases on images vdisk made behave the same here.

mod cli_support;
use cli_support::*;
use std::path::Path;

const OBJECTS: &[&str] = &[
    "--object",
    "secret,id=s0,data=old pass",
    "--object",
    "secret,id=s1,data=new pass",
    "--object",
    "secret,id=s2,data=third",
];

/// One container kind: its create options, image-opts name and option prefix.
struct Kind {
    fmt: &'static str,
    create: &'static str,
    prefix: &'static str,
}

const QCOW2: Kind = Kind {
    fmt: "qcow2",
    create: "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
    prefix: "encrypt.",
};
const LUKS: Kind = Kind {
    fmt: "luks",
    create: "key-secret=s0,iter-time=10",
    prefix: "",
};

impl Kind {
    fn spec(&self, file: &str, secret: &str) -> String {
        let key = if self.fmt == "qcow2" {
            "encrypt.key-secret"
        } else {
            "key-secret"
        };
        format!("driver={},file.filename={file},{key}={secret}", self.fmt)
    }
    /// `-o` with the prefix before each key.
    fn o(&self, opts: &str) -> String {
        opts.split(',')
            .map(|kv| format!("{}{kv}", self.prefix))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn args<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    let mut a = head.to_vec();
    a.extend_from_slice(OBJECTS);
    a.extend_from_slice(tail);
    a
}

fn create(dir: &Path, tool: &str, k: &Kind, file: &str) {
    let a = args(
        &["create", "-q", "-f", k.fmt],
        &["-o", k.create, file, "4M"],
    );
    let r = if tool == "qemu" {
        qemu_img(dir, &a)
    } else {
        vdisk(dir, &a)
    };
    ok(r, "create");
}

/// `amend` with one tool; `opts` without the prefix.
fn amend(
    dir: &Path,
    tool: &str,
    k: &Kind,
    file: &str,
    secret: &str,
    opts: &str,
    force: bool,
) -> Run {
    let s = k.spec(file, secret);
    let o = k.o(opts);
    let mut tail = vec!["--image-opts", s.as_str(), "-o", o.as_str()];
    if force {
        tail.insert(0, "--force");
    }
    let a = args(&["amend"], &tail);
    if tool == "qemu" {
        qemu_img(dir, &a)
    } else {
        vdisk(dir, &a)
    }
}

/// Which slots `qemu-img info` shows active.
fn slots(dir: &Path, file: &str) -> Vec<bool> {
    let out = ok(qemu_img(dir, &["info", "--output=json", file]), "info");
    let v = json(&out);
    let enc = &v["format-specific"]["data"];
    let slots = if enc["encrypt"].is_object() {
        &enc["encrypt"]["slots"]
    } else {
        &enc["slots"]
    };
    slots
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| s["active"].as_bool().unwrap())
        .collect()
}

/// Reads the pattern written at creation through qemu-io with `secret`; whether it
/// opened.
fn qemu_opens(dir: &Path, k: &Kind, file: &str, secret: &str) -> bool {
    let s = k.spec(file, secret);
    let a = args(
        &[],
        &["--image-opts", s.as_str(), "-c", "read -P 0x5a 0 64k"],
    );
    let r = qemu_io_run(dir, &a);
    if r.code == 0 && !r.out.contains("mismatch") && !r.out.contains("fail") {
        return true;
    }
    assert!(
        r.err
            .contains("Invalid password, cannot unlock any keyslot"),
        "qemu-io: {}{}",
        r.out,
        r.err
    );
    false
}

fn vdisk_opens(dir: &Path, k: &Kind, file: &str, secret: &str) -> bool {
    let s = k.spec(file, secret);
    let a = args(
        &["io"],
        &["--image-opts", s.as_str(), "-c", "read -P 0x5a 0 64k"],
    );
    let r = vdisk(dir, &a);
    if r.code == 0 && !r.out.contains("mismatch") && !r.out.contains("fail") {
        return true;
    }
    assert!(
        r.err
            .contains("Invalid password, cannot unlock any keyslot"),
        "vdisk io: {}{}",
        r.out,
        r.err
    );
    false
}

fn write_pattern(dir: &Path, k: &Kind, file: &str) {
    let s = k.spec(file, "s0");
    let a = args(
        &[],
        &["--image-opts", s.as_str(), "-c", "write -P 0x5a 0 64k"],
    );
    let r = qemu_io_run(dir, &a);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
}

/// The same request sequence with both tools on twin images: same code, same
/// message, same slot states after each step.
#[test]
fn requests_and_refusals_match_qemu() {
    // (secret the image is opened with, options, --force)
    let steps: &[(&str, &str, bool)] = &[
        ("s0", "state=active,new-secret=s1,iter-time=10", false),
        (
            "s0",
            "state=active,new-secret=s2,keyslot=1,iter-time=10",
            false,
        ),
        (
            "s0",
            "state=active,new-secret=s2,keyslot=8,iter-time=10",
            false,
        ),
        (
            "s0",
            "state=active,new-secret=s2,keyslot=-1,iter-time=10",
            false,
        ),
        ("s0", "state=active,iter-time=10", false),
        ("s0", "state=active,new-secret=s2,old-secret=s0", false),
        ("s0", "new-secret=s2", false),
        ("s0", "keyslot=abc", false),
        ("s0", "state=bogus", false),
        ("s0", "state=active,new-secret=nosuch,iter-time=10", false),
        ("s0", "state=inactive", false),
        ("s0", "state=inactive,new-secret=s2", false),
        ("s0", "state=inactive,iter-time=10,keyslot=1", false),
        ("s0", "state=inactive,keyslot=5", false),
        ("s0", "state=inactive,keyslot=9", false),
        ("s0", "state=inactive,keyslot=-1", false),
        ("s0", "state=inactive,old-secret=s2", false),
        ("s0", "state=inactive,old-secret=s1,keyslot=0", false),
        ("s0", "state=inactive,old-secret=nosuch", false),
        ("s2", "state=inactive,keyslot=1", false),
        (
            "s0",
            "state=active,new-secret=s2,keyslot=4,iter-time=10",
            false,
        ),
        (
            "s0",
            "state=active,new-secret=s1,keyslot=4,iter-time=10",
            true,
        ),
        ("s1", "state=inactive,keyslot=0", false),
        ("s1", "state=inactive,old-secret=s1", false),
        ("s1", "state=inactive,keyslot=0,old-secret=s0", false),
        ("s1", "state=inactive,old-secret=s1", false),
        ("s1", "state=inactive,keyslot=3", true),
        ("s1", "state=inactive,old-secret=s1", true),
        ("s1", "state=inactive,keyslot=1", false),
    ];
    for k in [&QCOW2, &LUKS] {
        let d = tmp();
        let dir = d.path();
        create(dir, "qemu", k, "q.img");
        std::fs::copy(p(dir, "q.img"), p(dir, "v.img")).unwrap();
        for (secret, opts, force) in steps {
            let q = amend(dir, "qemu", k, "q.img", secret, opts, *force);
            let v = amend(dir, "vdisk", k, "v.img", secret, opts, *force);
            let norm = |s: &str, tool: &str, f: &str| s.replace(tool, "TOOL").replace(f, "IMG");
            assert_eq!(
                (v.code, norm(&v.err, "vdisk", "v.img")),
                (q.code, norm(&q.err, "qemu-img", "q.img")),
                "{} {opts} (force {force})",
                k.fmt
            );
            assert_eq!(v.out, q.out, "{} {opts}", k.fmt);
            assert_eq!(
                slots(dir, "v.img"),
                slots(dir, "q.img"),
                "{} {opts}: slot states",
                k.fmt
            );
        }
        // Everything was erased with --force: neither opens any more.
        assert!(slots(dir, "v.img").iter().all(|a| !a));
    }
}

/// qemu-img makes the image; vdisk adds and erases; qemu-io opens with the new
/// passphrase, not with the erased one.
#[test]
fn slots_changed_here_work_in_qemu() {
    for k in [&QCOW2, &LUKS] {
        let d = tmp();
        let dir = d.path();
        create(dir, "qemu", k, "a.img");
        write_pattern(dir, k, "a.img");
        let r = amend(
            dir,
            "vdisk",
            k,
            "a.img",
            "s0",
            "state=active,new-secret=s1,iter-time=10",
            false,
        );
        assert_eq!(r.code, 0, "{}", r.err);
        let r = amend(
            dir,
            "vdisk",
            k,
            "a.img",
            "s0",
            "state=active,new-secret=s2,keyslot=6,iter-time=10",
            false,
        );
        assert_eq!(r.code, 0, "{}", r.err);
        assert_eq!(
            slots(dir, "a.img"),
            [true, true, false, false, false, false, true, false]
        );
        for s in ["s0", "s1", "s2"] {
            assert!(qemu_opens(dir, k, "a.img", s), "{} {s}", k.fmt);
        }
        let r = amend(
            dir,
            "vdisk",
            k,
            "a.img",
            "s1",
            "state=inactive,old-secret=s0",
            false,
        );
        assert_eq!(r.code, 0, "{}", r.err);
        let r = amend(
            dir,
            "vdisk",
            k,
            "a.img",
            "s1",
            "state=inactive,keyslot=6",
            false,
        );
        assert_eq!(r.code, 0, "{}", r.err);
        assert!(!qemu_opens(dir, k, "a.img", "s0"), "{}: s0 erased", k.fmt);
        assert!(!qemu_opens(dir, k, "a.img", "s2"), "{}: s2 erased", k.fmt);
        assert!(qemu_opens(dir, k, "a.img", "s1"), "{}", k.fmt);
        if k.fmt == "qcow2" {
            let s = k.spec("a.img", "s1");
            let out = qemu_img(dir, &args(&["check"], &["--image-opts", s.as_str()]));
            assert_eq!(out.code, 0, "{}{}", out.out, out.err);
        }
    }
}

/// vdisk makes the image; qemu-img adds and erases; vdisk opens accordingly.
#[test]
fn slots_changed_by_qemu_work_here() {
    for k in [&QCOW2, &LUKS] {
        let d = tmp();
        let dir = d.path();
        create(dir, "vdisk", k, "b.img");
        write_pattern(dir, k, "b.img");
        let r = amend(
            dir,
            "qemu",
            k,
            "b.img",
            "s0",
            "state=active,new-secret=s1,keyslot=3,iter-time=10",
            false,
        );
        assert_eq!(r.code, 0, "{}", r.err);
        assert!(vdisk_opens(dir, k, "b.img", "s1"), "{}", k.fmt);
        assert!(vdisk_opens(dir, k, "b.img", "s0"), "{}", k.fmt);
        let r = amend(
            dir,
            "qemu",
            k,
            "b.img",
            "s1",
            "state=inactive,keyslot=0",
            false,
        );
        assert_eq!(r.code, 0, "{}", r.err);
        assert!(!vdisk_opens(dir, k, "b.img", "s0"), "{}", k.fmt);
        assert!(vdisk_opens(dir, k, "b.img", "s1"), "{}", k.fmt);
        // And vdisk's own amend on it, read back by qemu-io.
        let r = amend(
            dir,
            "vdisk",
            k,
            "b.img",
            "s1",
            "state=active,new-secret=s2,iter-time=10",
            false,
        );
        assert_eq!(r.code, 0, "{}", r.err);
        assert_eq!(
            slots(dir, "b.img"),
            [true, false, false, true, false, false, false, false]
        );
        assert!(qemu_opens(dir, k, "b.img", "s2"), "{}", k.fmt);
    }
}

/// Encryption options on images without LUKS, and the luks driver's `-o help`.
#[test]
fn other_images_and_help_match_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"]),
        "create",
    );
    let a = args(
        &["create", "-q", "-f", "qcow2"],
        &[
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s0",
            "aes.qcow2",
            "1M",
        ],
    );
    ok(qemu_img(dir, &a), "create aes");
    for (spec, o) in [
        (
            "driver=qcow2,file.filename=plain.qcow2",
            "encrypt.state=active,encrypt.new-secret=s1",
        ),
        (
            "driver=qcow2,file.filename=aes.qcow2,encrypt.key-secret=s0",
            "encrypt.state=active,encrypt.new-secret=s1",
        ),
    ] {
        let a = args(&["amend"], &["--image-opts", spec, "-o", o]);
        let q = qemu_img(dir, &a);
        let v = vdisk(dir, &a);
        assert_eq!(q.code, 1);
        assert_eq!(v.code, q.code, "{spec}");
        assert_eq!(v.err.replace("vdisk", "qemu-img"), q.err, "{spec}");
    }
    let q = qemu_img(dir, &["amend", "-f", "luks", "-o", "help", "x"]);
    let v = vdisk(dir, &["amend", "-f", "luks", "-o", "help", "x"]);
    assert_eq!((v.code, v.out), (q.code, q.out));
}
