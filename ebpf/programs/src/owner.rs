//! cgroup/connect4 and connect6: remember who calls connect() on a TCP socket of a listed pod,
//! so sock_ops can tell the sidecar's own connections (its uid/gid) from the app's. connect6 is
//! for IPv6 sockets: true IPv6, and v4-mapped (Java's default for IPv4 destinations). sock_ops runs in the
//! same connect() call but is not offered `bpf_get_current_uid_gid` on older kernels (6.1,
//! 6.12); connect hooks are. The hook never changes the connect: it always allows it.

use aya_ebpf::{
    helpers::generated::{bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};

use crate::maps::{ML_OWNERS, ML_POLICY};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

pub fn on_connect(ctx: &SockAddrContext) {
    // SAFETY: ctx.sock_addr is the kernel's context for this call; plain field reads.
    let (ty, proto) = unsafe { ((*ctx.sock_addr).type_, (*ctx.sock_addr).protocol) };
    if ty != SOCK_STREAM || proto != IPPROTO_TCP {
        return;
    }
    // SAFETY: helpers offered to cgroup/connect4 programs, given this program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    if ML_POLICY.get_ptr(netns).is_none() {
        return;
    }
    // SAFETY: as above; in connect() `current` is the calling process.
    let (cookie, owner) = unsafe {
        (
            bpf_get_socket_cookie(ctx.sock_addr.cast()),
            bpf_get_current_uid_gid(),
        )
    };
    // Full map (LRU evicts, so only under a storm of connects): sock_ops finds no owner and
    // leaves the connection on TCP.
    let _ = ML_OWNERS.insert(cookie, owner, 0);
}
