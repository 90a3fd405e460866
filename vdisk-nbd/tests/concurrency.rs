//! Requests on one connection are served concurrently and answered out of order:
//! a read that blocks inside the driver must not hold up the requests behind it.
//!
//! The server runs in-process over an image whose driver parks reads of offset 0 until
//! a FLUSH arrives; the client only sends that FLUSH after it got the answer to a later
//! READ. A server that serialised requests would never answer that later READ (the
//! client's bounded read fails the test instead of hanging).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vdisk::format::{Driver, Extent, ExtentKind, Format, ZeroFlags};
use vdisk::storage::{MemStorage, Storage};
use vdisk::Image;
use vdisk_nbd::export::{DiscardMode, Export, ExportConfig};
use vdisk_nbd::server::{Server, ServerConfig};
use vdisk_nbd::stream::Listener;

const SIZE: u64 = 1 << 20;

/// An in-memory disk whose reads at offset 0 wait for the next flush.
#[derive(Debug)]
struct Gated {
    storage: Arc<dyn Storage>,
    released: Mutex<bool>,
    cv: Condvar,
}

impl Driver for Gated {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        if offset == 0 {
            let g = self.released.lock().unwrap();
            let (g, t) = self
                .cv
                .wait_timeout_while(g, Duration::from_secs(20), |r| !*r)
                .unwrap();
            if t.timed_out() || !*g {
                return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
            }
        }
        Ok(self.storage.read_at(buf, offset)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> vdisk::Result<()> {
        Ok(self.storage.write_at(buf, offset)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _f: ZeroFlags) -> vdisk::Result<()> {
        Ok(self.storage.write_zeroes(offset, len)?)
    }
    fn discard(&self, _offset: u64, _len: u64) -> vdisk::Result<()> {
        Ok(())
    }
    fn flush(&self) -> vdisk::Result<()> {
        *self.released.lock().unwrap() = true;
        self.cv.notify_all();
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> vdisk::Result<Extent> {
        Ok(Extent {
            len,
            kind: ExtentKind::Data,
            offset: None,
            compressed: false,
        })
    }
    fn resize(&self, _new_size: u64, _shrink: bool) -> vdisk::Result<()> {
        Err(vdisk::error::Unsupported::NoResize("gate").into())
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn request(s: &mut UnixStream, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&typ.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).unwrap();
}

/// Reads one simple reply; returns (error, cookie) and consumes `data` bytes on success.
fn reply(s: &mut UnixStream, data_len_of: impl Fn(u64) -> usize) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("reply within the read timeout");
    assert_eq!(be32(&h), 0x6744_6698);
    let mut c = [0u8; 8];
    c.copy_from_slice(&h[8..]);
    let cookie = u64::from_be_bytes(c);
    let err = be32(&h[4..]);
    if err == 0 {
        let mut d = vec![0u8; data_len_of(cookie)];
        s.read_exact(&mut d).unwrap();
    }
    (err, cookie)
}

#[test]
fn blocked_request_does_not_hold_up_later_ones() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    storage.set_len(SIZE).unwrap();
    let driver = Arc::new(Gated {
        storage,
        released: Mutex::new(false),
        cv: Condvar::new(),
    });
    let image = Arc::new(Image::from_driver(driver, "<gated>"));
    let export = Arc::new(Export::new(
        image,
        ExportConfig {
            name: String::new(),
            description: None,
            read_only: false,
            multi_conn: false,
            allocation_depth: false,
            discard: DiscardMode::Ignore,
        },
    ));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let listener = Listener::unix(&sock).unwrap();
    let server = Server::new(listener, export, ServerConfig::default()).unwrap();
    let (stop_rx, mut stop_tx) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || server.run(&stop_rx));

    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut go = Vec::new();
    go.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(&0u32.to_be_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&go).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        s.read_exact(&mut d).unwrap();
        if be32(&h[12..]) == 1 {
            break;
        }
    }

    request(&mut s, 0, 1, 0, 4096, &[]); // parks in the driver
    request(&mut s, 1, 2, 8192, 4096, &[7u8; 4096]);
    request(&mut s, 0, 3, 8192, 4096, &[]);
    let len = |c: u64| if c == 1 || c == 3 { 4096 } else { 0 };
    let mut early = vec![reply(&mut s, len), reply(&mut s, len)];
    early.sort();
    assert_eq!(early, vec![(0, 2), (0, 3)], "later requests answered first");
    request(&mut s, 3, 4, 0, 0, &[]); // opens the gate
    let mut late = vec![reply(&mut s, len), reply(&mut s, len)];
    late.sort();
    assert_eq!(late, vec![(0, 1), (0, 4)]);

    stop_tx.write_all(&[1]).unwrap();
    let exit = t.join().unwrap().unwrap();
    assert_eq!(exit, vdisk_nbd::server::Exit::Stopped);
}
