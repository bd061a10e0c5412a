//! Enumerates the kernel's TCP sockets through `NETLINK_SOCK_DIAG` (inet_diag).
//!
//! The eBPF side only sees connections that are accepted after it is attached, so
//! the agent seeds its counters from this dump at start-up, and the tests and
//! benchmarks use the same dump as the kernel's ground truth.
//!
//! Hand-written on purpose: no crate sends the requests the agent needs, the
//! sk_storage map attribute (`INET_DIAG_REQ_SK_BPF_STORAGES`, which returns
//! each socket's SESSIONS value) and the cgroup id reply attribute. The wire
//! format is parsed from plain byte slices (no casts of kernel memory to Rust
//! structs), so the only `unsafe` is the handful of syscalls.
//!
//! Split by seam: `types` (the public types), `wire` (constants and byte
//! helpers), `request` (building the dump request), `parse` (the reply), and
//! `socket` (the netlink socket and one family's dump), `destroy` (SOCK_DESTROY,
//! aborting one socket); here, the dump loop
//! over both families, inbound selection and cgroup ids.

mod destroy;
mod parse;
mod request;
mod socket;
mod types;
mod wire;

use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
    os::{
        fd::{AsRawFd, BorrowedFd, RawFd},
        unix::fs::MetadataExt,
    },
};

pub use self::destroy::destroy_tcp;
pub use self::types::{state_mask, tcp_state, SockDiagError, TcpSocket, LIVE_STATES};
use self::{
    request::DumpRequest,
    socket::{dump_family, DiagSocket},
};

/// The kernel caps a dump datagram at 32 KiB minus skb overhead; twice that leaves
/// room for any future growth, and a larger datagram is still detected (MSG_TRUNC).
const RECV_BUF_LEN: usize = 64 * 1024;
const DUMP_ATTEMPTS: u32 = 3;

/// Every TCP socket (AF_INET and AF_INET6) whose state is in `states` (a
/// [`state_mask`]).
///
/// Restarts the dump a few times on [transient](SockDiagError::is_transient)
/// failures and drops duplicate cookies: the kernel walks its hash tables in chunks
/// without a snapshot, so a socket that moves while the dump runs may otherwise be
/// seen twice.
pub fn dump_tcp(states: u32) -> Result<Vec<TcpSocket>, SockDiagError> {
    dump(states, None)
}

/// [`dump_tcp`], with each socket's storage in `sessions` (the kernel
/// program's `SESSIONS` sk_storage map) in [`TcpSocket::session`]. The kernel
/// wants CAP_BPF (or CAP_SYS_ADMIN) for it.
pub fn dump_tcp_with_sessions(
    states: u32,
    sessions: BorrowedFd<'_>,
) -> Result<Vec<TcpSocket>, SockDiagError> {
    dump(states, Some(sessions.as_raw_fd()))
}

fn dump(states: u32, sessions: Option<RawFd>) -> Result<Vec<TcpSocket>, SockDiagError> {
    let mut attempt = 1;
    loop {
        let mut sockets = Vec::new();
        let mut seen = HashSet::new();
        let result = visit_tcp(states, sessions, &mut |s: &TcpSocket| {
            if seen.insert(s.cookie) {
                sockets.push(*s);
            }
        });
        match result {
            Ok(()) => return Ok(sockets),
            Err(e) if e.is_transient() && attempt < DUMP_ATTEMPTS => {
                log::warn!("sock_diag dump attempt {attempt} failed, restarting: {e}");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Calls `visit` for each socket without collecting (for very large dumps).
///
/// Unlike [`dump_tcp`] this neither retries nor de-duplicates: on a
/// [transient](SockDiagError::is_transient) error `visit` has already seen part of
/// the sockets, and only the caller knows how to discard them.
pub fn for_each_tcp(states: u32, mut visit: impl FnMut(&TcpSocket)) -> Result<(), SockDiagError> {
    visit_tcp(states, None, &mut visit)
}

fn visit_tcp(
    states: u32,
    sessions: Option<RawFd>,
    visit: &mut dyn FnMut(&TcpSocket),
) -> Result<(), SockDiagError> {
    let sock = DiagSocket::open()?;
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let request = DumpRequest { states, sessions };
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump_family(&sock, family, &request, &mut buf, visit)?;
    }
    Ok(())
}

/// The inbound (accepted) sockets among `sockets`: those whose local port has a
/// listener in `sockets` on the same address or on a wildcard address of the same
/// family (a `::` listener also covers IPv4 and v4-mapped local addresses).
///
/// sock_diag cannot tell accepted from connected sockets, so ownership of the local
/// port is the criterion; pass a dump that includes `LISTEN`. LISTEN sockets and
/// bound-only sockets (CLOSE, BOUND_INACTIVE) are never returned since they are not
/// connections; every other state is, including SYN_RECV (handshakes not accepted
/// yet) and TIME_WAIT, so choose the dump's states accordingly. An outbound
/// connection explicitly bound to a listener's port (SO_REUSEADDR/SO_REUSEPORT) is
/// indistinguishable and counts as inbound.
pub fn inbound<'a>(sockets: &'a [TcpSocket]) -> impl Iterator<Item = &'a TcpSocket> + 'a {
    let mut listeners: HashMap<u16, Vec<IpAddr>> = HashMap::new();
    for s in sockets.iter().filter(|s| s.state == tcp_state::LISTEN) {
        listeners
            .entry(s.local.port())
            .or_default()
            .push(s.local.ip());
    }
    sockets.iter().filter(move |s| {
        !matches!(
            s.state,
            tcp_state::LISTEN | tcp_state::CLOSE | tcp_state::BOUND_INACTIVE
        ) && listeners
            .get(&s.local.port())
            .is_some_and(|ips| ips.iter().any(|&l| listener_covers(l, s.local.ip())))
    })
}

/// The id the kernel reports in `INET_DIAG_CGROUP_ID` for sockets created in the
/// cgroup v2 directory `path`: its inode number.
///
/// Fails with `InvalidInput` if `path` is not on a cgroup2 file system, because a
/// cgroup v1 directory also has an inode number, one that no socket will ever carry.
pub fn cgroup_id_of(path: &std::path::Path) -> std::io::Result<u64> {
    let magic = nix::sys::statfs::statfs(path)?.filesystem_type();
    if magic != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not on a cgroup2 file system (f_type {:#x})",
                path.display(),
                magic.0
            ),
        ));
    }
    Ok(std::fs::metadata(path)?.ino())
}

fn listener_covers(listener: IpAddr, local: IpAddr) -> bool {
    if listener == local || listener.to_canonical() == local.to_canonical() {
        return true;
    }
    match listener {
        IpAddr::V4(l) => l.is_unspecified() && local.is_ipv4(),
        IpAddr::V6(l) if l.is_unspecified() => true,
        // A v6 socket bound to ::ffff:0.0.0.0 accepts every IPv4 peer and nothing else.
        IpAddr::V6(l) => {
            l.to_ipv4_mapped().is_some_and(|v4| v4.is_unspecified())
                && matches!(local.to_canonical(), IpAddr::V4(_))
        }
    }
}

#[cfg(test)]
mod tests;
