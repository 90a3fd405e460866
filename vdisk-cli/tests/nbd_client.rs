//! The NBD client storage against real servers (qemu-nbd, nbdkit with its memory,
//! file, error and delay pieces, `vdisk serve`): `info`, `map`, `convert` in and out,
//! `compare`, `check`, `io` and backing files over exports, each compared with what
//! qemu-img says of the same export, and faults (errors, a slow server, a server
//! killed mid-copy) that must end in a clear error within a bounded time.
//!
//! Every server is started by the test on a Unix socket in its tempdir (or on
//! 127.0.0.1), and killed by a guard on drop; every command runs under `timeout`.

mod cli_support;

use cli_support::{json, ok, p, pattern, qemu_img, run_limited as run, tmp, Run};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");

fn vdisk(dir: &Path, args: &[&str]) -> Run {
    run(dir, VDISK, args)
}

/// `vdisk io -f raw -c CMD… URL`, which must succeed with no command failing.
fn vdisk_io(dir: &Path, url: &str, cmds: &[&str]) -> String {
    let mut a = vec!["io", "-f", "raw"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(url);
    let out = ok(vdisk(dir, &a), "vdisk io");
    assert!(!out.contains("failed"), "{cmds:?}: {out}");
    out
}

/// A server process on a Unix socket, killed on drop.
struct Server {
    child: Child,
    sock: PathBuf,
}

impl Server {
    /// Starts `prog args…`, whose arguments name `sock`, and waits until it accepts.
    fn start(prog: &str, args: &[String], sock: PathBuf) -> Server {
        let child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{prog} must be installed (scripts/test installs it): {e}"));
        let mut s = Server { child, sock };
        let until = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&s.sock).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("{prog} exited early: {st}");
            }
            assert!(Instant::now() < until, "{prog} did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// `qemu-nbd -t -f FMT -x NAME [extra] FILE`.
    fn qemu_nbd(dir: &Path, fmt: &str, name: &str, extra: &[&str], file: &Path) -> Server {
        let sock = dir.join(format!("q-{}.sock", rand::random::<u32>()));
        let mut a: Vec<String> = ["-t", "-f", fmt, "-x", name, "-k"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(sock.display().to_string());
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(file.display().to_string());
        Server::start("qemu-nbd", &a, sock)
    }

    /// `nbdkit -f -U SOCK [filters] PLUGIN ARGS…`.
    fn nbdkit(dir: &Path, args: &[&str]) -> Server {
        let sock = dir.join(format!("k-{}.sock", rand::random::<u32>()));
        let mut a: Vec<String> = vec!["-f".into(), "-U".into(), sock.display().to_string()];
        a.extend(args.iter().map(|s| s.to_string()));
        Server::start("nbdkit", &a, sock)
    }

    /// `vdisk serve -x NAME -k SOCK [extra] FILE`.
    fn vdisk_serve(dir: &Path, name: &str, extra: &[&str], file: &Path) -> Server {
        let sock = dir.join(format!("v-{}.sock", rand::random::<u32>()));
        let mut a: Vec<String> = vec!["serve".into(), "-t".into(), "-x".into(), name.into()];
        a.push("-k".into());
        a.push(sock.display().to_string());
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(file.display().to_string());
        Server::start(VDISK, &a, sock)
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 16 MiB raw image with data, a written zero range and holes.
fn golden_raw(dir: &Path) -> PathBuf {
    let f = p(dir, "golden.raw");
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "golden.raw", "16M"]),
        "create",
    );
    cli_support::qemu_io(
        dir,
        "raw",
        "golden.raw",
        &[
            "write -P 0x11 1M 1M",
            "write -P 0x22 5M 64k",
            "write -z 8M 1M",
            "write -P 0x33 15M 1M",
        ],
    );
    f
}

/// [`golden_raw`] served read-only by qemu-nbd as export `name`.
fn golden_export(dir: &Path, name: &str) -> Server {
    let g = golden_raw(dir);
    Server::qemu_nbd(dir, "raw", name, &["-r"], &g)
}

/// Asserts vdisk and qemu-img print the same for `args` (stdout, and exit code).
fn same(dir: &Path, args: &[&str]) -> String {
    let v = vdisk(dir, args);
    let q = qemu_img(dir, args);
    assert_eq!(
        v.code, q.code,
        "{args:?}: vdisk {} / qemu-img {}",
        v.err, q.err
    );
    assert_eq!(v.out, q.out, "{args:?}");
    v.out
}

#[test]
fn qemu_nbd_export_info_map_compare_convert_match_qemu_img() {
    let d = tmp();
    let dir = d.path();
    let s = golden_export(dir, "golden");
    let u = s.uri("golden");
    same(dir, &["info", &u]);
    same(dir, &["info", "--output=json", &u]);
    let m = same(dir, &["map", &u]);
    assert!(m.contains("0x100000        0x100000"), "{m}");
    same(dir, &["map", "--output=json", &u]);
    same(dir, &["compare", &u, "golden.raw"]);
    same(
        dir,
        &["compare", "-f", "raw", "-F", "raw", &u, "golden.raw"],
    );
    // The legacy syntax names the same export.
    let legacy = format!("nbd:unix:{}:exportname=golden", s.sock.display());
    same(dir, &["info", &legacy]);

    // vdisk serve re-exports the export; bench reads it.
    let re = Server::vdisk_serve(dir, "re", &["-f", "raw", "-r"], Path::new(&u));
    ok(
        qemu_img(
            dir,
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &re.uri("re"),
                "golden.raw",
            ],
        ),
        "compare the re-export",
    );
    drop(re);
    let b = ok(
        vdisk(dir, &["bench", "-f", "raw", "-c", "256", "-s", "64k", &u]),
        "bench",
    );
    assert!(b.contains("Run completed"), "{b}");
    // convert from the export: holes stay holes in the qcow2.
    ok(
        vdisk(dir, &["convert", "-O", "qcow2", &u, "out.qcow2"]),
        "convert",
    );
    ok(
        qemu_img(dir, &["compare", "out.qcow2", "golden.raw"]),
        "compare",
    );
    ok(qemu_img(dir, &["check", "out.qcow2"]), "check");
    let vm = ok(qemu_img(dir, &["map", "--output=json", "out.qcow2"]), "map");
    let data: u64 = json(&vm)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    // 1 MiB + 64 KiB + 1 MiB of data (the first 4 KiB qemu-img allocates too).
    assert!(data <= (2 << 20) + (64 << 10) + (64 << 10), "{vm}");
}

