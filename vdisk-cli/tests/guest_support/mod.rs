//! Boots a real Linux guest under `qemu-system-x86_64` (TCG) with its disks served by
//! vdisk, runs a shell workload in a busybox initramfs and hands back what the guest
//! printed on its serial console.
//!
//! The emulator, kernel and busybox come from `scripts/guest-kit` (their Debian .debs
//! unpacked into a cache folder, never installed: see that script). When the kit is not
//! there yet, the first test that needs it runs the script; if that fails the test fails
//! with the script's message.
//!
//! The guest's console lines that start with `VDISK-` are the protocol between the
//! workload and the test: `VDISK-SUM <sha256> <name>`, `VDISK-FSCK <rc>`,
//! `VDISK-EXIT <rc>` and so on.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The unpacked emulator, firmware, kernel and busybox.
#[derive(Debug, Clone)]
pub struct Kit {
    /// Folder the .debs were unpacked into.
    pub root: PathBuf,
    /// Kernel version (`6.1.0-NN-cloud-amd64`).
    pub kver: String,
}

impl Kit {
    /// The emulator.
    pub fn qemu(&self) -> PathBuf {
        self.root.join("usr/bin/qemu-system-x86_64")
    }
    /// qemu-storage-daemon of the same QEMU (7.2): the benchmark's other daemon.
    pub fn storage_daemon(&self) -> PathBuf {
        self.root.join("usr/bin/qemu-storage-daemon")
    }
    /// The kernel image.
    pub fn kernel(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.kver))
    }
    /// The modules to load for `wanted`, dependencies first (from each module's
    /// `depends=` field), as (name, path).
    pub fn modules(&self, wanted: &[&str]) -> Vec<(String, PathBuf)> {
        let mut index = std::collections::HashMap::new();
        let mut stack = vec![self.root.join(format!("lib/modules/{}/kernel", self.kver))];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
                let p = e.expect("dir entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                    if let Some(stem) = n.strip_suffix(".ko") {
                        index.insert(stem.replace('-', "_"), p.clone());
                    }
                }
            }
        }
        fn visit(
            name: &str,
            index: &std::collections::HashMap<String, PathBuf>,
            out: &mut Vec<(String, PathBuf)>,
            depth: usize,
        ) {
            assert!(depth < 32, "module dependency loop at {name}");
            if out.iter().any(|(n, _)| n == name) {
                return;
            }
            let path = index
                .get(name)
                .unwrap_or_else(|| panic!("guest kit: no kernel module {name}"));
            let data = std::fs::read(path).expect("read module");
            let key = b"depends=";
            if let Some(i) = data.windows(key.len()).position(|w| w == key) {
                let rest = &data[i + key.len()..];
                let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
                let deps = String::from_utf8_lossy(&rest[..end]).into_owned();
                for dep in deps.split(',').filter(|d| !d.is_empty()) {
                    visit(&dep.replace('-', "_"), index, out, depth + 1);
                }
            }
            if !out.iter().any(|(n, _)| n == name) {
                out.push((name.to_string(), path.clone()));
            }
        }
        let mut out = Vec::new();
        for w in wanted {
            visit(w, &index, &mut out, 0);
        }
        out
    }
}

/// The kit, fetched on first use (by `scripts/guest-kit`).
pub fn kit() -> Kit {
    static KIT: OnceLock<Kit> = OnceLock::new();
    KIT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest-kit");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed: the guest-boot tests need qemu-system-x86_64, a kernel and busybox",
            script.display()
        );
        let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let kver = std::fs::read_to_string(root.join("ready"))
            .unwrap_or_else(|e| panic!("{}/ready: {e}", root.display()))
            .trim()
            .to_string();
        let kit = Kit {
            root: root.join("root"),
            kver,
        };
        for p in [kit.qemu(), kit.kernel(), kit.root.join("bin/busybox")] {
            assert!(p.exists(), "guest kit: {} is missing", p.display());
        }
        kit
    })
    .clone()
}

/// A `newc` cpio archive, the format the kernel unpacks as its initramfs.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: std::collections::BTreeSet<String>,
}

