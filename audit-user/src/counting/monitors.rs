//! Time-windowed counters (Momentum's "monitors"): per remote IP, how many
//! connections, receptions and rejections happened in each of the last N
//! windows of W seconds, answerable for any CIDR.
//!
//! A monitor "W,N" keeps the current window (0) and N previous ones (1..=N),
//! aligned on multiples of W seconds since the Unix epoch. Each window holds one
//! CIDR index per series, and each monitor one more per series with the sum of
//! all its windows. A query over windows a..=b for any prefix walks either the
//! windows in the range or, when fewer, the totals and the windows outside it:
//! the usual question, "all of the history", is one index walk of O(prefix
//! length) however many windows are kept, and never a scan of tracked IPs.
//! Windows that fall out of the history are dropped, memory and all; their
//! counts leave the totals a batch at a time (see [`Monitor::retire`]).
//! Sums saturate at `u64::MAX` rather than wrap. Saving and loading the
//! windows is in [`crate::counting::persistence`]. (Some 700 lines: over half
//! are the tests, which check the private windows and totals directly.)

use std::{
    collections::{HashSet, VecDeque},
    net::IpAddr,
    time::Duration,
};

use ipnet::IpNet;

use crate::{
    counting::index::CidrIndex,
    domain::{MonitorSpec, Series},
};

pub(super) struct Window {
    /// Start time / W.
    pub(super) epoch: u64,
    pub(super) series: [CidrIndex; Series::COUNT],
}

impl Window {
    pub(super) fn new(epoch: u64) -> Self {
        Self {
            epoch,
            series: std::array::from_fn(|_| CidrIndex::new()),
        }
    }

    fn keys(&self) -> usize {
        self.series.iter().map(CidrIndex::len).sum()
    }
}

/// Keys a dropped window takes out of the totals per call of
/// [`Monitor::retire`]: two index updates each, about a millisecond in all at
/// 1M keys, so no caller holds the monitors' lock much longer than a query.
pub const RETIRE_BATCH: usize = 512;

/// One monitor's history.
pub struct Monitor {
    spec: MonitorSpec,
    /// Newest first; epochs strictly decreasing; none older than current - kept.
    windows: VecDeque<Window>,
    /// Per series: the sum of every window in `windows` and of what is left in
    /// `retiring`.
    totals: [CidrIndex; Series::COUNT],
    /// Windows that left the history whose counts are still in `totals`. At
    /// 1M keys taking a window out at once would stall every query for about a
    /// second, so its keys move out in batches, from the window and the totals
    /// alike, which keeps the invariant above at every step.
    retiring: Vec<Window>,
    /// (IP, window, series) entries held in `windows`, for the cap.
    tracked: usize,
    /// Increments refused because the cap was reached.
    dropped: u64,
}

impl Monitor {
    fn new(spec: MonitorSpec) -> Self {
        Self {
            spec,
            windows: VecDeque::new(),
            totals: std::array::from_fn(|_| CidrIndex::new()),
            retiring: Vec::new(),
            tracked: 0,
            dropped: 0,
        }
    }

    /// A monitor holding `windows` (as loaded from a state file).
    fn with_windows(spec: MonitorSpec, windows: VecDeque<Window>) -> Self {
        let mut monitor = Self::new(spec);
        for window in &windows {
            for (total, index) in monitor.totals.iter_mut().zip(&window.series) {
                for (ip, count) in index.iter() {
                    let _ = total.add(ip, i64::try_from(count).unwrap_or(i64::MAX));
                }
            }
        }
        monitor.tracked = windows.iter().map(Window::keys).sum();
        monitor.windows = windows;
        monitor
    }

