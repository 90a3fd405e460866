//! Persistent dirty bitmaps against QEMU: bitmaps qemu-img made survive every vdisk
//! read-write session exactly (names, flags, granularity; `qemu-img check` clean; the
//! dirty extents qemu-nbd exports are the ranges written), `vdisk bitmap` gives the
//! same `info` as `qemu-img bitmap`, and `vdisk serve -B` exports the bitmap as
//! qemu-nbd does.

mod cli_support;
use cli_support::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Dirty runs `(offset, length, dirty)` as `nbdinfo --map` prints them.
type Runs = Vec<(u64, u64, bool)>;

/// A running NBD server (qemu-nbd or vdisk serve), stopped with SIGTERM on drop.
struct Srv {
    child: Child,
    sock: std::path::PathBuf,
}

impl Srv {
    fn start(dir: &Path, vdisk_serve: bool, args: &[&str], file: &str) -> Srv {
        let sock = dir.join(format!("s-{}.sock", rand::random::<u32>()));
        let pid = dir.join(format!("s-{}.pid", rand::random::<u32>()));
        let mut c = if vdisk_serve {
            let mut c = Command::new(env!("CARGO_BIN_EXE_vdisk"));
            c.arg("serve");
            c
        } else {
            Command::new("qemu-nbd")
        };
        c.args(args)
            .arg("-k")
            .arg(&sock)
            .arg("--pid-file")
            .arg(&pid)
            .arg(file)
            .current_dir(dir)
            .stdin(Stdio::null());
        let mut child = c.spawn().expect("spawn NBD server");
        let until = Instant::now() + Duration::from_secs(20);
        while !pid.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("server {args:?} exited early: {st}");
            }
            assert!(Instant::now() < until, "server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Srv { child, sock }
    }
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
    /// SIGTERM and wait (a clean shutdown: the image is closed).
    fn stop(mut self) {
        self.term();
    }
    fn term(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("server did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.term();
        }
    }
}

fn parse_map(out: &str) -> Runs {
    let mut v: Runs = Vec::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (o, n, t): (u64, u64, u64) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        let d = t & 1 != 0;
        match v.last_mut() {
            Some(l) if l.2 == d && l.0 + l.1 == o => l.1 += n,
            _ => v.push((o, n, d)),
        }
    }
    v
}

