//! Bulwark's simulations and benchmarks: what proves the product keeps its promises, and the
//! figures that say how fast it keeps them.
//!
//! Modules in reading order:
//! - [`agentbench`]: the agent's initial read against `cat` and BLAKE3.
//! - [`chaos`]: `bulwark-chaos`, seeded fault runs against the real daemons, and the invariants
//!   that prove nothing was lost.
//! - [`cluster`]: a real coordinator and agent in this process, on loopback, for benchmarks.
//! - [`dsim`]: the deterministic simulation (`bulwark-chaos --scenario sim`): the real store,
//!   catalog, job planning and sim hypervisor driven by a simulated clock, one thread per seed.
//! - [`itemsbench`]: `ls` and `recover-items` of a directory of 5,000 and 20,000 files, and
//!   their ratio (linear or not).
//! - [`limits`]: the machine's own limits (raw read, BLAKE3, raw QUIC + mutual TLS on
//!   loopback) that every other figure is a ratio against.
//! - [`peers`]: restic and borg, run as their users run them.
//! - [`protectbench`]: initial, incremental and consistency-check runs, Bulwark against the
//!   peers on the same image and the same churn.
//! - [`report`]: `bench-results.json` and the SVG charts.
//! - [`restorebench`]: full and smart restores with a real coordinator and agent on loopback.
//! - [`storebench`]: store benchmarks (ingest, metadata per recovery point, dedup, GC).
//! - [`torture`]: the store workload that crash tests `kill -9`.

#![forbid(unsafe_code)]

pub mod agentbench;
pub mod chaos;
pub mod cluster;
pub mod dsim;
pub mod itemsbench;
pub mod limits;
pub mod peers;
pub mod protectbench;
pub mod qemubench;
pub mod report;
pub mod restorebench;
pub mod scalebench;
pub mod storebench;
pub mod torture;
