//! Image names in every form: `--image-opts` key=value lists, `json:{…}` names (as the
//! image and as backing files written by vdisk and by qemu-img), protocol URLs whose
//! client is not built, and malformed names — compared with qemu-img where it answers
//! the same question.

mod cli_support;
use cli_support::*;
use std::path::Path;

/// A qcow2 image `x.qcow2` (1 MiB) with 64 KiB of 0xab at 0.
fn image(dir: &Path) {
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "x.qcow2", "1M"]),
        "create",
    );
    qemu_io(dir, "qcow2", "x.qcow2", &["write -P 0xab 0 64k"]);
}

/// qemu-img's message with its program name replaced by ours.
fn as_vdisk(qemu_err: &str) -> String {
    qemu_err.replace("qemu-img:", "vdisk:")
}

#[test]
fn image_opts_equal_the_plain_name() {
    let d = tmp();
    image(d.path());
    let opts = "driver=qcow2,file.driver=file,file.filename=x.qcow2";
    for out in ["human", "json"] {
        let o = format!("--output={out}");
        let plain = ok(vdisk(d.path(), &["info", &o, "x.qcow2"]), "info");
        let kv = ok(
            vdisk(d.path(), &["info", &o, "--image-opts", opts]),
            "info --image-opts",
        );
        assert_eq!(plain, kv);
        let q = ok(
            qemu_img(d.path(), &["info", &o, "--image-opts", opts]),
            "qemu-img info --image-opts",
        );
        assert_eq!(kv, q);
    }
    let plain = vdisk(d.path(), &["check", "x.qcow2"]);
    let kv = vdisk(d.path(), &["check", "--image-opts", opts]);
    assert_eq!((plain.code, &plain.out), (kv.code, &kv.out));
    assert_eq!(kv.code, 0, "{}", kv.err);
    let plain = ok(vdisk(d.path(), &["map", "--output=json", "x.qcow2"]), "map");
    let kv = ok(
        vdisk(d.path(), &["map", "--output=json", "--image-opts", opts]),
        "map --image-opts",
    );
    assert_eq!(plain, kv);
    // Without a driver the format is probed; options reach the file protocol.
    ok(
        vdisk(
            d.path(),
            &[
                "io",
                "--image-opts",
                "-c",
                "read -P 0xab 0 64k",
                "file.filename=x.qcow2,file.locking=off,file.aio=threads,cache.direct=on",
            ],
        ),
        "io --image-opts",
    );
    let r = vdisk(
        d.path(),
        &[
            "io",
            "--image-opts",
            "-c",
            "write -P 0xcd 0 4k",
            "driver=qcow2,file.filename=x.qcow2,l2-cache-size=1M",
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    qemu_io(d.path(), "qcow2", "x.qcow2", &["read -P 0xcd 0 4k"]);
    let r = vdisk(d.path(), &["info", "--image-opts", "-f", "qcow2", opts]);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.err,
        "vdisk: --image-opts and --format are mutually exclusive\n"
    );
}

#[test]
fn image_opts_errors_read_like_qemu() {
    let d = tmp();
    image(d.path());
    for opts in [
        "driver=qcow2,file.filename=x.qcow2,bogus=1",
        "driver=qcow2,file.filename=x.qcow2,file.bogus=1",
        "driver=qcow3,file.filename=x.qcow2",
        "driver=qcow2,filename=x.qcow2",
        "filename=x.qcow2",
        "x.qcow2",
        "driver=raw,file.filename=x.qcow2,l2-cache-size=1M",
        "driver=qcow2,file.filename=a,,b",
    ] {
        let q = qemu_img(d.path(), &["info", "--image-opts", opts]);
        let v = vdisk(d.path(), &["info", "--image-opts", opts]);
        assert_eq!(q.code, 1, "{opts}");
        assert_eq!(v.code, 1, "{opts}");
        assert_eq!(v.err, as_vdisk(&q.err), "{opts}");
    }
    let v = vdisk(
        d.path(),
        &["info", "--image-opts", "driver=qcow2,driver=raw"],
    );
    assert!(v.err.contains("duplicate key 'driver'"), "{}", v.err);
}

#[test]
fn json_names_open_like_the_plain_name() {
    let d = tmp();
    image(d.path());
    let j = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"x.qcow2"}}"#;
    let flat = r#"json:{"driver":"qcow2","file.filename":"x.qcow2"}"#;
    for name in [j, flat] {
        for out in ["human", "json"] {
            let o = format!("--output={out}");
            let q = ok(qemu_img(d.path(), &["info", &o, name]), "qemu-img info");
            let v = ok(vdisk(d.path(), &["info", &o, name]), "info");
            assert_eq!(v, q, "{name}");
        }
        ok(
            vdisk(d.path(), &["io", "-c", "read -P 0xab 0 64k", name]),
            "io",
        );
        ok(vdisk(d.path(), &["compare", name, "x.qcow2"]), "compare");
    }
    for (name, qemu_too) in [
        (
            r#"json:{"driver":"qcow2","file":{"filename":"x.qcow2"}"#,
            false,
        ),
        (r#"json:{"driver":"qcow2","driver":"raw"}"#, false),
        ("json:[1]", true),
        ("file:", true),
        ("foo:bar", true),
    ] {
        let v = vdisk(d.path(), &["info", name]);
        assert_eq!(v.code, 1, "{name}");
        assert!(v
            .err
            .starts_with(&format!("vdisk: Could not open '{name}': ")));
        if qemu_too {
            let q = qemu_img(d.path(), &["info", name]);
            assert_eq!(v.err, as_vdisk(&q.err), "{name}");
        }
    }
}

