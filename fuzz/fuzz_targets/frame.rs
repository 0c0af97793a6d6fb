//! libFuzzer target: see [`bulwark_fuzz::protocol::check_frame`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_fuzz::protocol::check_frame(data));
