//! `vdisk convert`: results qemu-img agrees with (`compare` identical, `check` clean),
//! sparse where the source is, concatenation, compression, backing-aware copies.

mod cli_support;
use cli_support::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn allocated(dir: &Path, name: &str) -> u64 {
    std::fs::metadata(dir.join(name)).unwrap().blocks() * 512
}

fn identical(dir: &Path, a: &str, b: &str) {
    let r = qemu_img(dir, &["compare", a, b]);
    assert_eq!(r.code, 0, "qemu-img compare {a} {b}: {}{}", r.out, r.err);
}

fn clean(dir: &Path, name: &str) {
    let r = qemu_img(dir, &["check", name]);
    assert_eq!(r.code, 0, "qemu-img check {name}: {}{}", r.out, r.err);
}

/// 32 MiB raw source: data, explicit zero bytes inside data, holes.
fn source(dir: &Path) {
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "src.raw", "32M"]),
        "create",
    );
    qemu_io(
        dir,
        "raw",
        "src.raw",
        &[
            "write -P 1 0 3M",
            "write -P 0 1M 512k",
            "write -P 2 7M 4k",
            "write -P 3 9000k 100k",
            "write -P 4 31M 1M",
        ],
    );
}

#[test]
fn raw_to_raw_is_sparse_and_identical() {
    let d = tmp();
    let dir = d.path();
    source(dir);
    ok(
        vdisk(
            dir,
            &["convert", "-f", "raw", "-O", "raw", "src.raw", "dst.raw"],
        ),
        "convert",
    );
    identical(dir, "src.raw", "dst.raw");
    // The zero bytes inside the data and the holes are not written.
    let data = 3 * 1024 * 1024 - 512 * 1024 + 4096 + 100 * 1024 + 1024 * 1024;
    let a = allocated(dir, "dst.raw");
    assert!(
        a >= data && a < data + (256 << 10),
        "allocated {a}, data {data}"
    );
    let m = json(&ok(
        qemu_img(dir, &["map", "--output=json", "-f", "raw", "dst.raw"]),
        "map",
    ));
    let zero_at_1m = m
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["start"] == 1048576 && e["zero"] == true);
    assert!(zero_at_1m, "{m}");

    // -S 0 writes everything.
    ok(
        vdisk(
            dir,
            &[
                "convert", "-S", "0", "-f", "raw", "-O", "raw", "src.raw", "full.raw",
            ],
        ),
        "convert",
    );
    identical(dir, "src.raw", "full.raw");
    assert!(allocated(dir, "full.raw") >= 32 << 20);

    // One worker, in order; many workers out of order: the same guest data.
    ok(
        vdisk(
            dir,
            &["convert", "-m", "1", "-f", "raw", "src.raw", "m1.raw"],
        ),
        "convert",
    );
    ok(
        vdisk(
            dir,
            &[
                "convert", "-m", "16", "-W", "-f", "raw", "src.raw", "m16.raw",
            ],
        ),
        "convert",
    );
    identical(dir, "src.raw", "m1.raw");
    identical(dir, "src.raw", "m16.raw");
}

#[test]
fn sources_concatenate() {
    let d = tmp();
    let dir = d.path();
    source(dir);
    std::fs::write(dir.join("small.raw"), pattern(3 * 65536 + 512, 9)).unwrap();
    ok(
        vdisk(
            dir,
            &[
                "convert",
                "-f",
                "raw",
                "small.raw",
                "src.raw",
                "small.raw",
                "cat.raw",
            ],
        ),
        "convert",
    );
    let mut expect = std::fs::read(dir.join("small.raw")).unwrap();
    expect.extend(std::fs::read(dir.join("src.raw")).unwrap());
    expect.extend(std::fs::read(dir.join("small.raw")).unwrap());
    assert_eq!(std::fs::read(dir.join("cat.raw")).unwrap(), expect);
}

#[test]
fn no_create_overwrites_existing_target() {
    let d = tmp();
    let dir = d.path();
    source(dir);
    std::fs::write(dir.join("dirty.raw"), vec![0xaau8; 32 << 20]).unwrap();
    ok(
        vdisk(
            dir,
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                "src.raw",
                "dirty.raw",
            ],
        ),
        "convert",
    );
    identical(dir, "src.raw", "dirty.raw");
}

