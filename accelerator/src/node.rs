//! Facts read from the node itself: a network namespace's cookie and its addresses.

use std::{fs::File, io, net::Ipv4Addr, path::Path};

/// `SO_NETNS_COOKIE` (Linux 5.14+), not yet in every libc.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace at `path` (`/run/netns/NAME` or `/proc/PID/ns/net`): the
/// key sock_ops sees from `bpf_get_netns_cookie`. Read from a socket created inside it, on a
/// short-lived thread so this process's own namespace never changes.
pub fn netns_cookie(path: &Path) -> io::Result<u64> {
    in_netns(path, socket_netns_cookie)
}

/// A pod's network namespace as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsFacts {
    pub cookie: u64,
    /// The IPv4 addresses on its interfaces, loopback and link-local left out: the pod's own
    /// addresses, as other pods on this node reach it. Read from the namespace itself, so local
    /// discovery (which knows no pod IPs) and the Kubernetes source agree.
    pub ipv4: Vec<Ipv4Addr>,
}

/// The cookie and the addresses of the network namespace at `path`, in one visit.
pub fn netns_facts(path: &Path) -> io::Result<NetnsFacts> {
    in_netns(path, || {
        let cookie = socket_netns_cookie()?;
        let mut ipv4: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
            .map_err(io::Error::from)?
            .filter_map(|a| Some(a.address?.as_sockaddr_in()?.ip()))
            .filter(|ip| !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified())
            .collect();
        ipv4.sort();
        ipv4.dedup();
        Ok(NetnsFacts { cookie, ipv4 })
    })
}

/// Runs `f` on a short-lived thread inside the network namespace at `path`.
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let ns = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
    })
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
