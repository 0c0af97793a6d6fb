//! Every input of the queue in every state a job can be in (waiting, held for its host,
//! waiting for a retry, running, gone), and a property test over random event sequences.

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const S: Millis = 1000;

fn req(vm: &str, kind: JobKind, host: &str) -> Request {
    Request { vm: vm.into(), kind, automatic: false, recovery: false, host: Some(host.into()) }
}

fn auto(vm: &str, kind: JobKind, host: &str) -> Request {
    Request { automatic: true, ..req(vm, kind, host) }
}

fn queue(max_running: usize, per_agent: usize) -> Queue {
    let mut q = Queue::new(Limits { max_running, per_agent }, 0);
    q.host_connected("h1", 0);
    q.host_connected("h2", 0);
    q
}

fn start(q: &mut Queue, now: Millis) -> Option<u64> {
    match q.next_to_start(now)? {
        Next::Start { job, .. } => Some(job),
        other => panic!("expected a start, got {other:?}"),
    }
}

fn starts(q: &mut Queue, now: Millis) -> Vec<u64> {
    std::iter::from_fn(|| start(q, now)).collect()
}

const OK: Outcome = Outcome::Succeeded { ran_as: JobKind::Sync };
const TRANSIENT: Outcome = Outcome::Failed { ran_as: JobKind::Sync, transient: true };
const FINAL: Outcome = Outcome::Failed { ran_as: JobKind::Sync, transient: false };

#[test]
fn asking_twice_for_a_waiting_kind_gives_the_same_job_but_recoveries_are_each_their_own() {
    let mut q = queue(8, 2);
    assert_eq!(q.enqueue(1, req("a", JobKind::Sync, "h1"), 0), Ok(Admission::New));
    assert_eq!(q.enqueue(2, req("a", JobKind::Sync, "h1"), 0), Ok(Admission::Same(1)));
    assert_eq!(q.enqueue(2, auto("a", JobKind::Sync, "h1"), 0), Ok(Admission::Same(1)));
    assert_eq!(q.enqueue(2, req("a", JobKind::ExpressFull, "h1"), 0), Ok(Admission::New));
    assert_eq!(q.enqueue(3, req("b", JobKind::Sync, "h1"), 0), Ok(Admission::New));
    let recovery = Request { recovery: true, ..req("a", JobKind::Recovery, "h1") };
    assert_eq!(q.enqueue(4, recovery.clone(), 0), Ok(Admission::New));
    assert_eq!(q.enqueue(5, recovery, 0), Ok(Admission::New));
    assert_eq!(q.counts(), (5, 0));
    assert!(q.has_job("a", Some(JobKind::Recovery)) && q.has_job("b", None) && !q.has_job("c", None));
}

#[test]
fn an_automatic_job_is_refused_while_its_kind_runs_and_a_manual_one_waits_for_it() {
    let mut q = queue(8, 2);
    q.enqueue(1, req("a", JobKind::Sync, "h1"), 0).unwrap();
    assert_eq!(start(&mut q, 0), Some(1));
    assert_eq!(q.admit(&auto("a", JobKind::Sync, "h1"), 0), Err(Refusal::AlreadyRunning));
    assert_eq!(q.enqueue(2, req("a", JobKind::Sync, "h1"), 0), Ok(Admission::New), "asked by hand: it waits");
    assert_eq!(start(&mut q, 0), None, "one job per VM at a time");
    assert_eq!(q.finished(1, OK, S), Some(AfterFinish::Done));
    assert_eq!(start(&mut q, S), Some(2));
}

#[test]
fn automatic_jobs_back_off_after_failures_until_one_succeeds() {
    let mut q = queue(8, 2);
    let mut now = 0;
    for (n, backoff) in [(1, 20), (2, 40), (3, 80), (4, 160), (5, 320), (6, 320)] {
        q.enqueue(n, auto("a", JobKind::Sync, "h1"), now).unwrap();
        assert_eq!(start(&mut q, now), Some(n));
        assert_eq!(q.finished(n, FINAL, now), Some(AfterFinish::Done));
        let refused = q.admit(&auto("a", JobKind::Sync, "h1"), now + backoff * S - 1);
        assert_eq!(
            refused.map_err(|e| e.to_string()),
            Err("sync of a is backing off after failures".into()),
            "failure {n}"
        );
        assert_eq!(q.admit(&req("a", JobKind::Sync, "h1"), now), Ok(Admission::New), "a manual job is not refused");
        assert_eq!(q.admit(&auto("a", JobKind::Initial, "h1"), now), Ok(Admission::New), "other kinds are not");
        now += backoff * S;
        assert_eq!(q.admit(&auto("a", JobKind::Sync, "h1"), now), Ok(Admission::New), "failure {n}");
    }
    q.enqueue(7, req("a", JobKind::Sync, "h1"), now).unwrap();
    start(&mut q, now);
    q.finished(7, OK, now);
    q.enqueue(8, req("a", JobKind::Sync, "h1"), now).unwrap();
    start(&mut q, now);
    q.finished(8, FINAL, now);
    assert!(q.admit(&auto("a", JobKind::Sync, "h1"), now + 20 * S - 1).is_err());
    assert_eq!(q.admit(&auto("a", JobKind::Sync, "h1"), now + 20 * S), Ok(Admission::New), "a success reset it");
}

