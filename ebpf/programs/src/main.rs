//! meshlane's eBPF programs: `sock_ops` pairs the two ends of each local hop between an app and its
//! sidecar, `sk_msg` hands bytes from one end straight to the other through the sockhash, a
//! read tracer (`recv.rs`) counts what receivers read, to bound what they leave unread, and a
//! connect hook (`owner.rs`) records who calls connect(), for sock_ops.
//!
//! One file per hook (`sockops.rs`, `sk_msg.rs`), every map in `maps.rs`, counters in `counters.rs`.
//! Types shared with the daemon live in `meshlane-common`.
#![no_std]
#![no_main]
// atomic_xadd: core has no atomic fetch_add for the BPF target (built with RUSTC_BOOTSTRAP=1).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod counters;
mod maps;
mod owner;
mod recv;
mod sk_msg;
mod sockops;

use aya_ebpf::{
    macros::{cgroup_sock_addr, fexit, raw_tracepoint, sk_msg, sock_ops},
    programs::{FExitContext, RawTracePointContext, SkMsgContext, SockAddrContext, SockOpsContext},
};

#[sock_ops]
pub fn meshlane_sockops(ctx: SockOpsContext) -> u32 {
    sockops::handle(&ctx);
    // sock_ops' return value only matters for ops that ask for a reply; none of ours do.
    1
}

#[cgroup_sock_addr(connect4)]
pub fn meshlane_connect4(ctx: SockAddrContext) -> i32 {
    owner::on_connect(&ctx);
    // 1 lets the connect() proceed unchanged; meshlane never refuses one.
    1
}

#[cgroup_sock_addr(connect6)]
pub fn meshlane_connect6(ctx: SockAddrContext) -> i32 {
    owner::on_connect(&ctx);
    1
}

#[sk_msg]
pub fn meshlane_sk_msg(ctx: SkMsgContext) -> u32 {
    sk_msg::verdict(&ctx)
}

#[fexit(function = "tcp_bpf_recvmsg")]
pub fn meshlane_recv_exit(ctx: FExitContext) -> i32 {
    recv::on_bpf_read(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn meshlane_recv(ctx: RawTracePointContext) -> i32 {
    recv::on_read(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
