//! Which of a group's schedules are due, as a plain function of (policy, persisted next runs,
//! now, time zone): what to fire and which next-run times to persist first. The scheduler's
//! group actors read the clock and the catalog, call [`due`], persist, then queue the jobs; the
//! daily retention prune uses [`step`] the same way. Times are Unix seconds; daily times are
//! minutes after midnight in the time zone given (the coordinator's local one), DST as
//! [`policy::next_daily`] handles it.
//!
//! A schedule seen for the first time gets its first run and is not due; one that is due fires
//! once, however many runs were missed (a coordinator down for a day makes up one run, not
//! ninety-six), and gets its next run after `now`.

use crate::catalog::{JobKind, Policy};
use crate::policy::{self, Creation};
use jiff::tz::TimeZone;
use std::collections::BTreeMap;

/// A group's schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Schedule {
    Sync,
    RecoveryPoint,
    ConsistencyCheck,
    /// Off-peak replica creation (`--replica at:HH:MM`).
    Initial,
}

impl Schedule {
    pub const ALL: [Schedule; 4] =
        [Schedule::Sync, Schedule::RecoveryPoint, Schedule::ConsistencyCheck, Schedule::Initial];

    /// The key its next run is persisted under (catalog `next_run(group, key)`).
    pub fn key(self) -> &'static str {
        match self {
            Schedule::Sync => "sync",
            Schedule::RecoveryPoint => "rp",
            Schedule::ConsistencyCheck => "cc",
            Schedule::Initial => "initial",
        }
    }

    /// The job it queues for each member (only members without a replica for `Initial`).
    pub fn job(self) -> JobKind {
        match self {
            Schedule::Sync => JobKind::Sync,
            Schedule::RecoveryPoint => JobKind::ExpressFull,
            Schedule::ConsistencyCheck => JobKind::ConsistencyCheck,
            Schedule::Initial => JobKind::Initial,
        }
    }

    /// Why its jobs were queued (the job record's detail).
    pub fn reason(self) -> &'static str {
        match self {
            Schedule::Sync => "scheduled synchronization",
            Schedule::RecoveryPoint => "scheduled recovery point (express full)",
            Schedule::ConsistencyCheck => "scheduled consistency check",
            Schedule::Initial => "off-peak replica creation",
        }
    }
}

/// When a schedule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule<'a> {
    /// Every this many seconds (at least 1).
    Every(u64),
    /// At these minutes after midnight, every day.
    Daily(&'a [u16]),
}

/// One schedule looked at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Step {
    /// The run that is due (its planned time), if any.
    pub due: Option<i64>,
    /// The next run to persist before firing, if it changes.
    pub next: Option<i64>,
}

/// What `rule` says at `now` given the persisted next run.
pub fn step(rule: Rule<'_>, persisted: Option<i64>, now: i64, tz: &TimeZone) -> Step {
    let daily = |times| policy::next_daily(now, times, tz);
    match (persisted, rule) {
        (None, Rule::Every(every)) => Step { due: None, next: Some(now.saturating_add(every.max(1) as i64)) },
        (None, Rule::Daily(times)) => Step { due: None, next: daily(times) },
        (Some(at), _) if at > now => Step::default(),
        (Some(at), Rule::Every(every)) => Step { due: Some(at), next: Some(policy::next_every(at, every, now)) },
        (Some(at), Rule::Daily(times)) => Step { due: Some(at), next: daily(times) },
    }
}

/// A schedule that fires: its jobs go to the group's members, each after its jitter from `due`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fire {
    pub schedule: Schedule,
    pub due: i64,
}

/// What a group's schedules say at `now`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Due {
    /// Schedules to fire, in [`Schedule::ALL`] order.
    pub fire: Vec<Fire>,
    /// Next-run times to persist, before any job is queued.
    pub next: Vec<(Schedule, i64)>,
}