#[test]
fn json_backing_files_written_by_vdisk_and_by_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]),
        "base",
    );
    qemu_io(dir, "qcow2", "base.qcow2", &["write -P 0xcd 0 64k"]);
    let j = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}"#;
    // Written by vdisk rebase -u, read by both.
    qemu_overlay(dir, "qcow2", "base.qcow2", "qcow2", "top.qcow2");
    ok(
        vdisk(dir, &["rebase", "-u", "-b", j, "-F", "qcow2", "top.qcow2"]),
        "rebase -u",
    );
    let info = ok(qemu_img(dir, &["info", "top.qcow2"]), "qemu-img info");
    assert!(info.contains(&format!("backing file: {}", &j)), "{info}");
    qemu_io(dir, "qcow2", "top.qcow2", &["read -P 0xcd 0 64k"]);
    ok(
        vdisk(dir, &["io", "-c", "read -P 0xcd 0 64k", "top.qcow2"]),
        "io through json backing",
    );
    let q = ok(
        qemu_img(dir, &["info", "--backing-chain", "top.qcow2"]),
        "qemu-img info -b",
    );
    let v = ok(
        vdisk(dir, &["info", "--backing-chain", "top.qcow2"]),
        "info -b",
    );
    assert_eq!(v, q);
    for args in [
        &["map", "top.qcow2"][..],
        &["map", "--output=json", "top.qcow2"],
    ] {
        assert_eq!(
            ok(vdisk(dir, args), "map"),
            ok(qemu_img(dir, args), "qemu-img map")
        );
    }
    // Created by qemu-img with a json backing, read by vdisk.
    qemu_overlay(dir, "qcow2", j, "qcow2", "top2.qcow2");
    ok(
        vdisk(dir, &["io", "-c", "read -P 0xcd 0 64k", "top2.qcow2"]),
        "io",
    );
    ok(vdisk(dir, &["check", "top2.qcow2"]), "check");
    ok(
        vdisk(dir, &["compare", "top2.qcow2", "base.qcow2"]),
        "compare",
    );
    // Created by vdisk with a json backing, read by qemu.
    let create = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        j,
        "-F",
        "qcow2",
        "top3.qcow2",
    ];
    ok(vdisk(dir, &create), "vdisk create -b json");
    qemu_io(dir, "qcow2", "top3.qcow2", &["read -P 0xcd 0 64k"]);
    ok(qemu_img(dir, &["check", "top3.qcow2"]), "qemu-img check");
    // The file names inside a json backing are relative to the working directory, as
    // in QEMU: from elsewhere both fail the same way.
    let up = dir.parent().unwrap_or(dir);
    let rel = format!("{}/top2.qcow2", dir.file_name().unwrap().to_str().unwrap());
    let v = vdisk(up, &["io", "-c", "read 0 1", &rel]);
    let q = qemu_io_run(up, &["-c", "read 0 1", &rel]);
    assert_eq!(v.code, 1);
    assert_eq!(v.err, q.err.replace("qemu-io:", "vdisk:"));
}

