//! The fuzz targets' bodies (issue 14, part 2), shared by the libFuzzer binaries in
//! `fuzz/` and by `tests/fuzz_replay.rs`, which replays every seed and every crash
//! found as an ordinary test (no nightly toolchain, no libFuzzer needed).
//!
//! A target must never panic, hang or allocate without bound on any input: every
//! error is a normal `Err`.
#![allow(dead_code)]

use std::sync::Arc;
use vdisk::format::DriverOptions;
use vdisk::storage::{LockMode, MemStorage, Storage, StorageError, StorageResult};
use vdisk::{Format, Image, Repair, ZeroFlags};

/// Largest file a target lets an image grow to (a corrupt table may point anywhere).
const CAP: u64 = 64 << 20;

/// An in-memory file that refuses to grow past [`CAP`] (ENOSPC), so hostile offsets
/// cannot make the target allocate gigabytes.
#[derive(Debug)]
struct Capped(MemStorage);

fn full() -> StorageError {
    std::io::Error::from_raw_os_error(libc::ENOSPC).into()
}

impl Storage for Capped {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        if offset.saturating_add(buf.len() as u64) > CAP {
            return Err(full());
        }
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> StorageResult<()> {
        self.0.flush()
    }
    fn len(&self) -> StorageResult<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> StorageResult<()> {
        if len > CAP {
            return Err(full());
        }
        self.0.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.0
            .punch_hole(offset, len.min(CAP.saturating_sub(offset)))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        if offset.saturating_add(len) > CAP {
            return Err(full());
        }
        self.0.write_zeroes(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()> {
        if offset.saturating_add(len) > CAP {
            return Err(full());
        }
        self.0.allocate(offset, len)
    }
    fn relock(&self, _mode: LockMode) -> StorageResult<()> {
        Ok(())
    }
}

/// Open the bytes as `format`, read, write, zero, discard, flush, check and repair;
/// every step may fail, none may panic.
fn image(format: Format, data: &[u8]) {
    let st: Arc<dyn Storage> = Arc::new(Capped(MemStorage::from_vec(data.to_vec())));
    let Ok(img) = Image::open_storage(st, format, &DriverOptions::default()) else {
        return;
    };
    let size = img.size();
    let mut buf = vec![0u8; 64 << 10];
    for off in [0, size / 3, size.saturating_sub(4096)] {
        let n = (buf.len() as u64).min(size.saturating_sub(off)) as usize;
        let _ = img.read_at(&mut buf[..n], off);
    }
    let _ = img.block_status(0, size.min(1 << 30));
    let w = vec![0xa5u8; 4096];
    for off in [0, 512, size / 2] {
        let n = (w.len() as u64).min(size.saturating_sub(off)) as usize;
        let _ = img.write_at(&w[..n], off);
    }
    let _ = img.write_zeroes(0, size.min(8192), ZeroFlags::default());
    let _ = img.discard(size / 4, size.min(65536).min(size - size / 4));
    let _ = img.flush();
    let _ = img.check(Repair::default());
    let _ = img.check(Repair {
        leaks: true,
        errors: true,
    });
    let n = buf.len().min(size as usize);
    let _ = img.read_at(&mut buf[..n], 0);
    let _ = img.close();
}

/// qcow2: header, extensions, L1/L2, refcounts, snapshot table, bitmap directory,
/// LUKS header, as they reach open + I/O + check.
pub fn qcow2(data: &[u8]) {
    image(Format::Qcow2, data);
}

/// QED: header, L1/L2, need-check repair on open.
pub fn qed(data: &[u8]) {
    image(Format::Qed, data);
}

/// qemu-img-made qcow2 images (512-byte clusters) whose snapshot table / bitmap
/// directory is the last thing in the file; the two table targets splice the fuzz
/// input in its place (`fuzz/seed.sh` makes them).
const SNAPSHOT_TEMPLATE: &[u8] = include_bytes!("../../../fuzz/templates/snapshots.qcow2");
const BITMAP_TEMPLATE: &[u8] = include_bytes!("../../../fuzz/templates/bitmaps.qcow2");

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Where the bitmaps extension's data sits in a (trusted) template.
fn bitmaps_ext(t: &[u8]) -> usize {
    let mut at = get32(t, 100) as usize;
    loop {
        let (magic, len) = (get32(t, at), get32(t, at + 4) as usize);
        assert_ne!(magic, 0, "template has no bitmaps extension");
        if magic == 0x2385_2875 {
            return at + 8;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// Open, I/O, check, repair and the snapshot/bitmap operations on a spliced image;
/// returns how many snapshots and bitmaps it opened with (the seeds' test).
fn table_image(file: Vec<u8>) -> (usize, usize) {
    let st: Arc<dyn Storage> = Arc::new(Capped(MemStorage::from_vec(file)));
    let Ok(img) = Image::open_storage(st, Format::Qcow2, &DriverOptions::default()) else {
        return (0, 0);
    };
    let snaps = img.snapshots();
    let bitmaps = img.bitmaps();
    let mut buf = vec![0u8; 8192];
    let _ = img.read_at(&mut buf, 0);
    let _ = img.check(Repair::default());
    let _ = img.write_at(&buf[..1024], 2048);
    for b in bitmaps.iter().take(4) {
        let _ = img.bitmap(&b.name);
    }
    if let Some(b) = bitmaps.first() {
        let _ = img.set_bitmap_enabled(&b.name, !b.enabled);
        let _ = img.remove_bitmap(&b.name);
    }
    let _ = img.add_bitmap("fuzz", None, true);
    if let Some(s) = snaps.first() {
        let _ = img.snapshot_apply(&s.id);
        let _ = img.snapshot_delete(Some(&s.id), None);
    }
    if let Some(s) = snaps.last() {
        let _ = img.snapshot_create(&vdisk::format::SnapshotInfo {
            id: String::new(),
            name: format!("{}x", s.name),
            ..s.clone()
        });
    }
    let _ = img.flush();
    let _ = img.check(Repair {
        leaks: true,
        errors: true,
    });
    let _ = img.close();
    (snaps.len(), bitmaps.len())
}

/// qcow2 snapshot table: input = nb_snapshots (u16 BE) + the table, put where the
/// template's table is; then open, list, apply, delete, create, check.
pub fn qcow2_snapshot_table(data: &[u8]) {
    snapshot_table_counts(data);
}

/// [`qcow2_snapshot_table`], returning what [`table_image`] returns.
pub fn snapshot_table_counts(data: &[u8]) -> (usize, usize) {
    if data.len() < 2 {
        return (0, 0);
    }
    let t = SNAPSHOT_TEMPLATE;
    let off = get64(t, 64) as usize;
    let mut file = t[..off].to_vec();
    file[60..64].copy_from_slice(&u32::from(be16(data)).to_be_bytes());
    file.extend_from_slice(&data[2..]);
    table_image(file)
}

/// qcow2 bitmap directory: input = nb_bitmaps (u16 BE) + the directory, put where the
/// template's directory is (the extension's size follows the input's length).
pub fn qcow2_bitmap_directory(data: &[u8]) {
    bitmap_directory_counts(data);
}

/// [`qcow2_bitmap_directory`], returning what [`table_image`] returns.
pub fn bitmap_directory_counts(data: &[u8]) -> (usize, usize) {
    if data.len() < 2 {
        return (0, 0);
    }
    let t = BITMAP_TEMPLATE;
    let ext = bitmaps_ext(t);
    let off = get64(t, ext + 16) as usize;
    let mut file = t[..off].to_vec();
    file[ext..ext + 4].copy_from_slice(&u32::from(be16(data)).to_be_bytes());
    file[ext + 8..ext + 16].copy_from_slice(&((data.len() - 2) as u64).to_be_bytes());
    file.extend_from_slice(&data[2..]);
    table_image(file)
}

/// Most PBKDF2 iterations (slots + master-key digest) the LUKS target runs an unlock
/// for: a hostile header may ask for 2^32, which is slow by design, not a bug.
const LUKS_ITERATIONS: u64 = 20_000;

/// LUKS1 header: decode + validate (as a raw volume and as a qcow2 header area), and
/// unlock with passphrase "pw" (the seeds' secret) reading key material from the input.
pub fn luks_header(data: &[u8]) {
    luks_unlocks(data);
}

/// [`luks_header`], returning whether "pw" unlocked a slot.
pub fn luks_unlocks(data: &[u8]) -> bool {
    use vdisk::crypto::luks::Luks;
    let _ = Luks::parse(data, Some(data.len() as u64));
    let Ok(l) = Luks::parse(data, None) else {
        return false;
    };
    let _ = l.info();
    let _ = l.payload_offset();
    let h = &l.header;
    let slots: u64 = h
        .slots
        .iter()
        .filter(|s| s.active)
        .map(|s| u64::from(s.iterations) + u64::from(h.mk_iterations))
        .sum();
    if slots > LUKS_ITERATIONS {
        return false;
    }
    let mut read = |off: u64, buf: &mut [u8]| -> vdisk::Result<()> {
        buf.fill(0);
        let start = (off.min(data.len() as u64)) as usize;
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(())
    };
    let Ok(c) = l.unlock(b"pw", &mut read) else {
        return false;
    };
    let mut sector = vec![0u8; 512];
    c.decrypt(0, &mut sector).is_ok()
}

/// What the NBD client does once connected (the same in the target and in the seed
/// recorder, so recorded replies answer exactly these requests): open raw over NBD,
/// read, write, block status, zero, trim, flush, read, close.
fn nbd_session(socket: &std::path::Path) -> bool {
    let name = format!(
        "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"nbd\",\"timeout\":2,\
         \"server\":{{\"type\":\"unix\",\"path\":\"{}\"}}}}}}",
        socket.display()
    );
    let opts = vdisk::OpenOptions {
        format: Some(Format::Raw),
        ..Default::default()
    };
    let Ok(img) = Image::open(&name, &opts) else {
        return false;
    };
    let size = img.size();
    // Small payloads keep the recorded seeds small.
    let mut buf = vec![0u8; 1024];
    let n = (buf.len() as u64).min(size) as usize;
    let _ = img.read_at(&mut buf[..n], 0);
    let w = vec![0x5au8; 1024];
    let n = (w.len() as u64).min(size) as usize;
    let _ = img.write_at(&w[..n], 0);
    let _ = img.block_status(0, size.min(1 << 20));
    let _ = img.write_zeroes(0, size.min(8192), ZeroFlags::default());
    let _ = img.discard(4096, size.saturating_sub(4096).min(4096));
    let _ = img.flush();
    let n = (buf.len() as u64).min(size) as usize;
    let ok = img.read_at(&mut buf[..n], 0).is_ok();
    img.close().is_ok() && ok
}

/// A fresh socket path in this process's private directory.
fn socket_path() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vdisk-fuzz-nbd-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("socket directory");
        d
    });
    dir.join(format!("s{}", N.fetch_add(1, Ordering::Relaxed)))
}

/// Bytes the client sent so far, and whether it has closed.
#[derive(Default)]
struct Heard {
    bytes: std::sync::Mutex<(u64, bool)>,
    more: std::sync::Condvar,
}

/// Reads until EOF or an error, counting into `heard`.
fn listen(mut r: &std::os::unix::net::UnixStream, heard: &Heard) {
    use std::io::Read;
    let mut sink = vec![0u8; 64 << 10];
    loop {
        let n = match r.read(&mut sink) {
            Ok(n) if n > 0 => n as u64,
            _ => break,
        };
        heard.bytes.lock().unwrap().0 += n;
        heard.more.notify_all();
    }
    heard.bytes.lock().unwrap().1 = true;
    heard.more.notify_all();
}

/// The server's script: chunks `(need, bytes)`, each sent once the client has sent
/// `need` bytes in all (a real server answers only what it was asked). Encoded as
/// `need: u16 BE, len: u16 BE, bytes` repeated; a short tail is one last chunk.
fn script(mut data: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < 4 {
            out.push((0, data));
            break;
        }
        let need = u64::from(be16(data));
        let len = (be16(&data[2..]) as usize).min(data.len() - 4);
        out.push((need, &data[4..4 + len]));
        data = &data[4 + len..];
    }
    out
}

fn encode_chunk(out: &mut Vec<u8>, need: u64, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let n = bytes.len().min(u16::MAX as usize);
        out.extend_from_slice(&(need.min(u16::MAX.into()) as u16).to_be_bytes());
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&bytes[..n]);
        bytes = &bytes[n..];
    }
}

