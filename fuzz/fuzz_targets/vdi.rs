//! libFuzzer target: mutated vdi images through open, I/O, block status, check and repair.
#![no_main]

#[path = "../../vdisk/tests/fuzz_support/mod.rs"]
mod fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_support::vdi(data));
