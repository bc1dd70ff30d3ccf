//! Types shared by meshlane's eBPF programs and its daemon: map keys, map values, counter indices.
//!
//! Every type here crosses the kernel/user boundary byte for byte, so each is `#[repr(C)]`, `Copy`,
//! has no `bool` and no implicit padding (padding is a named field), and has its size pinned by a
//! `const` assertion. IPv4 addresses are kept exactly as the kernel hands them to BPF: the four
//! address bytes in network order, read as a native `u32` (`u32::from_ne_bytes(ip.octets())`).
//! Where a field holds either family it is an [`Addr`]: IPv6's sixteen bytes as four such words,
//! with an IPv4 address in its v4-mapped form (`::ffff:a.b.c.d`), which is also how the kernel
//! shows the IPv4 peer of a dual-stack socket. Ports are host order unless a field says otherwise.
#![no_std]

use core::mem::size_of;

/// Experimental TCP option kind (RFC 6994) that carries the outbound hop's pairing token: 64
/// random bits drawn for that connection (never the socket cookie, which is a node-wide counter
/// anyone can guess).
pub const TCP_OPT_KIND: u8 = 253;
/// The option's ExID, "ML": lets the kernel's option search skip other users of kind 253.
pub const TCP_OPT_EXID: u16 = 0x4d4c;
/// kind + length + ExID (2) + token (8).
pub const TCP_OPT_LEN: u8 = 12;

/// Maximum excluded ports per direction in a [`PodPolicy`].
pub const MAX_PORTS: usize = 32;
/// Maximum CIDRs per list in a [`PodPolicy`].
pub const MAX_CIDRS: usize = 16;
/// Maximum IPv6 CIDRs per list in a [`PodPolicy`] (each takes 32 bytes of every policy entry).
pub const MAX_CIDRS6: usize = 8;

/// An address of either family, as four network-order words (see the crate docs); IPv4 is
/// v4-mapped.
pub type Addr = [u32; 4];

/// The third word of a v4-mapped address: bytes `00 00 ff ff`.
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `::ffff:a.b.c.d` for an IPv4 address in network order.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> Addr {
    [0, 0, V4_MAPPED_PREFIX, ip4]
}

/// Whether an [`Addr`] is an IPv4 address in its v4-mapped form.
#[inline(always)]
pub const fn is_v4_mapped(a: &Addr) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_PREFIX
}

/// [`PodPolicy::flags`]: pair the outbound hop (app -> iptables REDIRECT -> sidecar).
pub const POLICY_OUTBOUND: u32 = 1;
/// [`PodPolicy::flags`]: pair the inbound hop (sidecar from `inbound_bind_ip4` -> app).
pub const POLICY_INBOUND: u32 = 2;
/// [`PodPolicy::flags`]: `include_outbound_cidrs` is a real list (absent means Istio's `*`).
pub const POLICY_INCLUDE_CIDRS: u32 = 4;
/// [`PodPolicy::flags`]: the opt-in "two-way" mode: also redirect sidecar -> app, into the app's
/// socket. Without it (the default, the reader rule of docs/DESIGN.md invariant 7) only directions the
/// sidecar reads are redirected, the sidecar's sockets sit in [`maps::TARGETS`] (no programs,
/// so their sends stay on plain TCP) and the app's socket never receives a redirected byte.
pub const POLICY_INTO_APP: u32 = 8;
/// [`PodPolicy::flags`]: pair this pod's sidecar with the sidecars of other pods on this node
/// (the client sidecar's upstream connection to a local pod IP, and the server sidecar's socket
/// accepted on `inbound_port`). Both pods must have it. Both ends are sidecars, so both
/// directions are redirected whatever the pod's mode (the reader rule protects apps only).
pub const POLICY_SIDECAR_HOP: u32 = 16;
/// [`PodPolicy::flags`]: the pod's PREROUTING captures inbound connections to `inbound_port`
/// (a fact from discovery, set whatever the pod's mode). The sidecar hop's client end is stamped
/// only toward a pod with this and [`POLICY_SIDECAR_HOP`]; [`POLICY_INBOUND`] is only whether
/// the inbound *app* hop is paired, which the sidecar mode turns off.
pub const POLICY_INBOUND_CAPTURED: u32 = 32;
/// [`PodPolicy::flags`]: [`PodPolicy::inbound_ports`] lists the ports inbound capture covers
/// (Istio's includeInboundPorts as a port list); without it, the ports it leaves out.
pub const POLICY_INBOUND_PORTS_LISTED: u32 = 64;
/// [`PodPolicy::flags`]: the pod's ip6tables capture IPv6 the way its iptables capture IPv4
/// (istio-iptables with IPv6 enabled: a dual-stack or IPv6 pod). Without it no true IPv6 hop of
/// the pod is paired: nothing redirects one to its sidecar.
pub const POLICY_IPV6: u32 = 128;
/// [`PodPolicy::flags`]: `include_outbound_cidrs6` is a real list (absent means `*`). With
/// none listed, no IPv6 destination is captured (an include list of IPv4 ranges only).
pub const POLICY_INCLUDE_CIDRS6: u32 = 256;
/// [`PodPolicy::flags`]: a memory group of the pod has less room than the daemon's headroom
/// (`--memory-headroom`). A redirect charges the reader's memory group from inside the writer's
/// `sendmsg`, and a charge that fails there is the writer's `ENOMEM` where plain TCP would drop
/// and retransmit (docs/DESIGN.md, "Kernel facts"). So while this is set the daemon clears the
/// pod's hop bits (no new pairs) and sk_msg moves the pod's redirected directions to TCP at
/// their next message, with [`CONTROL_MEMORY_TIGHT`].
pub const POLICY_MEMORY_TIGHT: u32 = 512;

