//! NBD over TLS against real peers, on loopback only: qemu-nbd (GnuTLS) serving x509
//! and PSK to the vdisk client; `vdisk serve --tls-creds` to qemu-img, qemu-io,
//! nbdinfo and nbdcopy (GnuTLS clients through QEMU and libnbd); vdisk to vdisk; a
//! backing file over TLS; and the refusals (a plain client, a wrong CA, a wrong PSK,
//! a hostname or authz mismatch, STARTTLS twice) that must be clear errors.
//!
//! The test makes its own CA, server and client certificates with the `openssl` tool
//! and its own `keys.psk`; every server and command runs under a time limit.

mod cli_support;

use cli_support::{ok, p, qemu_img, run_limited as run, tmp, Run};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");

fn openssl(dir: &Path, args: &[&str]) {
    let r = run(dir, "openssl", args);
    assert_eq!(
        r.code, 0,
        "openssl {args:?} (scripts/test installs openssl): {}",
        r.err
    );
}

/// A test PKI in `dir`: `ca/` (the CA's key), `server/` (ca-cert, server-cert,
/// server-key for localhost and 127.0.0.1), `client/` (ca-cert, client-cert, client-key, subject
/// `/C=GB/O=vdisk/CN=client`), `other/` (a CA that signed nothing here), `othercli/`
/// (the client's certificate and key with `other/`'s CA), and `psk/`,
/// `wrongpsk/` (keys.psk for user `qemu`).
struct Pki {
    srv: PathBuf,
    cli: PathBuf,
    other: PathBuf,
    other_cli: PathBuf,
    psk: PathBuf,
    wrongpsk: PathBuf,
}

const CLIENT_DN: &str = "CN=client,O=vdisk,C=GB";

fn pki(dir: &Path) -> Pki {
    for d in ["ca", "server", "client", "other", "psk", "wrongpsk"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let days = ["-days", "30"];
    // A self-signed CA in `d/` (key.pem, ca-cert.pem).
    let ca = |d: &str, subj: &str| {
        let (key, cert) = (format!("{d}/key.pem"), format!("{d}/ca-cert.pem"));
        let req = [
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key,
        ];
        openssl(
            dir,
            &[&req[..], &["-out", &cert, "-subj", subj], &days].concat(),
        );
    };
    ca("ca", "/CN=vdisk test CA");
    let sign = |who: &str, subj: &str, ext: &str| {
        std::fs::write(dir.join(format!("{who}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{who}/{who}-key.pem"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                subj,
            ],
        );
        openssl(
            dir,
            &[
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{who}.csr"),
                    "-CA",
                    "ca/ca-cert.pem",
                ][..],
                &["-CAkey", "ca/key.pem", "-CAcreateserial"],
                &[
                    "-out",
                    &format!("{who}/{who}-cert.pem"),
                    "-extfile",
                    &format!("{who}.ext"),
                ],
                &days,
            ]
            .concat(),
        );
    };
    // The file names are QEMU's (server/server-*.pem, client/client-*.pem).
    sign(
        "server",
        "/O=vdisk/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    );
    sign(
        "client",
        "/C=GB/O=vdisk/CN=client",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
         extendedKeyUsage=clientAuth\n",
    );
    for d in ["server", "client"] {
        std::fs::copy(dir.join("ca/ca-cert.pem"), dir.join(d).join("ca-cert.pem")).unwrap();
    }
    ca("other", "/CN=another CA");
    // The client's own certificate (which a server checks) with the other CA.
    let oc = dir.join("othercli");
    std::fs::create_dir_all(&oc).unwrap();
    std::fs::copy(dir.join("other/ca-cert.pem"), oc.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(dir.join("client").join(f), oc.join(f)).unwrap();
    }
    let key = |seed: u8| {
        (0..32)
            .map(|i| format!("{:02x}", i * 7 + seed))
            .collect::<String>()
    };
    std::fs::write(dir.join("psk/keys.psk"), format!("qemu:{}\n", key(1))).unwrap();
    std::fs::write(dir.join("wrongpsk/keys.psk"), format!("qemu:{}\n", key(2))).unwrap();
    Pki {
        srv: dir.join("server"),
        cli: dir.join("client"),
        other: dir.join("other"),
        other_cli: oc,
        psk: dir.join("psk"),
        wrongpsk: dir.join("wrongpsk"),
    }
}

fn x509(id: &str, dir: &Path, endpoint: &str) -> String {
    format!(
        "tls-creds-x509,id={id},dir={},endpoint={endpoint}",
        dir.display()
    )
}

fn psk(id: &str, dir: &Path, endpoint: &str) -> String {
    format!(
        "tls-creds-psk,id={id},dir={},endpoint={endpoint}",
        dir.display()
    )
}

/// A free TCP port on 127.0.0.1 (the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server process on 127.0.0.1:port, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Starts `prog` and waits until it listens; its stderr goes to `log` (else
    /// inherited).
    fn start_logged(prog: &str, args: Vec<String>, port: u16, log: Option<&Path>) -> Server {
        let err = match log {
            Some(l) => Stdio::from(std::fs::File::create(l).unwrap()),
            None => Stdio::inherit(),
        };
        let child = Command::new(prog)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
        let mut s = Server { child, port };
        let until = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("{prog} {args:?} exited early: {st}");
            }
            assert!(Instant::now() < until, "{prog} did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// `qemu-nbd -t -b 127.0.0.1 -p PORT --object OBJ --tls-creds tls0 [extra] FILE`.
    fn qemu_nbd(object: &str, extra: &[&str], file: &Path) -> Server {
        Server::qemu_nbd_with(Some(object), extra, file)
    }

    /// [`Server::qemu_nbd`], without TLS when `object` is `None`.
    fn qemu_nbd_with(object: Option<&str>, extra: &[&str], file: &Path) -> Server {
        Server::launch("qemu-nbd", &["-t"], object, extra, file, None)
    }

    /// `vdisk serve -t -e 0 -b 127.0.0.1 -p PORT [--object OBJ --tls-creds tls0] [extra] FILE`.
    fn vdisk(object: Option<&str>, extra: &[&str], file: &Path) -> Server {
        Server::launch(
            VDISK,
            &["serve", "-t", "-e", "0"],
            object,
            extra,
            file,
            None,
        )
    }

    /// `prog pre… -b 127.0.0.1 -p PORT [--object OBJ --tls-creds tls0] extra… FILE`, its
    /// stderr in `log` when given.
    fn launch(
        prog: &str,
        pre: &[&str],
        object: Option<&str>,
        extra: &[&str],
        file: &Path,
        log: Option<&Path>,
    ) -> Server {
        let port = free_port();
        let port_s = port.to_string();
        let mut a: Vec<&str> = pre.to_vec();
        a.extend(["-b", "127.0.0.1", "-p", &port_s]);
        if let Some(o) = object {
            a.extend(["--object", o, "--tls-creds", "tls0"]);
        }
        a.extend(extra);
        let f = file.display().to_string();
        a.push(&f);
        Server::start_logged(prog, a.iter().map(|s| s.to_string()).collect(), port, log)
    }

    /// QEMU's JSON filename for the export over TLS with client credentials `id`.
    fn json(&self, id: &str, host: &str) -> String {
        format!(
            r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"inet","host":"{host}","port":"{}"}},"tls-creds":"{id}"}}}}"#,
            self.port
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 16 MiB qcow2 with data at a few places, and the same bytes as raw.
fn golden(dir: &Path) -> (PathBuf, PathBuf) {
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "g.qcow2", "16M"]),
        "create",
    );
    cli_support::qemu_io(
        dir,
        "qcow2",
        "g.qcow2",
        &[
            "write -P 0x11 1M 1M",
            "write -P 0x22 5M 64k",
            "write -P 0x33 15M 1M",
        ],
    );
    ok(
        qemu_img(
            dir,
            &["convert", "-f", "qcow2", "-O", "raw", "g.qcow2", "g.raw"],
        ),
        "convert",
    );
    (p(dir, "g.qcow2"), p(dir, "g.raw"))
}

