//! The S3 storage against a real Garage server (single node, on loopback, started by
//! the test): upload with `convert`, `info`/`map`/`compare` on `s3://` against the same
//! bytes as a local file (qemu-img's output on the local file), a local qcow2 overlay
//! over a golden image in the bucket, round trips, and the failures: bad credentials,
//! a missing key or bucket, a dead server.

mod cli_support;

use cli_support::garage::Garage;
use cli_support::{ok, p, pattern, qemu_img, qemu_io, tmp, Run};
use std::path::Path;
use std::process::{Command, Stdio};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");

/// Runs vdisk with the server's environment plus `extra` (a bounded run: never a hang).
fn vdisk_env(dir: &Path, g: &Garage, extra: &[(&str, &str)], args: &[&str]) -> Run {
    let o = Command::new("timeout")
        .arg("120")
        .arg(VDISK)
        .args(args)
        .envs(g.env())
        .envs(extra.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run vdisk");
    Run {
        code: o.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn vdisk(dir: &Path, g: &Garage, args: &[&str]) -> Run {
    vdisk_env(dir, g, &[], args)
}

/// A qemu-made qcow2 with data, a hole and a zero cluster.
fn golden(dir: &Path) {
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "g.qcow2", "64M"]),
        "qemu-img create",
    );
    qemu_io(
        dir,
        "qcow2",
        "g.qcow2",
        &[
            "write -P 0x11 0 3M",
            "write -P 0x22 20M 64k",
            "write -z 21M 64k",
            "write -P 0x33 63M 1M",
        ],
    );
}

/// Uploads the local file's bytes as they are (`-f raw -O raw`).
fn upload_bytes(dir: &Path, g: &Garage, local: &str, url: &str) {
    ok(
        vdisk(dir, g, &["convert", "-f", "raw", "-O", "raw", local, url]),
        "upload the bytes",
    );
}

#[test]
fn golden_image_in_a_bucket_reads_like_the_local_file() {
    let d = tmp();
    let dir = d.path();
    let g = Garage::start(dir);
    golden(dir);
    let url = "s3://golden/images/g.qcow2";
    upload_bytes(dir, &g, "g.qcow2", url);
    // The object holds the same bytes.
    ok(
        vdisk(
            dir,
            &g,
            &["convert", "-f", "raw", "-O", "raw", url, "back.bin"],
        ),
        "download",
    );
    assert_eq!(
        std::fs::read(p(dir, "back.bin")).unwrap(),
        std::fs::read(p(dir, "g.qcow2")).unwrap()
    );
    // info: qemu-img's text on the local file, but for the name and the file child.
    let ours = ok(vdisk(dir, &g, &["info", url]), "vdisk info");
    let theirs = ok(qemu_img(dir, &["info", "g.qcow2"]), "qemu-img info");
    let head = |s: &str| -> Vec<String> {
        s.lines()
            .take_while(|l| !l.starts_with("Child node"))
            .filter(|l| !l.starts_with("disk size"))
            .map(|l| l.replace(url, "g.qcow2"))
            .collect()
    };
    assert_eq!(head(&ours), head(&theirs), "{ours}\n{theirs}");
    assert!(ours.contains("protocol type: s3"), "{ours}");
    // map, both outputs: the same runs at the same offsets.
    for out in ["human", "json"] {
        let o = format!("--output={out}");
        let ours = ok(vdisk(dir, &g, &["map", &o, url]), "vdisk map");
        let theirs = ok(qemu_img(dir, &["map", &o, "g.qcow2"]), "qemu-img map");
        assert_eq!(ours.replace(url, "g.qcow2"), theirs);
    }
    let c = ok(vdisk(dir, &g, &["compare", url, "g.qcow2"]), "compare");
    assert!(c.contains("Images are identical"), "{c}");
    // io, read-only, with a pattern check.
    let r = ok(
        vdisk(
            dir,
            &g,
            &[
                "io",
                "-r",
                "-c",
                "read -P 0x22 20M 64k",
                "-c",
                "read -P 0 21M 64k",
                url,
            ],
        ),
        "vdisk io",
    );
    assert!(!r.contains("failed") && !r.contains("mismatch"), "{r}");
    // serve, read-only: qemu-img reads the export as the local file.
    let sock = p(dir, "s.sock");
    let mut srv = Command::new(VDISK)
        .args(["serve", "-r", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(url)
        .envs(g.env())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !sock.exists() && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let nbd = format!("nbd+unix:///?socket={}", sock.display());
    let c = qemu_img(dir, &["compare", &nbd, "g.qcow2"]);
    let _ = srv.kill();
    let _ = srv.wait();
    let c = ok(c, "qemu-img compare with vdisk serve over s3");
    assert!(c.contains("Images are identical"), "{c}");
    // The same through json: and --image-opts, credentials from a secret.
    let j = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"s3","bucket":"golden","key":"images/g.qcow2","endpoint":"{}","region":"garage","access-key-id":"{}","secret-access-key-secret":"sec0"}}}}"#,
        g.endpoint(),
        g.key_id
    );
    let sec = format!("secret,id=sec0,data={}", g.secret);
    let none = [
        ("AWS_ACCESS_KEY_ID", ""),
        ("AWS_SECRET_ACCESS_KEY", ""),
        ("AWS_ENDPOINT_URL", ""),
    ];
    let c = ok(
        vdisk_env(
            dir,
            &g,
            &none,
            &["compare", "--object", &sec, &j, "g.qcow2"],
        ),
        "compare json:",
    );
    assert!(c.contains("Images are identical"), "{c}");
    let opts = format!(
        "driver=qcow2,file.driver=s3,file.bucket=golden,file.key=images/g.qcow2,file.endpoint={},file.region=garage,file.access-key-id={},file.secret-access-key-secret=sec0",
        g.endpoint(),
        g.key_id
    );
    let m = ok(
        vdisk_env(
            dir,
            &g,
            &none,
            &["map", "--object", &sec, "--image-opts", &opts],
        ),
        "map --image-opts",
    );
    // The same runs; the file column names the object as vdisk names it.
    let name = m
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or("");
    assert!(name.contains("images/g.qcow2"), "{m}");
    let theirs = ok(qemu_img(dir, &["map", "g.qcow2"]), "qemu-img map");
    assert_eq!(
        m,
        theirs
            .replace("g.qcow2", name)
            .replace("images/images/", "images/")
    );
    // The shared credentials file and a profile.
    std::fs::write(
        p(dir, "credentials"),
        format!(
            "[other]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            g.key_id, g.secret
        ),
    )
    .unwrap();
    let cred = p(dir, "credentials").display().to_string();
    let c = ok(
        vdisk_env(
            dir,
            &g,
            &[
                ("AWS_ACCESS_KEY_ID", ""),
                ("AWS_SECRET_ACCESS_KEY", ""),
                ("AWS_SHARED_CREDENTIALS_FILE", &cred),
                ("AWS_PROFILE", "other"),
            ],
            &["compare", url, "g.qcow2"],
        ),
        "compare with a profile",
    );
    assert!(c.contains("Images are identical"), "{c}");
}

