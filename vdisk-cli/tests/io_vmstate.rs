//! VM state (`read -b`/`write -b`) in `vdisk io` beside qemu-io 10: the same commands
//! print the same lines, the VM state one tool writes reads back in the other (plain,
//! small clusters with the L1 table grown several times, LUKS-encrypted), guest data
//! and `map` are untouched, `qemu-img check` is clean and counts the same clusters, and
//! snapshots keep the VM state they were taken with. Formats without VM state and
//! offsets the L1 table cannot reach fail as qemu-io fails.

mod cli_support;

use cli_support::*;
use std::path::Path;

/// The lines a tool printed, timing lines and the tool's name neutralised.
fn lines(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| l.replace("qemu-io:", "TOOL:").replace("vdisk:", "TOOL:"))
        .collect()
}

/// Runs the same `-c` commands with `vdisk io` and `qemu-io` on `a` and `b` (copies of
/// one image) and asserts both print the same; returns the exit codes.
fn both(dir: &Path, pre: &[&str], a: &str, b: &str, cmds: &[&str]) -> (i32, i32) {
    let mut va: Vec<&str> = vec!["io"];
    let mut qa: Vec<&str> = vec![];
    va.extend_from_slice(pre);
    qa.extend_from_slice(pre);
    for c in cmds {
        va.extend(["-c", c]);
        qa.extend(["-c", c]);
    }
    va.push(a);
    qa.push(b);
    let ours = vdisk(dir, &va);
    let theirs = qemu_io_run(dir, &qa);
    assert_eq!(
        lines(&format!("{}{}", ours.out, ours.err)),
        lines(&format!("{}{}", theirs.out, theirs.err)),
        "vdisk io vs qemu-io {cmds:?}"
    );
    (ours.code, theirs.code)
}

/// `qemu-img check` of `file` (with `pre` options), which must pass; its report.
fn check(dir: &Path, pre: &[&str], file: &str) -> String {
    let mut a = vec!["check"];
    a.extend_from_slice(pre);
    a.push(file);
    ok(qemu_img(dir, &a), "qemu-img check")
}

fn qcow2(dir: &Path, name: &str, opts: &str) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.extend(["-o", opts]);
    }
    a.extend([name, "1M"]);
    ok(qemu_img(dir, &a), "create");
}

/// The VM state script: several writes, the later ones far out so that the L1 table
/// grows more than once (by half again each time, as QEMU grows it), plus guest data.
const WRITES: &[&str] = &[
    "write -b -P 0x11 0 64k",
    "write -b -P 0x22 300M 4k",
    "write -b -P 0x33 3G 512",
    "write -P 0x44 0 4k",
    "write -b -P 0x55 1536 1k",
];
const READS: &[&str] = &[
    "read -b -P 0x11 0 1536",
    "read -b -P 0x55 1536 1k",
    "read -b -P 0x11 2560 62976",
    "read -b -P 0x22 300M 4k",
    "read -b -P 0x33 3G 512",
    "read -b -P 0 4G 64k",
    "read -P 0x44 0 4k",
    "read -P 0 4k 1020k",
];

