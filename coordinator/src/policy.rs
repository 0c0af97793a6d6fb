//! Protection-group policy as plain functions: validation, schedule math (the coordinator's
//! local time zone), and the disk-allocation plan. No I/O, no actors: the scheduler and the
//! admin API call these, and the tests below pin them down.

use crate::catalog::Policy;
use bulwark_protocol::messages::{PolicyPatch, PolicySpec};
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// Default synchronization frequency (DPM's default).
pub const DEFAULT_SYNC_EVERY_SECS: u64 = 15 * 60;
/// Default recovery-point times: 08:00, 12:00, 20:00.
pub const DEFAULT_RECOVERY_POINTS: [u16; 3] = [8 * 60, 12 * 60, 20 * 60];
/// Default retention range.
pub const DEFAULT_RETENTION_SECS: u64 = 5 * 86_400;
/// Default block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Daily churn the space recommendation assumes when nothing was measured yet (DPM's 10 %).
pub const DEFAULT_CHURN_PER_DAY: f64 = 0.10;

/// A policy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("synchronization frequency must be at least 1 minute")]
    SyncTooOften,
    #[error("time {0} is not a time of day (minutes after midnight must be below 1440)")]
    BadTime(u16),
    #[error("retention range must be at least 1 day (got {0} s)")]
    RetentionTooShort(u64),
    #[error("replica creation must be `now`, `at:HH:MM` or `manual`, not {0:?}")]
    BadCreation(String),
    #[error("block size {0} is not a power of two between 4 KiB and 16 MiB")]
    BadBlockSize(u32),
    #[error("--express-full-before-rp runs no interval synchronization: give it or --sync-every, not both")]
    SyncAndExpressFull,
    #[error("--exclude-disk {0:?}: {1}")]
    BadExclusion(String, String),
}

/// Checks a policy the console sent and makes it the catalog's.
pub fn validate(spec: &PolicySpec) -> Result<Policy, PolicyError> {
    if spec.sync_every_secs.is_some_and(|s| s < 60) {
        return Err(PolicyError::SyncTooOften);
    }
    for &t in spec.recovery_points.iter().chain(spec.cc_at.iter()) {
        if t >= 24 * 60 {
            return Err(PolicyError::BadTime(t));
        }
    }
    if spec.express_full_before_rp && spec.sync_every_secs.is_some() {
        return Err(PolicyError::SyncAndExpressFull);
    }
    for (vm, disk) in &spec.exclude_disks {
        let named = format!("{vm}:{disk}");
        bulwark_protocol::VmId::new(vm.clone()).map_err(|e| PolicyError::BadExclusion(named.clone(), e.to_string()))?;
        bulwark_protocol::DiskId::new(disk.clone())
            .map_err(|e| PolicyError::BadExclusion(named.clone(), e.to_string()))?;
    }
    if spec.retention_secs < 86_400 {
        return Err(PolicyError::RetentionTooShort(spec.retention_secs));
    }
    creation_time(&spec.replica_creation)?;
    bulwark_protocol::block::check_block_size(spec.block_size as usize)
        .map_err(|_| PolicyError::BadBlockSize(spec.block_size))?;
    let mut rps = spec.recovery_points.clone();
    rps.sort_unstable();
    rps.dedup();
    let mut exclude_disks = spec.exclude_disks.clone();
    exclude_disks.sort();
    exclude_disks.dedup();
    Ok(Policy {
        sync_every_secs: spec.sync_every_secs,
        recovery_points: rps,
        express_full_before_rp: spec.express_full_before_rp,
        retention_secs: spec.retention_secs,
        cc_when_inconsistent: spec.cc_when_inconsistent,
        cc_at: spec.cc_at,
        replica_creation: spec.replica_creation.clone(),
        block_size: spec.block_size,
        exclude_disks,
        verify: spec.verify,
    })
}

