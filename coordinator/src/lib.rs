//! The coordinator (backup server): catalog, authority (CA, tokens, revocation), and the QUIC
//! server with its actors. Never talks to a hypervisor; never depends on the agent crate.
//!
//! Modules in reading order:
//! - [`config`]: `coordinator.toml` and the data directory layout.
//! - [`catalog`]: the sled catalog and its key layout.
//! - [`init`]: `bulwark-coordinator init`.
//! - [`enrollment`]: join token scopes and enrollment decisions, plain (no I/O).
//! - [`authority`]: CA, join tokens, enrollment and revocation, applied to the catalog.
//! - [`server`]: the listener, registry and session actors, and the admin API.
//! - [`store`]: the replica store (chunks, packs, block maps, verify, GC).
//! - [`policy`]: protection-group policy: validation, schedule math, the space plan.
//! - [`items`]: item-level recovery: partitions, ext4 and FAT read from a recovery point.
//! - [`notify`]: e-mail when a recovery finishes.
//! - [`throttle`]: recovery bandwidth throttling with a time window.
//! - [`jobs`]: the job queue and VM jobs (initial, sync, express full, consistency check).
//! - [`admin_client`]: the client side of the admin API (used by the console).
//! - [`cli`]: the `bulwark-coordinator` command line.

#![forbid(unsafe_code)]

pub mod admin_client;
pub mod authority;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod enrollment;
pub mod init;
pub mod items;
pub mod jobs;
pub mod join;
pub mod notify;
pub mod policy;
pub mod server;
pub mod store;
pub mod throttle;
