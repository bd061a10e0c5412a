//! A kernel in memory for the agent's unit tests: socket records, per-IP
//! counts with a capacity, the refusal counters, service slots (through the
//! real slot assignment) and the backstop, with `accept`/`close` playing
//! sock_ops. Only the agent's view is modelled, not the kernel's races.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
};

use audit_common::{
    record_origin, stat, sync_result, LiveCounts, SocketRecord, FAMILY_V4, FAMILY_V6, MAX_SERVICES,
};

use crate::{config::kernel_limits::KernelLimitConfig, domain::ServicePorts};

use super::{
    api::{Kernel, LiveSnapshot, TrackedSessions, Uncounted},
    cut::CutReport,
    loader::{
        error::LoadError,
        services::{assign_slots, port_values},
    },
    refusal::{RefusalStatus, Refused},
    seed::{SeedError, SeedReport},
};

/// A session open on a port not watched yet, for `seed` to find.
#[derive(Debug, Clone, Copy)]
pub struct Unwatched {
    pub cookie: u64,
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Debug)]
pub struct FakeKernel {
    /// Counted sessions by cookie (SOCKETS records and COUNTED storage alike).
    pub counted: BTreeMap<u64, SocketRecord>,
    pub uncounted: Vec<Uncounted>,
    pub live: BTreeMap<IpAddr, LiveCounts>,
    /// Entries per family the per-IP map holds at most.
    pub capacity: u64,
    pub stats: [u64; stat::COUNT as usize],
    pub names: Vec<Option<String>>,
    pub ports: HashMap<u16, u32>,
    pub backstop: bool,
    pub mirroring: bool,
    /// `configure_services` fails (the kernel refuses the update).
    pub refuse_services: bool,
    pub unwatched: Vec<Unwatched>,
    /// The port maps `seed` was called with.
    pub seed_calls: Vec<HashMap<u16, u8>>,
    /// Every `adjust_live` call.
    pub adjustments: Vec<(IpAddr, u8, i64)>,
    /// How many times `snapshot_tracked` ran: one per pass.
    pub snapshots: AtomicUsize,
    /// The kernel limits last configured.
    pub kernel_limits: Vec<KernelLimitConfig>,
    /// Refusals `take_refused` hands out (and empties).
    pub refused: Vec<Refused>,
}

impl Default for FakeKernel {
    fn default() -> Self {
        Self {
            counted: BTreeMap::new(),
            uncounted: Vec::new(),
            live: BTreeMap::new(),
            capacity: 1 << 20,
            stats: [0; stat::COUNT as usize],
            names: vec![None; MAX_SERVICES],
            ports: HashMap::new(),
            backstop: true,
            mirroring: false,
            refuse_services: false,
            unwatched: Vec::new(),
            seed_calls: Vec::new(),
            adjustments: Vec::new(),
            snapshots: AtomicUsize::new(0),
            kernel_limits: Vec::new(),
            refused: Vec::new(),
        }
    }
}

pub fn record(ip: IpAddr, slot: u8, origin: u8) -> SocketRecord {
    let mut addr = [0u8; 16];
    let family = match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            FAMILY_V4
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            FAMILY_V6
        }
    };
    SocketRecord {
        addr,
        family,
        service: slot,
        origin,
        _pad: [0; 5],
    }
}

fn record_ip(record: &SocketRecord) -> IpAddr {
    let a = record.addr;
    if record.family == FAMILY_V4 {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(a)
    }
}

impl FakeKernel {
    fn entries(&self, v4: bool) -> u64 {
        self.live.keys().filter(|ip| ip.is_ipv4() == v4).count() as u64
    }

    /// The per-IP counters of `ip`, created if there is room.
    fn counts(&mut self, ip: IpAddr) -> Option<&mut LiveCounts> {
        if !self.live.contains_key(&ip) && self.entries(ip.is_ipv4()) >= self.capacity {
            return None;
        }
        Some(self.live.entry(ip).or_default())
    }

    /// sock_ops accepting a session: counted, or left uncounted by a full table.
    pub fn accept(&mut self, cookie: u64, ip: IpAddr, slot: u8) -> bool {
        let record = record(ip, slot, record_origin::ACCEPTED);
        match self.counts(ip) {
            Some(counts) => {
                counts.sessions[slot as usize] += 1;
                self.counted.insert(cookie, record);
                true
            }
            None => {
                self.stats[stat::IP_TABLE_FULL as usize] += 1;
                self.uncounted.push(Uncounted { cookie, record });
                false
            }
        }
    }

    /// A session closing: uncounted if counted (its zero entry stays).
    pub fn close(&mut self, cookie: u64) {
        self.uncounted.retain(|u| u.cookie != cookie);
        if let Some(record) = self.counted.remove(&cookie) {
            if let Some(counts) = self.live.get_mut(&record_ip(&record)) {
                counts.sessions[record.service as usize] -= 1;
            }
        }
    }