#[test]
fn local_overlay_over_a_golden_image_in_a_bucket() {
    let d = tmp();
    let dir = d.path();
    let g = Garage::start(dir);
    golden(dir);
    upload_bytes(dir, &g, "g.qcow2", "s3://golden/g.qcow2");
    let writes = [
        "write -P 0x55 1088k 64k",
        "write -P 0x66 20M 4k",
        "read -P 0x11 1M 64k",
    ];
    // cli_support::remote_overlay runs vdisk without our environment: do its steps here.
    ok(
        vdisk(
            dir,
            &g,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "s3://golden/g.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        ),
        "create overlay",
    );
    let mut a = vec!["io"];
    for w in &writes {
        a.extend(["-c", w]);
    }
    a.push("top.qcow2");
    let out = ok(vdisk(dir, &g, &a), "write the overlay");
    assert!(!out.contains("failed"), "{out}");
    cli_support::qemu_overlay(dir, "qcow2", "g.qcow2", "qcow2", "ref.qcow2");
    qemu_io(dir, "qcow2", "ref.qcow2", &writes);
    // Bit-exact: the overlay over the bucket reads as qemu's overlay over the file.
    ok(
        vdisk(dir, &g, &["convert", "-O", "raw", "top.qcow2", "top.raw"]),
        "convert overlay",
    );
    ok(
        qemu_img(dir, &["convert", "-O", "raw", "ref.qcow2", "ref.raw"]),
        "qemu convert",
    );
    assert!(
        std::fs::read(p(dir, "top.raw")).unwrap() == std::fs::read(p(dir, "ref.raw")).unwrap(),
        "overlay over s3 differs from qemu's overlay over the local file"
    );
    let alone =
        r#"json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"top.qcow2"}}"#;
    let c = ok(qemu_img(dir, &["check", alone]), "qemu-img check");
    assert!(c.contains("No errors were found"), "{c}");
    // Rebased onto the local copy, qemu-img reads it the same.
    std::fs::copy(p(dir, "top.qcow2"), p(dir, "copy.qcow2")).unwrap();
    ok(
        qemu_img(
            dir,
            &["rebase", "-u", "-b", "g.qcow2", "-F", "qcow2", "copy.qcow2"],
        ),
        "rebase",
    );
    ok(
        qemu_img(dir, &["check", "copy.qcow2"]),
        "qemu-img check copy",
    );
    ok(
        qemu_img(dir, &["compare", "copy.qcow2", "ref.qcow2"]),
        "qemu-img compare",
    );
    let info = ok(
        vdisk(dir, &g, &["info", "--backing-chain", "top.qcow2"]),
        "info chain",
    );
    assert!(info.contains("backing file: s3://golden/g.qcow2"), "{info}");
}

#[test]
fn convert_round_trip_through_the_bucket() {
    let d = tmp();
    let dir = d.path();
    let g = Garage::start(dir);
    // 40 MiB with holes: the qcow2 upload takes several multipart parts.
    let mut data = vec![0u8; 40 << 20];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 3 != 1 {
            chunk.copy_from_slice(&pattern(1 << 20, i as u8));
        }
    }
    std::fs::write(p(dir, "src.raw"), &data).unwrap();
    ok(
        vdisk(
            dir,
            &g,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "src.raw",
                "s3://golden/rt.qcow2",
            ],
        ),
        "convert to s3",
    );
    ok(
        vdisk(
            dir,
            &g,
            &["convert", "-O", "raw", "s3://golden/rt.qcow2", "back.raw"],
        ),
        "convert from s3",
    );
    assert!(
        std::fs::read(p(dir, "back.raw")).unwrap() == data,
        "round trip differs"
    );
    // The uploaded qcow2 is sound: its bytes, downloaded, pass qemu-img check.
    ok(
        vdisk(
            dir,
            &g,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                "s3://golden/rt.qcow2",
                "rt.qcow2",
            ],
        ),
        "download bytes",
    );
    let c = ok(qemu_img(dir, &["check", "rt.qcow2"]), "qemu-img check");
    assert!(c.contains("No errors were found"), "{c}");
    ok(
        qemu_img(
            dir,
            &["compare", "-f", "raw", "-F", "qcow2", "src.raw", "rt.qcow2"],
        ),
        "compare",
    );
    // create on s3, then info.
    ok(
        vdisk(
            dir,
            &g,
            &["create", "-q", "-f", "qcow2", "s3://golden/new.qcow2", "1G"],
        ),
        "create",
    );
    let i = ok(vdisk(dir, &g, &["info", "s3://golden/new.qcow2"]), "info");
    assert!(i.contains("virtual size: 1 GiB"), "{i}");
    // An s3 image opened read-only refuses writes.
    let w = vdisk(
        dir,
        &g,
        &["io", "-r", "-c", "write 0 512", "s3://golden/rt.qcow2"],
    );
    assert!(
        w.out.contains("failed") || w.code != 0,
        "{} {}",
        w.out,
        w.err
    );
}