#[test]
fn json_backing_options_override_and_disable_the_header() {
    let d = tmp();
    let dir = d.path();
    for (name, pat) in [("a.qcow2", "0x11"), ("b.qcow2", "0x22")] {
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", name, "1M"]),
            "base",
        );
        qemu_io(dir, "qcow2", name, &[&format!("write -P {pat} 0 64k")]);
    }
    qemu_overlay(dir, "qcow2", "a.qcow2", "qcow2", "top.qcow2");
    for (name, pat) in [
        ("top.qcow2", "0x11"),
        (
            r#"json:{"driver":"qcow2","file":{"filename":"top.qcow2"},"backing":{"driver":"qcow2","file":{"filename":"b.qcow2"}}}"#,
            "0x22",
        ),
        (
            r#"json:{"driver":"qcow2","file":{"filename":"top.qcow2"},"backing":null}"#,
            "0",
        ),
    ] {
        ok(
            vdisk(
                dir,
                &["io", "-r", "-c", &format!("read -P {pat} 0 64k"), name],
            ),
            name,
        );
        let q = qemu_io_run(dir, &["-r", "-c", &format!("read -P {pat} 0 64k"), name]);
        assert!(!q.out.contains("Pattern verification failed"), "{name}");
    }
    // A json backing naming the image itself is a loop.
    ok(
        vdisk(
            dir,
            &[
                "rebase",
                "-u",
                "-b",
                r#"json:{"driver":"qcow2","file":{"filename":"top.qcow2"}}"#,
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        ),
        "rebase -u",
    );
    let r = vdisk(dir, &["io", "-r", "-c", "read 0 1", "top.qcow2"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("its own backing file"), "{}", r.err);
}

#[test]
fn network_protocols_without_a_server_fail_naming_the_reason() {
    let d = tmp();
    image(d.path());
    for (name, why) in [
        ("nbd://127.0.0.1:1/x", "Failed to connect to '127.0.0.1:1'"),
        ("nbd+tcp://[::1]:1/x", "Failed to connect to '::1:1'"),
        (
            "nbd+unix:///x?socket=/nonexistent",
            "Failed to connect to '/nonexistent'",
        ),
        (
            "nbd:unix:/nonexistent:exportname=x",
            "Failed to connect to '/nonexistent'",
        ),
        // Opened read-write (io), the refusal comes first.
        ("http://127.0.0.1:1/a.img", "http://127.0.0.1:1/a.img"),
        // Opened read-write (io), the refusal comes first.
        ("https://127.0.0.1:1/a.img", "https://127.0.0.1:1/a.img"),
        (
            r#"json:{"driver":"qcow2","file":{"driver":"nbd","server":{"type":"inet","host":"127.0.0.1","port":"1"}}}"#,
            "Failed to connect to '127.0.0.1:1'",
        ),
    ] {
        for cmd in [&["info"][..], &["io", "-c", "read 0 1"], &["check"]] {
            let mut args = cmd.to_vec();
            args.push(name);
            let r = vdisk(d.path(), &args);
            assert_eq!(r.code, 1, "{args:?}");
            assert!(r.err.contains(why), "{args:?}: {}", r.err);
        }
    }
    // Malformed URLs are reported as such, before the protocol is looked for.
    for bad in ["nbd+unix:///x", "nbd://localhost:99999/x", "nbd:localhost"] {
        let r = vdisk(d.path(), &["info", bad]);
        assert_eq!(r.code, 1);
        assert!(r.err.contains("No valid URL specified"), "{bad}: {}", r.err);
    }
    // As a backing file too.
    ok(
        vdisk(
            d.path(),
            &[
                "rebase",
                "-u",
                "-b",
                "nbd://127.0.0.1:1/x",
                "-F",
                "raw",
                "x.qcow2",
            ],
        ),
        "rebase -u",
    );
    let r = vdisk(d.path(), &["io", "-c", "read 0 1", "x.qcow2"]);
    assert_eq!(r.code, 1);
    assert!(
        r.err
            .contains("Could not open backing file: Failed to connect to '127.0.0.1:1'"),
        "{}",
        r.err
    );
}

#[test]
fn image_opts_rebase_resolves_the_new_backing_next_to_the_image() {
    let d = tmp();
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    for name in ["a.qcow2", "b.qcow2"] {
        ok(
            qemu_img(&sub, &["create", "-q", "-f", "qcow2", name, "1M"]),
            "base",
        );
    }
    qemu_io(&sub, "qcow2", "b.qcow2", &["write -P 0x33 0 64k"]);
    qemu_overlay(&sub, "qcow2", "a.qcow2", "qcow2", "top.qcow2");
    let opts = "driver=qcow2,file.filename=sub/top.qcow2";
    ok(
        vdisk(
            d.path(),
            &[
                "rebase",
                "--image-opts",
                "-b",
                "b.qcow2",
                "-F",
                "qcow2",
                opts,
            ],
        ),
        "rebase --image-opts",
    );
    // A safe rebase keeps what the guest sees: b's data was found (next to the
    // image, not in the working directory) and masked in the overlay.
    qemu_io(&sub, "qcow2", "top.qcow2", &["read -P 0 0 64k"]);
    let info = ok(qemu_img(&sub, &["info", "top.qcow2"]), "info");
    assert!(info.contains("backing file: b.qcow2\n"), "{info}");
}

/// vdisk and qemu-img on the same arguments: same exit code, same stdout, same stderr
/// (program name aside).
fn side_by_side(dir: &Path, args: &[&str]) -> Run {
    let v = vdisk(dir, args);
    let q = qemu_img(dir, args);
    assert_eq!(
        v.code, q.code,
        "{args:?}: vdisk {} / qemu-img {}",
        v.err, q.err
    );
    assert_eq!(v.out, q.out, "{args:?}");
    assert_eq!(v.err, as_vdisk(&q.err), "{args:?}");
    v
}

#[test]
fn convert_target_image_opts_like_qemu_img() {
    let d = tmp();
    image(d.path());
    let target = "driver=qcow2,file.driver=file,file.filename=t.qcow2";
    // Refused before anything is opened, in qemu-img's order and words.
    side_by_side(
        d.path(),
        &["convert", "--target-image-opts", "x.qcow2", target],
    );
    side_by_side(
        d.path(),
        &["convert", "--target-image-opts", "-n", "x.qcow2"],
    );
    side_by_side(
        d.path(),
        &[
            "convert",
            "-n",
            "-o",
            "cluster_size=4k",
            "x.qcow2",
            "t.qcow2",
        ],
    );
    side_by_side(
        d.path(),
        &[
            "convert",
            "--target-image-opts",
            "-n",
            "-O",
            "qcow2",
            "x.qcow2",
            target,
        ],
    );
    side_by_side(
        d.path(),
        &[
            "convert",
            "--target-image-opts",
            "-n",
            "x.qcow2",
            "driver=qcow2,file.filename=nope",
        ],
    );
    ok(
        qemu_img(
            d.path(),
            &["create", "-q", "-f", "raw", "small.raw", "512k"],
        ),
        "create",
    );
    side_by_side(
        d.path(),
        &["convert", "-n", "-O", "raw", "x.qcow2", "small.raw"],
    );
    // Into an existing image named by options.
    ok(
        qemu_img(d.path(), &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"]),
        "create",
    );
    ok(
        vdisk(
            d.path(),
            &["convert", "--target-image-opts", "-n", "x.qcow2", target],
        ),
        "convert --target-image-opts",
    );
    ok(
        qemu_img(d.path(), &["compare", "x.qcow2", "t.qcow2"]),
        "compare",
    );
    ok(qemu_img(d.path(), &["check", "t.qcow2"]), "check");
}

#[test]
fn file_protocol_options_like_qemu_img() {
    let d = tmp();
    image(d.path());
    let base = "driver=qcow2,file.driver=file,file.filename=x.qcow2";
    for extra in [
        "file.aio=threads",
        "file.aio=io_uring",
        "file.aio=native,cache.direct=on",
        "file.aio=native",
        "file.aio=bogus",
        "file.locking=auto",
        "file.locking=maybe",
        "discard=unmap",
        "discard=off",
        "discard=bogus",
        "detect-zeroes=unmap",
        "detect-zeroes=unmap,discard=ignore",
        "detect-zeroes=bogus",
    ] {
        let opts = format!("{base},{extra}");
        side_by_side(d.path(), &["info", "--image-opts", &opts]);
    }
    // A bare protocol node is its own image: qemu-img shows the protocol as the format.
    for out in ["--output=human", "--output=json"] {
        side_by_side(
            d.path(),
            &["info", out, "--image-opts", "driver=file,filename=x.qcow2"],
        );
    }
    // host_device wants a device, and reads one.
    side_by_side(
        d.path(),
        &[
            "info",
            "--image-opts",
            "driver=host_device,filename=x.qcow2",
        ],
    );
    side_by_side(
        d.path(),
        &[
            "info",
            "--output=json",
            "--image-opts",
            "driver=raw,file.driver=host_device,file.filename=/dev/null",
        ],
    );
}

#[test]
fn discard_ignore_keeps_clusters_like_qemu_io() {
    let d = tmp();
    image(d.path());
    for (name, opts) in [("v", "discard=ignore"), ("u", "discard=unmap")] {
        for tool in ["vdisk", "qemu"] {
            let f = format!("{name}-{tool}.qcow2");
            std::fs::copy(d.path().join("x.qcow2"), d.path().join(&f)).unwrap();
            let spec = format!("driver=qcow2,file.filename={f},{opts}");
            let cmds = ["-c", "discard 0 64k", "-c", "write -z -u 0 64k"];
            let r = if tool == "vdisk" {
                let mut a = vec!["io", "--image-opts"];
                a.extend(cmds);
                a.push(&spec);
                vdisk(d.path(), &a)
            } else {
                let mut a = vec!["--image-opts"];
                a.extend(cmds);
                a.push(&spec);
                qemu_io_run(d.path(), &a)
            };
            assert_eq!(r.code, 0, "{tool} {opts}: {}", r.err);
        }
        let v = ok(
            qemu_img(
                d.path(),
                &["map", "--output=json", &format!("{name}-vdisk.qcow2")],
            ),
            "map",
        );
        let q = ok(
            qemu_img(
                d.path(),
                &["map", "--output=json", &format!("{name}-qemu.qcow2")],
            ),
            "map",
        );
        assert_eq!(v, q, "{opts}");
        ok(
            qemu_img(d.path(), &["check", &format!("{name}-vdisk.qcow2")]),
            "check",
        );
    }
}
