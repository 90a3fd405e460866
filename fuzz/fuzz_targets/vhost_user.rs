//! libFuzzer target: see `fuzz_support::vhost_user` in vdisk-vhost (issue 14, part 2).
#![no_main]

#[path = "../../vdisk-vhost/tests/fuzz_support/mod.rs"]
mod fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_support::vhost_user(data));
