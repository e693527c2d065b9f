//! Who is watching: every instance tells the others, through the broker,
//! how many clients it has, and each instance shows its clients the sum.
//!
//! A heartbeat carries an instance's id, region and client count. It is
//! published every interval; an instance not heard from for three intervals
//! is forgotten (it stopped, or crashed without saying so). Clients get a
//! `PRESENCE` message when the picture changes, at most once per interval,
//! so a busy deploy cannot turn into a storm of updates.
//!
//! This type only keeps the books; the fan-out thread owns it, publishes the
//! heartbeats and sends the messages.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// One instance's report, as it travels through the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub instance: String,
    #[serde(rename = "regionCode")]
    pub region: String,
    pub clients: u64,
    /// When the sender made it, in ms since the epoch by the sender's clock
    /// (0 from instances older than this field: always taken).
    #[serde(default)]
    pub sent: u64,
}

/// Instances missing this many heartbeats in a row are forgotten.
const MISSED_BEATS: u32 = 3;

struct Peer {
    region: String,
    clients: u64,
    /// The `sent` of the heartbeat these counts came from.
    sent: u64,
    seen: Instant,
}

pub struct Presence {
    interval: Duration,
    peers: HashMap<String, Peer>,
    /// The picture last sent to clients, and when.
    sent: Option<(String, Instant)>,
    /// Whether a count changed since the last picture was made: the fan-out
    /// asks after every event, and the answer is free when nothing changed.
    changed: bool,
}

impl Presence {
    pub fn new(interval: Duration) -> Presence {
        Presence {
            interval,
            peers: HashMap::new(),
            sent: None,
            changed: true,
        }
    }

    /// Takes in a heartbeat (this instance's own included).
    ///
    /// Pub/Sub may deliver a heartbeat twice (a redelivery), or late, after a
    /// newer one from the same instance. One older than the last taken from
    /// its instance is dropped, so it cannot put an old count back. A copy
    /// of the last one changes nothing but when the instance was last heard
    /// of: at worst a stopped instance is shown three intervals longer.
    pub fn record(&mut self, beat: Heartbeat, now: Instant) {
        if let Some(peer) = self.peers.get(&beat.instance)
            && beat.sent < peer.sent
        {
            return;
        }
        if let Some(peer) = self.peers.get_mut(&beat.instance)
            && peer.region == beat.region
            && peer.clients == beat.clients
        {
            peer.seen = now;
            peer.sent = beat.sent;
            return;
        }
        self.changed = true;
        self.peers.insert(
            beat.instance,
            Peer {
                region: beat.region,
                clients: beat.clients,
                sent: beat.sent,
                seen: now,
            },
        );
    }

    /// Forgets instances not heard from for three intervals.
    pub fn expire(&mut self, now: Instant) {
        let horizon = self.interval * MISSED_BEATS;
        let before = self.peers.len();
        self.peers
            .retain(|_, peer| now.saturating_duration_since(peer.seen) <= horizon);
        self.changed |= self.peers.len() != before;
    }

    /// The `PRESENCE` message for the current picture:
    /// `{"message":"PRESENCE","regions":{"ams":12,...},"total":N}`.
    pub fn message(&self) -> String {
        let mut regions: BTreeMap<&str, u64> = BTreeMap::new();
        for peer in self.peers.values() {
            *regions.entry(peer.region.as_str()).or_default() += peer.clients;
        }
        let total: u64 = regions.values().sum();
        serde_json::json!({"message": "PRESENCE", "regions": regions, "total": total}).to_string()
    }

    /// The message to send now, if the picture changed since the last one and
    /// the last one is at least an interval old.
    pub fn due(&mut self, now: Instant) -> Option<String> {
        if !self.changed {
            return None;
        }
        if let Some((_, at)) = &self.sent
            && now.saturating_duration_since(*at) < self.interval
        {
            return None; // held back until the interval is over
        }
        self.changed = false;
        let message = self.message();
        match &self.sent {
            Some((last, _)) if *last == message => None, // changed, and back
            _ => {
                self.sent = Some((message.clone(), now));
                Some(message)
            }
        }
    }

