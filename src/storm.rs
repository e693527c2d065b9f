//! Storms: what every client is sent when everyone presses at once.
//!
//! An alert costs one `send` per client, so a fan-out thread can write only
//! so many alerts a second to thousands of clients, and a phone can read
//! only so many. Presses, on the other hand, can arrive as fast as people
//! press, on every instance at once. So the stream that every client gets is
//! bounded here, whatever the press rate:
//!
//! - at most `STORM_ALERTS_PER_SECOND` presses a second go out as individual
//!   alerts (a sliding one-second window: never more in any second);
//! - past that, presses are only counted, by region, and every
//!   `STORM_SUMMARY_MS` one `ALIEN_LANDING_SUMMARY` carries the count.
//!
//! Every press the fan-out is handed reaches every client exactly once: as
//! an alert, or inside exactly one summary's count. Summaries cover windows
//! of time on a grid that starts with the first counted press of a storm;
//! consecutive summaries abut (one's `to` is the next one's `from`), so they
//! never overlap and leave no gap. A window that counted nothing sends
//! nothing and ends the storm; the next counted press starts a new grid.
//!
//! This is pure arithmetic: the fan-out thread owns one [`Storm`] and asks
//! it, for each alert, whether to send it or count it, and when a summary is
//! due. Times come in as arguments, so the tests below control the clock.

use crate::message::{self, Alert};
use crossbeam_channel::{Receiver, Sender, bounded};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Most regions one summary names; counts from further regions (only a
/// misconfigured fleet has this many) are summed under [`OTHER_REGIONS`], so
/// a summary's size stays bounded.
const MAX_REGIONS: usize = 64;
pub const OTHER_REGIONS: &str = "other";

/// How a press reaches the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Send it as an alert now.
    Alert,
    /// Counted into the open summary window.
    Counted,
}

/// One `ALIEN_LANDING_SUMMARY`: the presses counted in `[from, to)`
/// (epoch milliseconds), by region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub id: String,
    pub count: u64,
    pub regions: BTreeMap<String, u64>,
    pub from: u64,
    pub to: u64,
}

impl Summary {
    /// The summary as the text of a WebSocket message.
    pub fn to_client_json(&self) -> String {
        self.to_json(false)
    }

    /// As sent again to a reconnecting client, marked `"replayed": true`.
    pub fn to_replay_json(&self) -> String {
        self.to_json(true)
    }

    fn to_json(&self, replayed: bool) -> String {
        #[derive(Serialize)]
        struct Outbound<'a> {
            message: &'static str,
            #[serde(flatten)]
            summary: &'a Summary,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            replayed: bool,
        }
        serde_json::to_string(&Outbound {
            message: "ALIEN_LANDING_SUMMARY",
            summary: self,
            replayed,
        })
        .expect("strings and integers always serialize")
    }
}

/// The window presses are being counted into.
struct Window {
    /// The grid this window is on: its start on both clocks. Window `k` of
    /// the grid is `[start + k·W, start + (k+1)·W)`.
    grid_start: Instant,
    grid_start_ms: u64,
    /// This window's index on the grid.
    k: u32,
    count: u64,
    regions: BTreeMap<String, u64>,
}

pub struct Storm {
    alerts_per_second: usize,
    window: Duration,
    /// When each of the last `alerts_per_second` individual alerts went out.
    sent: VecDeque<Instant>,
    open: Option<Window>,
    /// The grid of the last window closed, which the next window continues
    /// if it starts right after.
    last: Option<(Instant, u64, u32)>,
}

impl Storm {
    pub fn new(alerts_per_second: usize, window: Duration) -> Storm {
        Storm {
            alerts_per_second,
            window: window.max(Duration::from_millis(1)),
            sent: VecDeque::new(),
            open: None,
            last: None,
        }
    }