    pub fn spec(&self) -> MonitorSpec {
        self.spec
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn tracked(&self) -> usize {
        self.tracked
    }

    /// Every IP with a count of `series` in some kept window (a superset
    /// while dropped windows retire), for readers that list networks.
    pub fn seen(&self, series: Series) -> &CidrIndex {
        &self.totals[series.slot()]
    }

    /// `series` in window `w` alone (0 = current), for readers that list
    /// that window's networks; None when that window holds nothing.
    pub fn window(&self, series: Series, w: u32, now: Duration) -> Option<&CidrIndex> {
        let epoch = self.epoch(now);
        self.windows
            .iter()
            .find(|win| win.epoch <= epoch && epoch - win.epoch == u64::from(w))
            .map(|win| &win.series[series.slot()])
    }

    /// Newest first, for the state file.
    pub(super) fn windows(&self) -> &VecDeque<Window> {
        &self.windows
    }

    fn epoch(&self, now: Duration) -> u64 {
        now.as_secs() / self.spec.window_secs
    }

    /// Drops the windows that fell out of the history by `now`, and takes a
    /// batch of dropped counts out of the totals.
    fn expire(&mut self, now: Duration) {
        let oldest_kept = self.epoch(now).saturating_sub(self.spec.kept as u64);
        while self.windows.back().is_some_and(|w| w.epoch < oldest_kept) {
            let window = self.windows.pop_back().expect("checked");
            self.tracked -= window.keys();
            self.retiring.push(window);
        }
        self.retire(RETIRE_BATCH);
    }

    /// Moves up to `budget` keys of dropped windows out of them and out of the
    /// totals; frees each dropped window once it is empty.
    fn retire(&mut self, mut budget: usize) {
        while budget > 0 {
            let Some(window) = self.retiring.last_mut() else {
                return;
            };
            for (total, index) in self.totals.iter_mut().zip(&mut window.series) {
                let batch: Vec<(IpAddr, u64)> = index.iter().take(budget).collect();
                budget -= batch.len();
                for (ip, count) in batch {
                    index.set(ip, 0);
                    let _ = total.add(ip, -i64::try_from(count).unwrap_or(i64::MAX));
                }
            }
            if window.keys() == 0 {
                self.retiring.pop();
            }
        }
    }

    fn record(&mut self, series: Series, ip: IpAddr, n: u64, cap: usize, now: Duration) -> u64 {
        self.expire(now);
        let epoch = self.epoch(now);
        if self.windows.front().is_none_or(|w| w.epoch < epoch) {
            self.windows.push_front(Window::new(epoch));
        }
        let current = &mut self.windows[0].series[series.slot()];
        let before = current.get(ip);
        if before == 0 {
            if self.tracked >= cap {
                self.dropped = self.dropped.saturating_add(n);
                return 0;
            }
            self.tracked += 1;
        }
        let delta = i64::try_from(n).unwrap_or(i64::MAX);
        let _ = self.totals[series.slot()].add(ip, delta);
        current.add(ip, delta).unwrap_or(before)
    }

    /// The count of `series` from `ip` in the window that began at `epoch × W`
    /// (0 once that window has left the history).
    pub fn window_count(&self, epoch: u64, series: Series, ip: IpAddr) -> u64 {
        self.windows
            .iter()
            .find(|w| w.epoch == epoch)
            .map_or(0, |w| w.series[series.slot()].get(ip))
    }

    /// The count of `series` from `ip` in each window, 0 (current) to N, at
    /// `now`, appended to `out`: one lookup per kept window, not a sum per
    /// window (what `show all` asks for every IP).
    pub fn ip_windows(&self, series: Series, ip: IpAddr, now: Duration, out: &mut Vec<u64>) {
        let epoch = self.epoch(now);
        // Newest first with decreasing epochs: one pass pairs them with 0..=N.
        let mut windows = self.windows.iter().filter(|w| w.epoch <= epoch).peekable();
        for k in 0..=u64::from(self.spec.kept) {
            let count = match epoch.checked_sub(k) {
                None => 0,
                Some(wanted) => {
                    while windows.next_if(|w| w.epoch > wanted).is_some() {}
                    windows
                        .next_if(|w| w.epoch == wanted)
                        .map_or(0, |w| w.series[series.slot()].get(ip))
                }
            };
            out.push(count);
        }
    }

    /// Every (window epoch, series, IP, count) held in the history.
    pub fn entries(&self) -> impl Iterator<Item = (u64, Series, IpAddr, u64)> + '_ {
        self.windows.iter().flat_map(|w| {
            Series::ALL.into_iter().flat_map(move |series| {
                w.series[series.slot()]
                    .iter()
                    .map(move |(ip, count)| (w.epoch, series, ip, count))
            })
        })
    }

    /// The sum over windows `first..=last` (0 = current); beyond N is clamped.
    pub fn sum(&self, series: Series, net: &IpNet, first: u32, last: u32, now: Duration) -> u64 {
        let (first, last) = (first.min(last), first.max(last).min(self.spec.kept));
        let epoch = self.epoch(now);
        // A window from the future (the clock went back) is in no range.
        let in_range = |w: &Window| {
            w.epoch <= epoch && (first as u64..=last as u64).contains(&(epoch - w.epoch))
        };
        let slot = series.slot();
        let inside = self.windows.iter().filter(|w| in_range(w)).count();
        let outside = self.windows.len() - inside + self.retiring.len();
        if inside <= 1 + outside {
            return self
                .windows
                .iter()
                .filter(|w| in_range(w))
                .map(|w| w.series[slot].count(net))
                .fold(0, u64::saturating_add);
        }
        // Fewer walks: everything, minus what is outside the range.
        let excluded: u64 = self
            .windows
            .iter()
            .filter(|w| !in_range(w))
            .chain(&self.retiring)
            .map(|w| w.series[slot].count(net))
            .fold(0, u64::saturating_add);
        let total = self.totals[slot].count(net);
        // Equal when both saturated; then the windows' own sum is the answer.
        debug_assert!(total >= excluded, "monitor totals lost track");
        if total == u64::MAX {
            return self
                .windows
                .iter()
                .filter(|w| in_range(w))
                .map(|w| w.series[slot].count(net))
                .fold(0, u64::saturating_add);
        }
        total.saturating_sub(excluded)
    }

