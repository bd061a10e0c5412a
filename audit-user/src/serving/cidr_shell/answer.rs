//! Answers a [`CidrShell`] request from the live index and the monitors.
//!
//! Most requests (all of `inbound-audit top`'s) list only the rows asked,
//! without visiting every IP: with `order by count`, the first series' best
//! `limit` networks come from its index (the trie's best-first walk for
//! whole addresses, the per-/24 and per-/64 sums, or a walk that stops at
//! the asked prefix length), then each other column is a prefix query per
//! row; with `order by cidr`, each series' first `limit` networks in address
//! order, then the same prefix queries. What is left (a `union`, a range of
//! sizes ordered by count, a monitored series over several windows first, a
//! first series with fewer than `limit` rows and no threshold) reads every
//! network of each series, in chunks of [`CHUNK`] with the lock released
//! between them, so no other query waits long. The sessions lock and the
//! monitors' lock are never held together.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::Duration,
};

use ipnet::IpNet;

use super::{CidrShell, CountRequest, Order, SeriesRef};
use crate::{
    counting::{index::CidrIndex, monitors::Monitors, state::SharedState},
    serving::protocol::reply::{ErrorCode, QueryError, Reply},
};

pub fn answer(
    request: &CidrShell,
    state: &SharedState,
    now: Duration,
) -> Result<Reply, QueryError> {
    match request {
        CidrShell::Available => Ok(Reply::Lines(available(state, now))),
        CidrShell::Count(count) => Ok(Reply::Lines(show_count(count, state, now)?)),
    }
}

/// Momentum's `show available` layout: `<series> : <what it covers>`.
fn available(state: &SharedState, now: Duration) -> Vec<String> {
    let setup = state.setup();
    let mut lines = vec!["sessions : live, every service".to_string()];
    for service in &setup.config.services {
        lines.push(format!("sessions.{} : live", service.name));
    }
    let monitors = state.lock_monitors();
    for (position, monitor) in monitors.iter().enumerate() {
        let spec = monitor.spec();
        let start = (now.as_secs() / spec.window_secs).saturating_sub(u64::from(spec.kept))
            * spec.window_secs;
        for series in crate::domain::Series::ALL {
            lines.push(format!(
                "{}.{position} : monitor \"{spec}\" @0-{} : {} => {}",
                series.name(),
                spec.kept,
                momentum_time(start),
                momentum_time(now.as_secs()),
            ));
        }
    }
    lines
}

/// `YYYYMMDDTHHMMSS` in UTC, as Momentum's `show available` prints times.
fn momentum_time(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|secs| jiff::Timestamp::from_second(secs).ok())
        .unwrap_or(jiff::Timestamp::MAX)
        .strftime("%Y%m%dT%H%M%S")
        .to_string()
}

/// What one series reads, resolved against the configuration.
enum Resolved {
    Sessions(Vec<u8>),
    Monitored {
        series: crate::domain::Series,
        monitor: usize,
        first: u32,
        last: u32,
    },
}

fn resolve(series: &SeriesRef, state: &SharedState) -> Result<Resolved, QueryError> {
    match series {
        SeriesRef::Sessions(None) => {
            let setup = state.setup();
            Ok(Resolved::Sessions(setup.slots.values().copied().collect()))
        }
        SeriesRef::Sessions(Some(name)) => {
            let setup = state.setup();
            let slot = setup
                .slots
                .iter()
                .find(|(service, _)| service.eq_ignore_ascii_case(name))
                .map(|(_, &slot)| slot)
                .ok_or_else(|| {
                    QueryError::new(
                        ErrorCode::UnknownService,
                        format!(
                            "no service {name:?} (configured: {})",
                            setup.service_names().join(", ")
                        ),
                    )
                })?;
            Ok(Resolved::Sessions(vec![slot]))
        }
        &SeriesRef::Monitored {
            series,
            monitor,
            first,
            last,
        } => Ok(Resolved::Monitored {
            series,
            monitor,
            first,
            last,
        }),
    }
}

