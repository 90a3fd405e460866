//! `vdisk check`: same report and exit codes as `qemu-img check` on clean, leaking and
//! corrupt images (made by qemu and damaged by hand), and repairs qemu accepts.

mod cli_support;
use cli_support::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

fn be64(f: &mut std::fs::File, off: u64) -> u64 {
    let mut b = [0u8; 8];
    f.seek(SeekFrom::Start(off)).unwrap();
    f.read_exact(&mut b).unwrap();
    u64::from_be_bytes(b)
}

fn put(f: &mut std::fs::File, off: u64, bytes: &[u8]) {
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Opens an image file for patching by hand.
fn open_rw(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// A 10 MiB qcow2 image with guest clusters 0 and 1 written (host clusters 5 and 6).
fn qcow2_with_data(dir: &Path, name: &str) {
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", name, "10M"]),
        "create",
    );
    qemu_io(dir, "qcow2", name, &["write -P 1 0 128k"]);
}

/// Drops the L2 entry of guest cluster 1: its host cluster leaks.
fn make_leak(path: &Path) {
    let mut f = open_rw(path);
    let l1 = be64(&mut f, 40);
    let l2 = be64(&mut f, l1) & 0x00ff_ffff_ffff_fe00;
    put(&mut f, l2 + 8, &[0u8; 8]);
}

/// Points guest cluster 1 at guest cluster 0's host cluster: cluster 5 is referenced
/// twice with refcount 1, cluster 6 leaks.
fn make_double_ref(path: &Path) {
    let mut f = open_rw(path);
    let l1 = be64(&mut f, 40);
    let l2 = be64(&mut f, l1) & 0x00ff_ffff_ffff_fe00;
    let e0 = be64(&mut f, l2);
    put(&mut f, l2 + 8, &e0.to_be_bytes());
}

/// Sets the refcount of host cluster 5 (guest cluster 0's data) to zero.
fn make_corrupt(path: &Path) {
    let mut f = open_rw(path);
    let rt = be64(&mut f, 48);
    let rb = be64(&mut f, rt);
    put(&mut f, rb + 2 * 5, &[0, 0]);
}

/// Runs check with both tools on copies of `name`; stdout and exit code must match.
fn same_check(dir: &Path, name: &str, extra: &[&str]) -> i32 {
    let q_name = format!("q-{name}");
    std::fs::copy(dir.join(name), dir.join(&q_name)).unwrap();
    let mut r = 0;
    for out in ["human", "json"] {
        let o = format!("--output={out}");
        let mut va = vec!["check", o.as_str()];
        va.extend_from_slice(extra);
        let mut qa = va.clone();
        va.push(name);
        qa.push(&q_name);
        let q = qemu_img(dir, &qa);
        let v = vdisk(dir, &va);
        assert_eq!(
            v.code, q.code,
            "check {va:?}: {}{} vs {}{}",
            v.out, v.err, q.out, q.err
        );
        assert_eq!(v.out, q.out.replace(&q_name, name), "check {va:?}");
        r = v.code;
    }
    r
}

#[test]
fn raw_cannot_be_checked() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "a.raw", "1M"]),
        "create",
    );
    for out in ["human", "json"] {
        let o = format!("--output={out}");
        let v = vdisk(dir, &["check", &o, "-f", "raw", "a.raw"]);
        assert_eq!(v.code, 63);
        assert_eq!(
            v.err.trim(),
            "vdisk: This image format does not support checks"
        );
        assert_eq!(v.out, "");
    }
}

#[test]
fn missing_image_fails_with_1() {
    let d = tmp();
    let v = vdisk(d.path(), &["check", "nope.qcow2"]);
    assert_eq!(v.code, 1);
    assert!(v.err.contains("Could not open 'nope.qcow2'"), "{}", v.err);
}

