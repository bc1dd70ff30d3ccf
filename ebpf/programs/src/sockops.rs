//! sock_ops: decide which sockets belong to a local hop, stamp the outbound app's handshake with
//! a random token, and pair the two ends of each hop exactly (docs/DESIGN.md invariant 1).
//!
//! Outbound hop: the app connects to some service; istio-init's REDIRECT sends it to the sidecar's
//! capture port. NAT runs after the packets are built, so at connect time we only *predict* capture
//! from the pod's mirrored Istio settings. For a predicted capture, the ACK that completes the
//! handshake carries 64 random bits drawn for that connection in an experimental TCP option; the
//! sidecar's socket reads it from that very ACK when it becomes established. The ACK rather than
//! the SYN: it needs no TCP_SAVE_SYN on the listener, so sidecars that were listening before
//! meshlane started (and SYN-cookie handshakes) pair too, and no saved SYN is kept per
//! connection. The two ends meet on that token, so pairing is independent of ports, port reuse
//! and conntrack remaps; the sidecar's end must also see the app's own address as its peer
//! (REDIRECT rewrites only the destination). A token cannot be guessed (the socket cookie, a
//! node-wide counter, could), and a handshake from another address cannot use a copied one. A
//! stamped connection that never reaches the sidecar simply never finds its partner and stays on
//! TCP (and the daemon's sweep takes it out of the sockhash).
//!
//! Inbound hop: the sidecar connects from 127.0.0.6 (`::6` for IPv6) to the app inside the same
//! namespace, without NAT, so the two sockets are mirror 4-tuples and meet on that tuple.
//!
//! Both families: an IPv4 socket, an IPv6 socket carrying IPv4 (a dual-stack Go, Java or Node
//! socket, v4-mapped peer) and a true IPv6 socket are all seen through [`Ends`], whose addresses
//! are [`Addr`]s (IPv4 v4-mapped), so the two ends of a hop compute the same key whatever family
//! each of them uses; capture prediction follows the pod's iptables for IPv4 and its ip6tables
//! for IPv6 (docs/DESIGN.md, "Both families").
//!
//! Sidecar hop: a sidecar connects to the IP of another listed pod on this node (its upstream;
//! Istio never captures the proxy's own connections on the client side), and the server pod's
//! PREROUTING REDIRECT hands it to that pod's sidecar on its inbound capture port. Exactly like
//! the outbound hop, the client's end stamps its final ACK with a random token and the server
//! sidecar's accepted end reads it, keyed by the server pod's namespace; the server's end must
//! see the client's own address as its peer. Only addresses in [`ML_POD_IPS`] are stamped, so
//! the option never leaves the node. Both ends are sidecars, so both directions are redirected
//! (docs/DESIGN.md invariant 7 protects app sockets, and no app socket is on this hop).

use core::ptr;

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::generated::{
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie,
        bpf_load_hdr_opt, bpf_map_delete_elem, bpf_reserve_hdr_opt, bpf_sk_storage_get,
        bpf_store_hdr_opt,
    },
    programs::SockOpsContext,
};
use meshlane_common::{
    counter, hop, is_v4_mapped, partner_role, read_hint_slot, v4_mapped, Addr, Cidr4, Cidr6,
    PairKey, PodPolicy, SockState, Waiter, CONTROL_DRAIN, CONTROL_FLAGS, MAX_CIDRS, MAX_CIDRS6,
    MAX_PORTS, POLICY_INBOUND, POLICY_INBOUND_CAPTURED, POLICY_INBOUND_PORTS_LISTED,
    POLICY_INCLUDE_CIDRS, POLICY_INCLUDE_CIDRS6, POLICY_INTO_APP, POLICY_IPV6, POLICY_OUTBOUND,
    POLICY_SIDECAR_HOP, ROLE_IN_APP, ROLE_IN_PROXY, ROLE_OUT_APP, ROLE_OUT_PROXY, ROLE_SC_CLIENT,
    ROLE_SC_SERVER, SOCK_IN_MAP, SOCK_PEER_KNOWN, SOCK_READER_RULE, SOCK_READ_HINTED,
    SOCK_STAMP_PENDING, SOCK_WAITING, TCP_OPT_EXID, TCP_OPT_KIND, TCP_OPT_LEN,
};