#[test]
fn the_backoff_follows_the_kind_the_job_ran_as() {
    let mut q = queue(8, 2);
    q.enqueue(1, auto("a", JobKind::Sync, "h1"), 0).unwrap();
    start(&mut q, 0);
    q.finished(1, Outcome::Failed { ran_as: JobKind::Initial, transient: false }, 0);
    assert!(q.admit(&auto("a", JobKind::Initial, "h1"), 0).is_err());
    assert_eq!(q.admit(&auto("a", JobKind::Sync, "h1"), 0), Ok(Admission::New));
}

#[test]
fn jobs_start_in_queue_order_within_max_running() {
    let mut q = queue(3, 8);
    for id in 1..=5 {
        q.enqueue(id, req(&format!("vm{id}"), JobKind::Sync, if id % 2 == 0 { "h1" } else { "h2" }), 0).unwrap();
    }
    assert_eq!(starts(&mut q, 0), vec![1, 2, 3]);
    assert_eq!(q.counts(), (2, 3));
    q.finished(2, OK, S);
    assert_eq!(starts(&mut q, S), vec![4]);
}

#[test]
fn a_host_runs_at_most_per_agent_jobs_and_others_pass_it() {
    let mut q = queue(8, 2);
    for (id, host) in [(1, "h1"), (2, "h1"), (3, "h1"), (4, "h2")] {
        q.enqueue(id, req(&format!("vm{id}"), JobKind::Sync, host), 0).unwrap();
    }
    assert_eq!(starts(&mut q, 0), vec![1, 2, 4], "the third job of h1 waits; h2's starts");
    assert_eq!((q.running_on("h1"), q.running_on("h2")), (2, 1));
    q.finished(1, TRANSIENT, S);
    assert_eq!(starts(&mut q, S), vec![3]);
}

#[test]
fn a_vm_never_runs_two_jobs_and_its_next_one_starts_when_the_first_ends() {
    let mut q = queue(8, 8);
    q.enqueue(1, req("a", JobKind::Sync, "h1"), 0).unwrap();
    q.enqueue(2, req("a", JobKind::ConsistencyCheck, "h1"), 0).unwrap();
    q.enqueue(3, req("b", JobKind::Sync, "h1"), 0).unwrap();
    assert_eq!(starts(&mut q, 0), vec![1, 3]);
    q.finished(1, FINAL, S);
    assert_eq!(starts(&mut q, S), vec![2]);
}

#[test]
fn a_job_without_a_known_host_starts_at_once_and_counts_against_no_host() {
    let mut q = queue(8, 1);
    q.enqueue(1, Request { host: None, ..req("gone", JobKind::Sync, "") }, 0).unwrap();
    q.enqueue(2, req("a", JobKind::Sync, "h1"), 0).unwrap();
    assert_eq!(q.next_to_start(0), Some(Next::Start { job: 1, host: None }));
    assert_eq!(q.next_to_start(0), Some(Next::Start { job: 2, host: Some("h1".into()) }));
}

