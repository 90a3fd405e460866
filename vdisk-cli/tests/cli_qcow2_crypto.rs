//! Encrypted qcow2 (`encrypt.format=luks`, legacy AES) against qemu-img / qemu-io 10:
//! images either side makes open on the other with the same passphrase and read
//! bit-exact; random write scripts give the same plaintext; `qemu-img check` passes on
//! images written here; `info`, `map` are identical; chains whose layers have different
//! keys; compression refused as qemu does. PBKDF2 runs with `iter-time=10`.

mod cli_support;
use cli_support::*;
use std::path::Path;

const SA: &str = "secret,id=sa,data=alpha key";
const SB: &str = "secret,id=sb,data=bravo key";

fn luks_opts(extra: &str) -> String {
    let base = "encrypt.format=luks,encrypt.key-secret=sa,encrypt.iter-time=10";
    if extra.is_empty() {
        base.into()
    } else {
        format!("{base},{extra}")
    }
}

fn spec(file: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret=sa")
}

fn stable(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains("\"actual-size\"") && !l.contains("disk size:"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn run_io(tool: &str, dir: &Path, s: &str, cmds: &[&str]) -> String {
    let mut a: Vec<&str> = Vec::new();
    if tool == "vdisk" {
        a.push("io");
    }
    a.extend(["--object", SA, "--object", SB, "--image-opts", s]);
    for c in cmds {
        a.extend(["-c", c]);
    }
    let r = if tool == "vdisk" {
        vdisk(dir, &a)
    } else {
        qemu_io_run(dir, &a)
    };
    assert!(
        r.code == 0 && !r.out.contains("fail") && !r.out.contains("mismatch") && r.err.is_empty(),
        "{tool} {cmds:?}: {}{}",
        r.out,
        r.err
    );
    r.out
}

fn plaintext(tool: &str, dir: &Path, s: &str, out: &str) -> Vec<u8> {
    let a = [
        "convert",
        "--object",
        SA,
        "--object",
        SB,
        "--image-opts",
        s,
        "-O",
        "raw",
        out,
    ];
    let r = if tool == "vdisk" {
        vdisk(dir, &a[..])
    } else {
        qemu_img(dir, &a[..])
    };
    ok(r, "convert");
    std::fs::read(p(dir, out)).unwrap()
}

fn check_clean(dir: &Path, s: &str) {
    let q = qemu_img(
        dir,
        &["check", "--object", SA, "--object", SB, "--image-opts", s],
    );
    assert_eq!(q.code, 0, "qemu-img check: {}{}", q.out, q.err);
    assert!(q.out.contains("No errors were found"), "{}", q.out);
    let v = vdisk(
        dir,
        &["check", "--object", SA, "--object", SB, "--image-opts", s],
    );
    assert_eq!(v.code, 0, "vdisk check: {}{}", v.out, v.err);
    assert_eq!(v.out, q.out);
}

const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1000 3000",
    "write -P 0x33 130000 70000",
    "write -z 300k 8k",
    "write -P 0x44 65535 2",
    "write -P 0x55 1M 512",
    "write -z -u 1M 64k",
];
const READS: &[&str] = &[
    "read -P 0x11 0 1000",
    "read -P 0x22 1000 3000",
    "read -P 0x11 4000 61535",
    "read -P 0x44 65535 2",
    "read -P 0x33 130000 70000",
    "read -P 0 300k 8k",
    "read -P 0 1M 64k",
];

const COMBOS: &[&str] = &[
    "",
    "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,cluster_size=4k",
    "encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha1,cluster_size=512",
    "encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha512,cluster_size=2M",
];

#[test]
fn qemu_images_open_here_bit_exact() {
    let d = tmp();
    let dir = d.path();
    for (i, c) in COMBOS.iter().enumerate() {
        let f = format!("q{i}.qcow2");
        ok(
            qemu_img(
                dir,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "--object",
                    SA,
                    "-o",
                    &luks_opts(c),
                    &f,
                    "2M",
                ],
            ),
            "qemu-img create",
        );
        let s = spec(&f);
        run_io("qemu-io", dir, &s, WRITES);
        run_io("vdisk", dir, &s, READS);
        assert!(
            plaintext("vdisk", dir, &s, "v.raw") == plaintext("qemu", dir, &s, "q.raw"),
            "{c}"
        );
        for out in ["human", "json"] {
            let o = format!("--output={out}");
            let q = ok(qemu_img(dir, &["info", &o, &f]), "qemu-img info");
            let v = ok(vdisk(dir, &["info", &o, &f]), "vdisk info");
            assert_eq!(stable(&v), stable(&q), "info {c}");
            // Human map refuses encrypted clusters in both.
            let m = ["map", &o, "--object", SA, "--image-opts", &s];
            let (v, q) = (vdisk(dir, &m), qemu_img(dir, &m));
            assert_eq!((v.code, v.out), (q.code, q.out), "map {c}");
            assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err);
        }
        check_clean(dir, &s);
    }
}