fn write_then_read_across(opts: &str) {
    let d = tmp();
    let dir = d.path();
    qcow2(dir, "v.qcow2", opts);
    qcow2(dir, "q.qcow2", opts);
    assert_eq!(both(dir, &[], "v.qcow2", "q.qcow2", WRITES), (0, 0));
    // Each tool reads what the other wrote.
    assert_eq!(both(dir, &[], "q.qcow2", "v.qcow2", READS), (0, 0));
    assert_eq!(both(dir, &[], "v.qcow2", "q.qcow2", READS), (0, 0));
    // The same clusters in use (the VM state counts), no errors; guest data equal.
    // (The image end may differ: the tools reuse freed clusters in different orders.)
    let report = |f: &str| {
        check(dir, &[], f)
            .lines()
            .filter(|l| !l.starts_with("Image end offset"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(report("v.qcow2"), report("q.qcow2"));
    ok(
        qemu_img(dir, &["compare", "v.qcow2", "q.qcow2"]),
        "compare guest data",
    );
    // map shows only the guest disk.
    let m = |f: &str| {
        let out = ok(qemu_img(dir, &["map", "--output=json", f]), "map");
        let v = json(&out);
        v.as_array()
            .expect("map array")
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64(),
                    e["length"].as_u64(),
                    e["data"].as_bool(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(m("v.qcow2"), m("q.qcow2"));
    let vm = ok(
        vdisk(dir, &["map", "--output=json", "v.qcow2"]),
        "vdisk map",
    );
    assert_eq!(
        json(&vm)
            .as_array()
            .expect("map array")
            .last()
            .and_then(|e| e["start"].as_u64().zip(e["length"].as_u64()))
            .map(|(s, l)| s + l),
        Some(1 << 20),
        "vdisk map ends at the disk's end: {vm}"
    );
}

#[test]
fn vm_state_written_by_either_tool_reads_in_the_other() {
    write_then_read_across("");
}

#[test]
fn vm_state_with_small_clusters_grows_the_l1_table_like_qemu() {
    write_then_read_across("cluster_size=512");
    // The grown L1 table has the size QEMU's growth rule gives.
    let d = tmp();
    let dir = d.path();
    qcow2(dir, "v.qcow2", "cluster_size=512");
    qcow2(dir, "q.qcow2", "cluster_size=512");
    assert_eq!(both(dir, &[], "v.qcow2", "q.qcow2", WRITES), (0, 0));
    let l1_size = |f: &str| {
        let b = std::fs::read(dir.join(f)).expect("read image");
        u32::from_be_bytes(b[36..40].try_into().expect("4 bytes"))
    };
    assert_eq!(l1_size("v.qcow2"), l1_size("q.qcow2"));
    assert!(l1_size("v.qcow2") > 32, "the table grew");
}

#[test]
fn vm_state_of_an_encrypted_image_is_encrypted_and_reads_in_qemu() {
    let d = tmp();
    let dir = d.path();
    let obj = "secret,id=s0,data=vmstate-pw";
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                obj,
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                "e.qcow2",
                "4M",
            ],
        ),
        "create encrypted",
    );
    let opts = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s0";
    let pre = ["--object", obj, "--image-opts"];
    let mut a = vec!["io"];
    a.extend(pre);
    for c in ["write -b -P 0x66 512 70k", "write -P 0x77 0 4k"] {
        a.extend(["-c", c]);
    }
    a.push(opts);
    ok(vdisk(dir, &a), "vdisk io write -b");
    let mut q = pre.to_vec();
    for c in [
        "read -b -P 0x66 512 70k",
        "read -b -P 0 0 512",
        "read -P 0x77 0 4k",
    ] {
        q.extend(["-c", c]);
    }
    q.push(opts);
    let r = qemu_io_run(dir, &q);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    assert!(
        !r.out.contains("mismatch") && !r.out.contains("failed"),
        "{}",
        r.out
    );
    // Nothing of the pattern is in the file in the clear.
    let raw = std::fs::read(dir.join("e.qcow2")).expect("read image");
    assert!(!raw.windows(4096).any(|w| w.iter().all(|&b| b == 0x66)));
    check(dir, &["--object", obj, "--image-opts"], opts);
}

#[test]
fn snapshots_keep_the_vm_state_they_were_taken_with() {
    let d = tmp();
    let dir = d.path();
    qcow2(dir, "v.qcow2", "");
    ok(
        vdisk(dir, &["io", "-c", "write -b -P 1 0 128k", "v.qcow2"]),
        "write -b",
    );
    ok(
        vdisk(dir, &["snapshot", "-c", "s1", "v.qcow2"]),
        "snapshot -c",
    );
    // Rewriting VM state shared with the snapshot copies the clusters first.
    ok(
        vdisk(dir, &["io", "-c", "write -b -P 2 4k 4k", "v.qcow2"]),
        "write -b",
    );
    check(dir, &[], "v.qcow2");
    qemu_io(
        dir,
        "qcow2",
        "v.qcow2",
        &["read -b -P 1 0 4k", "read -b -P 2 4k 4k"],
    );
    ok(
        qemu_img(dir, &["snapshot", "-a", "s1", "v.qcow2"]),
        "snapshot -a",
    );
    qemu_io(dir, "qcow2", "v.qcow2", &["read -b -P 1 0 128k"]);
    check(dir, &[], "v.qcow2");
}

#[test]
fn refusals_match_qemu_io() {
    let d = tmp();
    let dir = d.path();
    qcow2(dir, "v.qcow2", "");
    qcow2(dir, "q.qcow2", "");
    for f in ["v.raw", "q.raw"] {
        ok(
            qemu_img(dir, &["create", "-q", "-f", "raw", f, "1M"]),
            "create raw",
        );
    }
    for f in ["v.qed", "q.qed"] {
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qed", f, "1M"]),
            "create qed",
        );
    }
    // Formats without VM state: ENOTSUP for reads and writes.
    let cmds = ["write -b 0 512", "read -b 0 512"];
    assert_eq!(both(dir, &["-f", "raw"], "v.raw", "q.raw", &cmds), (1, 1));
    assert_eq!(both(dir, &["-f", "qed"], "v.qed", "q.qed", &cmds), (1, 1));
    // Past what the L1 table can reach: EFBIG; reads there are zeroes. Unaligned and
    // contradictory requests are refused before anything runs.
    let cmds = [
        "write -b 5P 512",
        "read -b -P 0 5P 512",
        "write -b 511 512",
        "write -b 0 1",
        "read -b 0 513",
        "write -b -z 0 512",
        "write -b -f 0 512",
        "write -b -c -P 9 0 512",
        "read -b -P 9 0 512",
    ];
    assert_eq!(both(dir, &[], "v.qcow2", "q.qcow2", &cmds), (1, 1));
    // Read-only: the write is refused.
    assert_eq!(
        both(dir, &["-r"], "v.qcow2", "q.qcow2", &["write -b 0 512"]),
        (1, 1)
    );
    ok(qemu_img(dir, &["compare", "v.qcow2", "q.qcow2"]), "compare");
    assert_eq!(
        check(dir, &[], "v.qcow2").replace("v.qcow2", ""),
        check(dir, &[], "q.qcow2").replace("q.qcow2", "")
    );
}