#[test]
fn json_and_image_opts_name_an_export() {
    let d = tmp();
    let dir = d.path();
    let s = golden_export(dir, "e");
    let sock = s.sock.display().to_string();
    let j = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{sock}"}},"export":"e"}}}}"#
    );
    let a = same(dir, &["info", "--output=json", &j]);
    assert!(a.contains("\"format\": \"nbd\""), "{a}");
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=e"
    );
    same(dir, &["map", "--image-opts", &opts]);
    ok(
        vdisk(
            dir,
            &["convert", "--image-opts", &opts, "-O", "raw", "c.raw"],
        ),
        "convert image-opts",
    );
    ok(
        qemu_img(dir, &["compare", "-f", "raw", "c.raw", "golden.raw"]),
        "compare",
    );
    let r = vdisk(
        dir,
        &["info", "--image-opts", &format!("{opts},file.bogus=1")],
    );
    assert_ne!(r.code, 0);
    assert!(
        r.err.contains("doesn't support the option 'bogus'"),
        "{}",
        r.err
    );
}

#[test]
fn open_errors_are_qemus() {
    let d = tmp();
    let dir = d.path();
    let s = golden_export(dir, "e");
    for name in [
        s.uri("nope"),
        format!("nbd+unix:///e?socket={}", dir.join("no.sock").display()),
        "nbd://127.0.0.1:1/x".to_string(),
    ] {
        let v = vdisk(dir, &["info", &name]);
        let q = qemu_img(dir, &["info", &name]);
        assert_eq!(v.code, 1, "{}", v.err);
        assert_eq!(q.code, 1);
        assert_eq!(v.err.replacen("vdisk:", "qemu-img:", 1), q.err, "{name}");
    }
    // Writing to a read-only export is refused at open.
    let r = vdisk(dir, &["io", "-f", "raw", "-c", "write 0 512", &s.uri("e")]);
    assert!(r.err.contains("read-only"), "{}{}", r.out, r.err);
}

