//! Executes a parsed request against the shared state.

use std::time::Duration;

use ipnet::IpNet;

use crate::{
    cluster::{ClusterStats, Fleet},
    counting::{
        monitors::{Monitor, Monitors},
        state::{AgentStats, SharedState},
    },
    domain::{Series, CLUSTER_SERVICE, DEFAULT_SERVICE},
    serving::protocol::{
        ErrorCode, MonitorRef, Query, QueryError, Reply, Request, ServiceArg, ShowScope,
    },
};

pub fn execute(request: &Request, state: &SharedState, now: Duration) -> Reply {
    // Every answer reflects every event the kernel had produced when it was asked.
    state.drain_events(now);
    match run(request, state, now) {
        Ok(reply) => reply,
        Err(error) => Reply::Error(error),
    }
}

fn run(request: &Request, state: &SharedState, now: Duration) -> Result<Reply, QueryError> {
    let client = request.client.map(|c| c.ip);
    match &request.query {
        Query::SessionCount { cidr, service } => {
            let net = cidr.resolve(client)?;
            match service_slot(request, service, state)? {
                Target::Local(slot) => Ok(Reply::Count(state.read_sessions().count(slot, &net))),
                Target::Cluster => {
                    let fleet = fleet_of(state)?;
                    let local = local_sessions(state, DEFAULT_SERVICE, &net);
                    Ok(Reply::Count(
                        local.saturating_add(fleet.sessions(DEFAULT_SERVICE, &net)),
                    ))
                }
            }
        }
        Query::Windowed {
            series,
            monitor,
            cidr,
            first,
            last,
            cluster,
        } => {
            let net = cidr.resolve(client)?;
            let (local, spec) = {
                let monitors = state.lock_monitors();
                let monitor = find_monitor(&monitors, monitor)?;
                (
                    monitor.sum(*series, &net, *first, *last, now),
                    monitor.spec(),
                )
            };
            if !*cluster {
                return Ok(Reply::Count(local));
            }
            let fleet = fleet_of(state)?;
            let others = fleet.windows(None, spec, *series, &net, (*first, *last), now);
            Ok(Reply::Count(local.saturating_add(others)))
        }
        Query::Sliding {
            series,
            monitor,
            cidr,
            cluster,
        } => {
            let net = cidr.resolve(client)?;
            let monitors = state.lock_monitors();
            let monitor = find_monitor(&monitors, &MonitorRef::Position(*monitor))?;
            if !*cluster {
                return Ok(Reply::Count(monitor.sliding(*series, &net, now)));
            }
            let spec = monitor.spec();
            let (current, previous) = (
                monitor.sum(*series, &net, 0, 0, now),
                monitor.sum(*series, &net, 1, 1, now),
            );
            drop(monitors);
            let fleet = fleet_of(state)?;
            let others = |k| fleet.windows(None, spec, *series, &net, (k, k), now);
            Ok(Reply::Count(sliding(
                current.saturating_add(others(0)),
                previous.saturating_add(others(1)),
                spec.window_secs,
                now,
            )))
        }
        Query::Add { series, ip, n } => {
            let mut monitors = state.lock_monitors();
            if monitors.is_empty() {
                return Err(not_configured());
            }
            state.stats.observed.recorded(*series, *n);
            Ok(Reply::Count(monitors.record(*series, *ip, *n, now)))
        }
        Query::Show { cidr, scope } => {
            let net = cidr.resolve(client)?;
            Ok(Reply::Lines(match scope {
                ShowScope::Local => show(state, &net, now),
                ShowScope::Cluster => show_cluster(state, &net, now)?,
                ShowScope::Node(node) => show_node(state, node, &net, now)?,
            }))
        }
        // The socket server streams it (`show_all::stream`); a caller without
        // a stream to write to gets no million-line reply in memory.
        Query::ShowAll => Err(QueryError::new(
            ErrorCode::Syntax,
            "show all is streamed: send it on the query socket (inbound-audit show all)",
        )),
        Query::Stats => Ok(Reply::Lines(stats(state))),
        Query::CidrShell(shell) => crate::serving::cidr_shell::answer(shell, state, now),
        // The server hands these to the policy host when there is one.
        Query::Policy(_) => Err(QueryError::new(
            ErrorCode::NoPolicy,
            "policy requests need lua_policy_scripts in the agent's config",
        )),
    }
}

