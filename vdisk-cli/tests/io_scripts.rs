//! `vdisk io` against `qemu-io`: the same random scripts run on two copies of one image
//! must leave identical guest contents (`qemu-img compare`), clean metadata
//! (`qemu-img check`), and print the same lines (timing lines aside).
//!
//! qcow2 and QED cases skip (with a message) only while the library cannot create
//! that format yet.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use vdisk::{CreateOptions, Format, Image};

const SIZE: u64 = 4 << 20;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Out {
    let o = cmd.output().expect("spawn");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn vdisk_io(fmt: &str, path: &Path, extra: &[&str], cmds: &[String]) -> Out {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vdisk"));
    c.args(["io", "-f", fmt]).args(extra);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    run(c.arg(path))
}

fn qemu_io(fmt: &str, path: &Path, cmds: &[String]) -> Out {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    run(c.arg(path))
}

fn tmpdir() -> tempfile::TempDir {
    // Under target/, on a real disk: O_DIRECT (-t none) does not work on tmpfs.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

fn format_of(name: &str) -> Format {
    Format::parse(name).expect("format name")
}

/// Whether the library can create `fmt` yet; prints why a test is skipped if not.
fn available(fmt: &str) -> bool {
    let d = tmpdir();
    let r = Image::create(
        d.path().join("probe"),
        &CreateOptions {
            format: format_of(fmt),
            size: Some(1 << 20),
            options: vec![],
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
        },
    );
    if let Err(e) = &r {
        eprintln!("SKIP {fmt}: vdisk cannot create it yet ({e})");
    }
    r.is_ok()
}

/// Creates an empty image with qemu-img or with the vdisk library.
fn create(dir: &Path, name: &str, fmt: &str, by_vdisk: bool) -> PathBuf {
    let p = dir.join(name);
    if by_vdisk {
        Image::create(
            &p,
            &CreateOptions {
                format: format_of(fmt),
                size: Some(SIZE),
                options: vec![],
                backing_file: None,
                backing_format: None,
                unsafe_backing: false,
            },
        )
        .expect("vdisk create");
    } else {
        let o = run(Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt])
            .arg(&p)
            .arg(SIZE.to_string()));
        assert_eq!(o.code, 0, "qemu-img create: {}", o.stderr);
    }
    p
}

/// Output lines without the timing line of each report (it differs run to run).
fn strip_timing(s: &str) -> Vec<String> {
    s.lines()
        .filter(|l| !(l.contains(" ops; ") && l.ends_with("ops/sec)")))
        .map(str::to_string)
        .collect()
}

/// Cluster-sized alignment for discards where QEMU only drops whole clusters.
fn discard_align(fmt: &str) -> Option<u64> {
    match fmt {
        "raw" => Some(1),
        "qcow2" => Some(64 << 10),
        // QEMU's QED driver ignores discards; what the range reads afterwards is
        // unspecified, so scripts compared against it leave discard out.
        _ => None,
    }
}

/// A random script plus the guest contents it must leave.
fn random_script(rng: &mut StdRng, fmt: &str, model: &mut [u8]) -> Vec<String> {
    let mut cmds = Vec::new();
    let size = model.len() as u64;
    for _ in 0..40 {
        // Mix byte-granular, sector-aligned and cluster-aligned requests.
        let align = [1u64, 512, 4096, 65536][rng.gen_range(0..4)];
        let len = (rng.gen_range(1..=(256u64 << 10)) / align).max(1) * align;
        let off = rng.gen_range(0..=(size - len) / align) * align;
        let (o, l) = (off as usize, len as usize);
        match rng.gen_range(0..10) {
            0..=4 => {
                let p: u8 = rng.gen_range(1..=255);
                cmds.push(format!("write -P 0x{p:x} {off} {len}"));
                model[o..o + l].fill(p);
                if rng.gen_bool(0.3) {
                    cmds.push(format!("read -P 0x{p:x} {off} {len}"));
                }
            }
            5 => {
                cmds.push(format!("write {off} {len}"));
                model[o..o + l].fill(0xcd);
            }
            6 => {
                cmds.push(format!("write -z {off} {len}"));
                model[o..o + l].fill(0);
            }
            7 => {
                cmds.push(format!("write -z -u {off} {len}"));
                model[o..o + l].fill(0);
            }
            8 => {
                if let Some(a) = discard_align(fmt) {
                    let start = off.div_ceil(a) * a;
                    let end = (off + len) / a * a;
                    if end > start {
                        cmds.push(format!("discard {start} {}", end - start));
                        model[start as usize..end as usize].fill(0);
                    }
                }
            }
            _ => {
                cmds.push("flush".to_string());
            }
        }
    }
    cmds
}