use crate::{
    counters::{atomic_add32, fold, inc, opaque, pod},
    maps::{
        ML_CONTROL, ML_OWNERS, ML_POD_IPS, ML_POLICY, ML_READ_HINTS, ML_RENDEZVOUS, ML_SCRATCH,
        ML_SOCKS, ML_SOCK_STATE, ML_TARGETS, ML_UNREAD,
    },
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_CLOSE: u32 = 7;
const TCP_LAST_ACK: u32 = 9;
const TCPHDR_SYN: u32 = 0x02;
const EEXIST: i32 = 17;
const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;

/// 1 when this kernel lets sock_ops call `bpf_get_current_uid_gid`: the loader sets it (a
/// read-only global, so the verifier only follows the branch it selects and never sees the helper
/// call on a kernel that refuses it), and then attaches no connect hook at all.
#[unsafe(no_mangle)]
static MESHLANE_OWNER_IN_SOCKOPS: u8 = 0;

#[inline(always)]
fn owner_in_sockops() -> bool {
    // SAFETY: reads a global; volatile so the compiler does not fold the build-time value.
    unsafe { ptr::read_volatile(&MESHLANE_OWNER_IN_SOCKOPS) != 0 }
}

/// A socket's two addresses, as [`Addr`]s, and whether it carries IPv4.
struct Ends {
    local: Addr,
    remote: Addr,
    v4: bool,
}

/// The socket's ends. An IPv6 socket with a v4-mapped peer carries IPv4, and the kernel keeps
/// its IPv4 addresses in the fields sock_ops reads as `local_ip4`/`remote_ip4` from the moment
/// it connects (its IPv6 local address is filled in only after TCP_CONNECT_CB), so both IPv4
/// cases read those.
fn ends(ctx: &SockOpsContext) -> Ends {
    if ctx.family() == AF_INET6 {
        // SAFETY: reads of the live context's address fields.
        let (remote, local) = unsafe { (ip6(&(*ctx.ops).remote_ip6), ip6(&(*ctx.ops).local_ip6)) };
        if !is_v4_mapped(&remote) {
            return Ends {
                local,
                remote,
                v4: false,
            };
        }
    }
    Ends {
        local: v4_mapped(ctx.local_ip4()),
        remote: v4_mapped(ctx.remote_ip4()),
        v4: true,
    }
}

/// An IPv6 address field of the context, one 32-bit load per word: the verifier accepts only
/// loads of a context field's own size at its own offset, and a plain array copy may be
/// merged into wider loads (rejected: "dereference of modified ctx ptr").
#[inline(always)]
fn ip6(field: &[u32; 4]) -> Addr {
    // SAFETY: each element is a u32 field of the context `field` points into.
    unsafe {
        [
            ptr::read_volatile(&field[0]),
            ptr::read_volatile(&field[1]),
            ptr::read_volatile(&field[2]),
            ptr::read_volatile(&field[3]),
        ]
    }
}

pub fn handle(ctx: &SockOpsContext) {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    // State changes only come for sockets that joined: they clean up (and, under the reader
    // rule, unpair at the app's half-close) whether or not their pod is still listed, so a
    // pod removed while its sockets live leaves nothing behind in the pairing maps. The header
    // callbacks only come for a socket whose stamp is pending.
    // The kernel calls sock_ops for every TCP socket under the cgroup, several times per
    // connection (RTO and window initialisation, ECN, ...): ops meshlane does not handle return
    // before anything is looked up, and the header callbacks need only the socket's own state.
    let op = ctx.op();
    match op {
        BPF_SOCK_OPS_STATE_CB => return on_state(ctx),
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => return on_hdr_opt_len(ctx),
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB => return on_write_hdr_opt(ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB
        | BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {}
        _ => return,
    }
    // SAFETY: ctx.ops is the kernel's sock_ops context for this call.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    // SAFETY: read-only view of a hash map value; the daemon replaces values whole.
    let Some(policy) = (unsafe { ML_POLICY.get(netns) }) else {
        return;
    };
    let e = ends(ctx);
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx, &e, netns, policy),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(ctx, &e, netns, policy),
        _ => on_passive_established(ctx, &e, netns, policy),
    }
}

/// Whether `a` is the sidecar's inbound source address for the socket's family (IPv6 only
/// where the pod's ip6tables capture IPv6: elsewhere nothing makes an inbound IPv6 hop).
fn is_inbound_bind(policy: &PodPolicy, e: &Ends, a: &Addr) -> bool {
    if e.v4 {
        a[3] == policy.inbound_bind_ip4
    } else {
        policy.flags & POLICY_IPV6 != 0 && *a == policy.inbound_bind_ip6
    }
}