#[test]
fn convert_into_nbdkit_memory_and_write_commands() {
    let d = tmp();
    let dir = d.path();
    golden_raw(dir);
    let s = Server::nbdkit(dir, &["memory", "16M"]);
    let u = s.uri("");
    // convert -n into the export; holes are written as zeroes (write-zeroes).
    ok(
        vdisk(dir, &["convert", "-n", "-O", "raw", "golden.raw", &u]),
        "convert -n",
    );
    ok(
        qemu_img(
            dir,
            &["compare", "-f", "raw", "-F", "raw", &u, "golden.raw"],
        ),
        "compare",
    );
    same(dir, &["map", "--output=json", &u]);
    // io: write, FUA write, zero, discard, flush; read back through qemu-io.
    vdisk_io(
        dir,
        &u,
        &[
            "write -P 0x44 100 1000",
            "write -f -P 0x45 2M 4k",
            "write -z 1M 64k",
            "discard 5M 64k",
            "flush",
        ],
    );
    cli_support::qemu_io(
        dir,
        "raw",
        &u,
        &[
            "read -P 0x44 100 1000",
            "read -P 0x45 2M 4k",
            "read -P 0 1M 64k",
            "read -P 0 5M 64k",
            "read -P 0x11 1088k 960k",
        ],
    );
    // Past the end of the export: an error, not a grown file.
    let r = vdisk(dir, &["io", "-f", "raw", "-c", "write 16M 512", &u]);
    assert!(
        r.out.contains("failed") || r.err.contains("failed") || r.code != 0,
        "{}{}",
        r.out,
        r.err
    );
}

#[test]
fn qcow2_overlay_over_an_nbd_golden_image() {
    let d = tmp();
    let dir = d.path();
    golden_raw(dir);
    ok(
        qemu_img(
            dir,
            &["convert", "-O", "qcow2", "golden.raw", "golden.qcow2"],
        ),
        "to qcow2",
    );
    // The qcow2 file is served raw; the qcow2 format runs on top of the NBD storage.
    let s = Server::qemu_nbd(dir, "raw", "g", &["-r"], &p(dir, "golden.qcow2"));
    let u = s.uri("g");
    let chk = ok(vdisk(dir, &["check", "-f", "qcow2", &u]), "check over nbd");
    assert!(chk.contains("No errors were found"), "{chk}");
    cli_support::remote_overlay(
        dir,
        &u,
        "golden.qcow2",
        &["write -P 0x55 1088k 64k", "write -P 0x66 10M 4k"],
    );
    ok(qemu_img(dir, &["check", "top.qcow2"]), "qemu-img check");
    same(dir, &["map", "top.qcow2"]);
    same(dir, &["map", "--output=json", "top.qcow2"]);
    // Bit-exact against the same writes on a local copy.
    ok(
        vdisk(dir, &["compare", "top.qcow2", "ref.qcow2"]),
        "compare with ref",
    );
    ok(
        qemu_img(dir, &["compare", "top.qcow2", "ref.qcow2"]),
        "qemu compare with ref",
    );
    // convert of the whole chain.
    ok(
        vdisk(dir, &["convert", "-O", "raw", "top.qcow2", "flat.raw"]),
        "convert chain",
    );
    ok(
        qemu_img(dir, &["compare", "-f", "raw", "flat.raw", "ref.qcow2"]),
        "flat",
    );
}

#[test]
fn vdisk_serve_export_round_trip() {
    let d = tmp();
    let dir = d.path();
    golden_raw(dir);
    ok(
        qemu_img(dir, &["convert", "-O", "qcow2", "golden.raw", "g.qcow2"]),
        "to qcow2",
    );
    let s = Server::vdisk_serve(dir, "x", &["-f", "qcow2", "-r"], &p(dir, "g.qcow2"));
    let u = s.uri("x");
    same(dir, &["info", &u]);
    same(dir, &["map", "--output=json", &u]);
    ok(
        vdisk(dir, &["convert", "-O", "qcow2", &u, "back.qcow2"]),
        "convert",
    );
    ok(
        qemu_img(dir, &["compare", "back.qcow2", "golden.raw"]),
        "compare",
    );
    // Large reads cross the server's maximum request size (32 MiB) in pieces.
    let big = p(dir, "big.raw");
    let data = pattern(40 << 20, 3);
    std::fs::write(&big, &data).unwrap();
    let s2 = Server::vdisk_serve(dir, "b", &["-f", "raw", "-r"], &big);
    ok(
        vdisk(dir, &["convert", "-O", "raw", &s2.uri("b"), "big.out"]),
        "big convert",
    );
    assert!(std::fs::read(p(dir, "big.out")).unwrap() == data);
}

