//! NBD writes reach the image's write hooks: an in-process server exports an image
//! carrying zero detection and a recording hook, qemu-io writes, zero-writes and trims
//! through it, and the recorder sees each request as the driver got it.

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::{Arc, Mutex};
use vdisk::hook::{DetectZeroes, DetectZeroesMode};
use vdisk::{Change, Format, Image, OpenOptions, WriteHook};
use vdisk_nbd::export::{DiscardMode, Export, ExportConfig};
use vdisk_nbd::server::{Exit, Server, ServerConfig};
use vdisk_nbd::stream::Listener;

/// Keeps the completed changes.
#[derive(Debug, Default)]
struct Completed(Mutex<Vec<Change>>);

impl WriteHook for Completed {
    fn after(&self, change: &Change, ok: bool) {
        assert!(ok, "{change:?} failed");
        self.0.lock().unwrap().push(*change);
    }
}

#[test]
fn nbd_requests_pass_the_image_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("a.raw");
    std::fs::write(&img_path, vec![0u8; 1 << 20]).unwrap();
    let seen = Arc::new(Completed::default());
    let image = Image::open(
        &img_path,
        &OpenOptions {
            format: Some(Format::Raw),
            hooks: vec![
                DetectZeroes::for_mode(DetectZeroesMode::Unmap, true).unwrap(),
                seen.clone(),
            ],
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let export = Arc::new(Export::new(
        Arc::new(image),
        ExportConfig {
            name: String::new(),
            description: None,
            read_only: false,
            multi_conn: false,
            allocation_depth: false,
            discard: DiscardMode::Unmap,
        },
    ));
    let sock = dir.path().join("s");
    let server = Server::new(
        Listener::unix(&sock).unwrap(),
        export,
        ServerConfig::default(),
    )
    .unwrap();
    let (stop_rx, _stop_tx) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || server.run(&stop_rx));

    let url = format!("nbd+unix:///?socket={}", sock.display());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &url])
        .args([
            "-c",
            "write -P 1 0 4k",
            "-c",
            "write -z 64k 4k",
            "-c",
            "discard 128k 64k",
            "-c",
            "write -P 0 256k 8k",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(t.join().unwrap().unwrap(), Exit::LastClientLeft);
    let got = seen.0.lock().unwrap().clone();
    assert_eq!(
        got,
        [
            Change::Write {
                offset: 0,
                len: 4096
            },
            // `write -z` without `-u` sends NO_HOLE.
            Change::Zeroes {
                offset: 65536,
                len: 4096,
                may_unmap: false
            },
            Change::Discard {
                offset: 131072,
                len: 65536
            },
            // --detect-zeroes=unmap: the zero buffer became a zero write.
            Change::Zeroes {
                offset: 262144,
                len: 8192,
                may_unmap: true
            },
        ]
    );
}
