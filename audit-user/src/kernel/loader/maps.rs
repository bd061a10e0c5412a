//! The agent's reads and writes of the kernel's maps: snapshots of the
//! sessions and per-IP counts, zero entries collected, the kernel's own
//! counters, and the services' slots and ports.

use std::{collections::HashMap as StdHashMap, net::IpAddr};

use audit_common::{map_names, session_state, MAX_SERVICES, PORT_NOT_WATCHED};
use aya::maps::{lpm_trie::Key, IterableMap as _};

use crate::{
    domain::ServicePorts,
    kernel::{
        api::{LiveSnapshot, TrackedSessions, Uncounted},
        cut::Counted,
        sock_diag,
    },
};

use super::{
    error::LoadError,
    services::{assign_slots, decode_name, encode_name, port_values},
    KernelProgram,
};

impl KernelProgram {
    /// Every session the kernel tracks: the SOCKETS records (seeded sessions,
    /// those accepted while the agent seeded, and adopted ones) and the socket
    /// storage of every other accepted session still open, read through
    /// sock_diag: counted, or left uncounted by a full per-IP table.
    pub fn snapshot_tracked(&self) -> Result<TrackedSessions, LoadError> {
        let mut recorded = Vec::new();
        for entry in self.sockets.iter() {
            recorded.push(entry.map_err(|source| LoadError::Map {
                name: map_names::SOCKETS,
                source,
            })?);
        }
        let live = sock_diag::state_mask(&sock_diag::LIVE_STATES);
        let sockets = sock_diag::dump_tcp_with_sessions(live, self.sessions_fd())?;
        let adopted: std::collections::HashSet<u64> =
            recorded.iter().map(|&(cookie, _)| cookie).collect();
        let mut tracked = TrackedSessions {
            counted: recorded.into_iter().map(|(_, record)| record).collect(),
            uncounted: Vec::new(),
        };
        for socket in &sockets {
            let Some(storage) = socket.session else {
                continue;
            };
            match storage.state {
                session_state::COUNTED => tracked.counted.push(storage.record),
                // An adopted one is counted by its SOCKETS record already.
                session_state::UNCOUNTED if !adopted.contains(&socket.cookie) => {
                    tracked.uncounted.push(Uncounted {
                        cookie: socket.cookie,
                        record: storage.record,
                    });
                }
                _ => {}
            }
        }
        Ok(tracked)
    }

    /// Every open session the kernel counts, with its socket: a socket whose
    /// storage says COUNTED, or whose cookie has a SOCKETS record (seeded,
    /// accepted while seeding, adopted).
    pub fn counted_sockets(&self) -> Result<Vec<(sock_diag::TcpSocket, Counted)>, LoadError> {
        let mut recorded = StdHashMap::new();
        for entry in self.sockets.iter() {
            let (cookie, record) = entry.map_err(|source| LoadError::Map {
                name: map_names::SOCKETS,
                source,
            })?;
            recorded.insert(cookie, record);
        }
        let live = sock_diag::state_mask(&sock_diag::LIVE_STATES);
        let sockets = sock_diag::dump_tcp_with_sessions(live, self.sessions_fd())?;
        let now_ms = monotonic_ms();
        Ok(sockets
            .into_iter()
            .filter_map(|socket| {
                let (record, age_ms) = match recorded.get(&socket.cookie) {
                    Some(record) => (*record, u32::MAX),
                    None => {
                        let s = socket
                            .session
                            .filter(|s| s.state == session_state::COUNTED)?;
                        let age = match (now_ms, s.opened_ms) {
                            (Some(now), opened) if opened != 0 => now.wrapping_sub(opened),
                            _ => u32::MAX,
                        };
                        (s.record, age)
                    }
                };
                let ip = socket.remote.ip().to_canonical();
                Some((
                    socket,
                    Counted {
                        cookie: socket.cookie,
                        ip,
                        service: record.service,
                        age_ms,
                    },
                ))
            })
            .collect())
    }

