//! File descriptors kept in reserve. At start the coordinator raises its soft `RLIMIT_NOFILE`
//! to the hard limit; what serves unauthenticated peers (the metrics endpoint) then stops
//! accepting while the open descriptors come within a reserve of that limit, so it can never
//! take the descriptors a commit needs (packs, the fsync of every catalog file).
//!
//! The decision is plain ([`FdBudget::admits`]); [`open_count`] reads `/proc/self/fd`.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors the metrics endpoint never takes, however low the limit.
pub const MIN_RESERVE: u64 = 64;

/// The descriptor limit and the part of it kept for everything but the metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    pub limit: u64,
    pub reserve: u64,
}

impl FdBudget {
    /// The budget under a soft limit of `limit` descriptors: a quarter of it, and at least
    /// [`MIN_RESERVE`], stays in reserve.
    pub fn for_limit(limit: u64) -> Self {
        Self { limit, reserve: (limit / 4).max(MIN_RESERVE) }
    }

    /// Whether a new metrics connection may be accepted while `open` descriptors are open.
    pub fn admits(&self, open: u64) -> bool {
        open.saturating_add(self.reserve) < self.limit
    }
}

/// Raises the soft descriptor limit to the hard one; answers the soft limit in force after.
pub fn raise_limit() -> std::io::Result<u64> {
    let now = getrlimit(Resource::Nofile);
    match (now.current, now.maximum) {
        (Some(soft), Some(hard)) if soft < hard => {
            setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) })?;
            Ok(hard)
        }
        (Some(soft), _) => Ok(soft),
        (None, _) => Ok(u64::MAX),
    }
}

/// The soft descriptor limit in force.
pub fn soft_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Descriptors this process has open now (the count includes the one used to count them),
/// or None where `/proc` cannot tell.
pub fn open_count() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_quarter_and_at_least_the_minimum() {
        assert_eq!(FdBudget::for_limit(256).reserve, MIN_RESERVE);
        assert_eq!(FdBudget::for_limit(1024).reserve, 256);
        assert_eq!(FdBudget::for_limit(1 << 20).reserve, 1 << 18);
        assert_eq!(FdBudget::for_limit(16).reserve, MIN_RESERVE, "a tiny limit keeps everything");
    }

    #[test]
    fn connections_are_admitted_only_below_the_reserve() {
        let b = FdBudget::for_limit(256);
        assert!(b.admits(0));
        assert!(b.admits(191));
        assert!(!b.admits(192));
        assert!(!b.admits(300));
        assert!(!FdBudget::for_limit(16).admits(0));
        assert!(FdBudget::for_limit(u64::MAX).admits(u64::MAX - (u64::MAX / 4) - 1));
        assert!(!FdBudget::for_limit(u64::MAX).admits(u64::MAX), "no overflow");
    }

    #[test]
    fn the_limit_is_raised_to_the_hard_limit_and_fds_are_counted() {
        let soft = raise_limit().unwrap();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(now.current, Some(soft));
        assert_eq!(now.current, now.maximum);
        assert!(open_count().unwrap() >= 3, "stdin, stdout, stderr and the directory itself");
    }
}