fn vdisk_ok(dir: &Path, args: &[&str]) -> String {
    ok(run(dir, VDISK, args), &format!("vdisk {args:?}"))
}

/// The message of a failed open, without the program's name.
fn message(r: &Run, prog: &str) -> String {
    assert_ne!(r.code, 0, "{prog} must fail");
    r.err
        .trim_end()
        .strip_prefix(&format!("{prog}: "))
        .unwrap_or(&r.err)
        .to_string()
}

#[test]
fn qemu_nbd_x509_and_psk_serve_the_vdisk_client() {
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    let (g, raw) = golden(dir);
    let s = Server::qemu_nbd(&x509("tls0", &k.srv, "server"), &["-f", "qcow2", "-r"], &g);
    let obj = x509("c0", &k.cli, "client");
    let j = s.json("c0", "localhost");
    // info and map print what qemu-img prints for the same export (its name being
    // nbd://localhost:PORT, as qemu-img 10 names a TLS export).
    let all: [&[&str]; 4] = [
        &["info"],
        &["info", "--output=json"],
        &["map"],
        &["map", "--output=json"],
    ];
    for args in all {
        let a = [&[args[0], "--object", &obj][..], &args[1..], &[&j]].concat();
        let v = vdisk_ok(dir, &a);
        assert_eq!(v, ok(qemu_img(dir, &a), "qemu-img"), "{args:?}");
    }
    // nbds:// (libnbd's URL) and --image-opts name the same export.
    let url = format!("nbds://localhost:{}?tls-creds=c0", s.port);
    vdisk_ok(
        dir,
        &[
            "--object", &obj, "compare", "-f", "raw", "-F", "raw", &url, "g.raw",
        ],
    );
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,\
         file.server.port={},file.tls-creds=c0",
        s.port
    );
    vdisk_ok(
        dir,
        &[
            "--object",
            &obj,
            "compare",
            "--image-opts",
            &opts,
            "driver=raw,file.filename=g.raw",
        ],
    );
    vdisk_ok(
        dir,
        &[
            "--object",
            &obj,
            "convert",
            "-O",
            "qcow2",
            &url,
            "out.qcow2",
        ],
    );
    ok(qemu_img(dir, &["check", "out.qcow2"]), "check");
    ok(
        qemu_img(dir, &["compare", "-F", "raw", "out.qcow2", "g.raw"]),
        "compare",
    );
    vdisk_ok(
        dir,
        &["--object", &obj, "convert", "-O", "raw", &url, "out.raw"],
    );
    assert!(std::fs::read(dir.join("out.raw")).unwrap() == std::fs::read(&raw).unwrap());
    drop(s);

    // PSK: qemu-nbd's default username is qemu, as vdisk's.
    let s = Server::qemu_nbd(&psk("tls0", &k.psk, "server"), &["-f", "qcow2", "-r"], &g);
    let obj = psk("c0", &k.psk, "client") + ",username=qemu";
    let url = format!("nbds://127.0.0.1:{}?tls-creds=c0", s.port);
    vdisk_ok(
        dir,
        &[
            "--object", &obj, "compare", "-f", "raw", "-F", "raw", &url, "g.raw",
        ],
    );
    // The wrong key is a handshake failure, not a hang.
    let bad = psk("c0", &k.wrongpsk, "client");
    let r = run(dir, VDISK, &["--object", &bad, "info", &url]);
    assert!(
        message(&r, "vdisk").contains("TLS handshake failed"),
        "{}",
        r.err
    );
}

