//! What the bench's reference sock_ops programs share (see bench/src/reference.rs
//! for what each measures): reading the context, telling an accept from a
//! close, the per-IP counter's create-or-find and atomic add, and the event.
//!
//! Each reference is its own object (src/bin/), with only its own maps. They
//! do the least their design asks for and nothing else: no port filter, no
//! per-socket state, no logging, so that the figures are a floor for ours.
#![no_std]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{mem::MaybeUninit, ptr::addr_of_mut};

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    maps::{lpm_trie::Key, HashMap, LpmTrie, RingBuf},
    programs::SockOpsContext,
};

/// Room for the bench's 65,024 sources and then some.
pub const COUNTER_ENTRIES: u32 = 1 << 17;

/// As our agent's default ring.
pub const RING_BYTES: u32 = 4 << 20;

/// What sock_ops programs return: 1 lets the operation proceed.
pub const SOCK_OPS_OK: u32 = 1;

/// Every reference's counter map is keyed like an LPM trie key for an IPv4
/// /32: prefix length, then the address (the hash map too, so both hash the
/// same 8 bytes).
pub const PREFIX_LEN: u32 = 32;

/// An invocation with nothing to do: not an accept or a close, or (for the
/// counters) a close whose counter is missing, or a full map. The program
/// lets the socket be either way.
#[derive(Debug)]
pub struct Ignored;

/// The fields of the context the counters use.
pub struct Fields {
    pub op: u32,
    /// args[1]; for STATE_CB, the new state.
    pub new_state: u32,
    /// In network order; the bench connects over IPv4 only.
    pub remote_ip4: u32,
}

impl Fields {
    /// Read unconditionally and volatile, before any branch: otherwise LLVM
    /// may merge loads into one through a computed ctx pointer, which the
    /// verifier rejects (see shared/notes/ebpf-toolchain.md).
    pub fn read(ctx: &SockOpsContext) -> Self {
        let ops = ctx.ops;
        // SAFETY: `ops` is the context pointer the kernel passed to the program.
        unsafe {
            Self {
                op: core::ptr::read_volatile(&(*ops).op),
                new_state: core::ptr::read_volatile(&(*ops).__bindgen_anon_1.args[1]),
                remote_ip4: core::ptr::read_volatile(&(*ops).remote_ip4),
            }
        }
    }
}

/// The operation, read as [`Fields::read`] does (the floor needs nothing else).
pub fn read_op(ctx: &SockOpsContext) -> u32 {
    // SAFETY: `ops` is the context pointer the kernel passed to the program.
    unsafe { core::ptr::read_volatile(&(*ctx.ops).op) }
}

/// Asks for state callbacks, as ours does at accept: without them sock_ops
/// never learns of the close.
pub fn want_state_callbacks(ctx: &SockOpsContext) {
    // Only STATE_CB (not OR-ed with the current flags): all the references need.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

/// What this invocation does to the remote address's count: +1 at accept
/// (after asking for state callbacks), -1 at the move to TCP_CLOSE; Err for
/// every other invocation.
pub fn change(ctx: &SockOpsContext, fields: &Fields) -> Result<i64, Ignored> {
    match fields.op {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            want_state_callbacks(ctx);
            Ok(1)
        }
        BPF_SOCK_OPS_STATE_CB if fields.new_state == BPF_TCP_CLOSE => Ok(-1),
        _ => Err(Ignored),
    }
}

/// A per-IP counter map: the LPM trie or the hash map.
pub trait CounterMap {
    /// The counter of `addr`, if it exists.
    fn find(&self, addr: u32) -> Option<*mut u64>;
    /// Creates the counter of `addr` at zero unless someone did first.
    fn create(&self, addr: u32);
}

impl CounterMap for LpmTrie<u32, u64> {
    fn find(&self, addr: u32) -> Option<*mut u64> {
        self.get(Key::new(PREFIX_LEN, addr))
            .map(|counter| counter as *const u64 as *mut u64)
    }

    fn create(&self, addr: u32) {
        let _ = self.insert(Key::new(PREFIX_LEN, addr), 0, BPF_NOEXIST as u64);
    }
}

impl CounterMap for HashMap<[u32; 2], u64> {
    fn find(&self, addr: u32) -> Option<*mut u64> {
        self.get_ptr_mut([PREFIX_LEN, addr])
    }

    fn create(&self, addr: u32) {
        let _ = self.insert([PREFIX_LEN, addr], 0, BPF_NOEXIST as u64);
    }
}

/// Adds `delta` to the counter of `addr`. Only an accept creates a counter
/// (at zero, then adds, so two CPUs racing both count); a close whose counter
/// is missing does nothing.
pub fn count(map: &impl CounterMap, addr: u32, delta: i64) -> Result<(), Ignored> {
    let counter = match map.find(addr) {
        Some(counter) => counter,
        None if delta == 1 => {
            map.create(addr);
            map.find(addr).ok_or(Ignored)?
        }
        None => return Err(Ignored),
    };
    // SAFETY: `counter` points into a map value that outlives this invocation
    // (RCU). The result is unused, so this is the non-fetching atomic add.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter,
            delta as u64,
        );
    }
    Ok(())
}

/// One change, as 40 bytes like our events.
#[repr(C)]
pub struct Event {
    pub cookie: u64,
    pub addr: u32,
    /// +1 or -1.
    pub change: i32,
    pub _pad: [u64; 3],
}

/// The bench's reader counts only records of exactly this size.
pub const EVENT_BYTES: usize = 40;
const _: () = assert!(core::mem::size_of::<Event>() == EVENT_BYTES);

/// Reports a change without waking anyone: the bench drains the ring on a
/// 100 ms timer, as our agent does. A full ring drops the event, which the
/// bench's check then reports.
pub fn emit(ring: &RingBuf, ctx: &SockOpsContext, addr: u32, delta: i64) {
    // SAFETY: the sock_ops context is a valid argument for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let mut event = MaybeUninit::<Event>::uninit();
    let at = event.as_mut_ptr();
    // SAFETY: `at` points at the event on this stack; every field is written
    // before it is read. The padding's stores are volatile: LLVM would merge
    // plain zero stores into a call to a byte-by-byte memset, which the
    // hand-written programs never paid.
    let event = unsafe {
        addr_of_mut!((*at).cookie).write(cookie);
        addr_of_mut!((*at).addr).write(addr);
        addr_of_mut!((*at).change).write(delta as i32);
        let pad = addr_of_mut!((*at)._pad) as *mut u64;
        pad.write_volatile(0);
        pad.add(1).write_volatile(0);
        pad.add(2).write_volatile(0);
        event.assume_init_ref()
    };
    let _ = ring.output::<Event>(event, BPF_RB_NO_WAKEUP as u64);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