#[test]
fn failures_are_clear_errors_naming_the_url() {
    let d = tmp();
    let dir = d.path();
    let mut g = Garage::start(dir);
    golden(dir);
    upload_bytes(dir, &g, "g.qcow2", "s3://golden/g.qcow2");
    let fail = |r: Run, words: &str| {
        assert_eq!(r.code, 1, "{} {}", r.out, r.err);
        assert!(r.err.contains(words), "wanted '{words}' in: {}", r.err);
    };
    fail(
        vdisk(dir, &g, &["info", "s3://golden/nothing.qcow2"]),
        "'s3://golden/nothing.qcow2': No such key",
    );
    fail(
        vdisk(dir, &g, &["info", "s3://nobucket/g.qcow2"]),
        "'s3://nobucket/g.qcow2': No such bucket",
    );
    fail(
        vdisk_env(
            dir,
            &g,
            &[("AWS_SECRET_ACCESS_KEY", "wrong")],
            &["info", "s3://golden/g.qcow2"],
        ),
        "'s3://golden/g.qcow2': Access denied",
    );
    fail(
        vdisk_env(
            dir,
            &g,
            &[("AWS_SECRET_ACCESS_KEY", "wrong")],
            &["convert", "-O", "qcow2", "g.qcow2", "s3://golden/x.qcow2"],
        ),
        "Access denied",
    );
    // A key that may read but not write: the upload at the end fails, the command
    // fails, and the object is as it was (absent, or the old one).
    let ro = g.cli(&["key", "create", "reader"]);
    let field = |name: &str| {
        ro.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap()
    };
    let (rid, rsec) = (field("Key ID:"), field("Secret key:"));
    g.cli(&["bucket", "allow", "--read", "golden", "--key", "reader"]);
    let reader = [
        ("AWS_ACCESS_KEY_ID", rid.as_str()),
        ("AWS_SECRET_ACCESS_KEY", rsec.as_str()),
    ];
    fail(
        vdisk_env(
            dir,
            &g,
            &reader,
            &["convert", "-O", "qcow2", "g.qcow2", "s3://golden/ro.qcow2"],
        ),
        "Access denied",
    );
    fail(
        vdisk(dir, &g, &["info", "s3://golden/ro.qcow2"]),
        "No such key",
    );
    ok(
        vdisk(
            dir,
            &g,
            &["convert", "-O", "qcow2", "g.qcow2", "s3://golden/old.qcow2"],
        ),
        "upload old",
    );
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "new.qcow2", "64M"]),
        "create new",
    );
    qemu_io(dir, "qcow2", "new.qcow2", &["write -P 0x99 0 1M"]);
    let r = vdisk_env(
        dir,
        &g,
        &reader,
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            "new.qcow2",
            "s3://golden/old.qcow2",
        ],
    );
    assert_eq!(r.code, 1, "{} {}", r.out, r.err);
    // Garage answers 403 as soon as it has the headers; whether the client reads that
    // answer or first finds the socket closed under its body depends on timing.
    assert!(
        r.err.contains("'s3://golden/old.qcow2'")
            && (r.err.contains("Access denied")
                || r.err.contains("closed the connection during the request")),
        "{}",
        r.err
    );
    let c = ok(
        vdisk(dir, &g, &["compare", "s3://golden/old.qcow2", "g.qcow2"]),
        "old intact",
    );
    assert!(c.contains("Images are identical"), "{c}");
    // The server dies: reads (and uploads) fail after the retries, they do not hang.
    g.stop();
    fail(
        vdisk(dir, &g, &["info", "s3://golden/g.qcow2"]),
        "S3 endpoint unreachable",
    );
    fail(
        vdisk(
            dir,
            &g,
            &["convert", "-O", "raw", "s3://golden/g.qcow2", "out.raw"],
        ),
        "s3://golden/g.qcow2",
    );
}

