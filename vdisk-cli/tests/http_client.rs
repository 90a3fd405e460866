//! The HTTP(S) storage against nginx (started by the test on loopback, with a test CA
//! for https) and against a small in-test server that injects faults: 5xx answers,
//! truncated bodies, ignored ranges, silence. QEMU here has no curl module, so results
//! are compared with the same image read from the local file.

mod cli_support;

use cli_support::{ok, p, qemu_img, tmp, Run};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");

fn vdisk_env(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Run {
    let o = Command::new("timeout")
        .arg("60")
        .arg(VDISK)
        .args(args)
        .envs(env.iter().copied())
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

fn vdisk(dir: &Path, args: &[&str]) -> Run {
    vdisk_env(dir, &[], args)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// nginx serving `root` on 127.0.0.1, killed on drop.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// `tls`: (certificate, key) for an https server.
    fn start(dir: &Path, root: &Path, tls: Option<(&Path, &Path)>) -> Nginx {
        Nginx::start_with(dir, root, tls, "")
    }

    /// [`Nginx::start`] with more directives in the `server` block (`locations`).
    fn start_with(dir: &Path, root: &Path, tls: Option<(&Path, &Path)>, more: &str) -> Nginx {
        let port = free_port();
        let nd = dir.join(format!("nginx-{port}"));
        std::fs::create_dir_all(nd.join("tmp")).unwrap();
        let listen = match tls {
            None => format!("listen 127.0.0.1:{port};"),
            Some((c, k)) => format!(
                "listen 127.0.0.1:{port} ssl; ssl_certificate {}; ssl_certificate_key {};",
                c.display(),
                k.display()
            ),
        };
        let t = nd.join("tmp").display().to_string();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1;\n\
             error_log {d}/error.log; pid {d}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log {d}/access.log;\n\
               client_body_temp_path {t}; proxy_temp_path {t}; fastcgi_temp_path {t};\n\
               uwsgi_temp_path {t}; scgi_temp_path {t};\n\
               server {{ {listen} root {root}; {more} }} }}\n",
            d = nd.display(),
            root = root.display(),
        );
        let cf = nd.join("nginx.conf");
        std::fs::write(&cf, conf).unwrap();
        let prog = if Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx"
        } else {
            "nginx"
        };
        let child = Command::new(prog)
            .arg("-c")
            .arg(&cf)
            .arg("-p")
            .arg(&nd)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("nginx must be installed (scripts/test installs it): {e}"));
        let mut n = Nginx {
            child,
            port,
            dir: nd,
        };
        let until = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = n.child.try_wait() {
                panic!("nginx exited early: {st}");
            }
            assert!(Instant::now() < until, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    fn url(&self, scheme: &str, name: &str) -> String {
        let host = if scheme == "https" {
            "localhost"
        } else {
            "127.0.0.1"
        };
        format!("{scheme}://{host}:{}/{name}", self.port)
    }

    /// How many requests the server logged.
    fn requests(&self) -> usize {
        std::fs::read_to_string(self.dir.join("access.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 16 MiB golden image as raw and qcow2 in `www/`.
fn golden(dir: &Path) -> PathBuf {
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "www/g.raw", "16M"]),
        "create",
    );
    cli_support::qemu_io(
        dir,
        "raw",
        "www/g.raw",
        &[
            "write -P 0x11 1M 1M",
            "write -P 0x22 5M 64k",
            "write -P 0x33 15M 1M",
        ],
    );
    ok(
        qemu_img(dir, &["convert", "-O", "qcow2", "www/g.raw", "www/g.qcow2"]),
        "to qcow2",
    );
    www
}

#[test]
fn nginx_serves_a_golden_qcow2() {
    let d = tmp();
    let dir = d.path();
    let www = golden(dir);
    let n = Nginx::start(dir, &www, None);
    let u = n.url("http", "g.qcow2");
    // info and map say what they say of the local file, naming the URL.
    let local = p(&www, "g.qcow2").display().to_string();
    for args in [vec!["info"], vec!["map"], vec!["map", "--output=json"]] {
        let mut a = args.clone();
        a.push(&u);
        let remote = ok(vdisk(dir, &a), "remote");
        let mut a = args.clone();
        a.push(&local);
        let here = ok(vdisk(dir, &a), "local");
        let remote = remote
            .replace(&u, "NAME")
            .replace("protocol type: http", "protocol type: file");
        let here = here.replace(&local, "NAME");
        // The local file has a disk size; the remote one has none.
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.contains("disk size"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&remote), strip(&here), "{args:?}");
    }
    ok(vdisk(dir, &["compare", &u, "www/g.raw"]), "compare");
    ok(
        vdisk(dir, &["convert", "-O", "raw", &u, "o.raw"]),
        "convert",
    );
    ok(
        qemu_img(dir, &["compare", "-f", "raw", "o.raw", "www/g.raw"]),
        "compare converted",
    );
    // A raw image over http, through the json: syntax with QEMU's curl keys.
    let j = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"http","url":"{}","readahead":"64k","timeout":10}}}}"#,
        n.url("http", "g.raw")
    );
    ok(vdisk(dir, &["compare", &j, "www/g.raw"]), "json compare");
    // Writes are refused.
    let r = vdisk(
        dir,
        &[
            "io",
            "-f",
            "raw",
            "-c",
            "write 0 512",
            &n.url("http", "g.raw"),
        ],
    );
    assert!(
        r.err.contains("curl block device does not support writes"),
        "{}{}",
        r.out,
        r.err
    );
    let r = vdisk(dir, &["info", &n.url("http", "missing.qcow2")]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("HTTP 404"), "{}", r.err);
}

