//! Bulwark's simulations and benchmarks: what proves the product keeps its promises, and the
//! figures that say how fast it keeps them.
//!
//! Modules in reading order:
//! - [`agentbench`]: the agent's initial read against `cat` and BLAKE3.
//! - [`limits`]: the machine's own limits (raw read, BLAKE3, raw QUIC + mutual TLS on
//!   loopback) that every other figure is a ratio against.
//! - [`report`]: `bench-results.json` and the SVG chart.
//! - [`restorebench`]: full and smart restores with a real coordinator and agent on loopback.
//! - [`storebench`]: store benchmarks (ingest, metadata per recovery point, dedup, GC).
//! - [`torture`]: the store workload that crash tests `kill -9`.

#![forbid(unsafe_code)]

pub mod agentbench;
pub mod limits;
pub mod report;
pub mod restorebench;
pub mod storebench;
pub mod torture;