    /// Momentum's Sieve estimate for "the last W seconds": the current window
    /// plus the previous one weighted by the part of it still inside the last W
    /// seconds: `current + previous * (W - elapsed) / W`, rounded to nearest.
    pub fn sliding(&self, series: Series, net: &IpNet, now: Duration) -> u64 {
        let current = self.sum(series, net, 0, 0, now) as f64;
        let previous = self.sum(series, net, 1, 1, now) as f64;
        let window = self.spec.window_secs as f64;
        let elapsed = now.as_secs_f64() % window;
        (current + previous * (window - elapsed) / window).round() as u64
    }
}

/// Every configured monitor, in configuration order.
pub struct Monitors {
    monitors: Vec<Monitor>,
    /// Most (IP, window, series) entries one monitor may hold.
    cap: usize,
    /// What changed since the cluster publisher last looked; None while no
    /// one publishes (clustering off), so nothing is kept for nobody.
    changed: Option<HashSet<WindowKey>>,
}

/// A window entry: (monitor, window epoch, series, IP).
pub type WindowKey = (MonitorSpec, u64, Series, IpAddr);

impl Monitors {
    pub fn new(specs: &[MonitorSpec], cap: usize) -> Self {
        Self {
            monitors: specs.iter().copied().map(Monitor::new).collect(),
            cap,
            changed: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.monitors.is_empty()
    }

    /// A new configuration: monitors that stay keep their windows, new ones
    /// start empty, removed ones are freed.
    pub fn reconfigure(&mut self, specs: &[MonitorSpec], cap: usize) {
        let mut old = std::mem::take(&mut self.monitors);
        self.monitors = specs
            .iter()
            .map(|spec| match old.iter().position(|m| m.spec == *spec) {
                Some(i) => old.swap_remove(i),
                None => Monitor::new(*spec),
            })
            .collect();
        self.cap = cap;
    }

    pub fn iter(&self) -> impl Iterator<Item = &Monitor> {
        self.monitors.iter()
    }

    /// The monitor a query names by its "W,N" string (spacing is forgiven).
    pub fn by_key(&self, key: &str) -> Option<&Monitor> {
        self.by_spec(&key.parse().ok()?)
    }

    pub fn by_spec(&self, spec: &MonitorSpec) -> Option<&Monitor> {
        self.monitors.iter().find(|m| m.spec == *spec)
    }

    /// The monitor at `position` in the configuration (Sieve's index form).
    pub fn by_position(&self, position: usize) -> Option<&Monitor> {
        self.monitors.get(position)
    }

    /// Counts `n` events of `series` from `ip` in every monitor; returns the
    /// new count in window 0 of the first monitor.
    pub fn record(&mut self, series: Series, ip: IpAddr, n: u64, now: Duration) -> u64 {
        let ip = ip.to_canonical();
        let cap = self.cap;
        let mut first = None;
        for monitor in &mut self.monitors {
            let count = monitor.record(series, ip, n, cap, now);
            first.get_or_insert(count);
            if let Some(changed) = &mut self.changed {
                changed.insert((monitor.spec, monitor.epoch(now), series, ip));
            }
        }
        first.unwrap_or(0)
    }

    /// From now on, remember which window entries change (for the cluster
    /// publisher).
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(HashSet::new);
    }

    /// The window entries changed since the last call, with their counts now
    /// (0: the entry or its monitor is gone).
    pub fn take_changes(&mut self) -> Vec<(WindowKey, u64)> {
        let Some(changed) = self.changed.as_mut().map(std::mem::take) else {
            return Vec::new();
        };
        changed
            .into_iter()
            .map(|key @ (spec, epoch, series, ip)| {
                let count = self
                    .monitors
                    .iter()
                    .find(|m| m.spec == spec)
                    .map_or(0, |m| m.window_count(epoch, series, ip));
                (key, count)
            })
            .collect()
    }

    /// Frees windows that fell out of every history, also when no event came.
    pub fn expire(&mut self, now: Duration) {
        for monitor in &mut self.monitors {
            monitor.expire(now);
        }
    }

    /// Takes up to `budget` keys of dropped windows out of the totals; true
    /// while some are left (call again, after letting others have the lock).
    pub fn retire(&mut self, budget: usize) -> bool {
        for monitor in &mut self.monitors {
            monitor.retire(budget);
        }
        self.monitors.iter().any(|m| !m.retiring.is_empty())
    }

    pub fn dropped(&self) -> u64 {
        self.monitors
            .iter()
            .map(Monitor::dropped)
            .fold(0, u64::saturating_add)
    }

    /// Every monitor as saved: its spec and its windows.
    pub(super) fn saved(&self) -> impl Iterator<Item = (MonitorSpec, &VecDeque<Window>)> {
        self.monitors.iter().map(|m| (m.spec, m.windows()))
    }

    /// Puts loaded `windows` in the monitor configured as `spec`; false (and
    /// nothing changed) when no such monitor is configured.
    pub(super) fn restore(
        &mut self,
        spec: MonitorSpec,
        windows: VecDeque<Window>,
        now: Duration,
    ) -> bool {
        let Some(monitor) = self.monitors.iter_mut().find(|m| m.spec == spec) else {
            return false;
        };
        let dropped = monitor.dropped;
        *monitor = Monitor::with_windows(spec, windows);
        monitor.dropped = dropped;
        monitor.expire(now);
        true
    }
}

#[cfg(test)]
mod tests;
