//! Tests of the live sessions, the tallies and the shared state.

use super::*;

fn event(kind: u8, ip: [u8; 4], service: u8) -> SessionEvent {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip);
    SessionEvent {
        cookie: 1,
        addr,
        kind,
        family: FAMILY_V4,
        service,
        _pad: [0; 5],
    }
}

#[test]
fn events_count_per_service() {
    let mut sessions = LiveSessions::default();
    let mut outcome = ApplyOutcome::default();
    sessions.apply(&event(EVENT_OPEN, [10, 0, 0, 1], 0), &mut outcome);
    sessions.apply(&event(EVENT_OPEN, [10, 0, 0, 2], 0), &mut outcome);
    sessions.apply(&event(EVENT_OPEN, [10, 0, 0, 2], 1), &mut outcome);
    sessions.apply(&event(EVENT_CLOSE, [10, 0, 0, 1], 0), &mut outcome);
    sessions.apply(&event(EVENT_CLOSE, [10, 0, 0, 9], 0), &mut outcome);
    sessions.apply(&event(9, [10, 0, 0, 9], 0), &mut outcome);
    sessions.apply(&event(EVENT_OPEN, [10, 0, 0, 9], 200), &mut outcome);
    assert_eq!(
        outcome,
        ApplyOutcome {
            applied: 4,
            underflows: 1,
            malformed: 2
        }
    );
    let net: IpNet = "10.0.0.0/24".parse().unwrap();
    assert_eq!(sessions.count(0, &net), 1);
    assert_eq!(sessions.count(1, &net), 1);
    assert_eq!(sessions.count(7, &net), 0);
}

fn record(ip: [u8; 4], service: u8) -> SocketRecord {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip);
    SocketRecord {
        addr,
        family: FAMILY_V4,
        service,
        origin: audit_common::record_origin::ACCEPTED,
        _pad: [0; 5],
    }
}

#[test]
fn records_are_the_truth() {
    let truth = tally_records(&[
        record([10, 0, 0, 1], 0),
        record([10, 0, 0, 1], 0),
        record([10, 0, 0, 1], 2),
    ]);
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    assert_eq!(truth, Tally::from([((0, ip), 2), ((2, ip), 1)]));
    let mut counts = LiveCounts::default();
    counts.sessions[0] = 1;
    counts.sessions[5] = 4;
    let live = tally_live(&[(ip, counts)]);
    assert_eq!(
        diff_tallies(&truth, &live),
        vec![
            Mismatch {
                slot: 0,
                ip,
                truth: 2,
                seen: 1
            },
            Mismatch {
                slot: 2,
                ip,
                truth: 1,
                seen: 0
            },
            Mismatch {
                slot: 5,
                ip,
                truth: 0,
                seen: 4
            },
        ]
    );
}

#[test]
fn reconcile_repairs_only_stable_differences() {
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let gone: IpAddr = "10.0.0.2".parse().unwrap();
    let truth = Tally::from([((0, ip), 3)]);
    let mut sessions = LiveSessions::default();
    sessions.by_slot[0].set(ip, 1);
    sessions.by_slot[0].set(gone, 2);
    let mut reconciler = Reconciler::default();
    assert!(reconciler.confirm(sessions.diff(&truth)).is_empty());
    assert_eq!(sessions.get(0, ip), 1);
    let confirmed = reconciler.confirm(sessions.diff(&truth));
    assert_eq!(confirmed.len(), 2);
    for mismatch in &confirmed {
        sessions.repair(mismatch);
    }
    assert_eq!(sessions.get(0, ip), 3);
    assert_eq!(sessions.get(0, gone), 0);
    assert!(sessions.diff(&truth).is_empty());
    assert!(reconciler.confirm(sessions.diff(&truth)).is_empty());
}

#[test]
fn transient_difference_is_not_repaired() {
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let truth = Tally::from([((0, ip), 2)]);
    let mut sessions = LiveSessions::default();
    sessions.by_slot[0].set(ip, 1);
    let mut reconciler = Reconciler::default();
    assert!(reconciler.confirm(sessions.diff(&truth)).is_empty());
    // The in-flight event arrives; the next pass agrees.
    sessions.by_slot[0].set(ip, 2);
    assert!(reconciler.confirm(sessions.diff(&truth)).is_empty());
    // A difference that changes between passes is not confirmed either.
    sessions.by_slot[0].set(ip, 5);
    assert!(reconciler.confirm(sessions.diff(&truth)).is_empty());
    sessions.by_slot[0].set(ip, 6);
    assert!(reconciler.confirm(sessions.diff(&truth)).is_empty());
    assert_eq!(sessions.get(0, ip), 6);
}

#[test]
fn load_replaces_everything() {
    let ip: IpAddr = "2001:db8::1".parse().unwrap();
    let mut sessions = LiveSessions::default();
    sessions.by_slot[1].set("10.0.0.1".parse().unwrap(), 9);
    sessions.load(&Tally::from([((3, ip), 4)]));
    assert_eq!(sessions.tracked_ips(), 1);
    assert_eq!(sessions.count(3, &"2001:db8::/32".parse().unwrap()), 4);
}

struct FakeRing(Vec<SessionEvent>);

impl EventSource for FakeRing {
    fn take_available(&mut self, out: &mut Vec<SessionEvent>) {
        out.append(&mut self.0);
    }
}

#[test]
fn draining_applies_events_to_sessions_and_connection_windows() {
    let config = Config {
        monitors: vec!["60,1".parse().unwrap()],
        ..Config::default()
    };
    let state = SharedState::new(config, HashMap::from([("SMTP".to_string(), 0u8)]));
    let now = std::time::Duration::from_secs(1000);
    assert_eq!(state.drain_events(now), 0);
    let mut seeded = event(EVENT_OPEN, [10, 0, 0, 1], 0);
    seeded.kind = EVENT_SEED;
    state.attach_events(Box::new(FakeRing(vec![
        event(EVENT_OPEN, [10, 0, 0, 1], 0),
        seeded,
        event(EVENT_OPEN, [10, 0, 0, 2], 0),
        event(EVENT_CLOSE, [10, 0, 0, 2], 0),
    ])));
    assert_eq!(state.drain_events(now), 4);
    assert_eq!(state.drain_events(now), 0);
    let net: IpNet = "10.0.0.0/24".parse().unwrap();
    assert_eq!(state.read_sessions().count(0, &net), 2);
    // The seeded session is live but was not a connection in the window.
    let monitors = state.lock_monitors();
    let monitor = monitors.by_position(0).unwrap();
    assert_eq!(monitor.sum(Series::Connections, &net, 0, 0, now), 2);
    assert_eq!(AgentStats::get(&state.stats.events), 4);
}