/// `group set`: the policy `old` with what `patch` changes, checked as a new one would be.
/// Asking for express fulls before recovery points turns interval synchronization off; asking
/// for an interval turns them off.
pub fn apply(old: &Policy, patch: &PolicyPatch) -> Result<Policy, PolicyError> {
    let mut s = spec(old);
    if patch.express_full_before_rp == Some(true) && patch.sync_every_secs.is_some_and(|s| s.is_some()) {
        return Err(PolicyError::SyncAndExpressFull);
    }
    if let Some(every) = patch.sync_every_secs {
        s.sync_every_secs = every;
        s.express_full_before_rp = false;
    }
    if let Some(on) = patch.express_full_before_rp {
        s.express_full_before_rp = on;
        if on {
            s.sync_every_secs = None;
        }
    }
    if let Some(rps) = &patch.recovery_points {
        s.recovery_points = rps.clone();
    }
    if let Some(r) = patch.retention_secs {
        s.retention_secs = r;
    }
    if let Some(cc) = patch.cc_when_inconsistent {
        s.cc_when_inconsistent = cc;
    }
    if let Some(at) = patch.cc_at {
        s.cc_at = at;
    }
    if let Some(c) = &patch.replica_creation {
        s.replica_creation = c.clone();
    }
    if let Some(b) = patch.block_size {
        s.block_size = b;
    }
    if let Some(v) = patch.verify {
        s.verify = v;
    }
    s.exclude_disks.retain(|d| !patch.include_disks.contains(d));
    s.exclude_disks.extend(patch.exclude_disks.iter().cloned());
    validate(&s)
}

/// The wire form of a stored policy.
pub fn spec(p: &Policy) -> PolicySpec {
    PolicySpec {
        sync_every_secs: p.sync_every_secs,
        recovery_points: p.recovery_points.clone(),
        express_full_before_rp: p.express_full_before_rp,
        retention_secs: p.retention_secs,
        cc_when_inconsistent: p.cc_when_inconsistent,
        cc_at: p.cc_at,
        replica_creation: p.replica_creation.clone(),
        block_size: p.block_size,
        exclude_disks: p.exclude_disks.clone(),
        verify: p.verify,
    }
}

/// `now` → None, `at:HH:MM` → Some(minutes), `manual` → Some(None)… flattened: the replica
/// creation method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    Now,
    At(u16),
    Manual,
}

/// Parses `now`, `at:HH:MM`, `manual`.
pub fn creation_time(s: &str) -> Result<Creation, PolicyError> {
    match s {
        "now" => Ok(Creation::Now),
        "manual" => Ok(Creation::Manual),
        other => match other.strip_prefix("at:").and_then(parse_hhmm) {
            Some(t) => Ok(Creation::At(t)),
            None => Err(PolicyError::BadCreation(other.to_owned())),
        },
    }
}

/// `HH:MM` → minutes after midnight.
pub fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() <= 5).then_some(h * 60 + m)
}

/// Minutes after midnight → `HH:MM`.
pub fn format_hhmm(t: u16) -> String {
    format!("{:02}:{:02}", t / 60, t % 60)
}

/// The first moment strictly after `after` (Unix seconds) at one of `times` (minutes after
/// midnight) in time zone `tz`. A time that a DST change skips happens at the moment after
/// the gap; one it repeats happens once, at its first occurrence.
pub fn next_daily(after: i64, times: &[u16], tz: &TimeZone) -> Option<i64> {
    if times.is_empty() {
        return None;
    }
    let now = Timestamp::from_second(after).ok()?.to_zoned(tz.clone());
    let mut best: Option<i64> = None;
    for day in 0..=2 {
        let date = now.date().checked_add(jiff::Span::new().days(day)).ok()?;
        for &t in times {
            let dt = date.at((t / 60) as i8, (t % 60) as i8, 0, 0);
            let Ok(z) = dt.to_zoned(tz.clone()) else { continue };
            let at = z.timestamp().as_second();
            if at > after && best.is_none_or(|b| at < b) {
                best = Some(at);
            }
        }
        if best.is_some() {
            break;
        }
    }
    best
}