#[test]
fn server_errors_are_reported_not_hidden() {
    let d = tmp();
    let dir = d.path();
    // Every read fails with EIO.
    let s = Server::nbdkit(
        dir,
        &[
            "--filter=error",
            "memory",
            "4M",
            "error=EIO",
            "error-pread-rate=100%",
        ],
    );
    let r = vdisk(dir, &["convert", "-O", "raw", &s.uri(""), "o.raw"]);
    assert_eq!(r.code, 1, "{}{}", r.out, r.err);
    assert!(r.err.contains("Input/output error"), "{}", r.err);
}

#[test]
fn slow_server_times_out_with_a_clear_error() {
    let d = tmp();
    let dir = d.path();
    // The pattern plugin has data everywhere, so the copy must read.
    let s = Server::nbdkit(dir, &["--filter=delay", "pattern", "4M", "delay-read=30"]);
    let sock = s.sock.display().to_string();
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.timeout=1"
    );
    let t = Instant::now();
    let r = vdisk(
        dir,
        &["convert", "--image-opts", &opts, "-O", "raw", "o.raw"],
    );
    assert_eq!(r.code, 1, "{}{}", r.out, r.err);
    assert!(r.err.contains("did not reply within 1 s"), "{}", r.err);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

/// A proxy on a fresh socket in `dir` to the NBD server at `upstream`: once the
/// client has sent an NBD_CMD_READ, only `keep` more bytes of the server's answer
/// reach the client, then nothing, with both sockets left open (a server that stops
/// in the middle of a reply). Returns the proxy's socket.
fn stalling_proxy(dir: &Path, upstream: &Path, keep: usize) -> PathBuf {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let path = dir.join(format!("stall-{}.sock", rand::random::<u32>()));
    let l = UnixListener::bind(&path).expect("bind the proxy");
    let up = upstream.to_path_buf();
    std::thread::spawn(move || {
        let Ok((client, _)) = l.accept() else { return };
        let server = UnixStream::connect(&up).expect("connect upstream");
        let read_sent = Arc::new(AtomicBool::new(false));
        let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let flag = Arc::clone(&read_sent);
        // Client to server, watching for a request (compact or extended magic) of
        // type 0 (READ); the flag is set before the request reaches the server.
        std::thread::spawn(move || {
            let mut seen: Vec<u8> = Vec::new();
            let mut b = [0u8; 4096];
            while let Ok(n) = c_in.read(&mut b) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&b[..n]);
                let is_read = |w: &[u8]| {
                    (w[..4] == [0x25, 0x60, 0x95, 0x13] || w[..4] == [0x21, 0xe4, 0x1c, 0x71])
                        && w[6..8] == [0, 0]
                };
                if seen.windows(8).any(is_read) {
                    flag.store(true, Ordering::SeqCst);
                }
                if s_out.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
        let (mut s_in, mut c_out) = (server, client);
        let mut left = keep;
        let mut b = [0u8; 4096];
        while let Ok(n) = s_in.read(&mut b) {
            if n == 0 {
                break;
            }
            let n = if read_sent.load(Ordering::SeqCst) {
                let m = n.min(left);
                left -= m;
                m
            } else {
                n
            };
            if n > 0 && c_out.write_all(&b[..n]).is_err() {
                break;
            }
        }
        // Keep the client's socket open until it goes away.
        let _ = c_out.read(&mut b);
    });
    path
}

/// A server that stops in the middle of a READ reply (header and part of the
/// payload sent, then nothing, the socket open): the copy fails after the timeout with
/// a clear error, never hangs (the reader, which holds the request while it receives
/// its payload, gives the reply up after `timeout` without data).
#[test]
fn server_stalled_mid_reply_is_an_error_not_a_hang() {
    let d = tmp();
    let dir = d.path();
    let g = golden_raw(dir);
    let q = Server::qemu_nbd(dir, "raw", "g", &["-r"], &g);
    let proxy = stalling_proxy(dir, &q.sock, 100);
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},\
         file.export=g,file.timeout=1",
        proxy.display()
    );
    let t = Instant::now();
    // One READ of data and nothing else in flight (convert would overlap block
    // status).
    let r = vdisk(
        dir,
        &["io", "-r", "--image-opts", "-c", "read 1M 1M", &opts],
    );
    let all = format!("{}{}", r.out, r.err);
    // The request's own deadline and the reader's receive timeout expire together;
    // either may be the one that names the failure.
    assert!(
        all.contains("stopped in the middle of a reply (nothing for 1 s)")
            || all.contains("NBD server did not reply within 1 s"),
        "{all}"
    );
    assert!(all.contains("read failed: Input/output error"), "{all}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn server_killed_mid_copy_is_an_error_not_a_hang() {
    let d = tmp();
    let dir = d.path();
    // Killed at several points of the copy (replies in flight, half read, between
    // requests): every time a clear error, never a hang.
    for after_ms in [0, 150, 400] {
        // Slow enough (50 ms a read) that the copy is still running when the server dies.
        let mut s = Server::nbdkit(
            dir,
            &["--filter=delay", "pattern", "256M", "delay-read=50ms"],
        );
        let u = s.uri("");
        let _ = std::fs::remove_file(p(dir, "o.raw"));
        let child = Command::new("timeout")
            .args(["60", VDISK, "convert", "-O", "raw", &u, "o.raw"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kill once the copy is under way (data has reached its output).
        use std::os::unix::fs::MetadataExt;
        let until = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(p(dir, "o.raw")).map_or(0, |m| m.blocks()) == 0 {
            assert!(Instant::now() < until, "the copy did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(after_ms));
        s.kill();
        let t = Instant::now();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(1),
            "killed after {after_ms} ms: {err}"
        );
        assert!(
            err.contains("NBD server closed the connection")
                || err.contains("NBD connection failed"),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_secs(30));
    }
}

#[test]
fn nbdkit_file_plugin_and_a_minimum_block_size() {
    let d = tmp();
    let dir = d.path();
    let g = golden_raw(dir);
    let s = Server::nbdkit(dir, &["file", &g.display().to_string()]);
    same(dir, &["map", "--output=json", &s.uri("")]);
    same(dir, &["compare", &s.uri(""), "golden.raw"]);
    drop(s);
    // A server that refuses requests not aligned to 4 KiB: unaligned guest I/O is
    // widened (reads) or read-modify-written (writes) by the client.
    let s = Server::nbdkit(
        dir,
        &[
            "--filter=blocksize-policy",
            "memory",
            "8M",
            "blocksize-minimum=4096",
            "blocksize-error-policy=error",
        ],
    );
    let u = s.uri("");
    vdisk_io(dir, &u, &["write -P 0x44 100 1000", "write -P 0x45 8191 2"]);
    cli_support::qemu_io(
        dir,
        "raw",
        &u,
        &[
            "read -P 0 0 100",
            "read -P 0x44 100 1000",
            "read -P 0 1100 7091",
            "read -P 0x45 8191 2",
            "read -P 0 8193 4095",
        ],
    );
    vdisk_io(dir, &u, &["read -P 0x44 100 1000"]);
}

/// The (offset, count) of every NBD_CMD_READ nbdkit's log filter recorded in `log`.
fn logged_read_ranges(log: &Path) -> Vec<(u64, u64)> {
    let hex = |l: &str, key: &str| -> Option<u64> {
        let v = l.split_whitespace().find_map(|w| w.strip_prefix(key))?;
        u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
    };
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" Read id="))
        .map(|l| {
            let r = hex(l, "offset=").zip(hex(l, "count="));
            r.unwrap_or_else(|| panic!("unparsed nbdkit log line: {l}"))
        })
        .collect()
}

/// `convert` from a VHDX skips the holes of its payload blocks: qemu allocates a whole
/// 8 MiB block for a 64 KiB write and leaves the rest a hole of the file. Read over
/// NBD from nbdkit's file plugin (holes reported by block status), vdisk reads the
/// 64 KiB and the fully written second block, nothing of the hole, and its copy is
/// qemu-img's.
#[test]
fn convert_from_vhdx_skips_holes_of_payload_blocks() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "vhdx",
                "-o",
                "block_size=8M",
                "h.vhdx",
                "16M",
            ],
        ),
        "create",
    );
    cli_support::qemu_io(
        dir,
        "vhdx",
        "h.vhdx",
        &["write -P 0xab 0 64k", "write -P 0xcd 8M 8M"],
    );
    let m = json(&ok(vdisk(dir, &["map", "--output=json", "h.vhdx"]), "map"));
    let payload = m[0]["offset"].as_u64().expect("payload offset");
    let log = p(dir, "reads.log");
    let s = Server::nbdkit(
        dir,
        &[
            "--filter=log",
            "file",
            &p(dir, "h.vhdx").display().to_string(),
            &format!("logfile={}", log.display()),
        ],
    );
    let u = s.uri("");
    ok(
        vdisk(dir, &["convert", "-f", "vhdx", "-O", "raw", &u, "v.raw"]),
        "convert",
    );
    drop(s);
    let payload_read: u64 = logged_read_ranges(&log)
        .iter()
        .filter(|&&(o, _)| o >= payload)
        .map(|&(_, n)| n)
        .sum();
    assert_eq!(payload_read, (64 << 10) + (8 << 20), "{log:?}");
    ok(
        qemu_img(
            dir,
            &["compare", "-f", "vhdx", "-F", "raw", "h.vhdx", "v.raw"],
        ),
        "compare",
    );
}

