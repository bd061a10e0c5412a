//! Start-up sync: counts the inbound sessions that were established before the
//! kernel program was attached (sock_ops never sees them), through the sync
//! program, so they are counted and uncounted by exactly the kernel's own code.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use std::os::fd::BorrowedFd;

use audit_common::{
    session_state, sync_result, SessionEvent, EVENT_CLOSE, EVENT_OPEN, FAMILY_V4, FAMILY_V6,
};

use super::{
    loader::{KernelProgram, LoadError},
    sock_diag::{self, tcp_state, SockDiagError, TcpSocket, LIVE_STATES},
};

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("listing sockets: {0}")]
    SockDiag(#[from] SockDiagError),
    #[error("reading cgroup tree {path}: {source}")]
    Cgroup { path: String, source: io::Error },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SeedReport {
    /// Sessions the kernel had not seen and now counts.
    pub seeded: usize,
    /// Sessions the kernel already tracked.
    pub already_tracked: usize,
    /// Sessions that closed while being seeded, uncounted again.
    pub vanished: usize,
}

/// Inbound live sockets on the configured ports, in the watched cgroup subtree;
/// with their storage in `sessions` (the kernel program's SESSIONS map) if given.
pub fn inbound_live_sockets(
    ports: &HashMap<u16, u8>,
    cgroup_ids: Option<&HashSet<u64>>,
    sessions: Option<BorrowedFd<'_>>,
) -> Result<Vec<TcpSocket>, SockDiagError> {
    let mut states = LIVE_STATES.to_vec();
    states.push(tcp_state::LISTEN);
    let mask = sock_diag::state_mask(&states);
    let all = match sessions {
        Some(sessions) => sock_diag::dump_tcp_with_sessions(mask, sessions)?,
        None => sock_diag::dump_tcp(mask)?,
    };
    Ok(sock_diag::inbound(&all)
        .filter(|s| ports.contains_key(&s.local.port()))
        .filter(|s| match (cgroup_ids, s.cgroup_id) {
            (None, _) => true,
            (Some(ids), Some(id)) => ids.contains(&id),
            (Some(_), None) => false,
        })
        .copied()
        .collect())
}

/// Seeds every pre-existing inbound session on `ports` (port → service slot).
pub fn seed_existing(
    program: &KernelProgram,
    ports: &HashMap<u16, u8>,
    cgroup: Option<&Path>,
) -> Result<SeedReport, SeedError> {
    let cgroup_ids = cgroup.map(cgroup_subtree_ids).transpose()?;
    let mut report = SeedReport::default();
    let mut seeded = Vec::new();
    for socket in inbound_live_sockets(ports, cgroup_ids.as_ref(), Some(program.sessions_fd()))? {
        if tracked_by_storage(&socket) {
            report.already_tracked += 1;
            continue;
        }
        let event = open_request(&socket, ports[&socket.local.port()]);
        match program.sync(&event)? {
            sync_result::APPLIED => {
                report.seeded += 1;
                seeded.push(socket.cookie);
            }
            sync_result::UNCHANGED => report.already_tracked += 1,
            other => log::warn!(
                "could not seed session from {} (sync result {other}: a kernel table is full)",
                socket.remote
            ),
        }
    }
    // A second look undoes two kinds of seeding: a session that closed between
    // the dump and its seeding left a record no close will ever delete; and a
    // session a previous agent's program was accepting as the dump read it (it
    // had read the mirroring flag just before it was set) got its storage too
    // late for the dump, and is counted twice.
    if !seeded.is_empty() {
        let second_look: HashMap<u64, TcpSocket> =
            inbound_live_sockets(ports, cgroup_ids.as_ref(), Some(program.sessions_fd()))?
                .into_iter()
                .map(|s| (s.cookie, s))
                .collect();
        for cookie in seeded {
            let (vanished, double) = match second_look.get(&cookie) {
                None => (true, false),
                Some(socket) => (false, counted_by_storage(socket)),
            };
            if !(vanished || double) {
                continue;
            }
            let event = SessionEvent {
                cookie,
                kind: EVENT_CLOSE,
                ..SessionEvent::default()
            };
            if program.sync(&event)? == sync_result::APPLIED {
                report.seeded -= 1;
                if vanished {
                    report.vanished += 1;
                } else {
                    report.already_tracked += 1;
                }
            }
        }
    }
    Ok(report)
}

/// Whether sock_ops counts `socket` through its own storage.
fn counted_by_storage(socket: &TcpSocket) -> bool {
    socket
        .session
        .is_some_and(|s| s.state == session_state::COUNTED)
}

/// Whether sock_ops saw `socket` accepted (no seeding needed): counted through
/// its storage, or left `UNCOUNTED` by a full table, which the reconciler
/// adopts as an accepted session (sock_ops sees its close: no backstop).
fn tracked_by_storage(socket: &TcpSocket) -> bool {
    socket
        .session
        .is_some_and(|s| s.state == session_state::COUNTED || s.state == session_state::UNCOUNTED)
}

/// The sync request that seeds `socket` as a session of service `slot`.
pub fn open_request(socket: &TcpSocket, slot: u8) -> SessionEvent {
    let (family, addr) = match normalize(socket.remote) {
        IpAddr::V4(v4) => {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, addr)
        }
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    };
    SessionEvent {
        cookie: socket.cookie,
        addr,
        kind: EVENT_OPEN,
        family,
        service: slot,
        _pad: [0; 5],
    }
}

