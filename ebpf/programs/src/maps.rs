//! Every map of the datapath. Names come from `meshlane_common::maps` (the loader pins them there).

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SkStorage, SockHash},
    macros::btf_map,
};
use meshlane_common::{
    counter::SLOTS,
    maps::{OWNERS_MAX, PEERS_MAX, POD_IPS_MAX, POLICY_MAX, RENDEZVOUS_MAX, SOCKS_MAX},
    Addr, PairKey, PodPolicy, PodStats, SockState, Waiter, READ_HINT_SLOTS,
};

/// Pods meshlane accelerates. Key: network-namespace cookie. Value: [`PodPolicy`].
/// Writer: the daemon (policy reconcile). Reader: sock_ops. Max: POLICY_MAX pods per node.
/// A socket whose namespace is absent here is never touched.
#[btf_map]
pub static ML_POLICY: HashMap<u64, PodPolicy, { POLICY_MAX as usize }> = HashMap::new();

/// The sockets of hops being paired or paired. Key: socket cookie. Value: the socket.
/// Writer: sock_ops (insert at establishment); the kernel removes a socket when it closes.
/// Reader: sk_msg (`bpf_msg_redirect_hash`). Max: SOCKS_MAX sockets; when full, new hops stay on TCP.
#[btf_map]
pub static ML_SOCKS: SockHash<u64, { SOCKS_MAX as usize }> = SockHash::new();

/// Redirect targets that never send through meshlane: the sidecar's ends of the app hops under
/// the reader rule (docs/DESIGN.md invariant 7). No program is attached to this map, so the kernel
/// gives its sockets only the receive side of `tcp_bpf` (they can read redirected bytes) and
/// leaves their sends on the plain TCP path: no copy into an sk_msg, no verdict run.
/// Writer: sock_ops (insert at establishment); the kernel removes a socket when it closes.
/// Reader: sk_msg, as the target of the app's redirects. Max: SOCKS_MAX.
#[btf_map]
pub static ML_TARGETS: SockHash<u64, { SOCKS_MAX as usize }> = SockHash::new();

/// Where the two ends of a hop meet, and then the pair. Key: [`PairKey`]. Value: the first end
/// to arrive and, once met, its partner ([`Waiter`]). Writer: sock_ops (the first end inserts,
/// the second writes `partner`, the first removes it at close). Reader: sock_ops, and sk_msg once
/// per first end. Max: RENDEZVOUS_MAX first ends.
#[btf_map]
pub static ML_RENDEZVOUS: HashMap<PairKey, Waiter, { RENDEZVOUS_MAX as usize }> = HashMap::new();

/// Per-socket state ([`SockState`]), freed by the kernel with the socket.
/// Writer: sock_ops (create, role, pairing), sk_msg (the TCP pin). Reader: both.
#[btf_map]
pub static ML_SOCK_STATE: SkStorage<SockState> = SkStorage::new();

/// Per-CPU counters, indexed by `meshlane_common::counter`. Writer: both programs. Reader: daemon.
#[btf_map]
pub static ML_COUNTERS: PerCpuArray<u64, { SLOTS as usize }> = PerCpuArray::new();

/// Control words from the daemon (`CONTROL_FLAGS`: `CONTROL_DRAIN`). Writer: daemon. Reader: both.
#[btf_map]
pub static ML_CONTROL: Array<u32, 1> = Array::new();

/// Per-pod traffic ([`PodStats`]), per CPU. Key: network-namespace cookie, as in [`ML_POLICY`].
/// Writer: the daemon creates and deletes entries with the pod; both programs only add to an
/// existing entry, so a pod that is gone is simply not credited. Reader: daemon (metrics).
#[btf_map]
pub static ML_POD_STATS: PerCpuHashMap<u64, PodStats, { POLICY_MAX as usize }> =
    PerCpuHashMap::new();

/// Redirected bytes each receiver has not read yet. Key: the receiving socket's kernel address
/// (`struct sock *`), because that is all the read tracer is given. Value: bytes (signed: a read
/// can also drain TCP bytes that came after a pin, so it may dip below 0). Writer: sock_ops
/// creates the entry when a socket joins and removes it at close; sk_msg adds what it
/// redirects; the read tracer subtracts what the receiver reads. Reader: sk_msg, for the
/// [`meshlane_common::UNREAD_BUDGET`] check. Max: PEERS_MAX.
///
/// An address is reused once its socket is freed. The entry goes at the socket's close, before
/// that; a peer still holding the old address only reads a wrong count before its redirect to
/// the closed socket fails, which moves it to TCP anyway (fail open).
#[btf_map]
pub static ML_UNREAD: HashMap<u64, i64, { PEERS_MAX as usize }> = HashMap::new();

/// How many [`ML_UNREAD`] entries fall in each slot of `read_hint_slot(sk)`, so the read tracer
/// can skip a socket whose slot is empty with one array load (the verifier inlines it) instead of
/// a hash lookup: where the tracer is the node-wide tracepoint, that lookup was most of what
/// every read of every process paid. Writer: sock_ops, atomically: +1 before it makes an
/// entry, -1 after it removed one it counted ([`meshlane_common::SOCK_READ_HINTED`]), so a
/// count is never below the entries in its slot. Reader: the read tracer, while the daemon
/// sets [`meshlane_common::CONTROL_READ_HINTS`].
#[btf_map]
pub static ML_READ_HINTS: Array<i32, { READ_HINT_SLOTS as usize }> = Array::new();

/// Slots the daemon marked (1) for [`ML_UNREAD`] entries another build's programs made without
/// counting them in [`ML_READ_HINTS`] (found when it adopted their pins). Writer: the daemon.
/// Reader: the read tracer, beside [`ML_READ_HINTS`].
#[btf_map]
pub static ML_READ_SEEDS: Array<u8, { READ_HINT_SLOTS as usize }> = Array::new();

/// sock_ops' per-CPU scratch value ([`meshlane_common::maps::SCRATCH`]): a socket's kernel
/// address goes in as a pointer and comes out as a number, to hash it for [`ML_READ_HINTS`].
/// Writer and reader: sock_ops, within one run (runs on a CPU do not interleave).
#[btf_map]
pub static ML_SCRATCH: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Who called connect() on a socket of a listed pod: `bpf_get_current_uid_gid()` (gid << 32 |
/// uid) as the connect hook saw it. Key: socket cookie. Writer: the connect hook. Reader and
/// remover: sock_ops at TCP_CONNECT_CB. sock_ops cannot ask for the caller's uid itself on
/// older kernels (the kernel matrix saw 6.1 and 6.12 refuse the helper there; 6.18 and 7.x
/// offer it), while connect hooks have it on every kernel. Max: OWNERS_MAX, LRU.
#[btf_map]
pub static ML_OWNERS: LruHashMap<u64, u64, { OWNERS_MAX as usize }> = LruHashMap::new();

/// This node's pod addresses. Key: the address ([`Addr`], IPv4 v4-mapped). Value: the pod's
/// network-namespace cookie (its key in [`ML_POLICY`]). Writer: the daemon, from each listed
/// pod's own interfaces. Reader: sock_ops, when a sidecar connects: only a connection to an
/// address here is stamped for the sidecar hop, so the token never leaves the node.
#[btf_map]
pub static ML_POD_IPS: HashMap<Addr, u64, { POD_IPS_MAX as usize }> = HashMap::new();