/// A proxy on loopback in front of Garage: the first `fail` connections are answered
/// `503 Slow Down` and closed; the others are piped through. Returns the port and the
/// count of 503s sent.
fn flaky_proxy(
    upstream: u16,
    fail: usize,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let failed = std::sync::Arc::new(AtomicUsize::new(0));
    let f2 = failed.clone();
    std::thread::spawn(move || {
        // Bounded: the test's process ends the thread at the latest.
        for (n, c) in l.incoming().take(10_000).enumerate() {
            let Ok(mut c) = c else { continue };
            if n < fail {
                // Read the request head, then refuse it.
                let mut buf = [0u8; 8192];
                let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let _ = c.read(&mut buf);
                let body = "<Error><Code>SlowDown</Code></Error>";
                let _ = write!(
                    c,
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                f2.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let (mut a, mut b) = (c.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            let (mut a, mut b) = (up, c);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, failed)
}

#[test]
fn transient_5xx_are_retried_and_a_server_killed_mid_read_is_an_error() {
    let d = tmp();
    let dir = d.path();
    let mut g = Garage::start(dir);
    golden(dir);
    upload_bytes(dir, &g, "g.qcow2", "s3://golden/g.qcow2");
    let (port, failed) = flaky_proxy(g.port, 3);
    let ep = format!("http://127.0.0.1:{port}");
    let c = ok(
        vdisk_env(
            dir,
            &g,
            &[("AWS_ENDPOINT_URL", &ep)],
            &["compare", "s3://golden/g.qcow2", "g.qcow2"],
        ),
        "compare through 503s",
    );
    assert!(c.contains("Images are identical"), "{c}");
    assert_eq!(failed.load(std::sync::atomic::Ordering::SeqCst), 3);
    // Upload through 503s too.
    let (port, failed) = flaky_proxy(g.port, 2);
    let ep = format!("http://127.0.0.1:{port}");
    ok(
        vdisk_env(
            dir,
            &g,
            &[("AWS_ENDPOINT_URL", &ep)],
            &["convert", "-O", "qcow2", "g.qcow2", "s3://golden/up.qcow2"],
        ),
        "upload through 503s",
    );
    assert_eq!(failed.load(std::sync::atomic::Ordering::SeqCst), 2);
    ok(
        vdisk(dir, &g, &["compare", "s3://golden/up.qcow2", "g.qcow2"]),
        "compare upload",
    );
    // A bigger object, and the server killed while it is read: either the copy
    // finished first (and is right) or it fails naming the object; never a hang.
    let big: Vec<u8> = pattern(48 << 20, 9);
    std::fs::write(p(dir, "big.raw"), &big).unwrap();
    upload_bytes(dir, &g, "big.raw", "s3://golden/big.raw");
    let child = Command::new("timeout")
        .arg("120")
        .arg(VDISK)
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            "s3://golden/big.raw",
            "big.out",
        ])
        .envs(g.env())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    g.stop();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    match o.status.code() {
        Some(0) => assert!(std::fs::read(p(dir, "big.out")).unwrap() == big),
        Some(1) => assert!(err.contains("s3://golden/big.raw"), "{err}"),
        c => panic!("exit {c:?} (124 = hung): {err}"),
    }
}
