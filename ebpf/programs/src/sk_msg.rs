//! sk_msg: redirect a paired socket's bytes to its peer's receive queue, or pass them to TCP.
//! Under the reader rule (docs/DESIGN.md invariant 7) this runs for app sockets and for the sidecar
//! hop's sockets (both ends sidecars): the sidecar's ends of app hops sit in a map without
//! programs, so their sends never come here.
//!
//! Invariant 2 (first byte or never): the first message that passes pins the socket's direction
//! to TCP for good. The reverse move (redirect, then TCP) is safe because the receiver always
//! drains redirected bytes before its TCP queue, so only that move is ever made.

use core::ptr;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::generated::{bpf_sk_storage_get, bpf_skc_to_tcp_sock},
    programs::SkMsgContext,
};
use meshlane_common::{
    counter, SockState, CONTROL_BUDGET, CONTROL_DRAIN, CONTROL_FLAGS, CONTROL_MEMORY_TIGHT,
    FOLD_BYTES, FOLD_EVERY, POLICY_MEMORY_TIGHT, ROLE_SC_CLIENT, ROLE_SC_SERVER, SOCK_PEER_KNOWN,
    SOCK_READER_RULE, SOCK_TCP_PINNED, SOCK_WAITING, UNREAD_BUDGET,
};

use crate::{
    counters::{atomic_add, fold, inc},
    maps::{ML_CONTROL, ML_POLICY, ML_RENDEZVOUS, ML_SOCKS, ML_SOCK_STATE, ML_TARGETS, ML_UNREAD},
};

/// Byte offsets of `struct tcp_sock`'s `write_seq`, `snd_nxt` and `data_segs_out` on the running
/// kernel, set by the loader from the kernel's BTF (Rust eBPF has no CO-RE field relocations).
/// Read-only globals: the verifier sees them as constants and checks each read against the same
/// BTF. 0: no offsets, and [`sent_around`] is off.
#[unsafe(no_mangle)]
static MESHLANE_TCP_WRITE_SEQ: u32 = 0;
#[unsafe(no_mangle)]
static MESHLANE_TCP_SND_NXT: u32 = 0;
#[unsafe(no_mangle)]
static MESHLANE_TCP_DATA_SEGS_OUT: u32 = 0;

pub fn verdict(ctx: &SkMsgContext) -> u32 {
    // Every path returns SK_PASS: either the redirect set by the helper takes effect, or the
    // message continues on TCP. Nothing is ever dropped here (invariant 4, fail open).
    let Some(st) = state(ctx) else {
        inc(counter::PASS_UNTRACKED);
        return SK_PASS;
    };
    if st.flags & SOCK_TCP_PINNED != 0 {
        inc(counter::PASS_TCP_PINNED);
        return SK_PASS;
    }
    // One read of the control word per message: drain, and whether the budget applies.
    let flags = ML_CONTROL.get(CONTROL_FLAGS).copied().unwrap_or(0);
    if flags & CONTROL_DRAIN != 0 {
        st.flags |= SOCK_TCP_PINNED;
        inc(counter::PASS_DRAINING);
        return SK_PASS;
    }
    if flags & CONTROL_MEMORY_TIGHT != 0 && reader_memory_tight(st) {
        st.flags |= SOCK_TCP_PINNED;
        inc(counter::PASS_MEMORY_TIGHT);
        return SK_PASS;
    }
    // The peer is kept in the socket's own state: the second end of a pair got it at pairing,
    // the first reads it once from the entry it owns. A cookie is never reused, so a peer that
    // closed later is simply not found by the redirect (and this direction then moves to TCP,
    // below).
    let mut peer = st.peer;
    if st.flags & SOCK_PEER_KNOWN == 0 {
        // This socket's first message (the first end of a pair learns its peer here). Bytes
        // may have left on TCP without passing here: a write another thread started while
        // connect() was in progress runs the plain TCP sendmsg it entered. Redirecting now could
        // overtake them, so the direction stays on TCP (invariant 2).
        if sent_around(ctx) {
            st.flags |= SOCK_TCP_PINNED;
            inc(counter::SKIP_EARLY_DATA);
            return SK_PASS;
        }
        let (partner, partner_sk) = if st.flags & SOCK_WAITING != 0 {
            // SAFETY: read-only view of a hash map value, copied out at once.
            unsafe { ML_RENDEZVOUS.get(st.pair_key) }
                .filter(|w| w.cookie == st.cookie)
                .map_or((0, 0), |w| (w.partner, w.partner_sk))
        } else {
            (0, 0)
        };
        if partner == 0 {
            st.flags |= SOCK_TCP_PINNED;
            inc(counter::PASS_NO_PEER);
            return SK_PASS;
        }
        peer = partner;
        st.peer = partner;
        st.peer_sk = partner_sk;
        st.flags |= SOCK_PEER_KNOWN;
    }
    // Under the reader rule the peer is a sidecar end in the program-less target map; with the
    // two-way opt-in both ends are in the sockhash this program is attached to.
    let redirected = if st.flags & SOCK_READER_RULE != 0 {
        ML_TARGETS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64)
    } else {
        ML_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64)
    };
    if redirected != SK_PASS as i64 {
        // The peer left the sockhash (it closed): this direction continues on TCP.
        st.flags |= SOCK_TCP_PINNED;
        inc(counter::PASS_PEER_GONE);
        return SK_PASS;
    }
    // Per message only the socket's own state is written. What it redirected is added to the
    // node's counters, its pod's stats and its reader's unread count every FOLD_EVERY messages
    // or FOLD_BYTES bytes (and at its half-close or close): a per-message counter update and a
    // per-message atomic add on a value the reader's CPU also writes were half of this
    // program's cost.
    st.unfolded_msgs += 1;
    st.unfolded_bytes += ctx.size() as u64;
    if st.unfolded_msgs >= FOLD_EVERY || st.unfolded_bytes >= FOLD_BYTES {
        let bytes = st.unfolded_bytes;
        fold(st);
        if flags & CONTROL_BUDGET != 0 {
            charge_reader(st, bytes);
        }
    }
    SK_PASS
}

