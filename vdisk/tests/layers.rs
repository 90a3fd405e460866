//! `Image::layers()`: the read-only view of each image of a chain that `info`, `map`,
//! `compare`, `convert` and `rebase` use instead of the drivers.

use std::path::Path;
use vdisk::{CreateOptions, ExtentKind, Format, Image, OpenOptions};

fn create(path: &Path, format: Format, size: Option<u64>, backing: Option<&str>) {
    Image::create(
        path,
        &CreateOptions {
            format,
            size,
            options: Vec::new(),
            backing_file: backing.map(str::to_string),
            backing_format: backing.map(|_| Format::Raw),
            unsafe_backing: false,
        },
    )
    .unwrap();
}

#[test]
fn layers_describe_the_chain_and_read_as_the_image_above_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![9u8; 64 << 10]).unwrap();
    let top = dir.path().join("top.qcow2");
    create(&top, Format::Qcow2, Some(1 << 20), Some("base.raw"));
    let img = Image::open(&top, &OpenOptions::default()).unwrap();
    img.write_at(&[1u8; 4096], 0).unwrap();

    let layers = img.layers();
    assert_eq!(layers.len(), 2);
    let (t, b) = (&layers[0], &layers[1]);
    assert_eq!((t.depth(), t.path()), (0, top.as_path()));
    assert_eq!(
        (t.format(), t.size(), t.cluster_size()),
        (Format::Qcow2, 1 << 20, Some(65536))
    );
    assert_eq!(t.backing_spec().unwrap().name, "base.raw");
    assert!(t.has_backing());
    assert_eq!((b.depth(), b.path()), (1, base.as_path()));
    assert_eq!((b.format(), b.size()), (Format::Raw, 64 << 10));
    assert!(!b.has_backing());
    assert_eq!(img.backing_chain().len(), 1);
    assert_eq!(img.backing().unwrap().path(), base.as_path());

    // Per-layer status: the top holds its write, and leaves the rest to the base.
    let e = t.block_status(0, 1 << 20).unwrap();
    assert_eq!(e.kind, ExtentKind::Data);
    assert_eq!(img.layer_block_status(0, 1 << 20).unwrap(), e);
    let e = t.block_status(65536, 65536).unwrap();
    assert_eq!(e.kind, ExtentKind::Unallocated);

    // A layer reads its own data; past its end, zeroes (what the top image shows).
    let mut buf = vec![0xffu8; 8192];
    b.read_at(&mut buf, (64 << 10) - 4096).unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 9));
    assert!(buf[4096..].iter().all(|&x| x == 0));
    assert!(b.file_length().unwrap() == 64 << 10);
    let (data, n) = b.file_extent_at(0).unwrap();
    assert!(data && n > 0);
}
