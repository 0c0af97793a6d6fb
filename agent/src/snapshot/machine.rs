//! The snapshot lifecycle of one job as a plain state machine (no actix, no threads, no
//! clock): fed what the job asks (take, renew, finish), what each hypervisor call answered and
//! the time, it says which hypervisor call to make next and what to answer — and when it next
//! wants to be woken. The VSS sequence and what is owed from each state are
//! `bulwark_protocol::snapshot`'s; this adds the two clocks:
//! - the **freeze bound**, armed when the freeze starts: if the guest is not running again by
//!   then, the take is answered with a failure at once (a hung QMP or guest-agent call cannot
//!   hold the job), and everything owed is undone as soon as the call in flight returns;
//! - the **lease**, armed once the snapshot is held: without a renewal in time the snapshot is
//!   released and its changes kept for the next run.
//!
//! At most one hypervisor call is in flight at a time; the driver runs it off its own thread
//! and feeds the answer back as [`Input::Done`].

use crate::backend::{BackendError, Quiesced};
use bulwark_protocol::messages::{ChangeToken, Consistency};
use bulwark_protocol::snapshot::{Cleanup, SnapshotState};
use std::time::{Duration, Instant};

/// A hypervisor call to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Freeze,
    Take,
    Thaw,
    Release,
    /// Advance the change token to the one the coordinator committed.
    Confirm(ChangeToken),
    /// Keep the changes for the next run.
    Abandon,
}

/// What a hypervisor call answered.
#[derive(Debug)]
pub enum Answer {
    Quiesced(Quiesced),
    Token(ChangeToken),
    Done,
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

/// What happened.
#[derive(Debug)]
pub enum Input {
    /// The job wants the snapshot.
    Take,
    /// The coordinator still wants the snapshot.
    Renew,
    /// The job is done with it; `commit`: the token the coordinator committed.
    Finish { commit: Option<ChangeToken> },
    /// The call in flight answered.
    Done(Result<Answer, BackendError>),
    /// A wake-up asked for by [`SnapshotMachine::next_wakeup`] (or any later moment).
    Tick,
}

/// What the driver must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Make this hypervisor call (off the driver's thread) and feed its answer back.
    Call(Call),
    /// Answer the job's [`Input::Take`].
    Taken(Result<Taken, String>),
    /// Answer the job's [`Input::Finish`] (the first cleanup error, if any).
    Finished(Result<(), String>),
    /// Nothing is frozen or held any more: the machine is done.
    Stop,
}

/// Why the snapshot is being undone.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// The job finished with it.
    Finish(Option<ChangeToken>),
    /// A step failed, or the freeze outlasted its bound; the take was already answered.
    Abort,
    /// The coordinator stopped renewing.
    LeaseExpired,
}

/// One snapshot of one VM, from request to release.
#[derive(Debug)]
pub struct SnapshotMachine {
    state: SnapshotState,
    lease: Duration,
    freeze_bound: Duration,
    /// The call being made, and whether it is part of the cleanup.
    in_flight: Option<(Call, bool)>,
    take_asked: bool,
    take_answered: bool,
    /// The take was answered with a snapshot: only then may a finish confirm a token.
    taken: bool,
    finish_asked: bool,
    finish_answered: bool,
    quiesced: Option<Quiesced>,
    token: Option<ChangeToken>,
    frozen_at: Option<Instant>,
    freeze_deadline: Option<Instant>,
    lease_until: Option<Instant>,
    /// Once set, the owed cleanup runs (after the call in flight) and nothing else.
    ending: Option<Ending>,
    /// The cleanup calls still to make, last first.
    cleanup: Vec<Call>,
    cleanup_started: bool,
    /// Why the take failed, answered once the undoing is done.
    take_error: Option<String>,
    first_error: Option<String>,
    stopped: bool,
}

impl SnapshotMachine {
    pub fn new(lease: Duration, freeze_bound: Duration) -> Self {
        Self {
            state: SnapshotState::Requested,
            lease,
            freeze_bound,
            in_flight: None,
            take_asked: false,
            take_answered: false,
            taken: false,
            finish_asked: false,
            finish_answered: false,
            quiesced: None,
            token: None,
            frozen_at: None,
            freeze_deadline: None,
            lease_until: None,
            ending: None,
            cleanup: vec![],
            cleanup_started: false,
            take_error: None,
            first_error: None,
            stopped: false,
        }
    }