    /// When a held-back change may go out, if one is waiting.
    pub fn next_due(&self) -> Option<Instant> {
        match &self.sent {
            Some((_, at)) if self.changed => Some(*at + self.interval),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const INTERVAL: Duration = Duration::from_secs(15);

    fn beat(instance: &str, region: &str, clients: u64) -> Heartbeat {
        Heartbeat {
            instance: instance.into(),
            region: region.into(),
            clients,
            sent: 0,
        }
    }

    fn parsed(message: &str) -> Value {
        serde_json::from_str(message).expect("JSON")
    }

    #[test]
    fn sums_by_region() {
        let now = Instant::now();
        let mut p = Presence::new(INTERVAL);
        p.record(beat("a", "ams", 12), now);
        p.record(beat("b", "ams", 3), now);
        p.record(beat("c", "syd", 4), now);
        assert_eq!(
            parsed(&p.message()),
            json!({"message": "PRESENCE", "regions": {"ams": 15, "syd": 4}, "total": 19})
        );
    }

    #[test]
    fn a_newer_heartbeat_replaces_the_older() {
        let now = Instant::now();
        let mut p = Presence::new(INTERVAL);
        p.record(beat("a", "ams", 12), now);
        p.record(beat("a", "ams", 2), now);
        assert_eq!(parsed(&p.message())["total"], 2);
    }

    #[test]
    fn a_late_copy_of_an_older_heartbeat_cannot_put_its_count_back() {
        let now = Instant::now();
        let mut p = Presence::new(INTERVAL);
        let older = Heartbeat {
            sent: 1_000,
            ..beat("a", "ams", 12)
        };
        let newer = Heartbeat {
            sent: 2_000,
            ..beat("a", "ams", 2)
        };
        p.record(older.clone(), now);
        p.record(newer.clone(), now);
        p.record(older, now + INTERVAL);
        assert_eq!(parsed(&p.message())["total"], 2);
        // A copy of the last one is taken (it is the same statement).
        p.record(newer, now + INTERVAL);
        assert_eq!(parsed(&p.message())["total"], 2);
    }

    #[test]
    fn silent_instances_are_forgotten_after_three_intervals() {
        let start = Instant::now();
        let mut p = Presence::new(INTERVAL);
        p.record(beat("a", "ams", 1), start);
        p.record(beat("b", "syd", 1), start + INTERVAL * 2);
        p.expire(start + INTERVAL * 3);
        assert_eq!(parsed(&p.message())["total"], 2);
        p.expire(start + INTERVAL * 3 + Duration::from_millis(1));
        assert_eq!(parsed(&p.message())["regions"], json!({"syd": 1}));
    }

    #[test]
    fn changes_go_out_at_most_once_per_interval() {
        let start = Instant::now();
        let mut p = Presence::new(INTERVAL);
        p.record(beat("a", "ams", 1), start);
        p.due(start).expect("the first picture goes out at once");
        // Nothing changed: nothing to send, nothing waiting.
        assert_eq!(p.due(start + INTERVAL * 2), None);
        assert_eq!(p.next_due(), None);

        let later = start + INTERVAL * 2;
        p.record(beat("a", "ams", 2), later);
        assert!(
            p.due(later).is_some(),
            "a change after a quiet interval goes at once"
        );
        p.record(beat("a", "ams", 3), later + Duration::from_secs(1));
        assert_eq!(p.due(later + Duration::from_secs(1)), None, "held back");
        assert_eq!(p.next_due(), Some(later + INTERVAL));
        let sent = p
            .due(later + INTERVAL)
            .expect("sent once the interval is over");
        assert_eq!(parsed(&sent)["total"], 3);
    }
}
