//! `show all`: Momentum's `inbound_audit show all` ("verbose statistics for
//! all ... as a CSV list"), every IP the agent tracks with its series.
//!
//! ```text
//! > show all
//! < OK csv
//! < IP,Connections 300/0,...,Connections 300/6,Receptions 300/0,...,Rejections 300/6,Sessions SMTP
//! < 10.0.0.1,3,0,0,0,0,0,0,12,...,2
//! < END 1
//! ```
//!
//! Each row is what `show <ip>` prints for one IP, as one CSV row: the same
//! columns in the same order (every window of every monitor per series,
//! `Refusals` only with kernel limits; then live sessions per service), under
//! a header naming them as `show` does. Rows are in ascending address order,
//! IPv4 first; an IP is tracked while it has a live session on some service
//! or a count in a kept window of some monitor. `END <rows>` ends a whole
//! dump; an `ERR` line instead ends one that could not finish (`reconfigured`:
//! a SIGHUP changed the services or monitors, so the columns no longer hold).
//! A stream without either was cut (the agent stopped, or the client read too
//! slowly).
//!
//! Streamed, a slice at a time: each chunk of at most [`CHUNK_IPS`] IPs takes
//! the sessions' read lock once, then the monitors' lock once, and lets go of
//! both before its rows are formatted and written; the next chunk is taken
//! only once the socket took this one. So other clients wait at most one
//! chunk's lookups behind a dump, and a client that stops reading holds no
//! lock and one chunk of memory until its write times out. A chunk reads the
//! sessions, then the monitors, as they are at that moment: an IP's row is
//! consistent with the others of its chunk, not with earlier chunks, and an
//! IP that appears behind the cursor during the dump is not in it. No IP is
//! written twice (the cursor only moves up), and an IP tracked for the whole
//! dump is always in it.

mod stream;
#[cfg(test)]
mod tests;

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    counting::state::{Setup, SharedState},
    domain::{MonitorSpec, Series},
    serving::protocol::{ErrorCode, QueryError},
};

pub use stream::stream;

/// IPs per chunk: at 1M IPs about two thousand chunks, each holding either
/// lock for about 0.15 ms typically (bench `show_all`, which compares sizes:
/// the hold grows with the chunk, the whole dump hardly shrinks, so the
/// smallest measured wins: windowed queries wait behind one monitors' hold).
pub const CHUNK_IPS: usize = 512;

/// The first line of a dump (after it, the header row).
pub const START_LINE: &str = "OK csv";

/// The last line of a whole dump, before its row count.
pub const END_PREFIX: &str = "END ";

/// One dump in progress: its columns, fixed when it began, and its cursor.
pub struct Dump {
    setup: Arc<Setup>,
    /// Service name and kernel slot, in configuration order.
    services: Vec<(String, u8)>,
    monitors: Vec<MonitorSpec>,
    series: Vec<Series>,
    /// The last IP the dump went past; None before the first chunk.
    after: Option<IpAddr>,
    rows: u64,
    done: bool,
    /// How long the last chunk held the sessions' and the monitors' locks.
    holds: (Duration, Duration),
}

impl Dump {
    pub fn new(state: &SharedState) -> Self {
        let setup = state.setup();
        let services = setup
            .config
            .services
            .iter()
            .filter_map(|s| setup.slots.get(&s.name).map(|&slot| (s.name.clone(), slot)))
            .collect();
        let monitors = state.lock_monitors().iter().map(|m| m.spec()).collect();
        // As `show`: refusals only where kernel limits make them.
        let refusing = !setup.config.kernel_limits.is_empty();
        let series = Series::ALL
            .into_iter()
            .filter(|&s| s != Series::Refusals || refusing)
            .collect();
        Self {
            setup,
            services,
            monitors,
            series,
            after: None,
            rows: 0,
            done: false,
            holds: (Duration::ZERO, Duration::ZERO),
        }
    }

    /// The column names, `show`'s labels: `Connections 300/0`, `Sessions SMTP`.
    pub fn columns(&self) -> Vec<String> {
        let mut columns = vec!["IP".to_string()];
        for series in &self.series {
            for spec in &self.monitors {
                for window in 0..=spec.kept {
                    columns.push(format!("{} {}/{window}", series.title(), spec.window_secs));
                }
            }
        }
        for (name, _) in &self.services {
            columns.push(format!("Sessions {name}"));
        }
        columns
    }

    /// The header row, with its LF.
    pub fn header(&self) -> String {
        let mut line = self.columns().join(",");
        line.push('\n');
        line
    }

    /// Data rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// How long the last chunk held the sessions' read lock and the
    /// monitors' lock: the longest any other client waited behind it.
    pub fn last_holds(&self) -> (Duration, Duration) {
        self.holds
    }