#[test]
fn transient_failures_are_retried_after_5_15_45_seconds_then_stay_failed() {
    let mut q = queue(8, 2);
    q.enqueue(1, req("a", JobKind::Sync, "h1"), 0).unwrap();
    let mut now = 0;
    for (attempt, delay) in [(2, 5), (3, 15), (4, 45)] {
        assert_eq!(start(&mut q, now), Some(1));
        let after = q.finished(1, TRANSIENT, now);
        assert_eq!(after, Some(AfterFinish::Retry { attempt, delay: Duration::from_secs(delay) }));
        assert_eq!(q.attempt(1), Some(attempt));
        assert_eq!(q.next_wakeup(), Some(now + delay * S));
        assert_eq!(start(&mut q, now + delay * S - 1), None, "not before its delay");
        assert_eq!(q.admit(&req("a", JobKind::Sync, "h1"), now), Ok(Admission::Same(1)), "a retry is still queued");
        assert_eq!(q.enqueue(9, req("a", JobKind::Initial, "h1"), now), Ok(Admission::New));
        assert_eq!(start(&mut q, now), Some(9), "the VM is free while its job waits for a retry");
        q.finished(9, OK, now);
        now += delay * S;
    }
    assert_eq!(start(&mut q, now), Some(1));
    assert_eq!(q.finished(1, TRANSIENT, now), Some(AfterFinish::Done), "attempt 4 of 4");
    assert_eq!(q.counts(), (0, 0));
    assert!(q.admit(&auto("a", JobKind::Sync, "h1"), now).is_err(), "and its kind backs off");
    assert_eq!(retry_delay(9), Duration::from_secs(300));
}

#[test]
fn a_retried_job_goes_behind_the_jobs_queued_before_it_became_ready() {
    let mut q = queue(1, 1);
    q.enqueue(1, req("a", JobKind::Sync, "h1"), 0).unwrap();
    start(&mut q, 0);
    q.finished(1, TRANSIENT, 0);
    q.enqueue(2, req("b", JobKind::Sync, "h1"), S).unwrap();
    q.enqueue(3, req("c", JobKind::Sync, "h1"), 10 * S).unwrap();
    assert_eq!(start(&mut q, 10 * S), Some(2));
    q.finished(2, OK, 10 * S);
    assert_eq!(start(&mut q, 10 * S), Some(1), "ready at 5 s, before c arrived");
}

#[test]
fn finishing_a_job_that_is_not_running_changes_nothing() {
    let mut q = queue(8, 2);
    assert_eq!(q.finished(7, OK, 0), None, "unknown");
    q.enqueue(1, req("a", JobKind::Sync, "h1"), 0).unwrap();
    assert_eq!(q.finished(1, OK, 0), None, "waiting");
    assert_eq!(q.counts(), (1, 0));
    start(&mut q, 0);
    q.finished(1, TRANSIENT, 0);
    assert_eq!(q.finished(1, OK, 0), None, "waiting for a retry");
    assert_eq!(q.counts(), (1, 0));
}

#[test]
fn a_job_waits_for_its_host_and_starts_when_it_connects() {
    let mut q = Queue::new(Limits { max_running: 8, per_agent: 2 }, 0);
    q.enqueue(1, req("a", JobKind::Sync, "h1"), 0).unwrap();
    assert_eq!(q.next_to_start(S), None, "held: h1 never connected");
    assert_eq!(q.next_wakeup(), Some(ms(HOST_WAIT)), "when it will be given up");
    assert_eq!(q.held(), vec![(1, "a".to_owned())]);
    q.host_connected("h1", 2 * S);
    assert!(q.held().is_empty());
    assert_eq!(q.next_wakeup(), None);
    assert_eq!(start(&mut q, 2 * S), Some(1));
}

#[test]
fn a_job_whose_host_stays_away_is_given_up_with_a_reason() {
    let mut q = queue(8, 2);
    q.enqueue(1, auto("a", JobKind::Sync, "h1"), 0).unwrap();
    q.host_lost("h1", 10 * S);
    q.host_lost("h1", 20 * S);
    let deadline = 10 * S + ms(HOST_WAIT);
    assert_eq!(q.next_wakeup(), Some(deadline), "counted from the first loss");
    assert_eq!(q.next_to_start(deadline - 1), None);
    assert_eq!(
        q.next_to_start(deadline),
        Some(Next::GiveUp { job: 1, reason: "the agent of h1 was not connected for 1m".into() })
    );
    assert_eq!(q.counts(), (0, 0));
    assert!(q.admit(&auto("a", JobKind::Sync, "h1"), deadline).is_err(), "a give-up is a failure");
}

#[test]
fn a_job_is_given_up_even_when_every_slot_is_taken() {
    let mut q = queue(1, 1);
    q.enqueue(1, req("a", JobKind::Sync, "h1"), 0).unwrap();
    q.enqueue(2, req("b", JobKind::Sync, "h2"), 0).unwrap();
    assert_eq!(start(&mut q, 0), Some(1));
    q.host_lost("h2", 0);
    assert!(matches!(q.next_to_start(ms(HOST_WAIT)), Some(Next::GiveUp { job: 2, .. })));
}