/// The group's due schedules and next runs at `now`, from its policy and the persisted next
/// runs (schedules the policy turned off are left alone).
pub fn due(policy: &Policy, persisted: &BTreeMap<Schedule, i64>, now: i64, tz: &TimeZone) -> Due {
    let cc = policy.cc_at.map(|t| [t]);
    let initial = match policy::creation_time(&policy.replica_creation) {
        Ok(Creation::At(t)) => Some([t]),
        _ => None,
    };
    let rules = [
        // "Just before a recovery point": no interval synchronization at all.
        (Schedule::Sync, policy.sync_every_secs.filter(|_| !policy.express_full_before_rp).map(Rule::Every)),
        (Schedule::RecoveryPoint, (!policy.recovery_points.is_empty()).then_some(Rule::Daily(&policy.recovery_points))),
        (Schedule::ConsistencyCheck, cc.as_ref().map(|t| Rule::Daily(t))),
        (Schedule::Initial, initial.as_ref().map(|t| Rule::Daily(t))),
    ];
    let mut out = Due::default();
    for (schedule, rule) in rules {
        let Some(rule) = rule else { continue };
        let s = step(rule, persisted.get(&schedule).copied(), now, tz);
        if let Some(next) = s.next {
            out.next.push((schedule, next));
        }
        if let Some(due) = s.due {
            out.fire.push(Fire { schedule, due });
        }
    }
    out
}

/// Whether a firing of `schedule` queues a job for a member with (`has_replica`) or without a
/// replica, under the group's replica creation method. Only `--replica now` lets a scheduled
/// job turn into an initial copy over the network; with `manual` or `at:HH:MM` a member
/// without a replica waits (`awaiting-replica`) for its seed or its off-peak time.
pub fn fires_for(schedule: Schedule, creation: Creation, has_replica: bool) -> bool {
    match schedule {
        Schedule::Initial => !has_replica,
        _ => has_replica || creation == Creation::Now,
    }
}

/// Whether a VM has its replica: every disk's copy made (none still being created). An
/// automatic initial copy is queued only for a VM without one.
pub fn has_replica(replicas: &[crate::catalog::ReplicaRecord]) -> bool {
    !replicas.is_empty()
        && replicas.iter().all(|r| r.state != crate::catalog::ReplicaState::Creating && r.root.is_some())
}

/// Whether an automatic request for `kind` still stands once it reaches the queue: an
/// initial copy asked for while the VM's replica was being made is void once it exists (the
/// scheduler's sweep reads the catalog a moment before the queue sees the request, and the
/// copy may have committed meanwhile; a second copy would be a full transfer for nothing).
pub fn automatic_still_due(kind: JobKind, replicas: &[crate::catalog::ReplicaRecord]) -> bool {
    kind != JobKind::Initial || !has_replica(replicas)
}