    /// Appends the rows of the next at most `limit` IPs to `out`; `Ok(false)`
    /// once the last chunk was taken.
    pub fn next_chunk(
        &mut self,
        state: &SharedState,
        now: Duration,
        limit: usize,
        out: &mut String,
    ) -> Result<bool, QueryError> {
        if self.done {
            return Ok(false);
        }
        if !Arc::ptr_eq(&state.setup(), &self.setup) {
            return Err(reconfigured());
        }
        let limit = limit.max(1);
        // Every answer reflects every event the kernel had produced when it was asked.
        state.drain_events(now);
        let start = self.after.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let after = self.after;
        let beyond = move |ip: &IpAddr| after.is_none_or(|a| *ip > a);
        let mut bound = Bound::default();

        // Phase 1, under the sessions' read lock: each service's next IPs.
        let sessions: Vec<Vec<(IpAddr, u64)>> = {
            let live = state.read_sessions();
            let held = Instant::now();
            let lists = self
                .services
                .iter()
                .map(|&(_, slot)| {
                    let list: Vec<(IpAddr, u64)> = live.slot(slot).map_or_else(Vec::new, |index| {
                        index
                            .iter_from(start)
                            .filter(|(ip, _)| beyond(ip))
                            .take(limit)
                            .collect()
                    });
                    bound.note(&list, limit, |&(ip, _)| ip);
                    list
                })
                .collect();
            self.holds.0 = held.elapsed();
            lists
        };

        // Phase 2, under the monitors' lock: their next IPs, then the chunk's
        // windows. Only numbers are gathered here; text is made after.
        let (ips, windows) = {
            let monitors = state.lock_monitors();
            let held = Instant::now();
            let specs: Vec<MonitorSpec> = monitors.iter().map(|m| m.spec()).collect();
            if specs != self.monitors {
                return Err(reconfigured());
            }
            let mut seen: Vec<IpAddr> = Vec::new();
            for monitor in monitors.iter() {
                for &series in &self.series {
                    let list: Vec<IpAddr> = monitor
                        .seen(series)
                        .iter_from(start)
                        .map(|(ip, _)| ip)
                        .filter(beyond)
                        .take(limit)
                        .collect();
                    bound.note(&list, limit, |&ip| ip);
                    seen.extend(list);
                }
            }
            seen.extend(sessions.iter().flatten().map(|&(ip, _)| ip));
            seen.sort_unstable();
            seen.dedup();
            // Exact up to the bound: no source has an IP there that it did not list.
            seen.retain(|ip| bound.admits(ip));
            let truncated = seen.len() > limit;
            seen.truncate(limit);
            if !truncated && bound.0.is_none() {
                self.done = true;
            }
            let mut windows = Vec::with_capacity(seen.len() * self.window_columns());
            for &ip in &seen {
                for &series in &self.series {
                    for monitor in monitors.iter() {
                        monitor.ip_windows(series, ip, now, &mut windows);
                    }
                }
            }
            self.holds.1 = held.elapsed();
            (seen, windows)
        };

        self.after = ips.last().copied().or(self.after);
        if ips.is_empty() {
            self.done = true;
        }
        let per_ip = self.window_columns();
        let mut cursors = vec![0usize; sessions.len()];
        let mut row: Vec<u64> = Vec::with_capacity(per_ip + sessions.len());
        for (i, &ip) in ips.iter().enumerate() {
            row.clear();
            row.extend_from_slice(&windows[i * per_ip..(i + 1) * per_ip]);
            for (list, cursor) in sessions.iter().zip(&mut cursors) {
                let count = match list.get(*cursor) {
                    Some(&(at, count)) if at == ip => {
                        *cursor += 1;
                        count
                    }
                    _ => 0,
                };
                row.push(count);
            }
            // Only in a window that has left the history (not yet retired).
            if row.iter().all(|&n| n == 0) {
                continue;
            }
            push_row(out, ip, &row);
            self.rows += 1;
        }
        Ok(!self.done)
    }

    /// Window columns per IP, all monitors and series.
    fn window_columns(&self) -> usize {
        let windows: usize = self.monitors.iter().map(|m| m.kept as usize + 1).sum();
        windows * self.series.len()
    }
}

/// The highest IP up to which a chunk's sources listed everything: the
/// lowest last IP of any source that hit the limit (None: none did).
#[derive(Default)]
struct Bound(Option<IpAddr>);

impl Bound {
    fn note<T>(&mut self, list: &[T], limit: usize, ip: impl Fn(&T) -> IpAddr) {
        if list.len() >= limit {
            if let Some(last) = list.last().map(ip) {
                self.0 = Some(self.0.map_or(last, |b| b.min(last)));
            }
        }
    }

    fn admits(&self, ip: &IpAddr) -> bool {
        self.0.is_none_or(|b| *ip <= b)
    }
}

/// One CSV row: the IP, then its counts. No field can hold a comma, quote or
/// line break, so none is quoted.
fn push_row(out: &mut String, ip: IpAddr, counts: &[u64]) {
    use std::fmt::Write;
    let _ = write!(out, "{ip}");
    for count in counts {
        let _ = write!(out, ",{count}");
    }
    out.push('\n');
}

fn reconfigured() -> QueryError {
    QueryError::new(
        ErrorCode::Reconfigured,
        "the configuration was reloaded during the dump (services or monitors changed its columns); ask again",
    )
}
