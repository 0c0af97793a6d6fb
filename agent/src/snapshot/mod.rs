//! The snapshot actor: one per snapshot, the thin driver of a [`SnapshotMachine`]. It feeds the
//! machine the job's requests, the answers of hypervisor calls and the time, runs each call the
//! machine asks for on a blocking thread — so a hypervisor that hangs (a QMP socket that never
//! answers, a guest agent stuck in a freeze) stalls neither this agent's heartbeats nor its
//! other jobs — and arms one timer at the machine's next wake-up (the freeze bound, the lease).
//! The guarantee that thaw and release always happen is the machine's; when the actor is
//! stopped from outside before the machine is done, what is still owed is done right there.

pub mod machine;

use crate::backend::{BackendError, Hypervisor};
use actix::prelude::*;
use bulwark_protocol::messages::ChangeToken;
use bulwark_protocol::snapshot::SnapshotState;
pub use machine::Taken;
use machine::{Answer, Call, Effect, Input, SnapshotMachine};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The longest a guest may stay frozen (VSS's own limit).
pub const FREEZE_BOUND: Duration = Duration::from_secs(10);

/// One snapshot of one VM.
pub struct SnapshotActor {
    backend: Arc<dyn Hypervisor>,
    vm: String,
    holder: String,
    machine: SnapshotMachine,
    timer: Option<SpawnHandle>,
    take_reply: Option<oneshot::Sender<Result<Taken, BackendError>>>,
    finish_reply: Option<oneshot::Sender<Result<(), String>>>,
    span: tracing::Span,
}

impl SnapshotActor {
    pub fn new(backend: Arc<dyn Hypervisor>, vm: &str, holder: &str, lease: Duration) -> Self {
        Self {
            backend,
            vm: vm.to_owned(),
            holder: holder.to_owned(),
            machine: SnapshotMachine::new(lease, FREEZE_BOUND),
            timer: None,
            take_reply: None,
            finish_reply: None,
            span: tracing::info_span!("snapshot", vm = %vm),
        }
    }

    /// A shorter freeze bound (tests).
    pub fn with_freeze_bound(mut self, bound: Duration) -> Self {
        self.machine = SnapshotMachine::new(self.machine.lease(), bound);
        self
    }

    /// Feeds the machine and performs what it answers.
    fn feed(&mut self, input: Input, ctx: &mut Context<Self>) {
        for effect in self.machine.handle(input, Instant::now()) {
            match effect {
                Effect::Call(call) => self.run_call(call, ctx),
                Effect::Taken(r) => {
                    match &r {
                        Ok(t) => tracing::info!(
                            parent: &self.span,
                            consistency = ?t.consistency,
                            note = t.note.as_deref().unwrap_or(""),
                            frozen_for = ?t.frozen_for,
                            "snapshot taken"
                        ),
                        Err(e) => tracing::warn!(parent: &self.span, error = %e, "snapshot not taken"),
                    }
                    if let Some(tx) = self.take_reply.take() {
                        let _ = tx.send(r.map_err(BackendError::Failed));
                    }
                }
                Effect::Finished(r) => {
                    if let Some(tx) = self.finish_reply.take() {
                        let _ = tx.send(r);
                    }
                }
                Effect::Stop => ctx.stop(),
            }
        }
        self.arm_timer(ctx);
    }

    /// Runs a hypervisor call on a blocking thread; its answer comes back as an input.
    fn run_call(&mut self, call: Call, ctx: &mut Context<Self>) {
        let (backend, vm, holder) = (self.backend.clone(), self.vm.clone(), self.holder.clone());
        let span = self.span.clone();
        let work = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            perform(backend.as_ref(), &vm, &holder, call)
        });
        ctx.spawn(actix::fut::wrap_future::<_, Self>(work).map(move |joined, act, ctx| {
            let answer = joined.unwrap_or_else(|e| Err(BackendError::Failed(format!("{call:?} call failed: {e}"))));
            if let Err(e) = &answer {
                tracing::warn!(parent: &act.span, ?call, error = %e, "hypervisor call failed");
            }
            act.feed(Input::Done(answer), ctx);
        }));
    }

    fn arm_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
        if let Some(at) = self.machine.next_wakeup() {
            let after = at.saturating_duration_since(Instant::now());
            self.timer = Some(ctx.run_later(after, |act, ctx| {
                act.timer = None;
                act.feed(Input::Tick, ctx);
            }));
        }
    }
}

/// One hypervisor call, on the calling (blocking) thread.
fn perform(backend: &dyn Hypervisor, vm: &str, holder: &str, call: Call) -> Result<Answer, BackendError> {
    match call {
        Call::Freeze => backend.freeze(vm).map(Answer::Quiesced),
        Call::Take => backend.take(vm, holder).map(Answer::Token),
        Call::Thaw => backend.thaw(vm).map(|_| Answer::Done),
        Call::Release => backend.release(vm).map(|_| Answer::Done),
        Call::Confirm(next) => backend.confirm(vm, next).map(|_| Answer::Done),
        Call::Abandon => backend.abandon(vm).map(|_| Answer::Done),
    }
}

impl Actor for SnapshotActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        if self.machine.is_done() {
            return;
        }
        // Stopped from outside (shutdown) with something owed: do it now, here.
        for call in self.machine.owed_now() {
            if let Err(e) = perform(self.backend.as_ref(), &self.vm, &self.holder, call) {
                tracing::error!(parent: &self.span, ?call, error = %e, "snapshot cleanup failed");
            }
        }
    }
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
    type Result = ResponseFuture<Result<Taken, BackendError>>;

    fn handle(&mut self, _: Take, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.take_reply = Some(tx);
        self.feed(Input::Take, ctx);
        Box::pin(
            async move { rx.await.unwrap_or_else(|_| Err(BackendError::Failed("the snapshot actor stopped".into()))) },
        )
    }
}

impl Handler<Renew> for SnapshotActor {
    type Result = ();
    fn handle(&mut self, _: Renew, ctx: &mut Context<Self>) {
        self.feed(Input::Renew, ctx);
    }
}

impl Handler<Finish> for SnapshotActor {
    type Result = ResponseFuture<Result<(), String>>;
    fn handle(&mut self, Finish { commit }: Finish, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.finish_reply = Some(tx);
        self.feed(Input::Finish { commit }, ctx);
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err("the snapshot actor stopped".into())) })
    }
}

impl Handler<GetState> for SnapshotActor {
    type Result = MessageResult<GetState>;
    fn handle(&mut self, _: GetState, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.machine.state())
    }
}
