//! Enumerates the kernel's TCP sockets through `NETLINK_SOCK_DIAG` (inet_diag).
//!
//! The eBPF side only sees connections that are accepted after it is attached, so
//! the agent seeds its counters from this dump at start-up, and the tests and
//! benchmarks use the same dump as the kernel's ground truth.
//!
//! The wire format is parsed from plain byte slices (no casts of kernel memory to
//! Rust structs), so the only `unsafe` is the handful of syscalls.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use audit_common::SessionStorage;

/// One TCP socket as reported by inet_diag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    /// `idiag_cookie`; the same value `bpf_get_socket_cookie()` returns.
    pub cookie: u64,
    /// Kernel TCP state, see [`tcp_state`].
    pub state: u8,
    pub local: std::net::SocketAddr,
    /// As the kernel reports it: peers of a dual-stack listener stay `::ffff:a.b.c.d`.
    pub remote: std::net::SocketAddr,
    /// `INET_DIAG_CGROUP_ID`: the cgroup v2 the socket was created in; accepted
    /// sockets inherit the listener's, whoever accepts them. Only full sockets carry
    /// attributes, so TIME_WAIT minisockets (orphaned FIN_WAIT2 ones too) and SYN_RECV
    /// request sockets have `None`, as does every socket on kernels built without
    /// CONFIG_SOCK_CGROUP_DATA.
    pub cgroup_id: Option<u64>,
    /// Owner uid; 0 for TIME_WAIT and SYN_RECV sockets, which have no owner.
    pub uid: u32,
    /// Socket inode (`socket:[inode]` in `/proc/*/fd`); 0 when no file refers to it.
    pub inode: u32,
    /// The socket's storage in the kernel program's `SESSIONS` map, when the
    /// dump asked for it ([`dump_tcp_with_sessions`]) and the socket has one.
    pub session: Option<SessionStorage>,
}

/// The TCP states between PASSIVE_ESTABLISHED and TCP_CLOSE: the span in which
/// the kernel program counts a session.
pub const LIVE_STATES: [u8; 6] = [
    tcp_state::ESTABLISHED,
    tcp_state::FIN_WAIT1,
    tcp_state::FIN_WAIT2,
    tcp_state::CLOSE_WAIT,
    tcp_state::LAST_ACK,
    tcp_state::CLOSING,
];

/// TCP states with the kernel's numbering (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    /// A request bit only: request sockets (handshake not yet accepted) are selected
    /// by it or by [`SYN_RECV`] alike, and always reported as `SYN_RECV`.
    pub const NEW_SYN_RECV: u8 = 12;
    /// Bound but neither listening nor connected (Linux >= 6.5). A request bit
    /// only: such sockets are dumped only when it is set, and are reported in state
    /// [`CLOSE`].
    pub const BOUND_INACTIVE: u8 = 13;

    /// Every state a TCP socket can be dumped in.
    pub const ALL: [u8; 13] = [
        ESTABLISHED,
        SYN_SENT,
        SYN_RECV,
        FIN_WAIT1,
        FIN_WAIT2,
        TIME_WAIT,
        CLOSE,
        CLOSE_WAIT,
        LAST_ACK,
        LISTEN,
        CLOSING,
        NEW_SYN_RECV,
        BOUND_INACTIVE,
    ];

    /// The name `ss` prints for `state`, for logs.
    pub fn name(state: u8) -> &'static str {
        match state {
            ESTABLISHED => "ESTAB",
            SYN_SENT => "SYN-SENT",
            SYN_RECV => "SYN-RECV",
            FIN_WAIT1 => "FIN-WAIT-1",
            FIN_WAIT2 => "FIN-WAIT-2",
            TIME_WAIT => "TIME-WAIT",
            CLOSE => "UNCONN",
            CLOSE_WAIT => "CLOSE-WAIT",
            LAST_ACK => "LAST-ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            NEW_SYN_RECV => "NEW-SYN-RECV",
            BOUND_INACTIVE => "BOUND-INACTIVE",
            _ => "UNKNOWN",
        }
    }
}

/// The `idiag_states` bit mask selecting `states`. Values of 32 and above cannot be
/// expressed in the kernel's 32-bit mask and are ignored.
pub fn state_mask(states: &[u8]) -> u32 {
    states
        .iter()
        .filter_map(|&s| 1u32.checked_shl(u32::from(s)))
        .fold(0, |mask, bit| mask | bit)
}

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("cannot open a NETLINK_SOCK_DIAG socket")]
    Socket {
        #[source]
        source: io::Error,
    },
    #[error("cannot send the {family} inet_diag dump request")]
    Send {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot receive the {family} inet_diag dump")]
    Recv {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel failed the {family} inet_diag dump: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { family: &'static str, errno: i32 },
    /// Netlink dropped part of the reply (ENOBUFS); the dump is incomplete and must
    /// be restarted from scratch.
    #[error("the {family} inet_diag dump overran the netlink receive buffer")]
    Overrun { family: &'static str },
    /// The kernel flagged the dump as inconsistent (`NLM_F_DUMP_INTR`); restart it.
    #[error("the {family} inet_diag dump was interrupted by concurrent changes")]
    Interrupted { family: &'static str },
    #[error("malformed sock_diag reply: {what}")]
    Malformed { what: &'static str },
}

impl SockDiagError {
    /// Whether restarting the whole dump can be expected to succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Overrun { .. } | Self::Interrupted { .. })
    }
}

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

/// What a dump asks for, besides the address family.
struct DumpRequest {
    states: u32,
    /// An sk_storage map whose values the kernel adds to each socket's reply.
    sessions: Option<RawFd>,
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
    let magic = fs_magic(path)?;
    if magic != CGROUP2_SUPER_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not on a cgroup2 file system (f_type {magic:#x})",
                path.display()
            ),
        ));
    }
    Ok(std::fs::metadata(path)?.ino())
}

// ---------------------------------------------------------------------------
// Wire format. Values from include/uapi/linux/{netlink,sock_diag,inet_diag}.h.

const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x100 | 0x200; // NLM_F_ROOT | NLM_F_MATCH
/// Strips NLA_F_NESTED and NLA_F_NET_BYTEORDER from `rta_type`.
const NLA_TYPE_MASK: u16 = 0x3fff;
const RTA_HDRLEN: usize = 4;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// Request attribute: the sk_storage maps whose values to report (nested).
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
/// Reply: one nested SK_DIAG_BPF_STORAGE per map holding a value for the socket.
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
/// `struct inet_diag_req_v2`: 4 bytes of selectors, `idiag_states`, 48-byte sockid.
const INET_DIAG_REQ_V2_LEN: usize = 56;
/// `struct inet_diag_msg`: 4 bytes of header, 48-byte sockid, 5 u32 fields.
const INET_DIAG_MSG_LEN: usize = 72;
const REQUEST_LEN: usize = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The kernel caps a dump datagram at 32 KiB minus skb overhead; twice that leaves
/// room for any future growth, and a larger datagram is still detected (MSG_TRUNC).
const RECV_BUF_LEN: usize = 64 * 1024;
const DUMP_ATTEMPTS: u32 = 3;

fn family_name(family: u8) -> &'static str {
    match i32::from(family) {
        libc::AF_INET => "AF_INET",
        libc::AF_INET6 => "AF_INET6",
        _ => "unknown family",
    }
}

fn malformed(what: &'static str) -> SockDiagError {
    SockDiagError::Malformed { what }
}

/// Reads `N` bytes at `at`, or reports `what` as truncated.
fn bytes<const N: usize>(
    buf: &[u8],
    at: usize,
    what: &'static str,
) -> Result<[u8; N], SockDiagError> {
    at.checked_add(N)
        .and_then(|end| buf.get(at..end))
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| malformed(what))
}

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
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

