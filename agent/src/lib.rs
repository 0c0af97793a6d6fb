//! The protection agent: runs on every hypervisor host, enrolls with a coordinator, keeps one
//! mutually authenticated QUIC connection to it. Never depends on the coordinator crate.
//!
//! Modules in reading order:
//! - [`config`]: `agent.toml` and the data directory.
//! - [`enroll`]: `bulwark-agent enroll` (key, CSR, join token, CA pinning).
//! - [`inventory`]: the VMs of this host, as reported to the coordinator.
//! - [`backoff`]: reconnect delays.
//! - [`uplink`]: the uplink actor and its session logic.
//! - [`sim`]: the embedded sim hypervisor (VMs, tracked writes, snapshots, overlays).
//! - [`backend`]: the hypervisor backend trait, and the sim's implementation.
//! - [`claims`]: VMs' ownership claims on the cluster's shared storage (compare-and-swap under a lock).
//! - [`qemu`]: the QEMU/KVM backend (QMP, fleecing, NBD, dirty bitmaps, guest agent).
//! - [`snapshot`]: the snapshot actor (VSS sequence, freeze bound, lease).
//! - [`reader`]: streams the blocks a job needs out of a held snapshot, with their ids.
//! - [`agent_job`]: a backup job's decisions as a plain state machine (the change-token rule).
//! - [`job`]: one job end to end: snapshot, transfer streams, verdict, release.
//! - [`export`]: a recovery point's disk read from the coordinator on demand, as an NBD export.
//! - [`items_writer`]: writes recovered files under a destination, names treated as hostile.
//! - [`run`]: `bulwark-agent run`.
//! - [`seed`]: `bulwark-agent seed export` (manual replica creation).
//! - [`cli`]: the command line.

#![forbid(unsafe_code)]

pub mod agent_job;
pub mod backend;
pub mod backoff;
pub mod claims;
pub mod cli;
pub mod config;
pub mod enroll;
pub mod export;
pub mod inventory;
pub mod items_writer;
pub mod job;
pub mod peers;
pub mod qemu;
pub mod reader;
pub mod restore_disk;
pub mod run;
pub mod seed;
pub mod sim;
pub mod snapshot;
pub mod uplink;