#[test]
fn vdisk_serve_x509_and_psk_serve_qemu_and_libnbd() {
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    let (g, raw) = golden(dir);
    let s = Server::vdisk(Some(&x509("tls0", &k.srv, "server")), &["-f", "qcow2"], &g);
    let obj = x509("c0", &k.cli, "client");
    let j = s.json("c0", "localhost");
    ok(
        qemu_img(dir, &["info", "--object", &obj, &j]),
        "qemu-img info",
    );
    ok(
        qemu_img(
            dir,
            &["compare", "--object", &obj, "-F", "raw", &j, "g.raw"],
        ),
        "qemu-img compare",
    );
    ok(
        qemu_img(
            dir,
            &["convert", "--object", &obj, "-O", "raw", &j, "q.raw"],
        ),
        "qemu-img convert",
    );
    assert!(std::fs::read(dir.join("q.raw")).unwrap() == std::fs::read(&raw).unwrap());
    // qemu-io writes through --image-opts and reads back.
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=localhost,\
         file.server.port={},file.tls-creds=c0",
        s.port
    );
    let r = run(
        dir,
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x44 2M 64k",
            "-c",
            "read -P 0x44 2M 64k",
            "-c",
            "read -P 0x11 1M 1M",
        ],
    );
    assert!(
        r.code == 0 && !r.out.contains("fail") && !r.out.contains("Pattern"),
        "{}{}",
        r.out,
        r.err
    );
    // libnbd (GnuTLS): nbdinfo and nbdcopy with its own URL keys.
    let url = format!(
        "nbds://localhost:{}/?tls-certificates={}",
        s.port,
        k.cli.display()
    );
    let info = ok(run(dir, "nbdinfo", &[&url]), "nbdinfo");
    assert!(
        info.contains("with TLS") && info.contains("16777216"),
        "{info}"
    );
    ok(run(dir, "nbdcopy", &[&url, "n.raw"]), "nbdcopy");
    let q = ok(
        qemu_img(
            dir,
            &[
                "compare", "-U", "-f", "raw", "-F", "qcow2", "n.raw", "g.qcow2",
            ],
        ),
        "cmp",
    );
    assert!(q.contains("identical"), "{q}");
    drop(s);

    // PSK, logged (-v) to see what TLS the GnuTLS clients agreed on.
    let log = dir.join("serve.log");
    let pre = ["serve", "-v", "-t", "-e", "0"];
    let obj = psk("tls0", &k.psk, "server");
    let s = Server::launch(
        VDISK,
        &pre,
        Some(&obj),
        &["-f", "qcow2", "-r"],
        &g,
        Some(&log),
    );
    let obj = psk("c0", &k.psk, "client");
    let j = s.json("c0", "127.0.0.1");
    ok(
        qemu_img(
            dir,
            &["compare", "--object", &obj, "-F", "qcow2", &j, "g.qcow2"],
        ),
        "psk",
    );
    let url = format!(
        "nbds://qemu@127.0.0.1:{}/?tls-psk-file={}",
        s.port,
        k.psk.join("keys.psk").display()
    );
    let info = ok(run(dir, "nbdinfo", &[&url]), "nbdinfo psk");
    assert!(info.contains("with TLS"), "{info}");
    // TLS 1.3 with an external PSK: OpenSSL and GnuTLS agree on it.
    let l = std::fs::read_to_string(&log).unwrap();
    assert_eq!(l.matches(": TLS TLSv1.3 ").count(), 2, "{l}");
    // A wrong key: qemu-img fails the handshake too.
    let bad = psk("c0", &k.wrongpsk, "client");
    let r = qemu_img(dir, &["info", "--object", &bad, &j]);
    assert!(message(&r, "qemu-img").contains("TLS"), "{}", r.err);
}

