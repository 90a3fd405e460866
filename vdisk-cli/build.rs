//! Link options of the `vdisk` command.
//!
//! Relative relocations packed as RELR (`-z pack-relative-relocs`) where the target is
//! GNU/Linux: the executable is position-independent, and its ~22,000 relative
//! relocations as plain RELA entries are a 530 KiB table the dynamic loader reads at
//! every start, resident for the life of the process (a fifth of what a small `vdisk
//! serve` otherwise holds beyond its code). As RELR they take a few KiB. glibc 2.36 and
//! binutils 2.38 or later understand it; an older GNU ld warns and ignores the option.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