fn check_monitor(monitors: &Monitors, position: usize) -> Result<(), QueryError> {
    if monitors.is_empty() {
        return Err(QueryError::new(
            ErrorCode::NotConfigured,
            "no monitors are configured (monitors = [\"W,N\"] or --monitor W,N)",
        ));
    }
    if monitors.by_position(position).is_none() {
        return Err(QueryError::new(
            ErrorCode::UnknownMonitor,
            format!(
                "no monitor at position {position} ({} configured, from position 0)",
                monitors.iter().count()
            ),
        ));
    }
    Ok(())
}

/// Networks read per lock hold by a walk over every network of a series:
/// a few milliseconds at most, then every waiting query and event gets in.
#[cfg(not(test))]
pub const CHUNK: usize = 8192;
/// Tiny in tests, so that every walk resumes many times.
#[cfg(test)]
pub const CHUNK: usize = 7;

/// What one series reads inside `cidr` at one prefix length, as `(network,
/// count)` with counts above 0.
struct Column<'a> {
    series: &'a Resolved,
    cidr: &'a IpNet,
    now: Duration,
}

impl Column<'_> {
    /// Counts of this series for each of `nets` (prefix queries).
    fn counts(&self, nets: &[IpNet], state: &SharedState) -> Vec<u64> {
        match self.series {
            Resolved::Sessions(slots) => {
                let sessions = state.read_sessions();
                nets.iter()
                    .map(|net| {
                        slots
                            .iter()
                            .map(|&slot| sessions.count(slot, net))
                            .fold(0, u64::saturating_add)
                    })
                    .collect()
            }
            &Resolved::Monitored {
                series,
                monitor,
                first,
                last,
            } => {
                let monitors = state.lock_monitors();
                let m = monitors.by_position(monitor).expect("checked");
                nets.iter()
                    .map(|net| m.sum(series, net, first, last, self.now))
                    .collect()
            }
        }
    }

    /// Up to `limit` networks of `len` bits in address order from `from`
    /// (None: the start), with their counts (0 where a monitored series'
    /// networks have none in the asked windows), and where to go on from.
    /// One lock hold.
    fn chunk(
        &self,
        len: u8,
        from: Option<IpAddr>,
        limit: usize,
        state: &SharedState,
    ) -> (Vec<(IpNet, u64)>, Option<IpAddr>) {
        let listed: Vec<(IpNet, u64)> = match self.series {
            Resolved::Sessions(slots) => {
                let sessions = state.read_sessions();
                let mut merged: Vec<(IpNet, u64)> = Vec::new();
                for &slot in slots {
                    if let Some(index) = sessions.slot(slot) {
                        merged.extend(index.network_sums(self.cidr, len, from, limit));
                    }
                }
                if slots.len() > 1 {
                    merged.sort_unstable_by_key(|(net, _)| *net);
                    merged.dedup_by(|b, a| {
                        let same = a.0 == b.0;
                        if same {
                            a.1 = a.1.saturating_add(b.1);
                        }
                        same
                    });
                    merged.truncate(limit);
                }
                merged
            }
            &Resolved::Monitored {
                series,
                monitor,
                first,
                last,
            } => {
                let monitors = state.lock_monitors();
                let m = monitors.by_position(monitor).expect("checked");
                // The networks come from the monitor's all-window totals;
                // their counts in the asked windows are prefix queries.
                m.seen(series)
                    .network_sums(self.cidr, len, from, limit)
                    .into_iter()
                    .map(|(net, _)| (net, m.sum(series, &net, first, last, self.now)))
                    .collect()
            }
        };
        let next = if listed.len() < limit {
            None
        } else {
            listed.last().and_then(|(net, _)| after(net))
        };
        (listed, next)
    }

    /// Every network of `len` bits with a count, in address order, a chunk
    /// per lock hold; stops once `enough` have been found.
    fn walk(&self, len: u8, enough: usize, state: &SharedState) -> Vec<(IpNet, u64)> {
        let mut out = Vec::new();
        let mut from = None;
        loop {
            let (chunk, next) = self.chunk(len, from, CHUNK.min(enough.max(1)), state);
            out.extend(chunk.into_iter().filter(|&(_, n)| n > 0));
            if out.len() >= enough {
                out.truncate(enough);
                return out;
            }
            match next {
                Some(next) => from = Some(next),
                None => return out,
            }
        }
    }

    /// The best `limit` networks of `len` bits by count (at least
    /// `threshold`), largest first, equal counts in address order, when this
    /// series can list them without reading all of its networks; None when
    /// it cannot.
    fn best(
        &self,
        len: u8,
        limit: usize,
        threshold: u64,
        state: &SharedState,
    ) -> Option<Vec<(IpNet, u64)>> {
        let width = self.cidr.max_prefix_len();
        let hot = if width == 32 { 24 } else { 64 };
        let from_index = |index: &CidrIndex| -> Vec<(IpNet, u64)> {
            if len == width {
                index
                    .top_ips(self.cidr, limit, threshold)
                    .into_iter()
                    .map(|(ip, n)| (IpNet::from(ip), n))
                    .collect()
            } else if len == hot {
                index
                    .hot_sums()
                    .filter(|(net, _)| self.cidr.contains(net))
                    .collect()
            } else {
                // Walks down to `len` bits only: one entry per network.
                index.network_sums(self.cidr, len, None, usize::MAX)
            }
        };
        let mut rows = match self.series {
            Resolved::Sessions(slots) => {
                let [slot] = slots.as_slice() else {
                    return None;
                };
                let sessions = state.read_sessions();
                sessions.slot(*slot).map(from_index).unwrap_or_default()
            }
            &Resolved::Monitored {
                series,
                monitor,
                first,
                last,
            } => {
                let monitors = state.lock_monitors();
                let m = monitors.by_position(monitor).expect("checked");
                if first != last || first > m.spec().kept {
                    return None;
                }
                m.window(series, first, self.now)
                    .map(from_index)
                    .unwrap_or_default()
            }
        };
        rows.retain(|&(_, n)| n >= threshold.max(1));
        let compare = |a: &(IpNet, u64), b: &(IpNet, u64)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
        if rows.len() > limit && limit > 0 {
            rows.select_nth_unstable_by(limit - 1, compare);
        }
        rows.truncate(limit);
        rows.sort_unstable_by(compare);
        Some(rows)
    }
}

