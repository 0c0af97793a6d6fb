//! libFuzzer target: a guest disk image through [`bulwark_coordinator::items::fuzz_walk`]
//! (partition tables, the swap scan, every directory listed, every file read), which must end,
//! bounded, without a panic. Seeds: fuzz/seeds/walk.sh.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_coordinator::items::fuzz_walk(data));
