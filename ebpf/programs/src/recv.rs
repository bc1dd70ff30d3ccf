//! Raw tracepoint `sock_recv_length`: what a paired socket's reader reads leaves its unread count,
//! so sk_msg can tell a reader that keeps up from one that stopped (`UNREAD_BUDGET`).

use aya_ebpf::programs::RawTracePointContext;

use crate::{
    counters::atomic_add,
    maps::{ML_SOCK_ADDRS, ML_UNREAD},
};

const MSG_PEEK: i32 = 2;

pub fn on_read(ctx: &RawTracePointContext) {
    // TP_PROTO(struct sock *sk, int ret, int flags)
    let sk: u64 = ctx.arg(0);
    let read: i64 = ctx.arg(1);
    let flags: i64 = ctx.arg(2);
    // A peek leaves the bytes queued; errors and EOF read nothing.
    if (flags as i32) & MSG_PEEK != 0 || (read as i32) <= 0 {
        return;
    }
    // Only sockets meshlane joined are known here; every other read on the node is skipped.
    // SAFETY: read-only view of a hash map value, copied out at once.
    let Some(cookie) = (unsafe { ML_SOCK_ADDRS.get(sk) }).copied() else {
        return;
    };
    if let Some(unread) = ML_UNREAD.get_ptr_mut(cookie) {
        atomic_add(unread, -i64::from(read as i32));
    }
}
