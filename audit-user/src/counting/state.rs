//! The agent's view of live sessions: one CIDR index per service slot, fed by the
//! kernel's events and reconciled against the kernel's maps.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
};

use audit_common::{
    LiveCounts, SessionEvent, SocketRecord, EVENT_CLOSE, EVENT_OPEN, EVENT_SEED, FAMILY_V4,
    MAX_SERVICES,
};
use ipnet::IpNet;

use crate::{
    cluster::ClusterView,
    config::Config,
    counting::{index::CidrIndex, monitors::Monitors, observed::Observed},
    domain::Series,
};

/// Live session counts per service slot.
pub struct LiveSessions {
    by_slot: Vec<CidrIndex>,
    /// (slot, IP) whose count changed since the cluster publisher last
    /// looked; None while no one publishes.
    changed: Option<HashSet<(u8, IpAddr)>>,
}

impl Default for LiveSessions {
    fn default() -> Self {
        Self {
            by_slot: (0..MAX_SERVICES).map(|_| CidrIndex::new()).collect(),
            changed: None,
        }
    }
}

/// What applying events or a reconcile pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub applied: u64,
    /// Closes for sessions the index did not have (an event was lost or doubled).
    pub underflows: u64,
    pub malformed: u64,
}

impl LiveSessions {
    pub fn count(&self, slot: u8, net: &IpNet) -> u64 {
        self.by_slot
            .get(slot as usize)
            .map_or(0, |index| index.count(net))
    }

    pub fn get(&self, slot: u8, ip: IpAddr) -> u64 {
        self.by_slot
            .get(slot as usize)
            .map_or(0, |index| index.get(ip))
    }

    /// One service slot's index, for readers that walk it (metrics, `top`).
    pub fn slot(&self, slot: u8) -> Option<&CidrIndex> {
        self.by_slot.get(slot as usize)
    }

    pub fn tracked_ips(&self) -> usize {
        self.by_slot.iter().map(CidrIndex::len).sum()
    }

    pub fn apply(&mut self, event: &SessionEvent, outcome: &mut ApplyOutcome) {
        let delta = match event.kind {
            EVENT_OPEN | EVENT_SEED => 1,
            EVENT_CLOSE => -1,
            _ => {
                outcome.malformed += 1;
                return;
            }
        };
        let Some(index) = self.by_slot.get_mut(event.service as usize) else {
            outcome.malformed += 1;
            return;
        };
        let ip = event_ip(event);
        match index.add(ip, delta) {
            Ok(_) => outcome.applied += 1,
            Err(_) => outcome.underflows += 1,
        }
        if let Some(changed) = &mut self.changed {
            changed.insert((event.service, ip));
        }
    }

    /// From now on, remember which counts change (for the cluster publisher).
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(HashSet::new);
    }

    /// The (slot, IP, count now) changed since the last call.
    pub fn take_changes(&mut self) -> Vec<(u8, IpAddr, u64)> {
        let Some(changed) = self.changed.as_mut().map(std::mem::take) else {
            return Vec::new();
        };
        changed
            .into_iter()
            .map(|(slot, ip)| (slot, ip, self.get(slot, ip)))
            .collect()
    }

    /// Every (slot, IP, count).
    pub fn entries(&self) -> impl Iterator<Item = (u8, IpAddr, u64)> + '_ {
        self.by_slot
            .iter()
            .enumerate()
            .flat_map(|(slot, index)| index.iter().map(move |(ip, n)| (slot as u8, ip, n)))
    }

    /// Replaces everything with `truth`.
    pub fn load(&mut self, truth: &Tally) {
        if let Some(changed) = &mut self.changed {
            let before = self
                .by_slot
                .iter()
                .enumerate()
                .flat_map(|(slot, index)| index.iter().map(move |(ip, _)| (slot as u8, ip)));
            changed.extend(before.chain(truth.keys().copied()));
        }
        for index in &mut self.by_slot {
            index.clear();
        }
        for (&(slot, ip), &count) in truth {
            if let Some(index) = self.by_slot.get_mut(slot as usize) {
                index.set(ip, count);
            }
        }
    }

    /// Where the index differs from `truth`.
    pub fn diff(&self, truth: &Tally) -> Vec<Mismatch> {
        let mut out: Vec<Mismatch> = truth
            .iter()
            .filter_map(|(&(slot, ip), &count)| {
                let seen = self.get(slot, ip);
                (seen != count).then_some(Mismatch {
                    slot,
                    ip,
                    truth: count,
                    seen,
                })
            })
            .collect();
        for (slot, index) in self.by_slot.iter().enumerate() {
            for (ip, count) in index.iter() {
                if !truth.contains_key(&(slot as u8, ip)) {
                    out.push(Mismatch {
                        slot: slot as u8,
                        ip,
                        truth: 0,
                        seen: count,
                    });
                }
            }
        }
        out.sort();
        out
    }

    pub fn repair(&mut self, mismatch: &Mismatch) {
        if let Some(index) = self.by_slot.get_mut(mismatch.slot as usize) {
            index.set(mismatch.ip, mismatch.truth);
            if let Some(changed) = &mut self.changed {
                changed.insert((mismatch.slot, mismatch.ip));
            }
        }
    }

    pub fn heap_bytes(&self) -> usize {
        self.by_slot.iter().map(CidrIndex::heap_bytes).sum()
    }
}

