//! Tests of the exposition: families, formats, buckets.

use std::{collections::HashMap, net::IpAddr};

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
    AgentStats::add(&state.stats.kernel_limit_refusals, 5);
    AgentStats::add(&state.stats.kernel_limit_dry_run_refusals, 2);
    AgentStats::set(&state.stats.kernel_limits_attached, 1);
    let body = render(&state);
    assert!(line(&body, "inbound_audit_kernel_limit_refusals_total 5").is_some());
    assert!(line(&body, "inbound_audit_kernel_limit_dry_run_refusals_total 2").is_some());
    assert!(line(&body, "inbound_audit_kernel_limits_attached 1").is_some());
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