fn nbdinfo_map(uri: &str, bitmap: &str) -> Runs {
    let o = Command::new("timeout")
        .args([
            "60",
            "nbdinfo",
            &format!("--map=qemu:dirty-bitmap:{bitmap}"),
            uri,
        ])
        .output()
        .expect("nbdinfo (libnbd-bin) must be installed");
    assert!(
        o.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    parse_map(&String::from_utf8_lossy(&o.stdout))
}

/// The dirty runs qemu-nbd exports for `bitmap` of `file`.
fn qemu_map(dir: &Path, file: &str, bitmap: &str) -> Runs {
    let s = Srv::start(dir, false, &["-r", "-t", "-f", "qcow2", "-B", bitmap], file);
    let m = nbdinfo_map(&s.uri(), bitmap);
    s.stop();
    m
}

/// What the bitmaps must hold: one set of dirty bits per bitmap.
struct Model {
    size: u64,
    maps: Vec<(String, u64, bool, std::collections::BTreeSet<u64>)>,
}

impl Model {
    fn new(size: u64) -> Model {
        Model {
            size,
            maps: Vec::new(),
        }
    }
    fn add(&mut self, name: &str, gran: u64, enabled: bool) {
        self.maps
            .push((name.into(), gran, enabled, Default::default()));
    }
    fn write(&mut self, off: u64, len: u64) {
        for (_, g, en, bits) in &mut self.maps {
            if *en && len > 0 {
                for b in off / *g..=(off + len - 1) / *g {
                    bits.insert(b);
                }
            }
        }
    }
    fn runs(&self, name: &str) -> Runs {
        let (_, g, _, bits) = self.maps.iter().find(|m| m.0 == name).unwrap();
        let mut v: Runs = Vec::new();
        let nb = self.size.div_ceil(*g);
        for b in 0..nb {
            let o = b * g;
            let n = (*g).min(self.size - o);
            let d = bits.contains(&b);
            match v.last_mut() {
                Some(l) if l.2 == d => l.1 += n,
                _ => v.push((o, n, d)),
            }
        }
        v
    }
    fn check(&self, dir: &Path, file: &str, what: &str) {
        for (name, ..) in &self.maps {
            assert_eq!(
                qemu_map(dir, file, name),
                self.runs(name),
                "{what}: dirty extents of bitmap {name} as qemu-nbd exports them"
            );
        }
    }
}

/// `qemu-img info`'s bitmaps block (name, flags, granularity).
fn bitmaps_info(dir: &Path, file: &str) -> serde_json::Value {
    let j = json(&ok(
        qemu_img(dir, &["info", "-U", "--output=json", file]),
        "qemu-img info",
    ));
    j["format-specific"]["data"]["bitmaps"].clone()
}

fn qemu_check_clean(dir: &Path, file: &str, what: &str) {
    let r = qemu_img(dir, &["check", file]);
    assert_eq!(r.code, 0, "{what}: qemu-img check: {}{}", r.out, r.err);
    assert!(
        !r.out.contains("eak") && !r.err.contains("nconsistent"),
        "{what}: {}{}",
        r.out,
        r.err
    );
}

fn io(dir: &Path, file: &str, cmds: &[&str]) {
    let mut a = vec!["io", "-f", "qcow2"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(file);
    let r = vdisk(dir, &a);
    assert_eq!(r.code, 0, "vdisk io {cmds:?}: {}{}", r.out, r.err);
    assert!(!r.out.contains("failed"), "vdisk io {cmds:?}: {}", r.out);
}

/// An image with four qemu-made bitmaps: default, 4 KiB, 1 MiB disabled, 512 bytes.
fn qemu_image(dir: &Path, file: &str, size: u64) -> Model {
    ok(
        qemu_img(
            dir,
            &["create", "-q", "-f", "qcow2", file, &size.to_string()],
        ),
        "create",
    );
    let mut m = Model::new(size);
    for (name, g, en) in [
        ("b1", 65536u64, true),
        ("b4k", 4096, true),
        ("off", 1 << 20, false),
        ("fine", 512, true),
    ] {
        let gs = g.to_string();
        let mut a = vec!["bitmap", "--add", "-g", &gs];
        if !en {
            a.push("--disable");
        }
        a.extend([file, name]);
        ok(qemu_img(dir, &a), "qemu-img bitmap --add");
        m.add(name, g, en);
    }
    m
}

#[test]
fn qemu_bitmaps_survive_every_vdisk_read_write_session_exactly() {
    let d = tmp();
    let dir = d.path();
    let size = (64 << 20) + 3 * 512;
    let mut m = qemu_image(dir, "a.qcow2", size);
    qemu_io(dir, "qcow2", "a.qcow2", &["write -P 1 0 64k"]);
    m.write(0, 65536);
    let before = bitmaps_info(dir, "a.qcow2");
    assert_eq!(before.as_array().unwrap().len(), 4);

    // Writes, zero writes (allocated and unmapping), discards, unaligned writes.
    io(
        dir,
        "a.qcow2",
        &[
            "write -P 2 1M 4k",
            "write -z 8M 128k",
            "write -z -u 9M 64k",
            "discard 16M 64k",
            "write -P 3 20971521 3",
            "write -P 4 33554000 1000",
            &format!("write -P 5 {} 512", size - 512),
        ],
    );
    for (o, n) in [
        (1 << 20, 4096),
        (8 << 20, 128 << 10),
        (9 << 20, 64 << 10),
        (16 << 20, 64 << 10),
        (20971521, 3),
        (33554000, 1000),
        (size - 512, 512),
    ] {
        m.write(o, n);
    }
    assert_eq!(bitmaps_info(dir, "a.qcow2"), before, "after vdisk io");
    qemu_check_clean(dir, "a.qcow2", "after vdisk io");
    m.check(dir, "a.qcow2", "after vdisk io");

    // A read-write open that writes nothing changes nothing; check -r all frees nothing.
    io(dir, "a.qcow2", &["read 0 4k"]);
    let r = vdisk(dir, &["check", "-r", "all", "a.qcow2"]);
    assert_eq!(r.code, 0, "vdisk check -r all: {}{}", r.out, r.err);
    assert!(!r.out.contains("eak"), "{}", r.out);
    let r = vdisk(dir, &["check", "a.qcow2"]);
    assert_eq!(r.code, 0, "vdisk check: {}{}", r.out, r.err);
    assert_eq!(bitmaps_info(dir, "a.qcow2"), before, "after check -r all");
    qemu_check_clean(dir, "a.qcow2", "after check -r all");
    m.check(dir, "a.qcow2", "after check -r all");

    // Writes through vdisk serve (qemu-io as the NBD client), clean shutdown.
    let s = Srv::start(dir, true, &["-f", "qcow2", "-t"], "a.qcow2");
    let uri = s.uri();
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 6 40M 8k",
            "-c",
            "write -z 44M 1M",
            &uri,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    s.stop();
    m.write(40 << 20, 8192);
    m.write(44 << 20, 1 << 20);
    assert_eq!(bitmaps_info(dir, "a.qcow2"), before, "after vdisk serve");
    qemu_check_clean(dir, "a.qcow2", "after vdisk serve");
    m.check(dir, "a.qcow2", "after vdisk serve");

    // QEMU goes on recording where vdisk left off.
    qemu_io(dir, "qcow2", "a.qcow2", &["write -P 7 50M 64k"]);
    m.write(50 << 20, 65536);
    qemu_check_clean(dir, "a.qcow2", "after qemu-io");
    m.check(dir, "a.qcow2", "after qemu-io");
}

#[test]
fn resize_grows_and_shrinks_every_bitmap_like_qemu() {
    let d = tmp();
    let dir = d.path();
    let mut m = qemu_image(dir, "a.qcow2", 8 << 20);
    io(dir, "a.qcow2", &["write 1M 4k", "write 8388000 192"]);
    m.write(1 << 20, 4096);
    m.write(8388000, 192);
    let before = bitmaps_info(dir, "a.qcow2");
    for (sz, shrink) in [(100 << 20, false), (4 << 20, true)] {
        let s = sz.to_string();
        let mut a = vec!["resize", "-f", "qcow2"];
        if shrink {
            a.push("--shrink");
        }
        a.extend(["a.qcow2", &s]);
        ok(vdisk(dir, &a), "vdisk resize");
        m.size = sz;
        if shrink {
            for (_, g, _, bits) in &mut m.maps {
                let nb = sz.div_ceil(*g);
                bits.retain(|&b| b < nb);
            }
        }
        assert_eq!(bitmaps_info(dir, "a.qcow2"), before, "after resize to {sz}");
        qemu_check_clean(dir, "a.qcow2", "after resize");
        m.check(dir, "a.qcow2", "after resize");
    }
    // The same on a copy resized by qemu-img: same bitmaps, same extents.
    io(dir, "a.qcow2", &["write 3M 64k"]);
    m.write(3 << 20, 65536);
    m.check(dir, "a.qcow2", "after a write past the old end");
}

#[test]
fn vdisk_check_counts_bitmap_clusters_and_in_use_bitmaps_are_kept() {
    let d = tmp();
    let dir = d.path();
    qemu_image(dir, "a.qcow2", 16 << 20);
    io(dir, "a.qcow2", &["write 0 1M"]);
    // A writer killed mid-session (qemu-io raising SIGKILL) leaves its bitmaps in use.
    let _ = qemu_io_run(dir, &["-c", "write 2M 64k", "-c", "sigraise 9", "a.qcow2"]);
    let flags: Vec<String> = bitmaps_info(dir, "a.qcow2")
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["flags"].to_string())
        .collect();
    assert!(flags[0].contains("in-use"), "{flags:?}");
    let before = bitmaps_info(dir, "a.qcow2");
    // vdisk keeps inconsistent bitmaps as they are, in check and in read-write sessions.
    let r = vdisk(dir, &["check", "-r", "all", "a.qcow2"]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    io(dir, "a.qcow2", &["write 4M 64k"]);
    assert_eq!(bitmaps_info(dir, "a.qcow2"), before);
    qemu_check_clean(dir, "a.qcow2", "in-use bitmaps after vdisk");
    let r = vdisk(dir, &["check", "a.qcow2"]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
}

/// Runs the same `bitmap` command with qemu-img on `q.qcow2` and vdisk on `v.qcow2`:
/// same exit code, same message.
fn both(dir: &Path, args: &[&str]) {
    let mut qa = vec!["bitmap"];
    qa.extend(args.iter().map(|a| if *a == "IMG" { "q.qcow2" } else { a }));
    let mut va = vec!["bitmap"];
    va.extend(args.iter().map(|a| if *a == "IMG" { "v.qcow2" } else { a }));
    let q = qemu_img(dir, &qa);
    let v = vdisk(dir, &va);
    assert_eq!(
        v.code, q.code,
        "{args:?}: vdisk {} / qemu-img {}",
        v.err, q.err
    );
    assert_eq!(
        v.err
            .replace("vdisk:", "qemu-img:")
            .replace("v.qcow2", "q.qcow2"),
        q.err,
        "{args:?}"
    );
}

fn same_info(dir: &Path, what: &str) {
    let mut i = Vec::new();
    for f in ["q.qcow2", "v.qcow2"] {
        let mut j = json(&ok(
            qemu_img(dir, &["info", "-U", "--output=json", f]),
            "qemu-img info",
        ));
        strip_keys(&mut j, &["children", "actual-size", "filename"]);
        i.push(j);
    }
    assert_eq!(i[1], i[0], "{what}: qemu-img info of the vdisk-made image");
    // vdisk's own info prints the same JSON and the same human block.
    let mut vj = json(&ok(
        vdisk(dir, &["info", "--output=json", "v.qcow2"]),
        "info",
    ));
    strip_keys(&mut vj, &["children", "actual-size", "filename"]);
    assert_eq!(vj, i[0], "{what}: vdisk info --output=json");
    let human = |r: Run| -> String {
        r.out
            .lines()
            .skip_while(|l| !l.starts_with("Format specific"))
            .take_while(|l| !l.starts_with("Child node"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        human(vdisk(dir, &["info", "v.qcow2"])),
        human(qemu_img(dir, &["info", "q.qcow2"])),
        "{what}: human info"
    );
    qemu_check_clean(dir, "v.qcow2", what);
}

#[test]
fn vdisk_bitmap_sequences_give_the_same_info_as_qemu_img() {
    let d = tmp();
    let dir = d.path();
    for f in ["q.qcow2", "v.qcow2"] {
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", f, "64M"]),
            "create",
        );
    }
    let seqs: &[&[&str]] = &[
        &["--add", "IMG", "b1"],
        &["--add", "-g", "128k", "--disable", "IMG", "b2"],
        &["--add", "--remove", "IMG", "b3"],
        &["--add", "IMG", "b1"],
        &["--remove", "IMG", "nope"],
        &["--clear", "IMG", "nope"],
        &["--add", "-g", "3000", "IMG", "g"],
        &["--add", "-g", "256", "IMG", "g"],
        &["--add", "IMG", ""],
        &["--add", "-g", "1k", "IMG", "fine"],
        &["--disable", "--enable", "IMG", "fine"],
        &["-g", "64k", "--remove", "IMG", "b1"],
        &["-F", "qcow2", "--merge", "b1", "IMG", "b2"],
        &["IMG", "b1"],
        &["--add", "IMG"],
    ];
    for s in seqs {
        both(dir, s);
    }
    same_info(dir, "after the command sequences");
    // Contents: writes recorded by enabled bitmaps, then merged, cleared, re-enabled.
    for f in ["q.qcow2", "v.qcow2"] {
        qemu_io(dir, "qcow2", f, &["write 1M 64k", "write 5M 1k"]);
    }
    for s in [
        &["--merge", "b1", "IMG", "b2"][..],
        &["--clear", "--disable", "IMG", "fine"],
        &["--enable", "IMG", "b2"],
    ] {
        both(dir, s);
    }
    for f in ["q.qcow2", "v.qcow2"] {
        qemu_io(dir, "qcow2", f, &["write 9M 4k"]);
    }
    same_info(dir, "after writes and merges");
    for b in ["b1", "b2", "fine"] {
        assert_eq!(
            qemu_map(dir, "v.qcow2", b),
            qemu_map(dir, "q.qcow2", b),
            "bitmap {b}: dirty extents of the vdisk-changed image"
        );
    }
    // Merge from another file (-b, -F) into a bitmap of v.qcow2.
    let v = vdisk(dir, &["bitmap", "--add", "v.qcow2", "m"]);
    assert_eq!(v.code, 0, "{}", v.err);
    let v = vdisk(
        dir,
        &[
            "bitmap", "--merge", "b2", "-b", "q.qcow2", "-F", "qcow2", "v.qcow2", "m",
        ],
    );
    assert_eq!(v.code, 0, "{}", v.err);
    assert_eq!(
        qemu_map(dir, "v.qcow2", "m"),
        qemu_map(dir, "q.qcow2", "b2")
    );
    // v2 images and raw files cannot hold bitmaps.
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "old.qcow2",
                "1M",
            ],
        ),
        "create v2",
    );
    let v = vdisk(dir, &["bitmap", "--add", "old.qcow2", "b"]);
    assert_eq!(v.code, 1);
    assert!(
        v.err
            .contains("Cannot store dirty bitmaps in qcow2 v2 files"),
        "{}",
        v.err
    );
}

fn nbdinfo_contexts(uri: &str) -> Vec<String> {
    let o = Command::new("timeout")
        .args(["60", "nbdinfo", "--list", uri])
        .output()
        .unwrap();
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| l.starts_with("base:") || l.starts_with("qemu:"))
        .collect()
}

