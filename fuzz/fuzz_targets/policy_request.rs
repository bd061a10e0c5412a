//! Any bytes as a Postfix policy connection: reading requests and judging them
//! must never panic or hang; every reply is one `action=` line.
#![no_main]

use std::{collections::HashMap, sync::OnceLock, time::Duration};

use inbound_audit::{
    adapters::postfix::{decide, Framer, PolicyMemory},
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

fuzz_target!(|data: &[u8]| {
    // The first byte sets how the rest arrives: in pieces of 1 to 256 bytes.
    let Some((&piece, data)) = data.split_first() else {
        return;
    };
    let state = state();
    let limits = state.setup().config.policy_limits.clone();
    let mut memory = PolicyMemory::default();
    let mut framer = Framer::default();
    for chunk in data.chunks(piece as usize + 1) {
        framer.push(chunk);
        loop {
            match framer.next_request() {
                Ok(Some(request)) => {
                    if let Ok(decision) = decide(
                        &request,
                        &limits,
                        state,
                        Duration::from_secs(1_700_000_000),
                        &mut memory,
                    ) {
                        assert!(!decision.action.contains('\n'));
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = framer.finish();
});