    pub fn count(&self, ip: IpAddr, slot: u8) -> u32 {
        self.live.get(&ip).map_or(0, |c| c.sessions[slot as usize])
    }
}

impl Kernel for FakeKernel {
    fn configure_refusal(
        &mut self,
        limits: &[KernelLimitConfig],
        _slots: &HashMap<String, u8>,
    ) -> Result<RefusalStatus, LoadError> {
        self.kernel_limits = limits.to_vec();
        Ok(RefusalStatus {
            limits: limits.len(),
            attached: !limits.is_empty(),
        })
    }

    fn take_refused(&mut self) -> Vec<Refused> {
        std::mem::take(&mut self.refused)
    }

    /// Sockets are the real kernel's (SOCK_DESTROY); the end-to-end tests
    /// cover cutting.
    fn cut_over_limits(
        &mut self,
        _limits: &[KernelLimitConfig],
        _slots: &HashMap<String, u8>,
    ) -> Result<CutReport, LoadError> {
        Ok(CutReport::default())
    }

    fn snapshot_tracked(&self) -> Result<TrackedSessions, LoadError> {
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        Ok(TrackedSessions {
            counted: self.counted.values().copied().collect(),
            uncounted: self.uncounted.clone(),
        })
    }

    fn snapshot_live(&self) -> Result<LiveSnapshot, LoadError> {
        Ok(self.live.iter().map(|(&ip, &c)| (ip, c)).collect())
    }

    fn adjust_live(&mut self, ip: IpAddr, slot: u8, delta: i64) -> Result<u32, LoadError> {
        self.adjustments.push((ip, slot, delta));
        let Some(counts) = self.counts(ip) else {
            return Ok(sync_result::TABLE_FULL);
        };
        let slot = &mut counts.sessions[slot as usize];
        *slot = slot.wrapping_add(delta as u32);
        Ok(sync_result::APPLIED)
    }

    fn collect_zero_entries(&mut self, snapshot: &LiveSnapshot) -> usize {
        let mut removed = 0;
        for (ip, counts) in snapshot {
            if counts.sessions.iter().all(|&c| c == 0) && self.live.remove(ip).is_some() {
                removed += 1;
            }
        }
        removed
    }

    fn adopt_uncounted(&mut self, sessions: &[Uncounted]) -> Result<Vec<SocketRecord>, LoadError> {
        let mut adopted = Vec::new();
        for session in sessions {
            if !self.uncounted.contains(session) {
                continue;
            }
            let ip = record_ip(&session.record);
            let Some(counts) = self.counts(ip) else {
                continue;
            };
            counts.sessions[session.record.service as usize] += 1;
            self.uncounted.retain(|u| u != session);
            self.counted.insert(session.cookie, session.record);
            adopted.push(session.record);
        }
        Ok(adopted)
    }

    fn stat(&self, index: u32) -> u64 {
        self.stats[index as usize]
    }

    fn ip_capacity(&self) -> u64 {
        self.capacity
    }

    fn configure_services(
        &mut self,
        services: &[ServicePorts],
        slot_in_use: &dyn Fn(u8) -> bool,
    ) -> Result<HashMap<String, u8>, LoadError> {
        if self.refuse_services {
            return Err(LoadError::TooManyServices {
                count: services.len(),
                max: 0,
            });
        }
        let plan = assign_slots(&self.names, services, slot_in_use)?;
        for (slot, name) in &plan.renamed {
            self.names[*slot as usize] = Some(name.clone());
        }
        self.ports = port_values(services, &plan.slots);
        Ok(plan.slots)
    }

    fn start_mirroring(&mut self) -> Result<(), LoadError> {
        self.mirroring = true;
        Ok(())
    }

    fn stop_mirroring(&mut self) -> Result<(), LoadError> {
        self.mirroring = false;
        Ok(())
    }

    fn attach_close_backstop(&mut self) -> Result<bool, LoadError> {
        Ok(!std::mem::replace(&mut self.backstop, true))
    }

    fn detach_close_backstop(&mut self) -> Result<bool, LoadError> {
        Ok(std::mem::replace(&mut self.backstop, false))
    }

    fn close_backstop_attached(&self) -> bool {
        self.backstop
    }

    fn seed(
        &mut self,
        ports: &HashMap<u16, u8>,
        _cgroup: Option<&Path>,
    ) -> Result<SeedReport, SeedError> {
        self.seed_calls.push(ports.clone());
        let mut report = SeedReport::default();
        let (found, rest): (Vec<Unwatched>, Vec<Unwatched>) = self
            .unwatched
            .drain(..)
            .partition(|s| ports.contains_key(&s.port));
        self.unwatched = rest;
        for session in found {
            let slot = ports[&session.port];
            let Some(counts) = self.counts(session.ip) else {
                continue;
            };
            counts.sessions[slot as usize] += 1;
            self.counted.insert(
                session.cookie,
                record(session.ip, slot, record_origin::SEEDED),
            );
            report.seeded += 1;
        }
        Ok(report)
    }
}