/// Runs qemu-io commands `cmds` on the NBD export at `uri`; they must succeed.
fn qemu_io_uri(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.arg(uri).output().unwrap();
    assert!(o.status.success(), "qemu-io {cmds:?} on {uri}");
}

/// `a.qcow2` for the serve tests: qemu-img's bitmaps, then writes qemu-io records in
/// them.
fn served_image(dir: &Path) {
    qemu_image(dir, "a.qcow2", (32 << 20) + 512);
    qemu_io(
        dir,
        "qcow2",
        "a.qcow2",
        &["write 0 64k", "write 3M 1k", "write 30M 2M"],
    );
}

#[test]
fn serve_b_exports_dirty_bitmaps_as_qemu_nbd() {
    let d = tmp();
    let dir = d.path();
    served_image(dir);
    let bms = ["-B", "b1", "-B", "b4k", "-B", "off", "-B", "fine"];
    // Read-only: the same contexts and the same maps as qemu-nbd.
    for ro in [true, false] {
        let mut args = vec!["-f", "qcow2", "-t"];
        if ro {
            args.push("-r");
        }
        args.extend(bms);
        std::fs::copy(dir.join("a.qcow2"), dir.join("q.qcow2")).unwrap();
        let v = Srv::start(dir, true, &args, "a.qcow2");
        let q = Srv::start(dir, false, &args, "q.qcow2");
        assert_eq!(
            nbdinfo_contexts(&v.uri()),
            nbdinfo_contexts(&q.uri()),
            "ro={ro}"
        );
        if !ro {
            // Writes through each export are recorded live, as qemu-nbd does.
            for s in [&v, &q] {
                qemu_io_uri(
                    &s.uri(),
                    &["write 5M 4k", "write -z 7M 1M", "discard 20M 64k"],
                );
            }
        }
        for b in ["b1", "b4k", "off", "fine"] {
            assert_eq!(
                nbdinfo_map(&v.uri(), b),
                nbdinfo_map(&q.uri(), b),
                "ro={ro}: qemu:dirty-bitmap:{b}"
            );
        }
        v.stop();
        q.stop();
        qemu_check_clean(dir, "a.qcow2", "after serve -B");
    }
    // A missing bitmap fails like qemu-nbd.
    let r = vdisk(
        dir,
        &[
            "serve", "-r", "-f", "qcow2", "-B", "nope", "-k", "x.sock", "a.qcow2",
        ],
    );
    assert_eq!(r.code, 1);
    assert_eq!(r.err, "vdisk: Bitmap 'nope' is not found\n");
}