#[test]
fn qcow2_overlay_over_an_http_golden_image() {
    let d = tmp();
    let dir = d.path();
    let www = golden(dir);
    let n = Nginx::start(dir, &www, None);
    let u = n.url("http", "g.qcow2");
    cli_support::remote_overlay(
        dir,
        &u,
        "www/g.qcow2",
        &["write -P 0x55 1088k 64k", "read -P 0x11 1M 64k"],
    );
    let before = n.requests();
    // The block cache: reading the same 64 KiB twice in one process asks once.
    ok(
        vdisk(
            dir,
            &[
                "io",
                "-c",
                "read -P 0x11 1M 4k",
                "-c",
                "read -P 0x11 1M 4k",
                "-c",
                "read -P 0x11 1028k 4k",
                "top.qcow2",
            ],
        ),
        "cached reads",
    );
    let per_open = n.requests() - before;
    assert!(per_open <= 8, "{per_open} requests");
    // qemu-img has no curl here: check the overlay alone.
    let alone =
        r#"json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"top.qcow2"}}"#;
    let c = ok(qemu_img(dir, &["check", alone]), "qemu-img check");
    assert!(c.contains("No errors were found"), "{c}");
    ok(
        vdisk(dir, &["compare", "top.qcow2", "ref.qcow2"]),
        "compare",
    );
}