/// Momentum's Sieve estimate of the last W seconds (see `Monitor::sliding`),
/// from cluster-wide sums of the current and the previous window.
fn sliding(current: u64, previous: u64, window_secs: u64, now: Duration) -> u64 {
    let window = window_secs as f64;
    let elapsed = now.as_secs_f64() % window;
    (current as f64 + previous as f64 * (window - elapsed) / window).round() as u64
}

/// The fleet view, or why there is none to answer from.
fn fleet_of(state: &SharedState) -> Result<std::sync::RwLockReadGuard<'_, Fleet>, QueryError> {
    let view = state.cluster().ok_or_else(cluster_disabled)?;
    view.fleet().map_err(|e| {
        QueryError::new(
            ErrorCode::ClusterUnavailable,
            format!("{e}; local counts are still answered"),
        )
    })
}

fn cluster_disabled() -> QueryError {
    QueryError::new(
        ErrorCode::ClusterDisabled,
        "cluster-wide counts need clustering ([cluster] in the config or --cluster-redis), which is not enabled",
    )
}

/// This node's live sessions from `net` to the service named `name` (0 when
/// it has no such service).
fn local_sessions(state: &SharedState, name: &str, net: &IpNet) -> u64 {
    let setup = state.setup();
    setup
        .slots
        .get(name)
        .map_or(0, |&slot| state.read_sessions().count(slot, net))
}

/// The agent's counters, `name value` per line, stable names for scripts.
fn stats(state: &SharedState) -> Vec<String> {
    let s = &state.stats;
    let get = AgentStats::get;
    let sessions = state.read_sessions();
    let monitors = state.lock_monitors();
    let mut lines = vec![
        format!("tracked_ips {}", sessions.tracked_ips()),
        format!("index_heap_bytes {}", sessions.heap_bytes()),
        format!("kernel_sessions {}", get(&s.kernel_sessions)),
        format!("kernel_seeded_sessions {}", get(&s.kernel_seeded_sessions)),
        format!(
            "close_backstop_attached {}",
            get(&s.close_backstop_attached)
        ),
        format!("events_applied {}", get(&s.events)),
        format!("index_repairs {}", get(&s.repairs)),
        format!("kernel_repairs {}", get(&s.kernel_repairs)),
        format!("zero_entries_collected {}", get(&s.collected)),
        format!("closes_without_open {}", get(&s.underflows)),
        format!("queries {}", get(&s.queries)),
        format!("kernel_events_lost {}", get(&s.kernel_events_lost)),
        format!("kernel_ip_table_full {}", get(&s.kernel_ip_table_full)),
        format!(
            "kernel_socket_table_full {}",
            get(&s.kernel_socket_table_full)
        ),
        format!(
            "kernel_tables_saturated {}",
            if get(&s.kernel_tables_saturated) > 0 {
                "yes"
            } else {
                "no"
            }
        ),
        format!(
            "kernel_tables_last_saturated {}",
            match get(&s.kernel_tables_last_saturated) {
                0 => "never".to_string(),
                secs => secs.to_string(),
            }
        ),
        format!("kernel_refused_counted_later {}", get(&s.adopted)),
        format!("kernel_limits_attached {}", get(&s.kernel_limits_attached)),
        format!("kernel_limit_refusals {}", get(&s.kernel_limit_refusals)),
        format!(
            "kernel_limit_dry_run_refusals {}",
            get(&s.kernel_limit_dry_run_refusals)
        ),
        format!("kernel_limit_cuts {}", get(&s.kernel_limit_cuts)),
        format!(
            "kernel_limit_dry_run_cuts {}",
            get(&s.kernel_limit_dry_run_cuts)
        ),
        format!("reloads {}", get(&s.reloads)),
        format!("reloads_refused {}", get(&s.reloads_refused)),
        format!(
            "monitor_entries {}",
            monitors.iter().map(|m| m.tracked()).sum::<usize>()
        ),
        format!("monitor_dropped {}", monitors.dropped()),
    ];
    drop((sessions, monitors));
    lines.extend(cluster_stats(state));
    lines
}