    pub fn state(&self) -> SnapshotState {
        self.state
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// True once nothing is frozen or held and nothing is in flight.
    pub fn is_done(&self) -> bool {
        self.stopped
    }

    /// What is still owed if the driver must stop before the machine is done (shutdown): the
    /// calls to make, in order, without waiting for the one in flight.
    pub fn owed_now(&self) -> Vec<Call> {
        let mut calls: Vec<Call> = self.cleanup.iter().rev().copied().collect();
        if !self.cleanup_started {
            calls = self.undo_calls();
        }
        calls
    }

    /// When the machine wants an [`Input::Tick`]: the freeze bound while the guest is (being)
    /// frozen, the lease while the snapshot is held.
    pub fn next_wakeup(&self) -> Option<Instant> {
        if self.ending.is_some() {
            return None;
        }
        match self.state {
            SnapshotState::Preparing | SnapshotState::Frozen | SnapshotState::Taken => self.freeze_deadline,
            SnapshotState::Thawed | SnapshotState::Reading => self.lease_until,
            SnapshotState::Requested | SnapshotState::Released => None,
        }
    }

    /// Feeds one input at `now`; answers the effects, in order.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        let mut out = vec![];
        if self.stopped {
            match input {
                Input::Take => out.push(Effect::Taken(Err("the snapshot was already released".into()))),
                Input::Finish { .. } => out.push(Effect::Finished(Ok(()))),
                Input::Renew | Input::Tick | Input::Done(_) => {}
            }
            return out;
        }
        match input {
            Input::Take => self.take(now, &mut out),
            Input::Renew => {
                if matches!(self.state, SnapshotState::Thawed | SnapshotState::Reading) && self.ending.is_none() {
                    self.lease_until = Some(now + self.lease);
                }
            }
            Input::Finish { commit } => {
                if self.finish_asked {
                    out.push(Effect::Finished(Err("the snapshot was already finished".into())));
                    return out;
                }
                self.finish_asked = true;
                self.answer_take(Err("the job finished before the snapshot was taken".into()), &mut out);
                if self.ending.is_none() {
                    self.ending = Some(Ending::Finish(commit.filter(|_| self.taken)));
                }
                self.proceed(&mut out);
            }
            Input::Done(answer) => self.done(answer, now, &mut out),
            Input::Tick => self.tick(now, &mut out),
        }
        out
    }

    fn take(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if self.take_asked || self.state != SnapshotState::Requested || self.ending.is_some() {
            out.push(Effect::Taken(Err(format!("snapshot already {:?}", self.state))));
            return;
        }
        self.take_asked = true;
        self.step(SnapshotState::Preparing);
        self.freeze_deadline = Some(now + self.freeze_bound);
        self.call(Call::Freeze, false, out);
    }

