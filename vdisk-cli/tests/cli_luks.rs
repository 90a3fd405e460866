//! Raw LUKS volumes (`-f luks`) against qemu-img / qemu-io 10: volumes either side
//! makes open on the other with the same passphrase and read bit-exact, `info` is
//! identical, wrong passphrases are refused without writing, hostile headers fail fast.
//! PBKDF2 runs with `iter-time=10` to keep the tests quick.

mod cli_support;
use cli_support::*;
use std::path::Path;

const SECRET: &str = "secret,id=s0,data=correct horse";
const WRONG: &str = "secret,id=s0,data=wrong horse";

/// The option combinations qemu-img's luks driver creates (cipher, mode, ivgen, hash).
const COMBOS: &[&str] = &[
    "",
    "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha1",
    "cipher-alg=aes-192,cipher-mode=xts,ivgen-alg=essiv,hash-alg=sha512",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha256",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=essiv,hash-alg=sha512",
];

/// The other ciphers qemu-img 10 creates (serpent, twofish, cast5, and the ecb/ctr
/// modes), each mode and IV generator at least once. 192-bit keys only with XTS:
/// qemu-img aborts on 24-byte keys in the other modes.
const OTHER_CIPHERS: &[&str] = &[
    "cipher-alg=serpent-128",
    "cipher-alg=serpent-192,ivgen-alg=plain,hash-alg=sha1",
    "cipher-alg=serpent-256,cipher-mode=cbc,ivgen-alg=essiv",
    "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "cipher-alg=serpent-256,cipher-mode=ecb",
    "cipher-alg=serpent-128,cipher-mode=ctr,ivgen-alg=plain64",
    "cipher-alg=twofish-128,hash-alg=sha512",
    "cipher-alg=twofish-192",
    "cipher-alg=twofish-256,cipher-mode=cbc,ivgen-alg=plain",
    "cipher-alg=twofish-128,cipher-mode=ctr,ivgen-alg=essiv",
    "cipher-alg=twofish-256,cipher-mode=ecb",
    "cipher-alg=cast5-128,cipher-mode=cbc",
    "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=plain",
    "cipher-alg=cast5-128,cipher-mode=ecb",
    "cipher-alg=cast5-128,cipher-mode=ctr",
    "cipher-alg=aes-128,cipher-mode=ecb",
    "cipher-alg=aes-256,cipher-mode=ctr,ivgen-alg=essiv",
];

fn opts(extra: &str) -> String {
    if extra.is_empty() {
        "key-secret=s0,iter-time=10".into()
    } else {
        format!("key-secret=s0,iter-time=10,{extra}")
    }
}

fn spec(file: &str) -> String {
    format!("driver=luks,file.filename={file},key-secret=s0")
}

/// Drops what depends on host allocation.
fn stable(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains("\"actual-size\"") && !l.contains("disk size:"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn create_qemu(dir: &Path, file: &str, extra: &str, size: &str) {
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                SECRET,
                "-o",
                &opts(extra),
                file,
                size,
            ],
        ),
        "qemu-img create",
    );
}

fn create_vdisk(dir: &Path, file: &str, extra: &str, size: &str) {
    ok(
        vdisk(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                SECRET,
                "-o",
                &opts(extra),
                file,
                size,
            ],
        ),
        "vdisk create",
    );
}

fn qio(dir: &Path, file: &str, cmds: &[&str]) -> String {
    let s = spec(file);
    let mut a = vec!["--object", SECRET, "--image-opts", s.as_str()];
    for c in cmds {
        a.extend(["-c", c]);
    }
    let r = qemu_io_run(dir, &a);
    assert!(
        r.code == 0 && !r.out.contains("fail") && !r.out.contains("mismatch"),
        "qemu-io {cmds:?}: {}{}",
        r.out,
        r.err
    );
    r.out
}

fn vio(dir: &Path, file: &str, cmds: &[&str]) -> String {
    let s = spec(file);
    let mut a = vec!["io", "--object", SECRET, "--image-opts", s.as_str()];
    for c in cmds {
        a.extend(["-c", c]);
    }
    let r = vdisk(dir, &a);
    assert!(
        r.code == 0 && !r.out.contains("fail") && !r.out.contains("mismatch"),
        "vdisk io {cmds:?}: {}{}",
        r.out,
        r.err
    );
    r.out
}

