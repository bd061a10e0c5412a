//! Kernel side of inbound-audit: counts live inbound TCP sessions per remote IP.
//!
//! - `inbound_sock_ops` (cgroup sock_ops): on PASSIVE_ESTABLISHED for a configured
//!   local port, keeps the session in the socket's own storage, counts it, and
//!   asks for state callbacks; on the move to TCP_CLOSE, uncounts it.
//! - `inbound_set_state` (tp_btf inet_sock_set_state): the backstop for closes
//!   sock_ops never sees (sockets seeded by the agent from sock_diag). It runs
//!   for every TCP state change on the host, so the agent detaches it as soon as
//!   no seeded session remains.
//! - `inbound_sync` (XDP, never attached): run by the agent through
//!   BPF_PROG_TEST_RUN to seed or forget a socket with the same atomic code path.
//!
//! - `inbound_sk_lookup` (sk_lookup, `refusal`): refuses the SYN of a session
//!   over a kernel limit; attached to the network namespace only while some
//!   limit is configured.
//!
//! A seeded session (and one accepted while the agent seeds) has a record in
//! `SOCKETS`, keyed by cookie: its close is uncounted only by whoever deletes
//! that record, so however many of these programs see the close, it counts
//! once. Any other accepted session lives in `SESSIONS`, the socket's own
//! storage, which only sock_ops touches: no hash-table insert or delete per
//! connection, and the storage goes away with the socket.
//!
//! A session accepted while the per-IP table is full keeps its storage, marked
//! `UNCOUNTED`: the agent, watching `STATS`, collects the zero entries that
//! hold the table and adopts it through the sync program. Nothing here logs per
//! session: `STATS` counts what could not be done, and the agent logs once per
//! interval.
//!
//! About 630 lines: one object holds every program and the maps they share,
//! and the verifier wants their helpers inlined beside them.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use audit_common::{
    control, record_origin, session_state, stat, sync_result, LiveCounts, ServiceName,
    SessionEvent, SessionStorage, SocketRecord, EVENT_CLOSE, EVENT_OPEN, EVENT_SEED, FAMILY_V4,
    FAMILY_V6, MAX_SERVICES, PORT_NOT_WATCHED, SYNC_ADJUST, SYNC_ADOPT,
};
use aya_ebpf::{
    bindings::{
        bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock, bpf_sock_ops, BPF_NOEXIST,
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE,
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, generated::bpf_sk_storage_get},
    macros::{btf_tracepoint, map, sock_ops, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, SockOpsContext, XdpContext},
};

mod refusal;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const MAX_TRACKED_IPS: u32 = 1 << 20;
const MAX_TRACKED_SOCKETS: u32 = 1 << 20;
const PORTS: u32 = 1 << 16;
/// The agent sets the real size (`event_ring_bytes`) when it creates the map.
const EVENTS_BYTES: u32 = 4 << 20;
/// Bytes one event takes in the ring: its 8-byte header plus the event, 8-aligned.
const RING_RECORD_BYTES: u64 = (8 + core::mem::size_of::<SessionEvent>() as u64).div_ceil(8) * 8;
/// Map flag: allocate entries on use, so an idle agent costs no kernel memory.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "LIVE_V4")]
static LIVE_V4: LpmTrie<[u8; 4], LiveCounts> = LpmTrie::pinned(MAX_TRACKED_IPS, 0);

#[map(name = "LIVE_V6")]
static LIVE_V6: LpmTrie<[u8; 16], LiveCounts> = LpmTrie::pinned(MAX_TRACKED_IPS, 0);

#[map(name = "SOCKETS")]
static SOCKETS: HashMap<u64, SocketRecord> =
    HashMap::pinned(MAX_TRACKED_SOCKETS, BPF_F_NO_PREALLOC);

/// Indexed by local port (host order): service slot + 1, or 0 for a port not
/// watched. An array, not a hash: the verifier turns its lookup into an address
/// computation, and every accept in the cgroup (watched port or not) pays it.
#[map(name = "PORT_SERVICES")]
static PORT_SERVICES: Array<u32> = Array::pinned(PORTS, 0);