/// Active open, in the connecting process's context: who connects decides the role.
fn on_connect(ctx: &SockOpsContext, e: &Ends, netns: u64, policy: &PodPolicy) {
    // A socket can connect again after a failed connect or a disconnect (`connect(AF_UNSPEC)`),
    // keeping its storage and callback flags. Its last connection's pairing ended at that close
    // (the state callback cleaned up); what is left (role, peer, pins) must not carry over to
    // this connection, or its bytes could follow the old peer.
    if let Some(st) = state(ctx, false) {
        if st.flags & SOCK_IN_MAP != 0 {
            // The kernel leaves a disconnected socket in its sockhash (measured on 6.18): take
            // it out, so this connection joins afresh. Its old receive queue went with the
            // disconnect, as on plain TCP.
            let key = st.cookie;
            for map in [
                ptr::from_ref(&ML_SOCKS).cast_mut().cast(),
                ptr::from_ref(&ML_TARGETS).cast_mut().cast(),
            ] {
                // SAFETY: deleting by key from a sockhash sock_ops may update; the key lives on
                // the stack.
                unsafe { bpf_map_delete_elem(map, ptr::from_ref(&key).cast()) };
            }
        }
        if st.flags & SOCK_READ_HINTED != 0 {
            // Its entry normally went at the disconnect's close; a counted one must not be
            // forgotten here, or its read-hint slot would count it for good.
            unread_remove(st, sk_addr(ctx));
        }
        *st = SockState::default();
        // A stamp still pending would make every packet ask for header space. The state
        // callback flag stays: another program may want it, and ours ignores an empty state.
        let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    }
    // Who connects: asked here where the kernel lets sock_ops ask (6.18 and 7.x do), else what
    // the connect hook recorded earlier in this same connect(). No record: leave it alone.
    let sock = cookie(ctx);
    let uid_gid = if owner_in_sockops() {
        // SAFETY: a helper this kernel offers sock_ops (the loader checked); TCP_CONNECT_CB
        // runs inside the caller's connect(), so `current` is the caller.
        unsafe { bpf_get_current_uid_gid() }
    } else {
        // SAFETY: read-only copy of a u64 value.
        let Some(uid_gid) = (unsafe { ML_OWNERS.get(sock) }).copied() else {
            inc(counter::CONNECT_OWNER_UNKNOWN);
            return;
        };
        let _ = ML_OWNERS.remove(sock);
        uid_gid
    };
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    let dport = remote_port(ctx);
    if uid == policy.proxy_uid || gid == policy.proxy_gid {
        // The sidecar's own connections: Istio never captures them on this side. We pair its
        // inbound hop to the app, made from the inbound bind address, and its upstream to a
        // sidecar of another pod on this node.
        let (role, server_netns) = if policy.flags & POLICY_INBOUND != 0
            && is_inbound_bind(policy, e, &e.local)
            && inbound_captured(policy, dport)
        {
            (ROLE_IN_PROXY, 0)
        } else if let Some(server) = sidecar_server(e, netns, policy, dport) {
            (ROLE_SC_CLIENT, server)
        } else {
            return;
        };
        if let Some(st) = state(ctx, true) {
            st.role = role;
            st.cookie = sock;
            st.netns = netns;
            // Kept until establishment, where the key is made.
            st.pair_key.netns = server_netns;
        }
        return;
    }
    if policy.flags & POLICY_OUTBOUND == 0 {
        return;
    }
    let captured = if e.v4 {
        predict_captured(e, policy, dport)
    } else {
        predict_captured6(e, policy, dport)
    };
    if !captured {
        inc(counter::CONNECT_NOT_CAPTURED);
        return;
    }
    let Some(st) = state(ctx, true) else { return };
    st.role = ROLE_OUT_APP;
    st.cookie = sock;
    st.netns = netns;
}

/// The server pod's namespace cookie when this sidecar connection goes to another listed pod on
/// this node whose sidecar will accept it: both pods have the sidecar hop, and the server pod's
/// PREROUTING captures the port (inbound capture on, the port not excluded), whether or not
/// its inbound app hop is paired (the sidecar mode pairs no app hop). Otherwise None and
/// the connection is left alone (so nothing is stamped toward an address off this node).
fn sidecar_server(e: &Ends, netns: u64, policy: &PodPolicy, dport: u16) -> Option<u64> {
    if policy.flags & POLICY_SIDECAR_HOP == 0 {
        return None;
    }
    // SAFETY: read-only copy of a u64 value.
    let server = unsafe { ML_POD_IPS.get(e.remote) }.copied()?;
    if server == netns {
        // Its own pod's address: Istio sends that through lo by rules of its own; not this hop.
        return None;
    }
    // SAFETY: read-only view of a hash map value.
    let sp = unsafe { ML_POLICY.get(server) }?;
    // An IPv6 connection is captured only by a server pod whose ip6tables capture IPv6.
    let wanted = POLICY_SIDECAR_HOP | POLICY_INBOUND_CAPTURED | if e.v4 { 0 } else { POLICY_IPV6 };
    (sp.flags & wanted == wanted && inbound_captured(sp, dport)).then_some(server)
}

