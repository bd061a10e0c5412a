//! Tests of answering requests against the shared state.

use std::{collections::HashMap, net::IpAddr};

use audit_common::{SessionEvent, EVENT_OPEN, FAMILY_V4};

use super::*;
use crate::{
    config::Config, counting::state::ApplyOutcome, domain::ServicePorts,
    serving::protocol::parse_request,
};

fn state() -> SharedState {
    let config = Config {
        services: vec![
            ServicePorts {
                name: "SMTP".into(),
                ports: vec![25, 587],
            },
            ServicePorts {
                name: "Control".into(),
                ports: vec![2025],
            },
        ],
        ..Config::default()
    };
    let slots = HashMap::from([("SMTP".to_string(), 0u8), ("Control".to_string(), 3u8)]);
    let state = SharedState::new(config, slots);
    {
        let mut sessions = state.sessions.write().unwrap();
        let mut outcome = ApplyOutcome::default();
        for (ip, slot) in [
            ([10, 0, 0, 1], 0),
            ([10, 0, 0, 1], 0),
            ([10, 0, 0, 2], 0),
            ([10, 0, 1, 1], 0),
            ([10, 0, 0, 1], 3),
        ] {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&ip);
            let event = SessionEvent {
                cookie: 0,
                addr,
                kind: EVENT_OPEN,
                family: FAMILY_V4,
                service: slot,
                _pad: [0; 5],
            };
            sessions.apply(&event, &mut outcome);
        }
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let event = SessionEvent {
            cookie: 0,
            addr: match v6 {
                IpAddr::V6(v) => v.octets(),
                _ => unreachable!(),
            },
            kind: EVENT_OPEN,
            family: 6,
            service: 0,
            _pad: [0; 5],
        };
        sessions.apply(&event, &mut outcome);
    }
    state
}

fn answer(line: &str) -> String {
    let state = state();
    match parse_request(line.as_bytes()) {
        Ok(request) => execute(&request, &state, Duration::from_secs(1000)).to_line(),
        Err(error) => Reply::Error(error).to_line(),
    }
}

