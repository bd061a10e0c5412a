//! Tests of the exposition: families, formats, buckets, and the 1M-IP measurement.

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
        let start =
            format!("inbound_audit_prefixes{{service=\"SMTP\",prefix=\"{p}\",sessions=\"{b}\"}} ");
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
