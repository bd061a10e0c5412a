//! Kernel limits: per-prefix live counts kept by the open and close paths
//! while some limit is configured, and `inbound_sk_lookup`, which refuses
//! the SYN of a session over a limit. sk_lookup runs before the listener is
//! chosen: `SK_DROP` there makes the kernel answer the SYN with a RST, so the
//! client gets ECONNREFUSED at once and the MTA never sees the connection.
//!
//! A count rises only when a handshake completes (sock_ops), so SYNs that
//! arrive together could all pass before any is counted. A limit with
//! `COUNT_PENDING` bounds that: each SYN it admits counts in `PENDING_SYNS`
//! for its prefix until its handshake completes (the open takes it back) or
//! the pending window (about a second) ends, and a SYN is refused when the
//! established count plus the pending one reaches the limit. A SYN whose
//! handshake never completes holds its place until the window ends. Nothing
//! here logs per SYN: refusals are counted per IP in `REFUSED_IPS` and in
//! `STATS`, and the agent logs.

use audit_common::{
    control, limit_flags, stat, KernelLimit, PendingSyns, PrefixKey, RefusedKey, FAMILY_V4,
    FAMILY_V6, MAX_KERNEL_LIMITS, PENDING_WINDOW_SHIFT, PORT_NOT_WATCHED,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{map, sk_lookup},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap},
    programs::SkLookupContext,
};

use crate::{bump_stat, remote_ip6, v4_bytes, BPF_F_NO_PREALLOC, CONTROL, PORT_SERVICES};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
/// Prefixes counted at once, over all limits; the agent sets the real size.
const MAX_PREFIXES: u32 = 1 << 20;
const MAX_EXEMPT: u32 = 4096;
const MAX_REFUSED_IPS: u32 = 1 << 16;
/// Prefixes with SYNs in flight at once; LRU, so the prefixes of a flood
/// from everywhere evict each other instead of failing.
const MAX_PENDING: u32 = 1 << 16;

/// The entry for `key` in the hash `map`, made from `init` when missing.
/// Looked up first (one lookup when it exists, as most do: the SYNs and
/// accepts of a prefix or IP already seen) rather than inserted first, and a
/// lost insert race finds the other CPU's entry. A macro: the map types share
/// no trait.
macro_rules! entry_or_insert {
    ($map:expr, $key:expr, $init:expr) => {
        match $map.get_ptr_mut($key) {
            Some(entry) => Some(entry),
            None => {
                let _ = $map.insert($key, $init, BPF_NOEXIST as u64);
                $map.get_ptr_mut($key)
            }
        }
    };
}

#[map(name = "KERNEL_LIMITS")]
static KERNEL_LIMITS: Array<KernelLimit> = Array::pinned(MAX_KERNEL_LIMITS as u32, 0);

#[map(name = "PREFIX_COUNTS")]
static PREFIX_COUNTS: HashMap<PrefixKey, u32> = HashMap::pinned(MAX_PREFIXES, BPF_F_NO_PREALLOC);

/// Exempt networks → bit mask of the limits they are exempt from. Longest
/// prefix wins, so the agent gives each entry the bits of every exempt
/// network that contains it.
#[map(name = "EXEMPT_V4")]
static EXEMPT_V4: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(MAX_EXEMPT, 0);

#[map(name = "EXEMPT_V6")]
static EXEMPT_V6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(MAX_EXEMPT, 0);

/// SYNs refused (or, dry run, let through over a limit) per client IP. LRU:
/// a flood from many addresses evicts the oldest instead of failing.
#[map(name = "REFUSED_IPS")]
static REFUSED_IPS: LruHashMap<RefusedKey, u64> = LruHashMap::pinned(MAX_REFUSED_IPS, 0);

/// SYNs admitted per prefix (and limit) whose handshake has not completed.
#[map(name = "PENDING_SYNS")]
static PENDING_SYNS: LruHashMap<PrefixKey, PendingSyns> = LruHashMap::pinned(MAX_PENDING, 0);