/// A dual-stack listener's IPv4 peers (::ffff:a.b.c.d) count as IPv4.
pub fn normalize(addr: SocketAddr) -> IpAddr {
    addr.ip().to_canonical()
}

/// Inode numbers (cgroup v2 ids) of `root` and every cgroup below it: a program
/// attached to a cgroup also runs for its descendants.
pub fn cgroup_subtree_ids(root: &Path) -> Result<HashSet<u64>, SeedError> {
    let mut ids = HashSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let error = |source| SeedError::Cgroup {
            path: dir.display().to_string(),
            source,
        };
        ids.insert(sock_diag::cgroup_id_of(&dir).map_err(error)?);
        for entry in std::fs::read_dir(&dir).map_err(error)? {
            let entry = entry.map_err(error)?;
            if entry.file_type().map_err(error)?.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use audit_common::{SessionStorage, SocketRecord};

    use super::*;

    fn socket(remote: &str, state: Option<u32>) -> TcpSocket {
        TcpSocket {
            cookie: 1,
            state: tcp_state::ESTABLISHED,
            local: "127.0.0.1:25".parse().unwrap(),
            remote: remote.parse().unwrap(),
            cgroup_id: None,
            uid: 0,
            inode: 1,
            session: state.map(|state| SessionStorage {
                record: SocketRecord::default(),
                state,
                opened_ms: 0,
            }),
        }
    }

    #[test]
    fn sessions_sock_ops_saw_are_not_seeded_but_only_counted_ones_count_double() {
        for (state, tracked, counted) in [
            (None, false, false),
            (Some(session_state::DONE), false, false),
            (Some(session_state::COUNTED), true, true),
            (Some(session_state::UNCOUNTED), true, false),
        ] {
            let s = socket("192.0.2.1:4000", state);
            assert_eq!(tracked_by_storage(&s), tracked, "{state:?}");
            assert_eq!(counted_by_storage(&s), counted, "{state:?}");
        }
    }

    #[test]
    fn v4_mapped_peers_are_seeded_as_ipv4() {
        let request = open_request(&socket("[::ffff:192.0.2.9]:4000", None), 2);
        assert_eq!(request.family, FAMILY_V4);
        assert_eq!(request.addr[..4], [192, 0, 2, 9]);
        assert_eq!(request.service, 2);
        let request = open_request(&socket("[2001:db8::1]:4000", None), 0);
        assert_eq!(request.family, FAMILY_V6);
        assert_eq!(
            normalize("[::1]:25".parse().unwrap()),
            "::1".parse::<IpAddr>().unwrap()
        );
    }
}
