//! Many threads on one image: concurrent allocating writes into the same clusters must
//! all survive (in-flight allocations are ordered), and the result must pass qemu-img
//! check. Run for every format configuration that allocates.

use std::process::Command;
use std::sync::Arc;
use vdisk::{CreateOptions, Format, Image, OpenOptions, ZeroFlags};

fn qemu_check(path: &std::path::Path) {
    let out = Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn opts(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Each of `threads` threads writes slot `t` of every `threads * unit` stripe, so every
/// cluster is allocated by several threads at once. Returns the expected contents.
fn hammer(img: &Arc<Image>, threads: usize, unit: usize, rounds: usize) -> Vec<u8> {
    let size = img.size() as usize;
    let mut handles = Vec::new();
    for t in 0..threads {
        let img = img.clone();
        handles.push(std::thread::spawn(move || {
            for r in 0..rounds {
                let pat = (t * 16 + r + 1) as u8;
                let buf = vec![pat; unit];
                let mut off = t * unit;
                while off + unit <= size {
                    img.write_at(&buf, off as u64).unwrap();
                    off += threads * unit;
                }
                // Readers run beside the writers and must never see torn metadata.
                let mut rb = vec![0u8; unit];
                img.read_at(&mut rb, (t * unit) as u64).unwrap();
                assert_eq!(rb, buf);
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let mut expect = vec![0u8; size];
    for t in 0..threads {
        let pat = (t * 16 + rounds) as u8;
        let mut off = t * unit;
        while off + unit <= size {
            expect[off..off + unit].fill(pat);
            off += threads * unit;
        }
    }
    expect
}

fn case(format: Format, options: &[(&str, &str)], unit: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("c.{}", format.name()));
    let co = CreateOptions {
        format,
        size: Some(4 << 20),
        options: opts(options),
        backing_file: None,
        backing_format: None,
        unsafe_backing: false,
    };
    Image::create(&path, &co).unwrap();
    let img = Arc::new(Image::open(&path, &OpenOptions::default()).unwrap());
    let expect = hammer(&img, 8, unit, 3);
    // Zeroes and discards racing with each other on distinct ranges.
    let mut hs = Vec::new();
    for t in 0..4u64 {
        let img = img.clone();
        hs.push(std::thread::spawn(move || {
            img.write_zeroes(
                t * (1 << 20),
                64 << 10,
                ZeroFlags {
                    may_unmap: t % 2 == 0,
                    fast: false,
                },
            )
            .unwrap();
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    let mut expect = expect;
    for t in 0..4usize {
        expect[t << 20..(t << 20) + (64 << 10)].fill(0);
    }
    let mut got = vec![0u8; expect.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(
        got == expect,
        "{format} {options:?}: contents differ after concurrent writes"
    );
    img.flush().unwrap();
    if format != Format::Raw {
        let r = img.check(vdisk::Repair::default()).unwrap();
        assert_eq!(
            (r.corruptions, r.leaks),
            (0, 0),
            "{format} {options:?}: vdisk check {r:?}"
        );
    }
    drop(img);
    // QEMU cannot open the table_size=1 QED images it creates itself.
    if format != Format::Raw && !options.contains(&("table_size", "1")) {
        qemu_check(&path);
    }
    let img = Image::open(
        &path,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    img.read_at(&mut got, 0).unwrap();
    assert!(
        got == expect,
        "{format} {options:?}: contents differ after reopen"
    );
}

#[test]
fn qcow2_concurrent_allocation() {
    case(Format::Qcow2, &[], 4096);
    case(
        Format::Qcow2,
        &[("cluster_size", "4k"), ("refcount_bits", "1")],
        512,
    );
    case(
        Format::Qcow2,
        &[("compat", "0.10"), ("cluster_size", "512")],
        512,
    );
}

#[test]
fn qed_concurrent_allocation() {
    case(Format::Qed, &[], 4096);
    case(
        Format::Qed,
        &[("cluster_size", "4k"), ("table_size", "1")],
        1024,
    );
}

#[test]
fn raw_concurrent_writes() {
    case(Format::Raw, &[], 4096);
}

#[test]
fn image_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Image>();
    assert_send_sync::<Arc<dyn vdisk::format::Driver>>();
}
