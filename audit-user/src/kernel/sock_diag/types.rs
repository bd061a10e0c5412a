//! The public face of the sock_diag client: what a dumped socket is, the TCP
//! states, and what can go wrong.

use std::io;

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
    /// SOCK_DESTROY failed: EPERM without CAP_NET_ADMIN, EOPNOTSUPP on a
    /// kernel built without CONFIG_INET_DIAG_DESTROY.
    #[error("the kernel refused to destroy the socket: {}", io::Error::from_raw_os_error(*errno))]
    Destroy { errno: i32 },
    #[error("malformed sock_diag reply: {what}")]
    Malformed { what: &'static str },
}

impl SockDiagError {
    /// Whether restarting the whole dump can be expected to succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Overrun { .. } | Self::Interrupted { .. })
    }
}
