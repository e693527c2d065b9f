//! The token bucket behind every rate limit: per connection for alerts, per
//! source address for alerts and control messages (`address.rs`).
//!
//! A bucket holds up to `burst` tokens and refills at `per_second`; each alert
//! takes one. It lets a person press the button a few times in a row while
//! keeping a script from flooding every client on every instance.

use std::time::Instant;

#[derive(Debug)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket: a new connection may send `burst` alerts at once.
    pub fn new(per_second: f64, burst: u32, now: Instant) -> TokenBucket {
        let burst = f64::from(burst);
        TokenBucket {
            per_second,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Whether the bucket has refilled to its burst by `now`: forgetting it
    /// then grants nothing that a new, full bucket would not.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.per_second >= self.burst
    }

    /// Takes a token if one is available at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        // saturating: a `now` earlier than `last` (never from Instant::now,
        // possible from a caller's clock) must not drain the bucket.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_full_bucket_allows_a_burst_then_refuses() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1.0, 5, t0);
        let allowed = (0..8).filter(|_| bucket.try_take(t0)).count();
        assert_eq!(allowed, 5);
    }

    #[test]
    fn tokens_refill_at_the_configured_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 1, t0);
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0 + Duration::from_millis(400)));
        assert!(bucket.try_take(t0 + Duration::from_millis(500)));
        assert!(!bucket.try_take(t0 + Duration::from_millis(600)));
    }

    #[test]
    fn refill_never_exceeds_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1.0, 3, t0);
        let later = t0 + Duration::from_secs(3600);
        let allowed = (0..10).filter(|_| bucket.try_take(later)).count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn fractional_rates_work() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(0.5, 1, t0);
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0 + Duration::from_millis(1999)));
        assert!(bucket.try_take(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn a_clock_going_backwards_does_not_drain_or_fill() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut bucket = TokenBucket::new(1.0, 1, t0);
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0 - Duration::from_secs(5)));
        assert!(bucket.try_take(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_bucket_is_full_again_only_once_refilled() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 4, t0);
        assert!(bucket.is_full(t0));
        assert!(bucket.try_take(t0) && bucket.try_take(t0));
        assert!(!bucket.is_full(t0 + Duration::from_millis(900)));
        assert!(bucket.is_full(t0 + Duration::from_secs(1)));
    }
}