/// The first address after `net`, None past the end of its family.
fn after(net: &IpNet) -> Option<IpAddr> {
    match net {
        IpNet::V4(n) => u32::from(n.broadcast())
            .checked_add(1)
            .map(|a| IpAddr::from(a.to_be_bytes())),
        IpNet::V6(n) => u128::from(n.broadcast())
            .checked_add(1)
            .map(|a| IpAddr::from(a.to_be_bytes())),
    }
}

type Table = Vec<(IpNet, Vec<u64>)>;

/// Rows of `nets`, every column a prefix query.
fn rows_of(nets: Vec<IpNet>, columns: &[Column], union: bool, state: &SharedState) -> Table {
    let counts: Vec<Vec<u64>> = columns.iter().map(|c| c.counts(&nets, state)).collect();
    nets.into_iter()
        .enumerate()
        .map(|(i, net)| {
            let row = counts.iter().map(|c| c[i]);
            let row = if union {
                vec![row.fold(0, u64::saturating_add)]
            } else {
                row.collect()
            };
            (net, row)
        })
        .collect()
}

/// `order by count` without reading every network, when the first series
/// can list its best rows alone: a row that is not among them has a lower
/// first count, or an equal one and a later network. When it has fewer than
/// `limit`, the rest (first count 0, shown only without a threshold) are the
/// other series' first networks in address order.
fn by_count_directly(
    request: &CountRequest,
    columns: &[Column],
    sizes: (u8, u8),
    state: &SharedState,
) -> Option<Table> {
    if request.union || sizes.0 != sizes.1 {
        return None;
    }
    let best = columns[0].best(sizes.0, request.limit, request.threshold, state)?;
    let mut nets: Vec<IpNet> = best.into_iter().map(|(net, _)| net).collect();
    if nets.len() < request.limit && request.threshold == 0 {
        let have: std::collections::HashSet<IpNet> = nets.iter().copied().collect();
        let mut rest = BTreeSet::new();
        for column in &columns[1..] {
            rest.extend(
                column
                    .walk(sizes.0, request.limit, state)
                    .into_iter()
                    .map(|(net, _)| net)
                    .filter(|net| !have.contains(net)),
            );
        }
        let room = request.limit - nets.len();
        nets.extend(rest.into_iter().take(room));
    }
    Some(rows_of(nets, columns, false, state))
}