/// Mirrors istio-init's ISTIO_OUTPUT for a non-proxy process: loopback and the pod's own address
/// leave through `lo` and RETURN; excluded ports and CIDRs RETURN; with includeOutboundIPRanges
/// only those ranges are captured; everything else is REDIRECTed to the outbound capture port.
fn predict_captured(e: &Ends, policy: &PodPolicy, dport: u16) -> bool {
    let dst = e.remote[3];
    // Addresses are network order; the first octet is the lowest byte in memory.
    if dst.to_ne_bytes()[0] == 127 || dst == e.local[3] {
        return false;
    }
    if port_listed(&policy.exclude_outbound_ports, dport) {
        return false;
    }
    if in_cidrs(&policy.exclude_outbound_cidrs, policy.n_exclude_cidrs, dst) {
        return false;
    }
    if policy.flags & POLICY_INCLUDE_CIDRS != 0 {
        return in_cidrs(&policy.include_outbound_cidrs, policy.n_include_cidrs, dst);
    }
    true
}

/// The same for IPv6, after istio-iptables' ip6tables rules: nothing is captured unless the pod
/// has them; `::1` and the pod's own address RETURN; then the same ports, and the IPv6 entries of
/// the CIDR lists (an include list without IPv6 entries captures no IPv6 destination).
fn predict_captured6(e: &Ends, policy: &PodPolicy, dport: u16) -> bool {
    if policy.flags & POLICY_IPV6 == 0 {
        return false;
    }
    let dst = &e.remote;
    if *dst == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])] || *dst == e.local {
        return false;
    }
    if port_listed(&policy.exclude_outbound_ports, dport) {
        return false;
    }
    if in_cidrs6(
        &policy.exclude_outbound_cidrs6,
        policy.n_exclude_cidrs6,
        dst,
    ) {
        return false;
    }
    if policy.flags & POLICY_INCLUDE_CIDRS6 != 0 {
        return in_cidrs6(
            &policy.include_outbound_cidrs6,
            policy.n_include_cidrs6,
            dst,
        );
    }
    true
}

fn on_hdr_opt_len(ctx: &SockOpsContext) {
    if is_syn(ctx) {
        return;
    }
    let Some(st) = state(ctx, false) else { return };
    if st.flags & SOCK_STAMP_PENDING != 0 {
        // SAFETY: allowed in HDR_OPT_LEN_CB; the kernel checks the room left in the header.
        unsafe { bpf_reserve_hdr_opt(ctx.ops, TCP_OPT_LEN as u32, 0) };
    }
}

fn on_write_hdr_opt(ctx: &SockOpsContext) {
    if is_syn(ctx) {
        return;
    }
    let Some(st) = state(ctx, false) else { return };
    if st.flags & SOCK_STAMP_PENDING == 0 {
        return;
    }
    // One stamp, on the first segment after the handshake (the ACK that completes it on the
    // sidecar's side); then the per-packet header callbacks go off again.
    st.flags &= !SOCK_STAMP_PENDING;
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    let exid = TCP_OPT_EXID.to_be_bytes();
    let c = st.pair_key.token_value().to_ne_bytes();
    let opt: [u8; TCP_OPT_LEN as usize] = [
        TCP_OPT_KIND,
        TCP_OPT_LEN,
        exid[0],
        exid[1],
        c[0],
        c[1],
        c[2],
        c[3],
        c[4],
        c[5],
        c[6],
        c[7],
    ];
    // SAFETY: opt lives on the stack for the call; length matches the reservation.
    let ret = unsafe {
        bpf_store_hdr_opt(
            ctx.ops,
            ptr::from_ref(&opt).cast_mut().cast(),
            TCP_OPT_LEN as u32,
            0,
        )
    };
    if ret == 0 {
        inc(counter::STAMPS_WRITTEN);
    }
}

