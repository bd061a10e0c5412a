//! One scrape: a fresh registry filled from the shared state, encoded in the
//! OpenMetrics text format by `prometheus-client`. The live index is read
//! under its read lock once, for per-service totals and the per-prefix
//! distribution (one walk of the /24 and /64 sum maps, not of every IP); the
//! monitors' lock is not taken at all.
//!
//! Names: `inbound_audit_` prefix, base units, `_total` on counters (the
//! crate appends it). Receptions and rejections carry no service label: the
//! monitors that record them are not per service.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use crate::cluster::ClusterStats;
use crate::counting::{
    index::CidrIndex,
    observed::Labels,
    state::{AgentStats, SharedState},
};

/// Upper bounds of the per-prefix session buckets; the last bucket is open.
const PREFIX_BUCKETS: [(u64, &str); 4] = [(1, "1"), (5, "2-5"), (20, "6-20"), (100, "21-100")];
const PREFIX_OVER: &str = "over_100";

/// Prefixes per bucket (same order as [`PREFIX_BUCKETS`], then the open one).
type Distribution = [u64; PREFIX_BUCKETS.len() + 1];

fn bucket_of(sum: u64) -> usize {
    PREFIX_BUCKETS
        .iter()
        .position(|&(max, _)| sum <= max)
        .unwrap_or(PREFIX_BUCKETS.len())
}

fn bucket_name(i: usize) -> &'static str {
    PREFIX_BUCKETS.get(i).map_or(PREFIX_OVER, |&(_, name)| name)
}

/// What one service slot's index holds, read under the sessions lock.
struct SlotView {
    sessions: u64,
    v4_24: Distribution,
    v6_64: Distribution,
}