    fn done(&mut self, answer: Result<Answer, BackendError>, now: Instant, out: &mut Vec<Effect>) {
        let Some((call, is_cleanup)) = self.in_flight.take() else {
            // An answer nobody asked for: the driver's bug, not the hypervisor's.
            debug_assert!(false, "an answer with no call in flight");
            return;
        };
        if is_cleanup {
            if let Err(e) = answer {
                self.first_error.get_or_insert(format!("{call:?}: {e}"));
            }
            self.proceed(out);
            return;
        }
        if self.ending.is_some() {
            // The snapshot is being undone: what this call did joins what is owed.
            self.absorb(call, answer);
            self.proceed(out);
            return;
        }
        match (call, answer) {
            (Call::Freeze, Ok(Answer::Quiesced(q))) => {
                self.step(SnapshotState::Frozen);
                self.frozen_at = Some(now);
                self.quiesced = Some(q);
                self.call(Call::Take, false, out);
            }
            (Call::Freeze, Err(e)) => {
                // Nothing is frozen or held.
                self.state = SnapshotState::Released;
                self.fail(e.to_string(), out);
            }
            (Call::Take, Ok(Answer::Token(t))) => {
                self.step(SnapshotState::Taken);
                self.token = Some(t);
                self.call(Call::Thaw, false, out);
            }
            (Call::Thaw, Ok(Answer::Done)) => {
                self.step(SnapshotState::Thawed);
                self.freeze_deadline = None;
                self.lease_until = Some(now + self.lease);
                let frozen_for = self.frozen_at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
                match (self.quiesced.take(), self.token) {
                    (Some(Quiesced { consistency, note }), Some(token)) => {
                        self.taken = true;
                        self.answer_take(Ok(Taken { consistency, note, token, frozen_for }), out);
                    }
                    // Thawed with no quiesce or token on record: our own bug; undo it.
                    _ => self.fail("the snapshot sequence lost its token".into(), out),
                }
            }
            (_, Err(e)) => self.fail(e.to_string(), out),
            (c, Ok(a)) => self.fail(format!("the hypervisor's {c:?} call answered {a:?}"), out),
        }
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if self.ending.is_some() {
            return;
        }
        match self.state {
            SnapshotState::Preparing | SnapshotState::Frozen | SnapshotState::Taken
                if self.freeze_deadline.is_some_and(|d| now >= d) =>
            {
                // Answered now, not when the hung call returns: the job must not wait on it.
                let call = self.in_flight.map_or(Call::Freeze, |(c, _)| c);
                self.answer_now(
                    format!(
                        "the guest stayed frozen over the {:?} freeze bound (the hypervisor's {call:?} call had not \
                         finished): snapshot abandoned",
                        self.freeze_bound
                    ),
                    out,
                );
            }
            SnapshotState::Thawed | SnapshotState::Reading if self.lease_until.is_some_and(|d| now >= d) => {
                self.ending = Some(Ending::LeaseExpired);
                self.proceed(out);
            }
            _ => {}
        }
    }

    /// A step failed: undo what is owed, then answer the take with `reason`.
    fn fail(&mut self, reason: String, out: &mut Vec<Effect>) {
        self.take_error.get_or_insert(reason);
        if self.ending.is_none() {
            self.ending = Some(Ending::Abort);
        }
        self.proceed(out);
    }

    /// Like [`Self::fail`], but the take is answered at once.
    fn answer_now(&mut self, reason: String, out: &mut Vec<Effect>) {
        self.answer_take(Err(reason.clone()), out);
        self.fail(reason, out);
    }

    /// Counts what a forward call that returned during an ending did.
    fn absorb(&mut self, call: Call, answer: Result<Answer, BackendError>) {
        match (call, answer) {
            (Call::Freeze, Ok(_)) => self.step(SnapshotState::Frozen),
            // A failed freeze froze nothing.
            (Call::Freeze, Err(_)) => self.state = SnapshotState::Released,
            (Call::Take, Ok(Answer::Token(t))) => {
                self.step(SnapshotState::Taken);
                self.token = Some(t);
            }
            (Call::Thaw, Ok(_)) => self.step(SnapshotState::Thawed),
            // A take that failed holds nothing; a thaw that failed is tried again.
            _ => {}
        }
    }

    /// The calls that undo the current state.
    fn undo_calls(&self) -> Vec<Call> {
        let owed = self.state.owed();
        let mut calls: Vec<Call> = owed
            .iter()
            .map(|c| match c {
                Cleanup::Thaw => Call::Thaw,
                Cleanup::Release => Call::Release,
            })
            .collect();
        if owed.contains(&Cleanup::Release) {
            calls.push(match self.ending {
                Some(Ending::Finish(Some(next))) => Call::Confirm(next),
                _ => Call::Abandon,
            });
        }
        calls
    }

    /// While ending: starts the cleanup once nothing is in flight, makes its next call, and
    /// when all is done answers and stops.
    fn proceed(&mut self, out: &mut Vec<Effect>) {
        if self.ending.is_none() || self.in_flight.is_some() {
            return;
        }
        if !self.cleanup_started {
            self.cleanup_started = true;
            self.cleanup = self.undo_calls();
            self.cleanup.reverse();
        }
        if let Some(next) = self.cleanup.pop() {
            self.call(next, true, out);
            return;
        }
        self.state = SnapshotState::Released;
        let reason = self.take_error.take().unwrap_or_else(|| "the snapshot was released".into());
        self.answer_take(Err(reason), out);
        if self.finish_asked && !self.finish_answered {
            self.finish_answered = true;
            out.push(Effect::Finished(self.first_error.clone().map_or(Ok(()), Err)));
        }
        self.stopped = true;
        out.push(Effect::Stop);
    }