#[sk_lookup]
pub fn inbound_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // Read up front and volatile, as in sock_ops: the verifier rejects loads
    // through a computed context pointer.
    // SAFETY: `lookup` is the context pointer the kernel passed to this program.
    let (family, protocol, remote_ip4, remote_ip6_words, local_port) = unsafe {
        (
            core::ptr::read_volatile(&(*lookup).family),
            core::ptr::read_volatile(&(*lookup).protocol),
            core::ptr::read_volatile(&(*lookup).remote_ip4),
            [
                core::ptr::read_volatile(&(*lookup).remote_ip6[0]),
                core::ptr::read_volatile(&(*lookup).remote_ip6[1]),
                core::ptr::read_volatile(&(*lookup).remote_ip6[2]),
                core::ptr::read_volatile(&(*lookup).remote_ip6[3]),
            ],
            core::ptr::read_volatile(&(*lookup).local_port),
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let service = match PORT_SERVICES.get(local_port) {
        Some(&watched) if watched != PORT_NOT_WATCHED => (watched - 1) as u8,
        _ => return SK_PASS,
    };
    let (family, addr) = match family {
        AF_INET => (FAMILY_V4, v4_bytes(remote_ip4)),
        AF_INET6 => remote_ip6(remote_ip6_words),
        _ => return SK_PASS,
    };
    let window = pending_window();
    let exempt = exempt_mask(family, &addr);
    let mut i = 0u32;
    while i < MAX_KERNEL_LIMITS as u32 {
        if exempt & (1 << i) == 0 {
            match check_limit(i, service, family, &addr, window) {
                VERDICT_REFUSE => {
                    note_refusal(family, &addr, false);
                    return SK_DROP;
                }
                VERDICT_DRY_RUN => note_refusal(family, &addr, true),
                _ => {}
            }
        }
        i += 1;
    }
    // Admitted: pending for every limit on the service, exempt or not, as
    // the open that settles it counts for every limit.
    let mut i = 0u32;
    while i < MAX_KERNEL_LIMITS as u32 {
        add_pending(i, service, family, &addr, window);
        i += 1;
    }
    SK_PASS
}

fn pending_window() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_ns() } >> PENDING_WINDOW_SHIFT) as u32
}

/// The SYNs pending for `key` in `window` (an older window's count is none).
fn pending(key: &PrefixKey, window: u32) -> i32 {
    // SAFETY: the value is copied out at once.
    match unsafe { PENDING_SYNS.get(key) } {
        Some(p) if p.window == window && (p.count as i32) > 0 => p.count as i32,
        _ => 0,
    }
}

/// Counts an admitted SYN as pending for limit `index`, when it counts
/// pending SYNs.
#[inline(never)]
fn add_pending(index: u32, service: u8, family: u8, addr: &[u8; 16], window: u32) {
    let Some(limit) = KERNEL_LIMITS.get(index) else {
        return;
    };
    let limit = *limit;
    if limit.flags & (limit_flags::ACTIVE | limit_flags::COUNT_PENDING)
        != limit_flags::ACTIVE | limit_flags::COUNT_PENDING
        || limit.service != service
    {
        return;
    }
    let key = prefix_key(index as u8, family, addr, &limit);
    let fresh = PendingSyns { count: 0, window };
    let Some(entry) = entry_or_insert!(PENDING_SYNS, &key, fresh) else {
        return;
    };
    // SAFETY: a map value, valid for this invocation (RCU). Two CPUs that
    // both start a new window each reset it: one SYN may be lost from the
    // count, which errs toward admitting.
    unsafe {
        if (*entry).window != window {
            (*entry).count = 0;
            (*entry).window = window;
        }
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
            core::ptr::addr_of_mut!((*entry).count),
            1,
        );
    }
}

const VERDICT_PASS: u32 = 0;
const VERDICT_REFUSE: u32 = 1;
const VERDICT_DRY_RUN: u32 = 2;

/// Whether limit `index` is full for this client. A call, not inlined: each
/// limit's key lives in this frame only, which keeps the stack small.
#[inline(never)]
fn check_limit(index: u32, service: u8, family: u8, addr: &[u8; 16], window: u32) -> u32 {
    let Some(limit) = KERNEL_LIMITS.get(index) else {
        return VERDICT_PASS;
    };
    let limit = *limit;
    if limit.flags & limit_flags::ACTIVE == 0 || limit.service != service {
        return VERDICT_PASS;
    }
    let key = prefix_key(index as u8, family, addr, &limit);
    // SAFETY: the value is copied out at once.
    let count = unsafe { PREFIX_COUNTS.get(key) }.copied().unwrap_or(0);
    // A close that raced the agent rebuilding the counts can take one below
    // zero: that is no session, not four billion.
    let mut count = (count as i32).max(0);
    if limit.flags & limit_flags::COUNT_PENDING != 0 {
        count = count.saturating_add(pending(&key, window));
    }
    if count < limit.max as i32 {
        VERDICT_PASS
    } else if limit.flags & limit_flags::DRY_RUN != 0 {
        VERDICT_DRY_RUN
    } else {
        VERDICT_REFUSE
    }
}

fn exempt_mask(family: u8, addr: &[u8; 16]) -> u32 {
    let found = if family == FAMILY_V4 {
        EXEMPT_V4.get(Key::new(32, [addr[0], addr[1], addr[2], addr[3]]))
    } else {
        EXEMPT_V6.get(Key::new(128, *addr))
    };
    found.copied().unwrap_or(0)
}

