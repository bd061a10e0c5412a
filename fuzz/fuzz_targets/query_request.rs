//! Any bytes as one request line: parsing and answering must never panic, hang
//! or allocate without bound, and the answer is always framed (one line, or a
//! counted report).
#![no_main]

use std::{collections::HashMap, sync::OnceLock, time::Duration};

use inbound_audit::{
    config::Config,
    counting::state::SharedState,
    domain::ServicePorts,
    serving::{
        command,
        protocol::{parse_request, Reply},
    },
};
use libfuzzer_sys::fuzz_target;

fn state() -> &'static SharedState {
    static STATE: OnceLock<SharedState> = OnceLock::new();
    STATE.get_or_init(|| {
        let config = Config {
            services: vec![
                ServicePorts { name: "SMTP".into(), ports: vec![25, 587] },
                ServicePorts { name: "Control".into(), ports: vec![2025] },
            ],
            monitors: vec!["60,1".parse().unwrap(), "300,6".parse().unwrap()],
            max_tracked_ips_per_monitor: 10_000,
            ..Config::default()
        };
        SharedState::new(config, HashMap::from([("SMTP".into(), 0), ("Control".into(), 1)]))
    })
}

fuzz_target!(|data: &[u8]| {
    let reply = match parse_request(data) {
        Ok(request) => command::execute(&request, state(), Duration::from_secs(1_700_000_000)),
        Err(error) => Reply::Error(error),
    };
    let text = reply.to_line();
    assert!(text.ends_with('\n'));
    match reply {
        Reply::Lines(lines) => assert_eq!(text.lines().count(), lines.len() + 1),
        _ => assert_eq!(text.matches('\n').count(), 1, "{text:?}"),
    }
});
