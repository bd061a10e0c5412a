//! The agent's view of live sessions: one CIDR index per service slot, fed by the
//! kernel's events and reconciled against the kernel's maps.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        RwLock,
    },
};

use audit_common::{LiveCounts, SessionEvent, EVENT_CLOSE, EVENT_OPEN, FAMILY_V4, MAX_SERVICES};
use ipnet::IpNet;

use crate::{config::Config, index::CidrIndex};

/// Live session counts per service slot.
pub struct LiveSessions {
    by_slot: Vec<CidrIndex>,
}

impl Default for LiveSessions {
    fn default() -> Self {
        Self {
            by_slot: (0..MAX_SERVICES).map(|_| CidrIndex::new()).collect(),
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

    pub fn slot_total(&self, slot: u8) -> u64 {
        self.by_slot.get(slot as usize).map_or(0, CidrIndex::total)
    }

    pub fn tracked_ips(&self) -> usize {
        self.by_slot.iter().map(CidrIndex::len).sum()
    }

    pub fn apply(&mut self, event: &SessionEvent, outcome: &mut ApplyOutcome) {
        let delta = match event.kind {
            EVENT_OPEN => 1,
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
        match index.add(event_ip(event), delta) {
            Ok(_) => outcome.applied += 1,
            Err(_) => outcome.underflows += 1,
        }
    }

    /// Replaces everything with the kernel's counts.
    pub fn load_snapshot(&mut self, snapshot: &[(IpAddr, LiveCounts)]) {
        for index in &mut self.by_slot {
            index.clear();
        }
        for (ip, counts) in snapshot {
            for (slot, &count) in counts.sessions.iter().enumerate() {
                if count > 0 {
                    self.by_slot[slot].set(*ip, count as u64);
                }
            }
        }
    }

    /// Differences with a kernel snapshot: (slot, ip, kernel count, index count).
    pub fn diff(&self, snapshot: &[(IpAddr, LiveCounts)]) -> Vec<Mismatch> {
        let mut kernel: HashMap<(u8, IpAddr), u64> = HashMap::new();
        for (ip, counts) in snapshot {
            for (slot, &count) in counts.sessions.iter().enumerate() {
                if count > 0 {
                    kernel.insert((slot as u8, *ip), count as u64);
                }
            }
        }
        let mut out = Vec::new();
        for (&(slot, ip), &kernel_count) in &kernel {
            let index_count = self.get(slot, ip);
            if index_count != kernel_count {
                out.push(Mismatch {
                    slot,
                    ip,
                    kernel: kernel_count,
                    index: index_count,
                });
            }
        }
        for (slot, index) in self.by_slot.iter().enumerate() {
            for (ip, count) in index.iter() {
                if !kernel.contains_key(&(slot as u8, ip)) {
                    out.push(Mismatch {
                        slot: slot as u8,
                        ip,
                        kernel: 0,
                        index: count,
                    });
                }
            }
        }
        out.sort();
        out
    }

    pub fn repair(&mut self, mismatch: &Mismatch) {
        self.by_slot[mismatch.slot as usize].set(mismatch.ip, mismatch.kernel);
    }

    pub fn heap_bytes(&self) -> usize {
        self.by_slot.iter().map(CidrIndex::heap_bytes).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mismatch {
    pub slot: u8,
    pub ip: IpAddr,
    pub kernel: u64,
    pub index: u64,
}

/// Reconciles in two passes: a difference is only repaired when the next pass
/// finds the very same one, so events still in flight in the ring buffer at
/// snapshot time are not "repaired" into errors.
#[derive(Default)]
pub struct Reconciler {
    suspects: Vec<Mismatch>,
}

impl Reconciler {
    /// Returns the mismatches repaired in this pass.
    pub fn pass(
        &mut self,
        sessions: &mut LiveSessions,
        snapshot: &[(IpAddr, LiveCounts)],
    ) -> Vec<Mismatch> {
        let found = sessions.diff(snapshot);
        let confirmed: Vec<Mismatch> = found
            .iter()
            .filter(|m| self.suspects.binary_search(m).is_ok())
            .copied()
            .collect();
        for mismatch in &confirmed {
            sessions.repair(mismatch);
        }
        self.suspects = found
            .into_iter()
            .filter(|m| confirmed.binary_search(m).is_err())
            .collect();
        confirmed
    }
}

pub fn event_ip(event: &SessionEvent) -> IpAddr {
    if event.family == FAMILY_V4 {
        IpAddr::from([event.addr[0], event.addr[1], event.addr[2], event.addr[3]])
    } else {
        IpAddr::from(event.addr)
    }
}

/// Counters the agent reports about itself.
#[derive(Default)]
pub struct AgentStats {
    pub events: AtomicU64,
    pub repairs: AtomicU64,
    pub underflows: AtomicU64,
    pub queries: AtomicU64,
}

impl AgentStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Everything the query side needs, shared by all connections.
pub struct SharedState {
    pub config: Config,
    /// Service name → kernel slot.
    pub slots: HashMap<String, u8>,
    pub sessions: RwLock<LiveSessions>,
    pub stats: AgentStats,
}

impl SharedState {
    pub fn new(config: Config, slots: HashMap<String, u8>) -> Self {
        Self {
            config,
            slots,
            sessions: RwLock::new(LiveSessions::default()),
            stats: AgentStats::default(),
        }
    }

    /// Service names in configuration order, for error messages.
    pub fn service_names(&self) -> Vec<&str> {
        self.config
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn reconcile_repairs_only_stable_differences() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let gone: IpAddr = "10.0.0.2".parse().unwrap();
        let mut counts = LiveCounts::default();
        counts.sessions[0] = 3;
        let snapshot = vec![(ip, counts)];
        let mut sessions = LiveSessions::default();
        sessions.by_slot[0].set(ip, 1);
        sessions.by_slot[0].set(gone, 2);
        let mut reconciler = Reconciler::default();
        assert!(reconciler.pass(&mut sessions, &snapshot).is_empty());
        assert_eq!(sessions.get(0, ip), 1);
        let repaired = reconciler.pass(&mut sessions, &snapshot);
        assert_eq!(repaired.len(), 2);
        assert_eq!(sessions.get(0, ip), 3);
        assert_eq!(sessions.get(0, gone), 0);
        assert!(reconciler.pass(&mut sessions, &snapshot).is_empty());
        assert!(sessions.diff(&snapshot).is_empty());
    }

    #[test]
    fn transient_difference_is_not_repaired() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut counts = LiveCounts::default();
        counts.sessions[0] = 2;
        let mut sessions = LiveSessions::default();
        sessions.by_slot[0].set(ip, 1);
        let mut reconciler = Reconciler::default();
        assert!(reconciler.pass(&mut sessions, &[(ip, counts)]).is_empty());
        // The in-flight event arrives; the next snapshot agrees.
        sessions.by_slot[0].set(ip, 2);
        assert!(reconciler.pass(&mut sessions, &[(ip, counts)]).is_empty());
        assert_eq!(sessions.get(0, ip), 2);
    }
}