/// An IPv4 prefix, both fields in network byte order as the kernel stores addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr4 {
    pub addr: u32,
    pub mask: u32,
}

impl Cidr4 {
    #[inline(always)]
    pub fn contains(&self, ip: u32) -> bool {
        ip & self.mask == self.addr & self.mask
    }
}

/// An IPv6 prefix, address and mask as four network-order words each.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr6 {
    pub addr: Addr,
    pub mask: Addr,
}

impl Cidr6 {
    #[inline(always)]
    pub fn contains(&self, ip: &Addr) -> bool {
        (ip[0] ^ self.addr[0]) & self.mask[0] == 0
            && (ip[1] ^ self.addr[1]) & self.mask[1] == 0
            && (ip[2] ^ self.addr[2]) & self.mask[2] == 0
            && (ip[3] ^ self.addr[3]) & self.mask[3] == 0
    }
}

/// What meshlane knows about one pod, keyed in the policy map by its network-namespace cookie.
///
/// It mirrors the pod's istio-init capture rules so that sock_ops can predict, at connect time,
/// which connections iptables will REDIRECT to the sidecar. Only those are stamped (docs/DESIGN.md, "Pairing under Istio's NAT").
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    /// The sidecar's uid (Istio: 1337). Its own connections are never stamped.
    pub proxy_uid: u32,
    /// The sidecar's gid (Istio: 1337); Istio exempts it as well as the uid.
    pub proxy_gid: u32,
    /// The port the REDIRECT rule sends outbound traffic to (Istio: 15001).
    pub outbound_port: u16,
    /// The port inbound traffic is redirected to (Istio: 15006).
    pub inbound_port: u16,
    /// `POLICY_*` bits.
    pub flags: u32,
    /// Source address the sidecar binds for its inbound hop (Istio: 127.0.0.6), network order.
    pub inbound_bind_ip4: u32,
    pub n_exclude_cidrs: u16,
    pub n_include_cidrs: u16,
    /// Destination ports Istio does not capture (excludeOutboundPorts); 0 marks an empty slot.
    pub exclude_outbound_ports: [u16; MAX_PORTS],
    /// App ports Istio does not capture inbound (excludeInboundPorts), or with
    /// [`POLICY_INBOUND_PORTS_LISTED`] the only ones it captures (includeInboundPorts as a list,
    /// where istio-iptables ignores the exclusions); 0 marks an empty slot.
    pub inbound_ports: [u16; MAX_PORTS],
    /// excludeOutboundIPRanges; the first `n_exclude_cidrs` are valid.
    pub exclude_outbound_cidrs: [Cidr4; MAX_CIDRS],
    /// includeOutboundIPRanges when `POLICY_INCLUDE_CIDRS` is set; the first `n_include_cidrs`.
    pub include_outbound_cidrs: [Cidr4; MAX_CIDRS],
    /// The IPv6 source address of the sidecar's inbound hop (Istio: `::6`), with [`POLICY_IPV6`].
    pub inbound_bind_ip6: Addr,
    pub n_exclude_cidrs6: u16,
    pub n_include_cidrs6: u16,
    pub _pad: u32,
    /// The IPv6 entries of excludeOutboundIPRanges; the first `n_exclude_cidrs6` are valid.
    pub exclude_outbound_cidrs6: [Cidr6; MAX_CIDRS6],
    /// The IPv6 entries of includeOutboundIPRanges with [`POLICY_INCLUDE_CIDRS6`].
    pub include_outbound_cidrs6: [Cidr6; MAX_CIDRS6],
}
const _: () = assert!(
    size_of::<PodPolicy>()
        == 24 + 2 * 2 * MAX_PORTS + 2 * 8 * MAX_CIDRS + 16 + 8 + 2 * 32 * MAX_CIDRS6
);

