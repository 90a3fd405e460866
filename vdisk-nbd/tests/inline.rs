//! The reader's inline path (small requests served by the connection's reader, replies
//! batched): a deep pipeline of small writes and reads mixed with large requests (which
//! still go to the workers) answers every request once with the right data, a lone
//! request is answered without waiting for more, and the image is consistent after.

mod wire;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use vdisk::{CreateOptions, Format, Image, OpenOptions};
use vdisk_nbd::export::{Export, INLINE_MAX};
use vdisk_nbd::server::{Exit, Server, ServerConfig};
use vdisk_nbd::stream::Listener;
use wire::{connect, reply, request};

const SIZE: u64 = 16 << 20;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 / 7) % 251) as u8 + 1)
        .collect()
}

#[test]
fn pipelined_small_requests_served_inline_match_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    Image::create(
        &path,
        &CreateOptions {
            format: Format::Qcow2,
            size: Some(SIZE),
            options: vec![],
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
        },
    )
    .unwrap();
    let image = Arc::new(Image::open(&path, &OpenOptions::default()).unwrap());
    let inline = vdisk_nbd::export::inline_max_for(&image, false);
    assert_eq!(
        inline, INLINE_MAX,
        "a local buffered qcow2 is served inline"
    );
    let export =
        Arc::new(Export::new(image.clone(), wire::writable_config()).with_inline_max(inline));
    let sock = dir.path().join("s");
    let listener = Listener::unix(&sock).unwrap();
    let server = Server::new(listener, export, ServerConfig::default()).unwrap();
    let (stop_rx, mut stop_tx) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || server.run(&stop_rx));
    let mut s = connect(&sock);

    // A lone small read is answered although nothing follows it (the batch is flushed
    // before the reader waits for the socket).
    let mut m = Vec::new();
    request(&mut m, 0, 9999, 0, 4096, &[]);
    s.write_all(&m).unwrap();
    let (e, c, d) = reply(&mut s, &|_| 4096);
    assert_eq!((e, c), (0, 9999));
    assert!(d.iter().all(|&b| b == 0));

    // Round 1: small writes (inline), a large write (workers), an unaligned write.
    let mut model = vec![0u8; SIZE as usize];
    let mut m = Vec::new();
    let mut lens: HashMap<u64, usize> = HashMap::new();
    let mut cookie = 1u64;
    for i in 0..150u64 {
        let off = (i * 7919 * 4096) % (SIZE - 65536);
        let len = if i % 10 == 3 { 512 + 17 } else { 4096 };
        let data = pattern(i, len);
        model[off as usize..off as usize + len].copy_from_slice(&data);
        request(&mut m, 1, cookie, off, len as u32, &data);
        lens.insert(cookie, 0);
        cookie += 1;
    }
    let big = pattern(777, 1 << 20);
    let big_off = 5 << 20;
    model[big_off..big_off + big.len()].copy_from_slice(&big);
    request(&mut m, 1, cookie, big_off as u64, big.len() as u32, &big);
    lens.insert(cookie, 0);
    cookie += 1;
    // The client writes everything while a thread collects the replies, as a real
    // pipelining client does (neither side may block the other).
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&m).unwrap());
    let mut seen = 0;
    while seen < lens.len() {
        let (e, c, _) = reply(&mut s, &|_| 0);
        assert_eq!(e, 0, "write {c} failed");
        assert!(lens.contains_key(&c));
        seen += 1;
    }
    writer.join().unwrap();

    // Round 2: reads of everything, small (inline) and large (workers) mixed.
    let mut m = Vec::new();
    let mut reads: HashMap<u64, (usize, usize)> = HashMap::new();
    for i in 0..200u64 {
        let off = ((i * 104_729 * 512) % (SIZE - 40000)) as usize;
        let len = [4096usize, 512, 30000, 65536, 3][i as usize % 5];
        request(&mut m, 0, cookie, off as u64, len as u32, &[]);
        reads.insert(cookie, (off, len));
        cookie += 1;
    }
    request(&mut m, 0, cookie, big_off as u64, 1 << 20, &[]);
    reads.insert(cookie, (big_off, 1 << 20));
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&m).unwrap());
    let mut seen: HashMap<u64, ()> = HashMap::new();
    while seen.len() < reads.len() {
        let (e, c, d) = reply(&mut s, &|c| reads[&c].1);
        assert_eq!(e, 0);
        let (off, len) = reads[&c];
        assert!(d == model[off..off + len], "read {c} at {off}+{len}");
        assert!(seen.insert(c, ()).is_none(), "cookie {c} answered twice");
    }
    writer.join().unwrap();

    stop_tx.write_all(&[1]).unwrap();
    assert_eq!(t.join().unwrap().unwrap(), Exit::Stopped);
    // What the image holds is what was written.
    let mut all = vec![0u8; SIZE as usize];
    image.read_at(&mut all, 0).unwrap();
    assert!(all == model);
    image.flush().unwrap();
    let rep = image.check(vdisk::format::Repair::default()).unwrap();
    assert_eq!(rep.corruptions, 0);
    assert_eq!(rep.leaks, 0);
}
