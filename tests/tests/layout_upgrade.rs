//! End to end, as root: a new agent that finds pinned state of another layout
//! (an older agent's, faked here by rewriting the pinned LAYOUT map) replaces
//! it and seeds the open sessions from sock_diag: it starts, counts every open
//! session once (not once from the old maps and again from seeding), and goes
//! on counting opens and closes.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use audit_common::{map_names, LAYOUT_VERSION};
use aya::maps::{Array, Map, MapData};
use integration_tests::{connect_from, require_ebpf, SmtpFixture};

fn set_pinned_layout(pin_dir: &Path, version: u32) {
    let data = MapData::from_pin(pin_dir.join(map_names::LAYOUT)).expect("pinned LAYOUT");
    let mut layout: Array<MapData, u32> = Array::try_from(Map::Array(data)).unwrap();
    layout.set(0, version, 0).unwrap();
}

#[test]
fn older_pinned_layout_is_replaced_and_sessions_reseeded_once() {
    require_ebpf!();
    let mut fixture = SmtpFixture::start(env!("CARGO_BIN_EXE_test-server"), "layout-upgrade", &[]);
    let client = |n: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 9, n));
    let mut sessions: Vec<_> = (1..=3)
        .map(|n| connect_from(client(n), fixture.smtp))
        .collect();
    fixture.agent.expect_count("127.0.9.0/24", "SMTP", 3);

    // The old agent stops; its programs keep counting into its maps, which a
    // new agent of another layout cannot read as its own.
    fixture.agent.stop();
    set_pinned_layout(&fixture.agent.pin_dir, LAYOUT_VERSION - 1);
    // Opened while no agent runs: only the old programs saw it.
    sessions.push(connect_from(client(4), fixture.smtp));
    fixture.agent.start_again();
    let log = fixture.agent.log_text();
    assert!(
        log.contains(&format!("layout {}", LAYOUT_VERSION - 1)),
        "the log says what was replaced:\n{log}"
    );
    fixture.agent.expect_count("127.0.9.0/24", "SMTP", 4);
    assert_eq!(fixture.agent.stat("kernel_seeded_sessions"), 4, "{log}");

    sessions.push(connect_from(client(5), fixture.smtp));
    fixture.agent.expect_count("127.0.9.0/24", "SMTP", 5);
    drop(sessions.remove(0));
    fixture.agent.expect_count("127.0.9.0/24", "SMTP", 4);
    drop(sessions);
    fixture.agent.expect_count("127.0.9.0/24", "SMTP", 0);

    // The replaced state carries this agent's layout from now on: a restart adopts it.
    fixture.agent.restart();
    fixture.agent.expect_count("127.0.9.0/24", "SMTP", 0);
    let log = fixture.agent.log_text();
    assert_eq!(
        log.matches("held pinned state of").count(),
        1,
        "only the first start replaced anything:\n{log}"
    );
}