#[test]
fn qcow2_clean_leak_corrupt() {
    let d = tmp();
    let dir = d.path();
    qcow2_with_data(dir, "clean.qcow2");
    assert_eq!(same_check(dir, "clean.qcow2", &[]), 0);
    let q = ok(qemu_img(dir, &["check", "clean.qcow2"]), "check");
    assert!(q.contains("No errors were found on the image."));

    // An empty image: no allocation line, as qemu.
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "empty.qcow2", "1M"]),
        "create",
    );
    assert_eq!(same_check(dir, "empty.qcow2", &[]), 0);

    qcow2_with_data(dir, "leak.qcow2");
    make_leak(&dir.join("leak.qcow2"));
    assert_eq!(same_check(dir, "leak.qcow2", &[]), 3);
    let v = vdisk(dir, &["check", "leak.qcow2"]);
    assert!(v.out.contains("1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data."));
    assert!(
        v.err.contains("Leaked cluster 6 refcount=1 reference=0"),
        "{}",
        v.err
    );

    qcow2_with_data(dir, "bad.qcow2");
    make_corrupt(&dir.join("bad.qcow2"));
    assert_eq!(same_check(dir, "bad.qcow2", &[]), 2);
    // Quiet: nothing on stdout, same code.
    let v = vdisk(dir, &["check", "-q", "bad.qcow2"]);
    assert_eq!((v.code, v.out.as_str()), (2, ""));
}

#[test]
fn qcow2_repair_leaks_and_errors() {
    let d = tmp();
    let dir = d.path();
    qcow2_with_data(dir, "leak.qcow2");
    make_leak(&dir.join("leak.qcow2"));
    let v = vdisk(dir, &["check", "-r", "leaks", "leak.qcow2"]);
    assert_eq!(v.code, 0, "{}{}", v.out, v.err);
    assert!(
        v.out.starts_with("The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.\n"),
        "{}",
        v.out
    );
    ok(
        qemu_img(dir, &["check", "leak.qcow2"]),
        "qemu-img check after repair",
    );

    qcow2_with_data(dir, "bad.qcow2");
    make_corrupt(&dir.join("bad.qcow2"));
    // Leak repair alone cannot proceed past the corruption: qemu-img fails (exit 1).
    std::fs::copy(dir.join("bad.qcow2"), dir.join("q-bad.qcow2")).unwrap();
    let v = vdisk(dir, &["check", "-r", "leaks", "bad.qcow2"]);
    let q = qemu_img(dir, &["check", "-r", "leaks", "q-bad.qcow2"]);
    assert_eq!(v.code, q.code, "{}{} vs {}{}", v.out, v.err, q.out, q.err);
    assert!(v.code != 0);
    let v = vdisk(dir, &["check", "-r", "all", "--output=json", "bad.qcow2"]);
    assert_eq!(v.code, 0, "{}{}", v.out, v.err);
    let j = json(&v.out);
    assert!(
        j["corruptions-fixed"].as_u64().unwrap_or(0) >= 1,
        "{}",
        v.out
    );
    assert!(j.get("corruptions").is_none());
    ok(
        qemu_img(dir, &["check", "bad.qcow2"]),
        "qemu-img check after repair",
    );
    let c = qemu_img(
        dir,
        &[
            "compare",
            "-f",
            "qcow2",
            "bad.qcow2",
            "-F",
            "qcow2",
            "leak.qcow2",
        ],
    );
    assert_eq!(c.code, 1, "guest cluster 1 was dropped in leak.qcow2 only");
}

#[test]
fn qed_clean_and_leaked() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qed", "a.qed", "10M"]),
        "create",
    );
    qemu_io(
        dir,
        "qed",
        "a.qed",
        &["write -P 1 0 128k", "write -z 1M 64k", "write -P 2 5M 4k"],
    );
    assert_eq!(same_check(dir, "a.qed", &[]), 0);
    // Clusters past the last referenced one are leaks.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("a.qed"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len + 128 * 1024).unwrap();
    drop(f);
    assert_eq!(same_check(dir, "a.qed", &[]), 3);
}

