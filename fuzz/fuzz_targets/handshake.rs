//! libFuzzer target: see [`bulwark_fuzz::protocol::check_handshake`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_fuzz::protocol::check_handshake(data));
