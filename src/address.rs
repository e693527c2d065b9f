//! Limits per source address, so that reconnecting resets nothing.
//!
//! A connection's own alert bucket starts full, so a script that reconnects
//! after every burst would never be limited. So each source address also has
//! buckets of its own, which outlive its connections: one for alerts
//! (ADDRESS_ALERTS_PER_SECOND, ADDRESS_ALERT_BURST), one for control messages
//! (pings and invalid messages, CONTROL_PER_SECOND), and a count of its open
//! WebSockets (ADDRESS_MAX_CONNECTIONS). IPv4 is keyed by address, IPv6 by its
//! /64 (one customer's network gets a /64, and an attacker has all of it).
//!
//! The table is bounded. An entry is forgotten only once it has no
//! connections and its buckets are full again, so forgetting grants nothing a
//! new entry would not; when the table is full of live entries, new addresses
//! are refused, and a live entry is never evicted to make room.

use crate::ratelimit::TokenBucket;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often a full table may be swept for forgettable entries: a sweep is a
/// walk of the whole table under its lock.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct AddressLimits {
    pub alerts_per_second: f64,
    pub alert_burst: u32,
    pub control_per_second: f64,
    pub control_burst: u32,
    pub max_connections: usize,
    /// Most addresses remembered at once.
    pub capacity: usize,
}

/// Why a new WebSocket from an address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The address already has ADDRESS_MAX_CONNECTIONS WebSockets.
    TooManyConnections,
    /// Every entry of the table is live.
    TableFull,
}

struct Entry {
    connections: usize,
    alerts: TokenBucket,
    control: TokenBucket,
}

impl Entry {
    fn forgettable(&self, now: Instant) -> bool {
        self.connections == 0 && self.alerts.is_full(now) && self.control.is_full(now)
    }
}

struct Table {
    entries: HashMap<IpAddr, Entry>,
    last_sweep: Option<Instant>,
}

pub struct Addresses {
    limits: AddressLimits,
    table: Mutex<Table>,
}