/// Runs `check [extra] --output=...` with both tools on fresh copies of `name`: exit
/// code, stdout and stderr (the per-problem lines and their order; `qemu-img:` read as
/// `vdisk:`) must match. Returns vdisk's stderr of the human run.
fn same_check_all_output(dir: &Path, name: &str, extra: &[&str]) -> String {
    let mut human_err = String::new();
    for out in ["human", "json"] {
        let (v_name, q_name) = (format!("v-{name}"), format!("q-{name}"));
        std::fs::copy(dir.join(name), dir.join(&v_name)).unwrap();
        std::fs::copy(dir.join(name), dir.join(&q_name)).unwrap();
        let o = format!("--output={out}");
        let mut va = vec!["check", o.as_str()];
        va.extend_from_slice(extra);
        let mut qa = va.clone();
        va.push(&v_name);
        qa.push(&q_name);
        let q = qemu_img(dir, &qa);
        let v = vdisk(dir, &va);
        assert_eq!(
            v.code, q.code,
            "{va:?}: {}{} vs {}{}",
            v.out, v.err, q.out, q.err
        );
        assert_eq!(v.out, q.out.replace(&q_name, &v_name), "stdout of {va:?}");
        assert_eq!(
            v.err,
            q.err.replace("qemu-img:", "vdisk:"),
            "stderr of {va:?}"
        );
        ok(qemu_img(dir, &["compare", &v_name, &q_name]), "compare");
        if out == "human" {
            human_err = v.err;
        }
    }
    human_err
}

#[test]
fn qcow2_problem_lines_match_qemu() {
    let d = tmp();
    let dir = d.path();
    qcow2_with_data(dir, "leak.qcow2");
    make_leak(&dir.join("leak.qcow2"));
    qcow2_with_data(dir, "bad.qcow2");
    make_corrupt(&dir.join("bad.qcow2"));

    let e = same_check_all_output(dir, "leak.qcow2", &[]);
    assert_eq!(e, "Leaked cluster 6 refcount=1 reference=0\n");
    // A repair reports the problem, then what it repairs.
    for r in ["leaks", "all"] {
        let e = same_check_all_output(dir, "leak.qcow2", &["-r", r]);
        assert_eq!(
            e,
            "Leaked cluster 6 refcount=1 reference=0\nRepairing cluster 6 refcount=1 reference=0\n"
        );
    }

    let e = same_check_all_output(dir, "bad.qcow2", &[]);
    assert!(
        e.starts_with("ERROR cluster 5 refcount=0 reference=1\n"),
        "{e}"
    );
    // Leaks-only repair of refcounts that need a rebuild: the check fails with EIO
    // and prints no report.
    let e = same_check_all_output(dir, "bad.qcow2", &["-r", "leaks"]);
    assert_eq!(
        e,
        "ERROR cluster 5 refcount=0 reference=1\nERROR need to rebuild refcount structures\nvdisk: Check failed: Input/output error\n"
    );
    // The rebuild, then the old refcount structure's clusters freed.
    let e = same_check_all_output(dir, "bad.qcow2", &["-r", "all"]);
    assert!(
        e.contains("Rebuilding refcount structure\nRepairing cluster"),
        "{e}"
    );
    // A corruption a leak repair leaves alone is reported in both passes.
    qcow2_with_data(dir, "dup.qcow2");
    make_double_ref(&dir.join("dup.qcow2"));
    same_check_all_output(dir, "dup.qcow2", &[]);
    let e = same_check_all_output(dir, "dup.qcow2", &["-r", "leaks"]);
    assert!(
        e.starts_with("ERROR cluster 5 refcount=1 reference=2\nLeaked cluster 6 refcount=1 reference=0\nERROR cluster 5 refcount=1 reference=2\nRepairing cluster 6 refcount=1 reference=0\n"),
        "{e}"
    );
    same_check_all_output(dir, "dup.qcow2", &["-r", "all"]);
}

/// Sets `bits` in guest cluster 0's L2 entry (`l2`) or in the first L1 entry.
fn set_entry_bits(path: &Path, l2: bool, bits: u64) -> u64 {
    let mut f = open_rw(path);
    let l1 = be64(&mut f, 40);
    let at = if l2 {
        be64(&mut f, l1) & 0x00ff_ffff_ffff_fe00
    } else {
        l1
    };
    let bad = be64(&mut f, at) | bits;
    put(&mut f, at, &bad.to_be_bytes());
    bad
}

