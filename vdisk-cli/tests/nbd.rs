//! `vdisk serve` against real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy) and a
//! hand-written protocol client for what the tools can't send (hostile input, exact
//! flags, extended headers).
//!
//! Every server runs in a tempdir, is killed by a guard on drop, and every wait is
//! bounded.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");
const TOOL_TIMEOUT: &str = "60";

// ---------------------------------------------------------------------------------
// Helpers: running tools, servers.

/// Runs a tool under `timeout`, returning its output.
fn tool(prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(TOOL_TIMEOUT)
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"))
}

/// Runs a tool that must succeed; returns stdout.
fn ok(prog: &str, args: &[&str]) -> String {
    let o = tool(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// qemu-io commands on a URL or file; every command must succeed (qemu-io exits 0
/// even when a command fails, so its output is checked for "failed").
fn qemu_io(target: &str, fmt: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(target);
    let out = ok("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?} on {target}: {out}"
    );
    out
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

enum Endpoint {
    Unix(PathBuf),
    Tcp(u16),
}

/// A running `vdisk serve`, killed on drop.
struct Server {
    child: Option<Child>,
    ep: Endpoint,
    pid_file: PathBuf,
}

impl Server {
    /// Starts `vdisk serve ARGS FILE` on a Unix socket in `dir`.
    fn unix(dir: &Path, args: &[&str], file: &Path) -> Server {
        let sock = dir.join(format!("nbd-{}.sock", rand::random::<u32>()));
        Server::start(dir, args, file, Endpoint::Unix(sock))
    }

    /// Starts `vdisk serve ARGS FILE` on a free TCP port on 127.0.0.1.
    fn tcp(dir: &Path, args: &[&str], file: &Path) -> Server {
        Server::start(dir, args, file, Endpoint::Tcp(free_port()))
    }

    /// Starts qemu-nbd the same way, as an oracle.
    fn qemu_nbd(dir: &Path, args: &[&str], file: &Path) -> Server {
        let sock = dir.join(format!("qemu-{}.sock", rand::random::<u32>()));
        Server::start_prog("qemu-nbd", dir, args, file, Endpoint::Unix(sock))
    }

    fn start(dir: &Path, args: &[&str], file: &Path, ep: Endpoint) -> Server {
        Server::start_prog(VDISK, dir, args, file, ep)
    }

    fn start_prog(prog: &str, dir: &Path, args: &[&str], file: &Path, ep: Endpoint) -> Server {
        Server::start_with(prog, dir, args, file, ep, &[], None)
    }

    /// Starts `prog` with extra environment variables, its stderr to `stderr` if given.
    fn start_with(
        prog: &str,
        dir: &Path,
        args: &[&str],
        file: &Path,
        ep: Endpoint,
        env: &[(&str, &str)],
        stderr: Option<std::fs::File>,
    ) -> Server {
        let pid_file = dir.join(format!("serve-{}.pid", rand::random::<u32>()));
        let mut cmd = Command::new(prog);
        cmd.envs(env.iter().copied());
        if let Some(f) = stderr {
            cmd.stderr(f);
        }
        if prog == VDISK {
            cmd.arg("serve");
        }
        cmd.args(args);
        match &ep {
            Endpoint::Unix(p) => {
                cmd.arg("-k").arg(p);
            }
            Endpoint::Tcp(port) => {
                cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
            }
        }
        cmd.arg("--pid-file").arg(&pid_file).arg(file);
        // Temporary files (`-s` overlays) go to the test's directory.
        cmd.env("TMPDIR", dir);
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().expect("spawn vdisk serve");
        let mut s = Server {
            child: Some(child),
            ep,
            pid_file,
        };
        // The pid file is written once the socket listens.
        let until = Instant::now() + Duration::from_secs(20);
        while !s.pid_file.exists() {
            if let Some(st) = s.try_wait() {
                panic!("{prog} exited early: {st}");
            }
            assert!(
                Instant::now() < until,
                "vdisk serve did not start listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    fn uri(&self) -> String {
        self.uri_named("")
    }

    fn uri_named(&self, name: &str) -> String {
        match &self.ep {
            Endpoint::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Endpoint::Tcp(port) => format!("nbd://127.0.0.1:{port}/{name}"),
        }
    }

    fn sock(&self) -> &Path {
        match &self.ep {
            Endpoint::Unix(p) => p,
            Endpoint::Tcp(_) => panic!("not a unix socket server"),
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `secs` for the server to exit.
    fn wait_exit(&mut self, secs: u64) -> Option<ExitStatus> {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn terminate(&mut self) -> ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        self.wait_exit(30)
            .expect("server did not exit after SIGTERM")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn raw_image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", p.to_str().unwrap(), size],
    );
    p
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------
// A minimal protocol client.

const NBDMAGIC: u64 = 0x4e42444d41474943;
const IHAVEOPT: u64 = 0x49484156454F5054;
const OPT_REPLY: u64 = 0x3e889045565a9;

struct Client {
    s: UnixStream,
    extended: bool,
}

struct Chunk {
    flags: u16,
    typ: u16,
    cookie: u64,
    payload: Vec<u8>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl Client {
    /// Connects and reads the greeting; sends client flags (fixed newstyle, no zeroes).
    fn connect(sock: &Path) -> Client {
        let s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client { s, extended: false };
        let g = c.read_n(18);
        assert_eq!(be64(&g), NBDMAGIC);
        assert_eq!(be64(&g[8..]), IHAVEOPT);
        assert_eq!(be16(&g[16..]), 3, "fixed newstyle + no zeroes");
        c.send(&3u32.to_be_bytes());
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from server");
        b
    }

    /// True when the server has closed the connection (bounded by the read timeout).
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 4096];
        for _ in 0..1024 {
            match self.s.read(&mut b) {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
        false
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// Reads one option reply: (option, reply type, data).
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(be64(&h), OPT_REPLY);
        let len = be32(&h[16..]) as usize;
        let d = self.read_n(len);
        (be32(&h[8..]), be32(&h[12..]), d)
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// Sends GO; returns (size, transmission flags) or the error reply type.
    fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        self.option(7, &Client::go_data(name));
        let mut export = None;
        loop {
            let (opt, typ, d) = self.opt_reply();
            assert_eq!(opt, 7);
            match typ {
                1 => return Ok(export.expect("INFO_EXPORT before ACK")),
                3 if be16(&d) == 0 => export = Some((be64(&d[2..]), be16(&d[10..]))),
                3 => {}
                e => return Err(e),
            }
        }
    }

    /// Full negotiation: optional structured / extended headers and meta contexts.
    fn negotiated(
        sock: &Path,
        structured: bool,
        extended: bool,
        meta: &[&str],
    ) -> (Client, u64, u16) {
        let mut c = Client::connect(sock);
        if extended {
            c.option(11, &[]);
            assert_eq!(c.opt_reply().1, 1, "EXTENDED_HEADERS acked");
            c.extended = true;
        } else if structured {
            c.option(8, &[]);
            assert_eq!(c.opt_reply().1, 1, "STRUCTURED_REPLY acked");
        }
        if !meta.is_empty() {
            c.option(10, &Client::meta_data("", meta));
            loop {
                let (_, typ, _) = c.opt_reply();
                if typ == 1 {
                    break;
                }
                assert_eq!(typ, 4, "META_CONTEXT reply");
            }
        }
        let (size, flags) = c.go("").expect("GO accepted");
        (c, size, flags)
    }

    fn request(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let mut m = Vec::with_capacity(32 + payload.len());
        if self.extended {
            m.extend_from_slice(&0x21e41c71u32.to_be_bytes());
        } else {
            m.extend_from_slice(&0x25609513u32.to_be_bytes());
        }
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&typ.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        if self.extended {
            m.extend_from_slice(&len.to_be_bytes());
        } else {
            m.extend_from_slice(&(len as u32).to_be_bytes());
        }
        m.extend_from_slice(payload);
        self.send(&m);
    }

    /// Simple reply header: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(be32(&h), 0x67446698, "simple reply magic");
        (be32(&h[4..]), be64(&h[8..]))
    }

    /// Next structured or extended chunk (a simple reply shows up as typ 0xffff with the
    /// error in the payload).
    fn chunk(&mut self) -> Chunk {
        let m = self.read_n(4);
        match be32(&m) {
            0x668e33ef => {
                let h = self.read_n(16);
                let len = be32(&h[12..]) as usize;
                Chunk {
                    flags: be16(&h),
                    typ: be16(&h[2..]),
                    cookie: be64(&h[4..]),
                    payload: self.read_n(len),
                }
            }
            0x6e8a278c => {
                let h = self.read_n(28);
                let len = be64(&h[20..]) as usize;
                Chunk {
                    flags: be16(&h),
                    typ: be16(&h[2..]),
                    cookie: be64(&h[4..]),
                    payload: self.read_n(len),
                }
            }
            0x67446698 => {
                let h = self.read_n(12);
                Chunk {
                    flags: 1,
                    typ: 0xffff,
                    cookie: be64(&h[4..]),
                    payload: h[..4].to_vec(),
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Reads chunks until DONE; returns them all.
    fn reply(&mut self) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            let done = c.flags & 1 != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }
}

/// The error of a one-chunk reply (0 for success).
fn chunk_error(chunks: &[Chunk]) -> u32 {
    for c in chunks {
        if c.typ == 0xffff || c.typ & 0x8000 != 0 {
            return be32(&c.payload);
        }
    }
    0
}

// ---------------------------------------------------------------------------------
// Tests.

#[test]
fn qemu_io_over_unix_socket_then_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "8M");
    let mut srv = Server::unix(dir.path(), &["-f", "raw", "-t"], &img);
    let uri = srv.uri();
    qemu_io(
        &uri,
        "raw",
        &[
            "write -P 0xab 4k 64k",
            "write -P 0xcd 1M 512",
            "write -z 2M 1M",
            "flush",
            "read -P 0xab 4k 64k",
            "read -P 0xcd 1M 512",
            "read -P 0 2M 1M",
            "read -P 0 0 4k",
        ],
    );
    // A second connection sees the first one's writes.
    qemu_io(
        &uri,
        "raw",
        &["read -P 0xab 4k 64k", "write -P 0x11 6M 128k"],
    );
    let st = srv.terminate();
    assert!(st.success(), "SIGTERM exit status {st}");
    assert!(!srv.sock().exists(), "socket file removed");
    qemu_io(
        s(&img),
        "raw",
        &[
            "read -P 0xab 4k 64k",
            "read -P 0xcd 1M 512",
            "read -P 0x11 6M 128k",
        ],
    );
}

#[test]
fn qemu_img_over_tcp_convert_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "src.raw", "16M");
    qemu_io(
        s(&img),
        "raw",
        &["write -P 0x5a 0 3M", "write -P 0x77 9M 1M"],
    );
    let srv = Server::tcp(dir.path(), &["-f", "raw", "-t", "-r"], &img);
    let uri = srv.uri();
    let out = dir.path().join("copy.qcow2");
    ok("qemu-img", &["convert", "-O", "qcow2", &uri, s(&out)]);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(&img), s(&out)],
    );
    ok("qemu-img", &["compare", &uri, s(&img)]);
    let info = ok("qemu-img", &["info", "--output=json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 16 << 20);
    // Read-only export: writes fail.
    let o = tool("qemu-io", &["-f", "raw", "-c", "write 0 4k", &uri]);
    let txt = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() || txt.contains("failed"), "{txt}");
}

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = ok("nbdinfo", &["--json", uri]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    v["exports"][0].clone()
}

#[test]
fn nbdinfo_flags_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "4M");
    let check = |args: &[&str], ro: bool, multi: bool| {
        let mut a = vec!["-f", "raw", "-t"];
        a.extend_from_slice(args);
        let srv = Server::unix(dir.path(), &a, &img);
        let e = nbdinfo_json(&srv.uri());
        assert_eq!(e["export-size"], 4 << 20, "{args:?}");
        assert_eq!(e["is_read_only"], ro, "{args:?}");
        assert_eq!(e["can_multi_conn"], multi, "{args:?}");
        assert_eq!(e["can_flush"], true, "{args:?}");
        assert_eq!(e["can_fua"], true, "{args:?}");
        assert_eq!(e["can_cache"], true, "{args:?}");
        assert_eq!(e["can_df"], true, "{args:?}");
        assert_eq!(e["can_trim"], !ro, "{args:?}");
        assert_eq!(e["can_zero"], !ro, "{args:?}");
        assert_eq!(e["can_fast_zero"], !ro, "{args:?}");
        assert_eq!(e["block_size_minimum"], 1);
        assert_eq!(e["block_size_preferred"], 4096);
        assert_eq!(e["block_size_maximum"], 32 << 20);
    };
    check(&[], false, false);
    check(&["-e", "4"], false, true);
    check(&["-r"], true, false);
    check(&["-r", "-e", "2"], true, true);
}

#[test]
fn exact_transmission_flags_and_export_names() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "1M");
    let img2 = raw_image(dir.path(), "b.raw", "1M");
    let base: &[&str] = &["base:allocation"];
    for (args, structured, extended, meta, want) in [
        (&[][..], false, false, &[][..], 0x0c6du16),
        (&[][..], true, false, &[][..], 0x0ced),
        (&[][..], true, true, &[][..], 0x0ced),
        (&[][..], true, true, base, 0x1ced),
        (&["-e", "2"][..], true, true, base, 0x1ded),
        (&["-r"][..], true, false, base, 0x048f),
        (&["-r"][..], true, true, base, 0x148f),
        (&["-r", "-e", "3"][..], false, false, &[][..], 0x050f),
        (&["-A", "-e", "0"][..], true, false, base, 0x0ded),
    ] {
        let mut a = vec!["-f", "raw", "-t"];
        a.extend_from_slice(args);
        let srv = Server::unix(dir.path(), &a, &img);
        let (_c, size, flags) = Client::negotiated(srv.sock(), structured, extended, meta);
        assert_eq!(size, 1 << 20);
        assert_eq!(
            flags, want,
            "{args:?} structured={structured} extended={extended} {meta:?}: {flags:#x}"
        );
        // qemu-nbd, same options, same negotiation: same flags (on its own copy: a
        // writable export locks its image).
        let q = Server::qemu_nbd(dir.path(), &a, &img2);
        let (_qc, qsize, qflags) = Client::negotiated(q.sock(), structured, extended, meta);
        assert_eq!(
            (qsize, qflags),
            (size, flags),
            "qemu-nbd {args:?} s={structured} x={extended} {meta:?}"
        );
    }

    let srv = Server::unix(
        dir.path(),
        &["-f", "raw", "-t", "-x", "disk1", "-D", "my disk"],
        &img,
    );
    let list = ok("nbdinfo", &["--list", &srv.uri()]);
    assert!(list.contains("export=\"disk1\""), "{list}");
    assert!(list.contains("description: my disk"), "{list}");
    let o = tool("nbdinfo", &[&srv.uri_named("other")]);
    assert!(!o.status.success(), "unknown export must be refused");
    ok("nbdinfo", &["--size", &srv.uri_named("disk1")]);

    // Option haggling: unknown options and bad names don't end the negotiation.
    let mut c = Client::connect(srv.sock());
    c.option(200, b"whatever");
    let (opt, typ, _) = c.opt_reply();
    assert_eq!((opt, typ), (200, 0x8000_0001), "ERR_UNSUP");
    assert_eq!(c.go("nope"), Err(0x8000_0006), "ERR_UNKNOWN");
    c.option(10, &Client::meta_data("disk1", &["base:allocation"]));
    assert_eq!(
        c.opt_reply().1,
        0x8000_0003,
        "meta context needs structured replies"
    );
    c.option(8, &[]);
    assert_eq!(c.opt_reply().1, 1);
    c.option(8, &[]);
    assert_eq!(
        c.opt_reply().1,
        0x8000_0003,
        "second STRUCTURED_REPLY refused"
    );
    c.option(9, &Client::meta_data("disk1", &[]));
    let (_, typ, d) = c.opt_reply();
    assert_eq!(typ, 4);
    assert_eq!(&d[4..], b"base:allocation");
    assert_eq!(c.opt_reply().1, 1, "no allocation-depth without -A");
    c.option(3, &[]);
    let (_, typ, d) = c.opt_reply();
    assert_eq!(typ, 2);
    assert_eq!(&d[4..9], b"disk1");
    assert_eq!(c.opt_reply().1, 1);
    assert_eq!(c.go("disk1"), Ok((1 << 20, 0x0ced)));
    c.request(0, 2, 0, 0, 0, &[]);
    assert!(c.closed_by_server());
}

#[test]
fn block_status_maps_and_allocation_depth() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "8M");
    qemu_io(s(&img), "raw", &["write -P 1 0 64k", "write -P 2 4M 128k"]);
    let srv = Server::unix(dir.path(), &["-f", "raw", "-t", "-A"], &img);
    let map = ok("nbdinfo", &["--map", &srv.uri()]);
    let rows: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    // Holes in a raw file read as zeroes (3); written ranges are data (0).
    let at = |off: u64| {
        rows.iter()
            .find(|r| {
                let s: u64 = r[0].parse().unwrap();
                let l: u64 = r[1].parse().unwrap();
                s <= off && off < s + l
            })
            .map(|r| r[2].clone())
            .unwrap_or_else(|| panic!("no extent at {off}: {map}"))
    };
    assert_eq!(at(0), "0", "{map}");
    assert_eq!(at(4 << 20), "0", "{map}");
    assert_eq!(at(2 << 20), "3", "{map}");
    let total: u64 = rows.iter().map(|r| r[1].parse::<u64>().unwrap()).sum();
    assert_eq!(total, 8 << 20);
    // Like qemu-nbd on a raw file: everything is local to the top layer.
    let depth = ok("nbdinfo", &["--map=qemu:allocation-depth", &srv.uri()]);
    assert_eq!(
        depth.split_whitespace().collect::<Vec<_>>(),
        ["0", "8388608", "1", "local"],
        "{depth}"
    );
    // qemu-img map over NBD agrees with the file.
    let m = ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &srv.uri()],
    );
    let v: serde_json::Value = serde_json::from_str(&m).unwrap();
    assert_eq!(v[0]["data"], true);
    assert_eq!(v[0]["length"], 65536);
}