/// `order by cidr`: each series' first `limit` networks of each size in
/// address order hold the first `limit` rows.
fn by_cidr_directly(
    request: &CountRequest,
    columns: &[Column],
    sizes: (u8, u8),
    state: &SharedState,
) -> Option<Table> {
    if request.threshold > 0 {
        return None;
    }
    let mut nets = BTreeSet::new();
    for column in columns {
        for len in sizes.0..=sizes.1 {
            nets.extend(
                column
                    .walk(len, request.limit, state)
                    .into_iter()
                    .map(|(net, _)| net),
            );
        }
    }
    let nets = nets.into_iter().take(request.limit).collect();
    Some(rows_of(nets, columns, request.union, state))
}

/// Every network of every series, a chunk per lock hold.
fn every_row(
    request: &CountRequest,
    columns: &[Column],
    sizes: (u8, u8),
    state: &SharedState,
) -> Table {
    let maps: Vec<HashMap<IpNet, u64>> = columns
        .iter()
        .map(|column| {
            let mut map = HashMap::new();
            for len in sizes.0..=sizes.1 {
                map.extend(column.walk(len, usize::MAX, state));
            }
            map
        })
        .collect();
    let nets: std::collections::HashSet<IpNet> =
        maps.iter().flat_map(|c| c.keys().copied()).collect();
    nets.into_iter()
        .map(|net| {
            let row = maps.iter().map(|c| c.get(&net).copied().unwrap_or(0));
            let row = if request.union {
                vec![row.fold(0, u64::saturating_add)]
            } else {
                row.collect()
            };
            (net, row)
        })
        .filter(|(_, row)| row[0] >= request.threshold)
        .collect()
}

fn show_count(
    request: &CountRequest,
    state: &SharedState,
    now: Duration,
) -> Result<Vec<String>, QueryError> {
    let width = request.cidr.max_prefix_len();
    let sizes = request.sizes.unwrap_or((width, width));
    let series: Vec<Resolved> = request
        .series
        .iter()
        .map(|s| resolve(s, state))
        .collect::<Result<_, _>>()?;
    {
        let monitors = state.lock_monitors();
        for s in &series {
            if let Resolved::Monitored { monitor, .. } = s {
                check_monitor(&monitors, *monitor)?;
            }
        }
    }
    let columns: Vec<Column> = series
        .iter()
        .map(|series| Column {
            series,
            cidr: &request.cidr,
            now,
        })
        .collect();
    let direct = match request.order {
        Order::Count => by_count_directly(request, &columns, sizes, state),
        Order::Cidr => by_cidr_directly(request, &columns, sizes, state),
    };
    let mut table = direct.unwrap_or_else(|| every_row(request, &columns, sizes, state));
    // Rows read in several lock holds can disagree with the counts read
    // after; the threshold applies to what is shown.
    table.retain(|(_, row)| row[0] >= request.threshold);
    match request.order {
        Order::Cidr => table.sort_unstable_by_key(|(net, _)| *net),
        Order::Count => {
            // Largest first, equal counts in network order; only the first
            // `limit` need sorting.
            let compare = |a: &(IpNet, Vec<u64>), b: &(IpNet, Vec<u64>)| {
                b.1[0].cmp(&a.1[0]).then(a.0.cmp(&b.0))
            };
            if table.len() > request.limit && request.limit > 0 {
                table.select_nth_unstable_by(request.limit - 1, compare);
            }
            table.truncate(request.limit);
            table.sort_unstable_by(compare);
        }
    }
    table.truncate(request.limit);
    Ok(table
        .into_iter()
        .map(|(net, row)| {
            let counts: Vec<String> = row.iter().map(u64::to_string).collect();
            format!("{net} : {}", counts.join(","))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn momentum_times_are_utc_without_separators() {
        assert_eq!(super::momentum_time(0), "19700101T000000");
        assert_eq!(super::momentum_time(1_764_590_461), "20251201T120101");
        assert_eq!(super::momentum_time(951_782_400), "20000229T000000");
    }
}