#[test]
fn a_lost_host_changes_no_running_job_and_a_held_job_follows_its_vm() {
    let mut q = queue(8, 2);
    q.enqueue(1, req("a", JobKind::Sync, "h1"), 0).unwrap();
    q.enqueue(2, req("b", JobKind::Sync, "h1"), 0).unwrap();
    assert_eq!(start(&mut q, 0), Some(1));
    q.host_lost("h1", 0);
    assert_eq!(q.counts(), (1, 1));
    assert_eq!(q.running_on("h1"), 1);
    q.relocate(1, Some("h2".into()));
    assert_eq!(q.running_on("h1"), 1, "a running job is not moved");
    assert_eq!(q.next_to_start(S), None);
    assert_eq!(q.held(), vec![(2, "b".to_owned())]);
    q.relocate(2, Some("h2".into()));
    assert_eq!(q.next_to_start(S), Some(Next::Start { job: 2, host: Some("h2".into()) }));
    assert_eq!(q.finished(1, TRANSIENT, S), Some(AfterFinish::Retry { attempt: 2, delay: Duration::from_secs(5) }));
    assert_eq!(q.running_on("h1"), 0);
}

#[test]
fn a_forgotten_job_leaves_no_trace_wherever_it_was() {
    let mut q = queue(8, 2);
    q.enqueue(1, req("a", JobKind::Sync, "h1"), 0).unwrap();
    q.enqueue(2, req("b", JobKind::Sync, "h1"), 0).unwrap();
    start(&mut q, 0);
    q.forget(1);
    q.forget(2);
    q.forget(3);
    assert_eq!(q.counts(), (0, 0));
    assert_eq!(q.running_on("h1"), 0);
    assert_eq!(q.admit(&auto("a", JobKind::Sync, "h1"), 0), Ok(Admission::New), "no backoff either");
}

#[test]
fn time_never_goes_back() {
    let mut q = queue(8, 2);
    q.enqueue(1, req("a", JobKind::Sync, "h1"), 10 * S).unwrap();
    start(&mut q, 10 * S);
    q.finished(1, TRANSIENT, 10 * S);
    assert_eq!(start(&mut q, 0), None, "an older now is taken as the latest one");
    assert_eq!(start(&mut q, 15 * S), Some(1));
}

// ---- property test ----

#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        vm: u8,
        kind: u8,
        automatic: bool,
        recovery: bool,
        host: Option<u8>,
    },
    Poll,
    Finish {
        pick: usize,
        outcome: u8,
    },
    Connect(u8),
    Lose(u8),
    Forget(u64),
    Advance(Millis),
    /// A waiting job's VM moved to another host (or to none known).
    Relocate {
        pick: usize,
        host: Option<u8>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..5u8, 0..3u8, any::<bool>(), prop::bool::weighted(0.1), prop::option::weighted(0.95, 0..3u8))
            .prop_map(|(vm, kind, automatic, recovery, host)| Op::Enqueue { vm, kind, automatic, recovery, host }),
        4 => Just(Op::Poll),
        3 => (any::<usize>(), 0..3u8).prop_map(|(pick, outcome)| Op::Finish { pick, outcome }),
        1 => (0..3u8).prop_map(Op::Connect),
        1 => (0..3u8).prop_map(Op::Lose),
        1 => (1..40u64).prop_map(Op::Forget),
        1 => (any::<usize>(), prop::option::weighted(0.9, 0..3u8)).prop_map(|(pick, host)| Op::Relocate { pick, host }),
        2 => prop_oneof![0..10_000u64, 0..400_000u64].prop_map(Op::Advance),
    ]
}

const KINDS: [JobKind; 3] = [JobKind::Sync, JobKind::ExpressFull, JobKind::ConsistencyCheck];

/// What the test knows of each job from the queue's answers alone.
#[derive(Default)]
struct Model {
    now: Millis,
    up: BTreeSet<String>,
    /// Job → (VM, host) of running jobs.
    running: BTreeMap<u64, (String, Option<String>)>,
    /// Job → not before this instant (a retry's delay).
    not_before: BTreeMap<u64, Millis>,
    waiting: BTreeSet<u64>,
    /// Job → how many times it started.
    starts: BTreeMap<u64, u32>,
    requests: BTreeMap<u64, Request>,
    /// (VM, kind) → when its last job failed for good, unless one succeeded since.
    failed_at: std::collections::HashMap<(String, JobKind), Millis>,
}