/// Slot → service name. Only the agent reads and writes it; it lives here so that
/// it is pinned with the counts it gives meaning to.
#[map(name = "SERVICE_NAMES")]
static SERVICE_NAMES: Array<ServiceName> = Array::pinned(MAX_SERVICES as u32, 0);

/// [0]: layout version of the pinned state (see audit_common::LAYOUT_VERSION).
#[map(name = "LAYOUT")]
static LAYOUT: Array<u32> = Array::pinned(4, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

#[map(name = "CONTROL")]
static CONTROL: Array<u32> = Array::pinned(control::COUNT, 0);

/// A BTF map definition in libbpf's layout (sk_storage maps need BTF for their
/// key and value). aya-ebpf's `SkStorage` has no `pinning` field, and the
/// storage must outlive the agent like every other map: sockets keep theirs
/// across agent restarts.
#[repr(C)]
pub struct SessionStorageMap {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SessionStorage,
    /// sk_storage maps are sized by the sockets that exist: 0 entries, no prealloc.
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    /// LIBBPF_PIN_BY_NAME.
    pinning: *const [i32; 1],
}

// SAFETY: the fields are placeholders the loader reads as BTF; never dereferenced.
unsafe impl Sync for SessionStorageMap {}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "SESSIONS")]
static SESSIONS: SessionStorageMap = SessionStorageMap {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
    pinning: core::ptr::null(),
};

