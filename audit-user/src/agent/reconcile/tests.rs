//! The reconciler against the in-memory kernel: heals, collections, index
//! repairs, the backstop, quick passes, and a full per-IP table.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{atomic::Ordering, Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use audit_common::{record_origin, stat};

use super::{kernel_pass, reconcile, Reconcile, QUICK};
use crate::{
    config::Config,
    counting::state::{AgentStats, SharedState},
    kernel::fake::{record, FakeKernel},
};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// What one pass did, for the assertions.
#[derive(Debug, PartialEq, Eq)]
struct Did {
    healed: usize,
    collected: usize,
    adopted: usize,
}

/// A reconciler with the fake kernel it reads and the agent state it repairs.
struct Fixture {
    kernel: Mutex<FakeKernel>,
    state: SharedState,
    reconcile: Reconcile,
}

impl Fixture {
    fn new() -> Self {
        Self::on(FakeKernel::default())
    }

    /// A kernel whose per-IP table holds `capacity` entries.
    fn with_capacity(capacity: u64) -> Self {
        Self::on(FakeKernel {
            capacity,
            ..FakeKernel::default()
        })
    }

    fn on(fake: FakeKernel) -> Self {
        Self {
            kernel: Mutex::new(fake),
            state: SharedState::new(Config::default(), HashMap::from([("SMTP".to_string(), 0)])),
            reconcile: Reconcile::new(),
        }
    }

    fn fake(&self) -> MutexGuard<'_, FakeKernel> {
        self.kernel.lock().unwrap()
    }

    /// One whole reconcile pass at Unix time `now` (seconds).
    fn pass(&mut self, now: u64) -> Did {
        let mut reconciler = std::mem::take(&mut self.reconcile.kernel_reconciler);
        let pass = kernel_pass(&self.kernel, &mut reconciler).expect("fake kernel pass");
        self.reconcile.kernel_reconciler = reconciler;
        let did = Did {
            healed: pass.healed,
            collected: pass.collected,
            adopted: pass.adopted,
        };
        self.reconcile
            .apply(pass, &self.state, Duration::from_secs(now));
        did
    }

    /// The kernel's live SMTP count of `at`.
    fn count(&self, at: &str) -> u32 {
        self.fake().count(ip(at), 0)
    }

    /// Overwrites the kernel's live SMTP count of `at`, as a lost update would.
    fn corrupt(&self, at: &str, sessions: u32) {
        self.fake().live.get_mut(&ip(at)).unwrap().sessions[0] = sessions;
    }

    fn refused_since_pass(&self) -> bool {
        self.reconcile.refused_since_pass(&self.kernel)
    }

    fn stats(&self) -> &AgentStats {
        &self.state.stats
    }
}

#[test]
fn a_per_ip_count_is_healed_only_after_two_passes_agree() {
    let mut f = Fixture::new();
    f.fake().accept(1, ip("10.0.0.1"), 0);
    // A difference seen once (an update in flight) is left alone.
    f.corrupt("10.0.0.1", 5);
    assert_eq!(f.pass(1).healed, 0);
    f.corrupt("10.0.0.1", 3);
    assert_eq!(f.pass(2).healed, 0);
    assert_eq!(f.count("10.0.0.1"), 3);
    assert!(f.fake().adjustments.is_empty());
    // The same difference twice: healed by the difference, atomically.
    assert_eq!(f.pass(3).healed, 1);
    assert_eq!(f.count("10.0.0.1"), 1);
    assert_eq!(f.fake().adjustments, vec![(ip("10.0.0.1"), 0, -2)]);
    assert_eq!(AgentStats::get(&f.stats().kernel_repairs), 1);
}

#[test]
fn zero_entries_are_collected() {
    let mut f = Fixture::new();
    {
        let mut fake = f.fake();
        fake.accept(1, ip("10.0.0.1"), 0);
        fake.accept(2, ip("10.0.0.2"), 0);
        fake.close(1);
    }
    assert_eq!(f.pass(1).collected, 1);
    let live: Vec<IpAddr> = f.fake().live.keys().copied().collect();
    assert_eq!(live, vec![ip("10.0.0.2")]);
    assert_eq!(AgentStats::get(&f.stats().collected), 1);
}

#[test]
fn the_index_is_repaired_from_the_records_after_two_agreeing_passes() {
    let mut f = Fixture::new();
    {
        let mut fake = f.fake();
        fake.accept(1, ip("10.0.0.1"), 0);
        fake.accept(2, ip("10.0.0.1"), 0);
    }
    // The index missed both opens (lost events) and has a ghost.
    f.state
        .write_sessions()
        .load(&HashMap::from([((0, ip("10.9.9.9")), 4)]));
    f.pass(1);
    assert_eq!(f.state.read_sessions().get(0, ip("10.0.0.1")), 0);
    f.pass(2);
    assert_eq!(f.state.read_sessions().get(0, ip("10.0.0.1")), 2);
    assert_eq!(f.state.read_sessions().get(0, ip("10.9.9.9")), 0);
    assert_eq!(AgentStats::get(&f.stats().repairs), 2);
    assert_eq!(AgentStats::get(&f.stats().kernel_sessions), 2);
}