#[test]
fn vdisk_to_vdisk_over_tls_and_a_backing_file_over_nbds() {
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    let (g, raw) = golden(dir);
    let s = Server::vdisk(
        Some(&x509("tls0", &k.srv, "server")),
        &["-f", "qcow2", "-r"],
        &g,
    );
    let obj = x509("c0", &k.cli, "client");
    let url = format!("nbds://localhost:{}?tls-creds=c0", s.port);
    vdisk_ok(
        dir,
        &["--object", &obj, "convert", "-O", "raw", &url, "v.raw"],
    );
    assert!(std::fs::read(dir.join("v.raw")).unwrap() == std::fs::read(&raw).unwrap());
    let m = vdisk_ok(dir, &["--object", &obj, "map", "--output=json", &url]);
    assert!(
        m.contains("\"data\": false"),
        "holes come over TLS too: {m}"
    );
    // A local overlay over the TLS export, created with QEMU's JSON backing name.
    let j = s.json("c0", "localhost");
    vdisk_ok(
        dir,
        &[
            "--object",
            &obj,
            "create",
            "-f",
            "qcow2",
            "-b",
            &j,
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    vdisk_ok(
        dir,
        &[
            "--object",
            &obj,
            "io",
            "-c",
            "write -P 0x55 3M 64k",
            "top.qcow2",
        ],
    );
    ok(
        qemu_img(dir, &["check", "--object", &obj, "top.qcow2"]),
        "check",
    );
    // The chain, backing over TLS included, is named as qemu-img names it.
    for out in ["--output=human", "--output=json"] {
        let a = [
            "info",
            out,
            "--backing-chain",
            "--object",
            &obj,
            "top.qcow2",
        ];
        let q = ok(qemu_img(dir, &a), "qemu-img info");
        assert!(q.contains(&format!("nbd://localhost:{}", s.port)), "{q}");
        assert_eq!(vdisk_ok(dir, &a), q, "{out}");
    }
    cli_support::qemu_io(dir, "raw", "g.raw", &["write -P 0x55 3M 64k"]);
    vdisk_ok(dir, &["--object", &obj, "compare", "top.qcow2", "g.raw"]);
    ok(
        qemu_img(dir, &["compare", "--object", &obj, "top.qcow2", "g.raw"]),
        "qemu compare",
    );
}

/// The refusals: a plain client to a TLS server reads as qemu-img's message for
/// qemu-nbd; a wrong CA, a host name mismatch and an authz mismatch are refused.
#[test]
fn tls_refusals_are_clear_errors() {
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    let (g, _) = golden(dir);
    let srv = x509("tls0", &k.srv, "server");
    let q = Server::qemu_nbd(&srv, &["-f", "qcow2", "-r"], &g);
    let v = Server::vdisk(Some(&srv), &["-f", "qcow2", "-r"], &g);
    let plain_q = format!("nbd://127.0.0.1:{}", q.port);
    let plain_v = format!("nbd://127.0.0.1:{}", v.port);
    let want = message(&qemu_img(dir, &["info", &plain_q]), "qemu-img");
    assert!(want.contains("TLS negotiation required"), "{want}");
    let norm = |m: String, url: &str| m.replace(url, "URL");
    for (prog, url) in [
        ("qemu-img", &plain_v),
        ("vdisk", &plain_q),
        ("vdisk", &plain_v),
    ] {
        let r = run(
            dir,
            if prog == "vdisk" { VDISK } else { "qemu-img" },
            &["info", url],
        );
        assert_eq!(
            norm(message(&r, prog), url),
            norm(want.clone(), &plain_q),
            "{prog} {url}"
        );
    }
    // A TLS client to servers without TLS: the same words as qemu-img's.
    let cli = x509("c0", &k.cli, "client");
    let plain = [
        Server::vdisk(None, &["-f", "qcow2", "-r"], &g),
        Server::qemu_nbd_with(None, &["-f", "qcow2", "-r"], &g),
    ];
    for s in &plain {
        let j = s.json("c0", "localhost");
        let want = message(&qemu_img(dir, &["info", "--object", &cli, &j]), "qemu-img");
        assert!(
            want.contains("Denied by server for option 5 (starttls)"),
            "{want}"
        );
        let got = message(&run(dir, VDISK, &["--object", &cli, "info", &j]), "vdisk");
        assert_eq!(got, want);
    }
    drop(plain);
    // A CA that did not sign the server's certificate.
    let other = x509("c0", &k.other, "client");
    for port in [q.port, v.port] {
        let url = format!("nbds://localhost:{port}?tls-creds=c0");
        let r = run(dir, VDISK, &["--object", &other, "info", &url]);
        assert!(message(&r, "vdisk").contains("not trusted"), "{}", r.err);
        // The certificate names localhost and 127.0.0.1, not this name.
        let cli = x509("c0", &k.cli, "client");
        let url = format!("nbds://localhost:{port}?tls-creds=c0&tls-hostname=elsewhere");
        let r = run(dir, VDISK, &["--object", &cli, "info", &url]);
        assert_eq!(message(&r, "vdisk"), "Could not open 'nbds://localhost:".to_string() + &format!("{port}?tls-creds=c0&tls-hostname=elsewhere': Certificate does not match the hostname elsewhere"));
    }
    let cli = x509("c0", &k.cli, "client");
    // authz: only the named client identity gets in.
    for (identity, allowed) in [(CLIENT_DN, true), ("CN=someone else", false)] {
        // `,,` is a comma in an --object value.
        let authz = format!(
            "authz-simple,id=auth0,identity={}",
            identity.replace(',', ",,")
        );
        let extra = [
            "--object",
            &authz,
            "--tls-authz",
            "auth0",
            "-f",
            "qcow2",
            "-r",
        ];
        let s = Server::launch(VDISK, &["serve", "-t"], Some(&srv), &extra, &g, None);
        let port = s.port;
        let j = s.json("c0", "localhost");
        let r = qemu_img(dir, &["info", "--object", &cli, &j]);
        assert_eq!(r.code == 0, allowed, "{identity}: {}", r.err);
        let url = format!("nbds://localhost:{port}?tls-creds=c0");
        let r = run(dir, VDISK, &["--object", &cli, "info", &url]);
        assert_eq!(r.code == 0, allowed, "{identity}: {}", r.err);
    }
    // Options a TLS server refuses, on the wire.
    wire_checks(v.port, &k.cli);
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Sends option `opt` (no data) and returns the reply type.
fn option(s: &mut vdisk::storage::nbd::Stream, opt: u32) -> u32 {
    let mut m = Vec::new();
    m.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&m).unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be32(&h[8..12]), opt);
    let mut data = vec![0u8; be32(&h[16..20]) as usize];
    s.read_exact(&mut data).unwrap();
    be32(&h[12..16])
}

/// Before STARTTLS every option gets `NBD_REP_ERR_TLS_REQD`; after it, a second
/// STARTTLS is `NBD_REP_ERR_INVALID`; the options then work over TLS.
fn wire_checks(port: u16, cli: &Path) {
    use vdisk::storage::nbd::{tls, Stream};
    const OPT_LIST: u32 = 3;
    const OPT_STARTTLS: u32 = 5;
    const OPT_STRUCTURED_REPLY: u32 = 8;
    const REP_ACK: u32 = 1;
    const REP_ERR_INVALID: u32 = (1 << 31) | 3;
    const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
    tls::define_object(&x509("wire", cli, "client"))
        .unwrap()
        .unwrap();
    let creds = tls::lookup("wire", tls::Endpoint::Client).unwrap();
    let t = TcpStream::connect(("127.0.0.1", port)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut s = Stream::Tcp(t);
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    assert_eq!(option(&mut s, OPT_LIST), REP_ERR_TLS_REQD);
    assert_eq!(option(&mut s, OPT_STRUCTURED_REPLY), REP_ERR_TLS_REQD);
    assert_eq!(option(&mut s, OPT_STARTTLS), REP_ACK);
    let mut s = tls::connect(s, &creds, Some("localhost")).unwrap();
    assert_eq!(option(&mut s, OPT_STARTTLS), REP_ERR_INVALID);
    assert_eq!(option(&mut s, OPT_STRUCTURED_REPLY), REP_ACK);
}

/// `vdisk storage-daemon --export type=nbd,…,tls-creds=ID` demands TLS like `serve`.
#[test]
fn storage_daemon_nbd_export_over_tls() {
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    let (g, _) = golden(dir);
    let sock = dir.join("d.sock");
    let export = format!(
        "type=nbd,image={},format=qcow2,addr.path={},name=g,tls-creds=tls0",
        g.display(),
        sock.display()
    );
    let mut child = Command::new(VDISK)
        .args([
            "storage-daemon",
            "--object",
            &x509("tls0", &k.srv, "server"),
        ])
        .args(["--export", &export])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "storage-daemon exited");
        assert!(Instant::now() < until, "storage-daemon did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cli = x509("c0", &k.cli, "client");
    let j = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{}"}},"export":"g","tls-creds":"c0","tls-hostname":"localhost"}}}}"#,
        sock.display()
    );
    let r = qemu_img(
        dir,
        &["compare", "--object", &cli, "-F", "qcow2", &j, "g.qcow2"],
    );
    let plain = qemu_img(
        dir,
        &["info", &format!("nbd+unix:///g?socket={}", sock.display())],
    );
    let url = format!(
        "nbds+unix:///g?socket={}&tls-creds=c0&tls-hostname=localhost",
        sock.display()
    );
    let v = run(
        dir,
        VDISK,
        &[
            "--object", &cli, "compare", "-U", "-F", "qcow2", &url, "g.qcow2",
        ],
    );
    // x509 over a Unix socket needs a host name to check, in QEMU and here.
    let no_host = format!("nbds+unix:///g?socket={}&tls-creds=c0", sock.display());
    let nh = run(dir, VDISK, &["--object", &cli, "info", &no_host]);
    // libnbd's URL over a Unix socket checks no name (libnbd checks nothing there);
    // vdisk still checks the chain: another CA is refused.
    let lib = format!(
        "nbds+unix:///g?socket={}&tls-certificates={}",
        sock.display(),
        k.cli.display()
    );
    let lv = run(
        dir,
        VDISK,
        &["compare", "-U", "-F", "qcow2", &lib, "g.qcow2"],
    );
    let ln = run(dir, "nbdinfo", &["--size", &lib]);
    let other = format!(
        "nbds+unix:///g?socket={}&tls-certificates={}",
        sock.display(),
        k.other_cli.display()
    );
    let lo = run(dir, VDISK, &["info", &other]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        message(&nh, "vdisk").ends_with("No hostname for certificate validation"),
        "{}",
        nh.err
    );
    ok(lv, "vdisk compare over libnbd's nbds+unix URL");
    assert_eq!(ok(ln, "nbdinfo").trim(), "16777216");
    assert!(message(&lo, "vdisk").contains("not trusted"), "{}", lo.err);
    ok(r, "qemu-img compare over the daemon's TLS export");
    ok(v, "vdisk compare over nbds+unix");
    assert!(
        message(&plain, "qemu-img").contains("TLS negotiation required"),
        "{}",
        plain.err
    );
}

/// Runs `vdisk args` with `LOGNAME=user` (libnbd's default PSK username), limited.
fn vdisk_as(dir: &Path, user: &str, args: &[&str]) -> Run {
    let o = Command::new("timeout")
        .arg("60")
        .arg(VDISK)
        .args(args)
        .env("LOGNAME", user)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    cli_support::collect(o)
}

/// `nbdkit -f -i 127.0.0.1 -p PORT --tls=require ARGS…` (TLS options, filters, the
/// plugin and its parameters).
fn nbdkit_tls(args: &[&str]) -> Server {
    let port = free_port();
    let port_s = port.to_string();
    let a = [
        &["-f", "-i", "127.0.0.1", "-p", &port_s, "--tls=require"][..],
        args,
    ]
    .concat();
    Server::start_logged(
        "nbdkit",
        a.iter().map(|s| s.to_string()).collect(),
        port,
        None,
    )
}

/// libnbd's URL keys (`tls-certificates=DIR`; `tls-psk-file=FILE` with the URL's user,
/// else `$LOGNAME`) work unchanged with vdisk against qemu-nbd and nbdkit: `info`
/// prints what qemu-img prints for the same export opened with QEMU's objects (the
/// name being the URL), `map` the same extents, and `convert` the bytes nbdcopy reads
/// through the same URL.
#[test]
fn libnbd_url_keys_against_qemu_nbd_and_nbdkit() {
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    let (g, raw) = golden(dir);
    let want = std::fs::read(&raw).unwrap();
    let alice = dir.join("alice");
    std::fs::create_dir_all(&alice).unwrap();
    let keys = alice.join("keys.psk");
    std::fs::write(&keys, format!("alice:{}\n", "5a17".repeat(16))).unwrap();
    let (cli, keys_s) = (k.cli.display().to_string(), keys.display().to_string());
    let raw_s = raw.display().to_string();
    let x509_obj = x509("c0", &k.cli, "client");
    let psk_obj = psk("c0", &alice, "client") + ",username=alice";
    let servers = [
        (
            "qemu-nbd x509",
            Server::qemu_nbd(&x509("tls0", &k.srv, "server"), &["-f", "qcow2", "-r"], &g),
            format!("?tls-certificates={cli}"),
            &x509_obj,
        ),
        (
            "nbdkit x509",
            nbdkit_tls(&[
                &format!("--tls-certificates={}", k.srv.display()),
                "file",
                &raw_s,
            ]),
            format!("?tls-certificates={cli}"),
            &x509_obj,
        ),
        (
            "qemu-nbd psk",
            Server::qemu_nbd(&psk("tls0", &alice, "server"), &["-f", "qcow2", "-r"], &g),
            format!("?tls-psk-file={keys_s}"),
            &psk_obj,
        ),
        (
            "nbdkit psk",
            nbdkit_tls(&[&format!("--tls-psk={keys_s}"), "file", &raw_s]),
            format!("?tls-psk-file={keys_s}"),
            &psk_obj,
        ),
    ];
    for (what, s, query, obj) in &servers {
        let psk = query.contains("psk");
        let user = if psk { "alice@" } else { "" };
        let url = format!("nbds://{user}localhost:{}/{query}", s.port);
        let j = s.json("c0", "localhost");
        // The same open through QEMU's objects, named as qemu-img names it.
        let qname = format!("nbd://localhost:{}", s.port);
        for args in [
            &["info"][..],
            &["info", "--output=json"],
            &["map"],
            &["map", "--output=json"],
        ] {
            let v = vdisk_ok(dir, &[args, &[url.as_str()][..]].concat());
            let q = ok(
                qemu_img(dir, &[args, &["--object", obj, &j][..]].concat()),
                "qemu-img",
            );
            assert_eq!(v, q.replace(&qname, &url), "{what} {args:?}");
        }
        // The bytes: vdisk convert and nbdcopy through the same URL.
        let _ = std::fs::remove_file(dir.join("v.raw"));
        vdisk_ok(dir, &["convert", "-O", "raw", &url, "v.raw"]);
        assert!(std::fs::read(dir.join("v.raw")).unwrap() == want, "{what}");
        let _ = std::fs::remove_file(dir.join("n.raw"));
        ok(run(dir, "nbdcopy", &[&url, "n.raw"]), "nbdcopy");
        assert!(std::fs::read(dir.join("n.raw")).unwrap() == want, "{what}");
        let size = ok(run(dir, "nbdinfo", &["--size", &url]), "nbdinfo");
        assert_eq!(size.trim(), want.len().to_string(), "{what}");
        if psk {
            // No user in the URL: libnbd's default, $LOGNAME, for both.
            let bare = url.replace("alice@", "");
            let r = vdisk_as(
                dir,
                "alice",
                &["compare", "-f", "raw", "-F", "raw", &bare, "g.raw"],
            );
            assert_eq!(r.code, 0, "{what}: {}", r.err);
            let r = vdisk_as(dir, "mallory", &["info", &bare]);
            assert!(
                message(&r, "vdisk")
                    .ends_with(&format!("Key for username mallory not found in {keys_s}")),
                "{what}: {}",
                r.err
            );
        } else {
            // Another CA (with the client's own certificate, which qemu-nbd checks):
            // refused, unless the peer is not verified (vdisk's key).
            let other = format!(
                "nbds://localhost:{}/?tls-certificates={}",
                s.port,
                k.other_cli.display()
            );
            let r = run(dir, VDISK, &["info", &other]);
            assert!(
                message(&r, "vdisk").contains("not trusted"),
                "{what}: {}",
                r.err
            );
            let unverified = other + "&tls-verify-peer=false";
            vdisk_ok(
                dir,
                &["compare", "-f", "raw", "-F", "raw", &unverified, "g.raw"],
            );
        }
    }
    // vdisk's JSON takes the same keys.
    let (_, s, query, _) = &servers[0];
    let j = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"inet","host":"localhost","port":"{}"}},"tls-certificates":"{}"}}}}"#,
        s.port,
        &query["?tls-certificates=".len()..]
    );
    vdisk_ok(dir, &["compare", "-F", "raw", &j, "g.raw"]);
}