fn on_active_established(ctx: &SockOpsContext, e: &Ends, netns: u64, policy: &PodPolicy) {
    let Some(st) = state(ctx, false) else { return };
    let key = match st.role {
        ROLE_OUT_APP => PairKey::token(netns, random_token()),
        // The sidecar's end: the app is its remote side.
        ROLE_IN_PROXY => PairKey::tuple(netns, e.remote, ctx.local_port() as u16, remote_port(ctx)),
        ROLE_SC_CLIENT => PairKey::sidecar(st.pair_key.netns, random_token()),
        _ => return,
    };
    // The stamp carries this key's token.
    st.pair_key = key;
    // SAFETY: reading a u32 field of the live context.
    if unsafe { (*ctx.ops).data_segs_out } != 0 {
        // TCP Fast Open data already left on TCP: redirecting later bytes would reorder them.
        inc(counter::SKIP_EARLY_DATA);
        return;
    }
    // A socket that could not join is never stamped: no sidecar end may pair with it.
    if join(ctx, e, st, key, policy) && (st.role == ROLE_OUT_APP || st.role == ROLE_SC_CLIENT) {
        // The kernel sends the handshake's final ACK right after this callback; the flag makes it
        // ask us for option space (HDR_OPT_LEN) and then for the bytes (WRITE_HDR_OPT).
        st.flags |= SOCK_STAMP_PENDING;
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    }
}

fn on_passive_established(ctx: &SockOpsContext, e: &Ends, netns: u64, policy: &PodPolicy) {
    let lport = ctx.local_port() as u16;
    let (role, key) = if policy.flags & POLICY_OUTBOUND != 0 && lport == policy.outbound_port {
        // The sidecar accepted a captured connection. Only a stamped handshake names its app
        // socket; unstamped ones (the sidecar's own upstreams captured back, conntrack surprises,
        // apps in other pods) are left alone.
        let Some(token) = load_token(ctx) else {
            inc(counter::STAMPS_MISSING);
            return;
        };
        inc(counter::STAMPS_FOUND);
        (ROLE_OUT_PROXY, PairKey::token(netns, token))
    } else if policy.flags & POLICY_INBOUND != 0
        && is_inbound_bind(policy, e, &e.remote)
        && inbound_captured(policy, lport)
    {
        // The app's end: the sidecar is its remote side.
        (
            ROLE_IN_APP,
            PairKey::tuple(netns, e.local, remote_port(ctx), lport),
        )
    } else if policy.flags & POLICY_SIDECAR_HOP != 0 && lport == policy.inbound_port {
        // The sidecar accepted a captured inbound connection. Only one a sidecar on this node
        // stamped is paired; the rest (other nodes, unmeshed clients) are plain inbound traffic
        // and are not counted.
        let Some(token) = load_token(ctx) else {
            return;
        };
        inc(counter::STAMPS_FOUND);
        (ROLE_SC_SERVER, PairKey::sidecar(netns, token))
    } else {
        return;
    };
    // SAFETY: reading a u64 field of the live context.
    if unsafe { (*ctx.ops).bytes_received } != 0 {
        inc(counter::SKIP_EARLY_DATA);
        return;
    }
    let Some(st) = state(ctx, true) else { return };
    st.role = role;
    st.cookie = cookie(ctx);
    st.netns = netns;
    join(ctx, e, st, key, policy);
}

/// A joined socket changes state: at the app's own half-close it leaves the sockhash (reader
/// rule), at close it drops what it left in the pairing maps (the sockhash forgets it itself).
fn on_state(ctx: &SockOpsContext) {
    let new_state = ctx.arg(1);
    if new_state == TCP_LAST_ACK {
        // It closed after its peer did: it sends nothing more.
        if let Some(st) = state(ctx, false) {
            fold(st);
        }
        return;
    }
    if new_state == TCP_FIN_WAIT1 {
        on_own_half_close(ctx);
        return;
    }
    if new_state != TCP_CLOSE {
        return;
    }
    let Some(st) = state(ctx, false) else { return };
    fold(st);
    if st.flags & SOCK_READER_RULE == 0 {
        // It may have received redirected bytes (reader-rule app ends never do).
        unread_remove(st, sk_addr(ctx));
    }
    if st.flags & SOCK_WAITING != 0 {
        // The first end owns the pair's entry. The kernel removes a closing socket from its
        // sockhash, so the partner's next redirect fails and that direction moves to TCP for
        // good, which is safe: nothing it sends can overtake bytes already queued for us (we
        // are closing anyway).
        // SAFETY: read-only view of a hash map value.
        if let Some(w) = unsafe { ML_RENDEZVOUS.get(st.pair_key) } {
            if w.cookie == st.cookie {
                let _ = ML_RENDEZVOUS.remove(st.pair_key);
            }
        }
    }
}