impl Model {
    fn check(&self, q: &Queue, limits: Limits) {
        assert!(self.running.len() <= limits.max_running, "over max_running");
        let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
        let mut vms = BTreeSet::new();
        for (vm, host) in self.running.values() {
            if let Some(h) = host {
                *per_host.entry(h).or_default() += 1;
            }
            assert!(vms.insert(vm.clone()), "two jobs run for {vm}");
        }
        assert!(per_host.values().all(|&n| n <= limits.per_agent), "over per_agent: {per_host:?}");
        assert_eq!(q.counts(), (self.waiting.len(), self.running.len()));
    }

    fn poll(&mut self, q: &mut Queue) {
        loop {
            let now = q.now.max(self.now);
            let want = reference_pick(q, now);
            let want_wakeup = reference_wakeup(q);
            assert_eq!(q.next_wakeup(), want_wakeup, "the indexed wake-up is the full scan's");
            let Some(next) = q.next_to_start(self.now) else {
                assert_eq!(want, None, "the full scan would start or give up a job");
                break;
            };
            let picked = match &next {
                Next::Start { job, .. } => (*job, true),
                Next::GiveUp { job, .. } => (*job, false),
            };
            assert_eq!(Some(picked), want, "the indexed pick is the full scan's (job, start)");
            match next {
                Next::Start { job, host } => {
                    assert!(self.waiting.remove(&job), "started job {job} was not waiting");
                    let r = &self.requests[&job];
                    assert_eq!(host, r.host);
                    if let Some(h) = &host {
                        assert!(self.up.contains(h), "job {job} started on {h}, which is down");
                    }
                    let not_before = self.not_before.remove(&job).unwrap_or(0);
                    assert!(self.now >= not_before, "job {job} retried before its delay");
                    *self.starts.entry(job).or_default() += 1;
                    self.running.insert(job, (r.vm.clone(), host));
                }
                Next::GiveUp { job, reason } => {
                    assert!(self.waiting.remove(&job));
                    let r = &self.requests[&job];
                    let h = r.host.clone().expect("given up without a host");
                    assert!(!self.up.contains(&h), "job {job} given up while {h} is up");
                    assert!(reason.contains(&h));
                    self.failed_at.insert((r.vm.clone(), r.kind), self.now);
                }
            }
        }
    }
}

/// What `next_to_start` must pick, by walking every waiting job in start order (the queue's
/// indexes only make finding it cheaper): the first job that may start or must be given up.
fn reference_pick(q: &Queue, now: Millis) -> Option<(u64, bool)> {
    let full = q.running >= q.limits.max_running;
    for &(ready_at, _, id) in &q.order {
        if ready_at > now {
            break;
        }
        let Some(e) = q.jobs.get(&id) else { continue };
        if let Some(h) = &e.req.host {
            if !q.host_up(h) {
                if now >= q.give_up_at(h, ready_at) {
                    return Some((id, false));
                }
                continue;
            }
            if q.running_on.get(h).copied().unwrap_or(0) >= q.limits.per_agent {
                continue;
            }
        }
        if full || (q.one_per_vm() && q.busy_vms.contains(&e.req.vm)) {
            continue;
        }
        return Some((id, true));
    }
    None
}