/// How many NBD_CMD_READ requests nbdkit's log filter recorded in `log`.
fn logged_reads(log: &Path) -> usize {
    logged_read_ranges(log).len()
}

/// Copy-on-read over an NBD golden image (issue 12 part 4): `vdisk io -C` leaves the
/// same allocation in the overlay as `qemu-io -C` for the same reads (whole clusters,
/// only what the overlay lacks), a second full read after a copy-on-read pass sends
/// the server no read beyond what opening the chain costs (nbdkit's log filter counts
/// them), and the overlay passes `qemu-img check` and reads bit-exact.
#[test]
fn copy_on_read_over_nbd_matches_qemu_io_and_fetches_once() {
    let d = tmp();
    let dir = d.path();
    golden_raw(dir);
    ok(
        qemu_img(
            dir,
            &["convert", "-O", "qcow2", "golden.raw", "golden.qcow2"],
        ),
        "to qcow2",
    );
    let log = p(dir, "nbdkit.log");
    let logfile = format!("logfile={}", log.display());
    let golden = p(dir, "golden.qcow2").display().to_string();
    let s = Server::nbdkit(dir, &["--filter=log", "file", &golden, &logfile]);
    let u = s.uri("");
    for t in ["q.qcow2", "v.qcow2"] {
        ok(
            qemu_img(
                dir,
                &["create", "-q", "-f", "qcow2", "-b", &u, "-F", "qcow2", t],
            ),
            "overlay",
        );
    }
    // Unaligned reads across data, zeroes and holes of the golden image, and a write
    // before a read of the same cluster (the copy must keep the written bytes).
    let cmds = [
        "read 1000000 100000",
        "write -P 0x77 5M 512",
        "read 5M 64k",
        "read 8300000 4096",
        "read 15300000 1000000",
    ];
    let mut qa = vec!["-C"];
    let mut va = vec!["io", "-C"];
    for c in &cmds {
        qa.extend(["-c", c]);
        va.extend(["-c", c]);
    }
    qa.push("q.qcow2");
    va.push("v.qcow2");
    let q = run(dir, "qemu-io", &qa);
    assert_eq!(q.code, 0, "{}{}", q.out, q.err);
    let v = ok(vdisk(dir, &va), "vdisk io -C");
    assert!(!v.contains("failed"), "{v}");
    let qm = ok(
        qemu_img(dir, &["map", "--output=json", "q.qcow2"]),
        "map after qemu-io -C",
    );
    let vm = ok(
        qemu_img(dir, &["map", "--output=json", "v.qcow2"]),
        "map after vdisk io -C",
    );
    assert_eq!(vm, qm, "allocation after copy-on-read");
    ok(
        qemu_img(dir, &["compare", "v.qcow2", "q.qcow2"]),
        "same data",
    );
    // The filter node spelling does the same.
    let before = std::fs::read(p(dir, "v.qcow2")).unwrap();
    let j = r#"json:{"driver":"copy-on-read","file":{"driver":"qcow2","file":{"driver":"file","filename":"v.qcow2"}}}"#;
    ok(
        vdisk(dir, &["io", "-c", "read 1000000 100000", j]),
        "filter",
    );
    assert_eq!(
        std::fs::read(p(dir, "v.qcow2")).unwrap(),
        before,
        "a read of copied clusters changes nothing"
    );
    // A full copy-on-read pass, then a second full read: only the open reads remotely.
    ok(
        vdisk(dir, &["io", "-C", "-c", "read 0 16M", "v.qcow2"]),
        "full -C",
    );
    let n0 = logged_reads(&log);
    ok(
        vdisk(dir, &["io", "-c", "read 0 512", "v.qcow2"]),
        "open only",
    );
    let n1 = logged_reads(&log);
    ok(
        vdisk(dir, &["io", "-c", "read 0 16M", "v.qcow2"]),
        "second read",
    );
    let n2 = logged_reads(&log);
    assert!(n1 > n0, "opening reads the golden header over NBD");
    assert_eq!(
        n2 - n1,
        n1 - n0,
        "the second full read sent reads to the server"
    );
    // Without copy-on-read, a full read of q.qcow2 asks for much more.
    ok(
        vdisk(dir, &["io", "-c", "read 0 16M", "q.qcow2"]),
        "plain read",
    );
    assert!(logged_reads(&log) - n2 > n1 - n0);
    let c = ok(qemu_img(dir, &["check", "v.qcow2"]), "qemu-img check");
    assert!(c.contains("No errors were found"), "{c}");
    let alone =
        r#"json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"v.qcow2"}}"#;
    // Bit-exact: the golden image with the one write, and complete without its backing.
    cli_support::qemu_io(dir, "raw", "golden.raw", &["write -P 0x77 5M 512"]);
    ok(
        qemu_img(dir, &["compare", "-F", "raw", alone, "golden.raw"]),
        "overlay alone vs golden",
    );
}

