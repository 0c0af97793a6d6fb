//! The processes of the deterministic simulation. The coordinator runs the real job code —
//! `jobs::machine::VmJob` for each job, `BlockReceiver` and `compare::Check` for its disk's
//! stream, `DiskIngest` into the real store, the real commit — and performs its effects in
//! memory instead of over QUIC; the agents run the real sim hypervisor and speak the real wire
//! messages (`JobRequest`, `JobDone`, transfer frames, `JobResult`). Each handler is a plain
//! function of its state, the simulated time and one message, and answers the messages it
//! sends; nothing here sleeps, spawns or reads a clock.

use bulwark_agent::agent_job::{AgentEffect, AgentJob, Snapshot};
use bulwark_agent::backend::{Hypervisor, SimBackend};
use bulwark_agent::sim::{SimError, Vm};
use bulwark_coordinator::catalog::RecoveryPointRecord;
use bulwark_coordinator::catalog::{Catalog, JobKind, JobRecord, JobState};
use bulwark_coordinator::config::DataDir;
use bulwark_coordinator::jobs::compare::{self, Check, CheckStep, RestoreDisk, RestoreStep};
use bulwark_coordinator::jobs::ingest::DiskIngest;
use bulwark_coordinator::jobs::machine::recovery::{Recovery, RecoverySetup};
use bulwark_coordinator::jobs::machine::{self, BlockReceiver, DiskDone, Effect, JobMachine, Received, Setup, VmJob};
use bulwark_coordinator::jobs::queue::{self, Admission, Limits, Next, Queue, Request};
use bulwark_coordinator::store::{Store, StoreConfig};
use bulwark_protocol::block::{ChunkHasher, Digest, ZERO};
use bulwark_protocol::blockmap::{self, PageStore, TreeRoot};
use bulwark_protocol::messages::{
    ChangeToken, Consistency, CoordinatorMessage, DiskInfo, FailureKind, JobKind as WireKind, JobOutcome, JobRequest,
    JobResult, RestoreRequest,
};
use bulwark_protocol::ownership::Owner;
use bulwark_protocol::transfer::{TransferFrame, TransferMessage, TransferMode};
use bulwark_protocol::{DiskId, JobId};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Every VM has one disk of this name.
pub const DISK: &str = "os";
/// The replicas' block size.
pub const BLOCK: u64 = 64 * 1024;
/// How long an agent holds a snapshot without the coordinator's verdict.
pub const LEASE_MS: u64 = 6_000;
/// How long the coordinator waits for word from the agent of a job.
pub const JOB_TIMEOUT_MS: u64 = 5_000;

/// The wire, as the simulation carries it: the control stream's messages and one transfer
/// stream per job (the simulation's VMs have one disk). Each lane of a connection keeps its
/// order, as a QUIC stream does; the two lanes do not keep order between them.
#[derive(Debug, Clone)]
pub enum Msg {
    /// Coordinator → agent on the control stream (a job request, a verdict).
    Control(CoordinatorMessage),
    /// Agent → coordinator on the control stream.
    Result(JobResult),
    /// Agent → coordinator: a job's transfer stream opens.
    Open { job: u64, disk: String, mode: TransferMode, blocks: u64, block_size: u32 },
    /// A frame on a job's transfer stream, either way.
    Frame { job: u64, frame: TransferFrame },
    /// Agent → coordinator on the control stream: the claim on a VM after a claim request or a
    /// job that claimed it or was refused for it.
    Claim { vm: String, owner: Option<Owner>, refused: Option<String> },
}

impl Msg {
    /// The lane the message travels on: 0 the control stream, 1 the transfer stream.
    pub fn lane(&self) -> usize {
        match self {
            Msg::Control(_) | Msg::Result(_) | Msg::Claim { .. } => 0,
            Msg::Open { .. } | Msg::Frame { .. } => 1,
        }
    }
}

/// A message to send, `after_ms` from now (blocks go out one after another).
#[derive(Debug)]
pub struct Out {
    pub after_ms: u64,
    pub msg: Msg,
}

/// A deliberately broken build, to show the simulation bites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Break {
    /// The real job (`VmJob`, `broken-builds` feature) commits as soon as the agent says
    /// everything is sent, without waiting for the disk still on its way.
    CommitEarly,
    /// The real queue (`broken-builds` feature) starts a VM's second job while its first runs.
    SecondJob,
    /// The real agent job (`broken-builds` feature) confirms its changes when it reports,
    /// before the coordinator's verdict.
    ConfirmEarly,
    /// The real restore (`broken-builds` feature) sends leaves out of order, one twice.
    RestoreOutOfOrder,
    /// The real item framing (`broken-builds` feature) sends each chunk of a file reversed.
    ItemsReversed,
    /// The real claims (`broken-builds` feature) admit every job, whoever owns its VM.
    IgnoreClaims,
}

/// The pages of an agent's snapshot tree, in memory.
#[derive(Debug, Clone, Default)]
struct MemPages(HashMap<Digest, Vec<u8>>);

impl PageStore for MemPages {
    type Error = std::io::Error;
    fn load_page(&self, id: &Digest) -> Result<Vec<u8>, std::io::Error> {
        self.0.get(id).cloned().ok_or_else(|| std::io::Error::other("no such page"))
    }
    fn save_page(&mut self, bytes: &[u8], _: Option<(&Digest, &[u8])>) -> Result<Digest, std::io::Error> {
        let id = *blake3::hash(bytes).as_bytes();
        self.0.insert(id, bytes.to_vec());
        Ok(id)
    }
}

fn host_name(h: usize) -> String {
    format!("node{}", h + 1)
}

/// Coordinator `c`'s name (its certificate identity, the owner its claims name).
pub fn coordinator_name(c: usize) -> String {
    format!("coord{}", c + 1)
}

/// A `Failed` frame on a job's stream.
fn failed(job: u64, why: &str) -> Msg {
    Msg::Frame { job, frame: TransferFrame::Message(TransferMessage::Failed { reason: why.to_owned() }) }
}

fn sim_err(e: SimError) -> String {
    e.to_string()
}

mod agent;
mod coordinator;

pub use agent::{Agent, AgentRestore, Held};
pub use coordinator::{Coordinator, RunningJob, RunningRecovery, StoreFailure};