/// `cluster_*` lines: off, or the live nodes and how fresh each one's data is.
fn cluster_stats(state: &SharedState) -> Vec<String> {
    let Some(view) = state.cluster() else {
        return vec!["cluster_enabled no".into()];
    };
    let s = &view.stats;
    let get = ClusterStats::get;
    let ages = view.node_ages();
    let mut lines = vec![
        "cluster_enabled yes".to_string(),
        format!("cluster_node {}", view.node()),
        format!("cluster_nodes_live {}", ages.len() + 1),
        format!(
            "cluster_sync_age_ms {}",
            view.sync_age()
                .map_or("never".to_string(), |a| a.as_millis().to_string())
        ),
        format!("cluster_batches_published {}", get(&s.batches_published)),
        format!(
            "cluster_snapshots_published {}",
            get(&s.snapshots_published)
        ),
        format!("cluster_snapshots_loaded {}", get(&s.snapshots_loaded)),
        format!("cluster_publish_errors {}", get(&s.publish_errors)),
        format!("cluster_follow_errors {}", get(&s.follow_errors)),
        format!("cluster_entries_refused {}", get(&s.refused)),
        format!("cluster_fleet_entries {}", view.entries()),
    ];
    lines.extend(
        ages.iter()
            .map(|(node, age)| format!("cluster_node_age_ms.{node} {}", age.as_millis())),
    );
    lines
}

/// Momentum's console `show ip` layout (`Connections 300/0: 30`), every window
/// of every monitor, then live sessions per service.
fn show(state: &SharedState, net: &IpNet, now: Duration) -> Vec<String> {
    let mut lines = vec![format!("Network {net}")];
    let monitors = state.lock_monitors();
    // Refusals only where kernel limits make them: other agents' output stays as it was.
    let refusing = !state.setup().config.kernel_limits.is_empty();
    for series in Series::ALL {
        if series == Series::Refusals && !refusing {
            continue;
        }
        for monitor in monitors.iter() {
            let spec = monitor.spec();
            for window in 0..=spec.kept {
                let count = monitor.sum(series, net, window, window, now);
                lines.push(format!(
                    "{} {}/{window}: {count}",
                    series.title(),
                    spec.window_secs
                ));
            }
        }
    }
    for monitor in monitors.iter().filter(|m| m.dropped() > 0) {
        lines.push(format!(
            "Dropped {}: {} (tracked-IP cap reached)",
            monitor.spec(),
            monitor.dropped()
        ));
    }
    drop(monitors);
    // Only while it is true: a table that recovered is no warning any more.
    let stats = &state.stats;
    if AgentStats::get(&stats.kernel_tables_saturated) > 0 {
        lines.push(format!(
            "Kernel tables saturated: {} sessions refused so far, {} of them counted once there was room; \
             last saturated at {} (Unix time; raise max_tracked_ips)",
            stats.refused(),
            AgentStats::get(&stats.adopted),
            AgentStats::get(&stats.kernel_tables_last_saturated)
        ));
    }
    let sessions = state.read_sessions();
    let setup = state.setup();
    for service in &setup.config.services {
        let count = setup
            .slots
            .get(&service.name)
            .map_or(0, |&slot| sessions.count(slot, net));
        lines.push(format!("Sessions {}: {count}", service.name));
    }
    lines
}

/// `show <cidr> cluster`: the layout of `show`, summed over the fleet (this
/// node included), then one row per node with its sessions per service and
/// its current window of each monitor.
fn show_cluster(
    state: &SharedState,
    net: &IpNet,
    now: Duration,
) -> Result<Vec<String>, QueryError> {
    let view = state.cluster().ok_or_else(cluster_disabled)?;
    let fleet = fleet_of(state)?;
    let nodes: Vec<&str> = fleet.node_names().collect();
    let mut lines = vec![format!(
        "Network {net} (cluster: {} nodes)",
        nodes.len() + 1
    )];
    let setup = state.setup();
    {
        let monitors = state.lock_monitors();
        for series in Series::ALL {
            for monitor in monitors.iter() {
                let spec = monitor.spec();
                for window in 0..=spec.kept {
                    let count = monitor
                        .sum(series, net, window, window, now)
                        .saturating_add(fleet.windows(
                            None,
                            spec,
                            series,
                            net,
                            (window, window),
                            now,
                        ));
                    lines.push(format!(
                        "{} {}/{window}: {count}",
                        series.title(),
                        spec.window_secs
                    ));
                }
            }
        }
    }
    for service in &setup.config.services {
        let count = local_sessions(state, &service.name, net)
            .saturating_add(fleet.sessions(&service.name, net));
        lines.push(format!("Sessions {}: {count}", service.name));
    }
    let row = |node: Option<&str>| {
        let mut parts: Vec<String> = setup
            .config
            .services
            .iter()
            .map(|s| {
                let count = match node {
                    None => local_sessions(state, &s.name, net),
                    Some(node) => fleet.node_sessions(node, &s.name, net),
                };
                format!("Sessions {} {count}", s.name)
            })
            .collect();
        for spec in &setup.config.monitors {
            for series in Series::ALL {
                let count = match node {
                    None => state
                        .lock_monitors()
                        .by_key(&spec.to_string())
                        .map_or(0, |m| m.sum(series, net, 0, 0, now)),
                    Some(node) => fleet.windows(Some(node), *spec, series, net, (0, 0), now),
                };
                parts.push(format!("{} {}/0 {count}", series.title(), spec.window_secs));
            }
        }
        parts.join(", ")
    };
    lines.push(format!("Node {} (this node): {}", view.node(), row(None)));
    for node in nodes {
        lines.push(format!("Node {node}: {}", row(Some(node))));
    }
    Ok(lines)
}

