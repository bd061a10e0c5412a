//! Any bytes as a Postfix policy connection: reading requests and judging them
//! must never panic or hang; every reply is one `action=` line.
#![no_main]

use std::{collections::HashMap, sync::OnceLock, time::Duration};

use inbound_audit::{
    adapters::postfix::{decide, PolicyMemory, PolicyReader},
    config::{Config, LimitConfig},
    counting::state::SharedState,
    domain::ServicePorts,
};
use libfuzzer_sys::fuzz_target;

fn state() -> &'static SharedState {
    static STATE: OnceLock<SharedState> = OnceLock::new();
    STATE.get_or_init(|| {
        let monitors = vec!["60,1".parse().unwrap()];
        let limits = [
            "count = \"sessions\"\nipv4_prefix = 24\nipv6_prefix = 64\nmax = 2\naction = \"421 4.7.0\"",
            "count = \"connections\"\nmonitor = \"60,1\"\nmax = 5\naction = \"defer_if_permit\"",
        ]
        .iter()
        .map(|text| {
            toml::from_str::<LimitConfig>(text)
                .expect("limit syntax")
                .check()
                .expect("valid limit")
        })
        .collect();
        let config = Config {
            services: vec![ServicePorts { name: "SMTP".into(), ports: vec![25] }],
            monitors,
            policy_limits: limits,
            max_tracked_ips_per_monitor: 10_000,
            ..Config::default()
        };
        SharedState::new(config, HashMap::from([("SMTP".into(), 0)]))
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().unwrap())
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let mut reader = PolicyReader::new(tokio::io::BufReader::new(data));
        let state = state();
        let limits = state.setup().config.policy_limits.clone();
        let mut memory = PolicyMemory::default();
        // At most as many requests as bytes: each consumes at least one line.
        for _ in 0..=data.len() {
            match reader.next_request().await {
                Ok(Some(request)) => {
                    if let Ok(decision) = decide(&request, &limits, state, Duration::from_secs(1_700_000_000), &mut memory) {
                        assert!(!decision.action.contains('\n'));
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
    });
});