/// The app shut down its sending side (`shutdown(SHUT_WR)`; this runs inside that call, under
/// the socket lock). Under the reader rule nothing was ever redirected *into* the app's socket,
/// so leaving the sockhash now loses nothing, and its reads from here on take the kernel's TCP
/// path again: a blocking read woken by its own FIN being acknowledged waits for the reply as
/// on plain TCP instead of returning EAGAIN (`tcp_bpf_recvmsg`). It sends nothing more, so the
/// sk_msg program is no longer needed either. Two-way sockets stay: they may hold queued bytes.
fn on_own_half_close(ctx: &SockOpsContext) {
    let Some(st) = state(ctx, false) else { return };
    fold(st);
    if st.flags & (SOCK_READER_RULE | SOCK_IN_MAP) != SOCK_READER_RULE | SOCK_IN_MAP {
        return;
    }
    st.flags &= !SOCK_IN_MAP;
    let key = st.cookie;
    // SAFETY: deleting by key from the sockhash sock_ops may update; the key lives on the stack.
    let ret = unsafe {
        bpf_map_delete_elem(
            ptr::from_ref(&ML_SOCKS).cast_mut().cast(),
            ptr::from_ref(&key).cast(),
        )
    };
    if ret == 0 {
        inc(counter::APP_UNPAIRED_AT_HALF_CLOSE);
    }
}

/// Put this end in the sockhash, then meet the other end at `key`. The second end to arrive
/// writes the pair both ways, so whoever sees a peer knows both are already in the sockhash.
///
/// Under the reader rule (the default; docs/DESIGN.md invariant 7) the sidecar's end goes into
/// [`ML_TARGETS`], which has no program, so it only ever *receives* redirected bytes and its own
/// sends stay on plain TCP; the app's end goes into [`ML_SOCKS`] so sk_msg sees what it sends,
/// and never receives a redirected byte. With the pod's two-way opt-in both go into `ML_SOCKS`,
/// and so do both ends of the sidecar hop (no app socket there).
/// Returns whether this end is in a sockhash (whether or not its partner is there yet); an end
/// that finds no room in the sockhash, the unread map or the pairing map is in none.
fn join(
    ctx: &SockOpsContext,
    e: &Ends,
    st: &mut SockState,
    key: PairKey,
    policy: &PodPolicy,
) -> bool {
    if draining() {
        return false;
    }
    let sidecar_hop = st.role == ROLE_SC_CLIENT || st.role == ROLE_SC_SERVER;
    let reader_rule = !sidecar_hop && policy.flags & POLICY_INTO_APP == 0;
    let sidecar_end = sidecar_hop || st.role == ROLE_OUT_PROXY || st.role == ROLE_IN_PROXY;
    // Only a socket that may receive redirected bytes needs unread accounting; it must be in
    // place before a peer can redirect to it.
    let receives = sidecar_end || !reader_rule;
    let sk = sk_addr(ctx);
    if receives && !unread_insert(st, sk) {
        inc(counter::PEERS_FULL);
        return false;
    }
    let mut sock_key = st.cookie;
    // SAFETY: ctx.ops is the live context of an established callback, where sockhash updates
    // are allowed.
    let ops = unsafe { &mut *ctx.ops };
    let inserted = if reader_rule && sidecar_end {
        ML_TARGETS.update(&mut sock_key, ops, BPF_NOEXIST as u64)
    } else {
        ML_SOCKS.update(&mut sock_key, ops, BPF_NOEXIST as u64)
    };
    if inserted.is_err() {
        // Nothing of this socket may stay behind: it never joined, so no state callback of
        // ours will come to clean up.
        if receives {
            unread_remove(st, sk);
        }
        inc(counter::SOCKHASH_FULL);
        return false;
    }
    st.flags |= SOCK_IN_MAP;
    if reader_rule && !sidecar_end {
        st.flags |= SOCK_READER_RULE;
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);

    let me = Waiter {
        cookie: st.cookie,
        role: st.role,
        two_way: u8::from(!reader_rule),
        _pad: [0; 6],
        ip: if st.role == ROLE_OUT_APP || st.role == ROLE_SC_CLIENT {
            e.local
        } else {
            [0; 4]
        },
        partner: 0,
        sk,
        partner_sk: 0,
        netns: st.netns,
    };
    match ML_RENDEZVOUS.insert(key, me, BPF_NOEXIST as u64) {
        Ok(()) => {
            st.pair_key = key;
            st.flags |= SOCK_WAITING;
        }
        Err(err) if err == -EEXIST => {
            let Some(other) = ML_RENDEZVOUS.get_ptr_mut(key) else {
                inc(counter::PAIR_REJECTED);
                return true;
            };
            // SAFETY: a live map value; only the first end's close removes it, and a value
            // removed meanwhile stays readable for this run (RCU).
            let other = unsafe { &mut *other };
            // Exactly one app end and one sidecar end of the same hop kind may meet, once, both
            // joined under the same mode (the pod's opt-in may change between the two joins).
            // A token pair's accepting end must have been connected from the connecting end's
            // own address.
            let accepted_token_end = st.role == ROLE_OUT_PROXY || st.role == ROLE_SC_SERVER;
            if other.role != partner_role(st.role)
                || other.cookie == st.cookie
                || other.two_way != me.two_way
                || other.partner != 0
                || (accepted_token_end && other.ip != e.remote)
            {
                inc(counter::PAIR_REJECTED);
                return true;
            }
            // Both ends are in a sockhash now, so whoever sees a partner may redirect to it.
            other.partner_sk = sk;
            other.partner = st.cookie;
            st.peer = other.cookie;
            st.peer_sk = other.sk;
            st.flags |= SOCK_PEER_KNOWN;
            let hop = hop(st.role);
            inc(counter::pairs(hop));
            let credit = |s: &mut meshlane_common::PodStats| {
                if let Some(n) = s.pairs.get_mut(opaque(hop) as usize) {
                    *n += 1
                }
            };
            pod(st.netns, credit);
            // The sidecar hop joins two pods: each counts the pair.
            if other.netns != st.netns {
                pod(other.netns, credit);
            }
        }
        Err(_) => {
            // No room to wait for a partner (the key is not there, or the insert would have
            // said EEXIST, so no partner knows this socket and nothing was redirected to it):
            // leave the sockhash at once and report "not joined", so this end is never stamped
            // and never sits in a sockhash for a partner that cannot find it.
            let map = if reader_rule && sidecar_end {
                ptr::from_ref(&ML_TARGETS).cast_mut().cast()
            } else {
                ptr::from_ref(&ML_SOCKS).cast_mut().cast()
            };
            // SAFETY: deleting by key from a sockhash sock_ops may update; the key lives on the
            // stack.
            unsafe { bpf_map_delete_elem(map, ptr::from_ref(&sock_key).cast()) };
            if receives {
                unread_remove(st, sk);
            }
            st.flags &= !(SOCK_IN_MAP | SOCK_READER_RULE);
            inc(counter::RENDEZVOUS_FULL);
            return false;
        }
    }
    true
}