impl Cpio {
    fn header(&mut self, name: &str, mode: u32, size: usize) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            size as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
    /// Adds a directory and its parents (once each).
    pub fn dir(&mut self, path: &str) {
        let mut cur = String::new();
        for part in path.trim_matches('/').split('/') {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            if self.dirs.insert(cur.clone()) {
                let c = cur.clone();
                self.header(&c, 0o040755, 0);
            }
        }
    }
    /// Adds a file (its folders first).
    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.header(path, 0o100000 | mode, data.len());
        self.out.extend_from_slice(data);
        self.pad();
    }
    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.header(path, 0o120777, target.len());
        self.out.extend_from_slice(target.as_bytes());
        self.pad();
    }
    /// The finished archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0);
        self.out
    }
}

/// Shared libraries a host program loads (from `ldd`).
fn libraries(prog: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(prog).output().expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("not found"),
        "{}: missing libraries:\n{text}",
        prog.display()
    );
    text.lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect()
}

/// Finds a host program in the usual folders (the tests may run with a short PATH).
pub fn host_program(name: &str) -> PathBuf {
    for d in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(d).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("the guest-boot tests need {name} on the host (scripts/test installs it)");
}

/// Deterministic pseudo-random bytes (xorshift), the same on every run.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The data files the workloads copy onto the guest's disk, shipped in the initramfs
/// under /data: (name, contents).
pub fn data_files() -> Vec<(String, Vec<u8>)> {
    [
        ("a.bin", 1, 1 << 20),
        ("b.bin", 2, (3 << 20) + 123),
        ("c.bin", 3, 5),
        ("d.bin", 4, (2 << 20) + (1 << 19)),
    ]
    .into_iter()
    .map(|(n, s, l)| (n.to_string(), pattern(s, l)))
    .collect()
}

/// sha256 of some bytes, by the host's `sha256sum` (coreutils).
pub fn sha256(data: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("feed sha256sum");
    let out = c.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// Everything the guest side of a test needs besides its script.
pub struct Initramfs {
    /// Extra host programs to copy into /xbin with their libraries (`fio`).
    pub programs: Vec<&'static str>,
}

/// The prologue every guest runs: busybox applets, /proc /sys /dev, the virtio modules.
const PROLOGUE: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/mod/order); do
  insmod /lib/mod/$m.ko || echo "VDISK-INSMOD-FAILED $m"
done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
echo VDISK-BOOTED
"#;

/// Builds the initramfs: busybox, the virtio modules, mke2fs/e2fsck (and `programs`)
/// with their libraries, /data files, and `/init` = prologue + `body` + power-off.
pub fn initramfs(kit: &Kit, body: &str, programs: &[&str]) -> Vec<u8> {
    let mut c = Cpio::default();
    for d in ["dev", "proc", "sys", "mnt", "tmp", "lib64", "etc", "bin"] {
        c.dir(d);
    }
    let bb = std::fs::read(kit.root.join("bin/busybox")).expect("read busybox");
    c.file("bin/busybox", &bb, 0o755);
    let mut order = String::new();
    for (name, path) in kit.modules(&["virtio_pci", "virtio_blk"]) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        c.file(&format!("lib/mod/{name}.ko"), &data, 0o644);
        order.push_str(&name);
        order.push(' ');
    }
    c.file("lib/mod/order", order.as_bytes(), 0o644);
    // Host programs live in /xbin under their own names, called by full path: the
    // busybox shell would otherwise run its own applet of the same name.
    let mut libs = std::collections::BTreeSet::new();
    for name in ["mke2fs", "e2fsck"].iter().chain(programs) {
        let p = host_program(name);
        let data = std::fs::read(&p).expect("read host program");
        c.file(&format!("xbin/{name}"), &data, 0o755);
        libs.extend(libraries(&p));
    }
    for l in libs {
        let real = std::fs::canonicalize(&l).expect("library path");
        let data = std::fs::read(&real).expect("read library");
        c.file(l.to_str().expect("utf-8 path"), &data, 0o755);
    }
    let conf = std::fs::read("/etc/mke2fs.conf").unwrap_or_default();
    c.file("etc/mke2fs.conf", &conf, 0o644);
    for (name, data) in data_files() {
        c.file(&format!("data/{name}"), &data, 0o644);
    }
    c.file("data/pattern", &pattern(99, 1 << 20), 0o644);
    let init =
        format!("{PROLOGUE}\n(\nset -e\n{body}\n)\necho \"VDISK-EXIT $?\"\nsync\npoweroff -f\n");
    c.file("init", init.as_bytes(), 0o755);
    c.finish()
}