/// Both tools convert the volume to raw; the plaintexts must be identical.
fn same_plaintext(dir: &Path, file: &str) {
    let s = spec(file);
    let args = |out: &str| {
        vec![
            "convert".to_string(),
            "--object".into(),
            SECRET.into(),
            "--image-opts".into(),
            s.clone(),
            "-O".into(),
            "raw".into(),
            out.to_string(),
        ]
    };
    let a: Vec<String> = args("v.raw");
    ok(
        vdisk(dir, &a.iter().map(String::as_str).collect::<Vec<_>>()),
        "vdisk convert",
    );
    let a: Vec<String> = args("q.raw");
    ok(
        qemu_img(dir, &a.iter().map(String::as_str).collect::<Vec<_>>()),
        "qemu-img convert",
    );
    let v = std::fs::read(p(dir, "v.raw")).unwrap();
    let q = std::fs::read(p(dir, "q.raw")).unwrap();
    assert!(v == q, "plaintext of {file} differs");
}

const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1000 3000",
    "write -P 0x33 1048064 1024",
    "write -z 200k 8k",
    "write -P 0x44 4095 1",
];
const READS: &[&str] = &[
    "read -P 0x11 0 1000",
    "read -P 0x22 1000 3000",
    "read -P 0x11 4000 95",
    "read -P 0x44 4095 1",
    "read -P 0x33 1048064 1024",
    "read -P 0 200k 8k",
];

#[test]
fn qemu_volumes_open_here_bit_exact() {
    let d = tmp();
    let dir = d.path();
    for (i, c) in COMBOS.iter().enumerate() {
        let f = format!("q{i}.luks");
        create_qemu(dir, &f, c, "2M");
        qio(dir, &f, WRITES);
        vio(dir, &f, READS);
        same_plaintext(dir, &f);
        for out in ["human", "json"] {
            let o = format!("--output={out}");
            let q = ok(qemu_img(dir, &["info", &o, &f]), "qemu-img info");
            let v = ok(vdisk(dir, &["info", &o, &f]), "vdisk info");
            assert_eq!(stable(&v), stable(&q), "info {c}");
        }
    }
}

#[test]
fn volumes_made_here_open_in_qemu() {
    let d = tmp();
    let dir = d.path();
    for (i, c) in COMBOS.iter().enumerate() {
        let f = format!("v{i}.luks");
        create_vdisk(dir, &f, c, "2M");
        vio(dir, &f, WRITES);
        qio(dir, &f, READS);
        same_plaintext(dir, &f);
        let q = ok(qemu_img(dir, &["info", &f]), "qemu-img info");
        let v = ok(vdisk(dir, &["info", &f]), "vdisk info");
        assert_eq!(stable(&v), stable(&q), "info {c}");
        assert!(q.contains("encrypted: yes"));
    }
}

/// Each other cipher both ways: qemu-made volumes read bit-exact here (and `info`
/// matches), volumes made here read bit-exact in qemu-io.
#[test]
fn other_ciphers_both_ways() {
    let d = tmp();
    let dir = d.path();
    for (i, c) in OTHER_CIPHERS.iter().enumerate() {
        let f = format!("q{i}.luks");
        create_qemu(dir, &f, c, "2M");
        qio(dir, &f, WRITES);
        vio(dir, &f, READS);
        same_plaintext(dir, &f);
        let q = ok(
            qemu_img(dir, &["info", "--output=json", &f]),
            "qemu-img info",
        );
        let v = ok(vdisk(dir, &["info", "--output=json", &f]), "vdisk info");
        assert_eq!(stable(&v), stable(&q), "info {c}");
        // (The reads check every written byte; one convert each way is enough.)
        let f = format!("v{i}.luks");
        create_vdisk(dir, &f, c, "2M");
        vio(dir, &f, WRITES);
        qio(dir, &f, READS);
        let q = ok(qemu_img(dir, &["info", &f]), "qemu-img info");
        let v = ok(vdisk(dir, &["info", &f]), "vdisk info");
        assert_eq!(stable(&v), stable(&q), "info {c}");
    }
}

