//! Shared by the adapter's tests: a state with three live sessions from
//! 192.0.2.0/24, two limits, requests from attribute pairs, one on the wire.

use std::collections::HashMap;

use audit_common::{SessionEvent, EVENT_OPEN, FAMILY_V4};

use crate::{
    adapters::postfix::reader::PolicyRequest,
    config::{Config, LimitConfig},
    counting::state::{ApplyOutcome, SharedState},
    domain::{Limit, ServicePorts},
};

pub fn state() -> SharedState {
    let config = Config {
        services: vec![ServicePorts {
            name: "SMTP".into(),
            ports: vec![25],
        }],
        monitors: vec!["60,1".parse().unwrap()],
        ..Config::default()
    };
    let state = SharedState::new(config, HashMap::from([("SMTP".to_string(), 0u8)]));
    let mut outcome = ApplyOutcome::default();
    for last in [1u8, 2, 3] {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, last]);
        let event = SessionEvent {
            cookie: 0,
            addr,
            kind: EVENT_OPEN,
            family: FAMILY_V4,
            service: 0,
            _pad: [0; 5],
        };
        state.write_sessions().apply(&event, &mut outcome);
    }
    state
}

pub fn limits() -> Vec<Limit> {
    let configs: Vec<LimitConfig> = toml::from_str::<HashMap<String, Vec<LimitConfig>>>(
        r#"
        limits = [
          { count = "sessions", ipv4_prefix = 24, ipv6_prefix = 64, max = 2, action = "421 4.7.0" },
          { count = "connections", monitor = "60,1", max = 4, action = "defer_if_permit" },
        ]
        "#,
    )
    .unwrap()
    .remove("limits")
    .unwrap();
    configs.into_iter().map(|c| c.check().unwrap()).collect()
}

pub fn request(pairs: &[(&str, &str)]) -> PolicyRequest {
    PolicyRequest::from_pairs(pairs)
}

/// A request from a client no limit of [`limits`] refuses, and its answer.
pub const REQUEST: &[u8] =
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=198.51.100.1\n\n";
pub const ANSWER: &[u8] = b"action=dunno\n\n";
