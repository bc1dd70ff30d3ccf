//! The read tracer: what a paired socket's reader reads leaves its unread count, so sk_msg can
//! tell a reader that keeps up from one that stopped (`UNREAD_BUDGET`).
//!
//! Two attachments, the daemon picks the first the kernel offers (docs/DESIGN.md, "Kernel facts"):
//! - fexit on `tcp_bpf_recvmsg`: the `recvmsg` of sockets that are in a sockhash only, so it
//!   never runs for a socket meshlane did not put there (every kernel with BTF and trampolines);
//! - the raw tracepoint `sock_recv_length` (6.4+): fired after *every* `recvmsg()` on the node,
//!   only a fallback. A read of a socket meshlane never paired stops at its empty read-hint
//!   slot ([`ML_READ_HINTS`]) instead of paying a hash lookup.

use aya_ebpf::programs::{FExitContext, RawTracePointContext};

use meshlane_common::{read_hint_slot, CONTROL_FLAGS, CONTROL_READ_HINTS};

use crate::{
    counters::atomic_add,
    maps::{ML_CONTROL, ML_READ_HINTS, ML_READ_SEEDS, ML_UNREAD},
};

const MSG_PEEK: i32 = 2;

/// `sock_recv_length`: TP_PROTO(struct sock *sk, int ret, int flags).
pub fn on_read(ctx: &RawTracePointContext) {
    let (sk, read, flags) = (
        ctx.arg::<u64>(0),
        ctx.arg::<i64>(1) as i32,
        ctx.arg::<i64>(2) as i32,
    );
    // A raw tracepoint's arguments are plain numbers, so the address hashes as it is. (The fexit
    // below runs for sockhash sockets only and has no need of hints; its argument is a typed
    // pointer, on which the verifier allows no arithmetic.)
    if read > 0 && flags & MSG_PEEK == 0 && may_receive(sk) {
        count(sk, read, flags);
    }
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

/// Whether `sk` may have an entry in [`ML_UNREAD`]: its read-hint slot counts one, or the daemon
/// seeded it. Two array loads the verifier inlines, where the hash lookup they spare hashes the
/// key and walks a bucket; nearly every read the tracepoint sees is of a socket meshlane never
/// paired. Until the daemon says the hints cover every entry, every socket is looked up.
#[inline(always)]
fn may_receive(sk: u64) -> bool {
    let control = ML_CONTROL.get(CONTROL_FLAGS).copied().unwrap_or(0);
    if control & CONTROL_READ_HINTS == 0 {
        return true;
    }
    let slot = u32::from(read_hint_slot(sk));
    ML_READ_HINTS.get(slot).is_some_and(|n| *n != 0)
        || ML_READ_SEEDS.get(slot).is_some_and(|n| *n != 0)
}