/// Copy-on-read (issue 12 part 4): a full read through `vdisk io -C` stores every
/// block of an HTTP golden image in the local overlay, so a second full read asks the
/// server for nothing beyond what opening the chain costs (the backing file's header
/// and tables), counted in nginx's access log. The overlay is then complete on its own:
/// qemu-img checks it and compares it bit-exact with the golden image with no backing.
#[test]
fn copy_on_read_fetches_each_block_once() {
    let d = tmp();
    let dir = d.path();
    let www = golden(dir);
    let n = Nginx::start(dir, &www, None);
    let u = n.url("http", "g.qcow2");
    for (top, cor) in [("plain.qcow2", None), ("cor.qcow2", Some("-C"))] {
        ok(
            vdisk(
                dir,
                &["create", "-q", "-f", "qcow2", "-b", &u, "-F", "qcow2", top],
            ),
            "create overlay",
        );
        // What opening the chain costs: a read the overlay answers alone (after the
        // first copy-on-read pass) or that is all holes in the golden image.
        let open_only = |top: &str| {
            let before = n.requests();
            ok(
                vdisk(dir, &["io", "-c", "read -P 0 0 4k", top]),
                "open only",
            );
            n.requests() - before
        };
        let full_read = |top: &str, flag: Option<&str>| {
            let before = n.requests();
            let mut a = vec!["io"];
            a.extend(flag);
            a.extend(["-c", "read 0 16M", top]);
            let out = ok(vdisk(dir, &a), "full read");
            assert!(!out.contains("failed"), "{out}");
            n.requests() - before
        };
        let first = full_read(top, cor);
        let base = open_only(top);
        let second = full_read(top, None);
        assert!(first > base, "{top}: first read {first}, open {base}");
        match cor {
            // Every block is local now: the second read costs only the open.
            Some(_) => assert_eq!(second, base, "{top}: second full read asked again"),
            // Without copy-on-read the second read fetches the data again.
            None => assert!(second > base, "{top}: {second} vs open {base}"),
        }
    }
    let alone = |f: &str| {
        format!(
            r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{f}"}}}}"#
        )
    };
    let c = ok(
        qemu_img(dir, &["check", &alone("cor.qcow2")]),
        "qemu-img check",
    );
    assert!(c.contains("No errors were found"), "{c}");
    ok(
        qemu_img(dir, &["compare", &alone("cor.qcow2"), "www/g.raw"]),
        "the overlay alone holds the whole golden image",
    );
    ok(
        vdisk(dir, &["compare", "cor.qcow2", "www/g.raw"]),
        "compare through the chain",
    );
    // The plain overlay stayed empty.
    let m = ok(
        qemu_img(dir, &["map", "--output=json", &alone("plain.qcow2")]),
        "map",
    );
    assert!(!m.contains(r#""data": true"#), "{m}");
}

/// Makes a test CA and a certificate for `localhost` signed by it, with openssl.
fn test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let sh = |cmd: &str| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed");
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=vdisk-test-ca 2>/dev/null");
    sh("openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=localhost 2>/dev/null");
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    sh("openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext.cnf 2>/dev/null");
    (p(dir, "ca.pem"), p(dir, "srv.pem"), p(dir, "srv.key"))
}

#[test]
fn https_with_a_test_ca() {
    let d = tmp();
    let dir = d.path();
    let www = golden(dir);
    let (ca, cert, key) = test_ca(dir);
    let n = Nginx::start(dir, &www, Some((&cert, &key)));
    let u = n.url("https", "g.qcow2");
    let ca = ca.display().to_string();
    let r = vdisk_env(
        dir,
        &[("SSL_CERT_FILE", &ca)],
        &["compare", &u, "www/g.raw"],
    );
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    let i = ok(
        vdisk_env(dir, &[("SSL_CERT_FILE", &ca)], &["info", &u]),
        "info",
    );
    assert!(i.contains("protocol type: https"), "{i}");
    // Without the CA the certificate is refused; sslverify=off accepts it.
    let r = vdisk(dir, &["info", &u]);
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.err.to_lowercase().contains("certificate"), "{}", r.err);
    let j = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"https","url":"{u}","sslverify":false}}}}"#
    );
    ok(vdisk(dir, &["compare", &j, "www/g.raw"]), "sslverify off");
}

// ---------------------------------------------------------------------------------
// A fault-injecting server: HEAD and ranged GET of one in-memory file; `fault` is
// asked for each GET (by its number) what to do.

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    Status503,
    Truncate,
    IgnoreRange,
    Silent,
}

struct FakeServer {
    port: u16,
    gets: Arc<AtomicUsize>,
}

fn fake_server(data: Vec<u8>, fault: fn(usize) -> Fault) -> FakeServer {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let gets = Arc::new(AtomicUsize::new(0));
    let g = Arc::clone(&gets);
    let data = Arc::new(data);
    std::thread::spawn(move || {
        // Bounded: the test process ends it; each connection is served by a thread
        // that stops at the first malformed request or closed socket.
        for s in l.incoming().take(200) {
            let Ok(s) = s else { break };
            let data = Arc::clone(&data);
            let g = Arc::clone(&g);
            std::thread::spawn(move || serve(s, &data, &g, fault));
        }
    });
    FakeServer { port, gets }
}

fn serve(s: TcpStream, data: &[u8], gets: &AtomicUsize, fault: fn(usize) -> Fault) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    for _ in 0..1000 {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let head = line.starts_with("HEAD");
        let mut range = None;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let (a, b) = v.split_once('-').unwrap();
                range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
            }
        }
        if head {
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n\r\n",
                data.len()
            );
            continue;
        }
        let n = gets.fetch_add(1, Ordering::SeqCst);
        let (a, b) = range.unwrap_or((0, data.len() - 1));
        let body = &data[a..=b];
        match fault(n) {
            Fault::Silent => {
                std::thread::sleep(Duration::from_secs(20));
                return;
            }
            Fault::Status503 => {
                let _ = w.write_all(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n");
            }
            Fault::IgnoreRange => {
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    data.len()
                );
                let _ = w.write_all(data);
            }
            Fault::Truncate => {
                let _ = write!(
                    w,
                    "HTTP/1.1 206 Partial\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\n\r\n",
                    body.len(),
                    data.len()
                );
                let _ = w.write_all(&body[..body.len() / 2]);
                return;
            }
            Fault::None => {
                let _ = write!(
                    w,
                    "HTTP/1.1 206 Partial\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\n\r\n",
                    body.len(),
                    data.len()
                );
                let _ = w.write_all(body);
            }
        }
    }
    let _ = r.read(&mut [0u8; 1]);
}