#[test]
fn structured_and_extended_replies() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "4M");
    qemu_io(
        s(&img),
        "raw",
        &["write -P 0x42 0 64k", "write -P 0x43 2M 1M"],
    );
    let srv = Server::unix(dir.path(), &["-f", "raw", "-t", "-A", "-e", "2"], &img);

    // Structured: a read over data and a hole comes back as DATA + HOLE chunks.
    let (mut c, _, _) = Client::negotiated(
        srv.sock(),
        true,
        false,
        &[
            "base:allocation",
            "qemu:allocation-depth",
            "x-unknown:thing",
        ],
    );
    c.request(0, 0, 1, 0, 1 << 20, &[]);
    let chunks = c.reply();
    let mut buf = vec![0xffu8; 1 << 20];
    let mut covered = 0u64;
    let mut kinds = Vec::new();
    for ch in &chunks {
        assert_eq!(ch.cookie, 1);
        let off = if ch.typ == 1 || ch.typ == 2 {
            be64(&ch.payload) as usize
        } else {
            0
        };
        match ch.typ {
            1 => {
                let d = &ch.payload[8..];
                buf[off..off + d.len()].copy_from_slice(d);
                covered += d.len() as u64;
            }
            2 => {
                let n = be32(&ch.payload[8..]) as usize;
                buf[off..off + n].fill(0);
                covered += n as u64;
            }
            0 => {}
            t => panic!("unexpected chunk type {t}"),
        }
        kinds.push(ch.typ);
    }
    assert_eq!(covered, 1 << 20);
    assert!(
        kinds.contains(&1) && kinds.contains(&2),
        "data and hole chunks: {kinds:?}"
    );
    assert!(buf[..65536].iter().all(|&b| b == 0x42));
    assert!(buf[65536..].iter().all(|&b| b == 0));
    // DF: exactly one content chunk.
    c.request(0x4, 0, 2, 0, 1 << 20, &[]);
    let chunks = c.reply();
    assert_eq!(
        chunks.iter().filter(|c| c.typ == 1 || c.typ == 2).count(),
        1
    );
    assert_eq!(chunks[0].payload.len(), 8 + (1 << 20));
    // Without DF, 1 MiB of data is still one chunk (what QEMU's client reads in one
    // go; the server sends header and data in one writev): the hole search splits
    // nothing that isn't a hole.
    c.request(0, 0, 9, 2 << 20, 1 << 20, &[]);
    let chunks = c.reply();
    assert_eq!(chunks.len(), 1, "1 MiB of data in {} chunks", chunks.len());
    assert_eq!((chunks[0].typ, chunks[0].flags & 1), (1, 1));
    assert_eq!(chunks[0].payload.len(), 8 + (1 << 20));
    assert!(chunks[0].payload[8..].iter().all(|&b| b == 0x43));
    // Block status: one chunk per context; REQ_ONE gives one descriptor within range.
    c.request(0, 7, 3, 0, 4 << 20, &[]);
    let chunks = c.reply();
    assert_eq!(chunks.len(), 2);
    for ch in &chunks {
        assert_eq!(ch.typ, 5);
        let id = be32(&ch.payload);
        let descs: Vec<(u32, u32)> = ch.payload[4..]
            .chunks(8)
            .map(|d| (be32(d), be32(&d[4..])))
            .collect();
        let total: u64 = descs.iter().map(|d| d.0 as u64).sum();
        assert_eq!(total, 4 << 20);
        if descs.len() == 1 {
            assert_eq!(
                descs[0].1, 1,
                "allocation depth of a raw file is 1 (id {id})"
            );
        } else {
            assert_eq!(descs[0], (65536, 0), "base:allocation data first (id {id})");
            assert_eq!(descs[1].1, 3);
        }
    }
    c.request(0x8, 7, 4, 0, 4096, &[]);
    for ch in c.reply() {
        assert_eq!(ch.payload.len(), 12, "exactly one descriptor");
        assert!(be32(&ch.payload[4..]) <= 4096);
    }
    // Errors come as error chunks and the connection goes on.
    c.request(0, 0, 5, 4 << 20, 4096, &[]);
    assert_eq!(chunk_error(&c.reply()), 22, "read past end: EINVAL");
    c.request(0, 1, 6, (4 << 20) - 10, 20, &[7u8; 20]);
    assert_eq!(
        chunk_error(&c.reply()),
        22,
        "write past end: EINVAL, as qemu-nbd"
    );
    c.request(0, 3, 7, 0, 0, &[]);
    assert_eq!(chunk_error(&c.reply()), 0, "flush");

    // Extended headers: 64-bit replies, writes with PAYLOAD_LEN, BLOCK_STATUS_EXT.
    let (mut c, size, flags) = Client::negotiated(srv.sock(), true, true, &["base:allocation"]);
    assert_eq!(size, 4 << 20);
    assert_eq!(flags & 0x1000, 0x1000);
    c.request(0x20 | 0x1, 1, 10, 8192, 4096, &[9u8; 4096]);
    let r = c.reply();
    assert_eq!(
        (r.len(), r[0].typ, chunk_error(&r)),
        (1, 0, 0),
        "NONE chunk on success"
    );
    c.request(0, 0, 11, 8192, 4096, &[]);
    let r = c.reply();
    assert_eq!(r[0].typ, 1);
    assert!(r[0].payload[8..].iter().all(|&b| b == 9));
    c.request(0, 7, 12, 0, 4 << 20, &[]);
    let r = c.reply();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].typ, 6, "BLOCK_STATUS_EXT");
    let n = be32(&r[0].payload[4..]) as usize;
    assert_eq!(r[0].payload.len(), 8 + 16 * n);
    let total: u64 = (0..n).map(|i| be64(&r[0].payload[8 + 16 * i..])).sum();
    assert_eq!(total, 4 << 20);
    // Payload form of BLOCK_STATUS: effect length + context ids.
    let mut p = Vec::new();
    p.extend_from_slice(&4096u64.to_be_bytes());
    p.extend_from_slice(&1u32.to_be_bytes());
    c.request(0x20, 7, 13, 0, p.len() as u64, &p);
    let r = c.reply();
    assert_eq!(chunk_error(&r), 0);
    assert_eq!(r[0].typ, 6);
    // 64-bit effect lengths beyond the export are refused, not truncated.
    c.request(0, 4, 14, 0, 1 << 40, &[]);
    assert_eq!(chunk_error(&c.reply()), 22);
}

