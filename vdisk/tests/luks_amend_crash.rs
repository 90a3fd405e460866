//! Crash simulation of `amend` key-slot changes on raw LUKS volumes and qcow2
//! `encrypt.format=luks`: at every crash point (before each write or flush of the
//! amend), with none, all, the latest, all but the latest or a random subset of the
//! unflushed writes on disk, every
//! passphrase that opened the image before still opens it (except the one being
//! erased, which may go either way), the guest data reads as before, no other
//! passphrase opens it, and qcow2 `check` finds nothing. After the last point the
//! amend's result holds (the new passphrase opens, the erased one does not).

use rand::{Rng, SeedableRng};
use std::sync::Arc;
use vdisk::crypto::secret;
use vdisk::format::{CreateSpec, DriverOptions};
use vdisk::storage::trace::TraceStorage;
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Format, Image, Repair};

const SIZE: u64 = 1 << 20;

fn define(id: &str, pass: &str) {
    let _ = secret::define(secret::Secret::new(id, pass.as_bytes().to_vec()));
}

fn pairs(kv: &[(&str, &str)]) -> Vec<(String, String)> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `k` with the container's prefix.
fn key(fmt: &str, k: &str) -> String {
    if fmt == "qcow2" {
        format!("encrypt.{k}")
    } else {
        k.to_string()
    }
}

fn open(bytes: Vec<u8>, fmt: &str, secret: &str, read_only: bool) -> vdisk::Result<Image> {
    Image::open_storage(
        Arc::new(MemStorage::from_vec(bytes)),
        Format::parse(fmt).unwrap(),
        &DriverOptions {
            key_secret: Some(secret.into()),
            read_only,
            ..DriverOptions::default()
        },
    )
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

/// A volume with "ac-p0" in slot 0 and "ac-p1" in slot 1, and some data.
fn volume(fmt: &str) -> (Vec<u8>, Vec<u8>) {
    define("ac-p0", "pass zero");
    define("ac-p1", "pass one");
    define("ac-p2", "pass two");
    define("ac-no", "not a pass");
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut o = vec![
        (key(fmt, "key-secret"), "ac-p0".to_string()),
        (key(fmt, "iter-time"), "5".to_string()),
    ];
    if fmt == "qcow2" {
        o.push(("encrypt.format".into(), "luks".into()));
        o.push(("cluster_size".into(), "4096".into()));
    }
    vdisk::format::create(
        Format::parse(fmt).unwrap(),
        &st,
        &CreateSpec {
            size: SIZE,
            backing: None,
            options: o,
        },
    )
    .unwrap();
    let img = Image::open_storage(
        st.clone(),
        Format::parse(fmt).unwrap(),
        &DriverOptions {
            key_secret: Some("ac-p0".into()),
            ..DriverOptions::default()
        },
    )
    .unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 1000) as u8).collect();
    img.write_at(&data, 12_345).unwrap();
    img.amend(&pairs(&[
        (&key(fmt, "state"), "active"),
        (&key(fmt, "new-secret"), "ac-p1"),
        (&key(fmt, "iter-time"), "5"),
    ]))
    .unwrap();
    img.close().unwrap();
    drop(img);
    let mut bytes = vec![0u8; st.len().unwrap() as usize];
    st.read_at(&mut bytes, 0).unwrap();
    let plain = read_all(&open(bytes.clone(), fmt, "ac-p0", true).unwrap());
    (bytes, plain)
}

/// Whether `secret` opens `bytes`; when it does, the data must read as `plain`.
fn opens(bytes: &[u8], fmt: &str, secret: &str, plain: &[u8], what: &str) -> bool {
    match open(bytes.to_vec(), fmt, secret, true) {
        Ok(img) => {
            assert!(read_all(&img) == plain, "{what}: {secret} reads other data");
            if fmt == "qcow2" {
                let r = img.check(Repair::default()).unwrap();
                assert_eq!(r.corruptions, 0, "{what}: {:?}", r.findings);
            }
            true
        }
        Err(e) => {
            assert_eq!(
                e.to_string(),
                "Invalid password, cannot unlock any keyslot",
                "{what}: {secret}"
            );
            false
        }
    }
}

/// Active slots in the LUKS header of `bytes` (at 0 for a raw volume, at its
/// cluster inside a qcow2 image).
fn active_slots(bytes: &[u8]) -> usize {
    let at = (0..bytes.len())
        .step_by(4096)
        .find(|&o| bytes[o..].starts_with(b"LUKS\xba\xbe"))
        .expect("a LUKS header");
    let h = vdisk::crypto::luks::LuksHeader::decode(&bytes[at..]).unwrap();
    h.slots.iter().filter(|s| s.active).count()
}

