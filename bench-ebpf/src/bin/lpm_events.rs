//! Reference "LPM counter with events": the LPM counter, and per counted
//! accept and close a 40-byte event into a ring buffer without waking anyone.
//! What getting each connection to user space costs on top of the counter.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{map, sock_ops},
    maps::{LpmTrie, RingBuf},
    programs::SockOpsContext,
};
use bench_ebpf::{change, count, emit, Fields, Ignored, COUNTER_ENTRIES, RING_BYTES, SOCK_OPS_OK};

/// aya-ebpf makes it BPF_F_NO_PREALLOC, as an LPM trie must be.
#[map(name = "COUNTS")]
static COUNTS: LpmTrie<u32, u64> = LpmTrie::with_max_entries(COUNTER_ENTRIES, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[sock_ops]
pub fn ref_lpm_events(ctx: SockOpsContext) -> u32 {
    match try_ref_lpm_events(&ctx) {
        Ok(()) | Err(Ignored) => SOCK_OPS_OK,
    }
}

fn try_ref_lpm_events(ctx: &SockOpsContext) -> Result<(), Ignored> {
    let fields = Fields::read(ctx);
    let delta = change(ctx, &fields)?;
    count(&COUNTS, fields.remote_ip4, delta)?;
    emit(&EVENTS, ctx, fields.remote_ip4, delta);
    Ok(())
}
