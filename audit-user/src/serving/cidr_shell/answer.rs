//! Answers a [`CidrShell`] request from the live index and the monitors.
//! Each series becomes a map from network to count in one pass over the
//! index (its per-/24 and per-/64 sums where the size allows, otherwise its
//! IPs inside the request's cidr), copied out under the sessions lock and
//! grouped after it is released; a monitored series' networks come from the
//! monitor's totals and their counts in the asked windows are prefix queries.
//! Only the first `limit` rows are sorted. The sessions lock and the
//! monitors' lock are taken one series at a time, never together.

use std::{collections::HashMap, net::IpAddr, time::Duration};

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

fn same_family(net: &IpNet, ip: IpAddr) -> bool {
    matches!(
        (net, ip),
        (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_))
    )
}

/// What a series holds inside the request's cidr, copied out under the
/// lock so that grouping and hashing happen after it is released.
pub enum Gathered {
    /// The index's per-/24 (/64) sums, when that is the only size asked.
    Hot(Vec<(IpNet, u64)>),
    Ips(Vec<(IpAddr, u64)>),
}

pub fn gather(index: &CidrIndex, cidr: &IpNet, sizes: (u8, u8)) -> Gathered {
    let hot = match cidr {
        IpNet::V4(_) => 24,
        IpNet::V6(_) => 64,
    };
    if sizes == (hot, hot) {
        return Gathered::Hot(
            index
                .hot_sums()
                .filter(|(net, _)| cidr.contains(net))
                .collect(),
        );
    }
    Gathered::Ips(
        index
            .iter()
            .filter(|&(ip, _)| same_family(cidr, ip) && cidr.contains(&ip))
            .collect(),
    )
}

/// Adds each network's count of `gathered` to `sums`.
fn add_sums(gathered: Gathered, sizes: (u8, u8), sums: &mut HashMap<IpNet, u64>) {
    let mut add = |net: IpNet, n: u64| {
        let entry = sums.entry(net).or_default();
        *entry = entry.saturating_add(n);
    };
    match gathered {
        Gathered::Hot(nets) => nets.into_iter().for_each(|(net, n)| add(net, n)),
        Gathered::Ips(ips) => {
            for (ip, count) in ips {
                for len in sizes.0..=sizes.1 {
                    if let Ok(net) = IpNet::new(ip, len) {
                        add(net.trunc(), count);
                    }
                }
            }
        }
    }
}

/// One column: each network's count of one series.
fn column(
    series: &Resolved,
    request: &CountRequest,
    sizes: (u8, u8),
    state: &SharedState,
    now: Duration,
) -> Result<HashMap<IpNet, u64>, QueryError> {
    let mut sums = HashMap::new();
    match series {
        Resolved::Sessions(slots) => {
            let gathered: Vec<Gathered> = {
                let sessions = state.read_sessions();
                slots
                    .iter()
                    .filter_map(|&slot| sessions.slot(slot))
                    .map(|index| gather(index, &request.cidr, sizes))
                    .collect()
            };
            for g in gathered {
                add_sums(g, sizes, &mut sums);
            }
        }
        Resolved::Monitored {
            series,
            monitor,
            first,
            last,
        } => {
            let monitors = state.lock_monitors();
            check_monitor(&monitors, *monitor)?;
            let m = monitors.by_position(*monitor).expect("checked");
            // The networks come from the monitor's all-window totals; their
            // counts in the asked windows are prefix queries.
            let mut seen = HashMap::new();
            add_sums(
                gather(m.seen(*series), &request.cidr, sizes),
                sizes,
                &mut seen,
            );
            for net in seen.into_keys() {
                let count = m.sum(*series, &net, *first, *last, now);
                if count > 0 {
                    sums.insert(net, count);
                }
            }
        }
    }
    Ok(sums)
}

fn show_count(
    request: &CountRequest,
    state: &SharedState,
    now: Duration,
) -> Result<Vec<String>, QueryError> {
    let width = match request.cidr {
        IpNet::V4(_) => 32,
        IpNet::V6(_) => 128,
    };
    let sizes = request.sizes.unwrap_or((width, width));
    let series: Vec<Resolved> = request
        .series
        .iter()
        .map(|s| resolve(s, state))
        .collect::<Result<_, _>>()?;
    // One lock at a time, one series at a time.
    let columns: Vec<HashMap<IpNet, u64>> = series
        .iter()
        .map(|s| column(s, request, sizes, state, now))
        .collect::<Result<_, _>>()?;
    let nets: std::collections::HashSet<IpNet> =
        columns.iter().flat_map(|c| c.keys().copied()).collect();
    let mut table: Vec<(IpNet, Vec<u64>)> = nets
        .into_iter()
        .map(|net| {
            let row = columns.iter().map(|c| c.get(&net).copied().unwrap_or(0));
            let row = if request.union {
                vec![row.fold(0, u64::saturating_add)]
            } else {
                row.collect()
            };
            (net, row)
        })
        .filter(|(_, row)| row[0] >= request.threshold)
        .collect();
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
