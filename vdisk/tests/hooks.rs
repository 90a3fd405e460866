//! Write hooks see every change made through `Image`: data, zero and compressed writes,
//! discards and resizes (before, possibly rewritten, and after, with the outcome),
//! reads, flushes and the close; they run in registration order and can refuse or
//! transform requests. These are the calls the CLI subcommands and `vdisk serve` make
//! (the compile-time removal of `Image::driver` keeps front-ends from going around).

use std::path::Path;
use std::sync::{Arc, Mutex};
use vdisk::format::ZeroFlags;
use vdisk::hook::{DetectZeroes, DetectZeroesMode};
use vdisk::{Change, CreateOptions, Format, Image, OpenOptions, Request, WriteHook};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 65536;

/// Records what it is shown, one line per call.
#[derive(Debug, Default)]
struct Recorder {
    log: Mutex<Vec<String>>,
    /// Refuse discards (a hook that says no).
    refuse_discard: bool,
}

impl Recorder {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
    fn push(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
}

impl WriteHook for Recorder {
    fn before(&self, req: &mut Request<'_>) -> vdisk::Result<()> {
        self.push(format!("before {:?}", req.change()));
        if self.refuse_discard && matches!(req, Request::Discard { .. }) {
            return Err(vdisk::error::Invalid::RefusedByHook { op: "discards" }.into());
        }
        Ok(())
    }
    fn after(&self, change: &Change, ok: bool) {
        self.push(format!("after {change:?} ok={ok}"));
    }
    fn after_read(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        self.push(format!("read {offset}+{}", buf.len()));
        Ok(())
    }
    fn flush(&self) -> vdisk::Result<()> {
        self.push("flush".into());
        Ok(())
    }
    fn close(&self) -> vdisk::Result<()> {
        self.push("close".into());
        Ok(())
    }
}

/// A toy cipher: XOR with a byte, on the way down and back up.
#[derive(Debug)]
struct Xor(u8);

impl WriteHook for Xor {
    fn before(&self, req: &mut Request<'_>) -> vdisk::Result<()> {
        if let Request::Write { data, .. } = req {
            let x = self.0;
            data.to_mut().iter_mut().for_each(|b| *b ^= x);
        }
        Ok(())
    }
    fn after_read(&self, buf: &mut [u8], _offset: u64) -> vdisk::Result<()> {
        buf.iter_mut().for_each(|b| *b ^= self.0);
        Ok(())
    }
}

fn create(path: &Path, format: Format) {
    Image::create(
        path,
        &CreateOptions {
            format,
            size: Some(MIB),
            options: Vec::new(),
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
        },
    )
    .unwrap();
}

fn open(path: &Path, hooks: Vec<Arc<dyn WriteHook>>) -> Image {
    Image::open(
        path,
        &OpenOptions {
            hooks,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn read(img: &Image, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read_at(&mut b, offset).unwrap();
    b
}

#[test]
fn every_change_passes_the_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.qcow2");
    create(&f, Format::Qcow2);
    let rec = Arc::new(Recorder::default());
    let img = open(&f, vec![rec.clone()]);
    let unmap = ZeroFlags {
        may_unmap: true,
        fast: false,
    };
    img.write_at(&[1u8; 4096], 8192).unwrap();
    img.write_zeroes(CLUSTER, CLUSTER, unmap).unwrap();
    img.discard(2 * CLUSTER, CLUSTER).unwrap();
    img.write_compressed(&[7u8; CLUSTER as usize], 4 * CLUSTER)
        .unwrap();
    img.resize(2 * MIB, false).unwrap();
    assert_eq!(read(&img, 4 * CLUSTER, 16), vec![7u8; 16]);
    img.flush().unwrap();
    assert_eq!(
        rec.take(),
        [
            "before Write { offset: 8192, len: 4096 }",
            "after Write { offset: 8192, len: 4096 } ok=true",
            "before Zeroes { offset: 65536, len: 65536, may_unmap: true }",
            "after Zeroes { offset: 65536, len: 65536, may_unmap: true } ok=true",
            "before Discard { offset: 131072, len: 65536 }",
            "after Discard { offset: 131072, len: 65536 } ok=true",
            "before Compressed { offset: 262144, len: 65536 }",
            "after Compressed { offset: 262144, len: 65536 } ok=true",
            "before Resize { old_size: 1048576, new_size: 2097152 }",
            "after Resize { old_size: 1048576, new_size: 2097152 } ok=true",
            "read 262144+16",
            "flush",
        ]
    );
    img.close().unwrap();
    assert_eq!(rec.take(), ["close"]);
    drop(img);
    assert!(rec.take().is_empty(), "close runs the hooks once");

    // A driver failure is reported after the fact (a bitmap marks the range anyway).
    let img = open(&f, vec![rec.clone()]);
    assert!(img.write_at(&[1u8; 512], 2 * MIB).is_err());
    assert!(img.resize(MIB, false).is_err(), "shrink without the flag");
    assert_eq!(
        rec.take(),
        [
            "before Write { offset: 2097152, len: 512 }",
            "after Write { offset: 2097152, len: 512 } ok=false",
            "before Resize { old_size: 2097152, new_size: 1048576 }",
            "after Resize { old_size: 2097152, new_size: 1048576 } ok=false",
        ]
    );
}

#[test]
fn a_refusing_hook_stops_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.raw");
    create(&f, Format::Raw);
    let rec = Arc::new(Recorder {
        refuse_discard: true,
        ..Recorder::default()
    });
    let later = Arc::new(Recorder::default());
    let img = open(&f, vec![rec.clone(), later.clone()]);
    img.write_at(&[3u8; 4096], 0).unwrap();
    rec.take();
    later.take();
    let e = img.discard(0, 4096).unwrap_err();
    assert!(e.to_string().contains("refused by the hook"), "{e}");
    assert_eq!(rec.take(), ["before Discard { offset: 0, len: 4096 }"]);
    assert!(later.take().is_empty(), "later hooks and `after` never ran");
    assert_eq!(
        read(&img, 0, 4096),
        vec![3u8; 4096],
        "the driver never saw it"
    );
}

#[test]
fn hooks_rewrite_in_order_and_after_sees_the_final_form() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.qcow2");
    create(&f, Format::Qcow2);
    let detect = DetectZeroes::for_mode(DetectZeroesMode::Unmap, true).unwrap();
    let first = Arc::new(Recorder::default());
    let last = Arc::new(Recorder::default());
    let img = open(&f, vec![first.clone(), detect, last.clone()]);
    img.write_at(&[5u8; CLUSTER as usize], 0).unwrap();
    img.write_at(&[0u8; CLUSTER as usize], 0).unwrap();
    let zeroes = "Zeroes { offset: 0, len: 65536, may_unmap: true }";
    assert_eq!(
        first.take()[2..],
        [
            "before Write { offset: 0, len: 65536 }".to_string(),
            format!("after {zeroes} ok=true"),
        ]
    );
    assert_eq!(
        last.take()[2..],
        [
            format!("before {zeroes}"),
            format!("after {zeroes} ok=true")
        ]
    );
    // The cluster was deallocated, not filled with zero bytes.
    let e = img.layer_block_status(0, CLUSTER).unwrap();
    assert_ne!(e.kind, vdisk::ExtentKind::Data, "{e:?}");
    assert_eq!(read(&img, 0, 4096), vec![0u8; 4096]);
}

#[test]
fn a_transforming_hook_round_trips_through_reads() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.raw");
    create(&f, Format::Raw);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    {
        let mut img = open(&f, Vec::new());
        img.add_hook(Arc::new(Xor(0x5a)));
        img.write_at(&data, 4096).unwrap();
        assert_eq!(read(&img, 4096, data.len()), data, "reads decrypt");
    }
    // Without the hook the stored bytes are the transformed ones; the caller's buffer
    // was never touched.
    let plain = open(&f, Vec::new());
    let stored = read(&plain, 4096, data.len());
    assert!(stored.iter().zip(&data).all(|(s, d)| *s == d ^ 0x5a));
}
