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
mod tests {
    use std::{collections::HashMap, net::IpAddr, time::Instant};

    use super::*;
    use crate::{config::Config, domain::ServicePorts};

    fn state() -> SharedState {
        let config = Config {
            services: vec![
                ServicePorts {
                    name: "SMTP".into(),
                    ports: vec![25],
                },
                ServicePorts {
                    name: "SUBMISSION".into(),
                    ports: vec![587],
                },
            ],
            ..Config::default()
        };
        SharedState::new(
            config,
            HashMap::from([("SMTP".to_string(), 0u8), ("SUBMISSION".to_string(), 1u8)]),
        )
    }

    /// Through the path the reconciler uses to set a count.
    fn set(state: &SharedState, slot: u8, ip: &str, n: u64) {
        state
            .write_sessions()
            .repair(&crate::counting::state::Mismatch {
                slot,
                ip: ip.parse::<IpAddr>().unwrap(),
                truth: n,
                seen: 0,
            });
    }

    fn line<'a>(body: &'a str, start: &str) -> Option<&'a str> {
        body.lines().find(|l| l.starts_with(start))
    }

    #[test]
    fn families_carry_the_live_counts() {
        let state = state();
        set(&state, 0, "192.0.2.1", 3);
        set(&state, 0, "192.0.2.2", 4);
        set(&state, 0, "198.51.100.1", 1);
        set(&state, 0, "2001:db8::1", 200);
        set(&state, 1, "192.0.2.9", 2);
        state.stats.observed.accepted(0);
        state.stats.observed.policy_answer("defer Too many");
        state
            .stats
            .observed
            .query("session_count", "ok", std::time::Duration::from_micros(30));
        let body = render(&state);
        assert_eq!(
            line(&body, "inbound_audit_sessions{service=\"SMTP\"}"),
            Some("inbound_audit_sessions{service=\"SMTP\"} 208")
        );
        assert_eq!(
            line(&body, "inbound_audit_sessions{service=\"SUBMISSION\"}"),
            Some("inbound_audit_sessions{service=\"SUBMISSION\"} 2")
        );
        assert_eq!(
            line(&body, "inbound_audit_tracked_ips "),
            Some("inbound_audit_tracked_ips 5")
        );
        assert_eq!(
            line(
                &body,
                "inbound_audit_accepted_connections_total{service=\"SMTP\"}"
            ),
            Some("inbound_audit_accepted_connections_total{service=\"SMTP\"} 1")
        );
        // 192.0.2.0/24 holds 7 sessions, 198.51.100.0/24 one; 2001:db8::/64 200.
        let prefix = |p: &str, b: &str| {
            let start = format!(
                "inbound_audit_prefixes{{service=\"SMTP\",prefix=\"{p}\",sessions=\"{b}\"}} "
            );
            line(&body, &start).map(|l| l[start.len()..].to_string())
        };
        assert_eq!(prefix("24", "1").as_deref(), Some("1"));
        assert_eq!(prefix("24", "6-20").as_deref(), Some("1"));
        assert_eq!(prefix("24", "2-5").as_deref(), Some("0"));
        assert_eq!(prefix("64", "over_100").as_deref(), Some("1"));
        assert!(line(
            &body,
            "inbound_audit_policy_answers_total{action=\"defer\"} 1"
        )
        .is_some());
        assert!(line(
            &body,
            "inbound_audit_queries_total{function=\"session_count\",code=\"ok\"} 1"
        )
        .is_some());
        assert!(line(&body, "inbound_audit_query_duration_seconds_count 1").is_some());
        assert!(line(
            &body,
            "# TYPE inbound_audit_query_duration_seconds histogram"
        )
        .is_some());
        assert!(line(&body, "inbound_audit_resident_memory_bytes ").is_some());
        assert!(body.ends_with("# EOF\n"));
    }

    #[test]
    fn prometheus_text_names_counter_metadata_after_the_sample() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total 3\n\
                  # HELP x_mem Memory.\n# TYPE x_mem gauge\n# UNIT x_mem bytes\nx_mem 5\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total 3\n\
             # HELP x_mem Memory.\n# TYPE x_mem gauge\nx_mem 5\n"
        );
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
    }

    #[test]
    fn cluster_families_only_with_clustering() {
        let state = state();
        assert!(!render(&state).contains("cluster"));
        let view = std::sync::Arc::new(crate::cluster::ClusterView::new(
            "mx1",
            std::time::Duration::from_secs(5),
        ));
        state.enable_cluster(view);
        let text = render_as(&state, Format::Prometheus);
        assert!(
            text.contains("inbound_audit_cluster_nodes_live 1\n"),
            "{text}"
        );
        assert!(
            text.contains("inbound_audit_cluster_publish_errors_total 0\n"),
            "{text}"
        );
        // No other node is live yet: no data-age samples.
        assert!(
            !text.contains("inbound_audit_cluster_node_data_age_seconds{"),
            "{text}"
        );
    }

    #[test]
    fn distribution_buckets_are_inclusive_upper_bounds() {
        let buckets: Vec<usize> = [1, 2, 5, 6, 20, 21, 100, 101].map(bucket_of).into();
        assert_eq!(buckets, [0, 1, 1, 2, 2, 3, 3, 4]);
    }

    fn million_ip_state() -> SharedState {
        let state = state();
        let mut tally = crate::counting::state::Tally::new();
        for i in 0..1_000_000u32 {
            // Spread over ~140k /24s, 1 to 9 sessions each IP.
            let ip = IpAddr::from((0x0a00_0000u32 + i * 37).to_be_bytes());
            tally.insert((0, ip), u64::from(i % 9 + 1));
        }
        state.write_sessions().load(&tally);
        state
    }

    fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
        sorted[((sorted.len() - 1) as f64 * p) as usize]
    }

    /// The figures for the README: a scrape at 1M tracked IPs and how long it
    /// holds the sessions read lock; a `top` request; and the p99 of other
    /// queries while scrapes and `top` requests run in a loop.
    /// `cargo test --release -p audit-user --lib -- --ignored --nocapture million`
    #[test]
    #[ignore = "measurement: builds 1M tracked IPs"]
    fn scrape_and_top_at_a_million_ips() {
        use crate::serving::{command::execute, protocol::parse_request};
        let state = std::sync::Arc::new(million_ip_state());
        assert_eq!(state.read_sessions().tracked_ips(), 1_000_000);
        let mut under_lock = Vec::new();
        let mut whole = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            {
                let sessions = state.read_sessions();
                std::hint::black_box(view(sessions.slot(0).unwrap()));
            }
            under_lock.push(started.elapsed());
            let started = Instant::now();
            std::hint::black_box(render(&state));
            whole.push(started.elapsed());
        }
        under_lock.sort();
        whole.sort();
        println!(
            "1M IPs: scrape holds the sessions read lock {:?} median, {:?} max; whole scrape {:?} median",
            under_lock[5], under_lock[9], whole[5]
        );
        let now = crate::domain::unix_now();
        let ask = |line: &str| execute(&parse_request(line.as_bytes()).unwrap(), &state, now);
        for (what, line) in [
            (
                "top /24",
                "show count for 0.0.0.0/0 in sessions.SMTP cidrsize 24 order by count limit 15",
            ),
            (
                "top /32",
                "show count for 0.0.0.0/0 in sessions.SMTP cidrsize 32 order by count limit 15",
            ),
        ] {
            let mut times = Vec::new();
            for _ in 0..5 {
                let started = Instant::now();
                std::hint::black_box(ask(line));
                times.push(started.elapsed());
            }
            times.sort();
            println!("1M IPs: {what} request {:?} median", times[2]);
        }
        // What of the /32 request holds the sessions read lock: the copy.
        let mut held = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            {
                let sessions = state.read_sessions();
                std::hint::black_box(crate::serving::cidr_shell::gather(
                    sessions.slot(0).unwrap(),
                    &"0.0.0.0/0".parse().unwrap(),
                    (32, 32),
                ));
            }
            held.push(started.elapsed());
        }
        held.sort();
        println!(
            "1M IPs: top /32 holds the sessions read lock {:?} median",
            held[2]
        );
        let query = "msys.audit.inbound_session_count(\"10.1.2.0/24\", \"SMTP\")";
        let measure = || {
            let mut times = Vec::with_capacity(20_000);
            for _ in 0..20_000 {
                let started = Instant::now();
                std::hint::black_box(ask(query));
                times.push(started.elapsed());
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            times.sort();
            (
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                times[times.len() - 1],
            )
        };
        let quiet = measure();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let background = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rounds = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::black_box(render(&state));
                    for cidr in ["0.0.0.0/0", "::/0"] {
                        let line = format!(
                            "show count for {cidr} in sessions.SMTP cidrsize {} order by count limit 15",
                            if cidr == "::/0" { 64 } else { 24 }
                        );
                        std::hint::black_box(execute(
                            &parse_request(line.as_bytes()).unwrap(),
                            &state,
                            now,
                        ));
                    }
                    rounds += 1;
                }
                rounds
            })
        };
        let busy = measure();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = background.join().unwrap();
        println!(
            "1M IPs: session_count p50/p99/max {:?}/{:?}/{:?} quiet; {:?}/{:?}/{:?} while {rounds} scrape+top rounds ran",
            quiet.0, quiet.1, quiet.2, busy.0, busy.1, busy.2
        );
    }
}