    /// Decides how the press from `region`, handed over `now`, reaches the
    /// clients. `now_ms` is the wall clock at `now` (epoch milliseconds),
    /// used only to label a new grid.
    pub fn route(&mut self, region: &str, now: Instant, now_ms: u64) -> Route {
        let second = Duration::from_secs(1);
        while self
            .sent
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= second)
        {
            self.sent.pop_front();
        }
        if self.sent.len() < self.alerts_per_second {
            self.sent.push_back(now);
            return Route::Alert;
        }
        self.count(region, 1, now, now_ms);
        Route::Counted
    }

    /// Counts `n` presses from `region` into the window open at `now`. Call
    /// [`Storm::take_due`] first, so an expired window is closed before it.
    pub fn count(&mut self, region: &str, n: u64, now: Instant, now_ms: u64) {
        if n == 0 {
            return;
        }
        let window = self.window;
        let window_at = |start: Instant, k: u32| start + window * k;
        let open = self.open.get_or_insert_with(|| {
            // Continue the last grid if `now` falls in the window right
            // after the last one closed; otherwise a new storm starts a grid.
            match self.last {
                Some((start, start_ms, k))
                    if now >= window_at(start, k + 1) && now < window_at(start, k + 2) =>
                {
                    Window {
                        grid_start: start,
                        grid_start_ms: start_ms,
                        k: k + 1,
                        count: 0,
                        regions: BTreeMap::new(),
                    }
                }
                _ => Window {
                    grid_start: now,
                    // Never before the last window's end, even if the wall
                    // clock stepped back: windows must not overlap.
                    grid_start_ms: self.last.map_or(now_ms, |(_, start_ms, k)| {
                        now_ms.max(start_ms + ms(window) * u64::from(k + 1))
                    }),
                    k: 0,
                    count: 0,
                    regions: BTreeMap::new(),
                },
            }
        });
        open.count += n;
        let key = if open.regions.len() < MAX_REGIONS || open.regions.contains_key(region) {
            region
        } else {
            OTHER_REGIONS
        };
        *open.regions.entry(key.to_string()).or_default() += n;
    }

    /// When the open window ends, if one is open.
    pub fn due(&self) -> Option<Instant> {
        self.open
            .as_ref()
            .map(|open| open.grid_start + self.window * (open.k + 1))
    }

    /// The summary of the open window once it has ended at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<Summary> {
        if self.due().is_some_and(|due| now >= due) {
            self.close(None)
        } else {
            None
        }
    }

    /// The summary of the open window, cut short at `now` (shutdown: every
    /// counted press must go out before the clients are closed).
    pub fn take_now(&mut self, now: Instant) -> Option<Summary> {
        self.close(Some(now))
    }

    fn close(&mut self, cut_at: Option<Instant>) -> Option<Summary> {
        let open = self.open.take()?;
        let w = ms(self.window);
        let from = open.grid_start_ms + w * u64::from(open.k);
        let full_to = from + w;
        let to = match cut_at {
            Some(at) => {
                let start = open.grid_start + self.window * open.k;
                (from + ms(at.saturating_duration_since(start))).min(full_to)
            }
            None => full_to,
        };
        self.last = Some((open.grid_start, open.grid_start_ms, open.k));
        Some(Summary {
            // A random id cannot fail in practice; if it did, an id made of
            // the window still names this summary uniquely on this instance.
            id: message::new_alert_id().unwrap_or_else(|_| format!("{from:016x}{to:016x}")),
            count: open.count,
            regions: open.regions,
            from,
            to,
        })
    }
}

