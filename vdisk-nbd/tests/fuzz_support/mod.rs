//! The NBD server fuzz target's body (issue 14, part 2), shared by the libFuzzer
//! binary `fuzz/fuzz_targets/nbd_server.rs` and `tests/fuzz_replay.rs`: the input is
//! everything a client sends (handshake, options, transmission requests); the server
//! must answer or hang up, never panic, hang or allocate without bound.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use vdisk::format::DriverOptions;
use vdisk::storage::MemStorage;
use vdisk::{Format, Image};
use vdisk_nbd::export::{DiscardMode, Export, ExportConfig};
use vdisk_nbd::handshake::{self, Outcome};
use vdisk_nbd::stream::Stream;
use vdisk_nbd::transmission;

/// Serves a 1 MiB raw image in memory to a client that sends `data` and then closes
/// its side; the server's replies are read and dropped.
pub fn nbd_server(data: &[u8]) {
    let st = Arc::new(MemStorage::from_vec(vec![0u8; 1 << 20]));
    let Ok(img) = Image::open_storage(st, Format::Raw, &DriverOptions::default()) else {
        return;
    };
    let export = Export::new(
        Arc::new(img),
        ExportConfig {
            name: String::new(),
            description: Some("fuzz".into()),
            read_only: false,
            multi_conn: false,
            allocation_depth: true,
            discard: DiscardMode::Unmap,
        },
    );
    let Ok((client, server)) = UnixStream::pair() else {
        return;
    };
    let Ok(mut reader) = client.try_clone() else {
        return;
    };
    let drain = std::thread::spawn(move || {
        let mut b = [0u8; 65536];
        while matches!(reader.read(&mut b), Ok(n) if n > 0) {}
    });
    let input = data.to_vec();
    let mut w = client;
    let feed = std::thread::spawn(move || {
        let _ = w.write_all(&input);
        let _ = w.shutdown(std::net::Shutdown::Write);
        w
    });
    let mut s = Stream::Unix(server);
    if let Ok(Outcome::Transmission(neg)) =
        handshake::negotiate(&mut s, &export, Duration::from_secs(2), None)
    {
        if let Ok(s2) = s.try_clone() {
            let _ = transmission::serve(s2, &export, &neg);
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    drop(s);
    if let Ok(w) = feed.join() {
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
    let _ = drain.join();
}

/// A target's body.
pub type Target = fn(&[u8]);

/// The targets by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[("nbd_server", nbd_server)];
