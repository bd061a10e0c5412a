//! Reference "LPM counter": +1 at accept, -1 at close on the remote IPv4
//! address's counter in an LPM trie. The least a design with per-IP counts in
//! an LPM trie asks for.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{map, sock_ops},
    maps::LpmTrie,
    programs::SockOpsContext,
};
use bench_ebpf::{change, count, Fields, Ignored, COUNTER_ENTRIES, SOCK_OPS_OK};

/// aya-ebpf makes it BPF_F_NO_PREALLOC, as an LPM trie must be.
#[map(name = "COUNTS")]
static COUNTS: LpmTrie<u32, u64> = LpmTrie::with_max_entries(COUNTER_ENTRIES, 0);

#[sock_ops]
pub fn ref_lpm_count(ctx: SockOpsContext) -> u32 {
    match try_ref_lpm_count(&ctx) {
        Ok(()) | Err(Ignored) => SOCK_OPS_OK,
    }
}

fn try_ref_lpm_count(ctx: &SockOpsContext) -> Result<(), Ignored> {
    let fields = Fields::read(ctx);
    let delta = change(ctx, &fields)?;
    count(&COUNTS, fields.remote_ip4, delta)
}
