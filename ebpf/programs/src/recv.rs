//! The read tracer: what a paired socket's reader reads leaves its unread count, so sk_msg can
//! tell a reader that keeps up from one that stopped (`UNREAD_BUDGET`).
//!
//! Two attachments, the daemon picks the first the kernel offers (docs/DESIGN.md, "Kernel facts"):
//! - fexit on `tcp_bpf_recvmsg`: the `recvmsg` of sockets that are in a sockhash only, so it
//!   never runs for a socket meshlane did not put there (every kernel with BTF and trampolines);
//! - the raw tracepoint `sock_recv_length` (6.4+): fired after *every* `recvmsg()` on the node,
//!   which costs every process a map lookup per read; only a fallback.

use aya_ebpf::programs::{FExitContext, RawTracePointContext};

use crate::{counters::atomic_add, maps::ML_UNREAD};

const MSG_PEEK: i32 = 2;

/// `sock_recv_length`: TP_PROTO(struct sock *sk, int ret, int flags).
pub fn on_read(ctx: &RawTracePointContext) {
    count(
        ctx.arg(0),
        ctx.arg::<i64>(1) as i32,
        ctx.arg::<i64>(2) as i32,
    );
}

/// `int tcp_bpf_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags,
/// int *addr_len)` (the signature since 5.19; the kernel checks argument access against BTF).
pub fn on_bpf_read(ctx: &FExitContext) {
    let Ok(read) = ctx.ret::<i32>() else { return };
    count(ctx.arg(0), read, ctx.arg(3));
}

fn count(sk: u64, read: i32, flags: i32) {
    // A peek leaves the bytes queued; errors and EOF read nothing.
    if flags & MSG_PEEK != 0 || read <= 0 {
        return;
    }
    // Only sockets that may receive redirected bytes are known here.
    if let Some(unread) = ML_UNREAD.get_ptr_mut(sk) {
        atomic_add(unread, -i64::from(read));
    }
}