#[test]
fn session_counts() {
    let cases = [
        (
            "msys.audit.inbound_session_count(\"10.0.0.0/24\", \"SMTP\")",
            "OK 3\n",
        ),
        (
            "msys.audit.inbound_session_count('10.0.0.0/16', 'SMTP')",
            "OK 4\n",
        ),
        (
            "msys.audit.inbound_session_count('10.0.0.1', 'Control')",
            "OK 1\n",
        ),
        ("@10.0.0.1 ac:inbound_session_count()", "OK 2\n"),
        ("@10.0.0.1:2025 ac:inbound_session_count()", "OK 1\n"),
        ("@10.0.0.1:587 ac:inbound_session_count()", "OK 2\n"),
        ("@10.0.0.9 ac:inbound_session_count('/24')", "OK 3\n"),
        (
            "@10.0.0.9 ac:inbound_session_count(nil, \"Control\")",
            "OK 0\n",
        ),
        ("@10.0.0.1 audit_connections_on_service \"/32\"", "OK 2\n"),
        ("@10.0.0.1 audit_connections_on_service", "OK 2\n"),
        ("audit_service \"SMTP\" \"10.0.0.0/8\"", "OK 4\n"),
        (
            "msys.audit.inbound_session_count('2001:db8::/64', 'SMTP')",
            "OK 1\n",
        ),
        (
            "@[2001:db8::5]:25 ac:inbound_session_count('/64')",
            "OK 1\n",
        ),
        (
            "msys.audit.inbound_session_count('::ffff:10.0.0.1', 'SMTP')",
            "OK 2\n",
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(answer(line), expected, "{line}");
    }
}

#[test]
fn service_errors() {
    let cases = [
        (
            "msys.audit.inbound_session_count('10.0.0.0/8', 'smtp')",
            "ERR unknown_service",
        ),
        (
            "msys.audit.inbound_session_count('10.0.0.0/8', 'inbound_cidr')",
            "ERR cluster_disabled",
        ),
        (
            "@10.0.0.1:2526 ac:inbound_session_count()",
            "ERR unknown_service",
        ),
        ("ac:inbound_session_count()", "ERR no_client"),
        ("audit_connections_on_service \"/24\"", "ERR no_client"),
        ("@10.0.0.1 ac:inbound_session_count('/33')", "ERR bad_cidr"),
    ];
    for (line, expected) in cases {
        assert!(
            answer(line).starts_with(expected),
            "{line}: {}",
            answer(line)
        );
    }
}

fn monitored_state() -> SharedState {
    let config = Config {
        monitors: vec!["60,2".parse().unwrap(), "300,1".parse().unwrap()],
        ..Config::default()
    };
    SharedState::new(config, HashMap::from([("SMTP".to_string(), 0u8)]))
}

fn ask(state: &SharedState, line: &str, now: u64) -> String {
    match parse_request(line.as_bytes()) {
        Ok(request) => execute(&request, state, Duration::from_secs(now)).to_line(),
        Err(error) => Reply::Error(error).to_line(),
    }
}

#[test]
fn windowed_queries_add_and_show() {
    let state = monitored_state();
    assert_eq!(ask(&state, "add receptions 10.0.0.1 3", 100), "OK 3\n");
    assert_eq!(ask(&state, "add receptions 10.0.0.1", 110), "OK 4\n");
    assert_eq!(ask(&state, "add rejections 10.0.0.2 2", 130), "OK 2\n");
    state.lock_monitors().record(
        Series::Connections,
        "10.0.0.1".parse().unwrap(),
        5,
        Duration::from_secs(125),
    );
    let cases = [
        ("@10.0.0.1 msys.audit.receptions(\"60,2\")", "OK 0\n"),
        (
            "@10.0.0.1 msys.audit.receptions(\"60,2\", {endv=1})",
            "OK 4\n",
        ),
        ("@10.0.0.1 msys.audit.receptions(\"300,1\")", "OK 4\n"),
        ("msys.audit.rejections(\"60,2\", \"10.0.0.0/24\")", "OK 2\n"),
        (
            "@10.0.0.1 msys.audit.connections(\"60,2\", {cidr=\"/24\"})",
            "OK 5\n",
        ),
        ("@10.0.0.1 ec_ip_connections {monitor=\"300,1\"}", "OK 5\n"),
        ("@10.0.0.1 ec_ip_receptions {period_start=1}", "OK 4\n"),
        // 60,2 at 130 s: window 2 (120..180) holds 5 connections; 10 s in.
        ("@10.0.0.1 ec_ip_connections 0", "OK 5\n"),
        ("@10.0.0.1 ec_ip_receptions 0", "OK 3\n"),
    ];
    for (line, expected) in cases {
        assert_eq!(ask(&state, line, 130), expected, "{line}");
    }
    let errors = [
        (
            "@10.0.0.1 msys.audit.connections(\"60,3\")",
            "ERR unknown_monitor ",
        ),
        ("@10.0.0.1 ec_ip_connections 2", "ERR unknown_monitor "),
        (
            "@10.0.0.1 msys.audit.connections(\"60,2\", {cluster=true})",
            "ERR cluster_disabled ",
        ),
        ("msys.audit.connections(\"60,2\")", "ERR no_client "),
    ];
    for (line, expected) in errors {
        assert!(
            ask(&state, line, 130).starts_with(expected),
            "{line}: {}",
            ask(&state, line, 130)
        );
    }
    let show = ask(&state, "show 10.0.0.0/24", 130);
    let lines: Vec<&str> = show.lines().collect();
    assert_eq!(lines[0], format!("OK {}", lines.len() - 1));
    for expected in [
        "Network 10.0.0.0/24",
        "Connections 60/0: 5",
        "Connections 60/1: 0",
        "Receptions 60/1: 4",
        "Rejections 60/0: 2",
        "Connections 300/0: 5",
        "Receptions 300/1: 0",
        "Sessions SMTP: 0",
    ] {
        assert!(lines.contains(&expected), "{expected} in {lines:?}");
    }
}

#[test]
fn without_monitors_windowed_queries_are_not_configured() {
    for line in [
        "@10.0.0.1 msys.audit.connections(\"60,1\")",
        "add receptions 10.0.0.1",
        "@10.0.0.1 ec_ip_connections 0",
    ] {
        assert!(answer(line).starts_with("ERR not_configured "), "{line}");
    }
    assert!(answer("show 10.0.0.1").starts_with("OK "));
}