fn fake_image(dir: &Path) -> Vec<u8> {
    let data = cli_support::pattern(4 << 20, 9);
    std::fs::write(dir.join("want.raw"), &data).unwrap();
    data
}

#[test]
fn transient_faults_are_retried() {
    let d = tmp();
    let dir = d.path();
    let data = fake_image(dir);
    // Every other GET fails (503, then a truncated body); each retry succeeds.
    let s = fake_server(data, |n| match n % 4 {
        0 => Fault::Status503,
        2 => Fault::Truncate,
        _ => Fault::None,
    });
    let u = format!("http://127.0.0.1:{}/x.raw", s.port);
    ok(
        vdisk(dir, &["convert", "-f", "raw", "-O", "raw", &u, "o.raw"]),
        "convert through faults",
    );
    assert!(std::fs::read(p(dir, "o.raw")).unwrap() == std::fs::read(p(dir, "want.raw")).unwrap());
    assert!(s.gets.load(Ordering::SeqCst) >= 4);
}

#[test]
fn lasting_faults_are_clear_errors() {
    let d = tmp();
    let dir = d.path();
    let data = fake_image(dir);
    let s = fake_server(data.clone(), |_| Fault::Status503);
    let u = format!("http://127.0.0.1:{}/x.raw", s.port);
    let r = vdisk(dir, &["convert", "-f", "raw", "-O", "raw", &u, "o.raw"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("HTTP 503 (after 4 tries)"), "{}", r.err);

    let s = fake_server(data.clone(), |_| Fault::IgnoreRange);
    let u = format!("http://127.0.0.1:{}/x.raw", s.port);
    let r = vdisk(dir, &["convert", "-f", "raw", "-O", "raw", &u, "o.raw"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("ignored the range request"), "{}", r.err);

    let s = fake_server(data, |_| Fault::Silent);
    let j = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"http","url":"http://127.0.0.1:{}/x","timeout":1}}}}"#,
        s.port
    );
    let t = Instant::now();
    let r = vdisk(dir, &["convert", "-O", "raw", &j, "o.raw"]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("after 4 tries"), "{}", r.err);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

