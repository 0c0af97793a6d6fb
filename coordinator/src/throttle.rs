//! Recovery throttling (DPM's "network bandwidth usage throttling" for recoveries): a token
//! bucket at `--limit RATE`, applied only inside `--window HH:MM-HH:MM` (coordinator local time;
//! a window may wrap past midnight), full speed outside. Plain code with an injected clock, so
//! the tests below need no sleeping; the benchmark measures the real rate.

use std::time::{Duration, Instant};

/// A throttle's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub bytes_per_sec: u64,
    /// Minutes after midnight `[start, end)`; None: always.
    pub window: Option<(u16, u16)>,
}

/// Whether `minute` (after midnight) is inside `[start, end)`, wrapping past midnight.
pub fn in_window(window: Option<(u16, u16)>, minute: u16) -> bool {
    match window {
        None => true,
        Some((s, e)) if s <= e => (s..e).contains(&minute),
        Some((s, e)) => minute >= s || minute < e,
    }
}

/// A token bucket.
#[derive(Debug)]
pub struct Throttle {
    limit: Limit,
    /// Bytes that may still go without waiting.
    tokens: f64,
    last: Instant,
}

impl Throttle {
    pub fn new(limit: Limit, now: Instant) -> Self {
        Self { limit, tokens: 0.0, last: now }
    }

    /// The throttle a recovery's options ask for (None: full speed).
    pub fn for_options(o: &bulwark_protocol::messages::RecoveryOptions) -> Option<Self> {
        o.limit_bps.map(|bytes_per_sec| Self::new(Limit { bytes_per_sec, window: o.window }, Instant::now()))
    }

    /// The bucket holds at most a quarter second of the rate (bursts stay short).
    fn capacity(&self) -> f64 {
        (self.limit.bytes_per_sec as f64 / 4.0).max(1.0)
    }

    /// How long to wait before sending `bytes` at `now`, local time `minute`.
    pub fn delay(&mut self, bytes: u64, now: Instant, minute: u16) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        if !in_window(self.limit.window, minute) || self.limit.bytes_per_sec == 0 {
            self.tokens = self.capacity();
            return Duration::ZERO;
        }
        let rate = self.limit.bytes_per_sec as f64;
        self.tokens = (self.tokens + elapsed * rate).min(self.capacity());
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

/// The coordinator's local minute of the day now.
pub fn local_minute() -> u16 {
    let now = jiff::Zoned::now();
    (now.hour() as u16) * 60 + now.minute() as u16
}

/// Waits as the throttle says before `bytes` go out.
pub async fn pace(t: &mut Option<Throttle>, bytes: u64) {
    if let Some(t) = t {
        let d = t.delay(bytes, Instant::now(), local_minute());
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `total` bytes in `chunk`s, sleeping as told on a fake clock; answers the seconds.
    fn simulate(limit: Limit, total: u64, chunk: u64, minute: u16) -> f64 {
        let start = Instant::now();
        let mut now = start;
        let mut t = Throttle::new(limit, now);
        let mut sent = 0;
        while sent < total {
            now += t.delay(chunk, now, minute);
            sent += chunk;
        }
        now.duration_since(start).as_secs_f64()
    }

    #[test]
    fn inside_the_window_the_rate_holds_within_ten_percent() {
        let limit = Limit { bytes_per_sec: 10 << 20, window: Some((8 * 60, 18 * 60)) };
        let secs = simulate(limit, 100 << 20, 1 << 20, 9 * 60);
        let rate = (100u64 << 20) as f64 / secs;
        assert!((rate / (10u64 << 20) as f64 - 1.0).abs() < 0.1, "{rate} B/s");
    }

    #[test]
    fn outside_the_window_it_runs_at_full_speed() {
        let limit = Limit { bytes_per_sec: 10 << 20, window: Some((8 * 60, 18 * 60)) };
        assert_eq!(simulate(limit, 100 << 20, 1 << 20, 20 * 60), 0.0);
    }

    #[test]
    fn windows_wrap_past_midnight() {
        assert!(in_window(Some((22 * 60, 6 * 60)), 23 * 60));
        assert!(in_window(Some((22 * 60, 6 * 60)), 60));
        assert!(!in_window(Some((22 * 60, 6 * 60)), 12 * 60));
        assert!(in_window(None, 0));
        assert!(!in_window(Some((8 * 60, 9 * 60)), 9 * 60), "the end is exclusive");
    }
}
