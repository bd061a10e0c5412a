//! Any bytes as what another Redis client left under our key prefix: a
//! snapshot, a stream batch or a heartbeat. Parsing must never panic or
//! allocate without bound; every entry kept must be in range and survive
//! encoding again unchanged; and merging it into a fleet view, then dropping
//! the node, must leave the view empty (hostile data cannot poison the sums).
#![no_main]

use std::time::Duration;

use inbound_audit::cluster::{
    wire::{self, Heartbeat, MAX_COUNT},
    Fleet,
};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Heartbeat::parse(text);
    let parsed = match wire::parse_snapshot(text) {
        Some((_, parsed)) => parsed,
        None => wire::parse_batch(text),
    };
    let lines = text.split('\n').filter(|l| !l.is_empty()).count() as u64;
    assert!(parsed.entries.len() as u64 + parsed.refused <= lines);
    for entry in &parsed.entries {
        assert!(entry.count <= MAX_COUNT);
        let again = wire::parse_batch(&wire::encode(std::slice::from_ref(entry)));
        assert_eq!(again.entries, vec![entry.clone()]);
    }
    let now = Duration::from_secs(1_800_000_000);
    let mut fleet = Fleet::default();
    fleet.reset_node("evil", 1, 0, now);
    fleet.apply("evil", 1, &parsed.entries);
    let all: IpNet = "0.0.0.0/0".parse().unwrap();
    let _ = fleet.sessions("SMTP", &all);
    fleet.expire_windows(now);
    fleet.drop_node("evil");
    assert_eq!(fleet.heap_bytes(), 0);
    assert_eq!(fleet.sessions("SMTP", &all), 0);
});
