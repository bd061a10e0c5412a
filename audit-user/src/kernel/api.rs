//! The kernel as the agent uses it: one trait over the loaded program's maps,
//! sync program and links, so the agent's reconcile passes, kernel passes and
//! reloads run against a fake in unit tests (the end-to-end tests keep the
//! real kernel).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::Path,
};

use audit_common::{LiveCounts, SocketRecord};

use crate::{config::kernel_limits::KernelLimitConfig, domain::ServicePorts};

use super::{
    cut::CutReport,
    loader::{error::LoadError, KernelProgram},
    refusal::{RefusalStatus, Refused},
    seed::{self, SeedError, SeedReport},
};

/// Live counts read from the kernel maps, per remote IP.
pub type LiveSnapshot = Vec<(IpAddr, LiveCounts)>;

/// A session sock_ops accepted while the per-IP table was full: its socket
/// storage says `UNCOUNTED`, and nothing counts it until it is adopted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uncounted {
    pub cookie: u64,
    pub record: SocketRecord,
}

/// Every session the kernel tracks.
#[derive(Debug, Default, Clone)]
pub struct TrackedSessions {
    /// One record per counted session (the truth the counts are held to).
    pub counted: Vec<SocketRecord>,
    /// Sessions a full table kept from being counted, not adopted yet.
    pub uncounted: Vec<Uncounted>,
}

impl TrackedSessions {
    /// Service slots some session holds, counted or waiting to be: a slot
    /// can go to another service only once none does.
    pub fn slots_in_use(&self) -> HashSet<u8> {
        self.counted
            .iter()
            .map(|r| r.service)
            .chain(self.uncounted.iter().map(|u| u.record.service))
            .collect()
    }
}

/// What the agent does to the kernel after start-up.
pub trait Kernel {
    /// Every tracked session: the records the counts are held to, and the
    /// sessions left uncounted by a full table.
    fn snapshot_tracked(&self) -> Result<TrackedSessions, LoadError>;
    /// Every per-IP entry of the live-count maps, zero entries included.
    fn snapshot_live(&self) -> Result<LiveSnapshot, LoadError>;
    /// Adds `delta` to the count of (`ip`, `slot`) atomically; a `sync_result`.
    fn adjust_live(&mut self, ip: IpAddr, slot: u8, delta: i64) -> Result<u32, LoadError>;
    /// Deletes the entries `snapshot` saw at zero; how many went.
    fn collect_zero_entries(&mut self, snapshot: &LiveSnapshot) -> usize;
    /// Counts sessions a full table left uncounted, where there is room now;
    /// returns the records of those it counted (and that are still open).
    fn adopt_uncounted(&mut self, sessions: &[Uncounted]) -> Result<Vec<SocketRecord>, LoadError>;
    /// A counter of `audit_common::stat`, summed over CPUs.
    fn stat(&self, index: u32) -> u64;
    /// Entries each per-IP map (one per family) holds at most.
    fn ip_capacity(&self) -> u64;
    /// Slots for `services` (see `loader::services::assign_slots`), ports
    /// pointed at them; name → slot.
    fn configure_services(
        &mut self,
        services: &[ServicePorts],
        slot_in_use: &dyn Fn(u8) -> bool,
    ) -> Result<HashMap<String, u8>, LoadError>;
    fn start_mirroring(&mut self) -> Result<(), LoadError>;
    fn stop_mirroring(&mut self) -> Result<(), LoadError>;
    /// True if it was detached and is attached now.
    fn attach_close_backstop(&mut self) -> Result<bool, LoadError>;
    /// True if it was attached and is detached now.
    fn detach_close_backstop(&mut self) -> Result<bool, LoadError>;
    fn close_backstop_attached(&self) -> bool;
    /// Puts `limits` (`[[kernel_limits]]`) in the kernel; see `Refusal::configure`.
    fn configure_refusal(
        &mut self,
        limits: &[KernelLimitConfig],
        slots: &HashMap<String, u8>,
    ) -> Result<RefusalStatus, LoadError>;
    /// Cuts the newest sessions of prefixes over a limit with `cut_existing`;
    /// see `cut::plan_cuts`.
    fn cut_over_limits(
        &mut self,
        limits: &[KernelLimitConfig],
        slots: &HashMap<String, u8>,
    ) -> Result<CutReport, LoadError>;
    /// SYNs refused per client IP since the last call (and, at most once a
    /// minute, the per-prefix counts at zero collected).
    fn take_refused(&mut self) -> Vec<Refused>;
    /// Seeds the sessions already open on `ports` (port → slot) in `cgroup`.
    fn seed(
        &mut self,
        ports: &HashMap<u16, u8>,
        cgroup: Option<&Path>,
    ) -> Result<SeedReport, SeedError>;
}

impl Kernel for KernelProgram {
    fn snapshot_tracked(&self) -> Result<TrackedSessions, LoadError> {
        KernelProgram::snapshot_tracked(self)
    }

    fn snapshot_live(&self) -> Result<LiveSnapshot, LoadError> {
        KernelProgram::snapshot_live(self)
    }

    fn adjust_live(&mut self, ip: IpAddr, slot: u8, delta: i64) -> Result<u32, LoadError> {
        KernelProgram::adjust_live(self, ip, slot, delta)
    }

    fn collect_zero_entries(&mut self, snapshot: &LiveSnapshot) -> usize {
        KernelProgram::collect_zero_entries(self, snapshot)
    }

    fn adopt_uncounted(&mut self, sessions: &[Uncounted]) -> Result<Vec<SocketRecord>, LoadError> {
        KernelProgram::adopt_uncounted(self, sessions)
    }

    fn stat(&self, index: u32) -> u64 {
        KernelProgram::stat(self, index)
    }

    fn ip_capacity(&self) -> u64 {
        KernelProgram::ip_capacity(self)
    }

    fn configure_services(
        &mut self,
        services: &[ServicePorts],
        slot_in_use: &dyn Fn(u8) -> bool,
    ) -> Result<HashMap<String, u8>, LoadError> {
        KernelProgram::configure_services(self, services, slot_in_use)
    }

    fn start_mirroring(&mut self) -> Result<(), LoadError> {
        KernelProgram::start_mirroring(self)
    }

    fn stop_mirroring(&mut self) -> Result<(), LoadError> {
        KernelProgram::stop_mirroring(self)
    }

    fn attach_close_backstop(&mut self) -> Result<bool, LoadError> {
        KernelProgram::attach_close_backstop(self)
    }

    fn detach_close_backstop(&mut self) -> Result<bool, LoadError> {
        KernelProgram::detach_close_backstop(self)
    }

    fn close_backstop_attached(&self) -> bool {
        KernelProgram::close_backstop_attached(self)
    }

    fn configure_refusal(
        &mut self,
        limits: &[KernelLimitConfig],
        slots: &HashMap<String, u8>,
    ) -> Result<RefusalStatus, LoadError> {
        KernelProgram::configure_refusal(self, limits, slots)
    }

    fn cut_over_limits(
        &mut self,
        limits: &[KernelLimitConfig],
        slots: &HashMap<String, u8>,
    ) -> Result<CutReport, LoadError> {
        KernelProgram::cut_over_limits(self, limits, slots)
    }

    fn take_refused(&mut self) -> Vec<Refused> {
        // Called every second: the collection paces itself.
        self.refusal().collect_zero_prefixes();
        self.refusal().take_refused()
    }

    fn seed(
        &mut self,
        ports: &HashMap<u16, u8>,
        cgroup: Option<&Path>,
    ) -> Result<SeedReport, SeedError> {
        seed::seed_existing(self, ports, cgroup)
    }
}