/// Extended headers (NBD_OPT_EXTENDED_HEADERS: 32-byte requests, 32-byte reply chunks,
/// NBD_REPLY_TYPE_BLOCK_STATUS_EXT): qemu-nbd 10 offers them and the client uses them
/// (qemu-nbd's negotiation trace shows option 11 and no structured-reply option 8);
/// nbdkit 1.32 refuses option 11 and the client falls back to structured replies.
/// Either way reads, writes, zero writes, flushes and `map` give what qemu-img gives.
#[test]
fn extended_headers_when_offered_structured_replies_otherwise() {
    let d = tmp();
    let dir = d.path();
    let g = golden_raw(dir);
    let trace = p(dir, "qemu-nbd.trace");
    let t = format!(
        "enable=nbd_negotiate_options_check_option,file={}",
        trace.display()
    );
    let q = Server::qemu_nbd(dir, "raw", "e", &["--trace", &t], &g);
    let log = p(dir, "nbdkit.log");
    let k = Server::nbdkit(
        dir,
        &[
            "--filter=log",
            "memory",
            "16M",
            &format!("logfile={}", log.display()),
        ],
    );
    for (name, u) in [("qemu-nbd", q.uri("e")), ("nbdkit", k.uri(""))] {
        vdisk_io(
            dir,
            &u,
            &[
                "write -P 0x44 3M 192k",
                "write -z 9M 1M",
                "write -P 0x45 12M 4k",
                "flush",
                "read -P 0x44 3M 192k",
                "read -P 0 9M 1M",
                "read -P 0x45 12M 4k",
            ],
        );
        let v = ok(vdisk(dir, &["map", "--output=json", &u]), name);
        let qm = ok(qemu_img(dir, &["map", "--output=json", &u]), name);
        assert_eq!(v, qm, "map over {name}");
    }
    let tr = std::fs::read_to_string(&trace).unwrap();
    assert!(tr.contains("Checking option 11 (extended headers)"), "{tr}");
    assert!(
        !tr.contains("Checking option 8 "),
        "structured replies asked for although extended headers were on: {tr}"
    );
    // nbdkit served the requests (in compact headers, the only ones it knows).
    let l = std::fs::read_to_string(&log).unwrap();
    assert!(l.contains("Write id="), "{l}");
}

