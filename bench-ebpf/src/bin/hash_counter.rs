//! Reference "hash counter": the LPM counter's work in an exact-match hash
//! map, to show what the trie itself costs.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{map, sock_ops},
    maps::HashMap,
    programs::SockOpsContext,
};
use bench_ebpf::{change, count, Fields, Ignored, COUNTER_ENTRIES, SOCK_OPS_OK};

/// Flags 0: preallocated, the hash map's fastest form.
#[map(name = "COUNTS")]
static COUNTS: HashMap<[u32; 2], u64> = HashMap::with_max_entries(COUNTER_ENTRIES, 0);

#[sock_ops]
pub fn ref_hash_count(ctx: SockOpsContext) -> u32 {
    match try_ref_hash_count(&ctx) {
        Ok(()) | Err(Ignored) => SOCK_OPS_OK,
    }
}

fn try_ref_hash_count(ctx: &SockOpsContext) -> Result<(), Ignored> {
    let fields = Fields::read(ctx);
    let delta = change(ctx, &fields)?;
    count(&COUNTS, fields.remote_ip4, delta)
}