fn ms(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

/// Presses the local broker accepted while the fan-out's queue was full:
/// counted here, by region, and added to the next summary by the fan-out.
/// That way a storm never makes the local broker refuse a press (the
/// Pub/Sub broker queues them instead; see ARCHITECTURE.md).
pub struct Overflow {
    /// Lets the fan-out skip the lock on every turn when nothing is here.
    pending: AtomicU64,
    regions: Mutex<HashMap<String, u64>>,
    /// Wakes the fan-out, which may have drained the full queue and gone to
    /// sleep between a connection thread finding it full and counting here.
    wake: (Sender<()>, Receiver<()>),
}

impl Default for Overflow {
    fn default() -> Overflow {
        Overflow {
            pending: AtomicU64::new(0),
            regions: Mutex::new(HashMap::new()),
            wake: bounded(1),
        }
    }
}

impl Overflow {
    pub fn add(&self, alert: &Alert) {
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        *regions.entry(alert.region.clone()).or_default() += 1;
        self.pending.fetch_add(1, Ordering::Release);
        drop(regions);
        let _ = self.wake.0.try_send(());
    }

    /// Ready when presses were counted here: for the fan-out's `select!`.
    pub fn wakeup(&self) -> &Receiver<()> {
        &self.wake.1
    }

    /// Everything counted since the last call.
    pub fn take(&self) -> Option<HashMap<String, u64>> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.store(0, Ordering::Release);
        Some(std::mem::take(&mut *regions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_millis(200);

    struct Clock {
        start: Instant,
        start_ms: u64,
    }

    impl Clock {
        fn new() -> Clock {
            Clock {
                start: Instant::now(),
                start_ms: 1_700_000_000_000,
            }
        }
        fn at(&self, ms: u64) -> (Instant, u64) {
            (self.start + Duration::from_millis(ms), self.start_ms + ms)
        }
    }

    /// Presses `n` at each of `times` (ms), taking due summaries as a
    /// fan-out would; returns (alerts sent, summaries).
    fn simulate(
        storm: &mut Storm,
        clock: &Clock,
        presses: &[(u64, &str)],
        end_ms: u64,
    ) -> (Vec<(u64, String)>, Vec<Summary>) {
        let mut alerts = Vec::new();
        let mut summaries = Vec::new();
        for &(t, region) in presses {
            let (now, now_ms) = clock.at(t);
            summaries.extend(storm.take_due(now));
            if storm.route(region, now, now_ms) == Route::Alert {
                alerts.push((t, region.to_string()));
            }
        }
        let mut t = presses.last().map_or(0, |p| p.0);
        while t <= end_ms {
            summaries.extend(storm.take_due(clock.at(t).0));
            t += 1;
        }
        (alerts, summaries)
    }

    #[test]
    fn every_press_is_an_alert_or_in_exactly_one_summary() {
        let clock = Clock::new();
        let mut storm = Storm::new(10, W);
        // 4,000 presses over 1.5 s from two regions, then quiet.
        let presses: Vec<(u64, &str)> = (0..4000)
            .map(|i| (i * 1500 / 4000, if i % 3 == 0 { "syd" } else { "ams" }))
            .collect();
        let (alerts, summaries) = simulate(&mut storm, &clock, &presses, 3000);
        let counted: u64 = summaries.iter().map(|s| s.count).sum();
        assert_eq!(alerts.len() as u64 + counted, 4000);
        for s in &summaries {
            assert_eq!(s.regions.values().sum::<u64>(), s.count, "{s:?}");
            assert!(s.count > 0);
        }
        // Per region too: what was pressed there is what the clients hear.
        for region in ["syd", "ams"] {
            let pressed = presses.iter().filter(|p| p.1 == region).count() as u64;
            let sent = alerts.iter().filter(|a| a.1 == region).count() as u64;
            let summed: u64 = summaries.iter().filter_map(|s| s.regions.get(region)).sum();
            assert_eq!(sent + summed, pressed, "{region}");
        }
    }

    #[test]
    fn individual_alerts_never_exceed_the_rate_in_any_second() {
        let clock = Clock::new();
        let mut storm = Storm::new(10, W);
        let presses: Vec<(u64, &str)> = (0..5000).map(|i| (i / 2, "ams")).collect();
        let (alerts, _) = simulate(&mut storm, &clock, &presses, 3000);
        let alerts: Vec<u64> = alerts.into_iter().map(|a| a.0).collect();
        for (i, t) in alerts.iter().enumerate() {
            let in_second = alerts[i..].iter().take_while(|u| **u < t + 1000).count();
            assert!(
                in_second <= 10,
                "{in_second} alerts in the second from {t} ms"
            );
        }
        // The budget refills: 2.5 s of storm lets about 30 through, not 10.
        assert!(alerts.len() >= 25, "{}", alerts.len());
    }

    #[test]
    fn windows_abut_never_overlap_and_are_one_period_long() {
        let clock = Clock::new();
        let mut storm = Storm::new(0, W);
        let presses: Vec<(u64, &str)> = (0..1000).map(|i| (7 + i, "ams")).collect();
        let (alerts, summaries) = simulate(&mut storm, &clock, &presses, 2000);
        assert!(alerts.is_empty());
        assert_eq!(summaries.iter().map(|s| s.count).sum::<u64>(), 1000);
        assert_eq!(summaries[0].from, clock.start_ms + 7);
        for pair in summaries.windows(2) {
            assert_eq!(pair[0].to, pair[1].from, "{pair:?}");
        }
        for s in &summaries {
            assert_eq!(s.to - s.from, 200);
        }
        let ids: std::collections::HashSet<_> = summaries.iter().map(|s| &s.id).collect();
        assert_eq!(ids.len(), summaries.len());
    }

    #[test]
    fn a_quiet_window_ends_the_storm_and_the_next_starts_a_new_grid() {
        let clock = Clock::new();
        let mut storm = Storm::new(0, W);
        let presses = [(0, "ams"), (50, "ams"), (1000, "syd")];
        let (_, summaries) = simulate(&mut storm, &clock, &presses, 2000);
        assert_eq!(summaries.len(), 2);
        assert_eq!(summaries[0].count, 2);
        assert_eq!(
            (summaries[0].from, summaries[0].to),
            (clock.start_ms, clock.start_ms + 200)
        );
        assert_eq!(summaries[1].from, clock.start_ms + 1000);
        assert!(summaries[1].from >= summaries[0].to);
    }

    #[test]
    fn a_press_right_after_a_window_continues_its_grid() {
        let clock = Clock::new();
        let mut storm = Storm::new(0, W);
        // The second press comes after the first window closed, within the
        // next one: the windows abut.
        let (_, summaries) = simulate(&mut storm, &clock, &[(0, "a"), (250, "a")], 1000);
        assert_eq!(summaries.len(), 2);
        assert_eq!(summaries[0].to, summaries[1].from);
    }

    #[test]
    fn a_wall_clock_stepping_back_cannot_make_windows_overlap() {
        let clock = Clock::new();
        let mut storm = Storm::new(0, W);
        let (now, now_ms) = clock.at(0);
        storm.count("a", 1, now, now_ms);
        let first = storm.take_due(now + W).unwrap();
        // A new storm a second later, but the wall clock says 10 s earlier.
        let later = now + Duration::from_secs(1);
        storm.count("a", 1, later, now_ms - 10_000);
        let second = storm.take_due(later + W).unwrap();
        assert!(second.from >= first.to, "{first:?} {second:?}");
    }

    #[test]
    fn shutdown_cuts_the_open_window_short() {
        let clock = Clock::new();
        let mut storm = Storm::new(0, W);
        let (now, now_ms) = clock.at(0);
        storm.count("a", 3, now, now_ms);
        let cut = storm.take_now(now + Duration::from_millis(50)).unwrap();
        assert_eq!((cut.count, cut.to - cut.from), (3, 50));
        assert!(storm.take_now(now).is_none());
    }

    #[test]
    fn regions_past_the_limit_are_summed_as_other() {
        let clock = Clock::new();
        let mut storm = Storm::new(0, W);
        let (now, now_ms) = clock.at(0);
        for i in 0..(MAX_REGIONS + 10) {
            storm.count(&format!("r{i}"), 1, now, now_ms);
        }
        storm.count("r0", 1, now, now_ms);
        let s = storm.take_now(now).unwrap();
        assert_eq!(s.regions.len(), MAX_REGIONS + 1);
        assert_eq!(s.regions[OTHER_REGIONS], 10);
        assert_eq!(s.regions["r0"], 2);
        assert_eq!(s.count, MAX_REGIONS as u64 + 11);
    }

    #[test]
    fn a_summary_has_exactly_the_protocol_fields() {
        let s = Summary {
            id: "ab".repeat(16),
            count: 3,
            regions: BTreeMap::from([("syd".into(), 2), ("ams".into(), 1)]),
            from: 10,
            to: 210,
        };
        let v: serde_json::Value = serde_json::from_str(&s.to_client_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"message":"ALIEN_LANDING_SUMMARY","id":"ab".repeat(16),
                "count":3,"regions":{"syd":2,"ams":1},"from":10,"to":210})
        );
        let r: serde_json::Value = serde_json::from_str(&s.to_replay_json()).unwrap();
        assert_eq!(r["replayed"], true);
    }

    #[test]
    fn overflow_hands_over_its_counts_once() {
        let overflow = Overflow::default();
        assert!(overflow.take().is_none());
        let alert = |region: &str| Alert {
            timestamp: 1,
            region: region.into(),
            sender: "s".into(),
            id: "i".into(),
        };
        overflow.add(&alert("ams"));
        overflow.add(&alert("ams"));
        overflow.add(&alert("syd"));
        // The fan-out is woken, once however many were counted.
        assert!(overflow.wakeup().try_recv().is_ok());
        assert!(overflow.wakeup().try_recv().is_err());
        let taken = overflow.take().unwrap();
        assert_eq!(taken, HashMap::from([("ams".into(), 2), ("syd".into(), 1)]));
        assert!(overflow.take().is_none());
    }
}