/// A credentials file a URL names that is missing is the error the QEMU objects give
/// for it (qemu-img's words), before any connection is tried.
#[test]
fn libnbd_url_keys_name_missing_files() {
    let d = tmp();
    let dir = d.path();
    let gone = dir.join("gone");
    let g = gone.display().to_string();
    let cases = [
        (
            format!("tls-creds-x509,id=c0,dir={g},endpoint=client"),
            format!("nbds://localhost:1/?tls-certificates={g}"),
        ),
        (
            format!("tls-creds-psk,id=c0,dir={g},endpoint=client"),
            format!("nbds://u@localhost:1/?tls-psk-file={g}/keys.psk"),
        ),
        (
            format!("tls-creds-psk,id=c0,dir={g},endpoint=client"),
            // No user and no $LOGNAME: the missing file still comes first.
            format!("nbds://localhost:1/?tls-psk-file={g}/keys.psk"),
        ),
    ];
    for (obj, url) in cases {
        let q = message(
            &qemu_img(dir, &["info", "--object", &obj, "nbd://localhost:1"]),
            "qemu-img",
        );
        assert!(q.starts_with("Unable to access credentials"), "{q}");
        let v = message(&vdisk_as(dir, "", &["info", &url]), "vdisk");
        assert_eq!(v, format!("Could not open '{url}': {q}"));
    }
    // A certificate without its key is named too.
    std::fs::create_dir_all(&gone).unwrap();
    let k = pki(dir);
    for f in ["ca-cert.pem", "client-cert.pem"] {
        std::fs::copy(k.cli.join(f), gone.join(f)).unwrap();
    }
    let url = format!("nbds://localhost:1/?tls-certificates={g}");
    let v = message(&run(dir, VDISK, &["info", &url]), "vdisk");
    assert!(
        v.ends_with(&format!(
            "Unable to access credentials {g}/client-key.pem: No such file or directory"
        )),
        "{v}"
    );
}

