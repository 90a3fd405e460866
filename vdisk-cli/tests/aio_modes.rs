//! The AIO mode options — `vdisk io -i/-k` and `open -i/-k`, `vdisk bench -i/-n`,
//! `vdisk serve --aio` — beside qemu-io, qemu-img bench and qemu-nbd: the same
//! refusals (unknown mode; `native` without a direct cache mode), and `io_uring` really
//! used: while the tool runs, each host file of the chain has its own ring, which shows
//! as an `anon_inode:[io_uring]` descriptor of the process. Writes through io_uring leave
//! the image qemu-io leaves with the same commands.

mod cli_support;

use cli_support::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs one tool's command line; exit code and stderr with the tool's name made
/// neutral (each message names its tool).
fn run(dir: &Path, tool: &str, args: &[&str]) -> (i32, String) {
    let mut c = match tool {
        "vdisk io" | "vdisk bench" | "vdisk serve" => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_vdisk"));
            c.arg(&tool[6..]);
            c
        }
        t => Command::new(t),
    };
    let o = c
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run the tool");
    let err = String::from_utf8_lossy(&o.stderr)
        .replace("vdisk: ", "TOOL: ")
        .replace("qemu-io: ", "TOOL: ")
        .replace("qemu-img: ", "TOOL: ")
        .replace("qemu-nbd: ", "TOOL: ");
    (o.status.code().unwrap_or(-1), err)
}

#[test]
fn aio_refusals_match_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-f", "qcow2", "t.qcow2", "1M"]),
        "create",
    );
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "qemu-io",
            "vdisk io",
            &["-i", "foo", "-c", "quit", "t.qcow2"],
        ),
        (
            "qemu-io",
            "vdisk io",
            &["-i", "native", "-c", "quit", "t.qcow2"],
        ),
        ("qemu-io", "vdisk io", &["-k", "-c", "quit", "t.qcow2"]),
        ("qemu-io", "vdisk io", &["-c", "open -i foo t.qcow2"]),
        ("qemu-io", "vdisk io", &["-c", "open -k t.qcow2"]),
        ("qemu-io", "vdisk io", &["-c", "open -i native t.qcow2"]),
        (
            "qemu-io",
            "vdisk io",
            &["-c", "open -i native -t none t.qcow2"],
        ),
        (
            "qemu-io",
            "vdisk io",
            &["-i", "native", "-t", "none", "-c", "quit", "t.qcow2"],
        ),
        (
            "qemu-io",
            "vdisk io",
            &["-i", "io_uring", "-c", "quit", "t.qcow2"],
        ),
        (
            "qemu-img",
            "vdisk bench",
            &["bench", "-i", "foo", "-c", "1", "t.qcow2"],
        ),
        (
            "qemu-img",
            "vdisk bench",
            &["bench", "-i", "native", "-c", "1", "t.qcow2"],
        ),
        (
            "qemu-img",
            "vdisk bench",
            &["bench", "-n", "-c", "1", "t.qcow2"],
        ),
        ("qemu-nbd", "vdisk serve", &["--aio=native", "t.qcow2"]),
    ];
    for (q, v, args) in cases {
        // `vdisk bench` is the subcommand itself; qemu-img takes it as its first word.
        let vargs: Vec<&str> = if *v == "vdisk bench" {
            args[1..].to_vec()
        } else {
            args.to_vec()
        };
        let want = run(dir, q, args);
        let got = run(dir, v, &vargs);
        assert_eq!(got, want, "{v} {vargs:?} against {q} {args:?}");
    }
}

/// How many io_uring instances process `pid` holds.
fn rings(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|it| {
            it.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy() == "anon_inode:[io_uring]")
                .count()
        })
        .unwrap_or(0)
}

/// Waits (bounded) until `child` has opened `files` host files' worth of descriptors
/// and returns its ring count then; kills it afterwards.
fn rings_of(mut child: Child, expect_at_least: usize) -> usize {
    let pid = child.id();
    let start = Instant::now();
    let mut n = rings(pid);
    while n < expect_at_least && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
        n = rings(pid);
    }
    // Give a tool that opens more files than expected the chance to show them.
    std::thread::sleep(Duration::from_millis(200));
    n = n.max(rings(pid));
    let _ = child.kill();
    let _ = child.wait();
    n
}

fn spawn_io(dir: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .arg("io")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vdisk io")
}

#[test]
fn io_uring_is_used_by_every_file_of_the_chain() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-f", "qcow2", "base.qcow2", "4M"]),
        "create base",
    );
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        ),
        "create top",
    );
    let sleep = ["-c", "sleep 30000"];
    // Without -i: no ring at all.
    let n = rings_of(spawn_io(dir, &[&sleep[..], &["top.qcow2"]].concat()), 0);
    assert_eq!(n, 0, "threads is the default");
    // -i io_uring: the top's file and the backing file each have one.
    let n = rings_of(
        spawn_io(
            dir,
            &[&["-i", "io_uring"][..], &sleep[..], &["top.qcow2"]].concat(),
        ),
        2,
    );
    assert_eq!(n, 2, "-i io_uring on a two-file chain");
    // `open -i io_uring` inside the session.
    let n = rings_of(
        spawn_io(
            dir,
            &["-c", "open -i io_uring top.qcow2", "-c", "sleep 30000"],
        ),
        2,
    );
    assert_eq!(n, 2, "open -i io_uring");
    // A node's own aio key wins over -i.
    let n = rings_of(
        spawn_io(
            dir,
            &[
                "-i",
                "io_uring",
                "--image-opts",
                "-c",
                "sleep 30000",
                "driver=qcow2,file.driver=file,file.filename=base.qcow2,file.aio=threads",
            ],
        ),
        0,
    );
    assert_eq!(n, 0, "file.aio=threads over -i io_uring");
    // vdisk serve --aio=io_uring.
    let sock = dir.join("s.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["serve", "--aio=io_uring", "-k"])
        .arg(&sock)
        .arg("top.qcow2")
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vdisk serve");
    assert_eq!(rings_of(child, 2), 2, "serve --aio=io_uring");
}

#[test]
fn writes_through_io_uring_match_qemu_io() {
    let d = tmp();
    let dir = d.path();
    for f in ["q.qcow2", "v.qcow2"] {
        ok(qemu_img(dir, &["create", "-f", "qcow2", f, "8M"]), "create");
    }
    let cmds = [
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 3k",
        "write -z 1M 64k",
        "writev -P 0x33 2M 4k 8k 512",
        "aio_write -P 0x44 3M 128k",
        "aio_flush",
        "discard 0 32k",
        "flush",
    ];
    for (tool, file) in [("qemu-io", "q.qcow2"), ("vdisk io", "v.qcow2")] {
        let mut args = vec!["-i", "io_uring", "-t", "none"];
        for c in &cmds {
            args.extend(["-c", c]);
        }
        args.push(file);
        let (code, err) = run(dir, tool, &args);
        assert_eq!((code, err.as_str()), (0, ""), "{tool}");
    }
    ok(qemu_img(dir, &["check", "v.qcow2"]), "check");
    ok(qemu_img(dir, &["compare", "q.qcow2", "v.qcow2"]), "compare");
}
