//! Types shared by the kernel program (audit-ebpf) and the agent (audit-user).
//!
//! Every type here crosses the kernel/user boundary as raw bytes, so each is
//! `#[repr(C)]` with explicit padding and a size assertion beside it: a layout
//! change shows up as a compile error on both sides, never as garbled counts.
#![no_std]

use core::mem::size_of;

/// Service slots per IP. A service is a named set of local ports (SMTP = 25,465,587);
/// Momentum names five, so eight leaves room for site-specific ones.
pub const MAX_SERVICES: usize = 8;

/// Bumped whenever a pinned map's key or value layout changes, so a new agent
/// refuses pinned state it would misread instead of reporting wrong counts.
pub const LAYOUT_VERSION: u32 = 5;

/// Address family tags used in records and events (not AF_* values, which differ
/// between the two families' sockaddr layouts and mean nothing to the index).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Names of the maps, shared so the agent never spells one differently.
pub mod map_names {
    pub const LIVE_V4: &str = "LIVE_V4";
    pub const LIVE_V6: &str = "LIVE_V6";
    pub const SOCKETS: &str = "SOCKETS";
    pub const PORT_SERVICES: &str = "PORT_SERVICES";
    pub const SERVICE_NAMES: &str = "SERVICE_NAMES";
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const LAYOUT: &str = "LAYOUT";
    pub const SESSIONS: &str = "SESSIONS";
    pub const CONTROL: &str = "CONTROL";
    pub const KERNEL_LIMITS: &str = "KERNEL_LIMITS";
    pub const PREFIX_COUNTS: &str = "PREFIX_COUNTS";
    pub const EXEMPT_V4: &str = "EXEMPT_V4";
    pub const EXEMPT_V6: &str = "EXEMPT_V6";
    pub const REFUSED_IPS: &str = "REFUSED_IPS";
    pub const PENDING_SYNS: &str = "PENDING_SYNS";
}

/// `PORT_SERVICES` is an array indexed by local port: service slot + 1 for a
/// watched port, `PORT_NOT_WATCHED` for any other.
pub const PORT_NOT_WATCHED: u32 = 0;

/// Names of the programs in the object file.
pub mod program_names {
    pub const SOCK_OPS: &str = "inbound_sock_ops";
    pub const SET_STATE: &str = "inbound_set_state";
    pub const SYNC: &str = "inbound_sync";
    pub const SK_LOOKUP: &str = "inbound_sk_lookup";
}

/// Indexes of the per-CPU `STATS` array: things the kernel side could not do.
pub mod stat {
    /// The ring buffer was full: an event was lost (counts in the maps are still right).
    pub const EVENTS_LOST: u32 = 0;
    /// The per-IP table was full: a session could not be counted.
    pub const IP_TABLE_FULL: u32 = 1;
    /// The socket table was full, or the kernel could not allocate a session's
    /// socket storage: a session could not be tracked (nor counted).
    pub const SOCKET_TABLE_FULL: u32 = 2;
    /// SYNs the sk_lookup program refused (or, in dry run, would have).
    pub const REFUSED: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Live sessions of one remote IP, one counter per service slot.
/// u32 counters keep the value 4-aligned, which both LPM key sizes (8 and 20 bytes)
/// are a multiple of; the kernel stores the value right after the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveCounts {
    pub sessions: [u32; MAX_SERVICES],
}
const _: () = assert!(size_of::<LiveCounts>() == 32);

/// What the kernel remembers of each tracked socket, keyed by its cookie, so the
/// close is counted exactly once and against the same (IP, service) as the open:
/// at close time the socket's local port is already gone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketRecord {
    /// Remote address in network byte order; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
    pub family: u8,
    pub service: u8,
    /// How the session came to be tracked (`record_origin`): that decides which
    /// program will see its close.
    pub origin: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<SocketRecord>() == 24);

/// Values of `SocketRecord::origin`.
pub mod record_origin {
    /// Seen by sock_ops at PASSIVE_ESTABLISHED, which also asked for the socket's
    /// state callbacks: sock_ops sees its close.
    pub const ACCEPTED: u8 = 0;
    /// Seeded by the agent (the session predates the programs): no state
    /// callbacks were asked for, so only the tp_btf backstop sees its close.
    pub const SEEDED: u8 = 1;
}

/// The kernel's per-socket storage (`SESSIONS`, an sk_storage map) of an
/// accepted session: it lives and dies with the socket, so accept and close
/// cost no hash-table insert or delete. The agent reads it through sock_diag.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStorage {
    pub record: SocketRecord,
    /// A `session_state`; the close swaps it to `DONE`, so that however many
    /// times the kernel reports the close, one report uncounts the session.
    pub state: u32,
    /// `bpf_ktime_get_ns()` in ms (CLOCK_MONOTONIC, wrapping every 49 days)
    /// when sock_ops counted the session: its age, for `cut_existing` to cut
    /// the newest (socket cookies come from per-CPU batches, so their order
    /// is not the order of accepts). 0 in storage an older program made.
    pub opened_ms: u32,
}
const _: () = assert!(size_of::<SessionStorage>() == 32);

/// Values of `SessionStorage::state`.
pub mod session_state {
    /// Closed (or never counted): nothing to undo.
    pub const DONE: u32 = 0;
    /// Counted through this storage.
    pub const COUNTED: u32 = 1;
    /// Accepted while the per-IP table was full: not counted yet. The agent
    /// adopts it (`SYNC_ADOPT`) once there is room, and its close then goes
    /// through the `SOCKETS` record that adoption made.
    pub const UNCOUNTED: u32 = 2;
}