    /// Deletes the per-IP entries that `snapshot` saw at zero. The kernel leaves
    /// them (deleting there could race an increment); an increment that races
    /// this delete is lost from the per-IP map only, and the reconciler restores
    /// it from the socket records. Returns how many were removed.
    pub fn collect_zero_entries(&mut self, snapshot: &LiveSnapshot) -> usize {
        let mut removed = 0;
        for (ip, counts) in snapshot {
            if counts.sessions.iter().any(|&c| c != 0) {
                continue;
            }
            let result = match ip {
                IpAddr::V4(v4) => self.live_v4.remove(&Key::new(32, v4.octets())),
                IpAddr::V6(v6) => self.live_v6.remove(&Key::new(128, v6.octets())),
            };
            removed += usize::from(result.is_ok());
        }
        removed
    }

    /// Gives each configured service a slot, keeping the slots services had in the
    /// pinned state (their counts stay theirs), and points the ports at them.
    /// Returns name → slot.
    pub fn configure_services(
        &mut self,
        services: &[ServicePorts],
        slot_in_use: impl Fn(u8) -> bool,
    ) -> Result<StdHashMap<String, u8>, LoadError> {
        let map_error = |source| LoadError::Map {
            name: map_names::SERVICE_NAMES,
            source,
        };
        let names: Vec<Option<String>> = (0..MAX_SERVICES as u32)
            .map(|slot| {
                self.service_names
                    .get(&slot, 0)
                    .map(|name| decode_name(&name))
            })
            .collect::<Result<_, _>>()
            .map_err(map_error)?;
        let plan = assign_slots(&names, services, slot_in_use)?;
        for (slot, name) in &plan.renamed {
            self.service_names
                .set(u32::from(*slot), encode_name(name), 0)
                .map_err(map_error)?;
        }

        let map_error = |source| LoadError::Map {
            name: map_names::PORT_SERVICES,
            source,
        };
        let wanted = port_values(services, &plan.slots);
        // A previous agent may have watched other ports: the first time, read
        // the whole array (65,536 lookups); after that our copy is the truth.
        // A failed update leaves no copy, so the next call reads it all again.
        let watched = match self.watched_ports.take() {
            Some(watched) => watched,
            None => {
                let mut found = StdHashMap::new();
                for port in 0..=u16::MAX {
                    let value = self
                        .port_services
                        .get(&u32::from(port), 0)
                        .map_err(map_error)?;
                    if value != PORT_NOT_WATCHED {
                        found.insert(port, value);
                    }
                }
                found
            }
        };
        for &port in watched.keys().filter(|p| !wanted.contains_key(p)) {
            self.port_services
                .set(u32::from(port), PORT_NOT_WATCHED, 0)
                .map_err(map_error)?;
        }
        for (&port, &value) in &wanted {
            if watched.get(&port) != Some(&value) {
                self.port_services
                    .set(u32::from(port), value, 0)
                    .map_err(map_error)?;
            }
        }
        self.watched_ports = Some(wanted);
        Ok(plan.slots)
    }

    /// Every per-IP entry of the kernel's live-count maps (zero entries included).
    pub fn snapshot_live(&self) -> Result<LiveSnapshot, LoadError> {
        let mut out = Vec::new();
        for entry in self.live_v4.iter() {
            let (key, counts) = entry.map_err(|source| LoadError::Map {
                name: map_names::LIVE_V4,
                source,
            })?;
            out.push((IpAddr::from(key.data()), counts));
        }
        for entry in self.live_v6.iter() {
            let (key, counts) = entry.map_err(|source| LoadError::Map {
                name: map_names::LIVE_V6,
                source,
            })?;
            out.push((IpAddr::from(key.data()), counts));
        }
        Ok(out)
    }

    /// A kernel-side counter from `audit_common::stat`, summed over CPUs.
    pub fn stat(&self, index: u32) -> u64 {
        self.stats
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    /// Entries the per-IP map of each family holds at most: as created, which
    /// for pinned maps is what the agent that created them asked for.
    pub fn ip_capacity(&self) -> u64 {
        self.live_v4
            .map()
            .info()
            .map(|info| u64::from(info.max_entries()))
            .unwrap_or(u64::MAX)
    }
}

/// CLOCK_MONOTONIC in ms, wrapping as the kernel program's `opened_ms`
/// (bpf_ktime_get_ns reads the same clock).
fn monotonic_ms() -> Option<u32> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let ms = now.tv_sec() as u64 * 1000 + now.tv_nsec() as u64 / 1_000_000;
    Some(ms as u32)
}