impl PodPolicy {
    /// Istio's defaults: uid/gid 1337, 15001/15006, 127.0.0.6 and `::6`, both hops, nothing
    /// excluded, IPv4 only.
    pub const fn istio_default() -> Self {
        PodPolicy {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            flags: POLICY_OUTBOUND | POLICY_INBOUND | POLICY_INBOUND_CAPTURED,
            inbound_bind_ip4: u32::from_ne_bytes([127, 0, 0, 6]),
            n_exclude_cidrs: 0,
            n_include_cidrs: 0,
            exclude_outbound_ports: [0; MAX_PORTS],
            inbound_ports: [0; MAX_PORTS],
            exclude_outbound_cidrs: [Cidr4 { addr: 0, mask: 0 }; MAX_CIDRS],
            include_outbound_cidrs: [Cidr4 { addr: 0, mask: 0 }; MAX_CIDRS],
            inbound_bind_ip6: [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 6])],
            n_exclude_cidrs6: 0,
            n_include_cidrs6: 0,
            _pad: 0,
            exclude_outbound_cidrs6: [Cidr6 {
                addr: [0; 4],
                mask: [0; 4],
            }; MAX_CIDRS6],
            include_outbound_cidrs6: [Cidr6 {
                addr: [0; 4],
                mask: [0; 4],
            }; MAX_CIDRS6],
        }
    }
}

/// [`PairKey::kind`]: outbound hop, rendezvous on the random token carried in the handshake's
/// final ACK.
pub const PAIR_TOKEN: u32 = 1;
/// [`PairKey::kind`]: inbound hop, rendezvous on the connection's unordered 4-tuple.
pub const PAIR_TUPLE: u32 = 2;
/// [`PairKey::kind`]: sidecar hop, rendezvous on a random token like [`PAIR_TOKEN`], keyed by
/// the *server* pod's namespace (the client's end learns it from [`maps::POD_IPS`]).
pub const PAIR_SIDECAR: u32 = 3;

/// Where the two ends of one local hop meet. Both ends compute the same key independently.
///
/// Token: `addr[0]`/`addr[1]` are the low/high halves of the connection's random token, the
/// rest is 0. Tuple (the inbound hop, where one end is always the sidecar's inbound bind
/// address): `addr` is the app's address ([`Addr`]), `ports` = sidecar port << 16 | app port.
/// The bind address is fixed per pod and family (a v4-mapped `addr` says which), so the key
/// names the whole 4-tuple, and inside one network namespace the kernel keeps 4-tuples unique:
/// it names exactly one connection; the namespace cookie keeps pods apart (invariant 3).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairKey {
    pub netns: u64,
    pub kind: u32,
    pub ports: u32,
    pub addr: Addr,
}
const _: () = assert!(size_of::<PairKey>() == 32);

impl PairKey {
    #[inline(always)]
    pub fn token(netns: u64, token: u64) -> Self {
        PairKey {
            netns,
            kind: PAIR_TOKEN,
            ports: 0,
            addr: [token as u32, (token >> 32) as u32, 0, 0],
        }
    }

    #[inline(always)]
    pub fn sidecar(server_netns: u64, token: u64) -> Self {
        PairKey {
            kind: PAIR_SIDECAR,
            ..Self::token(server_netns, token)
        }
    }

    /// The token of a [`PairKey::token`] or [`PairKey::sidecar`] key.
    #[inline(always)]
    pub fn token_value(&self) -> u64 {
        (u64::from(self.addr[1]) << 32) | u64::from(self.addr[0])
    }

    /// The inbound hop's key: the app's address, the sidecar's port, the app's port (host order).
    #[inline(always)]
    pub fn tuple(netns: u64, app: Addr, sidecar_port: u16, app_port: u16) -> Self {
        PairKey {
            netns,
            kind: PAIR_TUPLE,
            ports: ((sidecar_port as u32) << 16) | app_port as u32,
            addr: app,
        }
    }
}