#[test]
fn images_made_here_open_in_qemu_and_check_clean() {
    let d = tmp();
    let dir = d.path();
    for (i, c) in COMBOS.iter().enumerate() {
        let f = format!("v{i}.qcow2");
        let q = qemu_img(
            dir,
            &[
                "create",
                "-f",
                "qcow2",
                "--object",
                SA,
                "-o",
                &luks_opts(c),
                "x.qcow2",
                "2M",
            ],
        );
        let v = vdisk(
            dir,
            &[
                "create",
                "-f",
                "qcow2",
                "--object",
                SA,
                "-o",
                &luks_opts(c),
                &f,
                "2M",
            ],
        );
        assert_eq!(v.out.replace(&f, "x.qcow2"), q.out);
        let s = spec(&f);
        check_clean(dir, &s);
        run_io("vdisk", dir, &s, WRITES);
        run_io("qemu-io", dir, &s, READS);
        check_clean(dir, &s);
        // The same script in qemu on its own image gives the same plaintext.
        let sx = spec("x.qcow2");
        run_io("qemu-io", dir, &sx, WRITES);
        assert!(
            plaintext("qemu", dir, &s, "a.raw") == plaintext("qemu", dir, &sx, "b.raw"),
            "{c}"
        );
        let q = ok(qemu_img(dir, &["info", &f]), "qemu-img info");
        assert!(
            q.contains("encrypted: yes") && q.contains("format: luks"),
            "{q}"
        );
    }
}

