//! The broker joins instances: an alert published on any instance comes back
//! to every instance (this one included) on its `deliveries` channel, from
//! which the fan-out thread sends it to every local client. Presence
//! heartbeats travel the same way, marked as such.
//!
//! Two backends implement it: [`local`] (in-process, for one instance and for
//! running with no cloud account) and [`pubsub`] (Google Cloud Pub/Sub).

mod dedupe;
pub mod local;
pub mod pubsub;

use crate::message::Alert;
use crate::presence::Heartbeat;
use std::fmt;
use std::time::Instant;

/// What travels between instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    Alert(Alert),
    Presence(Heartbeat),
}

pub trait Broker: Send + Sync {
    /// Short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Accepts an alert for delivery to every instance. Never blocks a
    /// connection thread: a broker that cannot take the alert says so at once
    /// (the local one counts it for the next summary instead).
    fn publish(&self, alert: Alert) -> Result<(), PublishError>;

    /// Sends this instance's heartbeat to every instance, if the broker has
    /// room. Best effort: heartbeats repeat every interval, so one lost to a
    /// full queue is made good by the next.
    fn publish_presence(&self, beat: Heartbeat);

    /// Whether alerts published now reach other instances, and if not, why
    /// (for /readyz).
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }

    /// Releases what the broker holds outside this process, within `deadline`.
    fn shutdown(&self, deadline: Instant);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishError {
    /// The queue towards the broker is full or the broker has stopped.
    Unavailable,
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Unavailable => write!(f, "the broker cannot take more alerts right now"),
        }
    }
}