/// Runs one amend (opened with `with`) on a traced copy and checks every crash
/// point. `after`: the secrets that must open at the end; `gone`: those that must not
/// (and may go either way in between).
fn run(fmt: &str, with: &str, amend: &[(&str, &str)], force: bool, after: &[&str], gone: &[&str]) {
    let (initial, plain) = volume(fmt);
    let before = ["ac-p0", "ac-p1"];
    let ts = Arc::new(TraceStorage::new(initial));
    let st: Arc<dyn Storage> = ts.clone();
    let img = Image::open_storage(
        st,
        Format::parse(fmt).unwrap(),
        &DriverOptions {
            key_secret: Some(with.into()),
            ..DriverOptions::default()
        },
    )
    .unwrap();
    let start = ts.point();
    let opts: Vec<(String, String)> = amend
        .iter()
        .map(|(k, v)| (key(fmt, k), v.to_string()))
        .collect();
    img.amend_with(&opts, force, &|_, _| {}).unwrap();
    img.close().unwrap();
    drop(img);
    let trace = ts.trace();
    let points = trace.points();
    assert!(
        points - start > 3,
        "{fmt} {amend:?}: only {} ops",
        points - start
    );
    for k in start..points {
        // None, all, only the latest, all but the latest, a random subset.
        for variant in 0..5u64 {
            let mut r = rand::rngs::StdRng::seed_from_u64((k as u64) << 8 ^ variant);
            let bytes = trace.crash_image(k, |i| match variant {
                0 => false,
                1 => true,
                2 => i + 1 == k,
                3 => i + 1 != k,
                _ => r.gen_bool(0.5),
            });
            let what = format!("{fmt} {amend:?} point {k}/{points} variant {variant}");
            let mut opening = 0;
            for s in before {
                let o = opens(&bytes, fmt, s, &plain, &what);
                assert!(o || gone.contains(&s), "{what}: {s} lost");
                opening += usize::from(o);
            }
            // The new passphrase may or may not open yet; never a wrong one.
            opening += usize::from(opens(&bytes, fmt, "ac-p2", &plain, &what));
            assert!(!opens(&bytes, fmt, "ac-no", &plain, &what), "{what}");
            if !force {
                // No slot is marked active whose material does not open (each
                // passphrase here is in one slot).
                assert_eq!(active_slots(&bytes), opening, "{what}: active slots");
            }
        }
    }
    let end = trace.crash_image(points - 1, |_| true);
    for s in after {
        assert!(
            opens(&end, fmt, s, &plain, fmt),
            "{fmt} {amend:?}: {s} after"
        );
    }
    for s in gone {
        assert!(
            !opens(&end, fmt, s, &plain, fmt),
            "{fmt} {amend:?}: {s} still opens"
        );
    }
}

#[test]
fn adding_a_slot_survives_every_crash_point() {
    for fmt in ["luks", "qcow2"] {
        run(
            fmt,
            "ac-p1",
            &[
                ("state", "active"),
                ("new-secret", "ac-p2"),
                ("iter-time", "5"),
            ],
            false,
            &["ac-p0", "ac-p1", "ac-p2"],
            &[],
        );
    }
}

#[test]
fn erasing_slots_survives_every_crash_point() {
    for fmt in ["luks", "qcow2"] {
        run(
            fmt,
            "ac-p0",
            &[("state", "inactive"), ("old-secret", "ac-p0")],
            false,
            &["ac-p1"],
            &["ac-p0"],
        );
        run(
            fmt,
            "ac-p0",
            &[("state", "inactive"), ("keyslot", "1")],
            false,
            &["ac-p0"],
            &["ac-p1"],
        );
    }
}

#[test]
fn forced_overwrite_keeps_the_other_slots() {
    // Slot 1 (ac-p1) is overwritten in place with ac-p2: only ac-p1 may be lost.
    for fmt in ["luks", "qcow2"] {
        run(
            fmt,
            "ac-p0",
            &[
                ("state", "active"),
                ("new-secret", "ac-p2"),
                ("keyslot", "1"),
                ("iter-time", "5"),
            ],
            true,
            &["ac-p0", "ac-p2"],
            &["ac-p1"],
        );
    }
}