/// How long (ms) the scripted server waits for the client's bytes before it sends the
/// next chunk anyway. Replays wait long (past the client's 2 s timeout, so a slow
/// machine never sends a reply early); the fuzz binary sets 100 ms with
/// [`set_nbd_pace_ms`], so a mutated `need` does not stall every run for seconds.
static PACE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(3000);

/// Sets the scripted NBD server's pace (see [`PACE_MS`]).
pub fn set_nbd_pace_ms(ms: u64) {
    PACE_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// NBD client against a hostile server: the input is a paced script (see [`script`])
/// of everything the "server" sends (handshake, option replies, transmission
/// replies), then EOF; what the client sends is counted and dropped. A Unix socket in
/// a private directory: no network.
pub fn nbd_client(data: &[u8]) {
    nbd_client_session_ok(data);
}

/// [`nbd_client`], returning whether the session opened and its last read and close
/// succeeded.
pub fn nbd_client_session_ok(data: &[u8]) -> bool {
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};
    let path = socket_path();
    let Ok(l) = UnixListener::bind(&path) else {
        return false;
    };
    let data = data.to_vec();
    let server = std::thread::spawn(move || {
        let Ok((s, _)) = l.accept() else {
            return;
        };
        let Ok(mut w) = s.try_clone() else {
            return;
        };
        let heard = Arc::new(Heard::default());
        let h = heard.clone();
        let pace =
            std::time::Duration::from_millis(PACE_MS.load(std::sync::atomic::Ordering::Relaxed));
        let writer = std::thread::spawn(move || {
            for (need, bytes) in script(&data) {
                let mut g = h.bytes.lock().unwrap();
                while g.0 < need && !g.1 {
                    let (g2, t) = h.more.wait_timeout(g, pace).unwrap();
                    g = g2;
                    if t.timed_out() {
                        break;
                    }
                }
                let closed = g.1;
                drop(g);
                if closed || w.write_all(bytes).is_err() {
                    break;
                }
            }
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        listen(&s, &heard);
        let _ = writer.join();
    });
    let ok = nbd_session(&path);
    // Wake the server if the client never connected.
    let _ = UnixStream::connect(&path);
    let _ = server.join();
    let _ = std::fs::remove_file(&path);
    ok
}

/// Runs [`nbd_session`] through a proxy to the real server at `upstream` and returns
/// the server's bytes as a paced script (each chunk needing the client bytes that
/// preceded it): a seed for [`nbd_client`].
pub fn nbd_client_record(upstream: &std::path::Path) -> Vec<u8> {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let path = socket_path();
    let l = UnixListener::bind(&path).expect("bind the recording proxy");
    let up = upstream.to_path_buf();
    let proxy = std::thread::spawn(move || {
        let (c, _) = l.accept().expect("accept");
        let s = UnixStream::connect(&up).expect("connect to the real server");
        let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sent2 = sent.clone();
        let up = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = c2.read(&mut buf) {
                // Count before forwarding: the server's answer comes after.
                sent2.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                if n == 0 || s2.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = s2.shutdown(std::net::Shutdown::Write);
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let (mut s, mut c) = (s, c);
        while let Ok(n) = s.read(&mut buf) {
            let need = sent.load(std::sync::atomic::Ordering::SeqCst);
            if n == 0 || c.write_all(&buf[..n]).is_err() {
                break;
            }
            encode_chunk(&mut got, need, &buf[..n]);
        }
        let _ = c.shutdown(std::net::Shutdown::Both);
        let _ = up.join();
        got
    });
    nbd_session(&path);
    let got = proxy.join().expect("proxy");
    let _ = std::fs::remove_file(&path);
    got
}

/// VMDK: sparse header, grain directory and tables, streamOptimized markers and
/// deflate grains, the embedded or stand-alone descriptor (a descriptor's extent
/// files cannot be opened from memory, so its parser is what gets fuzzed there).
pub fn vmdk(data: &[u8]) {
    if let Some(file) = sparse_file(data) {
        image(Format::Vmdk, &file);
    }
}

/// VHD (vpc): footer, dynamic header, BAT, sector bitmaps.
pub fn vpc(data: &[u8]) {
    if let Some(file) = sparse_file(data) {
        image(Format::Vpc, &file);
    }
}

/// VDI: header, block map.
pub fn vdi(data: &[u8]) {
    if let Some(file) = sparse_file(data) {
        image(Format::Vdi, &file);
    }
}

/// VHDX: headers, region tables, log (replay on open), metadata region, BAT.
///
/// The files of these four formats are mostly zeros (a VHDX is several MiB), so
/// their targets' input is a sparse file, see [`sparse_file`].
pub fn vhdx(data: &[u8]) {
    if let Some(file) = sparse_file(data) {
        image(Format::Vhdx, &file);
    }
}

/// Expands a sparse-file encoding: a `u32` LE file length in 512-byte sectors (at most
/// [`CAP`]), then segments of `u32` LE byte offset, `u16` LE length and that many
/// bytes, written in order (clipped to the file). `fuzz/seed.sh` encodes the seeds.
pub fn sparse_file(data: &[u8]) -> Option<Vec<u8>> {
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let sectors = le32(data.get(..4)?) as u64;
    let len = sectors.checked_mul(512)?;
    if len > CAP {
        return None;
    }
    let mut file = vec![0u8; len as usize];
    let mut rest = &data[4..];
    while rest.len() >= 6 {
        let off = le32(rest) as usize;
        let n = u16::from_le_bytes([rest[4], rest[5]]) as usize;
        let bytes = &rest[6..(6 + n).min(rest.len())];
        rest = &rest[6 + bytes.len()..];
        if off < file.len() {
            let end = (off + bytes.len()).min(file.len());
            file[off..end].copy_from_slice(&bytes[..end - off]);
        }
    }
    Some(file)
}

/// The format of each sparse-encoded target, for the seed test.
pub const SPARSE_TARGETS: &[(&str, Format)] = &[
    ("vmdk", Format::Vmdk),
    ("vpc", Format::Vpc),
    ("vhdx", Format::Vhdx),
    ("vdi", Format::Vdi),
];

/// Opens a sparse-encoded seed as `format` (the seed test: seeds must be images).
pub fn open_sparse(format: Format, data: &[u8]) -> vdisk::Result<Image> {
    let file = sparse_file(data)
        .ok_or_else(|| vdisk::Error::from(std::io::Error::other("bad sparse-file encoding")))?;
    let st: Arc<dyn Storage> = Arc::new(Capped(MemStorage::from_vec(file)));
    Image::open_storage(st, format, &DriverOptions::default())
}

/// A target's body.
pub type Target = fn(&[u8]);

/// The targets by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[
    ("qcow2", qcow2),
    ("qed", qed),
    ("qcow2_snapshot_table", qcow2_snapshot_table),
    ("qcow2_bitmap_directory", qcow2_bitmap_directory),
    ("luks_header", luks_header),
    ("nbd_client", nbd_client),
    ("vmdk", vmdk),
    ("vpc", vpc),
    ("vhdx", vhdx),
    ("vdi", vdi),
];
