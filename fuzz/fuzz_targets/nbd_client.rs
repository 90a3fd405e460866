//! libFuzzer target: see `fuzz_support::nbd_client` (issue 14, part 2).
#![no_main]

#[path = "../../vdisk/tests/fuzz_support/mod.rs"]
mod fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_support::set_nbd_pace_ms(100);
    fuzz_support::nbd_client(data)
});
