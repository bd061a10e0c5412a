//! Reaching into the agent's pinned kernel state: pre-filling it with
//! synthetic sessions, reading the programs' run-time statistics, the maps'
//! memory, and the per-IP counts.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use audit_common::{
    map_names, sync_result, LiveCounts, SessionEvent, EVENT_OPEN, FAMILY_V4, FAMILY_V6,
};
use aya::{
    maps::{LpmTrie, Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use inbound_audit::{
    config::ServicePorts,
    kernel::loader::{KernelProgram, LoadOptions},
};

use inbound_bench::synthetic::SyntheticSet;

use crate::agent::TABLE_SIZE;

/// Cookies of synthetic records: far above any real socket cookie (those
/// count up from 1 since boot), so they can never collide with one.
const SYNTHETIC_COOKIE_BASE: u64 = 1 << 62;

pub struct Prefill {
    pub applied: usize,
    pub elapsed: Duration,
}

/// Loads the kernel program on `pin_dir` (attached to `cgroup`), configures
/// `service`, and records one fake session per address of `set` through the
/// kernel's own sync program: the same socket records and per-IP counts a
/// real accept would make. The agent started afterwards on the same pin
/// directory takes them as its starting state.
pub fn prefill(
    pin_dir: &Path,
    cgroup: &Path,
    service: &ServicePorts,
    set: &SyntheticSet,
) -> Result<Prefill> {
    let started = Instant::now();
    let mut program = KernelProgram::load(&LoadOptions {
        pin_dir,
        cgroup,
        max_tracked_ips: TABLE_SIZE,
        max_tracked_sessions: TABLE_SIZE,
    })
    .context("loading the kernel program to pre-fill it")?;
    let slots = program
        .configure_services(std::slice::from_ref(service), |_| false)
        .context("configuring the bench service")?;
    let slot = slots[&service.name];
    // Each sync also emits an open event; drained here so the ring buffer
    // never overflows (a lost event would make the agent's reconciler run
    // extra passes while we measure).
    let mut events = program.take_events().context("event ring buffer")?;
    let mut applied = 0;
    for (i, ip) in set.iter().enumerate() {
        let (family, addr) = match ip {
            IpAddr::V4(v4) => {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&v4.octets());
                (FAMILY_V4, addr)
            }
            IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
        };
        let result = program.sync(&SessionEvent {
            cookie: SYNTHETIC_COOKIE_BASE | i as u64,
            addr,
            kind: EVENT_OPEN,
            family,
            service: slot,
            _pad: [0; 5],
        })?;
        if result != sync_result::APPLIED {
            bail!("synthetic session {i} ({ip}) not recorded: sync result {result}");
        }
        applied += 1;
        if i % 10_000 == 9_999 {
            while events.next().is_some() {}
        }
    }
    while events.next().is_some() {}
    Ok(Prefill {
        applied,
        elapsed: started.elapsed(),
    })
}

/// Run-time statistics of one attached program.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProgramStats {
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// The programs attached through the links pinned in `pin_dir`
/// (`link-sock-ops`, and `link-set-state` while the close backstop is
/// attached), by link name. Only these, not every program called inbound_*:
/// other agents (tests) may run on the same box.
pub fn program_stats(pin_dir: &Path) -> Result<Vec<(String, ProgramStats)>> {
    let mut wanted = Vec::new();
    for link in ["link-sock-ops", "link-set-state"] {
        if link == "link-set-state" && !pin_dir.join(link).exists() {
            continue;
        }
        let pinned = PinnedLink::from_pin(pin_dir.join(link))
            .with_context(|| format!("opening {}", pin_dir.join(link).display()))?;
        let info = FdLink::from(pinned).info().context("link info")?;
        wanted.push((
            link.trim_start_matches("link-").to_string(),
            info.program_id(),
        ));
    }
    let mut found: HashMap<u32, ProgramStats> = HashMap::new();
    for program in loaded_programs() {
        let program = program.context("listing loaded programs")?;
        if wanted.iter().any(|&(_, id)| id == program.id()) {
            found.insert(
                program.id(),
                ProgramStats {
                    run_time_ns: program.run_time().as_nanos() as u64,
                    run_count: program.run_count(),
                },
            );
        }
    }
    Ok(wanted
        .into_iter()
        .map(|(name, id)| (name, found.get(&id).copied().unwrap_or_default()))
        .collect())
}

/// Kernel memory charged to a pinned map (`memlock` in its fdinfo: on this
/// kernel the memory actually in use, allocated on demand for these maps).
pub fn map_memory(pin_dir: &Path, name: &str) -> Result<u64> {
    let map = MapData::from_pin(pin_dir.join(name))
        .with_context(|| format!("opening pinned map {name}"))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock in the fdinfo of {name}"))
}

/// The memory of the maps that grow with tracked sessions.
pub fn session_maps_memory(pin_dir: &Path) -> Result<u64> {
    Ok(map_memory(pin_dir, map_names::LIVE_V4)?
        + map_memory(pin_dir, map_names::LIVE_V6)?
        + map_memory(pin_dir, map_names::SOCKETS)?)
}

/// The kernel's per-IP IPv4 counts (all service slots summed), non-zero only.
pub fn live_v4_counts(pin_dir: &Path) -> Result<HashMap<Ipv4Addr, u64>> {
    let data = MapData::from_pin(pin_dir.join(map_names::LIVE_V4))?;
    let map: LpmTrie<MapData, [u8; 4], LiveCounts> = Map::LpmTrie(data).try_into()?;
    let mut out = HashMap::new();
    for entry in map.iter() {
        let (key, counts) = entry?;
        let count: u64 = counts.sessions.iter().map(|&c| u64::from(c)).sum();
        if count > 0 {
            out.insert(Ipv4Addr::from(key.data()), count);
        }
    }
    Ok(out)
}

/// Number of socket records (tracked sessions) in the pinned SOCKETS map.
pub fn socket_records(pin_dir: &Path) -> Result<usize> {
    let data = MapData::from_pin(pin_dir.join(map_names::SOCKETS))?;
    let map: aya::maps::HashMap<MapData, u64, audit_common::SocketRecord> =
        Map::HashMap(data).try_into()?;
    Ok(map.keys().filter(Result::is_ok).count())
}