impl Addresses {
    pub fn new(limits: AddressLimits) -> Addresses {
        Addresses {
            limits,
            table: Mutex::new(Table {
                // Grown as addresses come, not sized for the bound: a
                // table sized for every possible entry would touch a page of
                // memory for nearly every address it holds.
                entries: HashMap::new(),
                last_sweep: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Entries are plain numbers: a thread that panicked holding the lock
        // cannot have left one half-updated in a way that matters.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits one more WebSocket from `ip`, or says why not.
    #[inline(never)]
    pub fn connect(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Person, Refused> {
        let key = key(ip);
        let mut table = self.lock();
        if !table.entries.contains_key(&key) && table.entries.len() >= self.limits.capacity {
            let swept_lately = table
                .last_sweep
                .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_EVERY);
            if !swept_lately {
                table.last_sweep = Some(now);
                table.entries.retain(|_, entry| !entry.forgettable(now));
            }
            if table.entries.len() >= self.limits.capacity {
                return Err(Refused::TableFull);
            }
        }
        let limits = self.limits;
        let entry = table.entries.entry(key).or_insert_with(|| Entry {
            connections: 0,
            alerts: TokenBucket::new(limits.alerts_per_second, limits.alert_burst, now),
            control: TokenBucket::new(limits.control_per_second, limits.control_burst, now),
        });
        if entry.connections >= limits.max_connections {
            return Err(Refused::TooManyConnections);
        }
        entry.connections += 1;
        Ok(Person {
            addresses: Arc::clone(self),
            key,
        })
    }

    fn with_entry<T>(&self, key: &IpAddr, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        self.lock().entries.get_mut(key).map(f)
    }

    /// Addresses remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

/// One WebSocket's share of its address's limits; gives the connection back
/// when dropped.
pub struct Person {
    addresses: Arc<Addresses>,
    key: IpAddr,
}

impl Person {
    /// Takes an alert token from the address's bucket.
    pub fn take_alert(&self, now: Instant) -> bool {
        self.addresses
            .with_entry(&self.key, |entry| entry.alerts.try_take(now))
            .unwrap_or(false)
    }

    /// Takes a control token (a ping, an invalid message) from the address's
    /// bucket.
    pub fn take_control(&self, now: Instant) -> bool {
        self.addresses
            .with_entry(&self.key, |entry| entry.control.try_take(now))
            .unwrap_or(false)
    }
}

impl Drop for Person {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut table = self.addresses.lock();
        if let Some(entry) = table.entries.get_mut(&self.key) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.forgettable(now) {
                table.entries.remove(&self.key);
            }
        }
    }
}

/// The key of an address: IPv4 as it is (IPv4-mapped IPv6 included), IPv6
/// by its /64.
pub fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AddressLimits {
        AddressLimits {
            alerts_per_second: 1.0,
            alert_burst: 3,
            control_per_second: 10.0,
            control_burst: 20,
            max_connections: 2,
            capacity: 2,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_is_keyed_by_its_slash_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(key(ip("2001:db8:1:2:ffff:1:2:3")), ip("2001:db8:1:2::"));
        assert_ne!(key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(key(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn reconnecting_keeps_the_address_bucket() {
        let addresses = Arc::new(Addresses::new(limits()));
        let t0 = Instant::now();
        let first = addresses.connect(ip("10.0.0.1"), t0).unwrap();
        assert!((0..3).all(|_| first.take_alert(t0)));
        assert!(!first.take_alert(t0));
        drop(first);
        let again = addresses.connect(ip("10.0.0.1"), t0).unwrap();
        assert!(!again.take_alert(t0), "a reconnect must not refill it");
        assert!(again.take_alert(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn an_address_may_hold_only_so_many_connections() {
        let addresses = Arc::new(Addresses::new(limits()));
        let t0 = Instant::now();
        let a = addresses.connect(ip("10.0.0.1"), t0).unwrap();
        let _b = addresses.connect(ip("10.0.0.1"), t0).unwrap();
        assert_eq!(
            addresses.connect(ip("10.0.0.1"), t0).err(),
            Some(Refused::TooManyConnections)
        );
        drop(a);
        assert!(addresses.connect(ip("10.0.0.1"), t0).is_ok());
    }

    #[test]
    fn a_full_table_refuses_new_addresses_and_never_evicts_live_ones() {
        let addresses = Arc::new(Addresses::new(limits()));
        let t0 = Instant::now();
        let a = addresses.connect(ip("10.0.0.1"), t0).unwrap();
        let b = addresses.connect(ip("10.0.0.2"), t0).unwrap();
        assert_eq!(
            addresses.connect(ip("10.0.0.3"), t0).err(),
            Some(Refused::TableFull)
        );
        // b leaves having pressed: its bucket is not full, so it is kept.
        assert!(b.take_alert(t0));
        drop(b);
        assert_eq!(addresses.len(), 2);
        let later = t0 + Duration::from_millis(500);
        assert_eq!(
            addresses.connect(ip("10.0.0.3"), later).err(),
            Some(Refused::TableFull)
        );
        // Once its bucket is full again it may be forgotten (after a sweep
        // interval), and the newcomer gets its place.
        let refilled = t0 + Duration::from_secs(2);
        let c = addresses.connect(ip("10.0.0.3"), refilled).unwrap();
        assert_eq!(addresses.len(), 2);
        assert!(a.take_alert(refilled));
        drop(c);
    }

    #[test]
    fn a_quiet_address_is_forgotten_when_its_last_connection_ends() {
        let addresses = Arc::new(Addresses::new(limits()));
        let t0 = Instant::now();
        drop(addresses.connect(ip("10.0.0.1"), t0).unwrap());
        assert_eq!(addresses.len(), 0);
    }

    #[test]
    fn control_messages_have_their_own_bucket() {
        let addresses = Arc::new(Addresses::new(limits()));
        let t0 = Instant::now();
        let p = addresses.connect(ip("10.0.0.1"), t0).unwrap();
        assert_eq!((0..25).filter(|_| p.take_control(t0)).count(), 20);
        assert!(p.take_alert(t0), "pings do not spend alerts");
    }
}
