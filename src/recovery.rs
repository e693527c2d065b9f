//! The last messages this instance sent to its clients (alerts and storm
//! summaries), so that a client that lost its connection can be sent what
//! it missed when it comes back.
//!
//! Every instance delivers every alert, so any instance can answer a client
//! that reconnects after its own instance stopped: the client names the last
//! alert or summary it saw (`/ws?since=<id>`), and gets every later message
//! still held here. The ring holds what was *sent*, after the storm limit
//! (`storm.rs`), so a replay is never denser than the live stream was: in a
//! storm it is summaries, not thousands of alerts.
//!
//! The ring is owned by the fan-out thread, which also registers the client,
//! so no message can fall between the replay and the live stream.

use crate::message::Alert;
use crate::storm::Summary;
use std::collections::VecDeque;

/// A message every client of this instance was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Alert(Alert),
    Summary(Summary),
}

impl Sent {
    pub fn id(&self) -> &str {
        match self {
            Sent::Alert(alert) => &alert.id,
            Sent::Summary(summary) => &summary.id,
        }
    }

    /// The message as sent again, marked `"replayed": true`.
    pub fn to_replay_json(&self) -> String {
        match self {
            Sent::Alert(alert) => alert.to_replay_json(),
            Sent::Summary(summary) => summary.to_replay_json(),
        }
    }
}

/// What a reconnecting client is owed.
#[derive(Debug, PartialEq, Eq)]
pub enum Missed<'a> {
    /// The messages after the one it named, oldest first (possibly none).
    Messages(Vec<&'a Sent>),
    /// The message it named is not held here (too old, or never sent by
    /// this instance): it may have missed some.
    Unknown,
}

pub struct Recent {
    capacity: usize,
    sent: VecDeque<Sent>,
}

impl Recent {
    /// A ring of at most `capacity` messages; 0 keeps none (every `since`
    /// is then unknown).
    pub fn new(capacity: usize) -> Recent {
        Recent {
            capacity,
            sent: VecDeque::with_capacity(capacity.min(1024)),
        }
    }

    /// Remembers a message sent to every client, forgetting the oldest when
    /// full.
    pub fn push(&mut self, message: Sent) {
        if self.capacity == 0 {
            return;
        }
        if self.sent.len() == self.capacity {
            self.sent.pop_front();
        }
        self.sent.push_back(message);
    }

    /// The messages sent after the one with `id`. A linear scan: the ring
    /// is small and this runs once per reconnect.
    pub fn after(&self, id: &str) -> Missed<'_> {
        match self.sent.iter().rposition(|m| m.id() == id) {
            Some(i) => Missed::Messages(self.sent.iter().skip(i + 1).collect()),
            None => Missed::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(n: u64) -> Alert {
        Alert {
            timestamp: n,
            region: "ams".into(),
            sender: "a".into(),
            id: format!("{n:032x}"),
        }
    }

    fn sent(n: u64) -> Sent {
        Sent::Alert(alert(n))
    }

    fn ids(missed: Missed<'_>) -> Vec<u64> {
        match missed {
            Missed::Messages(sent) => sent
                .iter()
                .map(|m| match m {
                    Sent::Alert(a) => a.timestamp,
                    Sent::Summary(s) => s.count,
                })
                .collect(),
            Missed::Unknown => panic!("expected messages, got Unknown"),
        }
    }

    #[test]
    fn returns_what_came_after_in_order() {
        let mut ring = Recent::new(10);
        for n in 1..=5 {
            ring.push(sent(n));
        }
        assert_eq!(ids(ring.after(&alert(2).id)), [3, 4, 5]);
        assert_eq!(ids(ring.after(&alert(5).id)), Vec::<u64>::new());
    }

    #[test]
    fn forgets_the_oldest_and_calls_them_unknown() {
        let mut ring = Recent::new(3);
        for n in 1..=5 {
            ring.push(sent(n));
        }
        assert_eq!(ring.after(&alert(2).id), Missed::Unknown);
        assert_eq!(ids(ring.after(&alert(3).id)), [4, 5]);
        assert_eq!(ring.after("not-an-id"), Missed::Unknown);
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut ring = Recent::new(0);
        ring.push(sent(1));
        assert_eq!(ring.after(&alert(1).id), Missed::Unknown);
    }

    #[test]
    fn a_summary_can_be_named_and_is_replayed_in_its_place() {
        let mut ring = Recent::new(10);
        ring.push(sent(1));
        ring.push(Sent::Summary(Summary {
            id: "5".repeat(32),
            count: 700,
            regions: Default::default(),
            from: 0,
            to: 200,
        }));
        ring.push(sent(2));
        assert_eq!(ids(ring.after(&alert(1).id)), [700, 2]);
        assert_eq!(ids(ring.after(&"5".repeat(32))), [2]);
    }
}