/// `serve -s -B NAME` as `qemu-nbd -s -B NAME`: the bitmap exported is the one of the
/// image under the temporary overlay, as it was at open; writes through the export
/// land in the overlay and mark nothing (qemu-nbd 10's behaviour), and the image file
/// is left as it was.
#[test]
fn serve_snapshot_exports_the_bitmaps_of_the_image_below() {
    let d = tmp();
    let dir = d.path();
    served_image(dir);
    std::fs::copy(dir.join("a.qcow2"), dir.join("q.qcow2")).unwrap();
    let before = std::fs::read(dir.join("a.qcow2")).unwrap();
    let args = ["-f", "qcow2", "-t", "-s", "-B", "b1", "-B", "b4k"];
    let v = Srv::start(dir, true, &args, "a.qcow2");
    let q = Srv::start(dir, false, &args, "q.qcow2");
    assert_eq!(nbdinfo_contexts(&v.uri()), nbdinfo_contexts(&q.uri()));
    for s in [&v, &q] {
        qemu_io_uri(&s.uri(), &["write 5M 4k", "write -z 7M 1M"]);
    }
    for b in ["b1", "b4k"] {
        let m = nbdinfo_map(&v.uri(), b);
        assert_eq!(m, nbdinfo_map(&q.uri(), b), "qemu:dirty-bitmap:{b}");
        assert!(
            m.iter().any(|r| r.2),
            "{b}: the base's dirty runs are exported"
        );
        assert!(
            !m.iter()
                .any(|r| r.2 && r.0 <= 5 << 20 && 5 << 20 < r.0 + r.1),
            "{b}: a write into the overlay marked the bitmap: {m:?}"
        );
    }
    v.stop();
    q.stop();
    assert_eq!(std::fs::read(dir.join("a.qcow2")).unwrap(), before);
}

