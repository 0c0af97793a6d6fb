//! Bulwark's fuzz targets share their checks through this library: each target in
//! `fuzz_targets/` hands libFuzzer's input to one `check_*` function, and the workspace's test
//! suite replays every seed and every crasher in `fuzz/regressions/` through the same
//! functions (protocol/tests/fuzz_regressions.rs includes these files by path), so a fixed
//! crash stays fixed without libFuzzer.
//!
//! The `walk` target has no check here: it calls `bulwark_coordinator::items::fuzz_walk`
//! itself (a disk image must end, bounded, without a panic), and
//! coordinator/tests/fuzz_regressions.rs replays its crashers through the same function.
//!
//! Modules in reading order:
//! - [`stream`]: an in-memory stream that delivers bytes in pieces, and a poller for it.
//! - [`protocol`]: the checks of the frame, transfer, codec and handshake targets.

pub mod protocol;
pub mod stream;