/// The next run of an "every N seconds" schedule that last became due at `due` and is
/// looked at `now`: runs missed while the coordinator was down are not made up one by one.
pub fn next_every(due: i64, every: u64, now: i64) -> i64 {
    let every = every.max(1) as i64;
    if now < due + every {
        return due + every;
    }
    now + every
}

/// The space a group needs: data × (1 + churn × retention days).
pub fn recommended_bytes(data_bytes: u64, churn_per_day: f64, retention_secs: u64) -> u64 {
    let days = retention_secs as f64 / 86_400.0;
    (data_bytes as f64 * (1.0 + churn_per_day * days)).ceil() as u64
}

/// A start delay in `[0, window)` for one VM of a schedule, so a group's members do not all
/// start in the same second; stable per (VM, run) so a retry does not reshuffle.
pub fn jitter(vm: &str, due: i64, window_secs: u64) -> u64 {
    if window_secs == 0 {
        return 0;
    }
    let h = blake3::hash(format!("{vm}\0{due}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b) % window_secs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap_or(TimeZone::UTC)
    }

    fn at(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    #[test]
    fn daily_times_come_in_order_and_wrap_to_tomorrow() {
        let utc = TimeZone::UTC;
        let times = [8 * 60, 20 * 60];
        assert_eq!(next_daily(at("2026-11-23T07:59:00Z"), &times, &utc), Some(at("2026-11-23T08:00:00Z")));
        assert_eq!(next_daily(at("2026-11-23T08:00:00Z"), &times, &utc), Some(at("2026-11-23T20:00:00Z")));
        assert_eq!(next_daily(at("2026-11-23T21:00:00Z"), &times, &utc), Some(at("2026-11-24T08:00:00Z")));
        assert_eq!(next_daily(at("2026-11-23T21:00:00Z"), &[], &utc), None);
    }

    #[test]
    fn daily_times_follow_the_local_zone_across_dst() {
        let berlin = tz("Europe/Berlin");
        if berlin == TimeZone::UTC {
            return; // no tzdata on this machine: the UTC cases above still ran
        }
        // 2026-03-29: 02:00 → 03:00 in Berlin. 02:30 does not exist; it runs after the gap.
        let next = next_daily(at("2026-03-28T12:00:00Z"), &[150], &berlin).unwrap();
        assert_eq!(next, at("2026-03-29T01:30:00Z"), "03:30 CEST: the moment after the skipped time");
        // 08:00 local is 07:00Z in winter, 06:00Z in summer.
        assert_eq!(next_daily(at("2026-03-28T12:00:00Z"), &[480], &berlin), Some(at("2026-03-29T06:00:00Z")));
    }

    #[test]
    fn every_schedules_do_not_make_up_missed_runs() {
        assert_eq!(next_every(1000, 900, 1000), 1900);
        assert_eq!(next_every(1000, 900, 1899), 1900);
        assert_eq!(next_every(1000, 900, 50_000), 50_900, "down for hours: one run now, the next in 15 min");
    }

    #[test]
    fn policies_are_validated() {
        let good = PolicySpec {
            sync_every_secs: Some(900),
            recovery_points: vec![20 * 60, 8 * 60, 8 * 60],
            express_full_before_rp: false,
            retention_secs: 5 * 86_400,
            cc_when_inconsistent: true,
            cc_at: Some(60),
            replica_creation: "at:23:30".into(),
            block_size: 1 << 20,
            exclude_disks: vec![("web".into(), "tmp".into()), ("web".into(), "tmp".into())],
            verify: Default::default(),
        };
        let p = validate(&good).unwrap();
        assert_eq!(p.recovery_points, vec![480, 1200], "sorted, duplicates dropped");
        assert_eq!(spec(&p).recovery_points, p.recovery_points);
        let bad = |f: &dyn Fn(&mut PolicySpec)| {
            let mut s = good.clone();
            f(&mut s);
            validate(&s).unwrap_err()
        };
        assert_eq!(bad(&|s| s.sync_every_secs = Some(5)), PolicyError::SyncTooOften);
        assert_eq!(bad(&|s| s.recovery_points = vec![1440]), PolicyError::BadTime(1440));
        assert_eq!(bad(&|s| s.retention_secs = 3600), PolicyError::RetentionTooShort(3600));
        assert!(matches!(bad(&|s| s.replica_creation = "at:25:00".into()), PolicyError::BadCreation(_)));
        assert_eq!(bad(&|s| s.block_size = 3 << 20), PolicyError::BadBlockSize(3 << 20));
        assert_eq!(bad(&|s| s.express_full_before_rp = true), PolicyError::SyncAndExpressFull);
        assert!(matches!(
            bad(&|s| s.exclude_disks = vec![("web".into(), "../x".into())]),
            PolicyError::BadExclusion(..)
        ));
        assert_eq!(p.exclude_disks, vec![("web".to_owned(), "tmp".to_owned())], "duplicates dropped");
        assert_eq!(creation_time("manual"), Ok(Creation::Manual));
        assert_eq!(creation_time("at:02:05"), Ok(Creation::At(125)));
        assert_eq!(format_hhmm(125), "02:05");
    }

    #[test]
    fn group_set_changes_what_it_names_and_keeps_the_rest() {
        let old = validate(&PolicySpec {
            sync_every_secs: None,
            recovery_points: vec![8 * 60],
            express_full_before_rp: true,
            retention_secs: 5 * 86_400,
            cc_when_inconsistent: true,
            cc_at: None,
            replica_creation: "now".into(),
            block_size: 1 << 20,
            exclude_disks: vec![("web".into(), "tmp".into())],
            verify: Default::default(),
        })
        .unwrap();
        assert_eq!(apply(&old, &PolicyPatch::default()).unwrap(), old);
        let syncing = apply(&old, &PolicyPatch { sync_every_secs: Some(Some(600)), ..Default::default() }).unwrap();
        assert_eq!((syncing.sync_every_secs, syncing.express_full_before_rp), (Some(600), false));
        assert_eq!(syncing.recovery_points, old.recovery_points);
        let back = apply(&syncing, &PolicyPatch { express_full_before_rp: Some(true), ..Default::default() }).unwrap();
        assert_eq!((back.sync_every_secs, back.express_full_before_rp), (None, true));
        let both =
            PolicyPatch { sync_every_secs: Some(Some(600)), express_full_before_rp: Some(true), ..Default::default() };
        assert_eq!(apply(&old, &both).unwrap_err(), PolicyError::SyncAndExpressFull);
        let patch = PolicyPatch {
            cc_when_inconsistent: Some(false),
            cc_at: Some(Some(90)),
            include_disks: vec![("web".into(), "tmp".into())],
            exclude_disks: vec![("db".into(), "scratch".into())],
            ..Default::default()
        };
        let short = PolicyPatch { retention_secs: Some(3600), ..patch.clone() };
        assert_eq!(
            apply(&old, &short).unwrap_err(),
            PolicyError::RetentionTooShort(3600),
            "checked as a new policy is"
        );
        let p = apply(&old, &patch).unwrap();
        assert_eq!((p.cc_when_inconsistent, p.cc_at), (false, Some(90)));
        assert_eq!(p.exclude_disks, vec![("db".to_owned(), "scratch".to_owned())]);
        assert!(p.excludes("db", "scratch") && !p.excludes("web", "tmp"));
    }

    #[test]
    fn the_plan_adds_churn_over_the_retention_range() {
        assert_eq!(recommended_bytes(100 << 30, 0.1, 5 * 86_400), 150 << 30);
        assert_eq!(recommended_bytes(0, 0.1, 5 * 86_400), 0);
    }

    #[test]
    fn jitter_stays_in_its_window_and_spreads_members() {
        let starts: std::collections::HashSet<u64> = (0..800).map(|i| jitter(&format!("vm{i}"), 42, 120)).collect();
        assert!(starts.iter().all(|&s| s < 120));
        assert!(starts.len() > 100, "800 VMs spread over most of the 120 seconds");
        assert_eq!(jitter("a", 1, 0), 0);
    }
}