#[test]
fn hostile_clients_are_dropped_alone() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "4M");
    let srv = Server::unix(dir.path(), &["-f", "raw", "-t", "-e", "8"], &img);
    let good_uri = srv.uri();

    // Garbage instead of client flags.
    let mut c = UnixStream::connect(srv.sock()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(b"GARBAGE!GARBAGE!GARBAGE!").unwrap();
    let mut b = [0u8; 64];
    assert!(
        matches!(c.read(&mut b), Ok(0) | Err(_)),
        "dropped after bad flags"
    );

    // Bad option magic.
    let mut c = Client::connect(srv.sock());
    c.send(&[0x55u8; 16]);
    assert!(c.closed_by_server());

    // Bad request magic in transmission.
    let (mut c, _, _) = Client::negotiated(srv.sock(), false, false, &[]);
    c.send(&[0xaau8; 28]);
    assert!(c.closed_by_server());

    // Malformed but well-framed requests get errors and the connection goes on.
    let (mut c, _, _) = Client::negotiated(srv.sock(), false, false, &[]);
    c.request(0, 0, 1, 4 << 20, 512, &[]);
    assert_eq!(c.simple(), (22, 1), "read past the end");
    c.request(0, 0, 2, 0, 64 << 20, &[]);
    assert_eq!(c.simple(), (22, 2), "read larger than 32 MiB");
    c.request(0, 99, 3, 0, 0, &[]);
    assert_eq!(c.simple(), (22, 3), "unknown command");
    c.request(0x2, 0, 4, 0, 512, &[]);
    assert_eq!(c.simple(), (22, 4), "NO_HOLE on READ");
    c.request(0, 7, 5, 0, 512, &[]);
    assert_eq!(c.simple(), (22, 5), "BLOCK_STATUS without contexts");
    c.request(0, 1, 6, u64::MAX - 10, 512, &[1u8; 512]);
    assert_eq!(c.simple(), (22, 6), "write with overflowing offset");
    let big = vec![0x33u8; (32 << 20) + 4096];
    c.request(0, 1, 7, 0, big.len() as u64, &big);
    assert_eq!(
        c.simple(),
        (22, 7),
        "oversize write refused, payload skipped"
    );
    c.request(0, 1, 8, 0, 4096, &[0x44u8; 4096]);
    assert_eq!(c.simple(), (0, 8));
    c.request(0, 0, 9, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 9));
    assert!(
        c.read_n(4096).iter().all(|&b| b == 0x44),
        "oversize write wrote nothing"
    );

    // Many requests in flight at once all get answered (bounded in-flight queue).
    for i in 0..100u64 {
        c.request(0, 0, 1000 + i, i * 4096 % (4 << 20), 4096, &[]);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let (e, cookie) = c.simple();
        assert_eq!(e, 0);
        c.read_n(4096);
        assert!(seen.insert(cookie));
    }

    // A client vanishing in the middle of a write payload.
    let (mut c2, _, _) = Client::negotiated(srv.sock(), false, false, &[]);
    c2.request(0, 1, 1, 1 << 20, 65536, &[0x66u8; 1000]);
    drop(c2);

    // A stalled handshake and all of the above don't stop a well-behaved client.
    let _stalled = UnixStream::connect(srv.sock()).unwrap();
    qemu_io(
        &good_uri,
        "raw",
        &[
            "write -P 0x77 0 64k",
            "read -P 0x77 0 64k",
            "read -P 0 1M 64k",
        ],
    );
    // The connection from before is still usable.
    c.request(0, 0, 50, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 50));
    assert!(c.read_n(4096).iter().all(|&b| b == 0x77));
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "1M");
    let srv = Server::unix(dir.path(), &["-f", "raw", "-t", "-r"], &img);
    let (mut c, _, flags) = Client::negotiated(srv.sock(), false, false, &[]);
    assert_eq!(flags & 2, 2);
    c.request(0, 1, 1, 0, 512, &[1u8; 512]);
    assert_eq!(c.simple(), (1, 1), "WRITE: EPERM");
    c.request(0, 4, 2, 0, 512, &[]);
    assert_eq!(c.simple(), (1, 2), "TRIM: EPERM");
    c.request(0, 6, 3, 0, 512, &[]);
    assert_eq!(c.simple(), (1, 3), "WRITE_ZEROES: EPERM");
    c.request(0, 3, 4, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 4), "FLUSH is fine");
    c.request(0, 5, 5, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 5), "CACHE is fine");
}