/// Socket roles. A role is also the "direction" of the bytes that socket sends.
pub const ROLE_NONE: u8 = 0;
/// The app's socket on the outbound hop (connects; bytes go app -> sidecar).
pub const ROLE_OUT_APP: u8 = 1;
/// The sidecar's accepted socket on the outbound capture port (bytes go sidecar -> app).
pub const ROLE_OUT_PROXY: u8 = 2;
/// The sidecar's socket on the inbound hop (connects from 127.0.0.6; bytes go sidecar -> app).
pub const ROLE_IN_PROXY: u8 = 3;
/// The app's accepted socket on the inbound hop (bytes go app -> sidecar).
pub const ROLE_IN_APP: u8 = 4;
/// The client sidecar's upstream socket on the sidecar hop (connects to a pod on this node;
/// bytes go client sidecar -> server sidecar).
pub const ROLE_SC_CLIENT: u8 = 5;
/// The server sidecar's socket accepted on its inbound capture port from a sidecar on this
/// node (bytes go server sidecar -> client sidecar).
pub const ROLE_SC_SERVER: u8 = 6;
pub const ROLES: usize = 6;

/// The role that completes a pair with `role`, or `ROLE_NONE`.
#[inline(always)]
pub fn partner_role(role: u8) -> u8 {
    match role {
        ROLE_OUT_APP => ROLE_OUT_PROXY,
        ROLE_OUT_PROXY => ROLE_OUT_APP,
        ROLE_IN_PROXY => ROLE_IN_APP,
        ROLE_IN_APP => ROLE_IN_PROXY,
        ROLE_SC_CLIENT => ROLE_SC_SERVER,
        ROLE_SC_SERVER => ROLE_SC_CLIENT,
        _ => ROLE_NONE,
    }
}

/// Value of the rendezvous map: the first end to arrive, and once the second end has met it,
/// the pair itself. The entry lives until the first end closes; the second end keeps its
/// partner's cookie in its own [`SockState`], the first end reads `partner` from here once.
/// (One entry per pair instead of a separate peers map halves the map updates per connection.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Waiter {
    pub cookie: u64,
    pub role: u8,
    /// 1 when this end joined under the pod's two-way opt-in ([`POLICY_INTO_APP`]). Both ends
    /// must agree: a sidecar end that would redirect into an app end joined under the reader
    /// rule (which leaves the sockhash at its half-close) could strand bytes there.
    pub two_way: u8,
    pub _pad: [u8; 6],
    /// Token pairs: the connecting socket's local address ([`Addr`]). The accepting end must see
    /// it as its remote address (REDIRECT rewrites the destination only), so a handshake from
    /// anywhere else cannot pair even with the right token.
    pub ip: Addr,
    /// The second end's cookie, written once both ends are in a sockhash; 0 while waiting.
    pub partner: u64,
    /// The first end's kernel address (`struct sock *`): its key in [`maps::UNREAD`].
    pub sk: u64,
    /// The second end's kernel address, written with `partner`.
    pub partner_sk: u64,
    /// The first end's pod (network-namespace cookie): the second end credits the pair to both
    /// pods when they differ (the sidecar hop).
    pub netns: u64,
}
const _: () = assert!(size_of::<Waiter>() == 64);

/// [`SockState::flags`]: the next non-SYN segment this socket sends carries the token option.
pub const SOCK_STAMP_PENDING: u8 = 1;
/// [`SockState::flags`]: this socket owns the rendezvous entry under `pair_key`.
pub const SOCK_WAITING: u8 = 2;
/// [`SockState::flags`]: bytes from this socket once took the TCP path; they stay there
/// (invariant 2, first byte or never).
pub const SOCK_TCP_PINNED: u8 = 4;
/// [`SockState::flags`]: the socket is in a sockhash ([`maps::SOCKS`] or [`maps::TARGETS`]).
pub const SOCK_IN_MAP: u8 = 8;
/// [`SockState::flags`]: an app socket under the reader rule: its peer is in [`maps::TARGETS`],
/// and it leaves [`maps::SOCKS`] at its own half-close.
pub const SOCK_READER_RULE: u8 = 16;
/// [`SockState::flags`]: `peer` holds the paired socket's cookie.
pub const SOCK_PEER_KNOWN: u8 = 32;
/// [`SockState::flags`]: this socket's entry in [`maps::UNREAD`] is counted in
/// [`maps::READ_HINTS`], so removing the entry takes the count back. A socket an older build
/// joined has no such count, and must not take one back.
pub const SOCK_READ_HINTED: u8 = 64;