#[test]
fn convert_errors_like_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "a.raw", "1M"]),
        "create",
    );
    let cases: &[&[&str]] = &[
        &["convert", "-c", "-O", "raw", "a.raw", "x.raw"],
        &["convert", "-m", "17", "a.raw", "x.raw"],
        &["convert", "-S", "100", "a.raw", "x.raw"],
        &[
            "convert", "-B", "a.raw", "-O", "qcow2", "a.raw", "a.raw", "x.raw",
        ],
        &["convert", "-O", "raw", "missing.raw", "x.raw"],
        &["convert", "-O", "raw", "a.raw"],
        &["convert", "-O", "qcow2", "-B", "a.raw", "a.raw", "y.qcow2"],
    ];
    for c in cases {
        let q = qemu_img(dir, c);
        let v = vdisk(dir, c);
        assert_eq!(v.code, q.code, "{c:?}: {} vs {}", v.err, q.err);
        assert_eq!(v.err.replace("vdisk:", "qemu-img:"), q.err, "{c:?}");
    }
}

#[test]
fn raw_qcow2_qed_round_trips() {
    let d = tmp();
    let dir = d.path();
    source(dir);
    for fmt in ["qcow2", "qed"] {
        let img = format!("img.{fmt}");
        let back = format!("back-{fmt}.raw");
        ok(
            vdisk(dir, &["convert", "-f", "raw", "-O", fmt, "src.raw", &img]),
            "to fmt",
        );
        clean(dir, &img);
        identical(dir, "src.raw", &img);
        // Holes stay unallocated in the image.
        let m = json(&ok(qemu_img(dir, &["map", "--output=json", &img]), "map"));
        let unalloc_at_4m = m.as_array().unwrap().iter().any(|e| {
            let s = e["start"].as_u64().unwrap();
            let l = e["length"].as_u64().unwrap();
            s <= 4 << 20 && s + l > 4 << 20 && e["present"] == false
        });
        assert!(unalloc_at_4m, "{m}");
        ok(
            vdisk(dir, &["convert", "-O", "raw", &img, &back]),
            "back to raw",
        );
        identical(dir, "src.raw", &back);
        // qemu-made images convert too.
        let theirs = format!("theirs.{fmt}");
        ok(
            qemu_img(
                dir,
                &["convert", "-f", "raw", "-O", fmt, "src.raw", &theirs],
            ),
            "qemu",
        );
        let mine = format!("mine.{fmt}");
        ok(
            vdisk(dir, &["convert", "-O", fmt, &theirs, &mine]),
            "fmt to fmt",
        );
        clean(dir, &mine);
        identical(dir, &theirs, &mine);
    }
}

#[test]
fn compressed_qcow2_is_smaller_and_readable() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "raw", "text.raw", "8M"]),
        "create",
    );
    // Compressible data: repeated patterns, with a hole and a partial cluster.
    qemu_io(
        dir,
        "raw",
        "text.raw",
        &[
            "write -P 65 0 3M",
            "write -P 66 5M 100k",
            "write -P 67 8000k 10k",
        ],
    );
    ok(
        vdisk(
            dir,
            &[
                "convert", "-c", "-f", "raw", "-O", "qcow2", "text.raw", "c.qcow2",
            ],
        ),
        "convert -c",
    );
    ok(
        vdisk(
            dir,
            &["convert", "-f", "raw", "-O", "qcow2", "text.raw", "u.qcow2"],
        ),
        "convert",
    );
    clean(dir, "c.qcow2");
    identical(dir, "text.raw", "c.qcow2");
    let c = std::fs::metadata(dir.join("c.qcow2")).unwrap().len();
    let u = std::fs::metadata(dir.join("u.qcow2")).unwrap().len();
    assert!(c * 4 < u, "compressed {c} vs plain {u}");
    let m = ok(qemu_img(dir, &["map", "--output=json", "c.qcow2"]), "map");
    assert!(m.contains("\"compressed\": true"), "{m}");
    // An odd-sized image: the last, partial cluster is handled.
    std::fs::write(dir.join("odd.raw"), pattern(200_000, 3)).unwrap();
    ok(
        vdisk(
            dir,
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "odd.raw",
                "odd.qcow2",
            ],
        ),
        "odd",
    );
    clean(dir, "odd.qcow2");
    identical(dir, "odd.raw", "odd.qcow2");
}

