//! Opening images by options tree through the library: key=value and json: names,
//! format options reaching the driver, protocol options reaching the file, children
//! the formats do not take yet, and targets `create` refuses.

use std::path::Path;
use vdisk::storage::options::SpecError;
use vdisk::storage::StorageError;
use vdisk::{CreateOptions, Error, Format, Image, OpenOptions};

/// Creates a 1 MiB qcow2 image named `name`.
fn create(name: impl AsRef<Path>) -> vdisk::Result<()> {
    Image::create(
        name,
        &CreateOptions {
            format: Format::Qcow2,
            size: Some(1 << 20),
            options: Vec::new(),
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
        },
    )
}

fn qcow2(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    create(&p).unwrap();
    p.to_str().unwrap().to_string()
}

fn spec_err(e: Error) -> SpecError {
    match e {
        Error::Storage(StorageError::Spec(s)) => s,
        other => panic!("not an options error: {other}"),
    }
}

#[test]
fn every_name_form_opens_the_same_image() {
    let d = tempfile::tempdir().unwrap();
    let p = qcow2(d.path(), "a.qcow2");
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&[0x5a; 4096], 0).unwrap();
    img.close().unwrap();
    drop(img);
    let names = [
        p.clone(),
        format!("file:{p}"),
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{p}"}}}}"#),
        format!(r#"json:{{"file.filename":"{p}","file.locking":false}}"#),
    ];
    for name in &names {
        let img = Image::open(name, &OpenOptions::default()).unwrap();
        assert_eq!(img.format(), Format::Qcow2, "{name}");
        assert_eq!(img.path(), Path::new(&p), "{name}");
        let mut buf = [0u8; 4096];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0x5a; 4096], "{name}");
    }
    let kv = format!(
        "driver=qcow2,file.filename={},cache.direct=on",
        p.replace(',', ",,")
    );
    let img = Image::open(
        &kv,
        &OpenOptions {
            image_opts: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(img.path(), Path::new(&p));
    // A protocol at the root is raw data on that storage.
    let img = Image::open(
        format!("driver=file,filename={p}"),
        &OpenOptions {
            image_opts: true,
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(img.format(), Format::Raw);
}

#[test]
fn bad_trees_are_refused_with_the_key_named() {
    let d = tempfile::tempdir().unwrap();
    let p = qcow2(d.path(), "a.qcow2");
    let kv = |s: String| {
        spec_err(
            Image::open(
                &s,
                &OpenOptions {
                    image_opts: true,
                    ..OpenOptions::default()
                },
            )
            .unwrap_err(),
        )
    };
    assert_eq!(
        kv(format!("driver=qcow2,file.filename={p},l2-cache-size=lots")),
        SpecError::Value {
            key: "l2-cache-size".into(),
            expected: "a size".into()
        }
    );
    assert_eq!(
        kv(format!("driver=qcow2,file.filename={p},file.locking=maybe")),
        SpecError::BadValue("maybe".into())
    );
    // aio=native needs O_DIRECT, as in QEMU; other modes open.
    assert_eq!(
        kv(format!("driver=qcow2,file.filename={p},file.aio=native")),
        SpecError::AioNativeNeedsDirect
    );
    assert_eq!(
        kv(format!("driver=qcow2,file.filename={p},file.aio=fast")),
        SpecError::BadValue("fast".into())
    );
    assert_eq!(
        kv(format!("driver=qcow2,file.filename={p},backing=node0")),
        SpecError::NodeReference("node0".into())
    );
    let e = spec_err(
        Image::open(
            format!(r#"json:{{"driver":"qcow2","file":{{"filename":{}}}}}"#, 5),
            &OpenOptions::default(),
        )
        .unwrap_err(),
    );
    assert_eq!(
        e,
        SpecError::Type {
            key: "file.filename".into(),
            expected: "string"
        }
    );
    // A separate data file is opened and handed on: qcow2 takes one only when its
    // header says it has an external data file (QEMU's wording); a format without
    // data files refuses the key by name.
    let raw = d.path().join("data.raw");
    std::fs::write(&raw, [0u8; 512]).unwrap();
    let e = Image::open(
        format!(
            r#"json:{{"driver":"qcow2","file":{{"filename":"{p}"}},"data-file":{{"filename":"{}"}}}}"#,
            raw.display()
        ),
        &OpenOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "'data-file' can only be set for images with an external data file"
    );
    let e = spec_err(
        Image::open(
            format!(
                r#"json:{{"driver":"raw","file":{{"filename":"{p}"}},"data-file":{{"filename":"{}"}}}}"#,
                raw.display()
            ),
            &OpenOptions::default(),
        )
        .unwrap_err(),
    );
    assert_eq!(
        e,
        SpecError::FormatOption {
            format: "raw".into(),
            key: "data-file".into()
        }
    );
    let missing = spec_err(
        Image::open(
            format!(
                r#"json:{{"driver":"qcow2","file":{{"filename":"{p}"}},"data-file":{{"driver":"nbd"}}}}"#
            ),
            &OpenOptions::default(),
        )
        .unwrap_err(),
    );
    assert_eq!(
        missing,
        SpecError::Missing("Parameter 'server.type' is missing".into())
    );
}

#[test]
fn create_refuses_protocol_targets_by_name() {
    let d = tempfile::tempdir().unwrap();
    for (name, proto) in [("nbd://localhost/x", "nbd"), ("zz:x.qcow2", "zz")] {
        let e = spec_err(create(name).unwrap_err());
        assert_eq!(e, SpecError::UnknownProtocol(proto.into()));
    }
    let p = d.path().join("b.qcow2");
    create(format!("file:{}", p.display())).unwrap();
    assert_eq!(
        Image::open(&p, &OpenOptions::default()).unwrap().format(),
        Format::Qcow2
    );
}
