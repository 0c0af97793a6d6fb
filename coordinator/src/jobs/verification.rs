//! Which recovery point of a VM to verify next (`--verify`), as a function of the policy's
//! mode, the VM's points with their last verification, and `now`. The verifier actor reads the
//! catalog and the clock and runs what this says.

use bulwark_protocol::messages::VerifyMode;

/// A day, in seconds: `daily` verifies each VM at most this often.
pub const DAY_SECS: u64 = 86_400;

/// A recovery point as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub id: [u8; 16],
    /// Unix milliseconds.
    pub created_at_ms: u64,
    /// Unix seconds of its last verification, none if never.
    pub verified_at: Option<u64>,
}

/// The point of one VM to verify now, if any:
/// - `every-rp`: the newest point never verified (a backlog goes newest first; a point that
///   failed is reported once, not verified again and again);
/// - `daily`: the newest point, when no point of the VM was verified in the last day (so a
///   VM without new points still has its newest one re-read daily, which finds rot);
/// - `off`: none.
pub fn next_to_verify(mode: VerifyMode, points: &[Point], now_secs: u64) -> Option<[u8; 16]> {
    match mode {
        VerifyMode::Off => None,
        VerifyMode::EveryRp => {
            points.iter().filter(|p| p.verified_at.is_none()).max_by_key(|p| p.created_at_ms).map(|p| p.id)
        }
        VerifyMode::Daily => {
            let last = points.iter().filter_map(|p| p.verified_at).max();
            if last.is_some_and(|t| now_secs.saturating_sub(t) < DAY_SECS) {
                return None;
            }
            points.iter().max_by_key(|p| p.created_at_ms).map(|p| p.id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u8, created_s: u64, verified_at: Option<u64>) -> Point {
        Point { id: [n; 16], created_at_ms: created_s * 1000, verified_at }
    }

    #[test]
    fn every_rp_takes_the_newest_unverified_point_and_never_repeats_one() {
        let now = 10 * DAY_SECS;
        let pts = [p(1, 100, None), p(2, 300, None), p(3, 200, Some(250))];
        assert_eq!(next_to_verify(VerifyMode::EveryRp, &pts, now), Some([2; 16]));
        let pts = [p(1, 100, None), p(2, 300, Some(now)), p(3, 200, Some(250))];
        assert_eq!(next_to_verify(VerifyMode::EveryRp, &pts, now), Some([1; 16]), "the backlog, newest first");
        let pts = [p(1, 100, Some(1)), p(2, 300, Some(now))];
        assert_eq!(next_to_verify(VerifyMode::EveryRp, &pts, now), None);
        assert_eq!(next_to_verify(VerifyMode::EveryRp, &[], now), None);
    }

    #[test]
    fn daily_rereads_the_newest_point_once_a_day() {
        let now = 10 * DAY_SECS;
        let pts = [p(1, 100, None), p(2, 300, None)];
        assert_eq!(next_to_verify(VerifyMode::Daily, &pts, now), Some([2; 16]));
        let pts = [p(1, 100, Some(now - DAY_SECS + 1)), p(2, 300, None)];
        assert_eq!(next_to_verify(VerifyMode::Daily, &pts, now), None, "one verification a day per VM");
        let pts = [p(1, 100, None), p(2, 300, Some(now - DAY_SECS))];
        assert_eq!(next_to_verify(VerifyMode::Daily, &pts, now), Some([2; 16]), "the same point, a day later");
    }

    #[test]
    fn off_verifies_nothing() {
        assert_eq!(next_to_verify(VerifyMode::Off, &[p(1, 1, None)], 5), None);
    }
}
