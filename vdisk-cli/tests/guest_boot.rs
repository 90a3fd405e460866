//! A real Linux guest on vdisk: a Debian kernel boots a busybox initramfs under
//! `qemu-system-x86_64` (TCG) with its disks served by `vdisk serve`, makes and checks
//! an ext4 filesystem, and runs a raw workload whose result must equal the same
//! workload on QEMU's own qcow2 driver. See `guest_support` for the harness.

mod cli_support;
mod guest_support;

use cli_support::{ok, qemu_img};
use guest_support::{
    expected_sums, ext4_workload, initramfs, kit, raw_workload, Disk, Guest, Vm, VmSpec,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long one boot may take (TCG on a loaded machine; it takes 10-20 s idle).
const BOOT_LIMIT: Duration = Duration::from_secs(240);

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The options of an NBD export on Unix socket `sock` (qcow2, O_DIRECT, discard
/// passed through), the same for `vdisk serve` and `qemu-nbd`.
fn nbd_options<'a>(sock: &'a Path, image: &'a Path) -> [&'a str; 7] {
    [
        "-k",
        s(sock),
        "-f",
        "qcow2",
        "--cache=none",
        "--discard=unmap",
        s(image),
    ]
}

/// A `vdisk serve` process.
struct Serve {
    child: Child,
    sock: PathBuf,
}

impl Serve {
    /// `vdisk serve ARGS` with the socket `sock` appearing when it listens.
    fn start(args: &[&str], sock: &Path) -> Serve {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("start vdisk serve");
        let mut sv = Serve {
            child,
            sock: sock.to_path_buf(),
        };
        let until = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if let Ok(Some(st)) = sv.child.try_wait() {
                panic!("vdisk serve {args:?} exited ({st}) before listening");
            }
            assert!(
                Instant::now() < until,
                "vdisk serve {args:?} never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sv
    }
    /// NBD on a Unix socket, qcow2, discard passed through.
    fn nbd(dir: &Path, name: &str, image: &Path) -> Serve {
        let sock = dir.join(format!("{name}.sock"));
        Serve::start(&nbd_options(&sock, image), &sock)
    }
    /// vhost-user-blk on a Unix socket, qcow2, discard passed through.
    fn vhost(dir: &Path, name: &str, image: &Path, queues: u16) -> Serve {
        let sock = dir.join(format!("{name}.vhost"));
        let q = queues.to_string();
        Serve::start(
            &[
                "--vhost-user-blk",
                s(&sock),
                "--num-queues",
                &q,
                "-f",
                "qcow2",
                "--cache=none",
                "--discard=unmap",
                s(image),
            ],
            &sock,
        )
    }
    /// The FUSE export over the (created) regular file `dir/name.raw`.
    fn fuse(dir: &Path, name: &str, image: &Path) -> Serve {
        let mp = dir.join(format!("{name}.raw"));
        std::fs::write(&mp, b"").expect("create the mount point");
        let child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .args([
                "serve",
                "--fuse",
                s(&mp),
                "-f",
                "qcow2",
                "--discard=unmap",
                s(image),
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("start vdisk serve --fuse");
        let mut sv = Serve {
            child,
            sock: mp.clone(),
        };
        // Mounted when the file shows the image's size.
        let until = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&mp).map(|m| m.len()).unwrap_or(0) == 0 {
            if let Ok(Some(st)) = sv.child.try_wait() {
                panic!("vdisk serve --fuse exited ({st}) before mounting");
            }
            assert!(Instant::now() < until, "vdisk serve --fuse never mounted");
            std::thread::sleep(Duration::from_millis(20));
        }
        sv
    }
    /// SIGTERM, then the exit status.
    fn terminate(self) -> ExitStatus {
        // SAFETY: kill(2) on the pid of a child this struct owns and has not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait(Duration::from_secs(30))
    }
    fn wait(mut self, limit: Duration) -> ExitStatus {
        let until = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(Instant::now() < until, "vdisk serve did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn create_qcow2(dir: &Path, name: &str, size: &str) -> PathBuf {
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", name, size]),
        "qemu-img create",
    );
    dir.join(name)
}

/// `qemu-img check` must find no errors and no leaks.
fn assert_clean(dir: &Path, img: &Path) {
    let r = qemu_img(dir, &["check", s(img)]);
    assert_eq!(
        r.code,
        0,
        "qemu-img check {}: {}{}",
        img.display(),
        r.out,
        r.err
    );
    assert!(r.out.contains("No errors were found"), "{}", r.out);
}

/// The guest workload every export runs: ext4 on vda, the raw workload on vdb.
fn workload_body() -> String {
    format!(
        "{}\n{}",
        ext4_workload("/dev/vda"),
        raw_workload("/dev/vdb")
    )
}

/// The workload once on QEMU's own qcow2 driver (shared by the tests of this file).
struct Baseline {
    /// Keeps the images.
    _dir: tempfile::TempDir,
    /// vda (ext4) and vdb (raw workload).
    qa: PathBuf,
    qb: PathBuf,
    /// What the guest printed as the raw disk's checksum.
    raw: String,
}

fn baseline() -> &'static Baseline {
    static B: std::sync::OnceLock<Baseline> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        let kit = kit();
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path();
        let initrd = initramfs(&kit, &workload_body(), &[]);
        let qa = create_qcow2(dir, "qa.qcow2", "256M");
        let qb = create_qcow2(dir, "qb.qcow2", "64M");
        let spec = VmSpec {
            disks: vec![
                Disk::Image {
                    path: qa.clone(),
                    fmt: "qcow2",
                },
                Disk::Image {
                    path: qb.clone(),
                    fmt: "qcow2",
                },
            ],
            ..VmSpec::default()
        };
        let q = Vm::start(dir, "qemu", &initrd, &spec).finish(BOOT_LIMIT);
        q.assert_ok();
        assert_eq!(q.sums(), expected_sums());
        let raw = q.value("RAW");
        Baseline {
            _dir: d,
            qa,
            qb,
            raw,
        }
    })
}

/// Checks a guest that ran [`workload_body`] on vdisk images `va`, `vb`: known
/// checksums, clean fsck, fstrim reached the image, `qemu-img check` clean, the raw
/// disk identical to the run on QEMU's qcow2 driver, and no more space used after
/// fstrim than QEMU's image.
fn assert_workload(dir: &Path, g: &guest_support::Guest, va: &Path, vb: &Path) {
    g.assert_ok();
    assert_eq!(g.sums(), expected_sums(), "files read back\n{}", g.console);
    assert_eq!(g.value("FSCK"), "0", "{}", g.console);
    assert!(g.value("FSTRIM").contains("trimmed"), "{}", g.console);
    assert_clean(dir, va);
    assert_clean(dir, vb);
    let b = baseline();
    assert_eq!(g.value("RAW"), b.raw, "raw disk as the guest saw it");
    let r = qemu_img(
        dir,
        &["compare", "-f", "qcow2", "-F", "qcow2", s(vb), s(&b.qb)],
    );
    assert_eq!(r.code, 0, "qemu-img compare: {}{}", r.out, r.err);
    assert!(r.out.contains("Images are identical"), "{}", r.out);
    let used = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (v, q) = (used(va), used(&b.qa));
    assert!(
        v <= q + q / 4 + (4 << 20),
        "after fstrim vdisk's image is {v} bytes, qemu's {q}"
    );
}

/// mkfs + files + fsck on vda and a deterministic raw workload on vdb, both disks
/// served by `vdisk serve` over NBD (QEMU's NBD client, `nbd+unix://`).
#[test]
fn guest_workload_over_nbd_matches_qemu_qcow2() {
    let kit = kit();
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    let initrd = initramfs(&kit, &workload_body(), &[]);
    let va = create_qcow2(dir, "va.qcow2", "256M");
    let vb = create_qcow2(dir, "vb.qcow2", "64M");
    let sa = Serve::nbd(dir, "va", &va);
    let sb = Serve::nbd(dir, "vb", &vb);
    let spec = VmSpec {
        disks: vec![Disk::Nbd(sa.sock.clone()), Disk::Nbd(sb.sock.clone())],
        ..VmSpec::default()
    };
    let g = Vm::start(dir, "vdisk", &initrd, &spec).finish(BOOT_LIMIT);
    // The client left: each server flushes, closes and exits 0.
    assert!(sa.wait(Duration::from_secs(30)).success());
    assert!(sb.wait(Duration::from_secs(30)).success());
    assert_workload(dir, &g, &va, &vb);
}

/// The same workload with both disks on `vdisk serve --vhost-user-blk` (guest memory
/// in a shared memfd), two vCPUs and two queues per disk; SIGTERM stops the servers
/// cleanly afterwards.
#[test]
fn guest_workload_over_vhost_user_blk_matches_qemu_qcow2() {
    let kit = kit();
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    // The guest sees both queues and the device id (GET_ID).
    let body = format!(
        "{}\necho \"VDISK-QUEUES $(ls /sys/block/vda/mq | wc -l)\"\necho \"VDISK-SERIAL $(cat /sys/block/vda/serial)\"",
        workload_body()
    );
    let initrd = initramfs(&kit, &body, &[]);
    let va = create_qcow2(dir, "va.qcow2", "256M");
    let vb = create_qcow2(dir, "vb.qcow2", "64M");
    let sa = Serve::vhost(dir, "va", &va, 2);
    let sb = Serve::vhost(dir, "vb", &vb, 2);
    let spec = VmSpec {
        disks: vec![
            Disk::VhostUser {
                sock: sa.sock.clone(),
                queues: 2,
            },
            Disk::VhostUser {
                sock: sb.sock.clone(),
                queues: 2,
            },
        ],
        cpus: 2,
        ..VmSpec::default()
    };
    let g = Vm::start(dir, "vhost", &initrd, &spec).finish(BOOT_LIMIT);
    assert!(sa.terminate().success());
    assert!(sb.terminate().success());
    assert_workload(dir, &g, &va, &vb);
    assert_eq!(g.value("QUEUES"), "2", "{}", g.console);
    assert_eq!(g.value("SERIAL"), "vdisk", "{}", g.console);
}

/// The same workload on the raw view of the qcow2 images through `vdisk serve --fuse`
/// (QEMU opens the mounted file as a raw image; its discards arrive as fallocate
/// punch-hole); SIGTERM unmounts.
#[test]
fn guest_workload_on_fuse_raw_view_matches_qemu_qcow2() {
    let kit = kit();
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    let initrd = initramfs(&kit, &workload_body(), &[]);
    let va = create_qcow2(dir, "va.qcow2", "256M");
    let vb = create_qcow2(dir, "vb.qcow2", "64M");
    let sa = Serve::fuse(dir, "va", &va);
    let sb = Serve::fuse(dir, "vb", &vb);
    let spec = VmSpec {
        disks: vec![
            Disk::Image {
                path: sa.sock.clone(),
                fmt: "raw",
            },
            Disk::Image {
                path: sb.sock.clone(),
                fmt: "raw",
            },
        ],
        ..VmSpec::default()
    };
    let g = Vm::start(dir, "fuse", &initrd, &spec).finish(BOOT_LIMIT);
    let (ma, mb) = (sa.sock.clone(), sb.sock.clone());
    assert!(sa.terminate().success());
    assert!(sb.terminate().success());
    // Unmounted: the mount points are the empty files again.
    assert_eq!(std::fs::metadata(&ma).expect("mount point").len(), 0);
    assert_eq!(std::fs::metadata(&mb).expect("mount point").len(), 0);
    assert_workload(dir, &g, &va, &vb);
}

/// Guest shell, in a mounted /mnt: copies each /data file to `F.TAG<i>` (i up to 399),
/// `sync`s after each copy and then prints `VDISK-SYNCED F.TAG<i>`, so every announced
/// file was acknowledged and flushed by the device before the line appeared.
fn synced_copies(tag: &str) -> String {
    format!(
        r#"
i=0
while [ $i -lt 400 ]; do
  for f in a b c d; do
    cp /data/$f.bin /mnt/$f.{tag}$i
    sync
    echo "VDISK-SYNCED $f.{tag}$i"
  done
  i=$((i+1))
done
"#
    )
}

/// The files a console announced with `VDISK-SYNCED`.
fn synced_files(console: &str) -> Vec<String> {
    let synced: Vec<String> = Guest {
        console: console.to_string(),
    }
    .lines("SYNCED");
    assert!(
        synced.len() >= 10,
        "few files synced before the kill:\n{console}"
    );
    synced
}

/// Guest shell, in a mounted /mnt: a `VDISK-SUM` line for each of `names`.
fn sum_lines(names: &[String]) -> String {
    format!(
        "for f in {}; do echo \"VDISK-SUM $(sha256sum /mnt/$f)\"; done\n",
        names.join(" ")
    )
}

/// Every one of `names` (made by [`synced_copies`]) read back by `g` with the checksum
/// of the data file it copied.
fn assert_read_back(g: &Guest, names: &[String]) {
    let want = expected_sums();
    let got = g.sums();
    for name in names {
        let base = name.split('.').next().expect("name");
        assert_eq!(
            got.get(name),
            want.get(&format!("{base}.bin")),
            "{name} after the crash\n{}",
            g.console
        );
    }
}

/// Guest shell: unmount /mnt, then `e2fsck -fn` of vda (`VDISK-FSCK <status>`).
const UMOUNT_AND_FSCK: &str = r#"
umount /mnt
rc=0; /xbin/e2fsck -fn /dev/vda >/tmp/fsck 2>&1 || rc=$?
cat /tmp/fsck
echo "VDISK-FSCK $rc"
"#;

/// Guest shell: a fresh ext4 on vda, mounted on /mnt.
const MKFS_AND_MOUNT: &str = "/xbin/mke2fs -q -t ext4 -F /dev/vda\nmount -t ext4 /dev/vda /mnt\n";

/// A VM killed (SIGKILL) while writing and syncing files, its server killed with it:
/// the image passes `qemu-img check`, and a second boot on it (journal replay) reads
/// every file that was synced before the kill with its checksum, and fsck is clean.
#[test]
fn sigkill_during_writes_keeps_synced_files() {
    let kit = kit();
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    let img = create_qcow2(dir, "crash.qcow2", "256M");
    let writer = format!("{MKFS_AND_MOUNT}{}", synced_copies(""));
    let initrd = initramfs(&kit, &writer, &[]);
    let sv = Serve::nbd(dir, "crash", &img);
    let spec = VmSpec {
        disks: vec![Disk::Nbd(sv.sock.clone())],
        ..VmSpec::default()
    };
    let mut vm = Vm::start(dir, "writer", &initrd, &spec);
    vm.wait_for("VDISK-SYNCED b.2", BOOT_LIMIT);
    let console = vm.kill();
    sv.kill();
    let synced = synced_files(&console);

    // The server ran its O_DIRECT requests on io_uring with the image as a fixed file:
    // after a SIGKILL the kernel drops the ring's file references (and so the image's
    // OFD lock) asynchronously, a moment after the process is reaped.
    let until = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = qemu_img(dir, &["check", s(&img)]);
        if !r.err.contains("Failed to get shared \"write\" lock") || Instant::now() > until {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        r.code == 0 || r.code == 3,
        "qemu-img check after the crash: {}{}",
        r.out,
        r.err
    );
    assert!(!r.out.contains("ERROR"), "{}", r.out);
    if r.code == 3 {
        // Clusters allocated for writes in flight at the kill are leaked (their
        // refcount went to disk before the L2 entry, the safe order): harmless, and
        // what `qemu-img check -r leaks` is for. Repaired here so the final check
        // below sees only what the second boot and its clean shutdown leave.
        assert!(r.out.contains("leaked clusters were found"), "{}", r.out);
        let fix = qemu_img(dir, &["check", "-r", "leaks", s(&img)]);
        assert_eq!(
            fix.code, 0,
            "qemu-img check -r leaks: {}{}",
            fix.out, fix.err
        );
    }

    // Second boot: mount replays the journal; every synced file must be intact.
    let reader = format!(
        "mount -t ext4 /dev/vda /mnt\n{}{UMOUNT_AND_FSCK}",
        sum_lines(&synced)
    );
    let initrd = initramfs(&kit, &reader, &[]);
    let sv = Serve::nbd(dir, "crash2", &img);
    let spec = VmSpec {
        disks: vec![Disk::Nbd(sv.sock.clone())],
        ..VmSpec::default()
    };
    let g = Vm::start(dir, "reader", &initrd, &spec).finish(BOOT_LIMIT);
    g.assert_ok();
    assert_read_back(&g, &synced);
    assert_eq!(g.value("FSCK"), "0", "{}", g.console);
    assert!(sv.wait(Duration::from_secs(30)).success());
    assert_clean(dir, &img);
}

/// One `vdisk serve --vhost-user-blk` through a VMM crash and a stop under load: a VM
/// writing and syncing files is killed (SIGKILL); a new VM connects to the same,
/// still-running server, replays the journal, reads every synced file back and writes
/// more; the server gets SIGTERM while that guest is still writing, finishes the
/// requests in flight, flushes and exits 0. Nothing is leaked (no process holding the
/// image died), and a third boot reads every file either VM saw synced.
#[test]
fn vmm_restart_and_sigterm_under_load_over_vhost_user_blk() {
    let kit = kit();
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    let img = create_qcow2(dir, "re.qcow2", "256M");
    let mut sv = Serve::vhost(dir, "re", &img, 1);
    let spec = VmSpec {
        disks: vec![Disk::VhostUser {
            sock: sv.sock.clone(),
            queues: 1,
        }],
        ..VmSpec::default()
    };

    let writer = format!("{MKFS_AND_MOUNT}{}", synced_copies("x"));
    let mut vm = Vm::start(dir, "first", &initramfs(&kit, &writer, &[]), &spec);
    vm.wait_for("VDISK-SYNCED b.x2", BOOT_LIMIT);
    let first = synced_files(&vm.kill());
    assert!(
        matches!(sv.child.try_wait(), Ok(None)),
        "the server exited with the VMM"
    );

    // The same server, a new VMM: it must be served like the first one.
    let second = format!(
        "mount -t ext4 /dev/vda /mnt\n{}echo VDISK-REPLAYED\n{}",
        sum_lines(&first),
        synced_copies("y")
    );
    let mut vm = Vm::start(dir, "second", &initramfs(&kit, &second, &[]), &spec);
    vm.wait_for("VDISK-SYNCED b.y2", BOOT_LIMIT);
    let status = sv.terminate();
    let g = Guest { console: vm.kill() };
    assert!(status.success(), "vdisk serve after SIGTERM: {status}");
    assert!(g.console.contains("VDISK-REPLAYED"), "{}", g.console);
    assert_read_back(&g, &first);
    let then = synced_files(&g.console);
    assert_clean(dir, &img);

    let mut all = first;
    all.extend(then);
    let reader = format!(
        "mount -t ext4 /dev/vda /mnt\n{}{UMOUNT_AND_FSCK}",
        sum_lines(&all)
    );
    let sv = Serve::nbd(dir, "re2", &img);
    let spec = VmSpec {
        disks: vec![Disk::Nbd(sv.sock.clone())],
        ..VmSpec::default()
    };
    let g = Vm::start(dir, "third", &initramfs(&kit, &reader, &[]), &spec).finish(BOOT_LIMIT);
    g.assert_ok();
    assert_read_back(&g, &all);
    assert_eq!(g.value("FSCK"), "0", "{}", g.console);
    assert!(sv.wait(Duration::from_secs(30)).success());
    assert_clean(dir, &img);
}

/// Starts `cmd` (stdin closed) and waits for it to create `sock`.
fn spawn_listening(cmd: &mut Command, sock: &Path, what: &str) -> Child {
    let child = cmd
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let until = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < until, "{what} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// fio inside the guest on one disk, per export; prints a table (BENCHMARKS.md). Not
/// part of the suite (timing belongs in benchmarks):
/// `cargo test --release -p vdisk-cli --test guest_boot -- --ignored --nocapture bench`.
/// `VDISK_GUEST_FIO_RUNTIME` sets the seconds per job (default 8).
#[test]
#[ignore]
fn bench_fio_in_guest() {
    let kit = kit();
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    let runtime: u32 = std::env::var("VDISK_GUEST_FIO_RUNTIME")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let jobs = [
        ("seq-write-1M", "write", "1M", 4),
        ("rand-write-4k", "randwrite", "4k", 32),
        ("rand-read-4k", "randread", "4k", 32),
        ("seq-read-1M", "read", "1M", 4),
    ];
    let mut body = String::new();
    for (name, rw, bs, qd) in jobs {
        body.push_str(&format!(
            "echo \"VDISK-FIO {name} $(/xbin/fio --name={name} --filename=/dev/vda --rw={rw} --bs={bs} --iodepth={qd} --ioengine=libaio --direct=1 --size=192M --runtime={runtime} --time_based --output-format=terse --terse-version=3)\"\n"
        ));
    }
    let initrd = initramfs(&kit, &body, &["fio"]);
    let mem = 768;
    // `VDISK_GUEST_BENCH=vdisk-vhost,qsd,vdisk-nbd,qemu-nbd,qemu-qcow2,qemu-raw` picks rows.
    let only = std::env::var("VDISK_GUEST_BENCH").unwrap_or_default();
    let want = |row: &str| only.is_empty() || only.split(',').any(|w| w == row);
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let parse = |g: &guest_support::Guest| -> Vec<f64> {
        jobs.iter()
            .map(|(name, rw, _, _)| {
                let line = g
                    .lines("FIO")
                    .into_iter()
                    .find(|l| l.starts_with(name))
                    .unwrap_or_else(|| panic!("no fio result for {name}\n{}", g.console));
                let f: Vec<&str> = line.split(';').collect();
                // terse v3: read iops is field 8, write iops field 49 (1-based).
                let i = if rw.contains("write") { 48 } else { 7 };
                f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            })
            .collect()
    };
    let boot = |tag: &str, spec: &VmSpec| -> Vec<f64> {
        let g = Vm::start(dir, tag, &initrd, spec).finish(Duration::from_secs(900));
        g.assert_ok();
        parse(&g)
    };
    let fresh = |name: &str| {
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        create_qcow2(dir, name, "256M")
    };
    // vdisk vhost-user-blk, qcow2.
    if want("vdisk-vhost") {
        let img = fresh("v.qcow2");
        let sv = Serve::vhost(dir, "bench", &img, 2);
        let spec = VmSpec {
            disks: vec![Disk::VhostUser {
                sock: sv.sock.clone(),
                queues: 2,
            }],
            mem_mib: mem,
            cpus: 2,
        };
        rows.push((
            "vdisk vhost-user-blk (qcow2)".into(),
            boot("b-vhost", &spec),
        ));
        assert!(sv.terminate().success());
    }
    // qemu-storage-daemon vhost-user-blk, qcow2 (the emulator's own QEMU version).
    if want("qsd") {
        let img = fresh("q.qcow2");
        let qsd_sock = dir.join("qsd.sock");
        let mut qsd = spawn_listening(
            Command::new(kit.storage_daemon()).args([
                "--blockdev",
                &format!(
                    "driver=file,node-name=file0,filename={},cache.direct=on",
                    s(&img)
                ),
                "--blockdev",
                "driver=qcow2,node-name=fmt0,file=file0",
                "--export",
                &format!(
                    "type=vhost-user-blk,id=exp0,node-name=fmt0,addr.type=unix,addr.path={},writable=on,num-queues=2",
                    s(&qsd_sock)
                ),
            ]),
            &qsd_sock,
            "qemu-storage-daemon",
        );
        let spec = VmSpec {
            disks: vec![Disk::VhostUser {
                sock: qsd_sock.clone(),
                queues: 2,
            }],
            mem_mib: mem,
            cpus: 2,
        };
        rows.push((
            "qemu-storage-daemon vhost-user-blk (qcow2)".into(),
            boot("b-qsd", &spec),
        ));
        let _ = qsd.kill();
        let _ = qsd.wait();
    }
    // vdisk NBD, qcow2.
    if want("vdisk-nbd") {
        let img = fresh("n.qcow2");
        let sv = Serve::nbd(dir, "bench-nbd", &img);
        let spec = VmSpec {
            disks: vec![Disk::Nbd(sv.sock.clone())],
            mem_mib: mem,
            cpus: 2,
        };
        rows.push(("vdisk serve NBD (qcow2)".into(), boot("b-nbd", &spec)));
        drop(sv);
    }
    // qemu-nbd (the host's, QEMU 10) with the same options: the NBD row's like for
    // like, since both go through the emulator's NBD client.
    if want("qemu-nbd") {
        let img = fresh("qn.qcow2");
        let sock = dir.join("qemu-nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let mut qn = spawn_listening(
            Command::new("qemu-nbd")
                .arg("-t")
                .args(nbd_options(&sock, &img)),
            &sock,
            "qemu-nbd",
        );
        let spec = VmSpec {
            disks: vec![Disk::Nbd(sock.clone())],
            mem_mib: mem,
            cpus: 2,
        };
        rows.push(("qemu-nbd 10 (qcow2)".into(), boot("b-qnbd", &spec)));
        let _ = qn.kill();
        let _ = qn.wait();
    }
    // QEMU's in-process qcow2 driver, and a raw file.
    if want("qemu-qcow2") {
        let img = fresh("i.qcow2");
        let spec = VmSpec {
            disks: vec![Disk::Image {
                path: img,
                fmt: "qcow2",
            }],
            mem_mib: mem,
            cpus: 2,
        };
        rows.push(("QEMU in-process qcow2 driver".into(), boot("b-qemu", &spec)));
    }
    if want("qemu-raw") {
        let raw = dir.join("r.raw");
        ok(
            qemu_img(dir, &["create", "-q", "-f", "raw", s(&raw), "256M"]),
            "create raw",
        );
        let spec = VmSpec {
            disks: vec![Disk::Image {
                path: raw,
                fmt: "raw",
            }],
            mem_mib: mem,
            cpus: 2,
        };
        rows.push(("QEMU in-process raw file".into(), boot("b-raw", &spec)));
    }

    let base = rows
        .iter()
        .find(|(n, _)| n.starts_with("QEMU in-process qcow2"))
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| vec![0.0; jobs.len()]);
    println!("\nfio in the guest (TCG, 2 vCPUs), IOPS; runtime {runtime} s per job; ratio to QEMU's qcow2 driver");
    print!("| export |");
    for (n, _, _, _) in jobs {
        print!(" {n} |");
    }
    println!();
    println!("|---|{}", "---|".repeat(jobs.len()));
    for (name, v) in &rows {
        print!("| {name} |");
        for (x, b) in v.iter().zip(&base) {
            print!(" {x:.0} ({:.2}x) |", if *b > 0.0 { x / b } else { 0.0 });
        }
        println!();
    }
}