#[test]
fn the_backstop_is_detached_once_no_seeded_session_is_left() {
    let mut f = Fixture::new();
    {
        let mut fake = f.fake();
        fake.counted
            .insert(7, record(ip("10.0.0.7"), 0, record_origin::SEEDED));
        fake.live.entry(ip("10.0.0.7")).or_default().sessions[0] = 1;
        fake.accept(8, ip("10.0.0.8"), 0);
    }
    f.pass(1);
    assert!(f.fake().backstop);
    assert_eq!(AgentStats::get(&f.stats().kernel_seeded_sessions), 1);
    assert_eq!(AgentStats::get(&f.stats().close_backstop_attached), 1);
    f.fake().close(7);
    f.pass(2);
    assert!(!f.fake().backstop);
    assert_eq!(AgentStats::get(&f.stats().kernel_seeded_sessions), 0);
    assert_eq!(AgentStats::get(&f.stats().close_backstop_attached), 0);
}

#[test]
fn lost_events_bring_two_quick_passes() {
    let mut f = Fixture::new();
    let interval = Duration::from_secs(10);
    // Start-up: two quick passes, then the interval.
    assert_eq!(f.reconcile.pause(interval), QUICK);
    f.pass(1);
    assert_eq!(f.reconcile.pause(interval), QUICK);
    f.pass(2);
    assert_eq!(f.reconcile.pause(interval), interval);
    f.fake().stats[stat::EVENTS_LOST as usize] = 3;
    f.pass(12);
    assert_eq!(f.reconcile.pause(interval), QUICK);
    assert_eq!(AgentStats::get(&f.stats().kernel_events_lost), 3);
    f.pass(13);
    assert_eq!(f.reconcile.pause(interval), QUICK);
    f.pass(14);
    assert_eq!(f.reconcile.pause(interval), interval);
}

#[test]
fn a_session_a_full_table_refused_is_counted_at_the_next_pass_and_the_flag_clears() {
    let mut f = Fixture::with_capacity(2);
    f.pass(100);
    assert!(!f.refused_since_pass());
    // Two short sessions leave zero entries that fill the table.
    {
        let mut fake = f.fake();
        for (cookie, at) in [(1, "10.0.0.1"), (2, "10.0.0.2")] {
            fake.accept(cookie, ip(at), 0);
            fake.close(cookie);
        }
        assert!(!fake.accept(3, ip("10.0.0.3"), 0));
    }
    assert_eq!(f.count("10.0.0.3"), 0);
    // The refusal wakes the reconciler before its interval.
    assert!(f.refused_since_pass());
    let did = f.pass(101);
    assert_eq!((did.collected, did.adopted), (2, 1));
    assert_eq!(f.count("10.0.0.3"), 1);
    assert!(!f.refused_since_pass());
    assert_eq!(AgentStats::get(&f.stats().kernel_tables_saturated), 1);
    assert_eq!(
        AgentStats::get(&f.stats().kernel_tables_last_saturated),
        101
    );
    assert_eq!(AgentStats::get(&f.stats().adopted), 1);
    assert_eq!(AgentStats::get(&f.stats().kernel_sessions), 1);
    // Nothing refused since: no longer saturated, and when it last was stays.
    f.pass(111);
    assert_eq!(AgentStats::get(&f.stats().kernel_tables_saturated), 0);
    assert_eq!(
        AgentStats::get(&f.stats().kernel_tables_last_saturated),
        101
    );
    assert_eq!(AgentStats::get(&f.stats().kernel_ip_table_full), 1);
}

#[test]
fn a_table_full_of_live_ips_stays_saturated_until_one_leaves() {
    let mut f = Fixture::with_capacity(1);
    {
        let mut fake = f.fake();
        fake.accept(1, ip("10.0.0.1"), 0);
        assert!(!fake.accept(2, ip("10.0.0.2"), 0));
    }
    for now in [1, 2, 3] {
        assert_eq!(f.pass(now).adopted, 0);
        assert_eq!(AgentStats::get(&f.stats().kernel_tables_saturated), 1);
    }
    assert_eq!(f.count("10.0.0.2"), 0);
    f.fake().close(1);
    let did = f.pass(4);
    assert_eq!((did.collected, did.adopted), (1, 1));
    assert_eq!(f.count("10.0.0.2"), 1);
    // One entry of one in use: full still (a new IP would be refused).
    assert_eq!(AgentStats::get(&f.stats().kernel_tables_saturated), 1);
    assert_eq!(AgentStats::get(&f.stats().kernel_tables_last_saturated), 4);
    f.fake().close(2);
    f.pass(5);
    assert_eq!(AgentStats::get(&f.stats().kernel_tables_saturated), 0);
    assert_eq!(AgentStats::get(&f.stats().kernel_tables_last_saturated), 4);
}