/// `show <cidr> node NAME`: one node's own view, in `show`'s layout.
fn show_node(
    state: &SharedState,
    node: &str,
    net: &IpNet,
    now: Duration,
) -> Result<Vec<String>, QueryError> {
    let view = state.cluster().ok_or_else(cluster_disabled)?;
    if node == view.node() {
        return Ok(show(state, net, now));
    }
    let fleet = fleet_of(state)?;
    if fleet.node(node).is_none() {
        let known: Vec<&str> = std::iter::once(view.node())
            .chain(fleet.node_names())
            .collect();
        return Err(QueryError::new(
            ErrorCode::UnknownNode,
            format!("no live node {node:?} (live: {})", known.join(", ")),
        ));
    }
    let setup = state.setup();
    let mut lines = vec![format!("Network {net} (node {node})")];
    for series in Series::ALL {
        for spec in &setup.config.monitors {
            for window in 0..=spec.kept {
                let count = fleet.windows(Some(node), *spec, series, net, (window, window), now);
                lines.push(format!(
                    "{} {}/{window}: {count}",
                    series.title(),
                    spec.window_secs
                ));
            }
        }
    }
    for service in &setup.config.services {
        let count = fleet.node_sessions(node, &service.name, net);
        lines.push(format!("Sessions {}: {count}", service.name));
    }
    Ok(lines)
}

fn find_monitor<'m>(
    monitors: &'m Monitors,
    wanted: &MonitorRef,
) -> Result<&'m Monitor, QueryError> {
    if monitors.is_empty() {
        return Err(not_configured());
    }
    let found = match wanted {
        MonitorRef::Key(key) => monitors.by_key(key),
        MonitorRef::Position(position) => monitors.by_position(*position as usize),
        MonitorRef::First => monitors.by_position(0),
    };
    found.ok_or_else(|| {
        let configured: Vec<String> = monitors
            .iter()
            .map(|m| format!("\"{}\"", m.spec()))
            .collect();
        let what = match wanted {
            MonitorRef::Key(key) => format!("'{key}'"),
            MonitorRef::Position(position) => format!("at position {position}"),
            MonitorRef::First => "first".to_string(),
        };
        QueryError::new(
            ErrorCode::UnknownMonitor,
            format!(
                "no monitor {what} (configured, from position 0: {})",
                configured.join(", ")
            ),
        )
    })
}

fn not_configured() -> QueryError {
    QueryError::new(
        ErrorCode::NotConfigured,
        "no monitors are configured (add monitors = [\"300,6\"] to the config or --monitor 300,6)",
    )
}

/// Where a session count is answered from.
enum Target {
    Local(u8),
    /// `inbound_cidr`: SMTP sessions over the fleet.
    Cluster,
}

fn service_slot(
    request: &Request,
    service: &ServiceArg,
    state: &SharedState,
) -> Result<Target, QueryError> {
    let setup = state.setup();
    let name = match service {
        ServiceArg::Named(name) => name.as_str(),
        ServiceArg::Listener => match request.client.and_then(|c| c.port) {
            None => DEFAULT_SERVICE,
            Some(port) => setup.config.service_of_port(port).ok_or_else(|| {
                QueryError::new(
                    ErrorCode::UnknownService,
                    format!(
                        "local port {port} belongs to no configured service (configured: {})",
                        setup.service_names().join(", ")
                    ),
                )
            })?,
        },
    };
    if name == CLUSTER_SERVICE {
        return match state.cluster() {
            Some(_) => Ok(Target::Cluster),
            None => Err(QueryError::new(
                ErrorCode::ClusterDisabled,
                "inbound_cidr is the cluster-wide count and clustering is not enabled",
            )),
        };
    }
    setup
        .slots
        .get(name)
        .copied()
        .map(Target::Local)
        .ok_or_else(|| {
            QueryError::new(
                ErrorCode::UnknownService,
                format!(
                    "unknown service '{name}' (configured: {}; names are case-sensitive)",
                    setup.service_names().join(", ")
                ),
            )
        })
}

#[cfg(test)]
mod tests;