/// `read -P` commands covering the whole disk, one per run of equal bytes.
fn verify_script(model: &[u8]) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut start = 0;
    while start < model.len() {
        let b = model[start];
        let run = model[start..].iter().take_while(|&&x| x == b).count();
        cmds.push(format!("read -q -P 0x{b:x} {start} {run}"));
        start += run;
    }
    cmds
}

fn qemu_check(fmt: &str, p: &Path) {
    if fmt == "raw" {
        return;
    }
    let o = run(Command::new("qemu-img").args(["check", "-f", fmt]).arg(p));
    assert_eq!(
        o.code,
        0,
        "qemu-img check {}: {}{}",
        p.display(),
        o.stdout,
        o.stderr
    );
}

fn compare(fmt: &str, a: &Path, b: &Path) {
    let o = run(Command::new("qemu-img")
        .args(["compare", "-f", fmt, "-F", fmt])
        .arg(a)
        .arg(b));
    assert_eq!(o.code, 0, "qemu-img compare: {}{}", o.stdout, o.stderr);
}

/// Runs `seeds` random scripts on `fmt` images created by qemu-img or vdisk.
fn scripts_match_qemu(fmt: &str, by_vdisk: bool, extra: &[&str], seeds: std::ops::Range<u64>) {
    if fmt != "raw" && !available(fmt) {
        return;
    }
    for seed in seeds {
        let d = tmpdir();
        let a = create(d.path(), "a.img", fmt, by_vdisk);
        let b = d.path().join("b.img");
        std::fs::copy(&a, &b).expect("copy");
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model = vec![0u8; SIZE as usize];
        let cmds = random_script(&mut rng, fmt, &mut model);

        let ours = vdisk_io(fmt, &a, extra, &cmds);
        let theirs = qemu_io(fmt, &b, &cmds);
        assert_eq!(
            ours.code, 0,
            "seed {seed}: vdisk io failed: {}{}",
            ours.stdout, ours.stderr
        );
        assert_eq!(theirs.code, 0, "seed {seed}: qemu-io: {}", theirs.stdout);
        assert_eq!(
            strip_timing(&ours.stdout),
            strip_timing(&theirs.stdout),
            "seed {seed}: output differs; script {cmds:?}"
        );

        compare(fmt, &a, &b);
        qemu_check(fmt, &a);
        // Both tools agreeing is not enough: the contents must be what the script says.
        let v = vdisk_io(fmt, &a, &["-r"], &verify_script(&model));
        assert_eq!(v.code, 0, "seed {seed}: model mismatch: {}", v.stdout);
        assert!(v.stdout.is_empty(), "seed {seed}: {}", v.stdout);
        let q = qemu_io(fmt, &a, &verify_script(&model));
        assert!(
            !q.stdout.contains("failed"),
            "seed {seed}: qemu-io sees other contents: {}",
            q.stdout
        );
    }
}

#[test]
fn raw_random_scripts_match_qemu_io() {
    scripts_match_qemu("raw", false, &[], 0..3);
}

#[test]
fn raw_random_scripts_with_o_direct() {
    // Unaligned requests through O_DIRECT need read-modify-write below us.
    scripts_match_qemu("raw", true, &["-t", "none"], 10..12);
}

#[test]
fn qcow2_random_scripts_match_qemu_io() {
    scripts_match_qemu("qcow2", false, &[], 20..23);
}

#[test]
fn qcow2_created_by_vdisk_random_scripts() {
    scripts_match_qemu("qcow2", true, &[], 30..32);
}

#[test]
fn qed_random_scripts_match_qemu_io() {
    scripts_match_qemu("qed", false, &[], 40..43);
}

