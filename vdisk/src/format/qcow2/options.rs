//! The qcow2 creation options, declared once: `-o help`, the `Formatting` line and
//! [`super::create`] all read this table. Order = the order qemu-img's `Formatting`
//! line prints them in; help texts are qemu-img 10's.

use crate::format::options::{OptKind, OptionDesc, BACKING_FILE, BACKING_FMT, SIZE};

const fn s(name: &'static str, help: &'static str) -> OptionDesc {
    OptionDesc::new(name, OptKind::Str, None, help)
}

/// qcow2's options. `amend` may change compat, lazy_refcounts, refcount_bits, size,
/// the backing file, the data-file settings and the PBKDF time (as qemu-img 10's
/// `amend -o help` lists them).
pub const CREATE_OPTIONS: &[OptionDesc] = &[
    // qemu-img prints the encryption options first on its `Formatting` line.
    OptionDesc::new(
        "encryption",
        OptKind::Bool,
        None,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    s(
        "encrypt.format",
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    s(
        "encrypt.key-secret",
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    s("encrypt.cipher-alg", "Name of encryption cipher algorithm"),
    s("encrypt.cipher-mode", "Name of encryption cipher mode"),
    s("encrypt.ivgen-alg", "Name of IV generator algorithm"),
    s(
        "encrypt.ivgen-hash-alg",
        "Name of IV generator hash algorithm",
    ),
    s("encrypt.hash-alg", "Name of encryption hash algorithm"),
    OptionDesc::new(
        "encrypt.iter-time",
        OptKind::Number,
        None,
        "Time to spend in PBKDF in milliseconds",
    )
    .amendable(),
    OptionDesc::new(
        "cluster_size",
        OptKind::Size,
        Some("65536"),
        "qcow2 cluster size",
    ),
    OptionDesc::new(
        "extended_l2",
        OptKind::Bool,
        Some("off"),
        "Extended L2 tables",
    ),
    OptionDesc::new(
        "preallocation",
        OptKind::Enum {
            values: &["off", "metadata", "falloc", "full"],
            qapi: Some("preallocation"),
        },
        None,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    OptionDesc::new(
        "compression_type",
        OptKind::Enum {
            values: &["zlib", "zstd"],
            qapi: Some("compression-type"),
        },
        Some("zlib"),
        "Compression method used for image cluster compression",
    ),
    SIZE.amendable(),
    OptionDesc::new(
        "compat",
        OptKind::Enum {
            values: &["0.10", "v2", "1.1", "v3"],
            qapi: Some("version"),
        },
        None,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    )
    .amendable(),
    BACKING_FILE.amendable(),
    BACKING_FMT.amendable(),
    s("data_file", "File name of an external data file").amendable(),
    OptionDesc::new(
        "data_file_raw",
        OptKind::Bool,
        None,
        "The external data file must stay valid as a raw image",
    )
    .amendable(),
    OptionDesc::new(
        "lazy_refcounts",
        OptKind::Bool,
        Some("off"),
        "Postpone refcount updates",
    )
    .amendable(),
    OptionDesc::new(
        "refcount_bits",
        OptKind::Number,
        Some("16"),
        "Width of a reference count entry in bits",
    )
    .amendable(),
];

/// Options only `amend` takes: LUKS keyslot management of encrypted images.
pub const AMEND_ONLY_OPTIONS: &[OptionDesc] = &[
    OptionDesc::new(
        "encrypt.keyslot",
        OptKind::Number,
        None,
        "Select a single keyslot to modify explicitly",
    )
    .amendable(),
    s(
        "encrypt.new-secret",
        "New secret to set in the matching keyslots. Empty string to erase",
    )
    .amendable(),
    s(
        "encrypt.old-secret",
        "Select all keyslots that match this password",
    )
    .amendable(),
    s(
        "encrypt.state",
        "Select new state of affected keyslots (active/inactive)",
    )
    .amendable(),
];