fn build_request(family: u8, request: &DumpRequest, seq: u32) -> Vec<u8> {
    let mut req = vec![0u8; REQUEST_LEN];
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in our port id.
    req[16] = family;
    req[17] = libc::IPPROTO_TCP as u8;
    // idiag_ext stays 0: the cgroup id is sent without being asked for, and the
    // extensions we could ask for (tcp_info, meminfo, ...) would only bloat the dump.
    req[20..24].copy_from_slice(&request.states.to_ne_bytes());
    // The sockid selector is ignored by dumps; leave it zeroed.
    if let Some(fd) = request.sessions {
        // INET_DIAG_REQ_SK_BPF_STORAGES { SK_DIAG_BPF_STORAGE_REQ_MAP_FD: fd }
        let inner = (RTA_HDRLEN + 4) as u16;
        req.extend_from_slice(&(RTA_HDRLEN as u16 + inner).to_ne_bytes());
        req.extend_from_slice(&(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
        req.extend_from_slice(&inner.to_ne_bytes());
        req.extend_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
        req.extend_from_slice(&(fd as u32).to_ne_bytes());
    }
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req
}

/// Walks the attributes in `attrs` (rtattr/nlattr framing), calling `visit`
/// with each one's type (flags stripped) and value.
fn for_each_attr(
    mut attrs: &[u8],
    mut visit: impl FnMut(u16, &[u8]) -> Result<(), SockDiagError>,
) -> Result<(), SockDiagError> {
    // Like the kernel's nla_ok(), a tail shorter than an attribute header is padding.
    while attrs.len() >= RTA_HDRLEN {
        let len = usize::from(u16::from_ne_bytes(bytes(attrs, 0, "rtattr truncated")?));
        let ty = u16::from_ne_bytes(bytes(attrs, 2, "rtattr truncated")?) & NLA_TYPE_MASK;
        if len < RTA_HDRLEN || len > attrs.len() {
            return Err(malformed("rta_len outside the message"));
        }
        visit(ty, &attrs[RTA_HDRLEN..len])?;
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    Ok(())
}

/// The value in an INET_DIAG_SK_BPF_STORAGES attribute. Only one map is ever
/// asked for, so any value is that map's.
fn parse_session_storage(storages: &[u8]) -> Result<Option<SessionStorage>, SockDiagError> {
    let mut found = None;
    for_each_attr(storages, |ty, storage| {
        if ty != SK_DIAG_BPF_STORAGE {
            return Ok(());
        }
        for_each_attr(storage, |ty, value| {
            if ty == SK_DIAG_BPF_STORAGE_MAP_VALUE {
                let raw: [u8; mem::size_of::<SessionStorage>()] = value
                    .try_into()
                    .map_err(|_| malformed("SESSIONS storage value has the wrong size"))?;
                // SAFETY: SessionStorage is repr(C), integers only, no implicit
                // padding: every byte pattern of its size is a valid value.
                found = Some(unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) });
            }
            Ok(())
        })
    })?;
    Ok(found)
}

#[derive(Debug, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

/// Parses one datagram of the reply to dump request `seq`, calling `visit` for each
/// socket, until `NLMSG_DONE`.
fn parse_datagram(
    datagram: &[u8],
    seq: u32,
    family: u8,
    visit: &mut dyn FnMut(&TcpSocket),
) -> Result<Progress, SockDiagError> {
    if datagram.is_empty() {
        return Err(malformed("empty netlink datagram"));
    }
    let name = family_name(family);
    let mut rest = datagram;
    while !rest.is_empty() {
        let len = u32::from_ne_bytes(bytes(rest, 0, "netlink header truncated")?) as usize;
        let ty = u16::from_ne_bytes(bytes(rest, 4, "netlink header truncated")?);
        let flags = u16::from_ne_bytes(bytes(rest, 6, "netlink header truncated")?);
        let msg_seq = u32::from_ne_bytes(bytes(rest, 8, "netlink header truncated")?);
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(malformed("nlmsg_len outside the datagram"));
        }
        let payload = &rest[NLMSG_HDRLEN..len];
        rest = &rest[align4(len).min(rest.len())..];

        if msg_seq != seq {
            log::debug!("sock_diag: skipping netlink message with stale seq {msg_seq}");
            continue;
        }
        if flags & NLM_F_DUMP_INTR != 0 {
            return Err(SockDiagError::Interrupted { family: name });
        }
        match ty {
            SOCK_DIAG_BY_FAMILY => visit(&parse_inet_diag_msg(payload)?),
            NLMSG_DONE => {
                // The payload is the dump callback's final status.
                if let Ok(status) = bytes::<4>(payload, 0, "") {
                    let status = i32::from_ne_bytes(status);
                    if status < 0 {
                        return Err(SockDiagError::Kernel {
                            family: name,
                            errno: status.saturating_neg(),
                        });
                    }
                }
                return Ok(Progress::Done);
            }
            NLMSG_ERROR => {
                let error = i32::from_ne_bytes(bytes(payload, 0, "nlmsgerr truncated")?);
                match error {
                    // An acknowledgement, which a dump does not ask for.
                    0 => continue,
                    e if e < 0 => {
                        return Err(SockDiagError::Kernel {
                            family: name,
                            errno: e.saturating_neg(),
                        })
                    }
                    _ => return Err(malformed("positive errno in nlmsgerr")),
                }
            }
            NLMSG_OVERRUN => return Err(SockDiagError::Overrun { family: name }),
            NLMSG_NOOP => {}
            other => log::debug!("sock_diag: skipping netlink message type {other}"),
        }
    }
    Ok(Progress::More)
}

