//! `vdisk io` on `blkdebug:CONFIG:IMAGE` names, as qemu-io (QEMU iotests 026 style):
//! the same config and commands on copies of one qemu-made image print the same
//! lines (timing lines aside), and bad configs are refused with qemu-io's message.

use std::path::Path;
use std::process::{Command, Stdio};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// stdout lines without qemu-io's timing lines, and stderr lines without the
/// program's `prog: ` prefix (qemu-io's is `qemu-io: `, ours `vdisk: `).
fn run(prog: &str, args: &[&str]) -> (Vec<String>, Vec<String>) {
    let o = Command::new("timeout")
        .arg("60")
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"));
    let out = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.contains(" ops; "))
        .map(str::to_string)
        .collect();
    let err = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.contains("can't open"))
        .map(|l| l.split_once(": ").map_or(l, |(_, r)| r).to_string())
        .collect();
    (out, err)
}

fn compare(dir: &Path, config: &str, cmds: &[&str]) {
    let cfg = dir.join("rules.cfg");
    std::fs::write(&cfg, config).unwrap();
    let mut outs = Vec::new();
    for prog in ["qemu-io", VDISK] {
        let img = dir.join(format!("{}.qcow2", outs.len()));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", s(&img), "16M"])
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let name = format!("blkdebug:{}:{}", s(&cfg), s(&img));
        let mut args = Vec::new();
        if prog == VDISK {
            args.push("io");
        }
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(&name);
        let (out, err) = run(prog, &args);
        outs.push((
            out,
            err.into_iter()
                .map(|l| l.replace(&name, "NAME"))
                .collect::<Vec<_>>(),
        ));
    }
    assert_eq!(
        outs[0], outs[1],
        "qemu-io vs vdisk io on {config:?} {cmds:?}"
    );
}

#[test]
fn io_through_blkdebug_prints_what_qemu_io_prints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rw = ["write -P 1 0 64k", "write -P 2 64k 64k", "read -P 1 0 64k"];
    for errno in ["5", "28"] {
        for once in ["on", "off"] {
            let cfg = format!(
                "[inject-error]\nevent = \"write_aio\"\nerrno = \"{errno}\"\nonce = \"{once}\"\n"
            );
            compare(d, &cfg, &rw);
            let cfg = format!(
                "[inject-error]\nevent = \"read_aio\"\nerrno = \"{errno}\"\nonce = \"{once}\"\nimmediately = \"on\"\n"
            );
            compare(
                d,
                &cfg,
                &["write -P 1 0 64k", "read -P 1 0 64k", "read -P 1 0 64k"],
            );
        }
    }
    // States: the second data write fails, once.
    compare(
        d,
        "[set-state]\nevent = \"write_aio\"\nstate = \"1\"\nnew_state = \"2\"\n\n[inject-error]\nevent = \"write_aio\"\nstate = \"2\"\nonce = \"on\"\n",
        &["write -P 1 0 64k", "write -P 2 1M 64k", "write -P 3 2M 64k", "read -P 1 0 64k"],
    );
    // Sector: only requests touching sector 128 (64 KiB) fail.
    compare(
        d,
        "[inject-error]\nevent = \"read_aio\"\nsector = \"128\"\n",
        &[
            "write -P 1 0 128k",
            "read 0 4k",
            "read 64k 4k",
            "read 0 4k",
            "read 60k 8k",
        ],
    );
}

#[test]
fn bad_blkdebug_configs_are_refused_as_qemu_io_does() {
    let dir = tempfile::tempdir().unwrap();
    for cfg in [
        "event = \"l2_load\"\n",
        "[inject-error]\nevent = l2_load\n",
        "[inject-error]\nerrno = \"5\"\n",
        "[bogus]\nevent = \"l2_load\"\n",
        "[inject-error]\nevent = \"l2_load\"\nfoo = \"1\"\n",
        "[inject-error]\nevent = \"l2_load\"\nonce = \"maybe\"\n",
        "[inject-error]\nevent = \"l2_load\"\nerrno = \"x\"\n",
        "[inject-error]\nevent = \"no_such_event\"\n",
    ] {
        compare(dir.path(), cfg, &["read 0 512"]);
    }
}