// ---------------------------------------------------------------------------------
// Faults over TLS: each a clear error naming the export, exit status 1, never a hang
// (every command runs under `timeout 60`, whose 124 fails the test) or a panic.

/// Runs `vdisk convert -O raw SRC o.raw` in the background (under `timeout 60`),
/// waits until data reached `o.raw`, runs `kill`, and returns the result.
fn convert_then(dir: &Path, src: &str, kill: impl FnOnce()) -> Run {
    use std::os::unix::fs::MetadataExt;
    let out = dir.join("o.raw");
    let _ = std::fs::remove_file(&out);
    let child = Command::new("timeout")
        .args(["60", VDISK, "convert", "-O", "raw", src, "o.raw"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&out).map_or(0, |m| m.blocks()) == 0 {
        assert!(Instant::now() < until, "the copy from {src} did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    kill();
    cli_support::collect(child.wait_with_output().unwrap())
}

/// A failed copy: exit status 1 (not 124: no hang; not 101: no panic), one of
/// `reasons`, and the export's name in the message.
fn failed_naming(r: &Run, name: &str, reasons: &[&str], what: &str) {
    eprintln!("{what}: {}", r.err.trim_end());
    assert_eq!(r.code, 1, "{what}: {}{}", r.out, r.err);
    assert!(!r.err.contains("panicked"), "{what}: {}", r.err);
    assert!(r.err.contains(name), "{what} must name {name}: {}", r.err);
    assert!(
        reasons.iter().any(|w| r.err.contains(w)),
        "{what}: {} (expected one of {reasons:?})",
        r.err
    );
}

const CLOSED: &[&str] = &[
    "NBD server closed the connection",
    "NBD connection failed",
    "Connection reset",
];

impl Server {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server killed during a copy over TLS: nbdkit (delay filter), qemu-nbd (a
/// throttle group keeps the copy slow) and `vdisk serve` (re-exporting a slow nbdkit
/// export over TLS).
#[test]
fn tls_server_killed_mid_copy_is_an_error() {
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    let big = dir.join("big.raw");
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "big.raw", "64M"]),
        "create",
    );
    cli_support::qemu_io(dir, "raw", "big.raw", &["write -P 0x5a 0 64M"]);
    let certs = format!("--tls-certificates={}", k.srv.display());
    let url = |port: u16| {
        format!(
            "nbds://localhost:{port}/?tls-certificates={}",
            k.cli.display()
        )
    };
    // nbdkit: 50 ms a read.
    let delay = ["--filter=delay", "pattern", "256M", "delay-read=50ms"];
    let mut s = nbdkit_tls(&[&[&certs[..]][..], &delay].concat());
    let u = url(s.port);
    let r = convert_then(dir, &u, || s.kill());
    failed_naming(&r, &u, CLOSED, "nbdkit killed");

    // qemu-nbd reading at 4 MiB/s.
    let image = format!(
        "driver=throttle,throttle-group=tg0,file.driver=file,file.filename={}",
        big.display()
    );
    let mut s = Server::launch(
        "qemu-nbd",
        &["-t"],
        Some(&x509("tls0", &k.srv, "server")),
        &[
            "--object",
            "throttle-group,id=tg0,x-bps-read=4194304",
            "-r",
            "--image-opts",
        ],
        Path::new(&image),
        None,
    );
    let u = url(s.port);
    let r = convert_then(dir, &u, || s.kill());
    failed_naming(&r, &u, CLOSED, "qemu-nbd killed");

    // vdisk serve over TLS, its image a slow nbdkit export on a Unix socket.
    let sock = dir.join("slow.sock");
    let mut slow = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .args(["--filter=delay", "pattern", "256M", "delay-read=50ms"])
        .stdin(Stdio::null())
        .spawn()
        .expect("nbdkit must be installed");
    let until = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < until, "nbdkit did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let inner = format!("nbd+unix:///?socket={}", sock.display());
    let mut s = Server::vdisk(
        Some(&x509("tls0", &k.srv, "server")),
        &["-f", "raw", "-r"],
        Path::new(&inner),
    );
    let u = url(s.port);
    let r = convert_then(dir, &u, || s.kill());
    let _ = slow.kill();
    let _ = slow.wait();
    failed_naming(&r, &u, CLOSED, "vdisk serve killed");
}

/// A TCP proxy on 127.0.0.1 in front of `upstream` that forwards both ways and,
/// once `cut` bytes of one connection went from the server to the client, ends that
/// connection in the middle of whatever the server was sending: with a reset
/// (`reset`, SO_LINGER 0) or a plain FIN (the TLS stream truncated, no close_notify).
/// Returns its port.
fn cut_proxy(upstream: u16, cut: usize, reset: bool) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(s) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            let (c2, s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            // Client to server; once the server side is gone, what the client still
            // sends is read and dropped (so a cut stream is only a cut stream).
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while let Ok(n @ 1..) = (&c2).read(&mut buf) {
                    let _ = (&s2).write_all(&buf[..n]);
                }
                let _ = s2.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut sent = 0;
                while sent < cut {
                    let n = match (&s).read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(cut - sent),
                    };
                    if (&c).write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
                if reset {
                    use std::os::fd::AsRawFd;
                    let lg = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    // SAFETY: a valid socket and a linger struct of the size given.
                    unsafe {
                        libc::setsockopt(
                            c.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            (&lg as *const libc::linger).cast(),
                            std::mem::size_of::<libc::linger>() as libc::socklen_t,
                        );
                    }
                    // Wakes the other direction's reader (sending nothing), so
                    // both handles close and the last close sends the reset.
                    let _ = c.shutdown(std::net::Shutdown::Read);
                } else {
                    let _ = c.shutdown(std::net::Shutdown::Write);
                }
                let _ = s.shutdown(std::net::Shutdown::Both);
                // Dropping `c` and its clone (whose thread ends with the reset, or
                // when the client closes) closes it.
            });
        }
    });
    port
}

