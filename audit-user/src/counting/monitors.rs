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

use std::{
    collections::{HashSet, VecDeque},
    io::{self, Read, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;

use crate::{
    counting::index::CidrIndex,
    domain::{MonitorSpec, Series},
};

struct Window {
    /// Start time / W.
    epoch: u64,
    series: [CidrIndex; 3],
}

impl Window {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            series: [CidrIndex::new(), CidrIndex::new(), CidrIndex::new()],
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
    totals: [CidrIndex; 3],
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
            totals: [CidrIndex::new(), CidrIndex::new(), CidrIndex::new()],
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
                self.dropped += n;
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
                .sum();
        }
        // Fewer walks: everything, minus what is outside the range.
        let excluded: u64 = self
            .windows
            .iter()
            .filter(|w| !in_range(w))
            .chain(&self.retiring)
            .map(|w| w.series[slot].count(net))
            .sum();
        let total = self.totals[slot].count(net);
        debug_assert!(total >= excluded, "monitor totals lost track");
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
        let spec: MonitorSpec = key.parse().ok()?;
        self.monitors.iter().find(|m| m.spec == spec)
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
        self.monitors.iter().map(Monitor::dropped).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not an inbound-audit monitor state file ({reason})")]
    Foreign { path: PathBuf, reason: &'static str },
    #[error("{path} is corrupt ({reason})")]
    Corrupt { path: PathBuf, reason: &'static str },
}

const STATE_MAGIC: &[u8; 8] = b"IAMON\0\0\x01";

impl Monitors {
    /// Writes every window to `path` (atomically: a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let mut body = Vec::new();
        put_u32(&mut body, self.monitors.len() as u32);
        for monitor in &self.monitors {
            put_u64(&mut body, monitor.spec.window_secs);
            put_u32(&mut body, monitor.spec.kept);
            put_u32(&mut body, monitor.windows.len() as u32);
            for window in &monitor.windows {
                put_u64(&mut body, window.epoch);
                for index in &window.series {
                    put_u32(&mut body, index.len() as u32);
                    for (ip, count) in index.iter() {
                        match ip {
                            IpAddr::V4(v4) => {
                                body.push(4);
                                body.extend_from_slice(&v4.octets());
                            }
                            IpAddr::V6(v6) => {
                                body.push(6);
                                body.extend_from_slice(&v6.octets());
                            }
                        }
                        put_u64(&mut body, count);
                    }
                }
            }
        }
        let io_error = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error)?;
        }
        let temporary = path.with_extension("tmp");
        let mut file = std::fs::File::create(&temporary).map_err(io_error)?;
        file.write_all(STATE_MAGIC).map_err(io_error)?;
        file.write_all(&body).map_err(io_error)?;
        file.write_all(&fnv1a(&body).to_le_bytes())
            .map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        std::fs::rename(&temporary, path).map_err(io_error)
    }

    /// Reads back what `save` wrote, for the monitors still configured (a
    /// monitor whose spec changed starts empty). Nothing is loaded unless the
    /// whole file checks out.
    pub fn load(&mut self, path: &Path, now: Duration) -> Result<LoadReport, StateError> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|source| StateError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let foreign = |reason| StateError::Foreign {
            path: path.to_path_buf(),
            reason,
        };
        let corrupt = |reason| StateError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < STATE_MAGIC.len() + 8 || &bytes[..STATE_MAGIC.len()] != STATE_MAGIC {
            return Err(foreign("wrong magic number or version"));
        }
        let body = &bytes[STATE_MAGIC.len()..bytes.len() - 8];
        let checksum = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().expect("8 bytes"));
        if fnv1a(body) != checksum {
            return Err(corrupt("checksum mismatch"));
        }
        let mut input = body;
        let mut parsed = Vec::new();
        for _ in 0..take_u32(&mut input).ok_or(corrupt("truncated"))? {
            let spec = MonitorSpec {
                window_secs: take_u64(&mut input).ok_or(corrupt("truncated"))?,
                kept: take_u32(&mut input).ok_or(corrupt("truncated"))?,
            };
            if spec.window_secs == 0 {
                return Err(corrupt("zero window length"));
            }
            let mut windows = VecDeque::new();
            for _ in 0..take_u32(&mut input).ok_or(corrupt("truncated"))? {
                let mut window = Window::new(take_u64(&mut input).ok_or(corrupt("truncated"))?);
                for index in &mut window.series {
                    for _ in 0..take_u32(&mut input).ok_or(corrupt("truncated"))? {
                        let ip = take_ip(&mut input).ok_or(corrupt("bad address"))?;
                        let count = take_u64(&mut input).ok_or(corrupt("truncated"))?;
                        index.set(ip, count);
                    }
                }
                windows.push_back(window);
            }
            if windows
                .iter()
                .zip(windows.iter().skip(1))
                .any(|(a, b)| a.epoch <= b.epoch)
            {
                return Err(corrupt("windows out of order"));
            }
            parsed.push((spec, windows));
        }
        if !input.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        let mut report = LoadReport::default();
        for (spec, windows) in parsed {
            match self.monitors.iter_mut().find(|m| m.spec == spec) {
                Some(monitor) => {
                    let dropped = monitor.dropped;
                    *monitor = Monitor::with_windows(spec, windows);
                    monitor.dropped = dropped;
                    monitor.expire(now);
                    report.restored.push(spec);
                }
                None => report.ignored.push(spec),
            }
        }
        Ok(report)
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub restored: Vec<MonitorSpec>,
    /// Monitors in the file that are no longer configured.
    pub ignored: Vec<MonitorSpec>,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