/// Live sessions per (service slot, remote IP) as one source sees them; zero
/// counts are left out.
pub type Tally = HashMap<(u8, IpAddr), u64>;

/// The truth: what the kernel's socket records say (one record per tracked
/// socket, so no count can drift from them).
pub fn tally_records(records: &[SocketRecord]) -> Tally {
    let mut tally = Tally::new();
    for record in records {
        *tally
            .entry((record.service, record_ip(record.family, &record.addr)))
            .or_default() += 1;
    }
    tally
}

/// What the kernel's per-IP count maps say.
pub fn tally_live(snapshot: &[(IpAddr, LiveCounts)]) -> Tally {
    let mut tally = Tally::new();
    for (ip, counts) in snapshot {
        for (slot, &count) in counts.sessions.iter().enumerate() {
            if count > 0 {
                tally.insert((slot as u8, *ip), count as u64);
            }
        }
    }
    tally
}

/// Where `seen` differs from `truth`.
pub fn diff_tallies(truth: &Tally, seen: &Tally) -> Vec<Mismatch> {
    let mut out: Vec<Mismatch> = truth
        .iter()
        .filter_map(|(&(slot, ip), &count)| {
            let other = seen.get(&(slot, ip)).copied().unwrap_or(0);
            (other != count).then_some(Mismatch {
                slot,
                ip,
                truth: count,
                seen: other,
            })
        })
        .chain(seen.iter().filter(|(key, _)| !truth.contains_key(key)).map(
            |(&(slot, ip), &count)| Mismatch {
                slot,
                ip,
                truth: 0,
                seen: count,
            },
        ))
        .collect();
    out.sort();
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mismatch {
    pub slot: u8,
    pub ip: IpAddr,
    pub truth: u64,
    pub seen: u64,
}

/// Confirms differences in two passes: one is acted on only when the next pass
/// finds the very same one, so changes still in flight at snapshot time (an
/// event in the ring buffer, a record being inserted) are never "repaired" into
/// errors.
#[derive(Default)]
pub struct Reconciler {
    suspects: Vec<Mismatch>,
}

impl Reconciler {
    /// Returns the differences found in this pass and the previous one.
    pub fn confirm(&mut self, found: Vec<Mismatch>) -> Vec<Mismatch> {
        let confirmed: Vec<Mismatch> = found
            .iter()
            .filter(|m| self.suspects.binary_search(m).is_ok())
            .copied()
            .collect();
        self.suspects = found
            .into_iter()
            .filter(|m| confirmed.binary_search(m).is_err())
            .collect();
        confirmed
    }
}

/// The remote IP of a record or event (IPv4 in the first 4 bytes).
pub fn record_ip(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(*addr)
    }
}

pub fn event_ip(event: &SessionEvent) -> IpAddr {
    record_ip(event.family, &event.addr)
}

/// Counters the agent reports about itself.
#[derive(Default)]
pub struct AgentStats {
    pub events: AtomicU64,
    /// Index counts corrected from the kernel's records.
    pub repairs: AtomicU64,
    /// Kernel per-IP counts corrected from the kernel's records.
    pub kernel_repairs: AtomicU64,
    /// Zero per-IP entries removed from the kernel maps.
    pub collected: AtomicU64,
    pub underflows: AtomicU64,
    pub queries: AtomicU64,
    /// The kernel's own counters (audit_common::stat), as of the last reconcile.
    pub kernel_events_lost: AtomicU64,
    pub kernel_ip_table_full: AtomicU64,
    pub kernel_socket_table_full: AtomicU64,
    /// 1 while a kernel table is full: refusals since the last pass, refused
    /// sessions still waiting for room, or a per-IP map at capacity.
    pub kernel_tables_saturated: AtomicU64,
    /// Unix time of the last pass that found a table full; 0: never.
    pub kernel_tables_last_saturated: AtomicU64,
    /// Sessions a full per-IP table refused, counted once there was room.
    pub adopted: AtomicU64,
    /// Sessions the kernel tracks, as of the last reconcile.
    pub kernel_sessions: AtomicU64,
    /// Sessions that predate the kernel program; while any remain, the tp_btf
    /// close backstop stays attached.
    pub kernel_seeded_sessions: AtomicU64,
    /// 1 while the tp_btf close backstop is attached.
    pub close_backstop_attached: AtomicU64,
    /// 1 while the sk_lookup program enforces `[[kernel_limits]]`.
    pub kernel_limits_attached: AtomicU64,
    /// SYNs refused by a kernel limit, and let through by a dry-run one.
    pub kernel_limit_refusals: AtomicU64,
    pub kernel_limit_dry_run_refusals: AtomicU64,
    /// Sessions over a limit closed with a RST (`cut_existing`), and those a
    /// dry-run limit would have closed.
    pub kernel_limit_cuts: AtomicU64,
    pub kernel_limit_dry_run_cuts: AtomicU64,
    /// SIGHUPs handled: configurations applied, and refused (the running one kept).
    pub reloads: AtomicU64,
    pub reloads_refused: AtomicU64,
    /// Counters and latencies for the Prometheus exposition.
    pub observed: Observed,
}