/// A connection reset and a TLS stream cut in the middle of a READ reply, in front of
/// qemu-nbd and `vdisk serve`.
#[test]
fn tls_connection_reset_and_truncated_stream() {
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    let (g, _) = golden(dir);
    let srv = x509("tls0", &k.srv, "server");
    let servers = [
        Server::qemu_nbd(&srv, &["-f", "qcow2", "-r"], &g),
        Server::vdisk(Some(&srv), &["-f", "qcow2", "-r"], &g),
    ];
    // 512 KiB + 777: past the handshake and negotiation, inside the 1 MiB of data at
    // 1 MiB (a TLS record cut in two).
    let cut = (512 << 10) + 777;
    for s in &servers {
        for reset in [true, false] {
            let port = cut_proxy(s.port, cut, reset);
            let u = format!(
                "nbds://localhost:{port}/?tls-certificates={}",
                k.cli.display()
            );
            let _ = std::fs::remove_file(dir.join("o.raw"));
            let r = run(dir, VDISK, &["convert", "-O", "raw", &u, "o.raw"]);
            let what = format!("server port {} reset={reset}", s.port);
            let why: &[&str] = if reset {
                // Seen by the reader or by a request being sent.
                &[
                    "NBD connection failed: Connection reset by peer",
                    "NBD connection failed while sending: Connection reset by peer",
                ]
            } else {
                &["NBD connection failed: the TLS stream was cut in the middle of a record"]
            };
            failed_naming(&r, &u, why, &what);
        }
    }
}