/// Per-socket state in socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`), freed with the socket.
/// sk_msg may not call `bpf_get_socket_cookie`, so the cookie is kept here by sock_ops.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockState {
    pub cookie: u64,
    pub pair_key: PairKey,
    /// Cookie of the pod's network namespace, to credit [`PodStats`] from sk_msg, which has no
    /// other way to tell which pod a socket belongs to.
    pub netns: u64,
    pub role: u8,
    pub flags: u8,
    /// This socket's slot in [`maps::READ_HINTS`] ([`read_hint_slot`]), kept from its join so
    /// its close takes back the count it added ([`SOCK_READ_HINTED`]). Was padding: sockets an
    /// earlier build joined hold 0 here and lack the flag.
    pub read_hint: u16,
    /// Messages redirected but not yet added to the pod's [`PodStats`] (see [`FOLD_EVERY`]).
    pub unfolded_msgs: u32,
    /// The peer's cookie ([`SOCK_PEER_KNOWN`]): set at pairing for the second end, and by
    /// sk_msg from the rendezvous entry for the first, so later messages look nothing up.
    pub peer: u64,
    /// Bytes of [`SockState::unfolded_msgs`].
    pub unfolded_bytes: u64,
    /// The peer's kernel address, its key in [`maps::UNREAD`] (set with `peer`).
    pub peer_sk: u64,
}
const _: () = assert!(size_of::<SockState>() == 80);

/// A socket adds what it redirected to the node-wide counters, its pod's [`PodStats`] and its
/// reader's unread count every this many messages or [`FOLD_BYTES`] bytes, and when it stops
/// sending (its half-close, LAST_ACK or close): per-message updates of shared counters were
/// half of sk_msg's cost. So counters read while a connection is open may lag it by less than
/// one fold; they are exact once it has closed.
pub const FOLD_EVERY: u32 = 32;
/// See [`FOLD_EVERY`]; also what the unread budget may be exceeded by before the writer's
/// direction moves to TCP.
pub const FOLD_BYTES: u64 = 256 << 10;

/// One pod's traffic through the fast lane (per CPU; userspace sums). The daemon creates the
/// entry when it lists the pod and deletes it when the pod goes; the programs only add.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    /// Pairs made, by [`HOPS`].
    pub pairs: [u64; HOPS.len()],
    /// Messages redirected, by sending role ([`direction`]).
    pub msgs: [u64; ROLES],
    /// Bytes redirected, by sending role.
    pub bytes: [u64; ROLES],
}
const _: () = assert!(size_of::<PodStats>() == 120);

/// Hops, for labels: the index of [`PodStats::pairs`] ([`hop`]).
pub const HOPS: [&str; 3] = ["outbound", "inbound", "sidecar"];

/// Directions of [`PodStats::msgs`] and the redirect counters, by sending role, for labels.
pub const DIRECTIONS: [&str; ROLES] = [
    "outbound_app_to_sidecar",
    "outbound_sidecar_to_app",
    "inbound_sidecar_to_app",
    "inbound_app_to_sidecar",
    "sidecar_client_to_server",
    "sidecar_server_to_client",
];

/// The [`DIRECTIONS`] index of bytes sent by a socket of `role`, None for `ROLE_NONE`.
#[inline(always)]
pub fn direction(role: u8) -> Option<u32> {
    if (ROLE_OUT_APP..=ROLE_SC_SERVER).contains(&role) {
        Some(u32::from(role - ROLE_OUT_APP))
    } else {
        None
    }
}

/// The [`HOPS`] index of a pair whose ends have `role` and its partner role.
#[inline(always)]
pub fn hop(role: u8) -> u32 {
    match role {
        ROLE_OUT_APP | ROLE_OUT_PROXY => 0,
        ROLE_IN_PROXY | ROLE_IN_APP => 1,
        _ => 2,
    }
}

/// Index 0 of the control array: bits the daemon sets to steer the programs.
pub const CONTROL_FLAGS: u32 = 0;
/// Control bit: stop redirecting and pairing (detach in progress). Each direction that was
/// redirecting moves to TCP for good; the receiver still reads its queued redirected bytes first.
pub const CONTROL_DRAIN: u32 = 1;
/// Control bit: the read tracer is attached, so unread counts are real and sk_msg enforces
/// [`UNREAD_BUDGET`]. Without it (a kernel that offers neither attachment of the tracer, see
/// [`programs::RECV_EXIT`]) the counts would only grow, so the budget is not applied.
pub const CONTROL_BUDGET: u32 = 2;
/// Control bit: some pod on the node has [`POLICY_MEMORY_TIGHT`]. sk_msg then looks up the
/// writer's pod (whose sidecar or app reads an app hop) and moves the direction to TCP if it is
/// tight; the sidecar hop's reader is in another pod, which sk_msg cannot name, so its
/// directions all move. Unset, the check costs sk_msg nothing beyond the control word it
/// already reads.
pub const CONTROL_MEMORY_TIGHT: u32 = 4;
/// Control bit: [`maps::READ_HINTS`] and [`maps::READ_SEEDS`] cover every entry of
/// [`maps::UNREAD`], so the read tracer may skip a socket whose slot is empty in both without
/// looking it up. Set at a fresh load; an adoption clears it until this build's sock_ops runs
/// and the seeds cover what other builds' programs joined (docs/DESIGN.md, "The read tracer").
pub const CONTROL_READ_HINTS: u32 = 8;