/// What `next_wakeup` must answer, from every waiting job.
fn reference_wakeup(q: &Queue) -> Option<Millis> {
    q.order
        .iter()
        .filter_map(|&(ready_at, _, id)| {
            let e = q.jobs.get(&id)?;
            let at = match &e.req.host {
                Some(h) if !q.host_up(h) => q.give_up_at(h, ready_at),
                _ => ready_at,
            };
            (at > q.now).then_some(at)
        })
        .min()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_queue_keeps_its_bounds_and_every_job_starts_or_is_given_up(
        max_running in 1..4usize,
        per_agent in 1..3usize,
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let limits = Limits { max_running, per_agent };
        let mut q = Queue::new(limits, 0);
        let mut m = Model::default();
        let mut next_id = 1;
        for op in ops {
            match op {
                Op::Enqueue { vm, kind, automatic, recovery, host } => {
                    let kind = if recovery { JobKind::Recovery } else { KINDS[usize::from(kind)] };
                    let r = Request { vm: format!("vm{vm}"), kind, automatic, recovery, host: host.map(|h| format!("h{h}")) };
                    match q.enqueue(next_id, r.clone(), m.now) {
                        Ok(Admission::New) => {
                            if automatic {
                                if let Some(at) = m.failed_at.get(&(r.vm.clone(), kind)) {
                                    prop_assert!(m.now >= at + 20 * S, "admitted while backing off");
                                }
                            }
                            m.waiting.insert(next_id);
                            m.requests.insert(next_id, r);
                            next_id += 1;
                        }
                        Ok(Admission::Same(id)) => {
                            prop_assert!(!recovery && m.waiting.contains(&id));
                            prop_assert_eq!((&m.requests[&id].vm, m.requests[&id].kind), (&r.vm, kind));
                        }
                        Err(Refusal::AlreadyRunning) => {
                            prop_assert!(automatic);
                            prop_assert!(m.running.keys().any(|j| m.requests[j].vm == r.vm && m.requests[j].kind == kind));
                        }
                        Err(Refusal::BackingOff { until, .. }) => {
                            prop_assert!(automatic && m.now < until);
                            prop_assert!(m.failed_at.contains_key(&(r.vm.clone(), kind)));
                        }
                    }
                }
                Op::Poll => m.poll(&mut q),
                Op::Finish { pick, outcome } => {
                    let Some(&job) = m.running.keys().nth(pick % m.running.len().max(1)) else { continue };
                    let kind = m.requests[&job].kind;
                    let outcome = match outcome {
                        0 => Outcome::Succeeded { ran_as: kind },
                        1 => Outcome::Failed { ran_as: kind, transient: true },
                        _ => Outcome::Failed { ran_as: kind, transient: false },
                    };
                    let (vm, _) = m.running.remove(&job).unwrap();
                    match q.finished(job, outcome, m.now) {
                        Some(AfterFinish::Retry { delay, attempt }) => {
                            let transient = matches!(outcome, Outcome::Failed { transient: true, .. });
                            prop_assert!(transient);
                            prop_assert!(attempt <= MAX_ATTEMPTS);
                            prop_assert_eq!(attempt, m.starts[&job] + 1);
                            prop_assert_eq!(delay, retry_delay(attempt - 1));
                            m.not_before.insert(job, m.now + ms(delay));
                            m.waiting.insert(job);
                        }
                        Some(AfterFinish::Done) => match outcome {
                            Outcome::Succeeded { .. } => { m.failed_at.remove(&(vm, kind)); }
                            Outcome::Failed { transient, .. } => {
                                prop_assert!(!transient || m.starts[&job] == MAX_ATTEMPTS, "retries ended early");
                                m.failed_at.insert((vm, kind), m.now);
                            }
                        },
                        None => prop_assert!(false, "a running job {} was not running", job),
                    }
                }
                Op::Connect(h) => {
                    q.host_connected(&format!("h{h}"), m.now);
                    m.up.insert(format!("h{h}"));
                }
                Op::Lose(h) => {
                    q.host_lost(&format!("h{h}"), m.now);
                    m.up.remove(&format!("h{h}"));
                }
                Op::Forget(id) => {
                    q.forget(id);
                    m.waiting.remove(&id);
                    m.running.remove(&id);
                    m.not_before.remove(&id);
                }
                Op::Advance(d) => m.now += d,
                Op::Relocate { pick, host } => {
                    let Some(&job) = m.waiting.iter().nth(pick % m.waiting.len().max(1)) else { continue };
                    let host = host.map(|h| format!("h{h}"));
                    q.relocate(job, host.clone());
                    if let Some(r) = m.requests.get_mut(&job) {
                        r.host = host;
                    }
                }
            }
            m.check(&q, limits);
        }
        // With every host up and every job finishing, whatever waits starts (none is given up:
        // its host is up), following the queue's wake-ups.
        for h in 0..3 {
            q.host_connected(&format!("h{h}"), m.now);
            m.up.insert(format!("h{h}"));
        }
        for _ in 0..200 {
            m.poll(&mut q);
            m.check(&q, limits);
            let running: Vec<u64> = m.running.keys().copied().collect();
            for job in running {
                let kind = m.requests[&job].kind;
                m.running.remove(&job);
                prop_assert_eq!(q.finished(job, Outcome::Succeeded { ran_as: kind }, m.now), Some(AfterFinish::Done));
            }
            if m.waiting.is_empty() && m.running.is_empty() {
                break;
            }
            if let Some(at) = q.next_wakeup() {
                prop_assert!(at > m.now);
                m.now = at;
            }
        }
        prop_assert!(m.waiting.is_empty() && m.running.is_empty(), "jobs left: {:?}", m.waiting);
        prop_assert_eq!(q.counts(), (0, 0));
    }
}
