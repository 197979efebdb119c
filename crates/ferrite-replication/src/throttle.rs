//! The replication throttle of a reassignment (Kafka's `follower.replication.throttled.rate`
//! quota, KIP-73): a byte budget that refills at a fixed rate, so that copying a partition
//! to its new replicas does not take the bandwidth clients need.
//!
//! A token bucket holding at most one second of the rate: a fetch may ask for what the
//! bucket holds, and the bytes it got are spent afterwards (the budget can go below zero
//! by one fetch's overshoot, which the next refills pay back). Time is an argument.

/// Bytes per second that mean "no throttle" (Kafka's default, `Long.MAX_VALUE`).
pub const UNTHROTTLED_BYTES_PER_SECOND: u64 = i64::MAX as u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteRateThrottle {
    rate_bytes_per_second: u64,
    /// What may be fetched now; negative after an overshoot.
    available_bytes: i64,
    last_refill_ms: Option<i64>,
}

impl ByteRateThrottle {
    /// A throttle of `rate_bytes_per_second` (at least 1), starting with a full second
    /// of budget.
    pub fn new(rate_bytes_per_second: u64) -> ByteRateThrottle {
        let rate = rate_bytes_per_second.max(1);
        ByteRateThrottle {
            rate_bytes_per_second: rate,
            available_bytes: i64::try_from(rate).unwrap_or(i64::MAX),
            last_refill_ms: None,
        }
    }

    pub fn is_unthrottled(&self) -> bool {
        self.rate_bytes_per_second >= UNTHROTTLED_BYTES_PER_SECOND
    }

    /// The bytes a fetch may ask for at `now_ms` (0 while the budget is spent).
    pub fn available(&mut self, now_ms: i64) -> u64 {
        if self.is_unthrottled() {
            return u64::MAX;
        }
        let cap = i64::try_from(self.rate_bytes_per_second).unwrap_or(i64::MAX);
        if let Some(last) = self.last_refill_ms {
            let elapsed_ms = now_ms.saturating_sub(last).max(0);
            let refill = i128::from(elapsed_ms) * i128::from(cap) / 1000;
            let next = (i128::from(self.available_bytes) + refill).min(i128::from(cap));
            self.available_bytes = i64::try_from(next).unwrap_or(cap);
        }
        self.last_refill_ms = Some(now_ms);
        u64::try_from(self.available_bytes).unwrap_or(0)
    }

    /// Spends the bytes a throttled fetch brought.
    pub fn spend(&mut self, bytes: u64) {
        if self.is_unthrottled() {
            return;
        }
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.available_bytes = self.available_bytes.saturating_sub(bytes);
    }

    /// How long until some budget is back, at `now_ms` (0 if there is some now).
    pub fn wait_ms(&mut self, now_ms: i64) -> u64 {
        if self.available(now_ms) > 0 {
            return 0;
        }
        let deficit = u128::from(self.available_bytes.unsigned_abs()) + 1;
        let ms = deficit * 1000 / u128::from(self.rate_bytes_per_second);
        u64::try_from(ms.max(1)).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refills_at_the_rate_up_to_one_second() {
        let mut t = ByteRateThrottle::new(1000);
        assert_eq!(t.available(0), 1000);
        t.spend(1500);
        assert_eq!(t.available(0), 0);
        assert_eq!(t.wait_ms(0), 501);
        // 500 ms pay back the overshoot; 250 more give 250 bytes.
        assert_eq!(t.available(500), 0);
        assert_eq!(t.available(750), 250);
        // Idle for long: never more than one second's worth.
        assert_eq!(t.available(60_000), 1000);
    }

    #[test]
    fn over_a_long_run_the_bytes_fetched_stay_within_the_rate() {
        // A fetcher asking every 10 ms for what it may have, getting all it asks.
        let mut t = ByteRateThrottle::new(50_000);
        let mut fetched = 0u64;
        for now in (0..10_000).step_by(10) {
            let may = t.available(now).min(64 * 1024);
            t.spend(may);
            fetched += may;
        }
        // 10 s at 50 kB/s, plus the first second's budget.
        assert!(fetched <= 50_000 * 11, "{fetched}");
        assert!(fetched >= 50_000 * 9, "{fetched}");
    }

    #[test]
    fn the_default_rate_never_throttles() {
        let mut t = ByteRateThrottle::new(UNTHROTTLED_BYTES_PER_SECOND);
        t.spend(u64::MAX);
        assert_eq!(t.available(0), u64::MAX);
        assert_eq!(t.wait_ms(0), 0);
    }
}
