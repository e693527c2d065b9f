//! The embedded broker: one instance, no network. Publishing an alert hands it
//! straight to this instance's fan-out, which is exactly what a Pub/Sub round
//! trip would do with a single subscriber.
//!
//! When everyone presses at once the fan-out's queue can fill. A press is
//! then not refused: it is counted (`storm::Overflow`) and goes out in the
//! next storm summary, which is where it would have ended up anyway, since a
//! full queue means far more presses than the storm limit lets through as
//! alerts. So a press within its sender's rate limit is never refused
//! because other people are pressing too.

use super::{Broker, Delivery, PublishError};
use crate::message::Alert;
use crate::metrics::METRICS;
use crate::presence::Heartbeat;
use crate::storm::Overflow;
use crossbeam_channel::{Sender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

pub struct LocalBroker {
    deliveries: Sender<Delivery>,
    overflow: Arc<Overflow>,
}

impl LocalBroker {
    pub fn new(deliveries: Sender<Delivery>, overflow: Arc<Overflow>) -> LocalBroker {
        LocalBroker {
            deliveries,
            overflow,
        }
    }
}

impl Broker for LocalBroker {
    fn name(&self) -> &'static str {
        "local"
    }

    fn publish(&self, alert: Alert) -> Result<(), PublishError> {
        // try_send: a connection thread never waits for the fan-out.
        match self.deliveries.try_send(Delivery::Alert(alert)) {
            Ok(()) => {}
            Err(TrySendError::Full(delivery)) => {
                if let Delivery::Alert(alert) = delivery {
                    self.overflow.add(&alert);
                }
            }
            Err(TrySendError::Disconnected(_)) => return Err(PublishError::Unavailable),
        }
        METRICS.alerts_published.inc();
        Ok(())
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
        let broker = LocalBroker::new(tx, Arc::default());
        broker.publish(alert("a")).unwrap();
        broker.publish(alert("b")).unwrap();
        assert_eq!(rx.try_recv().unwrap(), Delivery::Alert(alert("a")));
        assert_eq!(rx.try_recv().unwrap(), Delivery::Alert(alert("b")));
    }

    #[test]
    fn a_full_queue_counts_the_press_for_the_next_summary() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let overflow = Arc::new(Overflow::default());
        let broker = LocalBroker::new(tx, Arc::clone(&overflow));
        broker.publish(alert("a")).unwrap();
        broker.publish(alert("b")).unwrap();
        broker.publish(alert("c")).unwrap();
        assert_eq!(rx.try_recv().unwrap(), Delivery::Alert(alert("a")));
        assert_eq!(overflow.take().unwrap().get("r"), Some(&2));
    }

    #[test]
    fn a_stopped_fan_out_is_reported() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        drop(rx);
        let broker = LocalBroker::new(tx, Arc::default());
        assert_eq!(broker.publish(alert("a")), Err(PublishError::Unavailable));
    }
}