#[test]
fn handshake_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "1M");
    let srv = Server::unix(
        dir.path(),
        &["-f", "raw", "-t", "-e", "2", "--handshake-limit", "1"],
        &img,
    );
    let mut c = UnixStream::connect(srv.sock()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let start = Instant::now();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    let mut b = [0u8; 16];
    let r = c.read(&mut b);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let e = start.elapsed();
    assert!(
        e < Duration::from_secs(10),
        "stalled handshake cut after {e:?}"
    );
    ok("nbdinfo", &["--size", &srv.uri()]);
}

#[test]
fn nbdcopy_in_and_out() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", "32M");
    qemu_io(
        s(&src),
        "raw",
        &[
            "write -P 0x21 0 5M",
            "write -P 0x43 20M 7M",
            "write -P 0x65 31M 1M",
        ],
    );
    // Out: read the export into a file with several connections.
    let srv = Server::unix(dir.path(), &["-f", "raw", "-t", "-r", "-e", "4"], &src);
    let out = dir.path().join("out.raw");
    ok("nbdcopy", &[&srv.uri(), s(&out)]);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&src), s(&out)],
    );
    drop(srv);
    // In: write a file into a fresh export.
    let dst = raw_image(dir.path(), "dst.raw", "32M");
    let mut srv = Server::unix(
        dir.path(),
        &["-f", "raw", "-e", "4", "--discard", "unmap"],
        &dst,
    );
    ok("nbdcopy", &[s(&src), &srv.uri()]);
    // Not persistent: the server leaves once nbdcopy's connections are gone.
    let st = srv
        .wait_exit(30)
        .expect("server exits after the last client");
    assert!(st.success(), "{st}");
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&src), s(&dst)],
    );
}

#[test]
fn concurrent_writers_on_one_export() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "16M");
    let mut srv = Server::tcp(dir.path(), &["-f", "raw", "-t", "-e", "4"], &img);
    let uri = srv.uri();
    let writers: Vec<_> = (0..4u32)
        .map(|w| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let mut cmds = Vec::new();
                for i in 0..16u32 {
                    let off = (w * 4 + i / 4) as u64 * (1 << 20) + (i % 4) as u64 * 256 * 1024;
                    cmds.push(format!("aio_write -P {} {} 256k", 0x10 + w, off));
                }
                cmds.push("aio_flush".into());
                let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
                qemu_io(&uri, "raw", &refs);
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread");
    }
    for w in 0..4u32 {
        let cmd = format!("read -P {} {} 4M", 0x10 + w, w as u64 * (4 << 20));
        qemu_io(&uri, "raw", &[&cmd]);
    }
    assert!(srv.terminate().success());
    for w in 0..4u32 {
        let cmd = format!("read -P {} {} 4M", 0x10 + w, w as u64 * (4 << 20));
        qemu_io(s(&img), "raw", &[&cmd]);
    }
}

#[test]
fn fork_pid_file_and_last_client_exit() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "1M");
    let sock = dir.path().join("f.sock");
    let pidf = dir.path().join("f.pid");
    let o = tool(
        VDISK,
        &[
            "serve",
            "--fork",
            "--pid-file",
            s(&pidf),
            "-f",
            "raw",
            "-k",
            s(&sock),
            s(&img),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The parent returned: the socket is listening and the pid file written.
    let pid: i32 = std::fs::read_to_string(&pidf)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signal 0 only probes for existence.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "daemon alive");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_io(&uri, "raw", &["write -P 3 0 4k"]);
    // Not persistent: the daemon leaves after its only client.
    let until = Instant::now() + Duration::from_secs(30);
    while unsafe { libc::kill(pid, 0) } == 0 {
        if Instant::now() > until {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("daemon did not exit after the last client");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "socket removed");
    assert!(pidf.exists(), "pid file left, as qemu-nbd leaves it");
    qemu_io(s(&img), "raw", &["read -P 3 0 4k"]);

    // Failures before listening are reported by the parent's exit code.
    let o = tool(
        VDISK,
        &[
            "serve",
            "--fork",
            "-k",
            s(&sock),
            s(&dir.path().join("missing")),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let o = tool(
        VDISK,
        &["serve", "-k", s(&sock), "--detect-zeroes", "unmap", s(&img)],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "detect-zeroes=unmap needs discard=unmap"
    );
}

#[test]
fn discard_and_detect_zeroes_policies() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "4M");
    qemu_io(s(&img), "raw", &["write -P 1 0 4M"]);
    let allocated = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    // Default (--discard=ignore): TRIM succeeds but keeps the data allocated.
    {
        let srv = Server::unix(dir.path(), &["-f", "raw", "-t"], &img);
        qemu_io(&srv.uri(), "raw", &["discard 0 1M"]);
        qemu_io(&srv.uri(), "raw", &["read -P 1 0 1M"]);
    }
    assert!(allocated(&img) >= 4 << 20);
    // --discard=unmap: TRIM punches holes; --detect-zeroes=unmap turns zero writes into holes.
    let srv = Server::unix(
        dir.path(),
        &[
            "-f",
            "raw",
            "-t",
            "--discard",
            "unmap",
            "--detect-zeroes",
            "unmap",
        ],
        &img,
    );
    qemu_io(
        &srv.uri(),
        "raw",
        &[
            "discard 0 1M",
            "write -P 0 2M 1M",
            "read -P 0 0 1M",
            "read -P 0 2M 1M",
            "read -P 1 1M 1M",
        ],
    );
    drop(srv);
    assert!(
        allocated(&img) <= 2 << 20,
        "holes punched: {}",
        allocated(&img)
    );
}

#[test]
fn sigterm_with_clients_connected_keeps_acknowledged_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "8M");
    let mut srv = Server::unix(dir.path(), &["-f", "raw", "-t", "-e", "4"], &img);
    // One client idle mid-handshake, one idle in transmission, one busy writing.
    let _handshaking = Client::connect(srv.sock());
    let (mut idle, _, _) = Client::negotiated(srv.sock(), true, false, &[]);
    let (mut busy, _, _) = Client::negotiated(srv.sock(), false, false, &[]);
    const N: u64 = 64;
    for i in 0..N {
        let data = vec![(i as u8) | 0x80; 65536];
        busy.request(0, 1, i, i * 65536, 65536, &data);
    }
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(srv.pid(), libc::SIGTERM);
    }
    // Collect the replies that make it out before the server hangs up.
    let mut acked = Vec::new();
    let mut h = [0u8; 16];
    while busy.s.read_exact(&mut h).is_ok() {
        assert_eq!(be32(&h), 0x67446698);
        assert_eq!(be32(&h[4..]), 0, "write failed");
        acked.push(be64(&h[8..]));
    }
    assert!(idle.closed_by_server());
    let st = srv.wait_exit(30).expect("server exits after SIGTERM");
    assert!(st.success(), "{st}");
    let data = std::fs::read(&img).unwrap();
    for i in acked {
        let want = (i as u8) | 0x80;
        let r = &data[(i * 65536) as usize..((i + 1) * 65536) as usize];
        assert!(r.iter().all(|&b| b == want), "acknowledged write {i} lost");
    }
}