/// A slow server over TLS (nbdkit's delay filter with --tls=require): the request
/// timeout ends the copy with a clear error.
#[test]
fn tls_slow_server_times_out() {
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    let certs = format!("--tls-certificates={}", k.srv.display());
    let s = nbdkit_tls(&[&certs, "--filter=delay", "pattern", "4M", "delay-read=30"]);
    let port = s.port;
    let obj = x509("c0", &k.cli, "client");
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=localhost,\
         file.server.port={port},file.tls-creds=c0,file.timeout=1"
    );
    let r = run(
        dir,
        VDISK,
        &[
            "--object",
            &obj,
            "convert",
            "--image-opts",
            &opts,
            "-O",
            "raw",
            "o.raw",
        ],
    );
    let name = format!("nbd://localhost:{port}");
    failed_naming(&r, &name, &["NBD server did not reply within 1 s"], "slow");
    // The same through libnbd's URL keys in vdisk's JSON.
    let j = format!(
        r#"json:{{"file":{{"driver":"nbd","server":{{"type":"inet","host":"localhost","port":"{port}"}},"tls-certificates":"{}","timeout":1}}}}"#,
        k.cli.display()
    );
    let r = run(dir, VDISK, &["convert", "-O", "raw", &j, "o.raw"]);
    failed_naming(
        &r,
        &name,
        &["NBD server did not reply within 1 s"],
        "slow json",
    );
}

/// `vdisk serve -e 4` over TLS read by `nbdcopy --connections=4` (libnbd's URL) and by
/// vdisk's own client with `connections=4`: four TLS sessions each (the server's log
/// says so), the bytes exact.
#[test]
fn vdisk_serve_tls_with_four_connections() {
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "m.qcow2", "64M"]),
        "create",
    );
    cli_support::qemu_io(
        dir,
        "qcow2",
        "m.qcow2",
        &["write -P 0x21 0 20M", "write -P 0x42 40M 8M"],
    );
    let log = dir.join("serve.log");
    let s = Server::launch(
        VDISK,
        &["serve", "-v", "-t", "-e", "4"],
        Some(&x509("tls0", &k.srv, "server")),
        &["-f", "qcow2", "-r"],
        &dir.join("m.qcow2"),
        Some(&log),
    );
    let sessions = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches(": TLS TLSv1.3 ")
            .count()
    };
    let url = format!(
        "nbds://localhost:{}/?tls-certificates={}",
        s.port,
        k.cli.display()
    );
    let info = ok(run(dir, "nbdinfo", &[&url]), "nbdinfo");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    let before = sessions();
    // nbdcopy opens no more connections than threads.
    ok(
        run(
            dir,
            "nbdcopy",
            &["--connections=4", "--threads=4", &url, "n.raw"],
        ),
        "nbdcopy",
    );
    assert_eq!(sessions() - before, 4);
    let q = ok(
        qemu_img(
            dir,
            &["compare", "-f", "raw", "-F", "qcow2", "n.raw", "m.qcow2"],
        ),
        "compare",
    );
    assert!(q.contains("identical"), "{q}");
    let before = sessions();
    let j = format!(
        r#"json:{{"file":{{"driver":"nbd","server":{{"type":"inet","host":"localhost","port":"{}"}},"tls-certificates":"{}","connections":4}}}}"#,
        s.port,
        k.cli.display()
    );
    vdisk_ok(dir, &["convert", "-O", "raw", &j, "v.raw"]);
    assert_eq!(sessions() - before, 4);
    assert!(std::fs::read(dir.join("v.raw")).unwrap() == std::fs::read(dir.join("n.raw")).unwrap());
}

/// `nbds://host/` naming no credentials: libnbd's default directory (for root
/// `/etc/pki/libnbd`, else `$HOME/.pki/libnbd` or `$HOME/.config/pki/libnbd`), for
/// vdisk as for nbdinfo; run as `nobody` with a `$HOME` of the test's.
#[test]
fn libnbd_default_certificates_directory() {
    use std::os::unix::fs::PermissionsExt;
    let d = tmp();
    let dir = d.path();
    let k = pki(dir);
    let (g, _) = golden(dir);
    let s = Server::qemu_nbd(&x509("tls0", &k.srv, "server"), &["-f", "qcow2", "-r"], &g);
    let url = format!("nbds://localhost:{}/", s.port);
    // root: /etc/pki/libnbd, which this machine must not have.
    assert!(
        !Path::new("/etc/pki/libnbd/ca-cert.pem").exists(),
        "this test needs a machine without /etc/pki/libnbd/ca-cert.pem"
    );
    let r = run(dir, VDISK, &["info", &url]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            message(&r, "vdisk")
                .contains("(libnbd's default, /etc/pki/libnbd, has no ca-cert.pem)"),
            "{}",
            r.err
        );
    }
    // Another user: $HOME/.config/pki/libnbd (the first, .pki/libnbd, is empty).
    let home = dir.join("home");
    let certs = home.join(".config/pki/libnbd");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::create_dir_all(home.join(".pki/libnbd")).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(k.cli.join(f), certs.join(f)).unwrap();
    }
    for p in [dir.to_path_buf(), home.clone(), certs.clone()] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::set_permissions(certs.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let home_s = format!("HOME={}", home.display());
    let as_nobody = |prog: &str, args: &[&str]| {
        let pre = [
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            &home_s,
            prog,
        ];
        run(dir, "setpriv", &[&pre[..], args].concat())
    };
    let v = ok(
        as_nobody(VDISK, &["info", "--output=json", &url]),
        "vdisk as nobody",
    );
    assert!(v.contains("\"virtual-size\": 16777216"), "{v}");
    let n = ok(as_nobody("nbdinfo", &["--size", &url]), "nbdinfo as nobody");
    assert_eq!(n.trim(), "16777216");
}
