//! Encrypted images through the library: raw LUKS and qcow2 LUKS/AES on in-memory
//! storage. Unaligned I/O is read-modify-written; many threads writing disjoint bytes
//! of the same sectors lose none of them; a missing or wrong key never reads
//! ciphertext as data.

use std::sync::Arc;
use vdisk::crypto::secret;
use vdisk::format::{CreateSpec, DriverOptions};
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Format, Image};

fn define(id: &str, pass: &str) {
    let _ = secret::define(secret::Secret::new(id, pass.as_bytes().to_vec()));
}

fn make(format: &str, opts: &[(&str, &str)], size: u64) -> Arc<dyn Storage> {
    define("lib-k", "library passphrase");
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
    vdisk::format::create(
        Format::parse(format).unwrap(),
        &st,
        &CreateSpec {
            size,
            backing: None,
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
    )
    .unwrap();
    st
}

fn open(
    st: &Arc<dyn Storage>,
    format: &str,
    key: Option<&str>,
    no_io: bool,
) -> vdisk::Result<Image> {
    Image::open_storage(
        st.clone(),
        Format::parse(format).unwrap(),
        &DriverOptions {
            key_secret: key.map(str::to_string),
            no_io,
            ..DriverOptions::default()
        },
    )
}

fn images() -> Vec<(Arc<dyn Storage>, &'static str)> {
    vec![
        (
            make(
                "luks",
                &[("key-secret", "lib-k"), ("iter-time", "5")],
                1 << 20,
            ),
            "luks",
        ),
        (
            make(
                "qcow2",
                &[
                    ("encrypt.format", "luks"),
                    ("encrypt.key-secret", "lib-k"),
                    ("encrypt.iter-time", "5"),
                    ("encrypt.cipher-mode", "cbc"),
                    ("encrypt.ivgen-alg", "essiv"),
                    ("cluster_size", "4096"),
                ],
                1 << 20,
            ),
            "qcow2",
        ),
        (
            make(
                "qcow2",
                &[("encrypt.format", "aes"), ("encrypt.key-secret", "lib-k")],
                1 << 20,
            ),
            "qcow2",
        ),
    ]
}

#[test]
fn unaligned_io_round_trips_and_ciphertext_differs() {
    for (st, f) in images() {
        let img = open(&st, f, Some("lib-k"), false).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        img.write_at(&data, 777).unwrap();
        img.write_at(&[9u8; 3], 100_000).unwrap();
        let mut back = vec![0u8; data.len()];
        img.read_at(&mut back, 777).unwrap();
        assert_eq!(back, data, "{f}");
        let mut b = [0u8; 5];
        img.read_at(&mut b, 99_999).unwrap();
        assert_eq!(&b[1..4], &[9, 9, 9]);
        img.flush().unwrap();
        drop(img);
        // The plaintext is nowhere in the file.
        let len = st.len().unwrap() as usize;
        let mut raw = vec![0u8; len];
        st.read_at(&mut raw, 0).unwrap();
        assert!(
            !raw.windows(64).any(|w| w == &data[1000..1064]),
            "{f}: plaintext on disk"
        );
        // Without a key: metadata only; guest I/O is refused, never ciphertext.
        let img = open(&st, f, None, true).unwrap();
        assert!(img.encryption().is_some());
        let e = img.read_at(&mut b, 0).unwrap_err();
        assert!(e.to_string().contains("key-secret' is required"), "{e}");
        assert!(open(&st, f, None, false).is_err());
    }
}

#[test]
fn wrong_key_is_refused() {
    let (st, f) = images().remove(1);
    define("lib-wrong", "not it");
    let e = open(&st, f, Some("lib-wrong"), false).unwrap_err();
    assert_eq!(e.to_string(), "Invalid password, cannot unlock any keyslot");
    // EACCES, as QEMU returns for a bad passphrase.
    assert_eq!(e.errno(), 13);
}

#[test]
fn threads_writing_bytes_of_the_same_sectors_lose_nothing() {
    for (st, f) in images() {
        let img = Arc::new(open(&st, f, Some("lib-k"), false).unwrap());
        // 8 threads, each owning every 8th 64-byte piece of the first 16 KiB: every
        // sector is shared by all of them.
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let img = img.clone();
                s.spawn(move || {
                    for round in 0..4u8 {
                        for piece in (t as u64..256).step_by(8) {
                            img.write_at(&[t * 16 + round + 1; 64], piece * 64).unwrap();
                        }
                    }
                });
            }
        });
        let mut all = vec![0u8; 16384];
        img.read_at(&mut all, 0).unwrap();
        for piece in 0..256u64 {
            let t = (piece % 8) as u8;
            assert!(
                all[piece as usize * 64..(piece as usize + 1) * 64]
                    .iter()
                    .all(|&b| b == t * 16 + 4),
                "{f}: piece {piece} lost"
            );
        }
    }
}

#[test]
fn hostile_qcow2_crypto_extensions_are_refused() {
    let (st, f) = images().remove(1);
    let mut head = vec![0u8; 4096];
    st.read_at(&mut head, 0).unwrap();
    let at = head
        .windows(4)
        .position(|w| w == [0x05, 0x37, 0xbe, 0x77])
        .expect("crypto extension")
        + 8;
    let set = |off: u64, len: u64| {
        let mut h = head.clone();
        h[at..at + 8].copy_from_slice(&off.to_be_bytes());
        h[at + 8..at + 16].copy_from_slice(&len.to_be_bytes());
        st.write_at(&h, 0).unwrap();
        open(&st, f, Some("lib-k"), false).unwrap_err().to_string()
    };
    let (off, len) = (
        u64::from_be_bytes(head[at..at + 8].try_into().unwrap()),
        u64::from_be_bytes(head[at + 8..at + 16].try_into().unwrap()),
    );
    assert!(set(off + 1, len).contains("crypto header"));
    assert!(set(0, len).contains("crypto header"));
    assert!(set(off, u64::MAX - 10).contains("crypto header"));
    assert!(set(off, 100).contains("crypto header"));
    // Key material past the extension's length.
    assert!(set(off, 8192).contains("key slot 0 key material offset is invalid"));
    // Restored, it opens again.
    st.write_at(&head, 0).unwrap();
    open(&st, f, Some("lib-k"), false).unwrap();
}