/// Basic authentication (`username` + `password-secret`), cookies from a secret
/// (`cookie-secret`) against nginx's `auth_basic` (an `openssl passwd -apr1`
/// htpasswd) and a cookie check: the right password reads bit-exact, a wrong or a
/// missing one is a clear 401 error at once (no retries).
#[test]
fn http_basic_auth_and_cookie_secret() {
    let d = tmp();
    let dir = d.path();
    let www = golden(dir);
    let hash = Command::new("openssl")
        .args(["passwd", "-apr1", "s3cret pw"])
        .output()
        .expect("openssl must be installed");
    assert!(hash.status.success());
    let htpasswd = dir.join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("alice:{}", String::from_utf8_lossy(&hash.stdout)),
    )
    .unwrap();
    let more = format!(
        r#"location /a/ {{ alias {root}/; auth_basic "vdisk"; auth_basic_user_file {h}; }}
           location /c/ {{ alias {root}/; if ($cookie_session != "abc123") {{ return 403; }} }}"#,
        root = www.display(),
        h = htpasswd.display()
    );
    let n = Nginx::start_with(dir, &www, None, &more);
    let node = |url: &str, extra: &str| {
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"http","url":"{url}"{extra}}}}}"#)
    };
    let a = n.url("http", "a/g.qcow2");
    let pw = "secret,id=pw,data=s3cret pw";
    let bad = "secret,id=bad,data=wrong";
    let good = node(&a, r#","username":"alice","password-secret":"pw""#);
    ok(
        vdisk(dir, &["--object", pw, "compare", &good, "www/g.raw"]),
        "right password",
    );
    let before = n.requests();
    let r = vdisk(
        dir,
        &[
            "--object",
            bad,
            "info",
            &node(&a, r#","username":"alice","password-secret":"bad""#),
        ],
    );
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(
        r.err
            .contains("HTTP 401 Unauthorized: the server refused the username and password"),
        "{}",
        r.err
    );
    assert_eq!(n.requests() - before, 1, "a 401 is not retried");
    let r = vdisk(dir, &["info", &a]);
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(
        r.err
            .contains("HTTP 401 Unauthorized: the server wants a username and password"),
        "{}",
        r.err
    );
    let r = vdisk(
        dir,
        &[
            "info",
            &node(&a, r#","username":"alice","password-secret":"nosuch""#),
        ],
    );
    assert!(r.err.contains("No secret with id 'nosuch'"), "{}", r.err);
    // A local overlay over the protected image: the backing node keeps its keys.
    ok(
        vdisk(
            dir,
            &[
                "--object",
                pw,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &good,
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        ),
        "overlay over a protected image",
    );
    ok(
        vdisk(dir, &["--object", pw, "compare", "top.qcow2", "www/g.raw"]),
        "overlay reads through the credentials",
    );
    // Cookies: the plain key and the secret one; both at once is QEMU's error.
    let c = n.url("http", "c/g.qcow2");
    let r = vdisk(dir, &["info", &c]);
    assert!(r.err.contains("HTTP 403"), "{}", r.err);
    ok(
        vdisk(
            dir,
            &[
                "compare",
                &node(&c, r#","cookie":"session=abc123""#),
                "www/g.raw",
            ],
        ),
        "cookie",
    );
    let cs = "secret,id=ck,data=session=abc123";
    ok(
        vdisk(
            dir,
            &[
                "--object",
                cs,
                "compare",
                &node(&c, r#","cookie-secret":"ck""#),
                "www/g.raw",
            ],
        ),
        "cookie-secret",
    );
    let r = vdisk(
        dir,
        &[
            "--object",
            cs,
            "info",
            &node(&c, r#","cookie-secret":"ck","cookie":"x=y""#),
        ],
    );
    assert!(
        r.err
            .contains("curl driver cannot handle both cookie and cookie secret"),
        "{}",
        r.err
    );
}

/// A CONNECT proxy on loopback that wants `want` in `Proxy-Authorization` (answering
/// 407 otherwise) and tunnels to `target`; counts the tunnels it opened.
fn connect_proxy(want: String, target: u16) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let tunnels = Arc::new(AtomicUsize::new(0));
    let t = Arc::clone(&tunnels);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let want = want.clone();
            let t = Arc::clone(&t);
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_string());
                }
                let authorized = head.iter().any(|h| {
                    h.to_ascii_lowercase().starts_with("proxy-authorization:")
                        && h.split_once(':').map(|(_, v)| v.trim()) == Some(want.as_str())
                });
                if !head.first().is_some_and(|l| l.starts_with("CONNECT ")) || !authorized {
                    let _ = s.write_all(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                          Proxy-Authenticate: Basic realm=\"p\"\r\nContent-Length: 0\r\n\r\n",
                    );
                    return;
                }
                let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else {
                    return;
                };
                t.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                let (mut a, mut b) = (up.try_clone().unwrap(), s.try_clone().unwrap());
                // What the reader buffered past the head is the client's first bytes.
                let pending = r.buffer().to_vec();
                let mut up_w = up;
                let _ = up_w.write_all(&pending);
                let down = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                });
                let _ = std::io::copy(&mut r, &mut up_w);
                let _ = up_w.shutdown(std::net::Shutdown::Both);
                let _ = down.join();
            });
        }
    });
    (port, tunnels)
}

/// `proxy-username` + `proxy-password-secret` with the proxy from `HTTP_PROXY`, as
/// libcurl reads it for QEMU: the right credentials tunnel through, none is a clear
/// 407 error.
#[test]
fn http_proxy_credentials() {
    let d = tmp();
    let dir = d.path();
    let www = golden(dir);
    let n = Nginx::start(dir, &www, None);
    // base64("bob:pr0xy").
    let want = "Basic Ym9iOnByMHh5".to_string();
    let (pport, tunnels) = connect_proxy(want, n.port);
    let proxy = format!("http://127.0.0.1:{pport}");
    let env = [("HTTP_PROXY", proxy.as_str()), ("NO_PROXY", "")];
    let u = n.url("http", "g.qcow2");
    let j = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"http","url":"{u}","proxy-username":"bob","proxy-password-secret":"pp"}}}}"#
    );
    ok(
        vdisk_env(
            dir,
            &env,
            &[
                "--object",
                "secret,id=pp,data=pr0xy",
                "compare",
                &j,
                "www/g.raw",
            ],
        ),
        "through the proxy",
    );
    assert!(
        tunnels.load(Ordering::SeqCst) >= 1,
        "the proxy was not used"
    );
    let r = vdisk_env(dir, &env, &["info", &u]);
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(
        r.err.contains("HTTP 407 Proxy Authentication Required"),
        "{}",
        r.err
    );
}