#[test]
fn qed_created_by_vdisk_random_scripts() {
    scripts_match_qemu("qed", true, &[], 50..52);
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn pattern_mismatch_fails_and_reports_like_qemu() {
    let d = tmpdir();
    let a = create(d.path(), "a.raw", "raw", false);
    let cmds = s(&[
        "write -P 0xab 0 4k",
        "read -P 0xac 0 4k",
        "read -P 0xab 0 4k",
    ]);
    let ours = vdisk_io("raw", &a, &[], &cmds);
    assert_eq!(ours.code, 1, "a mismatch must fail the run");
    assert!(ours
        .stdout
        .contains("Pattern verification failed at offset 0, 4096 bytes\n"));
    let theirs = qemu_io("raw", &a, &cmds);
    assert_eq!(strip_timing(&ours.stdout), strip_timing(&theirs.stdout));

    // A partial check range (-s/-l) reports the checked range.
    let o = vdisk_io("raw", &a, &[], &s(&["read -P 0xab -s 512 -l 1024 0 4k"]));
    assert_eq!(o.code, 0, "{}", o.stdout);
    let o = vdisk_io("raw", &a, &[], &s(&["read -P 0 -s 512 -l 1024 0 8k"]));
    assert_eq!(o.code, 1);
    assert!(o
        .stdout
        .starts_with("Pattern verification failed at offset 512, 1024 bytes\n"));
}

#[test]
fn one_failing_command_fails_the_run_but_others_still_run() {
    let d = tmpdir();
    let a = create(d.path(), "a.raw", "raw", false);
    let cmds = s(&[
        "read 4M 512",
        "write -P 7 0 512",
        "discard 4095k 2k",
        "read 0 nonsense",
        "read -P 7 0 512",
    ]);
    let ours = vdisk_io("raw", &a, &[], &cmds);
    assert_eq!(ours.code, 1);
    let lines = strip_timing(&ours.stdout);
    assert_eq!(
        lines,
        s(&[
            "read failed: Input/output error",
            "wrote 512/512 bytes at offset 0",
            "discard failed: Input/output error",
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- nonsense",
            "read 512/512 bytes at offset 0",
        ])
    );
    let theirs = qemu_io("raw", &a, &cmds);
    assert_eq!(lines, strip_timing(&theirs.stdout));
    // A clean script exits 0.
    assert_eq!(vdisk_io("raw", &a, &[], &s(&["read -P 7 0 512"])).code, 0);
}

#[test]
fn commands_run_in_c_order() {
    let d = tmpdir();
    let a = create(d.path(), "a.raw", "raw", false);
    let cmds = s(&[
        "write -P 1 0 64k",
        "write -P 2 4k 4k",
        "read -P 1 0 4k",
        "read -P 2 4k 4k",
        "read -P 1 8k 56k",
    ]);
    let o = vdisk_io("raw", &a, &[], &cmds);
    assert_eq!(o.code, 0, "{}", o.stdout);
    let first_lines: Vec<String> = strip_timing(&o.stdout);
    assert_eq!(
        first_lines,
        s(&[
            "wrote 65536/65536 bytes at offset 0",
            "wrote 4096/4096 bytes at offset 4096",
            "read 4096/4096 bytes at offset 0",
            "read 4096/4096 bytes at offset 4096",
            "read 57344/57344 bytes at offset 8192",
        ])
    );
    // Reversed, the second write is overwritten and the check on it fails.
    let rev = s(&["write -P 2 4k 4k", "write -P 1 0 64k", "read -P 2 4k 4k"]);
    assert_eq!(vdisk_io("raw", &a, &[], &rev).code, 1);
}

#[test]
fn stdin_mode_runs_lines_without_prompt() {
    use std::io::Write;
    let d = tmpdir();
    let a = create(d.path(), "a.raw", "raw", false);
    let feed = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .args(["io", "-f", "raw"])
            .arg(&a)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        let o = child.wait_with_output().expect("wait");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, out) = feed("write -P 0x33 1k 2k\n\nread -P 0x33 1k 2k\nquit\nwrite 0 1k\n");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        strip_timing(&out),
        s(&[
            "wrote 2048/2048 bytes at offset 1024",
            "read 2048/2048 bytes at offset 1024"
        ]),
        "no prompt, nothing after quit"
    );
    let (code, out) = feed("read -P 0x34 1k 2k\n");
    assert_eq!(code, 1, "{out}");
}

#[test]
fn dump_map_alloc_info_length_match_qemu_io() {
    let d = tmpdir();
    let a = create(d.path(), "a.raw", "raw", false);
    let cmds = s(&[
        "write -P 0x41 100 300",
        "read -v 90 20",
        "read -v 0 3",
        "read -v -q 0 64",
        "readv -v 96 8 8",
        "map",
        "alloc 0 8M",
        "alloc 1 2",
        "info",
        "length",
        "write -P 300 0 1",
        "write -z -P 1 0 1",
        "write -s SRC 4k 8",
        "read -v 4k 8",
        "read -C 0 512",
    ]);
    let src = d.path().join("src");
    std::fs::write(&src, b"abc").expect("write source");
    let cmds: Vec<String> = cmds
        .iter()
        .map(|c| c.replace("SRC", &src.display().to_string()))
        .collect();
    let ours = vdisk_io("raw", &a, &[], &cmds);
    let theirs = qemu_io("raw", &a, &cmds);
    assert!(ours.stdout.contains("abcabcab"), "{}", ours.stdout);
    let strip = |s: &str| -> Vec<String> {
        // -C prints bytes,ops,time,...: keep the byte and op counts.
        strip_timing(s)
            .into_iter()
            .map(|l| {
                if l.starts_with("512,1,") {
                    "512,1".to_string()
                } else {
                    l
                }
            })
            .collect()
    };
    assert_eq!(strip(&ours.stdout), strip(&theirs.stdout));
    assert_eq!(ours.code, 1, "the bad pattern commands fail");
}