/// log2 of the slots of [`maps::READ_HINTS`] and [`maps::READ_SEEDS`].
pub const READ_HINT_BITS: u32 = 14;
/// Slots of [`maps::READ_HINTS`] and [`maps::READ_SEEDS`]: 16384, so a node with a few thousand
/// receiving sockets leaves most slots empty (an unpaired socket's read then stops at its slot).
pub const READ_HINT_SLOTS: u32 = 1 << READ_HINT_BITS;

/// The slot of a receiving socket's kernel address in [`maps::READ_HINTS`]: its low 32 bits (the
/// high ones are the same for every socket), mixed by a full-avalanche integer hash (xorshift and
/// multiply twice), top bits kept. Slab addresses are a fixed object size apart; a plain
/// multiplicative hash left a third of them sharing slots (the unit test in
/// `datapath/read_hints.rs`).
#[inline(always)]
pub fn read_hint_slot(sk: u64) -> u16 {
    let mut x = sk as u32;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    (x >> (32 - READ_HINT_BITS)) as u16
}
const _: () = assert!(READ_HINT_BITS <= 16);

/// Redirected bytes a receiver may leave unread before its peer's direction moves to TCP.
/// Redirected bytes bypass the receiver's `SO_RCVBUF`, so without a budget a reader that stops
/// (or an Envoy applying flow control) would let the writer queue without bound. Over budget,
/// the writer's next bytes take TCP, which holds it back (EAGAIN, or a blocking write) the
/// normal way once TCP's buffers fill; the reader still gets the queued redirected bytes first,
/// so order holds.
pub const UNREAD_BUDGET: i64 = 4 << 20;
pub const CONTROL_ENTRIES: u32 = 1;

/// Counter indices of the per-CPU counter array.
pub mod counter {
    pub const PAIRS_OUTBOUND: u32 = 0;
    pub const PAIRS_INBOUND: u32 = 1;
    /// `MSGS_REDIRECTED + role - 1`: messages redirected, by sending role.
    pub const MSGS_REDIRECTED: u32 = 2;
    /// `BYTES_REDIRECTED + role - 1`: bytes redirected, by sending role.
    pub const BYTES_REDIRECTED: u32 = 6;
    pub const PASS_UNTRACKED: u32 = 10;
    pub const PASS_NO_PEER: u32 = 11;
    pub const PASS_TCP_PINNED: u32 = 12;
    pub const PASS_PEER_GONE: u32 = 13;
    pub const PASS_DRAINING: u32 = 14;
    pub const STAMPS_WRITTEN: u32 = 15;
    pub const STAMPS_FOUND: u32 = 16;
    pub const STAMPS_MISSING: u32 = 17;
    /// An end found the sockhash full: it was not put there, its hop stays on TCP.
    pub const SOCKHASH_FULL: u32 = 18;
    /// An end found the pairing map full: it left the sockhash again and is not stamped, so its
    /// hop stays on TCP and nothing waits for a partner that cannot find it.
    pub const RENDEZVOUS_FULL: u32 = 19;
    /// The unread accounting maps were full: the hop stays on TCP.
    pub const PEERS_FULL: u32 = 20;
    /// Bytes left on TCP before the socket could be redirected, so it never is: TCP Fast Open
    /// data in the SYN, or a write that another thread started while connect() was in progress
    /// (it bypasses sk_msg).
    pub const SKIP_EARLY_DATA: u32 = 21;
    pub const PAIR_REJECTED: u32 = 22;
    pub const CONNECT_NOT_CAPTURED: u32 = 23;
    /// A direction moved to TCP because its reader had more than [`super::UNREAD_BUDGET`]
    /// redirected bytes unread.
    pub const PASS_OVER_BUDGET: u32 = 24;
    /// A connect() sock_ops saw without the owner the connect hook records: the connection is
    /// left alone (its socket connected before meshlane attached, or the owner map was full).
    pub const CONNECT_OWNER_UNKNOWN: u32 = 25;
    /// An app socket left the sockhash at its own half-close (reader rule): its later reads
    /// are plain TCP again.
    pub const APP_UNPAIRED_AT_HALF_CLOSE: u32 = 26;
    /// Pairs made on the sidecar hop (client sidecar <-> server sidecar on this node).
    pub const PAIRS_SIDECAR: u32 = 27;
    /// `MSGS_SIDECAR + role - ROLE_SC_CLIENT`: messages redirected on the sidecar hop.
    pub const MSGS_SIDECAR: u32 = 28;
    /// `BYTES_SIDECAR + role - ROLE_SC_CLIENT`: bytes redirected on the sidecar hop.
    pub const BYTES_SIDECAR: u32 = 30;
    /// A direction moved to TCP because its reader's pod was memory-tight
    /// ([`super::POLICY_MEMORY_TIGHT`]).
    pub const PASS_MEMORY_TIGHT: u32 = 32;
    /// Counters with a name (the rest of [`SLOTS`] is spare).
    pub const COUNT: u32 = 33;
    /// Size of the counter array. Spare slots let a later build add counters without changing
    /// the pinned map's size, so an upgrade can adopt the pins instead of needing a detach.
    pub const SLOTS: u32 = 64;