/// `nbdinfo --map` for both contexts, from a server.
fn maps(srv: &Server) -> String {
    let uri = srv.uri();
    ok("nbdinfo", &["--map", &uri]) + &ok("nbdinfo", &["--map=qemu:allocation-depth", &uri])
}

#[test]
fn block_status_matches_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // raw with data and holes
    let raw = raw_image(d, "base.raw", "32M");
    qemu_io(s(&raw), "raw", &["write -P 1 0 3M", "write -P 2 20M 1M"]);
    // qcow2 over the raw file, qcow2 over qcow2: allocated, zero, unallocated clusters
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
        ],
    );
    qemu_io(
        s(&mid),
        "qcow2",
        &["write -P 3 1M 1M", "write -z 8M 2M", "write -P 4 24M 64k"],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    qemu_io(
        s(&top),
        "qcow2",
        &[
            "write -P 5 2M 128k",
            "write -z 20M 512k",
            "discard 24M 64k",
            "write -P 6 31M 1M",
        ],
    );
    let lone = d.join("lone.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&lone), "16M"],
    );
    qemu_io(
        s(&lone),
        "qcow2",
        &["write -P 7 64k 64k", "write -z 1M 1M", "write -z -u 4M 1M"],
    );
    let qed = d.join("top.qed");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&qed),
        ],
    );
    qemu_io(
        s(&qed),
        "qed",
        &["write -P 8 0 64k", "write -z 8M 1M", "write -P 9 30M 2M"],
    );
    for (img, fmt) in [
        (&raw, "raw"),
        (&qed, "qed"),
        (&mid, "qcow2"),
        (&top, "qcow2"),
        (&lone, "qcow2"),
    ] {
        let args = ["-f", fmt, "-r", "-t", "-A"];
        let ours = maps(&Server::unix(d, &args, img));
        let theirs = maps(&Server::qemu_nbd(d, &args, img));
        assert_eq!(ours, theirs, "maps of {}", img.display());
        // And the data itself.
        let a = Server::unix(d, &args, img);
        let b = Server::qemu_nbd(d, &args, img);
        ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &a.uri(), &b.uri()],
        );
    }
}

/// Writes through the server with several clients at once, then SIGTERM: the image
/// must be clean for `qemu-img check` and equal to the same writes done by qemu-io.
fn writes_then_sigterm(fmt: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join(format!("t.{fmt}"));
    let reference = raw_image(d, "ref.raw", "64M");
    ok("qemu-img", &["create", "-q", "-f", fmt, s(&img), "64M"]);
    let mut srv = Server::unix(d, &["-f", fmt, "-t", "-e", "4", "--discard", "unmap"], &img);
    let uri = srv.uri();
    // Four writers at once, each on its own 16 MiB, allocating as they go.
    let per_writer = |w: u64| -> Vec<String> {
        let base = w * (16 << 20);
        let mut v = Vec::new();
        for k in 0..24u64 {
            // Disjoint (they run concurrently), out of order, partly unaligned.
            let i = k * 7 % 24;
            let off = base + i * (600 << 10) + (i % 3) * 512;
            let len = 4096 + (i % 5) * 65536;
            v.push(format!("aio_write -P {} {off} {len}", 0x20 + w * 8 + i % 8));
        }
        v.push("aio_flush".into());
        v.push(format!("write -z {} 256k", base + (15 << 20)));
        v.push(format!("discard {} 64k", base + (15 << 20) + (512 << 10)));
        v
    };
    let threads: Vec<_> = (0..4u64)
        .map(|w| {
            let uri = uri.clone();
            let cmds = per_writer(w);
            std::thread::spawn(move || {
                let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
                qemu_io(&uri, "raw", &refs);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    let st = srv.terminate();
    assert!(st.success(), "{st}");
    // The same writes, in the same order per area, straight into a raw reference.
    for w in 0..4u64 {
        let cmds: Vec<String> = per_writer(w)
            .into_iter()
            .filter(|c| !c.starts_with("aio_flush"))
            .map(|c| c.replacen("aio_write", "write", 1))
            .map(|c| {
                if c.starts_with("discard") {
                    c.replacen("discard", "write -z", 1)
                } else {
                    c
                }
            })
            .collect();
        let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
        qemu_io(s(&reference), "raw", &refs);
    }
    if fmt != "raw" {
        let check = tool("qemu-img", &["check", "-f", fmt, s(&img)]);
        assert!(
            check.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    ok(
        "qemu-img",
        &["compare", "-f", fmt, "-F", "raw", s(&img), s(&reference)],
    );
}

#[test]
fn qcow2_concurrent_writes_sigterm_check_clean() {
    writes_then_sigterm("qcow2");
}

#[test]
fn raw_concurrent_writes_sigterm_compare() {
    writes_then_sigterm("raw");
}

#[test]
fn qed_concurrent_writes_sigterm_check_clean() {
    writes_then_sigterm("qed");
}

#[test]
fn qed_need_check_clear_after_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qed");
    ok("qemu-img", &["create", "-q", "-f", "qed", s(&img), "16M"]);
    let need_check = |p: &Path| {
        let h = std::fs::read(p).unwrap();
        let features = u64::from_le_bytes(h[16..24].try_into().unwrap());
        features & 2 != 0
    };
    let mut srv = Server::unix(dir.path(), &["-f", "qed", "-t"], &img);
    let (mut c, _, _) = Client::negotiated(srv.sock(), false, false, &[]);
    c.request(0, 1, 1, 1 << 20, 65536, &[0x5au8; 65536]);
    assert_eq!(c.simple(), (0, 1));
    let written = Instant::now();
    // An allocating write with the client still connected: the image is in use (the
    // driver's idle timer cleans it after 5 s, so only look well before that).
    let dirty = need_check(&img);
    if written.elapsed() < Duration::from_secs(3) {
        assert!(dirty, "QED marks itself dirty while allocating");
    }
    assert!(srv.terminate().success());
    assert!(!need_check(&img), "NEED_CHECK cleared by a clean shutdown");
    ok("qemu-img", &["check", "-f", "qed", s(&img)]);
    qemu_io(s(&img), "qed", &["read -P 0x5a 1M 64k"]);
}

#[test]
fn legacy_export_name_option() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "1M");
    qemu_io(s(&img), "raw", &["write -P 0x31 0 4k"]);
    let srv = Server::unix(dir.path(), &["-f", "raw", "-t", "-e", "3", "-x", "e"], &img);
    for no_zeroes in [false, true] {
        let mut c = UnixStream::connect(srv.sock()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        let flags: u32 = if no_zeroes { 3 } else { 1 };
        c.write_all(&flags.to_be_bytes()).unwrap();
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(b"e");
        c.write_all(&m).unwrap();
        let mut r = vec![0u8; if no_zeroes { 10 } else { 134 }];
        c.read_exact(&mut r).unwrap();
        assert_eq!(be64(&r), 1 << 20);
        assert_eq!(be16(&r[8..]), 0x0d6d, "multi-conn, simple replies: no DF");
        assert!(r[10..].iter().all(|&b| b == 0));
        let mut cl = Client {
            s: c,
            extended: false,
        };
        cl.request(0, 0, 77, 0, 4096, &[]);
        assert_eq!(cl.simple(), (0, 77));
        assert!(cl.read_n(4096).iter().all(|&b| b == 0x31));
    }
    // A wrong name can't be refused politely with this option: the server hangs up.
    let mut c = Client::connect(srv.sock());
    c.option(1, b"wrong");
    assert!(c.closed_by_server());
}

/// Random but well-framed options and requests: every one gets a well-formed answer,
/// the stream never loses its framing, and the server keeps serving.
#[test]
fn random_options_and_requests_keep_framing() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e6264);
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "4M");
    let srv = Server::unix(dir.path(), &["-f", "raw", "-t", "-e", "4", "-A"], &img);

    // Option haggling.
    let mut c = Client::connect(srv.sock());
    for _ in 0..300 {
        let opt = match rng.gen_range(0..8) {
            0 => 3,
            1 => 5,
            2 => 6,
            3 => 8,
            4 => 9,
            5 => 10,
            6 => 11,
            _ => rng.gen_range(12..1000),
        };
        let n = rng.gen_range(0..64);
        let data: Vec<u8> = if rng.gen_bool(0.5) && matches!(opt, 9 | 10) {
            Client::meta_data(
                "",
                &["base:allocation", "qemu:", "base:"][..rng.gen_range(0..3)],
            )
        } else if rng.gen_bool(0.3) && opt == 6 {
            Client::go_data("")
        } else {
            (0..n).map(|_| rng.gen()).collect()
        };
        c.option(opt, &data);
        loop {
            let (o, typ, _) = c.opt_reply();
            assert_eq!(o, opt);
            if typ == 1 || typ & 0x8000_0000 != 0 {
                break;
            }
            assert!(matches!(typ, 2..=4), "reply type {typ:#x} to option {opt}");
        }
    }
    assert!(c.go("").is_ok(), "negotiation still usable");

    // Transmission, in each reply style.
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let meta: &[&str] = if structured {
            &["base:allocation", "qemu:allocation-depth"]
        } else {
            &[]
        };
        let (mut c, size, _) = Client::negotiated(srv.sock(), structured, extended, meta);
        for cookie in 0..300u64 {
            let typ: u16 = match rng.gen_range(0..10) {
                2 => 3, // no DISC: it ends the connection
                t if t < 8 => t,
                _ => rng.gen_range(8..300),
            };
            let flags: u16 = if rng.gen_bool(0.6) {
                0
            } else {
                rng.gen::<u16>() & 0x3f
            };
            let offset = match rng.gen_range(0..4) {
                0 => rng.gen_range(0..size),
                1 => rng.gen_range(0..size / 4096) * 4096,
                2 => size - rng.gen_range(0..8192).min(size),
                _ => rng.gen(),
            };
            let has_payload = typ == 1 || (extended && flags & 0x20 != 0);
            let length: u64 = if has_payload {
                rng.gen_range(0..70_000)
            } else {
                match rng.gen_range(0..4) {
                    0 => rng.gen_range(0..65536),
                    1 => rng.gen_range(0..(2 << 20)),
                    2 => rng.gen::<u32>() as u64,
                    _ if extended => rng.gen(),
                    _ => rng.gen::<u32>() as u64,
                }
            };
            let payload: Vec<u8> = if has_payload {
                vec![0xa5; length as usize]
            } else {
                Vec::new()
            };
            c.request(flags, typ, cookie, offset, length, &payload);
            if structured {
                let chunks = c.reply();
                assert!(chunks.iter().all(|ch| ch.cookie == cookie));
            } else {
                let (err, ck) = c.simple();
                assert_eq!(ck, cookie);
                if err == 0 && typ == 0 {
                    c.read_n(length as usize);
                }
            }
        }
        c.request(0, 0, 9999, 0, 512, &[]);
        if structured {
            assert_eq!(chunk_error(&c.reply()), 0);
        } else {
            assert_eq!(c.simple(), (0, 9999));
            c.read_n(512);
        }
    }
    ok("nbdinfo", &["--size", &srv.uri()]);
}

