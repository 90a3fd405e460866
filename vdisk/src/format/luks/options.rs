//! The luks creation options, declared once (help texts are qemu-img 10's; order is
//! its `Formatting` line's).

use crate::format::options::{OptKind, OptionDesc, SIZE};

const fn s(name: &'static str, help: &'static str) -> OptionDesc {
    OptionDesc::new(name, OptKind::Str, None, help)
}

/// luks's options.
pub const CREATE_OPTIONS: &[OptionDesc] = &[
    SIZE,
    s(
        "key-secret",
        "ID of the secret that provides the keyslot passphrase",
    ),
    s("cipher-alg", "Name of encryption cipher algorithm"),
    s("cipher-mode", "Name of encryption cipher mode"),
    s("ivgen-alg", "Name of IV generator algorithm"),
    s("ivgen-hash-alg", "Name of IV generator hash algorithm"),
    s("hash-alg", "Name of encryption hash algorithm"),
    OptionDesc::new(
        "iter-time",
        OptKind::Number,
        None,
        "Time to spend in PBKDF in milliseconds",
    )
    .amendable(),
    OptionDesc::new(
        "detached-header",
        OptKind::Bool,
        None,
        "Create a detached LUKS header",
    ),
];

/// Options only `amend` takes: key-slot management (qemu-img 10's help texts).
pub const AMEND_ONLY_OPTIONS: &[OptionDesc] = &[
    OptionDesc::new(
        "keyslot",
        OptKind::Number,
        None,
        "Select a single keyslot to modify explicitly",
    )
    .amendable(),
    s(
        "new-secret",
        "New secret to set in the matching keyslots. Empty string to erase",
    )
    .amendable(),
    s("old-secret", "Select all keyslots that match this password").amendable(),
    s(
        "state",
        "Select new state of affected keyslots (active/inactive)",
    )
    .amendable(),
];
