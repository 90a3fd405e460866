//! libFuzzer target: client byte streams (handshake, options, requests) against the
//! NBD server of `vdisk serve`.
#![no_main]

#[path = "../../vdisk-nbd/tests/fuzz_support/mod.rs"]
mod fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_support::nbd_server(data));