/// What qemu-img refuses among them, refused the same way (24-byte keys outside XTS
/// abort qemu-img; vdisk refuses them).
#[test]
fn other_cipher_refusals() {
    let d = tmp();
    let dir = d.path();
    for c in [
        "cipher-alg=cast5-128,cipher-mode=xts",
        "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv",
        "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha1",
        "cipher-alg=twofish-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha1",
    ] {
        let a = [
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            &opts(c),
            "x.luks",
            "1M",
        ];
        let q = qemu_img(dir, &a);
        let v = vdisk(dir, &a);
        assert_eq!(q.code, 1, "{c}");
        assert_eq!(
            (v.code, v.err.replace("vdisk", "qemu-img")),
            (q.code, q.err),
            "{c}"
        );
    }
    for c in ["serpent-192", "twofish-192", "aes-192"] {
        let o = opts(&format!("cipher-alg={c},cipher-mode=cbc"));
        let a = [
            "create", "-q", "-f", "luks", "--object", SECRET, "-o", &o, "y.luks", "1M",
        ];
        let v = vdisk(dir, &a);
        assert_eq!(v.code, 1, "{c}");
        assert!(
            v.err.contains("is not whole 512-byte sectors"),
            "{c}: {}",
            v.err
        );
    }
}

#[test]
fn create_wording_and_help_match_qemu() {
    let d = tmp();
    let dir = d.path();
    let q = qemu_img(
        dir,
        &[
            "create",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            &opts("cipher-mode=cbc"),
            "a.luks",
            "1M",
        ],
    );
    let v = vdisk(
        dir,
        &[
            "create",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            &opts("cipher-mode=cbc"),
            "b.luks",
            "1M",
        ],
    );
    assert_eq!(v.out.replace("b.luks", "a.luks"), q.out);
    let q = qemu_img(dir, &["create", "-f", "luks", "-o", "help"]);
    let v = vdisk(dir, &["create", "-f", "luks", "-o", "help"]);
    assert_eq!(v.out, q.out);
    // No key secret: QEMU's message.
    let v = vdisk(dir, &["create", "-q", "-f", "luks", "c.luks", "1M"]);
    assert_eq!(v.code, 1);
    assert!(
        v.err
            .contains("Parameter 'key-secret' is required for cipher"),
        "{}",
        v.err
    );
    assert!(!p(dir, "c.luks").exists());
    // A secret that is not defined.
    let v = vdisk(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "-o",
            "key-secret=nope",
            "c.luks",
            "1M",
        ],
    );
    assert!(v.err.contains("No secret with id 'nope'"), "{}", v.err);
}

#[test]
fn wrong_passphrase_is_refused_and_writes_nothing() {
    let d = tmp();
    let dir = d.path();
    create_qemu(dir, "a.luks", "", "1M");
    let before = std::fs::read(p(dir, "a.luks")).unwrap();
    let s = spec("a.luks");
    let v = vdisk(
        dir,
        &[
            "io",
            "--object",
            WRONG,
            "--image-opts",
            &s,
            "-c",
            "write 0 64k",
        ],
    );
    assert_ne!(v.code, 0);
    assert!(
        v.err
            .contains("Invalid password, cannot unlock any keyslot"),
        "{}",
        v.err
    );
    assert!(!v.err.contains("wrong horse"));
    let q = qemu_io_run(
        dir,
        &["--object", WRONG, "--image-opts", &s, "-c", "read 0 512"],
    );
    assert!(q
        .err
        .contains("Invalid password, cannot unlock any keyslot"));
    let v = vdisk(
        dir,
        &[
            "convert",
            "--object",
            WRONG,
            "--image-opts",
            &s,
            "-O",
            "raw",
            "x.raw",
        ],
    );
    assert_eq!(v.code, 1);
    assert!(
        v.err
            .contains("Invalid password, cannot unlock any keyslot"),
        "{}",
        v.err
    );
    // Opening without a key: info works (header only), I/O is refused.
    ok(vdisk(dir, &["info", "a.luks"]), "info without key");
    let v = vdisk(dir, &["io", "-f", "luks", "-c", "read 0 512", "a.luks"]);
    assert!(
        v.err
            .contains("Parameter 'key-secret' is required for cipher"),
        "{}",
        v.err
    );
    assert!(std::fs::read(p(dir, "a.luks")).unwrap() == before);
}