#[sock_ops]
pub fn inbound_sock_ops(ctx: SockOpsContext) -> u32 {
    match try_sock_ops(&ctx) {
        Ok(()) | Err(()) => 1,
    }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inbound_set_state(ctx: BtfTracePointContext) -> u32 {
    match try_set_state(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[xdp]
pub fn inbound_sync(ctx: XdpContext) -> u32 {
    match try_sync(&ctx) {
        Ok(result) => result,
        Err(()) => sync_result::INVALID,
    }
}

/// The fields of an accepted socket that the open path needs.
struct AcceptedFields {
    family: u32,
    remote_ip4: u32,
    remote_ip6: [u32; 4],
    local_port: u32,
    cb_flags: u32,
    sk: *mut bpf_sock,
}

fn read_accepted(ops: *const bpf_sock_ops) -> AcceptedFields {
    // Every field is read unconditionally and volatile: otherwise LLVM merges the
    // IPv4 and IPv6 loads into one load through a computed ctx pointer, which the
    // verifier rejects ("dereference of modified ctx ptr"). Only the open path
    // reads them: each is several instructions once the verifier rewrites it,
    // and the other seven invocations per connection need none of them.
    // SAFETY: `ops` is the context pointer the kernel passed to this program.
    unsafe {
        AcceptedFields {
            family: core::ptr::read_volatile(&(*ops).family),
            remote_ip4: core::ptr::read_volatile(&(*ops).remote_ip4),
            remote_ip6: [
                core::ptr::read_volatile(&(*ops).remote_ip6[0]),
                core::ptr::read_volatile(&(*ops).remote_ip6[1]),
                core::ptr::read_volatile(&(*ops).remote_ip6[2]),
                core::ptr::read_volatile(&(*ops).remote_ip6[3]),
            ],
            local_port: core::ptr::read_volatile(&(*ops).local_port),
            cb_flags: core::ptr::read_volatile(&(*ops).bpf_sock_ops_cb_flags),
            sk: core::ptr::read_volatile(&(*ops).__bindgen_anon_2.sk),
        }
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    // SAFETY: `ops` is the context pointer the kernel passed to this program.
    let op = unsafe { core::ptr::read_volatile(&(*ctx.ops).op) };
    match op {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(ctx),
        BPF_SOCK_OPS_STATE_CB => {
            // SAFETY: as above; args[1] of STATE_CB is the new state.
            let new_state =
                unsafe { core::ptr::read_volatile(&(*ctx.ops).__bindgen_anon_1.args[1]) };
            if new_state != BPF_TCP_CLOSE {
                return Ok(());
            }
            on_close(ctx)
        }
        _ => Ok(()),
    }
}

/// The session's storage on `sk`, created from `init` when given and absent.
fn session_storage(sk: *mut bpf_sock, init: Option<&SessionStorage>) -> *mut SessionStorage {
    let (value, flags) = match init {
        Some(init) => (
            init as *const SessionStorage as *mut core::ffi::c_void,
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        ),
        None => (core::ptr::null_mut(), 0),
    };
    // SAFETY: the map is SESSIONS (an sk_storage map), `sk` a non-null socket
    // from the context, `value` null or a full SessionStorage.
    unsafe {
        bpf_sk_storage_get(
            &SESSIONS as *const SessionStorageMap as *mut core::ffi::c_void,
            sk.cast(),
            value,
            flags,
        )
    }
    .cast()
}

fn on_close(ctx: &SockOpsContext) -> Result<(), ()> {
    // SAFETY: `ops` is the context pointer the kernel passed to this program.
    let sk = unsafe { core::ptr::read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    // SAFETY: the sock_ops context is a valid argument for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let storage = if sk.is_null() {
        core::ptr::null_mut()
    } else {
        session_storage(sk, None)
    };
    if storage.is_null() {
        // Accepted while the agent seeded (a SOCKETS record and no storage), or
        // state callbacks asked for by a program whose storage map was cleaned
        // up since (the session may have been seeded again).
        return forget(cookie).map(|_| ());
    }
    // SAFETY: `storage` is this socket's storage, valid for this invocation;
    // the swap makes a repeated close report a no-op.
    let before = unsafe {
        core::intrinsics::atomic_xchg::<u32, { core::intrinsics::AtomicOrdering::SeqCst }>(
            core::ptr::addr_of_mut!((*storage).state),
            session_state::DONE,
        )
    };
    if before == session_state::UNCOUNTED {
        // Counted only if the agent adopted it, by a SOCKETS record: whoever
        // deletes that record uncounts it (nothing happens if never adopted).
        return forget(cookie).map(|_| ());
    }
    if before != session_state::COUNTED {
        return Ok(());
    }
    // SAFETY: as above; the record is copied out.
    let record = unsafe { (*storage).record };
    uncount(cookie, &record)
}

fn on_passive_established(ctx: &SockOpsContext) -> Result<(), ()> {
    let fields = read_accepted(ctx.ops);
    // local_port is in host order, below 65536.
    let service = match PORT_SERVICES.get(fields.local_port) {
        Some(&watched) if watched != PORT_NOT_WATCHED => watched - 1,
        _ => return Ok(()),
    };
    let (family, addr) = match fields.family {
        AF_INET => (FAMILY_V4, v4_bytes(fields.remote_ip4)),
        AF_INET6 => remote_ip6(fields.remote_ip6),
        _ => return Ok(()),
    };
    if fields.sk.is_null() {
        return Ok(());
    }
    // SAFETY: the sock_ops context is a valid argument for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let mirror = CONTROL
        .get(control::MIRROR_TO_SOCKETS)
        .is_some_and(|&flag| flag != 0);
    let tracked = if mirror {
        // A SOCKETS record, which the seeding's insert-if-absent finds, and
        // which the close finds in turn: the socket gets no storage.
        match track(
            EVENT_OPEN,
            cookie,
            family,
            addr,
            service,
            record_origin::ACCEPTED,
        ) {
            sync_result::APPLIED => true,
            // Left to the agent, which counts it once there is room.
            sync_result::TABLE_FULL => park_uncounted(fields.sk, family, addr, service),
            _ => false,
        }
    } else {
        open_session(fields.sk, cookie, family, addr, service)
    };
    // Counted, or left uncounted for the agent: either way the close matters.
    if tracked {
        // Without this flag the kernel never calls us back when the socket closes.
        let _ = ctx.set_cb_flags((fields.cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
    Ok(())
}

/// Marks an accepted session that a full table kept from being counted, in
/// its socket's storage, for the agent to adopt once there is room.
fn park_uncounted(sk: *mut bpf_sock, family: u8, addr: [u8; 16], service: u32) -> bool {
    if service as usize >= MAX_SERVICES {
        return false;
    }
    let init = SessionStorage {
        record: session_record(family, addr, service, record_origin::ACCEPTED),
        state: session_state::UNCOUNTED,
        opened_ms: now_ms(),
    };
    let storage = session_storage(sk, Some(&init));
    if storage.is_null() {
        bump_stat(stat::SOCKET_TABLE_FULL);
        return false;
    }
    // SAFETY: `storage` is this socket's storage, valid for this invocation;
    // storage that existed already (from an earlier program) is set too.
    unsafe { (*storage).state = session_state::UNCOUNTED };
    true
}

/// Counts an accepted session through the socket's own storage; a session the
/// per-IP table had no room for is kept there `UNCOUNTED`. False when the
/// socket could not get storage (nothing to track).
fn open_session(sk: *mut bpf_sock, cookie: u64, family: u8, addr: [u8; 16], service: u32) -> bool {
    if service as usize >= MAX_SERVICES {
        return false;
    }
    let init = SessionStorage {
        record: session_record(family, addr, service, record_origin::ACCEPTED),
        state: session_state::COUNTED,
        opened_ms: now_ms(),
    };
    let storage = session_storage(sk, Some(&init));
    if storage.is_null() {
        // Counted in STATS; no log line: a full table would log one per session.
        bump_stat(stat::SOCKET_TABLE_FULL);
        return false;
    }
    if !count_open(EVENT_OPEN, cookie, &init.record) {
        // Not counted yet: the agent adopts it once the per-IP table has room
        // again, and then its close must reach us, so the caller still asks
        // for the state callbacks.
        // SAFETY: `storage` is this socket's storage, valid for this invocation.
        unsafe { (*storage).state = session_state::UNCOUNTED };
    }
    true
}

fn try_set_state(ctx: &BtfTracePointContext) -> Result<(), ()> {
    // inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)
    let new_state: i32 = ctx.arg(2);
    if new_state as u32 != BPF_TCP_CLOSE {
        return Ok(());
    }
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's trusted BTF socket pointer.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    forget(cookie).map(|_| ())
}

fn try_sync(ctx: &XdpContext) -> Result<u32, ()> {
    let start = ctx.data();
    if start + core::mem::size_of::<SessionEvent>() > ctx.data_end() {
        return Err(());
    }
    // SAFETY: bounds checked against data_end just above.
    let request = unsafe { core::ptr::read_unaligned(start as *const SessionEvent) };
    if request.service as usize >= MAX_SERVICES {
        return Err(());
    }
    match request.kind {
        EVENT_OPEN if request.family == FAMILY_V4 || request.family == FAMILY_V6 => Ok(track(
            EVENT_SEED,
            request.cookie,
            request.family,
            request.addr,
            request.service as u32,
            record_origin::SEEDED,
        )),
        // An accepted session sock_ops could not count: sock_ops sees its
        // close (it asked for the state callbacks), so the origin is ACCEPTED.
        SYNC_ADOPT if request.family == FAMILY_V4 || request.family == FAMILY_V6 => Ok(track(
            EVENT_ADOPTED,
            request.cookie,
            request.family,
            request.addr,
            request.service as u32,
            record_origin::ACCEPTED,
        )),
        EVENT_CLOSE => forget(request.cookie),
        SYNC_ADJUST if request.family == FAMILY_V4 || request.family == FAMILY_V6 => {
            let Some(counts) = live_counts(request.family, &request.addr, true) else {
                return Ok(sync_result::TABLE_FULL);
            };
            // The delta travels in the cookie field; two's complement makes a
            // wrapping add of its low 32 bits a signed add.
            // Not applied to the per-prefix counts: the per-IP count it heals
            // lost its increment to a collected entry, which prefix counts
            // (never collected) did not.
            add_to_slot(counts, request.service as usize, request.cookie as u32);
            Ok(sync_result::APPLIED)
        }
        _ => Err(()),
    }
}

/// Starts tracking a socket by a SOCKETS record and counts it, reported as
/// `event`; returns a `sync_result`. Inlined: BPF calls take at most five
/// arguments.
#[inline(always)]
fn track(event: u8, cookie: u64, family: u8, addr: [u8; 16], service: u32, origin: u8) -> u32 {
    if service as usize >= MAX_SERVICES {
        return sync_result::INVALID;
    }
    let record = session_record(family, addr, service, origin);
    match SOCKETS.insert(cookie, record, BPF_NOEXIST as u64) {
        Ok(()) => {}
        // Already tracked: this socket was counted by another path.
        Err(EEXIST) => return sync_result::UNCHANGED,
        Err(_) => {
            // As in count_open: an adoption's retry is no new refusal.
            if event != EVENT_ADOPTED {
                bump_stat(stat::SOCKET_TABLE_FULL);
            }
            return sync_result::TABLE_FULL;
        }
    }
    if !count_open(event, cookie, &record) {
        // Not counted, so it must not be uncounted at close either.
        let _ = SOCKETS.remove(cookie);
        return sync_result::TABLE_FULL;
    }
    sync_result::APPLIED
}

/// A session's record; `service` is a slot below MAX_SERVICES.
fn session_record(family: u8, addr: [u8; 16], service: u32, origin: u8) -> SocketRecord {
    SocketRecord {
        addr,
        family,
        service: service as u8,
        origin,
        _pad: [0; 5],
    }
}

/// Adds an opened session to its IP's count and reports it as `event`. False
/// (and nothing changed) when the per-IP table is full.
fn count_open(event: u8, cookie: u64, record: &SocketRecord) -> bool {
    let Some(counts) = live_counts(record.family, &record.addr, true) else {
        // Counted in STATS, which the agent watches to make room at once; no
        // log line here: a full table would log one per refused session. An
        // adoption that still finds no room is a retry, not a new refusal.
        if event != EVENT_ADOPTED {
            bump_stat(stat::IP_TABLE_FULL);
        }
        return false;
    };
    // Only an accept settles a SYN's pending place: an adoption comes
    // seconds later, in another pending window, and a seed never had one.
    let handshake = event == EVENT_OPEN;
    // An adopted session is reported as the open the index never saw.
    let event = if event == EVENT_ADOPTED {
        EVENT_OPEN
    } else {
        event
    };
    add_to_slot(counts, record.service as usize, 1);
    let change = refusal::PrefixChange {
        delta: 1,
        family: record.family,
        service: record.service,
        settle: handshake,
    };
    refusal::count_prefixes(&record.addr, &change);
    emit(event, cookie, record);
    true
}

/// Adds `delta` (two's complement: a wrapping add is a signed add) to one
/// service's counter of an IP, atomically.
fn add_to_slot(counts: *mut LiveCounts, service: usize, delta: u32) {
    if service >= MAX_SERVICES {
        return;
    }
    // SAFETY: `counts` points into a map value that outlives this invocation
    // (RCU), and `service` is bounds checked above.
    unsafe {
        let slot = (*counts).sessions.as_mut_ptr().add(service);
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
            slot, delta,
        );
    }
}

const EEXIST: i32 = -17;

/// `track`'s event for an adoption (`SYNC_ADOPT`): never on the ring, where
/// it is reported as `EVENT_OPEN`.
const EVENT_ADOPTED: u8 = SYNC_ADOPT;

/// Stops tracking a socket and uncounts it, if (and only if) this call deleted its record.
fn forget(cookie: u64) -> Result<u32, ()> {
    // SAFETY: the value is copied out before the record can be deleted.
    let record = match unsafe { SOCKETS.get(cookie) } {
        Some(record) => *record,
        None => return Ok(sync_result::UNCHANGED),
    };
    if SOCKETS.remove(cookie).is_err() {
        // Another CPU (or program) deleted it first and uncounts it.
        return Ok(sync_result::UNCHANGED);
    }
    uncount(cookie, &record).map(|()| sync_result::APPLIED)
}

/// Takes a closed session off its IP's count and reports the close.
fn uncount(cookie: u64, record: &SocketRecord) -> Result<(), ()> {
    if record.service as usize >= MAX_SERVICES {
        return Err(());
    }
    if let Some(counts) = live_counts(record.family, &record.addr, false) {
        add_to_slot(counts, record.service as usize, 1u32.wrapping_neg());
    }
    let change = refusal::PrefixChange {
        delta: 1u32.wrapping_neg(),
        family: record.family,
        service: record.service,
        settle: false,
    };
    refusal::count_prefixes(&record.addr, &change);
    emit(EVENT_CLOSE, cookie, record);
    Ok(())
}

/// The per-IP counters, created zeroed when `create` is set. Entries that fall back
/// to zero are left in place: deleting here could race a concurrent increment.
fn live_counts(family: u8, addr: &[u8; 16], create: bool) -> Option<*mut LiveCounts> {
    // Look up before inserting: an LPM insert allocates a node and takes the
    // trie's lock even when the entry exists, and most accepts are from IPs
    // already tracked.
    if family == FAMILY_V4 {
        let key = Key::new(32, [addr[0], addr[1], addr[2], addr[3]]);
        if let Some(counts) = LIVE_V4.get(&key) {
            return Some(counts as *const LiveCounts as *mut LiveCounts);
        }
        if create {
            let _ = LIVE_V4.insert(&key, LiveCounts::default(), BPF_NOEXIST as u64);
        }
        LIVE_V4
            .get(&key)
            .map(|counts| counts as *const LiveCounts as *mut LiveCounts)
    } else {
        let key = Key::new(128, *addr);
        if let Some(counts) = LIVE_V6.get(&key) {
            return Some(counts as *const LiveCounts as *mut LiveCounts);
        }
        if create {
            let _ = LIVE_V6.insert(&key, LiveCounts::default(), BPF_NOEXIST as u64);
        }
        LIVE_V6
            .get(&key)
            .map(|counts| counts as *const LiveCounts as *mut LiveCounts)
    }
}

fn emit(kind: u8, cookie: u64, record: &SocketRecord) {
    let event = SessionEvent {
        cookie,
        addr: record.addr,
        kind,
        family: record.family,
        service: record.service,
        _pad: [0; 5],
    };
    // Waking the agent for every event costs more than the rest of the program
    // (on a VM, an exit per wakeup). The agent drains the ring before answering
    // any query and on a short timer, so a wakeup is only needed to keep the
    // ring from filling up: one as the unread data crosses each sixteenth of the
    // ring. Waking on every event past the mark would cost that exit per event
    // exactly while the agent is behind (a burst), when it can least afford it.
    let unread = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    // A sixteenth of the ring; the size is a power of two of at least a page.
    let mark = EVENTS.query(BPF_RB_RING_SIZE as u64) / 16;
    let flags = if mark > 0 && unread >= mark && unread % mark < RING_RECORD_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<SessionEvent>(&event, flags as u64).is_err() {
        // The maps stay right; the agent sees the gap here and reconciles.
        bump_stat(stat::EVENTS_LOST);
    }
}

/// CLOCK_MONOTONIC in ms, wrapping (see `SessionStorage::opened_ms`).
fn now_ms() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_ns() } / 1_000_000) as u32
}

fn bump_stat(index: u32) {
    if let Some(value) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of this CPU; programs do not migrate mid-run.
        unsafe { *value += 1 };
    }
}

/// remote_ip4 holds the address in network order: its bytes in memory read a.b.c.d.
fn v4_bytes(ip: u32) -> [u8; 16] {
    let b = ip.to_ne_bytes();
    [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; they count as IPv4.
fn remote_ip6(words: [u32; 4]) -> (u8, [u8; 16]) {
    if words[0] == 0 && words[1] == 0 && words[2] == u32::from_be(0xffff) {
        return (FAMILY_V4, v4_bytes(words[3]));
    }
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    (FAMILY_V6, addr)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