/// Whether this socket's reader may be in a memory-tight pod ([`POLICY_MEMORY_TIGHT`]). On an
/// app hop the reader is in the writer's own pod; on the sidecar hop it is in the other pod,
/// which the socket does not record, so the answer is yes while any pod is tight.
fn reader_memory_tight(st: &SockState) -> bool {
    if st.role == ROLE_SC_CLIENT || st.role == ROLE_SC_SERVER {
        return true;
    }
    // SAFETY: read-only view of a hash map value, read at once.
    unsafe { ML_POLICY.get(st.netns) }.is_none_or(|p| p.flags & POLICY_MEMORY_TIGHT != 0)
}

/// Adds `bytes` to the reader's unread count; over [`UNREAD_BUDGET`] the writer's next bytes
/// take TCP, which holds it back the normal way (the reader still drains the redirected bytes
/// first, so order holds). Checked per fold, the budget is soft by less than FOLD_BYTES.
fn charge_reader(st: &mut SockState, bytes: u64) {
    let Some(unread) = ML_UNREAD.get_ptr_mut(st.peer_sk) else {
        return;
    };
    atomic_add(unread, bytes as i64);
    // SAFETY: a live map value; a racing read by the tracer only makes the budget a little soft.
    if unsafe { *unread } > UNREAD_BUDGET {
        st.flags |= SOCK_TCP_PINNED;
        inc(counter::PASS_OVER_BUDGET);
    }
}

/// Whether bytes of this socket were queued to TCP before its first message reached sk_msg:
/// data segments already sent, or bytes queued and not sent yet (`write_seq` ahead of
/// `snd_nxt`). Runs once per socket (before it knows its peer); with no offsets, false.
fn sent_around(ctx: &SkMsgContext) -> bool {
    // SAFETY: reads of read-only globals; volatile so the build-time 0 is not folded.
    let (write_seq, snd_nxt, data_segs_out) = unsafe {
        (
            ptr::read_volatile(&MESHLANE_TCP_WRITE_SEQ),
            ptr::read_volatile(&MESHLANE_TCP_SND_NXT),
            ptr::read_volatile(&MESHLANE_TCP_DATA_SEGS_OUT),
        )
    };
    if write_seq == 0 || snd_nxt == 0 || data_segs_out == 0 {
        return false;
    }
    // SAFETY: msg->sk is the sending socket; the helper returns it as a BTF-typed tcp_sock, or
    // null.
    let tp = unsafe { bpf_skc_to_tcp_sock((*ctx.msg).__bindgen_anon_3.sk.cast()) }.cast::<u8>();
    if tp.is_null() {
        return false;
    }
    // SAFETY: each offset is a u32 field of struct tcp_sock on this kernel (the loader read them
    // from its BTF, and the verifier checked these reads against it).
    let field = |off: u32| unsafe { ptr::read(tp.add(off as usize).cast::<u32>()) };
    field(data_segs_out) != 0 || field(write_seq) != field(snd_nxt)
}

fn state(ctx: &SkMsgContext) -> Option<&'static mut SockState> {
    // SAFETY: msg->sk is the sending socket, a full TCP socket in the sockhash.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: see sockops::state; no create flag, so only sockets sock_ops tracked are found.
    let p = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&ML_SOCK_STATE).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            0,
        )
    } as *mut SockState;
    // SAFETY: storage or null, valid for this run.
    unsafe { p.as_mut() }
}