#[test]
fn resize_and_convert_both_ways() {
    let d = tmp();
    let dir = d.path();
    create_vdisk(dir, "a.luks", "", "1M");
    vio(dir, "a.luks", &["write -P 0x5a 0 1M"]);
    let s = spec("a.luks");
    ok(
        vdisk(
            dir,
            &["resize", "--object", SECRET, "--image-opts", &s, "3M"],
        ),
        "resize",
    );
    let q = ok(qemu_img(dir, &["info", "--output=json", "a.luks"]), "info");
    assert_eq!(json(&q)["virtual-size"], 3 << 20);
    qio(dir, "a.luks", &["read -P 0x5a 0 1M", "write -P 0x6b 2M 1M"]);
    // raw -> luks here, luks -> raw in qemu.
    std::fs::write(p(dir, "in.raw"), pattern(3 << 20, 9)).unwrap();
    ok(
        vdisk(
            dir,
            &[
                "convert",
                "--object",
                SECRET,
                "-f",
                "raw",
                "-O",
                "luks",
                "-o",
                &opts("cipher-alg=aes-128"),
                "in.raw",
                "b.luks",
            ],
        ),
        "convert to luks",
    );
    let sb = spec("b.luks");
    ok(
        qemu_img(
            dir,
            &[
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &sb,
                "-O",
                "raw",
                "out.raw",
            ],
        ),
        "qemu convert out",
    );
    assert!(std::fs::read(p(dir, "out.raw")).unwrap() == pattern(3 << 20, 9));
    // luks (qemu's) -> qcow2 here.
    ok(
        vdisk(
            dir,
            &[
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &s,
                "-O",
                "qcow2",
                "c.qcow2",
            ],
        ),
        "convert luks -> qcow2",
    );
    ok(
        qemu_img(
            dir,
            &[
                "compare",
                "--object",
                SECRET,
                "--image-opts",
                &s,
                "driver=qcow2,file.filename=c.qcow2",
            ],
        ),
        "compare",
    );
}

#[test]
fn hostile_headers_fail_fast() {
    let d = tmp();
    let dir = d.path();
    create_vdisk(dir, "a.luks", "", "1M");
    let good = std::fs::read(p(dir, "a.luks")).unwrap();
    let s = spec("a.luks");
    let cases: &[(usize, u32, &str)] = &[
        (
            208 + 4,
            u32::MAX,
            "key slot 0 iterations 4294967295 exceeds the limit",
        ),
        (
            164,
            u32::MAX,
            "master key iterations 4294967295 exceeds the limit",
        ),
        (
            208 + 44,
            u32::MAX,
            "key slot 0 stripes 4294967295 exceeds the limit",
        ),
        (
            208 + 40,
            u32::MAX,
            "key slot 0 key material offset is invalid",
        ),
        (104, u32::MAX, "payload offset is invalid"),
        (108, 7, "Algorithm aes with key size 3 bytes not supported"),
        (208, 5, "key slot 0 state is invalid"),
    ];
    for (at, val, want) in cases {
        let mut b = good.clone();
        b[*at..*at + 4].copy_from_slice(&val.to_be_bytes());
        std::fs::write(p(dir, "a.luks"), &b).unwrap();
        let t = std::time::Instant::now();
        let v = vdisk(
            dir,
            &[
                "io",
                "--object",
                SECRET,
                "--image-opts",
                &s,
                "-c",
                "read 0 512",
            ],
        );
        assert_ne!(v.code, 0);
        assert!(v.err.contains(want), "{want}: {}", v.err);
        assert!(t.elapsed().as_secs() < 20);
    }
    // Truncated key material: the file ends inside slot 0's material.
    std::fs::write(p(dir, "a.luks"), &good[..8192]).unwrap();
    let v = vdisk(
        dir,
        &[
            "io",
            "--object",
            SECRET,
            "--image-opts",
            &s,
            "-c",
            "read 0 512",
        ],
    );
    assert_ne!(v.code, 0);
    assert!(v.err.contains("LUKS header"), "{}", v.err);
}