#[test]
fn refusals_before_the_first_pass_wake_it_and_count_as_saturation() {
    let mut f = Fixture::with_capacity(1);
    {
        let mut fake = f.fake();
        // A previous agent's refusal: not news to this one.
        fake.stats[stat::IP_TABLE_FULL as usize] = 4;
        fake.accept(1, ip("10.0.0.1"), 0);
        fake.close(1);
    }
    f.reconcile.start_from(&f.kernel);
    assert!(!f.refused_since_pass());
    assert!(!f.fake().accept(2, ip("10.0.0.2"), 0));
    assert!(f.refused_since_pass());
    let did = f.pass(50);
    assert_eq!((did.collected, did.adopted), (1, 1));
    assert_eq!(AgentStats::get(&f.stats().kernel_tables_last_saturated), 50);
    assert_eq!(f.reconcile.unlogged_refusals, 0);
    assert_eq!(f.reconcile.last_full_log, Some(Duration::from_secs(50)));
}

#[test]
fn refusals_are_logged_once_per_interval_not_once_per_pass() {
    let mut f = Fixture::with_capacity(1);
    f.fake().accept(1, ip("10.0.0.1"), 0);
    f.pass(100);
    let mut cookie = 10;
    let mut refuse = |f: &Fixture| {
        cookie += 1;
        assert!(!f.fake().accept(cookie, ip("10.0.1.1"), 0));
    };
    refuse(&f);
    f.pass(101);
    assert_eq!(f.reconcile.last_full_log, Some(Duration::from_secs(101)));
    assert_eq!(f.reconcile.unlogged_refusals, 0);
    // Within the interval (10 s): counted for the next line, not logged.
    for now in [102, 104, 106] {
        refuse(&f);
        f.pass(now);
    }
    assert_eq!(f.reconcile.last_full_log, Some(Duration::from_secs(101)));
    assert_eq!(f.reconcile.unlogged_refusals, 3);
    refuse(&f);
    f.pass(111);
    assert_eq!(f.reconcile.last_full_log, Some(Duration::from_secs(111)));
    assert_eq!(f.reconcile.unlogged_refusals, 0);
}

/// Polls `check` every 10 ms for up to 10 s.
async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_wakes_the_reconciler_long_before_its_interval() {
    let config = Config {
        reconcile_interval: Duration::from_secs(60),
        ..Config::default()
    };
    let state = Arc::new(SharedState::new(
        config,
        HashMap::from([("SMTP".to_string(), 0)]),
    ));
    let kernel = Arc::new(Mutex::new(FakeKernel {
        capacity: 2,
        ..FakeKernel::default()
    }));
    {
        let mut fake = kernel.lock().unwrap();
        for (cookie, at) in [(1, "10.0.0.1"), (2, "10.0.0.2")] {
            fake.accept(cookie, ip(at), 0);
            fake.close(cookie);
        }
    }
    let (trigger, shutdown) = crate::serving::shutdown::channel();
    let task = tokio::spawn(reconcile(kernel.clone(), state.clone(), shutdown));
    // Start-up's two quick passes; the next one is a minute away.
    until("two passes ran", || {
        kernel.lock().unwrap().snapshots.load(Ordering::Relaxed) >= 2
    })
    .await;
    // Those passes collected the zero entries: fill the table with new ones,
    // then have a session refused.
    {
        let mut fake = kernel.lock().unwrap();
        for (cookie, at) in [(3, "10.0.0.3"), (4, "10.0.0.4")] {
            fake.accept(cookie, ip(at), 0);
            fake.close(cookie);
        }
        assert!(!fake.accept(5, ip("10.0.0.5"), 0));
    }
    let refused = Instant::now();
    until("the refused session is counted", || {
        kernel.lock().unwrap().count(ip("10.0.0.5"), 0) == 1
    })
    .await;
    assert!(
        refused.elapsed() < Duration::from_secs(5),
        "counted {:?} after the refusal",
        refused.elapsed()
    );
    assert_eq!(AgentStats::get(&state.stats.kernel_tables_saturated), 1);
    assert_eq!(AgentStats::get(&state.stats.adopted), 1);
    trigger.trigger();
    task.await.unwrap();
}