fn note_refusal(family: u8, addr: &[u8; 16], dry_run: bool) {
    bump_stat(stat::REFUSED);
    let key = RefusedKey {
        addr: *addr,
        family,
        dry_run: u8::from(dry_run),
        _pad: [0; 6],
    };
    if let Some(count) = entry_or_insert!(REFUSED_IPS, &key, 0) {
        // SAFETY: a map value, valid for this invocation (RCU).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                count, 1,
            );
        }
    }
}

/// What a session's open or close changes in the per-prefix counts.
#[derive(Clone, Copy)]
pub struct PrefixChange {
    /// +1 for an open, -1 (two's complement) for a close.
    pub delta: u32,
    pub family: u8,
    pub service: u8,
    /// An accept: the handshake completed, so the SYN's pending place (see
    /// `add_pending`) is given back, in the pending window read here.
    pub settle: bool,
}

/// Applies `change` to the per-prefix count of every limit on its service
/// (and, for an accept, to the pending SYNs), in one pass over the limits:
/// one array lookup and one key per limit. Costs one array lookup when no
/// limit is configured.
#[inline(never)]
pub fn count_prefixes(addr: &[u8; 16], change: &PrefixChange) {
    if !CONTROL
        .get(control::KERNEL_LIMITS)
        .is_some_and(|&on| on != 0)
    {
        return;
    }
    let window = if change.settle { pending_window() } else { 0 };
    let mut i = 0u32;
    while i < MAX_KERNEL_LIMITS as u32 {
        count_prefix(i, addr, change, window);
        i += 1;
    }
}

/// `count_prefixes` for limit `index`; its own frame, as `check_limit`.
#[inline(never)]
fn count_prefix(index: u32, addr: &[u8; 16], change: &PrefixChange, window: u32) {
    let Some(limit) = KERNEL_LIMITS.get(index) else {
        return;
    };
    let limit = *limit;
    if limit.flags & limit_flags::ACTIVE == 0 || limit.service != change.service {
        return;
    }
    let key = prefix_key(index as u8, change.family, addr, &limit);
    // Only an open creates the entry; a close of a session counted before
    // the limit existed has nothing to take from. One lookup when it exists.
    let count = if (change.delta as i32) > 0 {
        entry_or_insert!(PREFIX_COUNTS, &key, 0)
    } else {
        PREFIX_COUNTS.get_ptr_mut(key)
    };
    if let Some(count) = count {
        // SAFETY: a map value, valid for this invocation (RCU).
        unsafe {
            core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
                count,
                change.delta,
            );
        }
    }
    if change.settle && limit.flags & limit_flags::COUNT_PENDING != 0 {
        settle_pending(&key, window);
    }
}

/// Takes one SYN off `key`'s pending count in `window`.
fn settle_pending(key: &PrefixKey, window: u32) {
    let Some(entry) = PENDING_SYNS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a map value, valid for this invocation (RCU). A racing settle
    // may take the count below zero, which reads as none.
    unsafe {
        if (*entry).window == window && ((*entry).count as i32) > 0 {
            core::intrinsics::atomic_xsub::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
                core::ptr::addr_of_mut!((*entry).count),
                1,
            );
        }
    }
}

#[inline(always)]
fn prefix_key(limit_index: u8, family: u8, addr: &[u8; 16], limit: &KernelLimit) -> PrefixKey {
    let bits = if family == FAMILY_V6 {
        limit.ipv6_prefix
    } else {
        limit.ipv4_prefix
    };
    let mut key = PrefixKey {
        addr: *addr,
        family,
        limit: limit_index,
        _pad: [0; 6],
    };
    mask_in_place(&mut key.addr, bits);
    key
}

/// Clears every bit of `addr` past the first `bits`, eight bytes at a time:
/// byte by byte, the unrolled loop's spills took 190 bytes of a stack that
/// sock_ops' call chain (at most 512) cannot spare.
#[inline(always)]
fn mask_in_place(addr: &mut [u8; 16], bits: u8) {
    let bits = bits as u32;
    let high_bits = if bits > 64 { 64 } else { bits };
    let low_bits = bits.saturating_sub(64);
    let high = u64::from_be_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]) & mask64(high_bits);
    let low = u64::from_be_bytes([
        addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
    ]) & mask64(low_bits);
    let high = high.to_be_bytes();
    let low = low.to_be_bytes();
    let mut i = 0;
    while i < 8 {
        addr[i] = high[i];
        addr[i + 8] = low[i];
        i += 1;
    }
}

/// The first `bits` (at most 64) bits set, counted from the top.
#[inline(always)]
fn mask64(bits: u32) -> u64 {
    if bits == 0 {
        0
    } else {
        u64::MAX << (64 - bits)
    }
}