/// How many NBD_OPT_GO qemu-nbd's negotiation trace recorded (one per connection).
fn traced_gos(trace: &Path) -> usize {
    std::fs::read_to_string(trace)
        .unwrap_or_default()
        .matches("Checking option 7 (go)")
        .count()
}

/// Several connections (vdisk's `connections` key) when the server advertises
/// CAN_MULTI_CONN: qemu-nbd -e 4 gets four (its trace counts the NBD_OPT_GOs), nbdkit
/// sees requests on several (its log filter names the connection of each), and the
/// data written over them and flushed reads back bit-exact through qemu-img. Servers
/// without the flag (qemu-nbd -e 1, nbdkit's multi-conn filter in disable mode) get
/// one connection, and nothing waits for a connection the server would not accept.
#[test]
fn multi_conn_when_the_server_allows_it() {
    let d = tmp();
    let dir = d.path();
    golden_raw(dir);
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "out.raw", "16M"]),
        "create",
    );
    let node = |sock: &Path, n: u32| {
        format!(
            r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{}"}},"connections":{n}}}}}"#,
            sock.display()
        )
    };
    for (e, want) in [("4", 4usize), ("1", 1)] {
        let trace = p(dir, &format!("q{e}.trace"));
        let t = format!(
            "enable=nbd_negotiate_options_check_option,file={}",
            trace.display()
        );
        let out = p(dir, "out.raw");
        let mut s = Server::qemu_nbd(dir, "raw", "", &["-e", e, "--trace", &t], &out);
        let j = node(&s.sock, 4);
        ok(
            vdisk(
                dir,
                &["convert", "-n", "-f", "raw", "-O", "raw", "golden.raw", &j],
            ),
            "convert into the export",
        );
        assert_eq!(traced_gos(&trace), want, "connections with qemu-nbd -e {e}");
        vdisk_io(
            dir,
            &j,
            &["write -P 0x5a 7M 3M", "flush", "read -P 0x5a 7M 3M"],
        );
        s.kill();
        cli_support::qemu_io(dir, "raw", "golden.raw", &["write -P 0x5a 7M 3M"]);
        ok(
            qemu_img(
                dir,
                &["compare", "-f", "raw", "-F", "raw", "out.raw", "golden.raw"],
            ),
            "what went over the connections",
        );
        // Back to the plain golden image for the next round.
        golden_raw(dir);
    }
    for (filter, several) in [(None, true), (Some("multi-conn-mode=disable"), false)] {
        let log = p(dir, "k.log");
        let _ = std::fs::remove_file(&log);
        let lf = format!("logfile={}", log.display());
        let mut a = vec!["--filter=log"];
        if filter.is_some() {
            a.push("--filter=multi-conn");
        }
        a.extend(["memory", "16M", &lf]);
        a.extend(filter);
        let k = Server::nbdkit(dir, &a);
        ok(
            vdisk(
                dir,
                &[
                    "convert",
                    "-n",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    "golden.raw",
                    &node(&k.sock, 3),
                ],
            ),
            "convert into nbdkit",
        );
        ok(
            vdisk(
                dir,
                &[
                    "compare",
                    "-f",
                    "raw",
                    "-F",
                    "raw",
                    "golden.raw",
                    &node(&k.sock, 3),
                ],
            ),
            "compare over the connections",
        );
        let l = std::fs::read_to_string(&log).unwrap();
        let mut conns: Vec<&str> = l
            .lines()
            .filter(|x| x.contains(" Write id=") || x.contains(" Read id="))
            .filter_map(|x| x.split_whitespace().find(|w| w.starts_with("connection=")))
            .collect();
        conns.sort_unstable();
        conns.dedup();
        // Two processes (convert, compare): one connection each without the flag.
        if several {
            assert!(conns.len() > 2, "requests on {conns:?}");
        } else {
            assert_eq!(conns.len(), 2, "requests on {conns:?}");
        }
    }
}