/// Indexes of the `CONTROL` array, which the agent writes and the programs read.
pub mod control {
    /// Non-zero while the agent seeds: sock_ops then tracks each accepted
    /// session by a `SOCKETS` record instead of socket storage, which the
    /// seeding's insert-if-absent sees.
    pub const MIRROR_TO_SOCKETS: u32 = 0;
    /// Non-zero while some kernel limit is configured: only then do opens and
    /// closes keep the per-prefix counts (`PREFIX_COUNTS`).
    pub const KERNEL_LIMITS: u32 = 1;
    pub const COUNT: u32 = 4;
}

/// Event kinds on the ring buffer (and operations of the sync program).
pub const EVENT_OPEN: u8 = 1;
pub const EVENT_CLOSE: u8 = 2;
/// A session that predates the agent, seeded by the sync program: live, but not
/// a new connection for the time-windowed counts.
pub const EVENT_SEED: u8 = 4;
/// Sync program only: add `cookie` (as a signed delta) to the (addr, service)
/// count, creating the entry if needed. The agent uses it to heal a per-IP count
/// that differs from the socket records, with an atomic add that cannot clobber
/// the kernel's concurrent updates.
pub const SYNC_ADJUST: u8 = 3;
/// Sync program only: count a session that sock_ops left `UNCOUNTED` (the
/// per-IP table was full), by a `SOCKETS` record of origin `ACCEPTED` (sock_ops
/// sees its close). Reported as an `EVENT_OPEN`: the index never saw it.
pub const SYNC_ADOPT: u8 = 5;

/// One session opened or closed. The same layout is the request the agent feeds
/// to the sync program, so seeding a pre-existing socket goes through exactly the
/// code path (and event) of a live accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionEvent {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub kind: u8,
    pub family: u8,
    pub service: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<SessionEvent>() == 32);

/// Results of the sync program (its return value through BPF_PROG_TEST_RUN).
pub mod sync_result {
    /// The socket was already tracked (open) or not tracked (close): nothing changed.
    pub const UNCHANGED: u32 = 0;
    /// The socket is now tracked and counted (open) or forgotten and uncounted (close).
    pub const APPLIED: u32 = 1;
    /// A table was full; see STATS.
    pub const TABLE_FULL: u32 = 2;
    /// The request was malformed (bad size, family or service slot).
    pub const INVALID: u32 = 3;
}

/// A service name as stored in the pinned `SERVICE_NAMES` array (NUL padded),
/// so slot numbers stay attached to the same names across agent restarts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceName {
    pub bytes: [u8; 32],
}
const _: () = assert!(size_of::<ServiceName>() == 32);

/// Kernel limits (`[[kernel_limits]]`) at most. Each one costs every accept
/// and close on its service a hash lookup and an atomic add, and every SYN on
/// a watched port one more lookup: four keeps the sk_lookup program within a
/// few hundred ns and lets a site limit a /32, a /24 and a /16 at once. The
/// exempt list's value is a bit mask of limits, which four bits hold.
pub const MAX_KERNEL_LIMITS: usize = 4;

/// One kernel limit as the sk_lookup program reads it (`KERNEL_LIMITS[i]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLimit {
    /// Live sessions allowed per prefix; the next SYN is refused.
    pub max: u32,
    /// The service slot the limit watches.
    pub service: u8,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// `limit_flags`.
    pub flags: u8,
}
const _: () = assert!(size_of::<KernelLimit>() == 8);

/// Values of `KernelLimit::flags`.
pub mod limit_flags {
    /// The slot holds a configured limit.
    pub const ACTIVE: u8 = 1;
    /// Count what would be refused, refuse nothing.
    pub const DRY_RUN: u8 = 2;
    /// SYNs admitted whose handshake has not completed (within the pending
    /// window) count against the limit too: the bound on a burst's overshoot.
    pub const COUNT_PENDING: u8 = 4;
}

/// A per-prefix live count's key (`PREFIX_COUNTS`): the client's address
/// masked to the limit's prefix length, and which limit it counts for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrefixKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub limit: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<PrefixKey>() == 24);

/// SYNs a limit's prefix admitted in the current pending window whose
/// handshake has not completed (`PENDING_SYNS`, keyed by `PrefixKey`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSyns {
    pub count: u32,
    /// `bpf_ktime_get_ns() >> PENDING_WINDOW_SHIFT` when the count started.
    pub window: u32,
}
const _: () = assert!(size_of::<PendingSyns>() == 8);

/// The pending window: 2^30 ns, about 1.07 s. A handshake that takes longer
/// than that (or straddles a window's end) is no longer pending.
pub const PENDING_WINDOW_SHIFT: u32 = 30;

/// A refused client's key (`REFUSED_IPS`, an LRU hash of SYN counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RefusedKey {
    pub addr: [u8; 16],
    pub family: u8,
    /// 1: a dry-run limit would have refused it (it was let through).
    pub dry_run: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<RefusedKey>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), made of integer arrays with explicit padding,
    // so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::LiveCounts {}
    unsafe impl aya::Pod for super::SocketRecord {}
    unsafe impl aya::Pod for super::SessionStorage {}
    unsafe impl aya::Pod for super::SessionEvent {}
    unsafe impl aya::Pod for super::ServiceName {}
    unsafe impl aya::Pod for super::KernelLimit {}
    unsafe impl aya::Pod for super::PrefixKey {}
    unsafe impl aya::Pod for super::RefusedKey {}
    unsafe impl aya::Pod for super::PendingSyns {}
}
