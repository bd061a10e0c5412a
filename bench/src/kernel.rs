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
    map_names, session_state, sync_result, LiveCounts, SessionEvent, EVENT_CLOSE, EVENT_OPEN,
    FAMILY_V4, FAMILY_V6, SYNC_ADJUST,
};
use aya::{
    maps::{LpmTrie, Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use inbound_audit::{
    domain::ServicePorts,
    kernel::{
        loader::{KernelProgram, LoadError, LoadOptions},
        sock_diag,
    },
};

use inbound_bench::synthetic::SyntheticSet;

use crate::agent::TABLE_SIZE;

/// Cookies of synthetic records: far above any real socket cookie (those
/// count up from 1 since boot), so they can never collide with one.
const SYNTHETIC_COOKIE_BASE: u64 = 1 << 62;

/// The kernel program on `pin_dir`, attached to `cgroup`, with the bench's
/// table sizes (those of the agents it starts).
fn load_program(pin_dir: &Path, cgroup: &Path) -> Result<KernelProgram, LoadError> {
    KernelProgram::load(&LoadOptions {
        pin_dir,
        cgroup,
        max_tracked_ips: TABLE_SIZE,
        max_tracked_sessions: TABLE_SIZE,
        event_ring_bytes: inbound_audit::config::Config::default().event_ring_bytes,
    })
}

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
    let mut program =
        load_program(pin_dir, cgroup).context("loading the kernel program to pre-fill it")?;
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

/// Number of sessions the kernel tracks: records in the pinned SOCKETS map,
/// plus live sockets whose storage in the pinned SESSIONS map says counted.
pub fn socket_records(pin_dir: &Path) -> Result<usize> {
    let data = MapData::from_pin(pin_dir.join(map_names::SOCKETS))?;
    let map: aya::maps::HashMap<MapData, u64, audit_common::SocketRecord> =
        Map::HashMap(data).try_into()?;
    let records = map.keys().filter(Result::is_ok).count();
    let sessions = MapData::from_pin(pin_dir.join(map_names::SESSIONS))?;
    let live = sock_diag::state_mask(&sock_diag::LIVE_STATES);
    let stored = sock_diag::dump_tcp_with_sessions(live, sessions.fd().as_fd())?
        .iter()
        .filter(|s| s.session.is_some_and(|s| s.state == session_state::COUNTED))
        .count();
    Ok(records + stored)
}

/// Run time of each kind of sync request, as the kernel timed it (ns).
#[derive(Default)]
pub struct SyncCosts {
    /// A malformed request: the program returns at once (the run's own overhead).
    pub baseline: Vec<f64>,
    /// Open of a session from an IP with no per-IP entry yet (LPM insert).
    pub open_new_ip: Vec<f64>,
    /// Open of a session from an IP with an entry.
    pub open_known_ip: Vec<f64>,
    pub close: Vec<f64>,
    /// Per-IP count adjust (LPM lookup and atomic add, no record, no event).
    pub adjust: Vec<f64>,
}

/// Times the kernel's open and close code for seeded sessions (SOCKETS records)
/// through the sync program: `sessions` opens from `sources` rotating IPv4 sources in
/// 127.40.0.0/16, then their closes. Loads its own program on `pin_dir`,
/// attached to `cgroup` (no connection is made meanwhile), and removes it after.
pub fn sync_costs(
    pin_dir: &Path,
    cgroup: &Path,
    service: &ServicePorts,
    sessions: usize,
    sources: u32,
) -> Result<SyncCosts> {
    let mut program =
        load_program(pin_dir, cgroup).context("loading the kernel program to time its map work")?;
    let slot = program.configure_services(std::slice::from_ref(service), |_| false)?[&service.name];
    let mut events = program.take_events().context("event ring buffer")?;
    let request = |kind, i: usize| {
        let host = i as u32 % sources;
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 40, (host / 254) as u8, (host % 254 + 1) as u8]);
        SessionEvent {
            cookie: SYNTHETIC_COOKIE_BASE | i as u64,
            addr,
            kind,
            family: FAMILY_V4,
            service: slot,
            _pad: [0; 5],
        }
    };
    let mut costs = SyncCosts::default();
    let result = (|| -> Result<()> {
        for i in 0..sessions {
            let (result, ns) = program.sync_timed(&request(EVENT_OPEN, i))?;
            if result != sync_result::APPLIED {
                bail!("open {i}: sync result {result}");
            }
            if i < sources as usize {
                costs.open_new_ip.push(ns.into());
            } else {
                costs.open_known_ip.push(ns.into());
            }
            // The ring holds about 100k events; the agent would read them.
            if i % 10_000 == 9_999 {
                while events.next().is_some() {}
            }
        }
        for i in 0..sessions.min(sources as usize) {
            let mut adjust = request(SYNC_ADJUST, i);
            adjust.cookie = 0;
            costs.adjust.push(program.sync_timed(&adjust)?.1.into());
            let mut invalid = request(EVENT_OPEN, i);
            invalid.family = 0;
            costs.baseline.push(program.sync_timed(&invalid)?.1.into());
        }
        for i in 0..sessions {
            let (result, ns) = program.sync_timed(&request(EVENT_CLOSE, i))?;
            if result != sync_result::APPLIED {
                bail!("close {i}: sync result {result}");
            }
            costs.close.push(ns.into());
            if i % 10_000 == 9_999 {
                while events.next().is_some() {}
            }
        }
        Ok(())
    })();
    drop(events);
    drop(program);
    inbound_audit::kernel::loader::cleanup(pin_dir)
        .with_context(|| format!("removing {}", pin_dir.display()))?;
    result.map(|()| costs)
}
