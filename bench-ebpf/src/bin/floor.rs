//! Reference "floor": at PASSIVE_ESTABLISHED it asks for state callbacks, as
//! ours does, and otherwise returns at once. What the invocations alone cost.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, macros::sock_ops, programs::SockOpsContext,
};
use bench_ebpf::{read_op, want_state_callbacks, Ignored, SOCK_OPS_OK};

#[sock_ops]
pub fn ref_floor(ctx: SockOpsContext) -> u32 {
    match try_ref_floor(&ctx) {
        Ok(()) | Err(Ignored) => SOCK_OPS_OK,
    }
}

fn try_ref_floor(ctx: &SockOpsContext) -> Result<(), Ignored> {
    if read_op(ctx) != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return Err(Ignored);
    }
    want_state_callbacks(ctx);
    Ok(())
}