/// The schedules whose persisted next run no longer fits after a policy change from `old` to
/// `new`: forgotten, so the next tick plans them afresh.
pub fn changed(old: &Policy, new: &Policy) -> Vec<Schedule> {
    let sync = |p: &Policy| p.sync_every_secs.filter(|_| !p.express_full_before_rp);
    let mut out = vec![];
    if sync(old) != sync(new) {
        out.push(Schedule::Sync);
    }
    if old.recovery_points != new.recovery_points {
        out.push(Schedule::RecoveryPoint);
    }
    if old.cc_at != new.cc_at {
        out.push(Schedule::ConsistencyCheck);
    }
    if old.replica_creation != new.replica_creation {
        out.push(Schedule::Initial);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    fn at(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    fn policy() -> Policy {
        Policy {
            sync_every_secs: Some(900),
            recovery_points: vec![8 * 60, 20 * 60],
            express_full_before_rp: false,
            retention_secs: 5 * 86_400,
            cc_when_inconsistent: true,
            cc_at: Some(60),
            replica_creation: "at:23:30".into(),
            block_size: 1 << 20,
            exclude_disks: vec![],
            verify: Default::default(),
        }
    }

    /// The jobs a group's schedules queue for one member from `start` for `minutes`, ticked
    /// each minute as the group actor does (next runs persisted between ticks).
    fn ticked(p: &Policy, has_replica: bool, start: i64, minutes: i64, tz: &TimeZone) -> Vec<(i64, JobKind)> {
        let creation = policy::creation_time(&p.replica_creation).unwrap();
        let mut persisted = BTreeMap::new();
        let mut jobs = vec![];
        for m in 0..=minutes {
            let now = start + m * 60;
            let d = due(p, &persisted, now, tz);
            persisted.extend(d.next.iter().copied());
            for f in d.fire {
                if fires_for(f.schedule, creation, has_replica) {
                    jobs.push((f.due, f.schedule.job()));
                }
            }
        }
        jobs
    }

    /// A new group's policy as `group create` makes it with no flags.
    fn defaults() -> Policy {
        Policy {
            sync_every_secs: None,
            recovery_points: policy::DEFAULT_RECOVERY_POINTS.to_vec(),
            express_full_before_rp: true,
            retention_secs: policy::DEFAULT_RETENTION_SECS,
            cc_when_inconsistent: true,
            cc_at: None,
            replica_creation: "now".into(),
            block_size: policy::DEFAULT_BLOCK_SIZE,
            exclude_disks: vec![],
            verify: Default::default(),
        }
    }

    #[test]
    fn a_manual_or_off_peak_group_with_the_default_schedules_copies_nothing_over_the_network() {
        // A day from 00:00 at +02: three recovery-point times, and the off-peak time at 23:30.
        let start = at("2026-05-31T22:00:00Z");
        let manual = Policy { replica_creation: "manual".into(), ..defaults() };
        assert_eq!(ticked(&manual, false, start, 24 * 60, &plus2()), vec![], "a member awaiting its seed");
        let off_peak = Policy { replica_creation: "at:23:30".into(), ..defaults() };
        assert_eq!(
            ticked(&off_peak, false, start, 24 * 60, &plus2()),
            vec![(at("2026-06-01T21:30:00Z"), JobKind::Initial)],
            "only the off-peak initial copy"
        );
        let with_replica = ticked(&manual, true, start, 24 * 60, &plus2());
        assert_eq!(with_replica.len(), 3, "once seeded, the recovery points run: {with_replica:?}");
        assert!(with_replica.iter().all(|(_, k)| *k == JobKind::ExpressFull));
        let now_group = ticked(&defaults(), false, start, 24 * 60, &plus2());
        assert_eq!(now_group.len(), 3, "--replica now: scheduled jobs still bring a first copy");
    }

    #[test]
    fn express_full_before_rp_runs_no_synchronization_only_express_fulls_at_the_points() {
        let start = at("2026-05-31T22:00:00Z");
        let p = Policy { sync_every_secs: Some(900), express_full_before_rp: true, ..defaults() };
        let jobs = ticked(&p, true, start, 24 * 60, &plus2());
        assert_eq!(
            jobs,
            vec![
                (at("2026-06-01T06:00:00Z"), JobKind::ExpressFull),
                (at("2026-06-01T10:00:00Z"), JobKind::ExpressFull),
                (at("2026-06-01T18:00:00Z"), JobKind::ExpressFull),
            ]
        );
        let syncing = Policy { express_full_before_rp: false, ..p };
        let jobs = ticked(&syncing, true, start, 24 * 60, &plus2());
        assert_eq!(jobs.iter().filter(|(_, k)| *k == JobKind::Sync).count(), 24 * 4, "every 15 minutes");
    }

    #[test]
    fn a_policy_change_forgets_only_the_schedules_it_changes() {
        let p = policy();
        assert_eq!(changed(&p, &p), vec![]);
        let q = Policy { sync_every_secs: Some(60), cc_at: None, ..policy() };
        assert_eq!(changed(&p, &q), vec![Schedule::Sync, Schedule::ConsistencyCheck]);
        let r = Policy { express_full_before_rp: true, recovery_points: vec![9 * 60], ..policy() };
        assert_eq!(changed(&p, &r), vec![Schedule::Sync, Schedule::RecoveryPoint]);
        assert_eq!(changed(&p, &Policy { retention_secs: 86_400, ..policy() }), vec![], "not a schedule");
    }

    fn runs(r: &[(Schedule, i64)]) -> BTreeMap<Schedule, i64> {
        r.iter().copied().collect()
    }

    /// UTC+2 all year: no DST.
    fn plus2() -> TimeZone {
        TimeZone::fixed(jiff::tz::offset(2))
    }

    #[test]
    fn schedules_seen_first_get_their_first_runs_and_are_not_due() {
        let now = at("2026-06-01T10:00:00Z"); // 12:00 at +02
        let d = due(&policy(), &BTreeMap::new(), now, &plus2());
        assert!(d.fire.is_empty());
        assert_eq!(
            d.next,
            vec![
                (Schedule::Sync, now + 900),
                (Schedule::RecoveryPoint, at("2026-06-01T18:00:00Z")),
                (Schedule::ConsistencyCheck, at("2026-06-01T23:00:00Z")),
                (Schedule::Initial, at("2026-06-01T21:30:00Z")),
            ]
        );
    }

    #[test]
    fn nothing_is_due_before_its_time_and_nothing_changes() {
        let now = at("2026-06-01T10:00:00Z");
        let later = runs(&Schedule::ALL.map(|s| (s, now + 1)));
        assert_eq!(due(&policy(), &later, now, &plus2()), Due::default());
    }

    #[test]
    fn a_due_schedule_fires_at_its_planned_time_and_gets_its_next_run_after_now() {
        let now = at("2026-06-01T18:00:05Z"); // 20:00:05 at +02
        let persisted = runs(&[
            (Schedule::Sync, now - 5),
            (Schedule::RecoveryPoint, at("2026-06-01T18:00:00Z")),
            (Schedule::ConsistencyCheck, now + 3600),
            (Schedule::Initial, now + 3600),
        ]);
        let d = due(&policy(), &persisted, now, &plus2());
        assert_eq!(
            d.fire,
            vec![
                Fire { schedule: Schedule::Sync, due: now - 5 },
                Fire { schedule: Schedule::RecoveryPoint, due: at("2026-06-01T18:00:00Z") }
            ]
        );
        assert_eq!(
            d.next,
            vec![(Schedule::Sync, now - 5 + 900), (Schedule::RecoveryPoint, at("2026-06-02T06:00:00Z"))],
            "tomorrow 08:00 at +02"
        );
    }

    #[test]
    fn missed_runs_fire_once_and_are_not_made_up() {
        let now = at("2026-06-03T12:00:00Z");
        let two_days_ago = at("2026-06-01T12:00:00Z");
        let persisted = runs(&Schedule::ALL.map(|s| (s, two_days_ago)));
        let d = due(&policy(), &persisted, now, &plus2());
        assert_eq!(d.fire.len(), 4);
        assert!(d.fire.iter().all(|f| f.due == two_days_ago));
        assert!(d.next.iter().all(|&(_, n)| n > now), "{d:?}");
        assert_eq!(d.next[0], (Schedule::Sync, now + 900));
    }

    #[test]
    fn schedules_the_policy_turned_off_neither_fire_nor_move() {
        let p = Policy {
            sync_every_secs: None,
            recovery_points: vec![],
            cc_at: None,
            replica_creation: "now".into(),
            ..policy()
        };
        let persisted = runs(&Schedule::ALL.map(|s| (s, 0)));
        assert_eq!(due(&p, &persisted, 1_000_000, &plus2()), Due::default());
        let manual = Policy { replica_creation: "manual".into(), ..policy() };
        assert!(due(&manual, &persisted, 1_000_000, &plus2()).fire.iter().all(|f| f.schedule != Schedule::Initial));
    }

    #[test]
    fn daily_times_are_in_the_zone_given() {
        let now = at("2026-06-01T05:00:00Z");
        let first = |tz: &TimeZone| due(&policy(), &BTreeMap::new(), now, tz).next[1].1;
        assert_eq!(first(&TimeZone::UTC), at("2026-06-01T08:00:00Z"));
        assert_eq!(first(&plus2()), at("2026-06-01T06:00:00Z"));
        assert_eq!(first(&TimeZone::fixed(jiff::tz::offset(-5))), at("2026-06-01T13:00:00Z"));
    }

    #[test]
    fn daily_times_follow_a_local_zone_across_dst() {
        let Ok(berlin) = TimeZone::get("Europe/Berlin") else { return }; // no tzdata: fixed offsets above still ran
        let p = Policy { recovery_points: vec![150], ..policy() };
        // 2026-03-29: 02:00 → 03:00 in Berlin; 02:30 does not exist and runs after the gap.
        let before = at("2026-03-28T01:30:00Z"); // 02:30 CET the day before, due now
        let d = due(&p, &runs(&[(Schedule::RecoveryPoint, before)]), before, &berlin);
        assert_eq!(d.fire, vec![Fire { schedule: Schedule::RecoveryPoint, due: before }]);
        assert!(d.next.contains(&(Schedule::RecoveryPoint, at("2026-03-29T01:30:00Z"))), "{d:?}");
    }

    #[test]
    fn the_local_zone_of_this_machine_gives_a_next_run_within_a_day() {
        let tz = TimeZone::system();
        let now = at("2026-06-01T10:00:00Z");
        let s = step(Rule::Daily(&[3 * 60 + 30]), None, now, &tz);
        let next = s.next.unwrap();
        assert!(next > now && next <= now + 86_400 + 3600, "{next}");
        let again = step(Rule::Daily(&[3 * 60 + 30]), Some(next), next, &tz);
        assert_eq!(again.due, Some(next));
        assert!(again.next.unwrap() > next);
    }

    #[test]
    fn every_step_keeps_its_cadence_when_on_time() {
        let tz = TimeZone::UTC;
        assert_eq!(step(Rule::Every(60), None, 100, &tz), Step { due: None, next: Some(160) });
        assert_eq!(step(Rule::Every(60), Some(160), 159, &tz), Step::default());
        assert_eq!(step(Rule::Every(60), Some(160), 161, &tz), Step { due: Some(160), next: Some(220) });
        assert_eq!(step(Rule::Every(60), Some(160), 1000, &tz), Step { due: Some(160), next: Some(1060) });
        assert_eq!(step(Rule::Daily(&[]), None, 100, &tz), Step::default());
    }

    #[test]
    fn an_automatic_initial_copy_is_void_once_the_replica_exists() {
        use crate::catalog::{ReplicaRecord, ReplicaState};
        let replica = |disk: &str, state: ReplicaState| ReplicaRecord {
            vm: "web1".into(),
            disk: disk.into(),
            size_bytes: 1 << 20,
            block_size: 65536,
            state,
            root: (state != ReplicaState::Creating).then_some(bulwark_protocol::blockmap::TreeRoot {
                digest: [0; 32],
                levels: 1,
                blocks: 16,
            }),
            change_token: None,
            reason: None,
            updated_at: 0,
            excluded: vec![],
            swap_witness: vec![],
        };
        let made = [replica("os", ReplicaState::Consistent), replica("data", ReplicaState::Inconsistent)];
        let making = [replica("os", ReplicaState::Consistent), replica("data", ReplicaState::Creating)];
        assert!(has_replica(&made) && !has_replica(&making) && !has_replica(&[]));
        assert!(!automatic_still_due(JobKind::Initial, &made), "the copy committed while the request travelled");
        assert!(automatic_still_due(JobKind::Initial, &making) && automatic_still_due(JobKind::Initial, &[]));
        assert!(automatic_still_due(JobKind::ConsistencyCheck, &made) && automatic_still_due(JobKind::Sync, &made));
    }
}
