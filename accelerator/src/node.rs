//! Facts read from the node itself: a network namespace's cookie and its addresses, and the
//! room a pod's memory groups leave ([`memory`]).

pub mod memory;

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv6Addr},
    path::Path,
};

/// `SO_NETNS_COOKIE` (Linux 5.14+), not yet in every libc.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace at `path` (`/run/netns/NAME` or `/proc/PID/ns/net`): the
/// key sock_ops sees from `bpf_get_netns_cookie`. Read from a socket created inside it, on a
/// short-lived thread so this process's own namespace never changes.
pub fn netns_cookie(path: &Path) -> io::Result<u64> {
    in_netns(&File::open(path)?, socket_netns_cookie)?
}

/// A pod's network namespace as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsFacts {
    pub cookie: u64,
    /// The IPv4 and IPv6 addresses on its interfaces, loopback interfaces (with Istio's `::6`)
    /// and link-local addresses left out: the pod's own addresses, as other pods on this node
    /// reach it. Read from the namespace itself, so local discovery (which knows no pod IPs) and
    /// the Kubernetes source agree.
    pub ips: Vec<IpAddr>,
}

/// The cookie and the addresses of the network namespace at `path`, in one visit.
pub fn netns_facts(path: &Path) -> io::Result<NetnsFacts> {
    in_netns(&File::open(path)?, || {
        let cookie = socket_netns_cookie()?;
        let mut ips: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .map_err(io::Error::from)?
            .filter(|a| {
                !a.flags
                    .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
            })
            .filter_map(|a| {
                let a = a.address?;
                match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                    (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
                    (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
                    _ => None,
                }
            })
            .filter(pod_address)
            .collect();
        ips.sort();
        ips.dedup();
        Ok(NetnsFacts { cookie, ips })
    })?
}

/// Whether another pod can reach this pod at `ip`: not loopback, link-local or unspecified.
fn pod_address(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unspecified() && !is_unicast_link_local(v6),
    }
}

/// fe80::/10.
fn is_unicast_link_local(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// The one way this crate enters a network namespace: runs `f` on a short-lived thread that
/// joined `ns` first, so no thread of the daemon ever changes namespace for longer than one
/// call (and a child process spawned by `f` starts there). The error is the thread's: the
/// namespace could not be entered, or `f` panicked; `f`'s own result is returned as it is.
pub fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> io::Result<T> {
            enter_netns(ns)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the thread inside the namespace panicked")))
    })
}

/// Moves the calling thread into the network namespace `ns` (setns). Only for a thread made to
/// live there (the probe's servers) or a child between fork and exec; everything else uses
/// [`in_netns`].
pub fn enter_netns(ns: &File) -> io::Result<()> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

#[allow(unsafe_code)]
fn socket_netns_cookie() -> io::Result<u64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie/len describe a writable u64.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod address_tests {
    use super::*;

    #[test]
    fn only_addresses_other_pods_reach_are_the_pods() {
        for (ip, pod) in [
            ("10.1.2.3", true),
            ("127.0.0.6", false),
            ("169.254.1.1", false),
            ("fd00::5", true),
            ("2001:db8::1", true),
            ("::1", false),
            ("fe80::1", false),
            ("febf::1", false),
            ("fec0::1", true),
            ("::", false),
        ] {
            assert_eq!(pod_address(&ip.parse().unwrap()), pod, "{ip}");
        }
    }
}