#[test]
fn reads_report_holes_after_trim_and_zeroing() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "4M");
    let srv = Server::unix(dir.path(), &["-f", "raw", "-t", "--discard", "unmap"], &img);
    let (mut c, _, _) = Client::negotiated(srv.sock(), true, false, &[]);
    let kinds = |c: &mut Client, cookie: u64, off: u64| -> Vec<u16> {
        c.request(0, 0, cookie, off, 1 << 20, &[]);
        c.reply()
            .iter()
            .map(|ch| ch.typ)
            .filter(|&t| t != 0)
            .collect()
    };
    c.request(0, 1, 1, 0, 2 << 20, &vec![0x99u8; 2 << 20]);
    assert_eq!(chunk_error(&c.reply()), 0);
    assert_eq!(kinds(&mut c, 2, 0), vec![1], "all data");
    assert_eq!(kinds(&mut c, 3, 1 << 20), vec![1], "all data");
    c.request(0, 4, 4, 0, 1 << 20, &[]);
    assert_eq!(chunk_error(&c.reply()), 0);
    assert_eq!(kinds(&mut c, 5, 0), vec![2], "a hole after TRIM");
    c.request(0, 6, 6, 1 << 20, 1 << 20, &[]);
    assert_eq!(chunk_error(&c.reply()), 0);
    assert_eq!(
        kinds(&mut c, 7, 1 << 20),
        vec![2],
        "a hole after WRITE_ZEROES"
    );
    c.request(0, 1, 8, 0, 4096, &[1u8; 4096]);
    assert_eq!(chunk_error(&c.reply()), 0);
    assert_eq!(kinds(&mut c, 9, 0), vec![1, 2], "data then hole");
}

/// LIST_META_CONTEXT / SET_META_CONTEXT answers, as sorted context names.
fn meta_answers(sock: &Path, opt: u32, queries: &[&str]) -> Result<Vec<String>, u32> {
    let mut c = Client::connect(sock);
    c.option(8, &[]);
    assert_eq!(c.opt_reply().1, 1);
    c.option(opt, &Client::meta_data("", queries));
    let mut names = Vec::new();
    loop {
        let (_, typ, d) = c.opt_reply();
        match typ {
            1 => break,
            4 => names.push(String::from_utf8_lossy(&d[4..]).into_owned()),
            e => return Err(e),
        }
    }
    names.sort();
    c.option(2, &[]);
    Ok(names)
}

#[test]
fn meta_contexts_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "1M");
    for args in [
        &["-f", "raw", "-t", "-r", "-e", "0"][..],
        &["-f", "raw", "-t", "-r", "-e", "0", "-A"][..],
    ] {
        let ours = Server::unix(dir.path(), args, &img);
        let theirs = Server::qemu_nbd(dir.path(), args, &img);
        for queries in [
            &[][..],
            &["base:"][..],
            &["qemu:"][..],
            &["base:allocation"][..],
            &["qemu:allocation-depth"][..],
            &["base:allocation", "qemu:allocation-depth", "x-nope:thing"][..],
            &["base:nothing"][..],
        ] {
            for opt in [9u32, 10] {
                if opt == 10 && queries.iter().any(|q| q.ends_with(':')) {
                    continue; // wildcards are for listing only
                }
                assert_eq!(
                    meta_answers(ours.sock(), opt, queries),
                    meta_answers(theirs.sock(), opt, queries),
                    "{args:?} option {opt} {queries:?}"
                );
            }
        }
    }
}

#[test]
fn request_errors_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let a = raw_image(dir.path(), "a.raw", "1M");
    let b = raw_image(dir.path(), "b.raw", "1M");
    let size = 1u64 << 20;
    // (flags, type, offset, length, payload length)
    let cases: &[(u16, u16, u64, u64, usize)] = &[
        (0, 0, size, 512, 0),           // read past the end
        (0, 0, size - 512, 1024, 0),    // read straddling the end
        (0, 0, u64::MAX - 100, 512, 0), // offset overflow
        (0, 0, 0, 64 << 20, 0),         // read larger than 32 MiB
        (0, 1, size - 100, 200, 200),   // write past the end
        (0, 4, size, 4096, 0),          // trim past the end
        (0, 6, size - 4096, 8192, 0),   // zero past the end
        (0, 5, size, 4096, 0),          // cache past the end
        (0, 99, 0, 0, 0),               // unknown command
        (0x2, 0, 0, 512, 0),            // NO_HOLE on read
        (0x8, 1, 0, 512, 512),          // REQ_ONE on write
        (0x10, 4, 0, 512, 0),           // FAST_ZERO on trim
        (0x1, 3, 0, 0, 0),              // FUA flush
        (0, 7, 0, 512, 0),              // block status without contexts
        (0x10, 6, 0, 4096, 0),          // fast zero
        (0x1 | 0x2, 6, 0, 4096, 0),     // FUA, NO_HOLE zero
        (0, 0, 0, 0, 0),                // zero-length read
        (0, 4, 0, 0, 0),                // zero-length trim
    ];
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let mut answers = Vec::new();
        for (img, qemu) in [(&a, false), (&b, true)] {
            let args = ["-f", "raw", "-t"];
            let srv = if qemu {
                Server::qemu_nbd(dir.path(), &args, img)
            } else {
                Server::unix(dir.path(), &args, img)
            };
            let (mut c, _, _) = Client::negotiated(srv.sock(), structured, extended, &[]);
            let mut errs = Vec::new();
            for (i, &(flags, typ, off, len, plen)) in cases.iter().enumerate() {
                c.request(flags, typ, i as u64, off, len, &vec![0u8; plen]);
                let e = if structured {
                    chunk_error(&c.reply())
                } else {
                    let (e, ck) = c.simple();
                    assert_eq!(ck, i as u64);
                    if e == 0 && typ == 0 {
                        c.read_n(len as usize);
                    }
                    e
                };
                errs.push(e);
            }
            answers.push(errs);
        }
        let diffs: Vec<String> = cases
            .iter()
            .zip(answers[0].iter().zip(&answers[1]))
            .filter(|(_, (v, q))| v != q)
            .map(|(c, (v, q))| format!("{c:?}: vdisk {v} qemu-nbd {q}"))
            .collect();
        assert!(
            diffs.is_empty(),
            "structured={structured} extended={extended}:\n{}",
            diffs.join("\n")
        );
    }
}