#[test]
fn chains_with_different_keys_and_convert_both_ways() {
    let d = tmp();
    let dir = d.path();
    // Base encrypted with key A (by qemu), overlay encrypted with key B (here).
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                SA,
                "-o",
                &luks_opts(""),
                "base.qcow2",
                "1M",
            ],
        ),
        "base",
    );
    run_io("qemu-io", dir, &spec("base.qcow2"), &["write -P 0x61 0 1M"]);
    let o = "encrypt.format=luks,encrypt.key-secret=sb,encrypt.iter-time=10";
    ok(
        vdisk(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                SB,
                "-o",
                o,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        ),
        "overlay",
    );
    let top =
        "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=sb,backing.encrypt.key-secret=sa";
    // Partial-cluster writes copy-on-write from the other key's layer.
    run_io(
        "vdisk",
        dir,
        top,
        &["write -P 0x62 1000 2000", "write -P 0x63 70000 512"],
    );
    let reads = [
        "read -P 0x61 0 1000",
        "read -P 0x62 1000 2000",
        "read -P 0x61 3000 67000",
        "read -P 0x63 70000 512",
        "read -P 0x61 70512 100000",
    ];
    run_io("qemu-io", dir, top, &reads);
    run_io("vdisk", dir, top, &reads);
    check_clean(dir, top);
    assert!(plaintext("vdisk", dir, top, "t1.raw") == plaintext("qemu", dir, top, "t2.raw"));
    // convert in: raw -> encrypted qcow2 here, read by qemu.
    std::fs::write(p(dir, "in.raw"), pattern(3 << 20, 5)).unwrap();
    ok(
        vdisk(
            dir,
            &[
                "convert",
                "--object",
                SA,
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &luks_opts("encrypt.cipher-alg=aes-128"),
                "in.raw",
                "c.qcow2",
            ],
        ),
        "convert in",
    );
    assert!(plaintext("qemu", dir, &spec("c.qcow2"), "c.raw") == pattern(3 << 20, 5));
    check_clean(dir, &spec("c.qcow2"));
    // Compression with encryption is refused, as qemu-img does.
    let v = vdisk(
        dir,
        &[
            "convert",
            "-c",
            "--object",
            SA,
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &luks_opts(""),
            "in.raw",
            "z.qcow2",
        ],
    );
    assert_ne!(v.code, 0);
    assert!(
        v.err
            .contains("Compression and encryption not supported at the same time"),
        "{}",
        v.err
    );
    // Wrong passphrase, and no passphrase.
    let bad = "driver=qcow2,file.filename=c.qcow2,encrypt.key-secret=sb";
    let v = vdisk(
        dir,
        &[
            "io",
            "--object",
            SB,
            "--image-opts",
            bad,
            "-c",
            "read 0 512",
        ],
    );
    assert!(
        v.err
            .contains("Invalid password, cannot unlock any keyslot"),
        "{}",
        v.err
    );
    let v = vdisk(dir, &["io", "-c", "read 0 512", "c.qcow2"]);
    assert!(
        v.err
            .contains("Parameter 'encrypt.key-secret' is required for cipher"),
        "{}",
        v.err
    );
}

#[test]
fn legacy_aes_reads_converts_and_round_trips() {
    let d = tmp();
    let dir = d.path();
    let o = "encrypt.format=aes,encrypt.key-secret=sa";
    ok(
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "--object", SA, "-o", o, "q.qcow2", "2M",
            ],
        ),
        "qemu aes",
    );
    run_io("qemu-io", dir, &spec("q.qcow2"), WRITES);
    run_io("vdisk", dir, &spec("q.qcow2"), READS);
    assert!(
        plaintext("vdisk", dir, &spec("q.qcow2"), "a.raw")
            == plaintext("qemu", dir, &spec("q.qcow2"), "b.raw")
    );
    let q = ok(qemu_img(dir, &["info", "q.qcow2"]), "info");
    assert_eq!(
        stable(&ok(vdisk(dir, &["info", "q.qcow2"]), "info")),
        stable(&q)
    );
    ok(
        vdisk(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                SA,
                "-o",
                "encryption=on,encrypt.key-secret=sa",
                "v.qcow2",
                "2M",
            ],
        ),
        "vdisk aes",
    );
    run_io("vdisk", dir, &spec("v.qcow2"), WRITES);
    run_io("qemu-io", dir, &spec("v.qcow2"), READS);
    check_clean(dir, &spec("v.qcow2"));
}

#[test]
fn serve_exports_the_plaintext() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                SA,
                "-o",
                &luks_opts(""),
                "s.qcow2",
                "1M",
            ],
        ),
        "create",
    );
    run_io(
        "qemu-io",
        dir,
        &spec("s.qcow2"),
        &["write -P 0x7e 4096 64k"],
    );
    let sock = p(dir, "s.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["serve", "--object", SA, "--image-opts", "-k"])
        .arg(&sock)
        .arg(spec("s.qcow2"))
        .current_dir(dir)
        .spawn()
        .expect("start vdisk serve");
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let r = qemu_io_run(
        dir,
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x7e 4096 64k",
            "-c",
            "write -P 0x3c 0 512",
            &uri,
        ],
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(r.code == 0 && !r.out.contains("fail"), "{}{}", r.out, r.err);
    // The write went through the cipher: qemu reads it back with the key.
    run_io(
        "qemu-io",
        dir,
        &spec("s.qcow2"),
        &["read -P 0x3c 0 512", "read -P 0x7e 4096 64k"],
    );
    check_clean(dir, &spec("s.qcow2"));
}