fn view(index: &CidrIndex) -> SlotView {
    let mut v4 = Distribution::default();
    let mut v6 = Distribution::default();
    for (net, sum) in index.hot_sums() {
        match net {
            ipnet::IpNet::V4(_) => v4[bucket_of(sum)] += 1,
            ipnet::IpNet::V6(_) => v6[bucket_of(sum)] += 1,
        }
    }
    SlotView {
        sessions: index.total(),
        v4_24: v4,
        v6_64: v6,
    }
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

fn gauge(value: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    g
}

fn stat(counter: &AtomicU64) -> u64 {
    AgentStats::get(counter)
}

/// The agent's resident set from /proc/self/statm; None where it is unreadable.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The registry for one scrape.
pub fn registry(state: &SharedState) -> Registry {
    let setup = state.setup();
    let slots: Vec<(String, u8)> = setup
        .config
        .services
        .iter()
        .filter_map(|s| setup.slots.get(&s.name).map(|&slot| (s.name.clone(), slot)))
        .collect();
    let (views, tracked_ips) = {
        let sessions = state.read_sessions();
        let views: Vec<SlotView> = slots
            .iter()
            .map(|&(_, slot)| {
                sessions
                    .slot(slot)
                    .map_or_else(|| view(&CidrIndex::new()), view)
            })
            .collect();
        (views, sessions.tracked_ips())
    };

    let stats = &state.stats;
    let observed = &stats.observed;
    let mut registry = Registry::with_prefix("inbound_audit");

    let sessions = Family::<Labels, Gauge>::default();
    let accepted = Family::<Labels, Counter>::default();
    let prefixes = Family::<Labels, Gauge>::default();
    for ((name, slot), view) in slots.iter().zip(&views) {
        let service = || ("service", name.clone());
        sessions
            .get_or_create(&vec![service()])
            .set(i64::try_from(view.sessions).unwrap_or(i64::MAX));
        accepted
            .get_or_create(&vec![service()])
            .inc_by(observed.accepted_on(*slot));
        for (prefix, dist) in [("24", &view.v4_24), ("64", &view.v6_64)] {
            for (i, &n) in dist.iter().enumerate() {
                prefixes
                    .get_or_create(&vec![
                        service(),
                        ("prefix", prefix.to_string()),
                        ("sessions", bucket_name(i).to_string()),
                    ])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
    registry.register(
        "sessions",
        "Live sessions per service, from the agent's index",
        sessions,
    );
    registry.register(
        "accepted_connections",
        "Connections accepted per service (kernel open events)",
        accepted,
    );
    registry.register(
        "prefixes",
        "IPv4 /24 (prefix=24) and IPv6 /64 (prefix=64) networks per service, by how many live sessions they hold",
        prefixes,
    );
    registry.register(
        "receptions",
        "Receptions recorded into the monitors (add, Postfix END-OF-MESSAGE)",
        observed.receptions.clone(),
    );
    registry.register(
        "rejections",
        "Rejections recorded into the monitors (add, refusing policy answers)",
        observed.rejections.clone(),
    );
    registry.register(
        "tracked_ips",
        "Remote IPs with live sessions in the index, all services",
        gauge(tracked_ips as u64),
    );
    registry.register(
        "kernel_sessions",
        "Sessions the kernel tracks, as of the last reconcile",
        gauge(stat(&stats.kernel_sessions)),
    );
    registry.register(
        "kernel_events_lost",
        "Session events the kernel could not queue to the agent",
        counter(stat(&stats.kernel_events_lost)),
    );
    registry.register(
        "events_applied",
        "Kernel session events applied to the index",
        counter(stat(&stats.events)),
    );
    registry.register(
        "index_repairs",
        "Index counts corrected from the kernel's socket records",
        counter(stat(&stats.repairs)),
    );
    registry.register(
        "kernel_repairs",
        "Kernel per-IP counts corrected from the kernel's socket records",
        counter(stat(&stats.kernel_repairs)),
    );
    registry.register(
        "kernel_tables_saturated",
        "1 while a kernel table is full",
        gauge(stat(&stats.kernel_tables_saturated).min(1)),
    );
    registry.register(
        "kernel_refused_sessions",
        "Sessions a full kernel table refused since the program was loaded",
        counter(stats.refused()),
    );
    registry.register(
        "kernel_limits_attached",
        "1 while the sk_lookup program enforces [[kernel_limits]]",
        gauge(stat(&stats.kernel_limits_attached).min(1)),
    );
    registry.register(
        "kernel_limit_refusals",
        "SYNs refused by a kernel limit (answered with a RST)",
        counter(stat(&stats.kernel_limit_refusals)),
    );
    registry.register(
        "kernel_limit_dry_run_refusals",
        "SYNs a dry-run kernel limit would have refused",
        counter(stat(&stats.kernel_limit_dry_run_refusals)),
    );
    registry.register(
        "kernel_limit_cuts",
        "Sessions over a kernel limit closed with a RST (cut_existing)",
        counter(stat(&stats.kernel_limit_cuts)),
    );
    registry.register(
        "kernel_limit_dry_run_cuts",
        "Sessions a dry-run kernel limit with cut_existing would have closed",
        counter(stat(&stats.kernel_limit_dry_run_cuts)),
    );
    registry.register(
        "reloads",
        "SIGHUP reloads applied",
        counter(stat(&stats.reloads)),
    );
    registry.register(
        "reloads_refused",
        "SIGHUP reloads refused (the running configuration or scripts kept)",
        counter(stat(&stats.reloads_refused)),
    );
    registry.register(
        "queries",
        "Query-socket requests by function and result code (ok or the ERR code)",
        observed.queries.clone(),
    );
    registry.register_with_unit(
        "query_duration",
        "Time to answer one query-socket request",
        Unit::Seconds,
        observed.query_seconds.clone(),
    );
    registry.register(
        "policy_answers",
        "Postfix policy answers by action (its first word)",
        observed.policy_answers.clone(),
    );
    if let Some(bytes) = resident_bytes() {
        registry.register_with_unit(
            "resident_memory",
            "The agent's resident memory",
            Unit::Bytes,
            gauge(bytes),
        );
    }
    if let Some(view) = state.cluster() {
        let ages = view.node_ages();
        registry.register(
            "cluster_nodes_live",
            "Live nodes in the fleet, this one included",
            gauge(ages.len() as u64 + 1),
        );
        let data_age: Family<Labels, Gauge<f64, AtomicU64>> = Family::default();
        for (node, age) in ages {
            data_age
                .get_or_create(&vec![("node", node)])
                .set(age.as_secs_f64());
        }
        registry.register_with_unit(
            "cluster_node_data_age",
            "Time since each other live node's heartbeat last moved",
            Unit::Seconds,
            data_age,
        );
        let cluster = &view.stats;
        registry.register(
            "cluster_publish_errors",
            "Rounds in which publishing this node's counts to Redis failed",
            counter(ClusterStats::get(&cluster.publish_errors)),
        );
        registry.register(
            "cluster_entries_refused",
            "Entries read from Redis and refused as malformed",
            counter(ClusterStats::get(&cluster.refused)),
        );
    }
    registry
}

/// The two text formats a scraper may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, what `prometheus-client` writes and Prometheus asks for.
    OpenMetrics,
    /// Prometheus text 0.0.4, for clients that do not ask for OpenMetrics
    /// (curl, `promtool check metrics`).
    Prometheus,
}

impl Format {
    /// From the request's Accept header, as Prometheus negotiates it.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// OpenMetrics text to Prometheus text 0.0.4. The two differ only in
/// metadata: 0.0.4 names a counter's HELP and TYPE after its `_total`
/// sample, and has no UNIT or EOF lines. Samples are left as they are.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{p}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// One scrape's body in `format`.
pub fn render_as(state: &SharedState, format: Format) -> String {
    let openmetrics = render(state);
    match format {
        Format::OpenMetrics => openmetrics,
        Format::Prometheus => to_prometheus_text(&openmetrics),
    }
}

/// One scrape's body in the OpenMetrics text format.
pub fn render(state: &SharedState) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoding error would be a bug in
    // a metric's labels, and a partial body is still worth serving.
    if let Err(e) = encode(&mut out, &registry(state)) {
        log::warn!("encoding metrics: {e}");
    }
    out
}

#[cfg(test)]
mod tests;
