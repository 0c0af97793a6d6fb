//! libFuzzer target: see [`bulwark_fuzz::protocol::check_transfer`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_fuzz::protocol::check_transfer(data));