#[test]
fn incremental_backup_over_nbd_restores_the_live_image() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "live.qcow2", "16M"]),
        "create",
    );
    qemu_io(
        dir,
        "qcow2",
        "live.qcow2",
        &["write -P 1 0 4M", "write -P 2 10M 1M"],
    );
    // Full backup, and a bitmap recording every later change.
    ok(
        qemu_img(
            dir,
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                "live.qcow2",
                "full.qcow2",
            ],
        ),
        "full backup",
    );
    ok(
        vdisk(dir, &["bitmap", "--add", "-g", "64k", "live.qcow2", "inc"]),
        "add",
    );
    // The guest writes through vdisk serve.
    let s = Srv::start(dir, true, &["-f", "qcow2", "-t"], "live.qcow2");
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 3 1M 4k",
            "-c",
            "write -P 4 6M 100k",
            "-c",
            "write -z 10M 64k",
            "-c",
            "write -P 5 16773120 4096",
            &s.uri(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    s.stop();
    // Incremental: only the dirty extents, read over NBD.
    let s = Srv::start(
        dir,
        true,
        &["-r", "-f", "qcow2", "-t", "-B", "inc"],
        "live.qcow2",
    );
    let map = nbdinfo_map(&s.uri(), "inc");
    let dirty: Vec<(u64, u64)> = map.iter().filter(|r| r.2).map(|r| (r.0, r.1)).collect();
    assert_eq!(dirty.len(), 4, "{map:?}");
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "full.qcow2",
                "-F",
                "qcow2",
                "inc.qcow2",
            ],
        ),
        "increment",
    );
    let sock = s.sock.display().to_string();
    for (off, len) in &dirty {
        let src = format!(
            "json:{{\"driver\":\"raw\",\"offset\":{off},\"size\":{len},\"file\":{{\"driver\":\"nbd\",\"server\":{{\"type\":\"unix\",\"path\":\"{sock}\"}}}}}}"
        );
        ok(
            qemu_img(dir, &["convert", "-O", "raw", &src, "chunk.bin"]),
            "read extent",
        );
        qemu_io(
            dir,
            "qcow2",
            "inc.qcow2",
            &[&format!("write -s chunk.bin {off} {len}")],
        );
    }
    s.stop();
    let r = qemu_img(
        dir,
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "inc.qcow2",
            "live.qcow2",
        ],
    );
    assert_eq!(r.code, 0, "restore = full + increment: {}{}", r.out, r.err);
    // Only the dirty extents were copied into the increment.
    let copied: u64 = dirty.iter().map(|d| d.1).sum();
    assert!(copied <= 4 * 65536 + 2 * 65536, "copied {copied} bytes");
    qemu_check_clean(dir, "live.qcow2", "live after backup");
}