impl AgentStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Sessions a full kernel table refused since the program was loaded
    /// (some may be counted since: `adopted`).
    pub fn refused(&self) -> u64 {
        Self::get(&self.kernel_ip_table_full) + Self::get(&self.kernel_socket_table_full)
    }
}

/// The configuration in force and the kernel slots of its services. SIGHUP
/// replaces it whole, so each request sees one consistent version.
pub struct Setup {
    pub config: Config,
    /// Service name → kernel slot.
    pub slots: HashMap<String, u8>,
}

impl Setup {
    /// Service names in configuration order, for error messages.
    pub fn service_names(&self) -> Vec<&str> {
        self.config
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect()
    }
}

/// Where session events come from: the kernel's ring buffer (a fake in tests).
pub trait EventSource: Send {
    /// Appends every event available now to `out`.
    fn take_available(&mut self, out: &mut Vec<SessionEvent>);
}

/// Everything the query side needs, shared by all connections.
pub struct SharedState {
    setup: RwLock<Arc<Setup>>,
    /// The kernel's events not yet applied. Whoever needs fresh counts drains
    /// it (every query does), so the kernel need not wake the agent per event.
    events: Mutex<Option<Box<dyn EventSource>>>,
    pub sessions: RwLock<LiveSessions>,
    pub monitors: Mutex<Monitors>,
    pub stats: AgentStats,
    /// The fleet view, when clustering is on (set once at start-up).
    cluster: OnceLock<Arc<ClusterView>>,
}

impl SharedState {
    pub fn new(config: Config, slots: HashMap<String, u8>) -> Self {
        let monitors = Monitors::new(&config.monitors, config.max_tracked_ips_per_monitor);
        Self {
            setup: RwLock::new(Arc::new(Setup { config, slots })),
            events: Mutex::new(None),
            sessions: RwLock::new(LiveSessions::default()),
            monitors: Mutex::new(monitors),
            stats: AgentStats::default(),
            cluster: OnceLock::new(),
        }
    }

    /// Turns clustering on: queries read `view`, and the index and monitors
    /// remember what changes for the publisher. Only the first call counts.
    pub fn enable_cluster(&self, view: Arc<ClusterView>) {
        if self.cluster.set(view).is_ok() {
            self.write_sessions().track_changes();
            self.lock_monitors().track_changes();
        }
    }

    /// The fleet view; None while clustering is off.
    pub fn cluster(&self) -> Option<&ClusterView> {
        self.cluster.get().map(|view| &**view)
    }

    pub fn attach_events(&self, source: Box<dyn EventSource>) {
        *self.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Applies every event the kernel has produced so far to the live index
    /// and the monitors; returns how many. Events are applied in ring order
    /// under the feed's lock, so concurrent drainers cannot reorder them.
    pub fn drain_events(&self, now: std::time::Duration) -> usize {
        let mut feed = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let Some(source) = feed.as_mut() else {
            return 0;
        };
        let mut batch = Vec::new();
        source.take_available(&mut batch);
        if batch.is_empty() {
            return 0;
        }
        let mut outcome = ApplyOutcome::default();
        {
            let mut sessions = self.write_sessions();
            for event in &batch {
                sessions.apply(event, &mut outcome);
            }
        }
        // Only live accepts are new connections; seeded sessions predate us.
        let mut monitors = self.lock_monitors();
        if !monitors.is_empty() {
            for event in batch.iter().filter(|e| e.kind == EVENT_OPEN) {
                monitors.record(Series::Connections, event_ip(event), 1, now);
            }
        }
        drop(monitors);
        for event in batch.iter().filter(|e| e.kind == EVENT_OPEN) {
            self.stats.observed.accepted(event.service);
        }
        AgentStats::add(&self.stats.events, outcome.applied);
        if outcome.underflows + outcome.malformed > 0 {
            AgentStats::add(&self.stats.underflows, outcome.underflows);
            log::debug!(
                "{} close events without a matching open, {} malformed; the reconciler will settle them",
                outcome.underflows,
                outcome.malformed
            );
        }
        batch.len()
    }

    pub fn setup(&self) -> Arc<Setup> {
        self.setup.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace_setup(&self, setup: Setup) {
        *self.setup.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(setup);
    }

    // A panic while holding a lock cannot leave these structures in a state
    // that is unsafe to read (at worst a count is off until reconciled), so a
    // poisoned lock is still used rather than taking the agent down.
    pub fn read_sessions(&self) -> RwLockReadGuard<'_, LiveSessions> {
        self.sessions.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write_sessions(&self) -> RwLockWriteGuard<'_, LiveSessions> {
        self.sessions.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lock_monitors(&self) -> MutexGuard<'_, Monitors> {
        self.monitors.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests;