/// One disk of the guest (a virtio-blk device, in order: vda, vdb, ...).
#[derive(Clone, Debug)]
pub enum Disk {
    /// An NBD export on a Unix socket (QEMU's NBD client, `nbd+unix://`).
    Nbd(PathBuf),
    /// An image opened by QEMU's own driver.
    Image {
        /// Image file.
        path: PathBuf,
        /// Format name.
        fmt: &'static str,
    },
    /// A vhost-user-blk backend's socket (guest memory in a shared memfd).
    VhostUser {
        /// The backend's socket.
        sock: PathBuf,
        /// Request queues.
        queues: u16,
    },
}

/// How to start the guest.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Disks, vda first.
    pub disks: Vec<Disk>,
    /// Guest memory (MiB).
    pub mem_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            disks: Vec::new(),
            mem_mib: 256,
            cpus: 1,
        }
    }
}

/// A running guest.
pub struct Vm {
    child: Child,
    console: PathBuf,
    log: PathBuf,
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

impl Vm {
    /// Starts `qemu-system-x86_64` under TCG with `initrd` (written to `dir`).
    pub fn start(dir: &Path, tag: &str, initrd: &[u8], spec: &VmSpec) -> Vm {
        let kit = kit();
        let initrd_path = dir.join(format!("{tag}.initrd"));
        std::fs::write(&initrd_path, initrd).expect("write initrd");
        let console = dir.join(format!("{tag}.console"));
        let log = dir.join(format!("{tag}.qemu-log"));
        let _ = std::fs::remove_file(&console);
        let seabios = kit.root.join("usr/share/seabios");
        let qemu_data = kit.root.join("usr/share/qemu");
        let mut args: Vec<String> = vec![
            "-L".into(),
            s(&seabios).into(),
            "-L".into(),
            s(&qemu_data).into(),
            "-accel".into(),
            "tcg".into(),
            "-m".into(),
            spec.mem_mib.to_string(),
            "-smp".into(),
            spec.cpus.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            format!("file:{}", s(&console)),
            "-no-reboot".into(),
            "-kernel".into(),
            s(&kit.kernel()).into(),
            "-initrd".into(),
            s(&initrd_path).into(),
            "-append".into(),
            "console=ttyS0 quiet panic=-1".into(),
        ];
        if spec
            .disks
            .iter()
            .any(|d| matches!(d, Disk::VhostUser { .. }))
        {
            args.extend([
                "-object".into(),
                format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    spec.mem_mib
                ),
                "-numa".into(),
                "node,memdev=mem".into(),
            ]);
        }
        for (i, d) in spec.disks.iter().enumerate() {
            match d {
                Disk::Nbd(sock) => args.extend([
                    "-drive".into(),
                    format!(
                        "file=nbd+unix:///?socket={},format=raw,if=virtio,cache=none,discard=unmap",
                        s(sock)
                    ),
                ]),
                Disk::Image { path, fmt } => args.extend([
                    "-drive".into(),
                    format!(
                        "file={},format={fmt},if=virtio,cache=none,discard=unmap",
                        s(path)
                    ),
                ]),
                Disk::VhostUser { sock, queues } => args.extend([
                    "-chardev".into(),
                    format!("socket,id=vu{i},path={}", s(sock)),
                    "-device".into(),
                    format!("vhost-user-blk-pci,chardev=vu{i},num-queues={queues}"),
                ]),
            }
        }
        let log_file = std::fs::File::create(&log).expect("create qemu log");
        let child = Command::new(kit.qemu())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("start qemu-system-x86_64");
        Vm {
            child,
            console,
            log,
        }
    }