#[test]
fn backing_target_copies_only_the_top() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]),
        "create",
    );
    qemu_io(dir, "qcow2", "base.qcow2", &["write -P 1 0 8M"]);
    qemu_overlay(dir, "qcow2", "base.qcow2", "qcow2", "top.qcow2");
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &["write -P 2 1M 64k", "write -z 3M 64k"],
    );
    ok(
        vdisk(
            dir,
            &[
                "convert",
                "-O",
                "qcow2",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                "new.qcow2",
            ],
        ),
        "convert -B",
    );
    clean(dir, "new.qcow2");
    identical(dir, "top.qcow2", "new.qcow2");
    let info = json(&ok(
        qemu_img(dir, &["info", "--output=json", "new.qcow2"]),
        "info",
    ));
    assert_eq!(info["backing-filename"], "base.qcow2");
    // Only the two top clusters are allocated in the new image.
    let m = json(&ok(
        qemu_img(dir, &["map", "--output=json", "new.qcow2"]),
        "map",
    ));
    let top_bytes: u64 = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(top_bytes, 128 << 10, "{m}");
}

#[test]
fn s0_gives_a_fully_allocated_qcow2_like_qemu() {
    let d = tmp();
    let dir = d.path();
    source(dir);
    ok(
        vdisk(
            dir,
            &[
                "convert", "-S", "0", "-f", "raw", "-O", "qcow2", "src.raw", "v.qcow2",
            ],
        ),
        "convert",
    );
    ok(
        qemu_img(
            dir,
            &[
                "convert", "-S", "0", "-f", "raw", "-O", "qcow2", "src.raw", "q.qcow2",
            ],
        ),
        "qemu convert",
    );
    identical(dir, "src.raw", "v.qcow2");
    clean(dir, "v.qcow2");
    let map = |f: &str| qemu_img(dir, &["map", "--output=json", f]).out;
    assert_eq!(
        map("v.qcow2"),
        map("q.qcow2"),
        "allocation differs from qemu-img's"
    );
}

#[test]
fn huge_sparse_source_converts() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "big.qcow2", "16T"]),
        "create",
    );
    qemu_io(dir, "qcow2", "big.qcow2", &["write -P 7 5T 64k"]);
    ok(
        vdisk(dir, &["convert", "-O", "qcow2", "big.qcow2", "out.qcow2"]),
        "convert",
    );
    identical(dir, "big.qcow2", "out.qcow2");
    clean(dir, "out.qcow2");
}

/// A qcow2 made with `preallocation=metadata` maps every cluster over holes of its
/// file. qemu-img takes it for metadata-preallocated and skips those holes as zeroes
/// without reading them; so does vdisk (it used to read the whole image, 4 GiB of
/// zeroes for a 4 GiB image). A read error injected (blkdebug) at the host offset of
/// the first cluster, a hole, is never hit, and the output equals the source.
#[test]
fn convert_skips_the_file_holes_of_a_metadata_preallocated_qcow2() {
    let d = tmp();
    let dir = d.path();
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "pm.qcow2",
                "64M",
            ],
        ),
        "create",
    );
    qemu_io(dir, "qcow2", "pm.qcow2", &["write -P 7 32M 1M"]);
    let map = json(&qemu_img(dir, &["map", "--output=json", "pm.qcow2"]).out);
    let first = &map[0];
    assert_eq!(first["data"], true, "{map}");
    assert_eq!(first["zero"], true, "qemu-img sees the file hole: {map}");
    let host = first["offset"].as_u64().expect("offset");
    std::fs::write(
        dir.join("bd.cfg"),
        format!(
            "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"{}\"\n",
            host / 512
        ),
    )
    .unwrap();
    for out in ["raw", "qcow2"] {
        let name = format!("out.{out}");
        let r = vdisk(
            dir,
            &["convert", "-O", out, "blkdebug:bd.cfg:pm.qcow2", &name],
        );
        assert_eq!(
            r.code, 0,
            "convert -O {out} read a hole: {}{}",
            r.out, r.err
        );
        let r = qemu_img(dir, &["compare", "-F", out, "pm.qcow2", &name]);
        assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    }
    clean(dir, "out.qcow2");
    // The error is real: a read of that cluster fails.
    let r = vdisk(dir, &["io", "-c", "read 0 4k", "blkdebug:bd.cfg:pm.qcow2"]);
    assert!(
        r.out.contains("Input/output error") || r.err.contains("Input/output error"),
        "{}{}",
        r.out,
        r.err
    );
}