#[test]
fn snapshot_mode_never_touches_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "base.raw", "8M");
    qemu_io(s(&img), "raw", &["write -P 0x11 0 2M"]);
    let before = std::fs::read(&img).unwrap();
    let mut srv = Server::unix(dir.path(), &["-f", "raw", "-t", "-s", "-A"], &img);
    let uri = srv.uri();
    qemu_io(
        &uri,
        "raw",
        &[
            "write -P 0x22 1M 64k",
            "read -P 0x22 1M 64k",
            "read -P 0x11 0 1M",
        ],
    );
    qemu_io(&uri, "raw", &["read -P 0x22 1M 64k"]);
    let depth = ok("nbdinfo", &["--map=qemu:allocation-depth", &uri]);
    assert!(
        depth.contains("1  local") && depth.contains("2  backing depth 2"),
        "{depth}"
    );
    // The overlay's name is gone while it is in use.
    let leftovers = |d: &Path| {
        std::fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".qcow2")
            })
            .count()
    };
    assert_eq!(leftovers(dir.path()), 0);
    assert!(srv.terminate().success());
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the file was modified"
    );
}

#[test]
fn only_clients_that_negotiated_end_a_non_persistent_server() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "1M");
    for qemu in [false, true] {
        let args = ["-f", "raw"];
        let mut srv = if qemu {
            Server::qemu_nbd(dir.path(), &args, &img)
        } else {
            Server::unix(dir.path(), &args, &img)
        };
        let mut c = UnixStream::connect(srv.sock()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(b"GARBAGE!").unwrap();
        let mut b = [0u8; 8];
        let _ = c.read(&mut b);
        drop(c);
        ok("nbdinfo", &["--list", &srv.uri()]);
        assert!(srv.wait_exit(1).is_none(), "qemu={qemu}: still serving");
        ok("nbdinfo", &["--size", &srv.uri()]);
        let st = srv.wait_exit(30).expect("exits after a real client");
        assert!(st.success(), "qemu={qemu}: {st}");
    }
}

#[test]
fn disconnect_answers_outstanding_requests_first() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.raw", "4M");
    let srv = Server::unix(dir.path(), &["-f", "raw", "-t"], &img);
    let (mut c, _, _) = Client::negotiated(srv.sock(), true, false, &[]);
    for i in 0..20u64 {
        c.request(0, 1, i, i * 65536, 65536, &[i as u8; 65536]);
    }
    c.request(0, 2, 99, 0, 0, &[]);
    let mut seen: Vec<u64> = (0..20).map(|_| c.chunk().cookie).collect();
    seen.sort();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    assert!(c.closed_by_server());
    let data = std::fs::read(&img).unwrap();
    for i in 0..20usize {
        assert!(data[i * 65536..(i + 1) * 65536]
            .iter()
            .all(|&b| b == i as u8));
    }
}

/// `--detect-zeroes` off/on/unmap on a qcow2 image (zero writes recorded as zero
/// clusters, kept allocated or freed): the same clusters afterwards as with qemu-nbd.
#[test]
fn detect_zeroes_modes_match_qemu_nbd_on_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let mut per_mode = Vec::new();
    for mode in ["off", "on", "unmap"] {
        let mut maps = Vec::new();
        for prog in [VDISK, "qemu-nbd"] {
            let img = dir.path().join(format!("{mode}-{}.qcow2", maps.len()));
            ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "1M"]);
            qemu_io(s(&img), "qcow2", &["write -P 1 0 256k"]);
            let args = ["-f", "qcow2", "--discard", "unmap", "--detect-zeroes", mode];
            let mut srv = if prog == VDISK {
                Server::unix(dir.path(), &args, &img)
            } else {
                Server::qemu_nbd(dir.path(), &args, &img)
            };
            qemu_io(
                &srv.uri(),
                "raw",
                &[
                    "write -P 0 0 64k",
                    "write -P 0 128k 4k",
                    "write -P 0 512k 64k",
                    "read -P 0 0 64k",
                    "read -P 1 64k 64k",
                ],
            );
            let st = srv
                .wait_exit(30)
                .expect("server exits with its last client");
            assert!(st.success(), "{prog}: {st}");
            maps.push(ok("qemu-img", &["map", "--output=json", s(&img)]));
        }
        assert_eq!(maps[0], maps[1], "--detect-zeroes={mode}");
        per_mode.push(maps.swap_remove(0));
    }
    // Each mode leaves different clusters: zero detection did act, and unmap freed.
    assert_ne!(per_mode[0], per_mode[1]);
    assert_ne!(per_mode[1], per_mode[2]);
}

// ---------------------------------------------------------------------------------
// --image-opts, side by side with qemu-nbd.

#[test]
fn image_opts_exports_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_io(s(&img), "qcow2", &["write -P 0x5c 64k 128k"]);
    let opts = format!(
        "driver=qcow2,file.driver=file,file.filename={}",
        img.display()
    );
    let opts = Path::new(&opts);
    for args in [
        &["--image-opts", "-t"][..],
        &["--image-opts", "-t", "-s"][..],
    ] {
        // One server at a time: each locks the image.
        for qemu in [false, true] {
            let srv = if qemu {
                Server::qemu_nbd(dir.path(), args, opts)
            } else {
                Server::unix(dir.path(), args, opts)
            };
            let uri = srv.uri();
            assert_eq!(ok("nbdinfo", &["--size", &uri]), "8388608\n", "{uri}");
            qemu_io(&uri, "raw", &["read -P 0x5c 64k 128k", "read -P 0 0 64k"]);
            // A write through the -s overlay stays in it; without -s it reaches the image.
            let w = if args.contains(&"-s") {
                "write -P 0x99 2M 4k"
            } else {
                "write -P 0x77 1M 4k"
            };
            qemu_io(&uri, "raw", &[w, "read -P 0x5c 64k 128k"]);
        }
    }
    // Written without -s; the -s runs' writes stayed in their overlays.
    qemu_io(
        s(&img),
        "qcow2",
        &[
            "read -P 0x77 1M 4k",
            "read -P 0x5c 64k 128k",
            "read -P 0 2M 4k",
        ],
    );
    let c = tool("qemu-img", &["check", s(&img)]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));

    // Errors read as qemu-nbd's.
    let missing = format!(
        "driver=qcow2,file.filename={}",
        dir.path().join("nope.qcow2").display()
    );
    for args in [
        vec!["--image-opts", "-f", "qcow2", opts.to_str().unwrap()],
        vec!["--image-opts", &missing],
        vec!["--image-opts", "-s", &missing],
        vec![&missing[..]],
    ] {
        let sock = dir.path().join("err.sock");
        let sock = sock.to_str().unwrap();
        let mut va = vec!["serve", "-k", sock];
        va.extend(&args);
        let v = tool(VDISK, &va);
        let mut qa = vec!["-k", sock];
        qa.extend(&args);
        let q = tool("qemu-nbd", &qa);
        assert_eq!(v.status.code(), q.status.code(), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&v.stderr),
            String::from_utf8_lossy(&q.stderr).replace("qemu-nbd:", "vdisk:"),
            "{args:?}"
        );
    }
}

#[test]
fn block_sizes_and_pid_file_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_image(dir.path(), "a.raw", "4M");
    let qcow2 = dir.path().join("b.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&qcow2), "4M"],
    );
    let qed = dir.path().join("c.qed");
    ok("qemu-img", &["create", "-q", "-f", "qed", s(&qed), "4M"]);
    // QED and a probed raw image: 512, as QEMU's block layer aligns them; else 1.
    for (args, img) in [
        (&["-f", "raw"][..], &raw),
        (&[][..], &raw),
        (&["-f", "qcow2"][..], &qcow2),
        (&["-f", "qed"][..], &qed),
        (&[][..], &qed),
    ] {
        let mut a = vec!["-t", "-r"];
        a.extend_from_slice(args);
        let v = {
            let srv = Server::unix(dir.path(), &a, img);
            nbdinfo_json(&srv.uri())
        };
        let q = {
            let srv = Server::qemu_nbd(dir.path(), &a, img);
            nbdinfo_json(&srv.uri())
        };
        for k in [
            "block_size_minimum",
            "block_size_preferred",
            "block_size_maximum",
        ] {
            assert_eq!(v[k], q[k], "{k} {args:?} {}", img.display());
        }
    }
    // The pid file stays after the server exits, as qemu-nbd leaves it.
    for prog in [VDISK, "qemu-nbd"] {
        let mut srv = if prog == VDISK {
            Server::unix(dir.path(), &["-f", "raw"], &raw)
        } else {
            Server::qemu_nbd(dir.path(), &["-f", "raw"], &raw)
        };
        let pid_file = srv.pid_file.clone();
        srv.terminate();
        assert!(pid_file.exists(), "{prog}: pid file left");
    }
}

