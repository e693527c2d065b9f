//! Every client sees every alert once, whatever Pub/Sub does.
//!
//! Pub/Sub delivers at least once, and can hand this instance two copies of
//! one alert in two ways: a redelivery (an acknowledgement lost or late: the
//! same message again) and a retried publish (the first attempt was stored,
//! but its answer never came back, so the publisher sent the batch again:
//! two messages with two message ids). Both copies carry the alert's own id,
//! which the instance that took the press assigned before publishing, so
//! that id is what is remembered here.
//!
//! For how long? The copies of one alert are published at most the publish
//! timeout apart (the publisher gives up on an alert after
//! `PUBSUB_PUBLISH_TIMEOUT`), and each copy reaches this instance at most the
//! subscription's retention (600 s) after it was published, or never. So all
//! copies arrive within timeout + retention of the first: the window is that,
//! plus a minute for clocks and queues. It is a span of time, not a count, so
//! a storm cannot push an id out early by sheer numbers of newer ones.
//!
//! Memory is still bounded: ids are kept as 64-bit fingerprints, in a hash
//! set and a queue in arrival order (with one mark per second of arrivals,
//! not a time per id), about 27 bytes each (6.8 MiB measured when full), at
//! most [`MAX_IDS`] of them:
//! [`MAX_BYTES`], which `limits.rs` keeps aside in Pub/Sub mode. That is a
//! whole-fleet storm of 50,000 clients pressing five times within the
//! window. Past it, the oldest ids are forgotten early (counted in
//! `skywatch_dedupe_forgotten_early_total` and logged), so a duplicate of one
//! of those could then show twice; nothing is ever lost.
//!
//! Heartbeats do not come through here: a heartbeat is a statement ("instance
//! X has N clients, as of its clock's T"), and the presence picture drops one
//! not newer than the last it took from that instance (`presence.rs`).

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

/// The most alert ids remembered at once.
pub const MAX_IDS: usize = 1 << 18;

/// What [`MAX_IDS`] cost at the most: the hash set's table (2^19 buckets of
/// a u64 and a control byte, hashbrown's load factor being 7/8) and the
/// queue (2^18 u64s), plus the old table while the set grows into its last
/// size.
pub const MAX_BYTES: u64 = (1 << 19) * 9 + (1 << 18) * 8 + (1 << 18) * 9;

/// Slack on top of publish timeout plus retention, for the queues in between.
const MARGIN: Duration = Duration::from_secs(60);

/// Alert ids seen within the window, oldest first.
pub struct SeenAlerts {
    window: Duration,
    max_ids: usize,
    ids: HashSet<u64>,
    /// Fingerprints in the order they were first seen.
    order: VecDeque<u64>,
    /// How many of `order` (from its front) arrived in each second, as
    /// (seconds since `epoch`, count): a storm adds ids, not marks.
    marks: VecDeque<(u64, usize)>,
    epoch: Instant,
    /// How the string ids of foreign or older publishers are fingerprinted:
    /// keyed at random, so no one can choose ids that collide on purpose.
    hasher: RandomState,
}

/// What [`SeenAlerts::first_sight`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Sight {
    /// Not seen within the window: hand it on.
    First,
    /// A copy of an alert already handed on: drop it.
    Again,
}

impl SeenAlerts {
    /// Remembers ids for `publish_timeout + retention` plus a margin.
    pub fn new(publish_timeout: Duration, retention: Duration) -> SeenAlerts {
        SeenAlerts::with_limits(publish_timeout + retention + MARGIN, MAX_IDS)
    }

