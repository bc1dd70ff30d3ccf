//! meshlane's eBPF programs: `sock_ops` pairs the two ends of each local hop between an app and its
//! sidecar, `sk_msg` hands bytes from one end straight to the other through the sockhash.
//!
//! One file per hook (`sockops.rs`, `sk_msg.rs`), every map in `maps.rs`, counters in `counters.rs`.
//! Types shared with the daemon live in `meshlane-common`.
#![no_std]
#![no_main]

mod counters;
mod maps;
mod sk_msg;
mod sockops;

use aya_ebpf::{
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};

#[sock_ops]
pub fn meshlane_sockops(ctx: SockOpsContext) -> u32 {
    sockops::handle(&ctx);
    // sock_ops' return value only matters for ops that ask for a reply; none of ours do.
    1
}

#[sk_msg]
pub fn meshlane_sk_msg(ctx: SkMsgContext) -> u32 {
    sk_msg::verdict(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