/// Runs qemu-io commands on an NBD export with `-t writeback` (qemu-io's default,
/// writethrough, makes every write FUA, which stays on the workers); fails on any
/// failed command or pattern mismatch.
fn qemu_io_writeback(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-t", "writeback", "-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = ok("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{out}"
    );
}

/// Per connection, in order: how many requests `vdisk serve -v` says went through
/// its io_uring.
fn ring_counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_suffix(" requests went through io_uring"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// With `--cache=none`, reads and writes of allocated clusters go through each
/// connection's io_uring (registered slots for small requests, pooled buffers for big
/// ones, several in flight), everything else (unaligned, allocating, flushes) through the
/// workers; with io_uring refused (simulated by the environment variable the storage
/// engine's fallback test uses) the workers serve it all. Either way the image ends up
/// as the same commands run by qemu-io on a copy make it, and passes `qemu-img check`.
#[test]
fn odirect_requests_through_io_uring_and_its_fallback() {
    let cmds = [
        "write -P 0x22 4096 4096",
        "write -P 0x33 1M 1M",
        "write -P 0x44 100 1000",
        "write -P 0x55 16M 64k",
        "aio_write -P 0x66 2M 4k",
        "aio_write -P 0x67 3M 16k",
        "aio_write -P 0x68 4M 20k",
        "aio_write -P 0x69 5M 256k",
        "aio_flush",
        "write -P 0x77 6M 4k",
        "flush",
        "write -P 0x78 6M 4k",
    ];
    let reads = [
        "read -P 0x22 4096 4096",
        "read -P 0x33 1M 1M",
        "read -P 0x44 100 1000",
        "read -P 0x11 8k 4k",
        "read -P 0x55 16M 64k",
        "read -P 0x66 2M 4k",
        "read -P 0x67 3M 16k",
        "read -P 0x68 4M 20k",
        "read -P 0x69 5M 256k",
        "read -P 0x78 6M 4k",
        "read -P 0 32M 4k",
        "aio_read -P 0x11 7M 4k",
        "aio_read -P 0x11 7340032 8k",
        "aio_flush",
    ];
    for refuse in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("o.qcow2");
        let refimg = dir.path().join("ref.qcow2");
        ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
        qemu_io(s(&img), "qcow2", &["write -P 0x11 0 8M"]);
        // A persistent dirty bitmap: ring writes must mark it as any write does.
        ok("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
        std::fs::copy(&img, &refimg).unwrap();
        qemu_io(s(&refimg), "qcow2", &cmds);
        let log = dir.path().join("serve.log");
        let env: &[(&str, &str)] = if refuse {
            &[("VDISK_TEST_REFUSE_IO_URING", "1")]
        } else {
            &[]
        };
        let sock = dir.path().join("o.sock");
        let mut srv = Server::start_with(
            VDISK,
            dir.path(),
            &["-v", "-t", "-f", "qcow2", "--cache=none"],
            &img,
            Endpoint::Unix(sock),
            env,
            Some(std::fs::File::create(&log).unwrap()),
        );
        qemu_io_writeback(&srv.uri(), &cmds);
        qemu_io_writeback(&srv.uri(), &reads);
        // And FUA writes (workers) beside ring reads of the same clusters.
        qemu_io(
            &srv.uri(),
            "raw",
            &["write -P 0x78 6M 4k", "read -P 0x78 6M 4k"],
        );
        assert!(srv.terminate().success());
        let text = std::fs::read_to_string(&log).unwrap();
        if refuse {
            assert!(text.contains("io_uring unavailable"), "{text}");
            assert!(!text.contains("went through io_uring"), "{text}");
        } else {
            let n = ring_counts(&text);
            // The first connection's writes: 4k, 1M, the four aio writes but 5M
            // (256k, under the budget too), 6M; the second's reads of allocated data.
            assert!(
                n.len() == 3 && n[0] >= 5 && n[1] >= 8 && n[2] == 1,
                "{text}"
            );
        }
        ok(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "qcow2", s(&refimg), s(&img)],
        );
        let c = tool("qemu-img", &["check", "-f", "qcow2", s(&img)]);
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
        // The same dirty clusters as qemu-io's writes marked in the copy.
        let dirty = |f: &Path| {
            let q = Server::qemu_nbd(dir.path(), &["-r", "-t", "-f", "qcow2", "-B", "b0"], f);
            ok("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &q.uri()])
        };
        let (a, b) = (dirty(&refimg), dirty(&img));
        assert!(a.contains("dirty"), "{a}");
        assert_eq!(a, b, "dirty bitmap after serving (refuse={refuse})");
    }
}

/// QED, VDI and VHD served with `--cache=none`: reads and in-place writes of allocated
/// clusters (blocks) go through the connection's io_uring as qcow2's do, allocating and
/// unaligned writes through the workers; the image ends up as qemu-io's same commands
/// make a copy, and passes `qemu-img check`. Only data at 4 KiB-aligned host offsets
/// can go this way: qemu-img puts a VDI's blocks at 1024 + n MiB, so the VDI here has
/// its data area moved to 4096 (as VirtualBox aligns it), and a dynamic VHD's blocks
/// follow their 512-byte sector bitmaps, so the VHD is a fixed one.
#[test]
fn qed_vdi_vhd_odirect_requests_through_io_uring() {
    for (fmt, opts) in [("qed", ""), ("vdi", ""), ("vpc", "subformat=fixed")] {
        odirect_requests_through_io_uring(fmt, opts);
    }
}

fn odirect_requests_through_io_uring(fmt: &str, opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(format!("o.{fmt}"));
    let refimg = dir.path().join(format!("ref.{fmt}"));
    let mut create = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        create.extend(["-o", opts]);
    }
    create.extend([s(&img), "64M"]);
    ok("qemu-img", &create);
    if fmt == "vdi" {
        use std::os::unix::fs::FileExt;
        // offset_data (header byte 344) from 1024 to 4096; no block is allocated yet.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&4096u32.to_le_bytes(), 344).unwrap();
        f.set_len(4096).unwrap();
    }
    qemu_io(s(&img), fmt, &["write -P 0x11 0 8M"]);
    std::fs::copy(&img, &refimg).unwrap();
    let cmds = [
        "write -P 0x22 4096 4096",
        "aio_write -P 0x66 2M 4k",
        "aio_write -P 0x67 3M 16k",
        "aio_write -P 0x68 4M 20k",
        "aio_flush",
        "write -P 0x44 100 1000",
        "write -P 0x55 16M 64k",
        "flush",
    ];
    let reads = [
        "read -P 0x22 4096 4096",
        "read -P 0x44 100 1000",
        "read -P 0x11 8k 4k",
        "read -P 0x55 16M 64k",
        "aio_read -P 0x66 2M 4k",
        "aio_read -P 0x67 3M 16k",
        "aio_read -P 0x68 4M 20k",
        "aio_read -P 0x11 7M 4k",
        "aio_flush",
        "read -P 0 32M 4k",
    ];
    qemu_io(s(&refimg), fmt, &cmds);
    let log = dir.path().join("serve.log");
    let mut srv = Server::start_with(
        VDISK,
        dir.path(),
        &["-v", "-t", "-f", fmt, "--cache=none"],
        &img,
        Endpoint::Unix(dir.path().join("o.sock")),
        &[],
        Some(std::fs::File::create(&log).unwrap()),
    );
    qemu_io_writeback(&srv.uri(), &cmds);
    qemu_io_writeback(&srv.uri(), &reads);
    assert!(srv.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let n = ring_counts(&text);
    // The writes into the allocated first 8 MiB (4 of them: the unaligned one and the
    // allocating one at 16M are the workers'); the reads of allocated data (8).
    assert!(n.len() == 2 && n[0] >= 4 && n[1] >= 7, "{fmt}: {text}");
    ok(
        "qemu-img",
        &["compare", "-f", fmt, "-F", fmt, s(&refimg), s(&img)],
    );
    // qemu-img has no check for VHD (the compare above is its test).
    if fmt != "vpc" {
        let c = tool("qemu-img", &["check", "-f", fmt, s(&img)]);
        assert!(
            c.status.success(),
            "{fmt}: {}",
            String::from_utf8_lossy(&c.stdout)
        );
    }
}