/// Entries with reserved bits set and misaligned offsets: the lines the library's
/// findings are worded into are qemu-img's, in both tools' stderr.
#[test]
fn qcow2_entry_problem_lines_match_qemu() {
    let d = tmp();
    let dir = d.path();
    for (l2, bits, what) in [
        (true, 0x64u64, "l2"),
        (true, 1u64 << 57, "l2"),
        (false, 0x2u64, "L1"),
        (false, 1u64 << 60, "L1"),
    ] {
        let name = format!("r{bits:x}.qcow2");
        qcow2_with_data(dir, &name);
        let bad = set_entry_bits(&dir.join(&name), l2, bits);
        let line = format!("ERROR found {what} entry with reserved bits set: {bad:x}\n");
        let q = qemu_img(dir, &["check", &name]);
        let v = vdisk(dir, &["check", &name]);
        assert_eq!(v.code, q.code, "{}{} vs {}{}", v.out, v.err, q.out, q.err);
        assert!(q.err.contains(&line), "qemu: {}", q.err);
        assert!(v.err.contains(&line), "vdisk: {}", v.err);
    }
    // An L2 table offset that is not cluster aligned (qemu goes on to read the table
    // there, so only the line itself is compared).
    qcow2_with_data(dir, "u.qcow2");
    let e = set_entry_bits(&dir.join("u.qcow2"), false, 0x200);
    let line = format!(
        "ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry corrupted\n",
        e & 0x00ff_ffff_ffff_fe00
    );
    let q = qemu_img(dir, &["check", "u.qcow2"]);
    let v = vdisk(dir, &["check", "u.qcow2"]);
    assert_eq!(v.code, q.code);
    assert!(q.err.contains(&line), "qemu: {}", q.err);
    assert!(v.err.contains(&line), "vdisk: {}", v.err);
}

/// Clears the COPIED flag of guest cluster 0's L2 entry (`l2`) or of the first L1 entry.
fn clear_copied(path: &Path, l2: bool) {
    let mut f = open_rw(path);
    let l1 = be64(&mut f, 40);
    let at = if l2 {
        be64(&mut f, l1) & 0x00ff_ffff_ffff_fe00
    } else {
        l1
    };
    let e = be64(&mut f, at) & !(1u64 << 63);
    put(&mut f, at, &e.to_be_bytes());
}

/// COPIED flags that disagree with the refcounts: found, then repaired, in qemu-img's
/// words and order.
#[test]
fn qcow2_copied_flag_lines_match_qemu() {
    let d = tmp();
    let dir = d.path();
    for (l2, name, want) in [
        (
            true,
            "c2.qcow2",
            "ERROR OFLAG_COPIED data cluster: l2_entry=",
        ),
        (
            false,
            "c1.qcow2",
            "ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=",
        ),
    ] {
        qcow2_with_data(dir, name);
        clear_copied(&dir.join(name), l2);
        let e = same_check_all_output(dir, name, &[]);
        assert!(e.contains(want), "{e}");
        let e = same_check_all_output(dir, name, &["-r", "all"]);
        assert!(e.contains(&want.replace("ERROR", "Repairing")), "{e}");
    }
}

/// A refcount table past the end of the file: the reference past the end and the
/// refcount errors, in qemu-img's words.
#[test]
fn qcow2_refcount_table_past_eof_lines_match_qemu() {
    let d = tmp();
    let dir = d.path();
    qcow2_with_data(dir, "t.qcow2");
    let mut f = open_rw(&dir.join("t.qcow2"));
    put(&mut f, 48, &(1u64 << 30).to_be_bytes());
    drop(f);
    let e = same_check_all_output(dir, "t.qcow2", &[]);
    assert!(
        e.contains("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x40000000 size 0x10000\n"),
        "{e}"
    );
}
