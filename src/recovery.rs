//! The last alerts this instance delivered, so that a client that lost its
//! connection can be sent what it missed when it comes back.
//!
//! Every instance delivers every alert, so any instance can answer a client
//! that reconnects after its own instance stopped: the client names the last
//! alert it saw (`/ws?since=<id>`), and gets every later one still held here.
//! The ring is owned by the fan-out thread, which also registers the client,
//! so no alert can fall between the replay and the live stream.

use crate::message::Alert;
use std::collections::VecDeque;

/// What a reconnecting client is owed.
#[derive(Debug, PartialEq, Eq)]
pub enum Missed<'a> {
    /// The alerts after the one it named, oldest first (possibly none).
    Alerts(Vec<&'a Alert>),
    /// The alert it named is not held here (too old, or from before this
    /// instance started): it may have missed some.
    Unknown,
}

pub struct Recent {
    capacity: usize,
    alerts: VecDeque<Alert>,
}

impl Recent {
    /// A ring of at most `capacity` alerts; 0 keeps none (every `since` is
    /// then unknown).
    pub fn new(capacity: usize) -> Recent {
        Recent {
            capacity,
            alerts: VecDeque::with_capacity(capacity.min(1024)),
        }
    }

    /// Remembers a delivered alert, forgetting the oldest when full.
    pub fn push(&mut self, alert: &Alert) {
        if self.capacity == 0 {
            return;
        }
        if self.alerts.len() == self.capacity {
            self.alerts.pop_front();
        }
        self.alerts.push_back(alert.clone());
    }

    /// The alerts delivered after the one with `id`. A linear scan: the ring
    /// is small and this runs once per reconnect.
    pub fn after(&self, id: &str) -> Missed<'_> {
        match self.alerts.iter().rposition(|a| a.id == id) {
            Some(i) => Missed::Alerts(self.alerts.iter().skip(i + 1).collect()),
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

    fn ids(missed: Missed<'_>) -> Vec<u64> {
        match missed {
            Missed::Alerts(alerts) => alerts.iter().map(|a| a.timestamp).collect(),
            Missed::Unknown => panic!("expected alerts, got Unknown"),
        }
    }

    #[test]
    fn returns_what_came_after_in_order() {
        let mut ring = Recent::new(10);
        for n in 1..=5 {
            ring.push(&alert(n));
        }
        assert_eq!(ids(ring.after(&alert(2).id)), [3, 4, 5]);
        assert_eq!(ids(ring.after(&alert(5).id)), Vec::<u64>::new());
    }

    #[test]
    fn forgets_the_oldest_and_calls_them_unknown() {
        let mut ring = Recent::new(3);
        for n in 1..=5 {
            ring.push(&alert(n));
        }
        assert_eq!(ring.after(&alert(2).id), Missed::Unknown);
        assert_eq!(ids(ring.after(&alert(3).id)), [4, 5]);
        assert_eq!(ring.after("not-an-id"), Missed::Unknown);
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut ring = Recent::new(0);
        ring.push(&alert(1));
        assert_eq!(ring.after(&alert(1).id), Missed::Unknown);
    }
}