/// Parses `struct inet_diag_msg` followed by its attributes.
fn parse_inet_diag_msg(msg: &[u8]) -> Result<TcpSocket, SockDiagError> {
    const TRUNC: &str = "inet_diag_msg truncated";
    if msg.len() < INET_DIAG_MSG_LEN {
        return Err(malformed(TRUNC));
    }
    let [family, state, _timer, _retrans] = bytes::<4>(msg, 0, TRUNC)?;
    let sport = u16::from_be_bytes(bytes(msg, 4, TRUNC)?);
    let dport = u16::from_be_bytes(bytes(msg, 6, TRUNC)?);
    let src: [u8; 16] = bytes(msg, 8, TRUNC)?;
    let dst: [u8; 16] = bytes(msg, 24, TRUNC)?;
    let ifindex = u32::from_ne_bytes(bytes(msg, 40, TRUNC)?);
    let cookie_lo = u32::from_ne_bytes(bytes(msg, 44, TRUNC)?);
    let cookie_hi = u32::from_ne_bytes(bytes(msg, 48, TRUNC)?);
    let uid = u32::from_ne_bytes(bytes(msg, 64, TRUNC)?);
    let inode = u32::from_ne_bytes(bytes(msg, 68, TRUNC)?);

    let (local, remote) = match i32::from(family) {
        libc::AF_INET => {
            let ip = |a: [u8; 16]| Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            (
                SocketAddr::V4(SocketAddrV4::new(ip(src), sport)),
                SocketAddr::V4(SocketAddrV4::new(ip(dst), dport)),
            )
        }
        libc::AF_INET6 => {
            // Mirror getsockname(): the bound device is the scope of link-local
            // addresses only.
            let addr = |a: [u8; 16], port| {
                let ip = Ipv6Addr::from(a);
                let scope = if ip.is_unicast_link_local() {
                    ifindex
                } else {
                    0
                };
                SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope))
            };
            (addr(src, sport), addr(dst, dport))
        }
        _ => return Err(malformed("inet_diag_msg with an unknown address family")),
    };

    let mut cgroup_id = None;
    let mut session = None;
    let attrs = &msg[align4(INET_DIAG_MSG_LEN).min(msg.len())..];
    for_each_attr(attrs, |ty, value| {
        match ty {
            INET_DIAG_CGROUP_ID => {
                if value.len() != 8 {
                    return Err(malformed("INET_DIAG_CGROUP_ID is not a u64"));
                }
                cgroup_id = Some(u64::from_ne_bytes(bytes(
                    value,
                    0,
                    "INET_DIAG_CGROUP_ID truncated",
                )?));
            }
            INET_DIAG_SK_BPF_STORAGES => session = parse_session_storage(value)?,
            _ => {}
        }
        Ok(())
    })?;

    Ok(TcpSocket {
        cookie: u64::from(cookie_lo) | u64::from(cookie_hi) << 32,
        state,
        local,
        remote,
        cgroup_id,
        uid,
        inode,
        session,
    })
}

// ---------------------------------------------------------------------------
// The netlink socket.

struct DiagSocket {
    fd: OwnedFd,
}

impl DiagSocket {
    fn open() -> Result<Self, SockDiagError> {
        // SAFETY: socket(2) takes no pointers; a non-negative result is a new file
        // descriptor that nothing else owns, so OwnedFd may take it over.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(SockDiagError::Socket {
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: see above; `fd` is valid and exclusively ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    fn send_dump(&self, family: u8, request: &DumpRequest, seq: u32) -> Result<(), SockDiagError> {
        let name = family_name(family);
        let mut req = build_request(family, request, seq);
        let mut kernel = kernel_addr();
        let mut iov = libc::iovec {
            iov_base: req.as_mut_ptr().cast(),
            iov_len: req.len(),
        };
        // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = (&mut kernel as *mut libc::sockaddr_nl).cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        loop {
            // SAFETY: `msg` points at `kernel`, `iov` and `req`, which all outlive the
            // call and have the lengths stated; the kernel only reads them.
            let sent = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, 0) };
            if sent >= 0 {
                if sent as usize != req.len() {
                    return Err(SockDiagError::Send {
                        family: name,
                        source: io::Error::new(io::ErrorKind::WriteZero, "short netlink send"),
                    });
                }
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(SockDiagError::Send {
                    family: name,
                    source: err,
                });
            }
        }
    }

    /// Receives one datagram into `buf`; `None` if it did not come from the kernel.
    fn recv(&self, buf: &mut [u8], family: u8) -> Result<Option<usize>, SockDiagError> {
        let name = family_name(family);
        loop {
            let mut from = kernel_addr();
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
            let mut msg: libc::msghdr = unsafe { mem::zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_nl).cast();
            msg.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            // SAFETY: `msg` points at `from` and at `buf` through `iov`, both live and
            // writable for the stated lengths; the kernel writes no further.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The socket dropped messages; nothing after this point can be
                    // trusted to be complete.
                    Some(libc::ENOBUFS) => return Err(SockDiagError::Overrun { family: name }),
                    _ => {
                        return Err(SockDiagError::Recv {
                            family: name,
                            source: err,
                        })
                    }
                }
            }
            if msg.msg_flags & libc::MSG_TRUNC != 0 {
                return Err(malformed("datagram larger than the receive buffer"));
            }
            if from.nl_pid != 0 {
                log::debug!("sock_diag: ignoring datagram from port {}", from.nl_pid);
                return Ok(None);
            }
            return Ok(Some(n as usize));
        }
    }
}

fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain integers; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