/// Makes `sk`'s entry in [`ML_UNREAD`], counted in its read-hint slot first, so the read tracer
/// never skips a socket that has an entry. False (and nothing left behind) when the map is full
/// or the address cannot be hashed.
fn unread_insert(st: &mut SockState, sk: u64) -> bool {
    let Some(slot) = address(sk).map(read_hint_slot) else {
        return false;
    };
    read_hint(slot, 1);
    if ML_UNREAD.insert(sk, 0, BPF_ANY as u64).is_err() {
        read_hint(slot, -1);
        return false;
    }
    st.read_hint = slot;
    st.flags |= SOCK_READ_HINTED;
    true
}

/// Removes `sk`'s entry from [`ML_UNREAD`], then its count, if this socket's entry was counted
/// (one another build made was not, and taking a count for it could hide a counted one).
fn unread_remove(st: &mut SockState, sk: u64) {
    if ML_UNREAD.remove(sk).is_ok() && st.flags & SOCK_READ_HINTED != 0 {
        read_hint(st.read_hint, -1);
    }
    st.flags &= !SOCK_READ_HINTED;
}

fn read_hint(slot: u16, n: i32) {
    if let Some(count) = ML_READ_HINTS.get_ptr_mut(u32::from(slot)) {
        atomic_add32(count, n);
    }
}

/// `sk`, the context's socket pointer, as a number: the verifier refuses arithmetic on a
/// pointer, but a value read back from a map is a plain number (the loader is privileged, so it
/// may store a pointer there).
fn address(sk: u64) -> Option<u64> {
    let scratch = ML_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a live per-CPU array value.
    let n = unsafe {
        ptr::write_volatile(scratch, sk);
        ptr::read_volatile(scratch)
    };
    // A sock_ops run from softirq on this CPU may have written the slot in between (runs stay
    // on their CPU, but may nest): then it is not our address, and the caller does without.
    // The check compares a copy the compiler cannot see through: told `n == sk`, it would use
    // the pointer for `n` from there on, which is exactly what the verifier refuses.
    let copy = opaque64(n);
    (copy == sk).then_some(n)
}

/// `x`, hidden from the optimiser (see `counters::opaque`).
#[inline(always)]
fn opaque64(x: u64) -> u64 {
    // SAFETY: reads a live local.
    unsafe { ptr::read_volatile(&x) }
}