#[test]
fn convert_bitmaps_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    let m = qemu_image(dir, "s.qcow2", 16 << 20);
    qemu_io(dir, "qcow2", "s.qcow2", &["write 1M 64k", "write 9M 3k"]);
    for (tool, out) in [("q", "q.qcow2"), ("v", "v.qcow2")] {
        let args = ["convert", "--bitmaps", "-O", "qcow2", "s.qcow2", out];
        let r = if tool == "q" {
            qemu_img(dir, &args)
        } else {
            vdisk(dir, &args)
        };
        assert_eq!(r.code, 0, "{tool}: {}", r.err);
    }
    same_info(dir, "convert --bitmaps");
    for (name, ..) in &m.maps {
        assert_eq!(
            qemu_map(dir, "v.qcow2", name),
            qemu_map(dir, "s.qcow2", name),
            "bitmap {name} copied by vdisk convert --bitmaps"
        );
    }
    // Refusals and inconsistent bitmaps, with qemu-img's messages and exit codes.
    let _ = qemu_io_run(dir, &["-c", "write 0 4k", "-c", "sigraise 9", "s.qcow2"]);
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "two.qcow2", "1M"]),
        "create",
    );
    for args in [
        &["--bitmaps", "-O", "raw", "s.qcow2", "OUT.raw"][..],
        &[
            "--bitmaps",
            "-O",
            "qcow2",
            "s.qcow2",
            "two.qcow2",
            "OUT.qcow2",
        ],
        &["--bitmaps", "-O", "qcow2", "s.qcow2", "OUT.qcow2"],
        &[
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "s.qcow2",
            "OUT.qcow2",
        ],
    ] {
        let qa: Vec<String> = std::iter::once("convert".to_string())
            .chain(args.iter().map(|a| a.replace("OUT", "q")))
            .collect();
        let va: Vec<String> = std::iter::once("convert".to_string())
            .chain(args.iter().map(|a| a.replace("OUT", "q")))
            .collect();
        let q = qemu_img(dir, &qa.iter().map(String::as_str).collect::<Vec<_>>());
        let v = vdisk(dir, &va.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(v.code, q.code, "{args:?}: {} / {}", v.err, q.err);
        assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "{args:?}");
    }
}