#[test]
fn qcow2_map_alloc_info_match_qemu_io() {
    if !available("qcow2") {
        return;
    }
    let d = tmpdir();
    let a = create(d.path(), "a.qcow2", "qcow2", false);
    let b = d.path().join("b.qcow2");
    std::fs::copy(&a, &b).expect("copy");
    let cmds = s(&[
        "write -P 1 64k 64k",
        "write -P 2 1M 128k",
        "write -c -P 3 2M 128k",
        "read -P 3 2M 128k",
        "map",
        "alloc 0 4M",
        "alloc 64k 64k",
        "info",
        "length",
    ]);
    let ours = vdisk_io("qcow2", &a, &[], &cmds);
    let theirs = qemu_io("qcow2", &b, &cmds);
    assert_eq!(ours.code, 0, "{}{}", ours.stdout, ours.stderr);
    assert_eq!(strip_timing(&ours.stdout), strip_timing(&theirs.stdout));
    qemu_check("qcow2", &a);
    compare("qcow2", &a, &b);
    let o = run(Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(&a));
    assert!(
        o.stdout.contains("\"compressed-clusters\": 2"),
        "write -c stores compressed clusters: {}",
        o.stdout
    );
}

#[test]
fn read_only_and_force_share() {
    let d = tmpdir();
    let a = create(d.path(), "a.raw", "raw", false);
    let cmds = s(&[
        "write 0 512",
        "discard 0 512",
        "write -z 0 512",
        "truncate 0",
    ]);
    let o = vdisk_io("raw", &a, &["-r"], &cmds);
    assert_eq!(o.code, 1);
    assert_eq!(o.stdout, "", "refused before running, as qemu-io does");
    assert_eq!(o.stderr.matches("Block node is read-only").count(), 4);
    let o = vdisk_io("raw", &a, &["-r", "-U"], &s(&["read -P 0 0 512"]));
    assert_eq!(o.code, 0, "{}", o.stderr);
    // -U needs -r, as in qemu-io.
    let o = vdisk_io("raw", &a, &["-U"], &s(&["read 0 512"]));
    assert_eq!(o.code, 1);
}

#[test]
fn large_request_is_chunked_with_progress() {
    // 80 MiB in one command: chunked under the hood, one report line.
    let d = tmpdir();
    let p = d.path().join("big.raw");
    let o = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&p)
        .arg("80M"));
    assert_eq!(o.code, 0);
    let o = vdisk_io(
        "raw",
        &p,
        &["-p"],
        &s(&["write -P 0x5c 0 80M", "read -P 0x5c 0 80M"]),
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(
        strip_timing(&o.stdout),
        s(&[
            "wrote 83886080/83886080 bytes at offset 0",
            "read 83886080/83886080 bytes at offset 0"
        ])
    );
    let q = qemu_io("raw", &p, &s(&["read -P 0x5c 0 80M"]));
    assert!(!q.stdout.contains("failed"), "{}", q.stdout);
}

#[test]
fn qcow2_map_counts_only_the_top_image_like_qemu_io() {
    if !available("qcow2") {
        return;
    }
    let d = tmpdir();
    let base = create(d.path(), "base.qcow2", "qcow2", false);
    let o = qemu_io("qcow2", &base, &s(&["write -P 1 0 64k"]));
    assert_eq!(o.code, 0);
    let top = d.path().join("top.qcow2");
    let o = run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ])
        .arg(&top));
    assert_eq!(o.code, 0, "{}", o.stderr);
    let top2 = d.path().join("top2.qcow2");
    std::fs::copy(&top, &top2).expect("copy");
    let cmds = s(&[
        "write -P 2 1M 64k",
        "map",
        "alloc 0 4M",
        "read -P 1 0 64k",
        "read -P 2 1M 64k",
    ]);
    let ours = vdisk_io("qcow2", &top, &[], &cmds);
    let theirs = qemu_io("qcow2", &top2, &cmds);
    assert_eq!(ours.code, 0, "{}{}", ours.stdout, ours.stderr);
    assert_eq!(strip_timing(&ours.stdout), strip_timing(&theirs.stdout));
    assert!(ours
        .stdout
        .contains("1 MiB (0x100000) bytes not allocated at offset 0 bytes (0x0)\n"));
    compare("qcow2", &top, &top2);
}

#[test]
fn qcow2_and_qed_random_scripts_with_o_direct() {
    // Metadata and unaligned data both go through O_DIRECT's alignment handling.
    scripts_match_qemu("qcow2", false, &["-t", "none"], 60..61);
    scripts_match_qemu("qed", false, &["-n"], 70..71);
}