    /// Names for userspace, indexed by counter.
    pub const NAMES: [&str; COUNT as usize] = [
        "pairs_outbound",
        "pairs_inbound",
        "msgs_redirected_outbound_app_to_sidecar",
        "msgs_redirected_outbound_sidecar_to_app",
        "msgs_redirected_inbound_sidecar_to_app",
        "msgs_redirected_inbound_app_to_sidecar",
        "bytes_redirected_outbound_app_to_sidecar",
        "bytes_redirected_outbound_sidecar_to_app",
        "bytes_redirected_inbound_sidecar_to_app",
        "bytes_redirected_inbound_app_to_sidecar",
        "pass_untracked",
        "pass_no_peer",
        "pass_tcp_pinned",
        "pass_peer_gone",
        "pass_draining",
        "stamps_written",
        "stamps_found",
        "stamps_missing",
        "sockhash_full",
        "rendezvous_full",
        "unread_full",
        "skip_early_data",
        "pair_rejected",
        "connect_not_captured",
        "pass_over_budget",
        "connect_owner_unknown",
        "app_unpaired_at_half_close",
        "pairs_sidecar",
        "msgs_redirected_sidecar_client_to_server",
        "msgs_redirected_sidecar_server_to_client",
        "bytes_redirected_sidecar_client_to_server",
        "bytes_redirected_sidecar_server_to_client",
        "pass_memory_tight",
    ];

    /// The message and byte counters of the [`super::DIRECTIONS`] entry `dir`: the app hops'
    /// four came first, the sidecar hop's two went into spare slots later.
    #[inline(always)]
    pub const fn redirected(dir: u32) -> (u32, u32) {
        if dir < 4 {
            (MSGS_REDIRECTED + dir, BYTES_REDIRECTED + dir)
        } else {
            (MSGS_SIDECAR + dir - 4, BYTES_SIDECAR + dir - 4)
        }
    }

    /// The pairs counter of the [`super::HOPS`] entry `hop`.
    #[inline(always)]
    pub fn pairs(hop: u32) -> u32 {
        match hop {
            0 => PAIRS_OUTBOUND,
            1 => PAIRS_INBOUND,
            _ => PAIRS_SIDECAR,
        }
    }
}

