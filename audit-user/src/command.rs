//! Executes a parsed request against the shared state.

use crate::{
    protocol::{ErrorCode, Query, QueryError, Reply, Request, ServiceArg},
    state::SharedState,
};

/// Momentum's default service when a call names none.
pub const DEFAULT_SERVICE: &str = "SMTP";
/// Momentum's cluster-wide SMTP view; there is no cluster yet.
pub const CLUSTER_SERVICE: &str = "inbound_cidr";

pub fn execute(request: &Request, state: &SharedState) -> Reply {
    match run(request, state) {
        Ok(count) => Reply::Count(count),
        Err(error) => Reply::Error(error),
    }
}

fn run(request: &Request, state: &SharedState) -> Result<u64, QueryError> {
    match &request.query {
        Query::SessionCount { cidr, service } => {
            let slot = service_slot(request, service, state)?;
            let net = cidr.resolve(request.client.map(|c| c.ip))?;
            let sessions = state
                .sessions
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Ok(sessions.count(slot, &net))
        }
    }
}

fn service_slot(
    request: &Request,
    service: &ServiceArg,
    state: &SharedState,
) -> Result<u8, QueryError> {
    let name = match service {
        ServiceArg::Named(name) => name.as_str(),
        ServiceArg::Listener => match request.client.and_then(|c| c.port) {
            None => DEFAULT_SERVICE,
            Some(port) => state.config.service_of_port(port).ok_or_else(|| {
                QueryError::new(
                    ErrorCode::UnknownService,
                    format!(
                        "local port {port} belongs to no configured service (configured: {})",
                        state.service_names().join(", ")
                    ),
                )
            })?,
        },
    };
    if name == CLUSTER_SERVICE {
        return Err(QueryError::new(
            ErrorCode::ClusterDisabled,
            "inbound_cidr is the cluster-wide count and clustering is not enabled",
        ));
    }
    state.slots.get(name).copied().ok_or_else(|| {
        QueryError::new(
            ErrorCode::UnknownService,
            format!(
                "unknown service '{name}' (configured: {}; names are case-sensitive)",
                state.service_names().join(", ")
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::IpAddr};

    use audit_common::{SessionEvent, EVENT_OPEN, FAMILY_V4};

    use super::*;
    use crate::{
        config::{Config, ServicePorts},
        protocol::parse_request,
        state::ApplyOutcome,
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
            Ok(request) => execute(&request, &state).to_line(),
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
}
