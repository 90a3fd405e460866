//! libFuzzer target: see `fuzz_support::qcow2_snapshot_table` (issue 14, part 2).
#![no_main]

#[path = "../../vdisk/tests/fuzz_support/mod.rs"]
mod fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_support::qcow2_snapshot_table(data));