/// `qemu-img bitmap ACTION… FILE NAME`, `args` ending with the bitmap's name.
fn qemu_bitmap(dir: &Path, file: &str, args: &[&str]) {
    let (name, acts) = args.split_last().unwrap();
    let c: Vec<&str> = std::iter::once("bitmap")
        .chain(acts.iter().copied())
        .chain([file, name])
        .collect();
    ok(qemu_img(dir, &c), "bitmap");
}

/// `commit` and bitmaps as qemu-img 10 (block/commit.c writes into the base through
/// the block layer; qcow2's make_empty works below it): the base's enabled bitmaps
/// mark every range the commit writes (data and zeroes, from every layer above),
/// disabled ones stay as they were; no bitmap is copied or merged from the top into
/// the base (same-named or not); the top's bitmaps are not marked by its emptying,
/// and the layers between stay untouched. Side by side with qemu-img on the same
/// chains: `info` bitmaps block, qemu-nbd's dirty extents of every bitmap of every
/// layer, `check` clean and `compare` equal.
#[test]
fn commit_keeps_and_marks_bitmaps_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    type Mk = fn(&Path, &str) -> (Vec<String>, Vec<(usize, &'static str)>);
    // Each chain: its files (top first), the commit arguments, and the bitmaps.
    let two: Mk = |dir, p| {
        let (b, o) = (format!("{p}-b.qcow2"), format!("{p}-o.qcow2"));
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", &b, "64M"]),
            "create",
        );
        ok(
            qemu_img(
                dir,
                &["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &o],
            ),
            "create",
        );
        for (f, args) in [
            (&o, &["--add", "tb"][..]),
            (&b, &["--add", "both"]),
            (&o, &["--add", "both"]),
            (&b, &["--add", "-g", "512k", "bonly"]),
            (&b, &["--add", "--disable", "off"]),
        ] {
            qemu_bitmap(dir, f, args);
        }
        qemu_io(
            dir,
            "qcow2",
            &o,
            &[
                "write -P 3 0 1M",
                "write -P 3 20M 64k",
                "write -z 30M 64k",
                "write -P 7 50M 4k",
            ],
        );
        qemu_io(dir, "qcow2", &b, &["write -P 5 40M 64k"]);
        (
            vec![o, b],
            vec![
                (0, "tb"),
                (0, "both"),
                (1, "both"),
                (1, "bonly"),
                (1, "off"),
            ],
        )
    };
    let three: Mk = |dir, p| {
        let (b, m, o) = (
            format!("{p}-b3.qcow2"),
            format!("{p}-m3.qcow2"),
            format!("{p}-o3.qcow2"),
        );
        ok(
            qemu_img(dir, &["create", "-q", "-f", "qcow2", &b, "64M"]),
            "create",
        );
        for (f, back) in [(&m, &b), (&o, &m)] {
            ok(
                qemu_img(
                    dir,
                    &["create", "-q", "-f", "qcow2", "-b", back, "-F", "qcow2", f],
                ),
                "create",
            );
        }
        for (f, args) in [
            (&o, &["--add", "tb"][..]),
            (&b, &["--add", "-g", "128k", "bb"]),
            (&m, &["--add", "mb"]),
        ] {
            qemu_bitmap(dir, f, args);
        }
        qemu_io(dir, "qcow2", &o, &["write -P 3 0 1M", "write -z 30M 64k"]);
        qemu_io(
            dir,
            "qcow2",
            &m,
            &["write -P 5 40M 64k", "write -P 6 1M 4k", "discard 0 64k"],
        );
        (vec![o, m, b], vec![(0, "tb"), (1, "mb"), (2, "bb")])
    };
    let cases: &[(Mk, &[&str])] = &[(two, &[]), (two, &["-d"]), (three, &["-b", "BASE"])];
    for (n, (mk, extra)) in cases.iter().enumerate() {
        let (qf, maps) = mk(dir, &format!("q{n}"));
        let (vf, _) = mk(dir, &format!("v{n}"));
        let run = |files: &[String]| {
            let mut a: Vec<String> = vec!["commit".into()];
            for e in *extra {
                a.push(if *e == "BASE" {
                    files.last().unwrap().clone()
                } else {
                    e.to_string()
                });
            }
            a.push(files[0].clone());
            a
        };
        let qa = run(&qf);
        let va = run(&vf);
        let q = qemu_img(dir, &qa.iter().map(String::as_str).collect::<Vec<_>>());
        let v = vdisk(dir, &va.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            (v.code, &v.out),
            (q.code, &q.out),
            "{va:?}: {} / {}",
            v.err,
            q.err
        );
        for (i, (qn, vn)) in qf.iter().zip(&vf).enumerate() {
            let what = format!("case {n} ({extra:?}) layer {i}");
            assert_eq!(
                bitmaps_info(dir, vn),
                bitmaps_info(dir, qn),
                "{what}: bitmaps"
            );
            qemu_check_clean(dir, vn, &what);
            for (_, name) in maps.iter().filter(|m| m.0 == i) {
                assert_eq!(
                    qemu_map(dir, vn, name),
                    qemu_map(dir, qn, name),
                    "{what}: dirty extents of {name}"
                );
            }
        }
        let base = (qf.last().unwrap(), vf.last().unwrap());
        ok(
            qemu_img(dir, &["compare", "-q", base.0, base.1]),
            "compare bases",
        );
    }
}