/// Map names, shared so the loader and the programs cannot drift apart.
pub mod maps {
    pub const POLICY: &str = "ML_POLICY";
    pub const SOCKS: &str = "ML_SOCKS";
    pub const RENDEZVOUS: &str = "ML_RENDEZVOUS";
    pub const SOCK_STATE: &str = "ML_SOCK_STATE";
    pub const COUNTERS: &str = "ML_COUNTERS";
    pub const CONTROL: &str = "ML_CONTROL";
    pub const POD_STATS: &str = "ML_POD_STATS";
    pub const UNREAD: &str = "ML_UNREAD";
    pub const OWNERS: &str = "ML_OWNERS";
    /// Sockets that only ever receive redirected bytes: the sidecar ends under the reader rule.
    pub const TARGETS: &str = "ML_TARGETS";
    /// This node's pod addresses ([`super::Addr`]) -> the pod's network-namespace cookie:
    /// where a sidecar's connection may meet another sidecar (the sidecar hop).
    pub const POD_IPS: &str = "ML_POD_IPS";
    /// How many entries of [`UNREAD`] fall in each slot of [`super::read_hint_slot`]: written
    /// by sock_ops (atomically, +1 before an entry is made, -1 after it is removed), read by the
    /// read tracer, which skips a socket whose slot is 0 instead of looking it up. Only ever too
    /// high, never too low, while [`super::CONTROL_READ_HINTS`] is set.
    pub const READ_HINTS: &str = "ML_READ_HINTS";
    /// Slots the daemon marked after adopting another build's pins: that build's programs made
    /// entries in [`UNREAD`] without counting them in [`READ_HINTS`]. Written by the daemon only,
    /// never cleared while the pins live.
    pub const READ_SEEDS: &str = "ML_READ_SEEDS";
    /// The maps every complete datapath has pinned.
    pub const ALL: [&str; 11] = [
        POLICY, SOCKS, RENDEZVOUS, SOCK_STATE, COUNTERS, CONTROL, POD_STATS, UNREAD, OWNERS,
        TARGETS, POD_IPS,
    ];
    /// Maps later builds added: a complete datapath an earlier build pinned lacks them, and
    /// adopting it makes them (empty) beside the others.
    /// One 8-byte value per CPU that sock_ops writes a socket's address to and reads back: the
    /// verifier allows no arithmetic on a pointer, and a value read from a map is a number.
    pub const SCRATCH: &str = "ML_SCRATCH";
    pub const ADDED: [&str; 3] = [READ_HINTS, READ_SEEDS, SCRATCH];
    pub const POLICY_MAX: u32 = 4096;
    /// Room for two addresses per pod (a dual-stack pod has one of each family).
    pub const POD_IPS_MAX: u32 = 2 * POLICY_MAX;
    pub const SOCKS_MAX: u32 = 65536;
    pub const RENDEZVOUS_MAX: u32 = 65536;
    /// Sockets that may receive redirected bytes (two per pair at most), for the unread maps.
    pub const PEERS_MAX: u32 = 131072;
    /// connect() calls in flight in listed pods (an entry lives from the connect hook to
    /// sock_ops' TCP_CONNECT_CB, microseconds later; LRU, so a connect that never got that far
    /// cannot fill it).
    pub const OWNERS_MAX: u32 = 16384;
}

/// Program names in the object file.
pub mod programs {
    pub const SOCK_OPS: &str = "meshlane_sockops";
    pub const SK_MSG: &str = "meshlane_sk_msg";
    /// The read tracer as a raw tracepoint on [`RECV_TRACEPOINT`]: the fallback, it runs on
    /// every read of the node.
    pub const RECV: &str = "meshlane_recv";
    /// The read tracer as fexit on [`RECV_FUNCTION`]: runs only for sockets in a sockhash.
    pub const RECV_EXIT: &str = "meshlane_recv_exit";
    /// `recvmsg` of TCP sockets in a sockmap or sockhash (net/ipv4/tcp_bpf.c).
    pub const RECV_FUNCTION: &str = "tcp_bpf_recvmsg";
    /// The read-only global that tells sock_ops to ask for the caller's uid/gid itself; set by
    /// the loader where the kernel allows it, and then [`CONNECT4`] is not attached.
    pub const OWNER_IN_SOCKOPS: &str = "MESHLANE_OWNER_IN_SOCKOPS";
    /// The read-only globals with the byte offsets of `struct tcp_sock`'s `write_seq`,
    /// `snd_nxt` and `data_segs_out` on the running kernel (from its BTF), for sk_msg's check
    /// that nothing left on TCP before its first message; 0 when the loader found none, and then
    /// that check is off.
    pub const TCP_WRITE_SEQ: &str = "MESHLANE_TCP_WRITE_SEQ";
    pub const TCP_SND_NXT: &str = "MESHLANE_TCP_SND_NXT";
    pub const TCP_DATA_SEGS_OUT: &str = "MESHLANE_TCP_DATA_SEGS_OUT";
    /// cgroup/connect4: records who calls connect(), for sock_ops (see `owner.rs`).
    pub const CONNECT4: &str = "meshlane_connect4";
    /// cgroup/connect6: the same for IPv6 sockets.
    pub const CONNECT6: &str = "meshlane_connect6";
    /// The raw tracepoint `RECV` attaches to: fired after every recvmsg() with the socket, the
    /// bytes read and the flags (Linux 6.4+).
    pub const RECV_TRACEPOINT: &str = "sock_recv_length";
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data, repr(C), explicit padding fields (the size asserts above
    // check there is no hidden padding), every bit pattern valid.
    unsafe impl aya::Pod for PodPolicy {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PairKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Waiter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PodStats {}
}