fn take_u32(input: &mut &[u8]) -> Option<u32> {
    take(input, 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

fn take_u64(input: &mut &[u8]) -> Option<u64> {
    take(input, 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

fn take_ip(input: &mut &[u8]) -> Option<IpAddr> {
    match take(input, 1)?[0] {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(take(input, 4)?).ok()?)),
        6 => Some(IpAddr::from(<[u8; 16]>::try_from(take(input, 16)?).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn spec(text: &str) -> MonitorSpec {
        text.parse().unwrap()
    }

    #[test]
    fn specs_parse_and_print() {
        assert_eq!(
            spec("300,6"),
            MonitorSpec {
                window_secs: 300,
                kept: 6
            }
        );
        assert_eq!(spec(" 60 , 1 ").to_string(), "60,1");
        for bad in ["", "60", "0,1", "60,0", "x,1", "60,-1", "60,1,2"] {
            assert!(bad.parse::<MonitorSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_align_roll_and_sum() {
        let mut monitors = Monitors::new(&[spec("60,2")], 1000);
        // 119 s is window 1 (60..120); 120 s starts window 2.
        monitors.record(Series::Connections, ip("10.0.0.1"), 1, at(119));
        monitors.record(Series::Connections, ip("10.0.0.2"), 2, at(120));
        monitors.record(Series::Connections, ip("10.0.1.1"), 4, at(179));
        let m = monitors.by_key("60,2").unwrap();
        assert_eq!(
            m.sum(Series::Connections, &net("10.0.0.0/16"), 0, 0, at(179)),
            6
        );
        assert_eq!(
            m.sum(Series::Connections, &net("10.0.0.0/24"), 0, 0, at(179)),
            2
        );
        assert_eq!(
            m.sum(Series::Connections, &net("10.0.0.0/24"), 1, 1, at(179)),
            1
        );
        assert_eq!(
            m.sum(Series::Connections, &net("10.0.0.0/24"), 0, 1, at(179)),
            3
        );
        // Rolled over by time alone: what was current is now window 1.
        assert_eq!(
            m.sum(Series::Connections, &net("10.0.0.0/16"), 0, 0, at(185)),
            0
        );
        assert_eq!(
            m.sum(Series::Connections, &net("10.0.0.0/16"), 1, 1, at(185)),
            6
        );
        assert_eq!(
            m.sum(Series::Connections, &net("10.0.0.0/16"), 2, 2, at(185)),
            1
        );
        // endv beyond N is clamped; reversed ranges are the same range.
        assert_eq!(
            m.sum(Series::Connections, &net("0.0.0.0/0"), 0, 99, at(185)),
            7
        );
        assert_eq!(
            m.sum(Series::Connections, &net("0.0.0.0/0"), 2, 0, at(185)),
            7
        );
        // Three windows later nothing is left.
        assert_eq!(
            m.sum(Series::Connections, &net("0.0.0.0/0"), 0, 2, at(400)),
            0
        );
        assert_eq!(
            m.sum(Series::Receptions, &net("0.0.0.0/0"), 0, 2, at(185)),
            0
        );
    }

    /// The sum as the windows alone give it, for comparison.
    fn sum_by_windows(
        m: &Monitor,
        series: Series,
        net: &IpNet,
        first: u32,
        last: u32,
        now: Duration,
    ) -> u64 {
        let (first, last) = (first.min(last), first.max(last).min(m.spec.kept));
        let epoch = m.epoch(now);
        m.windows
            .iter()
            .filter(|w| {
                w.epoch <= epoch && (first as u64..=last as u64).contains(&(epoch - w.epoch))
            })
            .map(|w| w.series[series.slot()].count(net))
            .sum()
    }

    /// Every key of the totals equals the sum over held and retiring windows.
    fn check_totals(m: &Monitor) {
        for series in Series::ALL {
            let slot = series.slot();
            let held = || m.windows.iter().chain(&m.retiring);
            let keys: usize = held().map(|w| w.series[slot].len()).sum();
            assert!(m.totals[slot].len() <= keys);
            for (ip, count) in m.totals[slot].iter() {
                assert_eq!(count, held().map(|w| w.series[slot].get(ip)).sum::<u64>());
            }
            for w in held() {
                for (ip, _) in w.series[slot].iter() {
                    assert_ne!(m.totals[slot].get(ip), 0);
                }
            }
        }
    }

    #[test]
    fn sums_through_the_totals_equal_the_windows_sums() {
        let mut monitors = Monitors::new(&[spec("10,3")], 10_000);
        let nets = [
            net("10.0.0.0/8"),
            net("10.1.0.0/16"),
            net("10.1.2.0/24"),
            net("10.1.2.3/32"),
            net("2001:db8::/64"),
            net("0.0.0.0/0"),
        ];
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut now = 1_000u64;
        for step in 0..3_000 {
            // Mostly a second at a time, sometimes a jump over several windows
            // or back in time by a few seconds.
            now = match next() % 50 {
                0 => now + 25 + next() % 40,
                1 => now.saturating_sub(next() % 15),
                _ => now + next() % 2,
            };
            let r = next();
            let ip = if r % 5 == 0 {
                IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, (r >> 8) as u16 % 4])
            } else {
                IpAddr::from([10, 1, (r >> 8) as u8 % 3, (r >> 16) as u8 % 5])
            };
            let series = Series::ALL[(r >> 24) as usize % 3];
            monitors.record(series, ip, 1 + (r >> 32) % 3, at(now));
            if step % 7 == 0 {
                monitors.expire(at(now));
            }
            let m = monitors.by_position(0).unwrap();
            for series in Series::ALL {
                for net in &nets {
                    for first in 0..=4 {
                        for last in first..=5 {
                            assert_eq!(
                                m.sum(series, net, first, last, at(now)),
                                sum_by_windows(m, series, net, first, last, at(now)),
                                "step {step} {series:?} {net} {first}..={last}"
                            );
                        }
                    }
                }
            }
            if step % 100 == 0 {
                check_totals(m);
            }
        }
    }

    #[test]
    fn dropped_windows_leave_the_totals_in_batches() {
        let mut monitors = Monitors::new(&[spec("10,3")], 1_000_000);
        let keys = 3 * RETIRE_BATCH + 17;
        for i in 0..keys as u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from((10u32 << 24) | i));
            monitors.record(Series::Connections, ip, 2, at(5));
        }
        for secs in [15, 25, 35, 45] {
            monitors.record(Series::Connections, ip("10.0.0.1"), 1, at(secs));
        }
        // At 45 s the window of 5 s left the history; its first batch left
        // the totals. All four windows held are in 0..=3, so the sum is the
        // totals minus what is still retiring.
        let everything = net("0.0.0.0/0");
        {
            let m = monitors.by_position(0).unwrap();
            assert_eq!(m.retiring.len(), 1);
            assert_eq!(m.retiring[0].keys(), keys - RETIRE_BATCH);
            assert_eq!(m.sum(Series::Connections, &everything, 0, 3, at(45)), 4);
            assert_eq!(
                m.sum(Series::Connections, &net("10.0.0.1/32"), 0, 3, at(45)),
                4
            );
            check_totals(m);
        }
        assert!(monitors.retire(RETIRE_BATCH));
        assert!(!monitors.retire(keys));
        let m = monitors.by_position(0).unwrap();
        assert!(m.retiring.is_empty());
        assert_eq!(m.totals[Series::Connections.slot()].len(), 1);
        assert_eq!(m.sum(Series::Connections, &everything, 0, 3, at(45)), 4);
        check_totals(m);
    }

    #[test]
    fn expired_windows_are_freed_without_events() {
        let mut monitors = Monitors::new(&[spec("10,1")], 1000);
        for i in 0..50u8 {
            monitors.record(Series::Receptions, IpAddr::from([10, 0, 0, i]), 1, at(5));
        }
        assert_eq!(monitors.iter().next().unwrap().tracked(), 50);
        monitors.expire(at(15));
        assert_eq!(monitors.iter().next().unwrap().tracked(), 50);
        monitors.expire(at(25));
        let m = monitors.iter().next().unwrap();
        assert_eq!(m.tracked(), 0);
        assert!(m.windows.is_empty());
    }

    #[test]
    fn cap_drops_new_ips_and_counts_them() {
        let mut monitors = Monitors::new(&[spec("60,1")], 2);
        assert_eq!(
            monitors.record(Series::Connections, ip("10.0.0.1"), 1, at(0)),
            1
        );
        assert_eq!(
            monitors.record(Series::Connections, ip("10.0.0.2"), 1, at(0)),
            1
        );
        assert_eq!(
            monitors.record(Series::Connections, ip("10.0.0.3"), 5, at(0)),
            0
        );
        // Known IPs still count.
        assert_eq!(
            monitors.record(Series::Connections, ip("10.0.0.1"), 1, at(0)),
            2
        );
        assert_eq!(monitors.dropped(), 5);
        // Room again once the window expires.
        assert_eq!(
            monitors.record(Series::Connections, ip("10.0.0.3"), 1, at(200)),
            1
        );
    }

    #[test]
    fn v4_mapped_and_ipv6() {
        let mut monitors = Monitors::new(&[spec("60,1"), spec("300,6")], 100);
        assert_eq!(
            monitors.record(Series::Rejections, ip("::ffff:10.0.0.1"), 2, at(0)),
            2
        );
        monitors.record(Series::Rejections, ip("2001:db8::1"), 3, at(0));
        let second = monitors.by_position(1).unwrap();
        assert_eq!(
            second.sum(Series::Rejections, &net("10.0.0.1/32"), 0, 0, at(1)),
            2
        );
        assert_eq!(
            second.sum(Series::Rejections, &net("2001:db8::/64"), 0, 0, at(1)),
            3
        );
        assert!(monitors.by_key("60,2").is_none());
        assert!(monitors.by_key(" 60, 1").is_some());
    }

    #[test]
    fn reconfigure_keeps_surviving_windows() {
        let mut monitors = Monitors::new(&[spec("60,1"), spec("300,6")], 100);
        monitors.record(Series::Receptions, ip("10.0.0.1"), 3, at(10));
        monitors.reconfigure(&[spec("300,6"), spec("10,2")], 50);
        assert!(monitors.by_key("60,1").is_none());
        assert_eq!(monitors.by_position(0).unwrap().spec(), spec("300,6"));
        assert_eq!(
            monitors.by_key("300,6").unwrap().sum(
                Series::Receptions,
                &net("10.0.0.0/8"),
                0,
                0,
                at(20)
            ),
            3
        );
        assert_eq!(monitors.by_key("10,2").unwrap().tracked(), 0);
    }

    #[test]
    fn sliding_average_weights_the_previous_window() {
        let mut monitors = Monitors::new(&[spec("100,1")], 100);
        monitors.record(Series::Connections, ip("10.0.0.1"), 10, at(50));
        monitors.record(Series::Connections, ip("10.0.0.1"), 4, at(120));
        let m = monitors.by_position(0).unwrap();
        // 25 s into the current window: 4 + 10 * 75/100.
        assert_eq!(
            m.sliding(Series::Connections, &net("10.0.0.1/32"), at(125)),
            12
        );
        assert_eq!(
            m.sliding(Series::Connections, &net("10.0.0.1/32"), at(100)),
            14
        );
        assert_eq!(
            m.sliding(Series::Connections, &net("10.0.0.1/32"), at(199)),
            4
        );
    }

    #[test]
    fn state_round_trips_and_refuses_damage() {
        let dir = std::env::temp_dir().join(format!("ia-monitors-{}", std::process::id()));
        let path = dir.join("monitors.state");
        let mut monitors = Monitors::new(&[spec("60,2"), spec("300,6")], 100);
        monitors.record(Series::Connections, ip("10.0.0.1"), 3, at(30));
        monitors.record(Series::Receptions, ip("2001:db8::1"), 2, at(70));
        monitors.save(&path).unwrap();

        let mut restored = Monitors::new(&[spec("60,2"), spec("10,1")], 100);
        let report = restored.load(&path, at(80)).unwrap();
        assert_eq!(report.restored, vec![spec("60,2")]);
        assert_eq!(report.ignored, vec![spec("300,6")]);
        let m = restored.by_key("60,2").unwrap();
        assert_eq!(
            m.sum(Series::Connections, &net("10.0.0.0/8"), 1, 1, at(80)),
            3
        );
        assert_eq!(
            m.sum(Series::Receptions, &net("2001:db8::/32"), 0, 0, at(80)),
            2
        );
        assert_eq!(m.tracked(), 2);

        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let mut fresh = Monitors::new(&[spec("60,2")], 100);
        assert!(matches!(
            fresh.load(&path, at(80)),
            Err(StateError::Corrupt { .. })
        ));
        assert_eq!(fresh.by_key("60,2").unwrap().tracked(), 0);

        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(matches!(
            fresh.load(&path, at(80)),
            Err(StateError::Foreign { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
