//! Vectored requests go through the image's write hooks like plain ones: a vectored
//! write is seen (and may be transformed) by `before`, a vectored read by `after_read`.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use vdisk::hook::{Request, WriteHook};
use vdisk::{CreateOptions, Format, Image, OpenOptions};

/// Flips every bit of written data and flips it back on reads (a stand-in for
/// encryption).
#[derive(Debug)]
struct Flip;

impl WriteHook for Flip {
    fn before(&self, req: &mut Request<'_>) -> vdisk::Result<()> {
        if let Request::Write { data, .. } = req {
            data.to_mut().iter_mut().for_each(|b| *b = !*b);
        }
        Ok(())
    }
    fn after_read(&self, buf: &mut [u8], _offset: u64) -> vdisk::Result<()> {
        buf.iter_mut().for_each(|b| *b = !*b);
        Ok(())
    }
}

#[test]
fn vectored_requests_pass_the_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.qcow2");
    Image::create(
        &path,
        &CreateOptions {
            format: Format::Qcow2,
            size: Some(1 << 20),
            options: Vec::new(),
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
        },
    )
    .unwrap();
    let a = [0x12u8; 3000];
    let b = [0x34u8; 70_000];
    {
        let mut img = Image::open(&path, &OpenOptions::default()).unwrap();
        img.add_hook(Arc::new(Flip));
        img.write_vectored(&[IoSlice::new(&a), IoSlice::new(&b)], 5000)
            .unwrap();
        let (mut x, mut y) = (vec![0u8; 3000], vec![0u8; 70_000]);
        img.read_vectored(
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
            5000,
        )
        .unwrap();
        assert_eq!((x.as_slice(), y.as_slice()), (&a[..], &b[..]));
        img.close().unwrap();
    }
    // Without the hook, the stored bytes are the transformed ones.
    let img = Image::open(&path, &OpenOptions::default()).unwrap();
    let mut raw = vec![0u8; 73_000];
    img.read_at(&mut raw, 5000).unwrap();
    assert!(raw[..3000].iter().all(|&v| v == !0x12));
    assert!(raw[3000..].iter().all(|&v| v == !0x34));
}
