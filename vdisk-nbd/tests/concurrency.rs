//! Requests on one connection are served concurrently and answered out of order:
//! a read that blocks inside the driver must not hold up the requests behind it.
//!
//! The server runs in-process over an image whose driver parks reads of offset 0 until
//! a FLUSH arrives; the client only sends that FLUSH after it got the answer to a later
//! READ. A server that serialised requests would never answer that later READ (the
//! client's bounded read fails the test instead of hanging).

mod wire;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vdisk::format::{Driver, Extent, ExtentKind, Format, ZeroFlags};
use vdisk::storage::{MemStorage, Storage};
use vdisk::Image;
use vdisk_nbd::export::Export;
use vdisk_nbd::server::{Server, ServerConfig};
use vdisk_nbd::stream::Listener;
use wire::{connect, reply, request};

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
    let export = Arc::new(Export::new(image, wire::writable_config()));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let listener = Listener::unix(&sock).unwrap();
    let server = Server::new(listener, export, ServerConfig::default()).unwrap();
    let (stop_rx, mut stop_tx) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || server.run(&stop_rx));

    let mut s = connect(&sock);

    let send = |s: &mut UnixStream, typ, cookie, offset, len, payload: &[u8]| {
        let mut m = Vec::new();
        request(&mut m, typ, cookie, offset, len, payload);
        s.write_all(&m).unwrap();
    };
    send(&mut s, 0, 1, 0, 4096, &[]); // parks in the driver
    send(&mut s, 1, 2, 8192, 4096, &[7u8; 4096]);
    send(&mut s, 0, 3, 8192, 4096, &[]);
    let len = |c: u64| if c == 1 || c == 3 { 4096 } else { 0 };
    let ans = |s: &mut UnixStream| {
        let (e, c, _) = reply(s, &len);
        (e, c)
    };
    let mut early = vec![ans(&mut s), ans(&mut s)];
    early.sort();
    assert_eq!(early, vec![(0, 2), (0, 3)], "later requests answered first");
    send(&mut s, 3, 4, 0, 0, &[]); // opens the gate
    let mut late = vec![ans(&mut s), ans(&mut s)];
    late.sort();
    assert_eq!(late, vec![(0, 1), (0, 4)]);

    stop_tx.write_all(&[1]).unwrap();
    let exit = t.join().unwrap().unwrap();
    assert_eq!(exit, vdisk_nbd::server::Exit::Stopped);
}