    fn call(&mut self, c: Call, cleanup: bool, out: &mut Vec<Effect>) {
        assert!(self.in_flight.is_none(), "one hypervisor call at a time");
        self.in_flight = Some((c, cleanup));
        out.push(Effect::Call(c));
    }

    fn answer_take(&mut self, r: Result<Taken, String>, out: &mut Vec<Effect>) {
        if self.take_asked && !self.take_answered {
            self.take_answered = true;
            out.push(Effect::Taken(r));
        }
    }

    fn step(&mut self, to: SnapshotState) {
        // Every step is one of the sequence: a skipped one would leave something owed undone.
        let next = self.state.advance(to);
        assert!(next.is_ok(), "snapshot machine: {next:?}");
        if let Ok(s) = next {
            self.state = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEASE: Duration = Duration::from_secs(60);
    const BOUND: Duration = Duration::from_secs(10);

    fn token(sequence: u64) -> ChangeToken {
        ChangeToken { generation: 1, sequence }
    }

    fn quiesced() -> Answer {
        Answer::Quiesced(Quiesced { consistency: Consistency::App, note: None })
    }

    fn failed(why: &str) -> Result<Answer, BackendError> {
        Err(BackendError::Failed(why.into()))
    }

    /// A machine driven up to a held, thawed snapshot; answers it and the time.
    fn held() -> (SnapshotMachine, Instant) {
        let t0 = Instant::now();
        let mut m = SnapshotMachine::new(LEASE, BOUND);
        assert_eq!(m.handle(Input::Take, t0), [Effect::Call(Call::Freeze)]);
        assert_eq!(m.next_wakeup(), Some(t0 + BOUND), "the freeze bound is armed when the freeze starts");
        assert_eq!(m.handle(Input::Done(Ok(quiesced())), t0), [Effect::Call(Call::Take)]);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Token(token(4)))), t0), [Effect::Call(Call::Thaw)]);
        let t1 = t0 + Duration::from_secs(1);
        let out = m.handle(Input::Done(Ok(Answer::Done)), t1);
        let [Effect::Taken(Ok(taken))] = out.as_slice() else { panic!("{out:?}") };
        assert_eq!((taken.token, taken.frozen_for), (token(4), Duration::from_secs(1)));
        assert_eq!(m.state(), SnapshotState::Thawed);
        assert_eq!(m.next_wakeup(), Some(t1 + LEASE), "the lease is armed once the snapshot is held");
        (m, t1)
    }

    #[test]
    fn a_committed_snapshot_is_released_then_confirmed() {
        let (mut m, t) = held();
        assert_eq!(m.handle(Input::Finish { commit: Some(token(5)) }, t), [Effect::Call(Call::Release)]);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t), [Effect::Call(Call::Confirm(token(5)))]);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t), [Effect::Finished(Ok(())), Effect::Stop]);
        assert!(m.is_done());
        assert_eq!(m.state(), SnapshotState::Released);
        // Anything after the end is answered without a hypervisor call.
        assert_eq!(m.handle(Input::Take, t), [Effect::Taken(Err("the snapshot was already released".into()))]);
        assert_eq!(m.handle(Input::Finish { commit: None }, t), [Effect::Finished(Ok(()))]);
        assert!(m.handle(Input::Tick, t + LEASE * 2).is_empty());
    }

    #[test]
    fn an_uncommitted_snapshot_is_released_and_its_changes_kept() {
        let (mut m, t) = held();
        assert_eq!(m.handle(Input::Finish { commit: None }, t), [Effect::Call(Call::Release)]);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t), [Effect::Call(Call::Abandon)]);
        // A cleanup call that fails does not stop the others; the finish reports it.
        let out = m.handle(Input::Done(failed("disk gone")), t);
        assert!(
            matches!(out.as_slice(), [Effect::Finished(Err(e)), Effect::Stop] if e.contains("disk gone")),
            "{out:?}"
        );
    }

    #[test]
    fn the_lease_releases_a_snapshot_nobody_renews_and_renewal_moves_it() {
        let (mut m, t) = held();
        assert!(m.handle(Input::Tick, t + LEASE / 2).is_empty(), "early ticks change nothing");
        assert!(m.handle(Input::Renew, t + LEASE / 2).is_empty());
        assert_eq!(m.next_wakeup(), Some(t + LEASE / 2 + LEASE));
        assert!(m.handle(Input::Tick, t + LEASE).is_empty(), "renewed: not yet");
        assert_eq!(m.handle(Input::Tick, t + LEASE * 2), [Effect::Call(Call::Release)]);
        assert_eq!(m.next_wakeup(), None);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t), [Effect::Call(Call::Abandon)]);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t), [Effect::Stop]);
        // The job's finish after that is answered plainly.
        assert_eq!(m.handle(Input::Finish { commit: Some(token(5)) }, t), [Effect::Finished(Ok(()))]);
    }

    #[test]
    fn a_failed_step_undoes_what_it_owes_before_answering() {
        let t = Instant::now();
        // Freeze refused: nothing to undo.
        let mut m = SnapshotMachine::new(LEASE, BOUND);
        m.handle(Input::Take, t);
        let out = m.handle(Input::Done(failed("resynchronizing")), t);
        assert!(matches!(out.as_slice(), [Effect::Taken(Err(e)), Effect::Stop] if e.contains("resynchronizing")));
        // Snapshot point refused: thawed, then answered.
        let mut m = SnapshotMachine::new(LEASE, BOUND);
        m.handle(Input::Take, t);
        m.handle(Input::Done(Ok(quiesced())), t);
        assert_eq!(m.handle(Input::Done(failed("no space")), t), [Effect::Call(Call::Thaw)]);
        let out = m.handle(Input::Done(Ok(Answer::Done)), t);
        assert!(matches!(out.as_slice(), [Effect::Taken(Err(e)), Effect::Stop] if e.contains("no space")), "{out:?}");
        // Thaw failed: tried again, then the snapshot dropped and its changes kept.
        let mut m = SnapshotMachine::new(LEASE, BOUND);
        m.handle(Input::Take, t);
        m.handle(Input::Done(Ok(quiesced())), t);
        m.handle(Input::Done(Ok(Answer::Token(token(1)))), t);
        assert_eq!(m.handle(Input::Done(failed("qga")), t), [Effect::Call(Call::Thaw)]);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t), [Effect::Call(Call::Release)]);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t), [Effect::Call(Call::Abandon)]);
        let out = m.handle(Input::Done(Ok(Answer::Done)), t);
        assert!(matches!(out.as_slice(), [Effect::Taken(Err(e)), Effect::Stop] if e.contains("qga")), "{out:?}");
    }

    #[test]
    fn a_hung_call_is_answered_at_the_freeze_bound_and_undone_when_it_returns() {
        let t = Instant::now();
        // The freeze never returns in time.
        let mut m = SnapshotMachine::new(LEASE, BOUND);
        m.handle(Input::Take, t);
        assert!(m.handle(Input::Tick, t + BOUND / 2).is_empty());
        let out = m.handle(Input::Tick, t + BOUND);
        assert!(
            matches!(out.as_slice(), [Effect::Taken(Err(e))] if e.contains("freeze bound") && e.contains("Freeze")),
            "answered at once, with no call while one is in flight: {out:?}"
        );
        assert_eq!(m.next_wakeup(), None);
        // When it finally froze the guest, the guest is thawed.
        assert_eq!(m.handle(Input::Done(Ok(quiesced())), t + BOUND * 3), [Effect::Call(Call::Thaw)]);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t + BOUND * 3), [Effect::Stop]);

        // The snapshot point hangs; when it returns it is dropped with its changes kept.
        let mut m = SnapshotMachine::new(LEASE, BOUND);
        m.handle(Input::Take, t);
        m.handle(Input::Done(Ok(quiesced())), t);
        let out = m.handle(Input::Tick, t + BOUND);
        assert!(matches!(out.as_slice(), [Effect::Taken(Err(e))] if e.contains("Take")), "{out:?}");
        // The job gives up meanwhile: its finish waits for the undoing.
        assert!(m.handle(Input::Finish { commit: Some(token(9)) }, t + BOUND).is_empty());
        assert_eq!(m.handle(Input::Done(Ok(Answer::Token(token(2)))), t), [Effect::Call(Call::Thaw)]);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t), [Effect::Call(Call::Release)]);
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t), [Effect::Call(Call::Abandon)], "never confirmed");
        assert_eq!(m.handle(Input::Done(Ok(Answer::Done)), t), [Effect::Finished(Ok(())), Effect::Stop]);

        // A freeze that hangs and then fails leaves nothing to undo.
        let mut m = SnapshotMachine::new(LEASE, BOUND);
        m.handle(Input::Take, t);
        m.handle(Input::Tick, t + BOUND);
        assert_eq!(m.handle(Input::Done(failed("QMP timeout")), t), [Effect::Stop]);
    }

    #[test]
    fn a_finish_before_any_take_and_a_second_take_touch_nothing() {
        let t = Instant::now();
        let mut m = SnapshotMachine::new(LEASE, BOUND);
        assert_eq!(m.handle(Input::Finish { commit: Some(token(3)) }, t), [Effect::Finished(Ok(())), Effect::Stop]);
        let (mut m, t) = held();
        let out = m.handle(Input::Take, t);
        assert!(matches!(out.as_slice(), [Effect::Taken(Err(_))]), "{out:?}");
        assert_eq!(m.state(), SnapshotState::Thawed, "the held snapshot is untouched");
    }

    /// The machine with a hypervisor that does what its calls say.
    struct Sim {
        m: SnapshotMachine,
        frozen: bool,
        held: bool,
        in_flight: Option<Call>,
        takes: usize,
        stopped: bool,
    }

    impl Sim {
        fn feed(&mut self, input: Input, now: Instant) -> Result<(), TestCaseError> {
            for e in self.m.handle(input, now) {
                match e {
                    Effect::Call(c) => {
                        prop_assert!(!self.stopped, "a call after the end");
                        prop_assert!(self.in_flight.is_none(), "two calls at once");
                        self.in_flight = Some(c);
                    }
                    Effect::Taken(_) => self.takes += 1,
                    Effect::Finished(_) => {}
                    Effect::Stop => self.stopped = true,
                }
            }
            Ok(())
        }

        /// Answers the calls in flight until none is; `fail`: a freeze or take fails.
        fn answer(&mut self, fail: bool, now: Instant) -> Result<(), TestCaseError> {
            while let Some(call) = self.in_flight.take() {
                let answer = match call {
                    Call::Freeze | Call::Take if fail => failed("refused"),
                    Call::Freeze => {
                        self.frozen = true;
                        Ok(quiesced())
                    }
                    Call::Take => {
                        self.held = true;
                        Ok(Answer::Token(token(1)))
                    }
                    Call::Thaw => {
                        self.frozen = false;
                        Ok(Answer::Done)
                    }
                    Call::Release => {
                        self.held = false;
                        Ok(Answer::Done)
                    }
                    Call::Confirm(_) | Call::Abandon => Ok(Answer::Done),
                };
                self.feed(Input::Done(answer), now)?;
            }
            Ok(())
        }
    }

    proptest! {
        /// Whatever the job asks, whenever ticks come, whichever freeze or take fails and
        /// whichever call hangs across steps (past the bound or the lease): one call at a
        /// time, the take answered exactly once, and at the end nothing frozen, nothing held.
        #[test]
        fn every_path_ends_with_nothing_frozen_or_held(
            steps in proptest::collection::vec((0u8..4, any::<bool>(), 0u64..40), 1..40)
        ) {
            let mut now = Instant::now();
            let mut sim = Sim {
                m: SnapshotMachine::new(LEASE, BOUND),
                frozen: false,
                held: false,
                in_flight: None,
                takes: 0,
                stopped: false,
            };
            sim.feed(Input::Take, now)?;
            for (kind, ok, secs) in steps {
                now += Duration::from_secs(secs);
                let input = match kind {
                    0 | 1 => Input::Tick,
                    2 => Input::Renew,
                    _ => Input::Finish { commit: ok.then_some(token(7)) },
                };
                sim.feed(input, now)?;
                if kind == 0 && !ok {
                    continue; // the call in flight hangs through this step
                }
                sim.answer(kind == 1 && !ok, now)?;
            }
            // The job always finishes in the end, and the hypervisor answers.
            sim.answer(false, now)?;
            sim.feed(Input::Finish { commit: None }, now)?;
            sim.answer(false, now)?;
            prop_assert_eq!(sim.takes, 1, "the take is answered exactly once");
            prop_assert!(sim.stopped && sim.m.is_done());
            prop_assert!(!sim.frozen && !sim.held, "frozen {} held {}", sim.frozen, sim.held);
        }
    }
}