/// 64 random bits for one connection's token (never 0, which no key uses).
fn random_token() -> u64 {
    // SAFETY: plain helper without arguments.
    let (hi, lo) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    ((u64::from(hi) << 32) | u64::from(lo)).max(1)
}

/// The token from the stamp on the segment that completed the handshake.
fn load_token(ctx: &SockOpsContext) -> Option<u64> {
    let exid = TCP_OPT_EXID.to_be_bytes();
    // Search key for an experimental option: kind, then a "length" of 4 meaning kind+len+ExID.
    let mut buf: [u8; TCP_OPT_LEN as usize] =
        [TCP_OPT_KIND, 4, exid[0], exid[1], 0, 0, 0, 0, 0, 0, 0, 0];
    // SAFETY: buf is writable for its full length; the helper copies at most that much.
    let ret = unsafe {
        bpf_load_hdr_opt(
            ctx.ops,
            ptr::from_mut(&mut buf).cast(),
            TCP_OPT_LEN as u32,
            0,
        )
    };
    if ret != TCP_OPT_LEN as i64 || buf[1] != TCP_OPT_LEN {
        return None;
    }
    Some(u64::from_ne_bytes([
        buf[4], buf[5], buf[6], buf[7], buf[8], buf[9], buf[10], buf[11],
    ]))
}

/// `remote_port` is the network-order port in the upper 16 bits on little-endian hosts.
fn remote_port(ctx: &SockOpsContext) -> u16 {
    u32::from_be(ctx.remote_port()) as u16
}

/// Whether `ip` is in one of the first `n` of `cidrs`. The index goes through `opaque` and is
/// checked on every turn: the optimiser otherwise turns the loop into a pointer walk whose bound
/// the 6.1 verifier loses ("invalid access to map value"), and the program does not load there.
fn in_cidrs(cidrs: &[Cidr4; MAX_CIDRS], n: u16, ip: u32) -> bool {
    for i in 0..MAX_CIDRS as u32 {
        let i = opaque(i) as usize;
        if i >= n as usize {
            return false;
        }
        match cidrs.get(i) {
            Some(c) if c.contains(ip) => return true,
            Some(_) => {}
            None => return false,
        }
    }
    false
}

/// [`in_cidrs`] for IPv6, with the same care for the 6.1 verifier.
fn in_cidrs6(cidrs: &[Cidr6; MAX_CIDRS6], n: u16, ip: &Addr) -> bool {
    for i in 0..MAX_CIDRS6 as u32 {
        let i = opaque(i) as usize;
        if i >= n as usize {
            return false;
        }
        match cidrs.get(i) {
            Some(c) if c.contains(ip) => return true,
            Some(_) => {}
            None => return false,
        }
    }
    false
}

/// Whether the pod's PREROUTING sends a connection to app port `port` to its sidecar: the port
/// is in Istio's includeInboundPorts list, or (with `*`, the default) not in excludeInboundPorts.
fn inbound_captured(policy: &PodPolicy, port: u16) -> bool {
    port_listed(&policy.inbound_ports, port) == (policy.flags & POLICY_INBOUND_PORTS_LISTED != 0)
}

fn port_listed(ports: &[u16; MAX_PORTS], port: u16) -> bool {
    for p in ports.iter() {
        if *p == 0 {
            return false;
        }
        if *p == port {
            return true;
        }
    }
    false
}

fn is_syn(ctx: &SockOpsContext) -> bool {
    // SAFETY: reading a u32 field of the live context.
    let flags = unsafe { (*ctx.ops).skb_tcp_flags };
    flags & TCPHDR_SYN != 0
}

/// The socket's kernel address: the key the read tracer sees (`struct sock *`). Exposing it to
/// a map needs the privilege to read pointers (CAP_PERFMON), which the daemon has.
fn sk_addr(ctx: &SockOpsContext) -> u64 {
    // SAFETY: reads a pointer field of the live context; it is never dereferenced.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as u64 }
}

fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: plain helper on the live context.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

fn draining() -> bool {
    ML_CONTROL
        .get(CONTROL_FLAGS)
        .is_some_and(|f| *f & CONTROL_DRAIN != 0)
}

/// This socket's [`SockState`], created zeroed when `create` is set.
fn state(ctx: &SockOpsContext, create: bool) -> Option<&'static mut SockState> {
    // SAFETY: `sk` may be null (request sockets); checked before use.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE
    } else {
        0
    };
    // SAFETY: the map pointer is the BTF map definition the loader relocates; sk is a full socket.
    let p = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&ML_SOCK_STATE).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            flags,
        )
    } as *mut SockState;
    // SAFETY: the kernel returns the socket's storage or null; it outlives this program run.
    unsafe { p.as_mut() }
}