    /// What the guest printed so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn qemu_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The emulator's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the console has a line containing `needle` (the console so far), or
    /// panics after `limit` or when the guest stops first.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let until = Instant::now() + limit;
        loop {
            let c = self.console();
            if c.contains(needle) {
                return c;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "guest stopped ({st}) before printing {needle:?}\nconsole:\n{}\nqemu:\n{}",
                    self.console(),
                    self.qemu_log()
                );
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "guest did not print {needle:?} within {limit:?}\nconsole:\n{c}\nqemu:\n{}",
                    self.qemu_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the guest to power off (panics after `limit`); returns its console.
    pub fn finish(mut self, limit: Duration) -> Guest {
        let until = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    let console = self.console();
                    assert!(
                        st.success(),
                        "qemu-system-x86_64 failed ({st})\nconsole:\n{console}\nqemu:\n{}",
                        self.qemu_log()
                    );
                    return Guest { console };
                }
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "guest still running after {limit:?}\nconsole:\n{}\nqemu:\n{}",
                        self.console(),
                        self.qemu_log()
                    );
                }
            }
        }
    }

    /// SIGKILL to the emulator (a VM crash), and reaps it.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.console()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A guest that ran to its end.
#[derive(Debug)]
pub struct Guest {
    /// Its serial console.
    pub console: String,
}

impl Guest {
    /// The console lines `VDISK-<key> ...`, without the key.
    pub fn lines(&self, key: &str) -> Vec<String> {
        let tag = format!("VDISK-{key}");
        self.console
            .lines()
            .filter_map(|l| {
                let l = l.trim_end_matches('\r');
                let i = l.find(&tag)?;
                Some(l[i + tag.len()..].trim().to_string())
            })
            .collect()
    }
    /// The single value of `VDISK-<key>`.
    pub fn value(&self, key: &str) -> String {
        let v = self.lines(key);
        assert_eq!(
            v.len(),
            1,
            "expected one VDISK-{key} line\nconsole:\n{}",
            self.console
        );
        v[0].clone()
    }
    /// Asserts the workload ran to its end with status 0.
    pub fn assert_ok(&self) {
        assert_eq!(
            self.value("EXIT"),
            "0",
            "guest workload failed\nconsole:\n{}",
            self.console
        );
    }
    /// `name -> sha256` from `VDISK-SUM <sha> <path>` lines (file name only).
    pub fn sums(&self) -> std::collections::BTreeMap<String, String> {
        self.lines("SUM")
            .into_iter()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let sum = it.next()?.to_string();
                let path = it.next()?;
                Some((path.rsplit('/').next()?.to_string(), sum))
            })
            .collect()
    }
}

/// The known checksums of [`data_files`].
pub fn expected_sums() -> std::collections::BTreeMap<String, String> {
    data_files()
        .into_iter()
        .map(|(n, d)| (n, sha256(&d)))
        .collect()
}

/// The ext4 workload on `dev`: mkfs, copy the /data files, sync, drop caches, read back
/// (`VDISK-SUM` lines), delete half and fstrim, unmount, `e2fsck -fn` (`VDISK-FSCK`).
pub fn ext4_workload(dev: &str) -> String {
    format!(
        r#"
/xbin/mke2fs -q -t ext4 -F {dev}
mount -t ext4 {dev} /mnt
mkdir /mnt/dir
cp /data/*.bin /mnt/dir/
dd if=/dev/urandom of=/mnt/scratch bs=1M count=16 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
for f in /mnt/dir/*.bin; do echo "VDISK-SUM $(sha256sum $f)"; done
rm /mnt/scratch
sync
echo "VDISK-FSTRIM $(fstrim -v /mnt)"
umount /mnt
rc=0; /xbin/e2fsck -fn {dev} >/tmp/fsck 2>&1 || rc=$?
cat /tmp/fsck
echo "VDISK-FSCK $rc"
"#
    )
}

/// A raw workload on `dev` whose result depends only on the requests (so two runs on
/// different backends must give identical disks): pattern writes at aligned and
/// unaligned places, a discard and a zeroing range.
pub fn raw_workload(dev: &str) -> String {
    format!(
        r#"
dd if=/data/pattern of={dev} bs=64k count=16 conv=fsync 2>/dev/null
dd if=/data/pattern of={dev} bs=4k skip=3 seek=1000 count=7 conv=fsync 2>/dev/null
dd if=/data/pattern of={dev} bs=512 skip=5 seek=30001 count=9 conv=fsync 2>/dev/null
dd if=/data/pattern of={dev} bs=64k seek=200 count=16 conv=fsync 2>/dev/null
blkdiscard -o 262144 -l 524288 {dev}
dd if=/dev/zero of={dev} bs=64k seek=204 count=4 conv=fsync 2>/dev/null
sync
echo "VDISK-RAW $(sha256sum {dev})"
"#
    )
}