    fn with_limits(window: Duration, max_ids: usize) -> SeenAlerts {
        SeenAlerts {
            window,
            max_ids,
            ids: HashSet::new(),
            order: VecDeque::new(),
            marks: VecDeque::new(),
            epoch: Instant::now(),
            hasher: RandomState::new(),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether alert `id` is seen for the first time within the window, and
    /// remembers it. Also returns how many ids had to be forgotten before
    /// their time to make room (zero unless memory is full).
    pub fn first_sight(&mut self, id: &str, now: Instant) -> (Sight, usize) {
        self.expire(now);
        let key = self.fingerprint(id);
        if self.ids.contains(&key) {
            return (Sight::Again, 0);
        }
        let mut forgotten = 0;
        while self.order.len() >= self.max_ids {
            self.forget_oldest();
            forgotten += 1;
        }
        self.ids.insert(key);
        self.order.push_back(key);
        let second = now.saturating_duration_since(self.epoch).as_secs();
        match self.marks.back_mut() {
            Some((at, count)) if *at == second => *count += 1,
            _ => self.marks.push_back((second, 1)),
        }
        (Sight::First, forgotten)
    }

    fn forget_oldest(&mut self) {
        if let Some(oldest) = self.order.pop_front() {
            self.ids.remove(&oldest);
        }
        if let Some((_, count)) = self.marks.front_mut() {
            *count -= 1;
            if *count == 0 {
                self.marks.pop_front();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Forgets ids first seen longer than the window ago (to the second).
    fn expire(&mut self, now: Instant) {
        let now = now.saturating_duration_since(self.epoch);
        while let Some(&(second, count)) = self.marks.front() {
            if now.saturating_sub(Duration::from_secs(second)) <= self.window {
                break;
            }
            self.marks.pop_front();
            for key in self.order.drain(..count) {
                self.ids.remove(&key);
            }
        }
        // A storm's table stays at its peak size after the storm unless told.
        if self.ids.capacity() > 4 * self.ids.len().max(1024) {
            self.ids.shrink_to_fit();
            self.order.shrink_to_fit();
            self.marks.shrink_to_fit();
        }
    }

    /// Skywatch's ids are 128 random bits in hex: any 64 of them are a
    /// fingerprint already (two alerts share one with odds of one in 2^64 per
    /// pair). Any other id is hashed with a secret key.
    fn fingerprint(&self, id: &str) -> u64 {
        match u128::from_str_radix(id, 16) {
            Ok(bits) if id.len() == 32 => bits as u64,
            _ => self.hasher.hash_one(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_A: &str = "0123456789abcdef0123456789abcdef";
    const ID_B: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn a_second_copy_within_the_window_is_dropped() {
        let start = Instant::now();
        let mut seen = SeenAlerts::new(Duration::from_secs(600), Duration::from_secs(600));
        assert_eq!(seen.window(), Duration::from_secs(1260));
        assert_eq!(seen.first_sight(ID_A, start), (Sight::First, 0));
        assert_eq!(seen.first_sight(ID_B, start), (Sight::First, 0));
        let late = start + Duration::from_secs(1260);
        assert_eq!(seen.first_sight(ID_A, late), (Sight::Again, 0));
        // Ids from another publisher's scheme are remembered too.
        assert_eq!(seen.first_sight("not-hex", late), (Sight::First, 0));
        assert_eq!(seen.first_sight("not-hex", late), (Sight::Again, 0));
    }

    #[test]
    fn ids_are_forgotten_after_the_window_not_after_a_count() {
        let start = Instant::now();
        let mut seen = SeenAlerts::with_limits(Duration::from_secs(60), 100_000);
        assert_eq!(seen.first_sight(ID_A, start).0, Sight::First);
        // A storm of newer ids does not push the first one out...
        for n in 0..50_000u128 {
            let id = format!("{:032x}", n + 1);
            assert_eq!(seen.first_sight(&id, start).0, Sight::First);
        }
        assert_eq!(seen.first_sight(ID_A, start).0, Sight::Again);
        // ...but the end of the window does, and frees the memory.
        let after = start + Duration::from_secs(62);
        assert_eq!(seen.first_sight(ID_B, after).0, Sight::First);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen.first_sight(ID_A, after).0, Sight::First);
    }

    #[test]
    fn past_the_memory_bound_the_oldest_are_forgotten_early_and_counted() {
        let start = Instant::now();
        let mut seen = SeenAlerts::with_limits(Duration::from_secs(60), 3);
        for id in ["a1", "a2", "a3"] {
            assert_eq!(seen.first_sight(id, start), (Sight::First, 0));
        }
        assert_eq!(seen.first_sight("a4", start), (Sight::First, 1));
        assert_eq!(seen.len(), 3);
        assert_eq!(seen.first_sight("a1", start), (Sight::First, 1));
        assert_eq!(seen.first_sight("a4", start), (Sight::Again, 0));
    }
}
