//! The snapshot actor: one per snapshot, it walks the VSS sequence with the backend and owns
//! the guarantee that thaw and release always happen — on error, when the freeze outlasts its
//! bound, when the coordinator stops renewing the lease, when the actor stops for any reason.
//! The sequence and what is owed from each state are `bulwark_protocol::snapshot`'s.

use crate::backend::{BackendError, Hypervisor, Quiesced};
use actix::prelude::*;
use bulwark_protocol::messages::{ChangeToken, Consistency};
use bulwark_protocol::snapshot::{Cleanup, SnapshotState};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a guest may stay frozen (VSS's own limit).
pub const FREEZE_BOUND: Duration = Duration::from_secs(10);

/// One snapshot of one VM.
pub struct SnapshotActor {
    backend: Arc<dyn Hypervisor>,
    vm: String,
    holder: String,
    state: SnapshotState,
    lease: Duration,
    lease_timer: Option<SpawnHandle>,
    freeze_bound: Duration,
    span: tracing::Span,
}

impl SnapshotActor {
    pub fn new(backend: Arc<dyn Hypervisor>, vm: &str, holder: &str, lease: Duration) -> Self {
        Self {
            backend,
            vm: vm.to_owned(),
            holder: holder.to_owned(),
            state: SnapshotState::Requested,
            lease,
            lease_timer: None,
            freeze_bound: FREEZE_BOUND,
            span: tracing::info_span!("snapshot", vm = %vm),
        }
    }

    /// A shorter freeze bound (tests).
    pub fn with_freeze_bound(mut self, bound: Duration) -> Self {
        self.freeze_bound = bound;
        self
    }

    fn step(&mut self, to: SnapshotState) {
        // Every step is one of the sequence: the state machine is the source of truth.
        match self.state.advance(to) {
            Ok(s) => self.state = s,
            Err(e) => tracing::error!(parent: &self.span, error = %e, "illegal snapshot transition"),
        }
    }

    /// Does what the current state still owes, then ends in `Released`.
    fn clean_up(&mut self, commit: Option<ChangeToken>) -> Result<(), BackendError> {
        let mut first_error = None;
        for c in self.state.owed() {
            let r = match c {
                Cleanup::Thaw => self.backend.thaw(&self.vm),
                Cleanup::Release => self.backend.release(&self.vm),
            };
            if let Err(e) = r {
                tracing::error!(parent: &self.span, cleanup = ?c, error = %e, "snapshot cleanup failed");
                first_error.get_or_insert(e);
            }
        }
        let holds = self.state.owed().contains(&Cleanup::Release);
        if holds {
            let r = match commit {
                Some(next) => self.backend.confirm(&self.vm, next).map(|_| ()),
                None => self.backend.abandon(&self.vm),
            };
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        self.state = SnapshotState::Released;
        first_error.map_or(Ok(()), Err)
    }

    fn arm_lease(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.lease_timer.take() {
            ctx.cancel_future(h);
        }
        self.lease_timer = Some(ctx.run_later(self.lease, |act, ctx| {
            tracing::warn!(parent: &act.span, "snapshot lease expired: releasing, changes kept for the next run");
            let _ = act.clean_up(None);
            ctx.stop();
        }));
    }
}

impl Actor for SnapshotActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        if self.state != SnapshotState::Released {
            let _ = self.clean_up(None);
        }
    }
}

/// The snapshot as taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub consistency: Consistency,
    /// Why the consistency is lower than the guest could give, when it is.
    pub note: Option<String>,
    pub token: ChangeToken,
    /// How long the guest was frozen.
    pub frozen_for: Duration,
}

/// Take the snapshot: prepare, freeze, snapshot point, thaw.
#[derive(Message)]
#[rtype(result = "Result<Taken, BackendError>")]
pub struct Take;

/// The coordinator still wants the snapshot.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Renew;

/// Done with the snapshot: release it; `commit` (the token the coordinator committed)
/// advances the change token, `None` keeps the changes for the next run.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Finish {
    pub commit: Option<ChangeToken>,
}

/// Where the snapshot is.
#[derive(Message)]
#[rtype(result = "SnapshotState")]
pub struct GetState;

impl Handler<Take> for SnapshotActor {
    type Result = Result<Taken, BackendError>;

    fn handle(&mut self, _: Take, ctx: &mut Context<Self>) -> Self::Result {
        let _g = self.span.clone().entered();
        if self.state != SnapshotState::Requested {
            return Err(BackendError::Failed(format!("snapshot already {:?}", self.state)));
        }
        self.step(SnapshotState::Preparing);
        let Quiesced { consistency, note } = match self.backend.freeze(&self.vm) {
            Ok(q) => q,
            Err(e) => {
                // Nothing is frozen or held yet.
                self.state = SnapshotState::Released;
                ctx.stop();
                return Err(e);
            }
        };
        let frozen_at = Instant::now();
        self.step(SnapshotState::Frozen);
        let token = match self.backend.take(&self.vm, &self.holder) {
            Ok(t) => t,
            Err(e) => {
                let _ = self.clean_up(None);
                ctx.stop();
                return Err(e);
            }
        };
        self.step(SnapshotState::Taken);
        let frozen_for = frozen_at.elapsed();
        if frozen_for > self.freeze_bound {
            let _ = self.clean_up(None);
            ctx.stop();
            return Err(BackendError::Failed(format!(
                "the guest stayed frozen {frozen_for:?}, over the {:?} bound: snapshot abandoned",
                self.freeze_bound
            )));
        }
        if let Err(e) = self.backend.thaw(&self.vm) {
            let _ = self.clean_up(None);
            ctx.stop();
            return Err(e);
        }
        self.step(SnapshotState::Thawed);
        self.arm_lease(ctx);
        tracing::info!(?consistency, note = note.as_deref().unwrap_or(""), ?frozen_for, "snapshot taken");
        Ok(Taken { consistency, note, token, frozen_for })
    }
}

impl Handler<Renew> for SnapshotActor {
    type Result = ();
    fn handle(&mut self, _: Renew, ctx: &mut Context<Self>) {
        if self.state != SnapshotState::Released {
            self.arm_lease(ctx);
        }
    }
}

impl Handler<Finish> for SnapshotActor {
    type Result = Result<(), String>;
    fn handle(&mut self, Finish { commit }: Finish, ctx: &mut Context<Self>) -> Self::Result {
        let r = self.clean_up(commit).map_err(|e| e.to_string());
        ctx.stop();
        r
    }
}

impl Handler<GetState> for SnapshotActor {
    type Result = MessageResult<GetState>;
    fn handle(&mut self, _: GetState, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.state)
    }
}