/// Runs `openssl args` with `input` on stdin; its stdout.
fn openssl(args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut c = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl must be installed for this test");
    c.stdin.take().unwrap().write_all(input).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "openssl {args:?}");
    o.stdout
}

fn b64(b: &[u8]) -> String {
    openssl(&["base64", "-A"], b)
        .iter()
        .map(|&c| c as char)
        .collect()
}

/// Secrets encrypted with `keyid`/`iv` (AES-256-CBC under a master secret, the
/// ciphertext made by openssl): the same objects unlock the same volume in both
/// tools, and the refusals are qemu's.
#[test]
fn encrypted_secrets_as_qemu() {
    let d = tmp();
    let dir = d.path();
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5c).collect();
    let iv: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(11) ^ 0xa3).collect();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    std::fs::write(p(dir, "master.b64"), b64(&key)).unwrap();
    let ct = b64(&openssl(
        &["enc", "-aes-256-cbc", "-K", &hex(&key), "-iv", &hex(&iv)],
        b"correct horse",
    ));
    let master = "secret,id=master,file=master.b64,format=base64".to_string();
    let enc = format!(
        "secret,id=s0,data={},keyid=master,iv={},format=base64",
        ct.replace(',', ",,"),
        b64(&iv)
    );
    let with = |head: &[&str], tail: &[&str]| {
        let mut a: Vec<String> = head.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--object".into(),
            master.clone(),
            "--object".into(),
            enc.clone(),
        ]);
        a.extend(tail.iter().map(|s| s.to_string()));
        a
    };
    let run = |tool: &str, a: &[String]| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        match tool {
            "qemu-img" => qemu_img(dir, &a),
            "qemu-io" => qemu_io_run(dir, &a),
            _ => vdisk(dir, &a),
        }
    };
    let o = opts("");
    // qemu-img creates with the encrypted secret; the plain passphrase (SECRET) and the
    // encrypted one open it in vdisk.
    ok(
        run(
            "qemu-img",
            &with(&["create", "-q", "-f", "luks"], &["-o", &o, "q.luks", "1M"]),
        ),
        "qemu-img create",
    );
    qio(dir, "q.luks", &["write -P 0x77 0 4k"]);
    let s = spec("q.luks");
    ok(
        run(
            "vdisk",
            &with(&["io"], &["--image-opts", &s, "-c", "read -P 0x77 0 4k"]),
        ),
        "vdisk io",
    );
    // vdisk creates with it; qemu-io opens with the plain passphrase.
    ok(
        run(
            "vdisk",
            &with(&["create", "-q", "-f", "luks"], &["-o", &o, "v.luks", "1M"]),
        ),
        "vdisk create",
    );
    vio(dir, "v.luks", &["write -P 0x66 0 4k"]);
    qio(dir, "v.luks", &["read -P 0x66 0 4k"]);
    let r = run(
        "qemu-io",
        &with(
            &[],
            &["--image-opts", &spec("v.luks"), "-c", "read -P 0x66 0 4k"],
        ),
    );
    assert_eq!(r.code, 0, "{}", r.err);
    // Refusals, each with the master and the good secret defined first.
    let ivb = b64(&iv);
    for bad in [
        format!("secret,id=x,data={ct},keyid=master,format=base64"),
        format!("secret,id=x,data={ct},keyid=nomaster,iv={ivb},format=base64"),
        format!("secret,id=x,data={ct},keyid=s0,iv={ivb},format=base64"),
        format!("secret,id=x,data={ct},keyid=master,iv=AAAA,format=base64"),
        format!("secret,id=x,data=abcde,keyid=master,iv={ivb}"),
        format!("secret,id=x,data=abcdefghijklmnop,keyid=master,iv={ivb}"),
    ] {
        let a = with(&["info"], &["--object", &bad, "q.luks"]);
        let q = run("qemu-img", &a);
        let v = run("vdisk", &a);
        assert_eq!(q.code, 1, "{bad}");
        assert_eq!(
            (v.code, v.err.replace("vdisk", "qemu-img")),
            (q.code, q.err),
            "{bad}"
        );
    }
}

