//! Bulwark's wire protocol: everything the coordinator, agents and the console say to each other.
//!
//! Owns: typed ids, the message types, the one codec (bincode 2, always size-limited), the
//! length-prefixed framing used on every QUIC stream, and the version handshake. Never does I/O
//! of its own beyond reading and writing frames on a stream it is handed; never knows about
//! QUIC, TLS, sled or actors.
//!
//! Modules in reading order:
//! - [`ids`]: typed identifiers (host, cluster, VM, disk, job, recovery point).
//! - [`messages`]: what each peer may send, per stream kind.
//! - [`codec`]: bincode 2 encode/decode with explicit limits (the only place bincode is named).
//! - [`frame`]: `u32` length-prefixed frames, a sans-IO decoder and async read/write helpers.
//! - [`block`]: block ids (plain or keyed BLAKE3) and block-size bounds.
//! - [`transfer`]: the frames and conversations of a job's per-disk transfer streams.
//! - [`blockmap`]: Merkle block maps (update, walk) over any page store.
//! - [`paging`]: pages and cursors of list answers, and the bounds of a page.
//! - [`text`]: peer text on its way to a terminal, a log or the catalog: caps and escaping.
//! - [`handshake`]: version negotiation and the coordinator's checks of an agent's hello.
//! - [`snapshot`]: the snapshot lifecycle and the cleanup owed from each state.
//! - [`ownership`]: which coordinator owns a VM (claims, epochs, take-over) and which jobs it admits.
//! - [`units`]: sizes and rates as humans write them.

#![forbid(unsafe_code)]

pub mod block;
pub mod blockmap;
pub mod codec;
pub mod frame;
pub mod handshake;
pub mod ids;
pub mod messages;
pub mod ownership;
pub mod paging;
pub mod snapshot;
pub mod text;
pub mod transfer;
pub mod units;

pub use ids::{ClusterId, DiskId, HostId, JobId, RecoveryPointId, VmId};

/// ALPN of the authenticated protocol (agents and admin console).
pub const ALPN: &[u8] = b"bulwark/1";
/// ALPN of enrollment: the only protocol a client without a certificate may speak.
pub const ALPN_ENROLL: &[u8] = b"bulwark-enroll/1";
/// ALPN of a coordinator joining the deployment (`init --join`): like enrollment, before it
/// holds a certificate.
pub const ALPN_JOIN: &[u8] = b"bulwark-join/1";

/// The protocol version this build speaks natively.
/// 2: a backup's outcome says why its consistency is lower (`consistency_note`).
/// 3: item recoveries to a host carry `keep_modes` and report the entries they `skipped`.
/// 4: admin lists are paged; join tokens carry their scope (host, cluster, replace); a VM's
///    inventory id is its UUID; `vm list` shows identity and status; `vm forget`.
/// 5: `token list` is paged like every other list.
/// 6: a job's swap exclusion carries its witness (the blocks it was read from, with their ids);
///    policies leave disks out; `group set`; `job cancel`; a backup's outcome carries the VM's
///    definition and a restore request the recovery point's; the coordinator asks for an
///    inventory now (`InventoryNow` → `InventoryAnswer`).
/// 7: a job request says how many disks the agent sends at once (`parallel_disks`).
/// 8: policies say how recovery points are verified (`verify`); `rp list` carries each
///    point's verification.
/// 9: `Mount` (a recovery point's disk served for random reads), `ExportCert`; instant
///    recovery (`RecoverInstant`, a restore request's `instant`, `Export` transfer streams).
/// 10: VMs' ownership claims (an inventory's `owner`, a job's and a restore's `epoch`, `Claim`
///     both ways, `NotOwner` failures, `VmTakeOver`).
/// 11: several coordinators in one deployment: a welcome and an enrollment name the
///     deployment's coordinators (and `Coordinators` when one joins), an inventory the
///     coordinators alive for the agent (`partition`), groups protecting a whole cluster
///     (`auto_cluster`), join tokens for coordinators.
pub const PROTOCOL_VERSION: u16 = 11;
/// The oldest protocol version this build still accepts (2 encoded item recoveries without
/// their options and outcome; bincode has no optional fields, so a peer speaking it is
/// refused with both version ranges named rather than misread).
/// 3 differs from 4 in the admin messages and in what an inventory's ids mean; 4 from 5 in the
/// token list's request and answer; 5 from 6 in a job's disks and the policy; 6 from 7 in the
/// job request; 7 from 8 in the policy and the recovery-point list; 8 from 9 in the restore
/// request; 9 from 10 in the inventory, the job and restore requests; 10 from 11 in the
/// welcome, the inventory and the group messages.
pub const MIN_PROTOCOL_VERSION: u16 = 11;
