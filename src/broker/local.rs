//! The embedded broker: one instance, no network. Publishing an alert hands it
//! straight to this instance's fan-out, which is exactly what a Pub/Sub round
//! trip would do with a single subscriber.

use super::{Broker, Delivery, PublishError};
use crate::message::Alert;
use crate::metrics::METRICS;
use crate::presence::Heartbeat;
use crossbeam_channel::{Sender, TrySendError};
use std::time::Instant;

pub struct LocalBroker {
    deliveries: Sender<Delivery>,
}

impl LocalBroker {
    pub fn new(deliveries: Sender<Delivery>) -> LocalBroker {
        LocalBroker { deliveries }
    }
}

impl Broker for LocalBroker {
    fn name(&self) -> &'static str {
        "local"
    }

    fn publish(&self, alert: Alert) -> Result<(), PublishError> {
        // try_send: a full fan-out queue means the server is overloaded, and
        // the sender is better told so than left blocked.
        match self.deliveries.try_send(Delivery::Alert(alert)) {
            Ok(()) => {
                METRICS.alerts_published.inc();
                Ok(())
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                Err(PublishError::Unavailable)
            }
        }
    }

    fn publish_presence(&self, beat: Heartbeat) {
        let _ = self.deliveries.try_send(Delivery::Presence(beat));
    }

    fn shutdown(&self, _deadline: Instant) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(id: &str) -> Alert {
        Alert {
            timestamp: 1,
            region: "r".into(),
            sender: "s".into(),
            id: id.into(),
        }
    }

    #[test]
    fn published_alerts_come_back_in_order() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let broker = LocalBroker::new(tx);
        broker.publish(alert("a")).unwrap();
        broker.publish(alert("b")).unwrap();
        assert_eq!(rx.try_recv().unwrap(), Delivery::Alert(alert("a")));
        assert_eq!(rx.try_recv().unwrap(), Delivery::Alert(alert("b")));
    }

    #[test]
    fn a_full_queue_is_reported_not_blocked_on() {
        let (tx, _rx) = crossbeam_channel::bounded(1);
        let broker = LocalBroker::new(tx);
        broker.publish(alert("a")).unwrap();
        assert_eq!(broker.publish(alert("b")), Err(PublishError::Unavailable));
    }
}