/// Detached LUKS headers (`{"driver":"luks","file":DATA,"header":HDR}`): qemu-img 10
/// cannot create them (`detached-header` is refused, and vdisk refuses it the same
/// way), but opens them; a volume split at its payload offset, the header's payload
/// offset set to 0, is one. Both tools read
/// the same data through it, `info` matches, and `amend` changes the header file.
#[test]
fn detached_headers_open_as_in_qemu() {
    let d = tmp();
    let dir = d.path();
    let a = [
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        SECRET,
        "-o",
        &opts("detached-header=on"),
        "h.img",
        "1M",
    ];
    let q = qemu_img(dir, &a);
    let v = vdisk(dir, &a);
    assert_eq!(q.code, 1);
    assert_eq!(
        (v.code, v.err.replace("vdisk", "qemu-img")),
        (q.code, q.err)
    );
    create_qemu(dir, "whole.luks", "", "2M");
    qio(dir, "whole.luks", WRITES);
    let whole = std::fs::read(p(dir, "whole.luks")).unwrap();
    let payload = u32::from_be_bytes(whole[104..108].try_into().unwrap()) as usize * 512;
    // QEMU's detached headers record a payload offset of 0.
    let mut hdr = whole[..payload].to_vec();
    hdr[104..108].fill(0);
    std::fs::write(p(dir, "hdr.img"), &hdr).unwrap();
    std::fs::write(p(dir, "data.img"), &whole[payload..]).unwrap();
    let json = r#"json:{"driver":"luks","file":{"driver":"file","filename":"data.img"},"header":{"driver":"file","filename":"hdr.img"},"key-secret":"s0"}"#;
    for tool in ["qemu", "vdisk"] {
        let mut a = vec!["--object", SECRET, json];
        for c in READS {
            a.extend(["-c", c]);
        }
        let r = if tool == "qemu" {
            qemu_io_run(dir, &a)
        } else {
            let mut v = vec!["io"];
            v.extend(a);
            vdisk(dir, &v)
        };
        assert!(
            r.code == 0 && !r.out.contains("fail"),
            "{tool}: {}{}",
            r.out,
            r.err
        );
    }
    let q = ok(
        qemu_img(dir, &["info", "--object", SECRET, "--output=json", json]),
        "qemu info",
    );
    let v = ok(
        vdisk(dir, &["info", "--object", SECRET, "--output=json", json]),
        "vdisk info",
    );
    // The header block, size and flags match (vdisk names the image by its data file
    // and lists no `header` child: see docs/differences.md).
    let (q, v) = (cli_support::json(&q), cli_support::json(&v));
    for k in ["format-specific", "virtual-size", "encrypted", "format"] {
        assert_eq!(v[k], q[k], "{k}");
    }
    assert_eq!(v["format-specific"]["data"]["detached-header"], true);
    // A write through vdisk lands in the data file, readable by qemu-io.
    let r = vdisk(
        dir,
        &["io", "--object", SECRET, json, "-c", "write -P 0x99 8k 4k"],
    );
    assert_eq!(r.code, 0, "{}", r.err);
    let r = qemu_io_run(dir, &["--object", SECRET, json, "-c", "read -P 0x99 8k 4k"]);
    assert!(r.code == 0 && !r.out.contains("fail"), "{}{}", r.out, r.err);
    // amend adds a key slot in the header file; qemu-io opens with it.
    let json2 = json.replace("\"key-secret\":\"s0\"", "\"key-secret\":\"s1\"");
    let r = vdisk(
        dir,
        &[
            "amend",
            "--object",
            SECRET,
            "--object",
            "secret,id=s1,data=other",
            json,
            "-o",
            "state=active,new-secret=s1,iter-time=10",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.err);
    let r = qemu_io_run(
        dir,
        &[
            "--object",
            "secret,id=s1,data=other",
            &json2,
            "-c",
            "read -P 0x99 8k 4k",
        ],
    );
    assert!(r.code == 0 && !r.out.contains("fail"), "{}{}", r.out, r.err);
    // `header` belongs to luks only.
    let bad = r#"json:{"driver":"raw","file":{"driver":"file","filename":"data.img"},"header":{"driver":"file","filename":"hdr.img"}}"#;
    let q = qemu_img(dir, &["info", bad]);
    let v = vdisk(dir, &["info", bad]);
    assert_eq!(q.code, 1);
    assert_eq!(v.code, 1, "{}", v.out);
}