/// Runs one dump for `family`; returns how many datagrams it took.
fn dump_family(
    sock: &DiagSocket,
    family: u8,
    request: &DumpRequest,
    buf: &mut [u8],
    visit: &mut dyn FnMut(&TcpSocket),
) -> Result<usize, SockDiagError> {
    // A distinct seq per family keeps a stray message of the previous dump from
    // being taken for this one.
    let seq = u32::from(family);
    sock.send_dump(family, request, seq)?;
    let mut datagrams = 0;
    loop {
        let Some(n) = sock.recv(buf, family)? else {
            continue;
        };
        datagrams += 1;
        if parse_datagram(&buf[..n], seq, family, visit)? == Progress::Done {
            return Ok(datagrams);
        }
    }
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statfs is plain integers; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `st` is writable; both outlive the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets.
    Ok(st.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::RawFd;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use tcp_state::{BOUND_INACTIVE, CLOSE, ESTABLISHED, LISTEN, SYN_RECV, TIME_WAIT};

    /// asm-generic value; libc does not export it for every target.
    const SO_COOKIE: libc::c_int = 57;

    fn getsockopt_int<T: Copy + Default>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> T {
        let mut value = T::default();
        let mut len = mem::size_of::<T>() as libc::socklen_t;
        // SAFETY: `value` is writable for `len` bytes and outlives the call.
        let rc =
            unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut T).cast(), &mut len) };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        assert_eq!(len as usize, mem::size_of::<T>());
        value
    }

    fn so_cookie(s: &impl AsRawFd) -> u64 {
        getsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, SO_COOKIE)
    }

    fn v6only(s: &impl AsRawFd) -> bool {
        getsockopt_int::<libc::c_int>(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) != 0
    }

    fn sock_inode(s: &impl AsRawFd) -> u32 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd())).unwrap();
        let link = link.to_str().unwrap();
        link.strip_prefix("socket:[")
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a socket: {link}"))
    }

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    /// A `[::]:0` listener with IPV6_V6ONLY explicitly off, so the test does not
    /// depend on net.ipv6.bindv6only.
    fn dual_stack_listener() -> TcpListener {
        // SAFETY: plain syscall; a non-negative result is a fresh fd we own.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: see above.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let off: libc::c_int = 0;
        // SAFETY: `off` is a readable c_int for the stated length.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&off as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IPV6_V6ONLY: {}", io::Error::last_os_error());
        // SAFETY: all-zero sockaddr_in6 is the unspecified address, port 0.
        let mut addr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_in6 of the stated length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_in6).cast(),
                mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        // SAFETY: plain syscall on an fd we own.
        let rc = unsafe { libc::listen(fd.as_raw_fd(), 128) };
        assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
        TcpListener::from(fd)
    }

    /// Undoes mountinfo's octal escapes (`\040` for a space, ...).
    fn unescape_mountinfo(field: &str) -> String {
        let bytes = field.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let octal = bytes.get(i + 1..i + 4).and_then(|d| {
                let s = std::str::from_utf8(d).ok()?;
                u8::from_str_radix(s, 8).ok()
            });
            match (bytes[i], octal) {
                (b'\\', Some(b)) => {
                    out.push(b);
                    i += 4;
                }
                (b, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    }

    /// This process's cgroup v2 directory: the cgroup2 mount plus the `0::` path,
    /// relative to the mount's root (which differs from `/` inside a cgroup namespace
    /// mounted from outside it).
    fn own_cgroup2_dir() -> PathBuf {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let (root, mountpoint) = mountinfo
            .lines()
            .find_map(|line| {
                let (pre, post) = line.split_once(" - ")?;
                if post.split(' ').next()? != "cgroup2" {
                    return None;
                }
                let fields: Vec<&str> = pre.split(' ').collect();
                Some((
                    unescape_mountinfo(fields.get(3)?),
                    unescape_mountinfo(fields.get(4)?),
                ))
            })
            .expect("no cgroup2 mount in /proc/self/mountinfo");
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let path = cgroups
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("no cgroup v2 line in /proc/self/cgroup");
        let rel = path
            .strip_prefix(root.trim_end_matches('/'))
            .unwrap_or(path);
        PathBuf::from(mountpoint).join(rel.trim_start_matches('/'))
    }

    fn raise_nofile(wanted: u64) -> u64 {
        // SAFETY: all-zero rlimit is valid; getrlimit writes into it.
        let mut lim: libc::rlimit = unsafe { mem::zeroed() };
        // SAFETY: `lim` is writable.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        if lim.rlim_cur < wanted {
            lim.rlim_cur = wanted.min(lim.rlim_max);
            // SAFETY: `lim` is a valid rlimit; raising the soft limit up to the hard
            // one needs no privilege.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        }
        lim.rlim_cur
    }

    fn established(s: &TcpStream, cgroup_id: Option<u64>) -> TcpSocket {
        TcpSocket {
            cookie: so_cookie(s),
            state: ESTABLISHED,
            local: s.local_addr().unwrap(),
            remote: s.peer_addr().unwrap(),
            cgroup_id,
            uid: euid(),
            inode: sock_inode(s),
            session: None,
        }
    }

    fn listening(l: &TcpListener, cgroup_id: Option<u64>) -> TcpSocket {
        let local = l.local_addr().unwrap();
        let any = match local {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        TcpSocket {
            cookie: so_cookie(l),
            state: LISTEN,
            local,
            remote: SocketAddr::new(any, 0),
            cgroup_id,
            uid: euid(),
            inode: sock_inode(l),
            session: None,
        }
    }

    fn sorted(mut v: Vec<TcpSocket>) -> Vec<TcpSocket> {
        v.sort_by_key(|s| s.cookie);
        v
    }

    /// Our sockets: loopback ones touching our (exclusively bound) listener
    /// ports. Only live socket files (inode set): an earlier connection that
    /// used one of these port numbers may linger in TIME_WAIT.
    fn on_ports(sockets: &[TcpSocket], ports: &[u16]) -> Vec<TcpSocket> {
        sorted(
            sockets
                .iter()
                .filter(|s| s.inode != 0)
                .filter(|s| {
                    s.local.ip().to_canonical().is_loopback() || s.local.ip().is_unspecified()
                })
                .filter(|s| ports.contains(&s.local.port()) || ports.contains(&s.remote.port()))
                .copied()
                .collect(),
        )
    }

    fn cookies_in_family(family: i32, states: u32) -> HashSet<u64> {
        let sock = DiagSocket::open().unwrap();
        let mut buf = vec![0u8; RECV_BUF_LEN];
        let mut cookies = HashSet::new();
        let request = DumpRequest {
            states,
            sessions: None,
        };
        dump_family(&sock, family as u8, &request, &mut buf, &mut |s| {
            cookies.insert(s.cookie);
        })
        .unwrap();
        cookies
    }

    #[test]
    fn dump_reports_v4_v6_and_v4_mapped_sessions_exactly() {
        let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l6 = dual_stack_listener();
        assert!(!v6only(&l6));
        let (p4, p6) = (
            l4.local_addr().unwrap().port(),
            l6.local_addr().unwrap().port(),
        );

        let c4 = TcpStream::connect(l4.local_addr().unwrap()).unwrap();
        let (a4, _) = l4.accept().unwrap();
        let c6 = TcpStream::connect((Ipv6Addr::LOCALHOST, p6)).unwrap();
        let (a6, _) = l6.accept().unwrap();
        let cm = TcpStream::connect((Ipv4Addr::LOCALHOST, p6)).unwrap();
        let (am, _) = l6.accept().unwrap();

        let cg = Some(cgroup_id_of(&own_cgroup2_dir()).unwrap());
        let listeners = sorted(vec![listening(&l4, cg), listening(&l6, cg)]);
        let clients = [&c4, &c6, &cm].map(|s| established(s, cg));
        let accepted = [&a4, &a6, &am].map(|s| established(s, cg));
        let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        assert_eq!(accepted[2].local, SocketAddr::new(mapped, p6));
        assert_eq!(accepted[2].remote.ip(), mapped);

        let all = dump_tcp(state_mask(&tcp_state::ALL)).unwrap();
        let mine = on_ports(&all, &[p4, p6]);
        let want = sorted([&listeners[..], &clients, &accepted].concat());
        assert_eq!(mine, want);
        let cookies: HashSet<u64> = mine.iter().map(|s| s.cookie).collect();
        assert_eq!(cookies.len(), want.len());
        assert!(!cookies.contains(&0));

        let inbound_cookies: BTreeSet<u64> = inbound(&all)
            .filter(|s| cookies.contains(&s.cookie))
            .map(|s| s.cookie)
            .collect();
        assert_eq!(inbound_cookies, accepted.iter().map(|s| s.cookie).collect());

        // Sockets of a dual-stack listener are AF_INET6 even with an IPv4 peer.
        let v4 = cookies_in_family(libc::AF_INET, state_mask(&tcp_state::ALL));
        let v6 = cookies_in_family(libc::AF_INET6, state_mask(&tcp_state::ALL));
        assert!(!v4.contains(&accepted[2].cookie) && v6.contains(&accepted[2].cookie));
        assert!(v4.contains(&clients[2].cookie) && !v6.contains(&clients[2].cookie));

        let only_listen = dump_tcp(state_mask(&[LISTEN])).unwrap();
        assert_eq!(on_ports(&only_listen, &[p4, p6]), listeners);
        let only_est = dump_tcp(state_mask(&[ESTABLISHED])).unwrap();
        assert_eq!(
            on_ports(&only_est, &[p4, p6]),
            sorted([clients, accepted].concat())
        );
        assert!(only_est.iter().all(|s| s.state == ESTABLISHED));
        assert_eq!(inbound(&only_est).count(), 0, "inbound needs the listeners");

        drop((c4, c6, cm, a4, a6, am, l4, l6));
        // Each end leaves ESTABLISHED as its own close() returns.
        let est = dump_tcp(state_mask(&[ESTABLISHED, LISTEN])).unwrap();
        assert!(!est.iter().any(|s| cookies.contains(&s.cookie)));

        // The clients closed first, so they end in TIME_WAIT once the servers' FINs
        // are processed (softirq, hence the polling). The minisocket keeps the cookie
        // but has no owner, inode or attributes.
        let client_cookies: BTreeSet<u64> = clients.iter().map(|s| s.cookie).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let tw = dump_tcp(state_mask(&[TIME_WAIT])).unwrap();
            let ours: Vec<&TcpSocket> = tw
                .iter()
                .filter(|s| client_cookies.contains(&s.cookie))
                .collect();
            if ours.len() == client_cookies.len() {
                for s in ours {
                    assert_eq!(
                        (s.state, s.cgroup_id, s.inode, s.uid),
                        (TIME_WAIT, None, 0, 0)
                    );
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "clients not in TIME_WAIT: {ours:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let rest = dump_tcp(state_mask(&tcp_state::ALL)).unwrap();
        assert!(rest
            .iter()
            .filter(|s| cookies.contains(&s.cookie))
            .all(|s| s.state != ESTABLISHED && s.state != LISTEN));
    }

    #[test]
    fn dump_returns_thousands_of_sessions_in_many_datagrams() {
        const WANTED: usize = 2000;
        // Two fds per connection plus headroom for the harness and parallel tests; a
        // hard limit below that shrinks the test rather than failing it.
        const SPARE_FDS: u64 = 128;
        let nofile = raise_nofile(2 * WANTED as u64 + SPARE_FDS);
        let n = WANTED.min((nofile.saturating_sub(SPARE_FDS) / 2) as usize);
        assert!(
            n >= 100,
            "RLIMIT_NOFILE too low for a multi-part dump: {nofile}"
        );
        if n < WANTED {
            eprintln!("RLIMIT_NOFILE {nofile}: testing {n} connections instead of {WANTED}");
        }

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (a, _) = l.accept().unwrap();
            conns.push((so_cookie(&c), so_cookie(&a), c, a));
        }
        let accepted: HashSet<u64> = conns.iter().map(|c| c.1).collect();
        let mut ours: HashSet<u64> = conns.iter().map(|c| c.0).collect();
        ours.extend(&accepted);
        ours.insert(so_cookie(&l));

        let all = dump_tcp(state_mask(&[ESTABLISHED, LISTEN])).unwrap();
        let found: HashSet<u64> = all
            .iter()
            .map(|s| s.cookie)
            .filter(|c| ours.contains(c))
            .collect();
        assert_eq!(found.len(), 2 * n + 1);
        assert_eq!(found, ours);
        let inbound_ours: HashSet<u64> = inbound(&all)
            .map(|s| s.cookie)
            .filter(|c| ours.contains(c))
            .collect();
        assert_eq!(inbound_ours, accepted);

        let mut visited = 0;
        for_each_tcp(state_mask(&[ESTABLISHED]), |s| {
            visited += usize::from(ours.contains(&s.cookie));
        })
        .unwrap();
        assert_eq!(visited, 2 * n);

        let sock = DiagSocket::open().unwrap();
        let mut buf = vec![0u8; RECV_BUF_LEN];
        let request = DumpRequest {
            states: state_mask(&[ESTABLISHED]),
            sessions: None,
        };
        let datagrams =
            dump_family(&sock, libc::AF_INET as u8, &request, &mut buf, &mut |_| {}).unwrap();
        // Each socket costs well over 80 bytes and a datagram holds at most ~32 KiB.
        assert!(
            datagrams >= 2 * n * 80 / 32768,
            "only {datagrams} datagrams"
        );
    }

    #[test]
    fn bound_only_sockets_need_the_bound_inactive_bit() {
        // SAFETY: plain syscall; a non-negative result is a fresh fd we own.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: see above.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero sockaddr_in is 0.0.0.0:0; we set loopback below.
        let mut addr: libc::sockaddr_in = unsafe { mem::zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        // SAFETY: `addr` is a valid sockaddr_in of the stated length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_in).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        let cookie = so_cookie(&fd);

        let bound = dump_tcp(state_mask(&[BOUND_INACTIVE])).unwrap();
        let me = bound
            .iter()
            .find(|s| s.cookie == cookie)
            .expect("bound socket not dumped");
        // Asked for as BOUND_INACTIVE, reported as what it is: CLOSE.
        assert_eq!(me.state, CLOSE);
        assert_eq!(me.local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_ne!(me.local.port(), 0);
        let connections = dump_tcp(state_mask(&[ESTABLISHED, CLOSE, LISTEN])).unwrap();
        assert!(!connections.iter().any(|s| s.cookie == cookie));
    }

    #[test]
    fn pending_handshakes_are_syn_recv_request_sockets() {
        use std::io::Write;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        // With TCP_DEFER_ACCEPT the server ignores the bare final ACK, so the
        // connection stays a request socket until the client sends data.
        let secs: libc::c_int = 30;
        // SAFETY: `secs` is a readable c_int for the stated length.
        let rc = unsafe {
            libc::setsockopt(
                l.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&secs as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "TCP_DEFER_ACCEPT: {}", io::Error::last_os_error());
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let client = c.local_addr().unwrap();
        let pending = |s: &&TcpSocket| s.local == l.local_addr().unwrap() && s.remote == client;

        let dump = dump_tcp(state_mask(&[SYN_RECV, LISTEN])).unwrap();
        let req = *dump
            .iter()
            .find(pending)
            .expect("request socket not dumped");
        assert_eq!(req.state, SYN_RECV);
        assert_ne!(req.cookie, 0);
        assert_eq!((req.cgroup_id, req.inode, req.uid), (None, 0, 0));
        assert!(inbound(&dump).any(|s| s.cookie == req.cookie));
        // Either request bit selects request sockets; they are always shown as SYN_RECV.
        let by_new_bit = dump_tcp(state_mask(&[tcp_state::NEW_SYN_RECV])).unwrap();
        assert_eq!(by_new_bit.iter().find(pending), Some(&req));

        c.write_all(b"x").unwrap();
        let (a, _) = l.accept().unwrap();
        // The full socket inherits the request socket's cookie.
        assert_eq!(so_cookie(&a), req.cookie);
        let dump = dump_tcp(state_mask(&[ESTABLISHED])).unwrap();
        let child = dump.iter().find(|s| s.cookie == req.cookie).unwrap();
        assert_eq!(child.remote, client);
        assert!(child.cgroup_id.is_some());
    }

    #[test]
    fn std_v6_wildcard_listener_follows_bindv6only() {
        let l = TcpListener::bind("[::]:0").unwrap();
        let sysctl = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").unwrap();
        assert_eq!(v6only(&l), sysctl.trim() == "1");
    }

    #[test]
    fn cgroup_id_of_rejects_non_cgroup2_paths() {
        let err = cgroup_id_of(Path::new("/proc")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(cgroup_id_of(Path::new("/nonexistent/cgroup")).is_err());
        let own = own_cgroup2_dir();
        assert_eq!(
            cgroup_id_of(&own).unwrap(),
            std::fs::metadata(&own).unwrap().ino()
        );
    }

    #[test]
    fn state_mask_sets_one_bit_per_state() {
        assert_eq!(state_mask(&[]), 0);
        assert_eq!(state_mask(&[LISTEN]), 1 << 10);
        assert_eq!(state_mask(&[ESTABLISHED, SYN_RECV, ESTABLISHED]), 0b1010);
        assert_eq!(state_mask(&[40]), 0);
        assert_eq!(state_mask(&tcp_state::ALL), 0x3ffe);
    }

    fn sock(state: u8, local: &str, remote: &str) -> TcpSocket {
        TcpSocket {
            cookie: 0,
            state,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            cgroup_id: None,
            uid: 0,
            inode: 0,
            session: None,
        }
    }

    #[test]
    fn inbound_matches_listener_address_rules() {
        let sockets = [
            sock(LISTEN, "10.0.0.1:80", "0.0.0.0:0"),
            sock(LISTEN, "0.0.0.0:443", "0.0.0.0:0"),
            sock(LISTEN, "[::]:8080", "[::]:0"),
            sock(LISTEN, "[::ffff:0.0.0.0]:9090", "[::]:0"),
            sock(LISTEN, "[fd00::1]:22", "[::]:0"),
            sock(ESTABLISHED, "10.0.0.1:80", "1.2.3.4:5000"), // 5: same address
            sock(ESTABLISHED, "10.0.0.2:80", "1.2.3.4:5000"), // other address
            sock(ESTABLISHED, "10.0.0.2:443", "1.2.3.4:5000"), // 7: v4 wildcard
            sock(ESTABLISHED, "[fd00::2]:443", "[fd00::9]:5000"), // v4 wildcard, v6 local
            sock(ESTABLISHED, "[fd00::2]:8080", "[fd00::9]:5000"), // 9: v6 wildcard
            sock(ESTABLISHED, "[::ffff:10.0.0.1]:8080", "[::ffff:1.2.3.4]:1"), // 10
            sock(ESTABLISHED, "10.0.0.1:8080", "1.2.3.4:1"),  // 11: v6 wildcard, v4
            sock(ESTABLISHED, "[::ffff:10.0.0.1]:9090", "[::ffff:1.2.3.4]:1"), // 12
            sock(ESTABLISHED, "[fd00::2]:9090", "[fd00::9]:1"), // v4-only wildcard
            sock(ESTABLISHED, "[fd00::1]:22", "[fd00::9]:1"), // 14
            sock(TIME_WAIT, "[fd00::1]:22", "[fd00::9]:2"),   // 15
            sock(SYN_RECV, "[fd00::1]:22", "[fd00::9]:3"),    // 16
            sock(CLOSE, "[fd00::1]:22", "[::]:0"),            // bound only
            sock(BOUND_INACTIVE, "10.0.0.1:80", "0.0.0.0:0"), // bound only
            sock(ESTABLISHED, "10.0.0.1:33000", "10.0.0.1:80"), // client side
        ];
        let got: Vec<usize> = inbound(&sockets)
            .map(|s| sockets.iter().position(|x| std::ptr::eq(x, s)).unwrap())
            .collect();
        assert_eq!(got, [5, 7, 9, 10, 11, 12, 14, 15, 16]);
        assert_eq!(inbound(&sockets[5..]).count(), 0);
    }

    // --- wire-format parsing -------------------------------------------------

    const SEQ: u32 = 7;

    fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align4(m.len()), 0);
        m
    }

    fn rta(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((RTA_HDRLEN + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(align4(a.len()), 0);
        a
    }

    #[allow(clippy::too_many_arguments)]
    fn diag_msg(
        family: i32,
        state: u8,
        src: SocketAddr,
        dst: SocketAddr,
        ifindex: u32,
        cookie: u64,
        attrs: &[u8],
    ) -> Vec<u8> {
        let addr = |a: SocketAddr| -> [u8; 16] {
            let mut b = [0u8; 16];
            match a.ip() {
                IpAddr::V4(ip) => b[..4].copy_from_slice(&ip.octets()),
                IpAddr::V6(ip) => b = ip.octets(),
            }
            b
        };
        let mut m = vec![family as u8, state, 0, 0];
        m.extend_from_slice(&src.port().to_be_bytes());
        m.extend_from_slice(&dst.port().to_be_bytes());
        m.extend_from_slice(&addr(src));
        m.extend_from_slice(&addr(dst));
        m.extend_from_slice(&ifindex.to_ne_bytes());
        m.extend_from_slice(&(cookie as u32).to_ne_bytes());
        m.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        for field in [0u32, 0, 0, 1000, 4242] {
            m.extend_from_slice(&field.to_ne_bytes());
        }
        assert_eq!(m.len(), INET_DIAG_MSG_LEN);
        m.extend_from_slice(attrs);
        m
    }

    fn parse(datagram: &[u8]) -> Result<(Progress, Vec<TcpSocket>), SockDiagError> {
        let mut seen = Vec::new();
        let progress = parse_datagram(datagram, SEQ, libc::AF_INET6 as u8, &mut |s| seen.push(*s))?;
        Ok((progress, seen))
    }

    fn v4_msg(attrs: &[u8]) -> Vec<u8> {
        diag_msg(
            libc::AF_INET,
            ESTABLISHED,
            "10.1.2.3:443".parse().unwrap(),
            "192.0.2.7:51000".parse().unwrap(),
            0,
            0x1122_3344_5566_7788,
            attrs,
        )
    }

    fn session_storages(value: &[u8]) -> Vec<u8> {
        // INET_DIAG_SK_BPF_STORAGES { SK_DIAG_BPF_STORAGE { PAD, MAP_ID, MAP_VALUE } },
        // with the nested flag bits the kernel sets.
        let storage = [
            rta(1, &[]),
            rta(2, &7u32.to_ne_bytes()),
            rta(SK_DIAG_BPF_STORAGE_MAP_VALUE, value),
        ]
        .concat();
        rta(
            INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED,
            &rta(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &storage),
        )
    }

    #[test]
    fn parses_a_sockets_session_storage() {
        let stored = SessionStorage {
            record: audit_common::SocketRecord {
                addr: [192, 0, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                family: audit_common::FAMILY_V4,
                service: 3,
                origin: audit_common::record_origin::ACCEPTED,
                _pad: [0; 5],
            },
            state: audit_common::session_state::COUNTED,
            _pad: 0,
        };
        // SAFETY: SessionStorage is repr(C) plain integers without implicit padding.
        let value: [u8; 32] = unsafe { mem::transmute(stored) };
        let attrs = [
            session_storages(&value),
            rta(INET_DIAG_CGROUP_ID, &77u64.to_ne_bytes()),
        ]
        .concat();
        let (_, seen) = parse(&nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &v4_msg(&attrs))).unwrap();
        assert_eq!(seen[0].session, Some(stored));
        assert_eq!(seen[0].cgroup_id, Some(77));

        let short = session_storages(&value[..24]);
        assert!(matches!(
            parse(&nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &v4_msg(&short))),
            Err(SockDiagError::Malformed { .. })
        ));
    }

    #[test]
    fn a_dump_request_names_the_sessions_map_only_when_asked() {
        let plain = build_request(
            libc::AF_INET as u8,
            &DumpRequest {
                states: 2,
                sessions: None,
            },
            1,
        );
        assert_eq!(plain.len(), REQUEST_LEN);
        let with_map = build_request(
            libc::AF_INET as u8,
            &DumpRequest {
                states: 2,
                sessions: Some(9),
            },
            1,
        );
        assert_eq!(with_map.len(), REQUEST_LEN + 12);
        assert_eq!(with_map[0..4], ((REQUEST_LEN + 12) as u32).to_ne_bytes());
        assert_eq!(with_map[..REQUEST_LEN][4..], plain[4..]);
        let expected = [
            12u16.to_ne_bytes(),
            (INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes(),
            8u16.to_ne_bytes(),
            SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes(),
        ]
        .concat();
        assert_eq!(with_map[REQUEST_LEN..REQUEST_LEN + 8], expected[..]);
        assert_eq!(with_map[REQUEST_LEN + 8..], 9u32.to_ne_bytes());
    }

    fn done(status: i32) -> Vec<u8> {
        nlmsg(NLMSG_DONE, 0, SEQ, &status.to_ne_bytes())
    }

    #[test]
    fn parses_messages_attributes_and_done() {
        // INET_DIAG_SHUTDOWN, a 4-byte INET_DIAG_PAD as 64-bit-strict arches emit, then
        // the cgroup id with the nested/byteorder flag bits that must be masked off.
        let attrs = [
            rta(8, &[0]),
            rta(14, &[]),
            rta(INET_DIAG_CGROUP_ID, &77u64.to_ne_bytes()),
        ]
        .concat();
        let stale = nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ + 1, &v4_msg(&[]));
        let dgram = [
            stale,
            nlmsg(NLMSG_NOOP, 0, SEQ, &[]),
            nlmsg(NLMSG_ERROR, 0, SEQ, &0i32.to_ne_bytes()),
            nlmsg(SOCK_DIAG_BY_FAMILY, 0x2, SEQ, &v4_msg(&attrs)),
        ]
        .concat();
        let (progress, seen) = parse(&dgram).unwrap();
        assert_eq!(progress, Progress::More);
        assert_eq!(
            seen,
            [TcpSocket {
                cookie: 0x1122_3344_5566_7788,
                state: ESTABLISHED,
                local: "10.1.2.3:443".parse().unwrap(),
                remote: "192.0.2.7:51000".parse().unwrap(),
                cgroup_id: Some(77),
                uid: 1000,
                inode: 4242,
                session: None,
            }]
        );

        let flagged = rta(INET_DIAG_CGROUP_ID | 0x8000, &5u64.to_ne_bytes());
        let v6 = diag_msg(
            libc::AF_INET6,
            TIME_WAIT,
            "[fe80::1]:22".parse().unwrap(),
            "[fe80::2]:40000".parse().unwrap(),
            3,
            9,
            &flagged,
        );
        let dgram = [
            nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &v6),
            done(0),
            v4_msg(&[]),
        ]
        .concat();
        let (progress, seen) = parse(&dgram).unwrap();
        assert_eq!(progress, Progress::Done);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].local, "[fe80::1%3]:22".parse().unwrap());
        assert_eq!(seen[0].remote, "[fe80::2%3]:40000".parse().unwrap());
        assert_eq!(seen[0].cgroup_id, Some(5));

        // Old kernels end a dump with an empty NLMSG_DONE.
        assert_eq!(
            parse(&nlmsg(NLMSG_DONE, 0, SEQ, &[])).unwrap().0,
            Progress::Done
        );
    }

    #[test]
    fn reports_kernel_errors_and_incomplete_dumps() {
        let errno = |r: Result<_, SockDiagError>| match r {
            Err(SockDiagError::Kernel { errno, .. }) => errno,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            errno(parse(&nlmsg(
                NLMSG_ERROR,
                0,
                SEQ,
                &(-libc::EPERM).to_ne_bytes()
            ))),
            libc::EPERM
        );
        assert_eq!(errno(parse(&done(-libc::ENOENT))), libc::ENOENT);
        assert!(matches!(
            parse(&nlmsg(
                SOCK_DIAG_BY_FAMILY,
                NLM_F_DUMP_INTR,
                SEQ,
                &v4_msg(&[])
            )),
            Err(SockDiagError::Interrupted { .. })
        ));
        assert!(matches!(
            parse(&nlmsg(NLMSG_OVERRUN, 0, SEQ, &[])),
            Err(SockDiagError::Overrun { .. })
        ));
        assert!(SockDiagError::Overrun { family: "AF_INET" }.is_transient());
        assert!(!SockDiagError::Kernel {
            family: "AF_INET",
            errno: 1
        }
        .is_transient());
    }

    #[test]
    fn rejects_malformed_replies() {
        let what = |dgram: &[u8]| match parse(dgram) {
            Err(SockDiagError::Malformed { what }) => what,
            other => panic!("{other:?}"),
        };
        let ok = nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &v4_msg(&[]));
        assert_eq!(what(&[]), "empty netlink datagram");
        assert_eq!(what(&ok[..10]), "netlink header truncated");
        assert_eq!(what(&ok[..40]), "nlmsg_len outside the datagram");
        let mut short_len = ok.clone();
        short_len[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(what(&short_len), "nlmsg_len outside the datagram");
        let msg = v4_msg(&[]);
        assert_eq!(
            what(&nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &msg[..60])),
            "inet_diag_msg truncated"
        );
        let mut bad_family = msg.clone();
        bad_family[0] = libc::AF_UNIX as u8;
        assert_eq!(
            what(&nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &bad_family)),
            "inet_diag_msg with an unknown address family"
        );
        let bad_rta = |attr: &[u8]| what(&nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &v4_msg(attr)));
        assert_eq!(bad_rta(&[2, 0, 8, 0]), "rta_len outside the message");
        assert_eq!(
            bad_rta(&[64, 0, 8, 0, 0, 0, 0, 0]),
            "rta_len outside the message"
        );
        assert_eq!(
            bad_rta(&rta(INET_DIAG_CGROUP_ID, &[1, 2, 3, 4])),
            "INET_DIAG_CGROUP_ID is not a u64"
        );
        assert_eq!(
            what(&nlmsg(NLMSG_ERROR, 0, SEQ, &[0, 0])),
            "nlmsgerr truncated"
        );
        assert_eq!(
            what(&nlmsg(NLMSG_ERROR, 0, SEQ, &5i32.to_ne_bytes())),
            "positive errno in nlmsgerr"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_inet_diag_payloads_never_panic(
            family in prop_oneof![Just(libc::AF_INET as u8), Just(libc::AF_INET6 as u8), any::<u8>()],
            mut payload in proptest::collection::vec(any::<u8>(), 0..400),
            ty in prop_oneof![Just(SOCK_DIAG_BY_FAMILY), Just(NLMSG_ERROR), Just(NLMSG_DONE), any::<u16>()],
        ) {
            if let Some(f) = payload.first_mut() {
                *f = family;
            }
            let _ = parse(&nlmsg(ty, 0, SEQ, &payload));
        }
    }
}
