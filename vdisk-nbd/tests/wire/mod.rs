//! A minimal NBD client for the in-process server tests: the handshake (fixed newstyle,
//! NBD_OPT_GO, simple replies), request encoding and simple replies.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vdisk_nbd::export::{DiscardMode, ExportConfig};

/// The default export, writable, one connection, discards ignored.
pub fn writable_config() -> ExportConfig {
    ExportConfig {
        name: String::new(),
        description: None,
        read_only: false,
        multi_conn: false,
        allocation_depth: false,
        discard: DiscardMode::Ignore,
    }
}

/// A big-endian u32.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Appends one request (compact header) and its payload to `m`.
pub fn request(m: &mut Vec<u8>, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&typ.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(payload);
}

/// One simple reply: (error, cookie, the `data_len_of(cookie)` bytes read for it).
pub fn reply(s: &mut UnixStream, data_len_of: &impl Fn(u64) -> usize) -> (u32, u64, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("reply within the read timeout");
    assert_eq!(be32(&h), 0x6744_6698);
    let mut c = [0u8; 8];
    c.copy_from_slice(&h[8..]);
    let cookie = u64::from_be_bytes(c);
    let err = be32(&h[4..]);
    let mut d = Vec::new();
    if err == 0 {
        d = vec![0u8; data_len_of(cookie)];
        s.read_exact(&mut d).unwrap();
    }
    (err, cookie, d)
}

/// Connects and negotiates the default export.
pub fn connect(sock: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
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
    s
}
