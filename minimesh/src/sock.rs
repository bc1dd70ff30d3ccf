//! Small socket helpers the relay and the apps share: listeners with
//! SO_REUSEADDR, upstream connects with an optional source bind, abortive
//! close (RST) and the NAT's original destination.

use anyhow::{Context, Result};
use nix::sys::socket::{
    bind, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, SockaddrIn, SockaddrIn6,
};
use nix::sys::time::{TimeVal, TimeValLike};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

/// Bounds a connect to an original destination, so a black-holed upstream
/// cannot pin a relay thread for the kernel's ~2 minute SYN retry budget.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn tcp_socket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket(AF_INET, SOCK_STREAM)")
}

fn tcp6_socket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket(AF_INET6, SOCK_STREAM)")
}

/// A listening socket on `addr` with SO_REUSEADDR, in the calling thread's
/// network namespace.
pub(crate) fn listen_reuseaddr(addr: SocketAddrV4) -> Result<TcpListener> {
    let fd = tcp_socket()?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)
        .with_context(|| format!("SO_REUSEADDR for listener {addr}"))?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(addr)).with_context(|| format!("bind {addr}"))?;
    listen(&fd, Backlog::MAXCONN).with_context(|| format!("listen on {addr}"))?;
    Ok(TcpListener::from(fd))
}

/// A listening AF_INET6 socket on `[::]:port` with IPV6_V6ONLY off, as Go, Java and Node
/// servers listen by default: IPv4 clients arrive on it with v4-mapped addresses
/// (`::ffff:a.b.c.d`). The option is set explicitly, not left to `net.ipv6.bindv6only`.
pub(crate) fn listen_dual_stack(port: u16) -> Result<TcpListener> {
    listen6(port, false)
}

/// A listening AF_INET6 socket on `[::]:port` for IPv6 only (IPV6_V6ONLY on): Envoy's
/// listeners in a dual-stack Istio pod, one per family beside the IPv4 one on the same port.
pub(crate) fn listen_v6_only(port: u16) -> Result<TcpListener> {
    listen6(port, true)
}

fn listen6(port: u16, v6_only: bool) -> Result<TcpListener> {
    let fd = tcp6_socket()?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)
        .with_context(|| format!("SO_REUSEADDR for listener [::]:{port}"))?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &v6_only)
        .with_context(|| format!("IPV6_V6ONLY={v6_only} for listener [::]:{port}"))?;
    let addr = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
    bind(fd.as_raw_fd(), &SockaddrIn6::from(addr)).with_context(|| format!("bind {addr}"))?;
    listen(&fd, Backlog::MAXCONN).with_context(|| format!("listen on {addr}"))?;
    Ok(TcpListener::from(fd))
}

/// Connects to `dst`, from `src:0` when given (Envoy's inbound passthrough
/// binds 127.0.0.6 so the capture rules can tell its connections apart).
pub(crate) fn connect_from(src: Option<Ipv4Addr>, dst: SocketAddrV4) -> Result<TcpStream> {
    let fd = tcp_socket()?;
    if let Some(src) = src {
        bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))
            .with_context(|| format!("bind {src}:0 before connecting to {dst}"))?;
    }
    timed_connect(fd, &SockaddrIn::from(dst), &dst.to_string())
}

/// [`connect_from`] for either family: an IPv6 destination from an AF_INET6 socket (bound to
/// `src`, Envoy's `::6`, when given).
pub(crate) fn connect_from_any(src: Option<IpAddr>, dst: SocketAddr) -> Result<TcpStream> {
    let dst6 = match dst {
        SocketAddr::V4(dst) => {
            let src = match src {
                Some(IpAddr::V4(s)) => Some(s),
                _ => None,
            };
            return connect_from(src, dst);
        }
        SocketAddr::V6(dst) => dst,
    };
    let fd = tcp6_socket()?;
    if let Some(IpAddr::V6(src)) = src {
        bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(SocketAddrV6::new(src, 0, 0, 0)),
        )
        .with_context(|| format!("bind [{src}]:0 before connecting to {dst6}"))?;
    }
    timed_connect(fd, &SockaddrIn6::from(dst6), &dst6.to_string())
}

fn timed_connect(
    fd: OwnedFd,
    dst: &dyn nix::sys::socket::SockaddrLike,
    what: &str,
) -> Result<TcpStream> {
    // A blocking connect honours SO_SNDTIMEO on Linux.
    let timeout = TimeVal::milliseconds(CONNECT_TIMEOUT.as_millis() as i64);
    setsockopt(&fd, sockopt::SendTimeout, &timeout).context("SO_SNDTIMEO for connect")?;
    // SAFETY: `dst` is a valid sockaddr of its own length for the duration of the call.
    let r = unsafe { libc::connect(fd.as_raw_fd(), dst.as_ptr(), dst.len()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("connect to {what}"));
    }
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::zero()).context("clearing SO_SNDTIMEO")?;
    Ok(TcpStream::from(fd))
}

/// SO_LINGER {on, 0}: the next close of the socket sends RST instead of FIN.
pub(crate) fn set_linger_zero(fd: &impl AsFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // Only fails on a dead fd, where there is nothing left to reset.
    let _ = setsockopt(fd, sockopt::Linger, &linger);
}

/// The destination the client dialled before REDIRECT rewrote it
/// (`getsockopt(SOL_IP, SO_ORIGINAL_DST)`, answered from conntrack).
pub(crate) fn original_dst(stream: &TcpStream) -> Result<SocketAddrV4> {
    let sa =
        getsockopt(stream, sockopt::OriginalDst).context("getsockopt(SOL_IP, SO_ORIGINAL_DST)")?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// The destination the client dialled before REDIRECT rewrote it, for either family: IPv6
/// asks `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`.
pub(crate) fn original_dst_any(stream: &TcpStream) -> Result<SocketAddr> {
    if stream.local_addr()?.is_ipv4() {
        return original_dst(stream).map(SocketAddr::V4);
    }
    /// `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h), not in libc.
    const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: zeroed sockaddr_in6 is a valid out-buffer; len matches its size.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: a live fd, a buffer of `len` bytes and its length.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IPV6,
            IP6T_SO_ORIGINAL_DST,
            std::ptr::from_mut(&mut sa).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .context("getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)");
    }
    Ok(SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(sa.sin6_addr.s6_addr),
        u16::from_be(sa.sin6_port),
        0,
        0,
    )))
}

/// Reads like an event-driven server (Envoy, nginx) does: an EAGAIN on this blocking socket
/// means "not readable yet", so wait for readability and read again. Blocking reads on sockets
/// in a sockmap can return a spurious EAGAIN (tcp_bpf_recvmsg turns an empty wake-up into
/// EAGAIN); Envoy never blocks in read(), so it never sees that as an error, and neither must
/// the stand-ins here. Each spurious EAGAIN is counted in `eagain`.
pub(crate) fn read_like_epoll(
    mut stream: &TcpStream,
    buf: &mut [u8],
    eagain: &std::sync::atomic::AtomicU64,
) -> std::io::Result<usize> {
    use std::io::{ErrorKind, Read};
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                eagain.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut pfd = libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                let r = unsafe { libc::poll(&mut pfd, 1, 30_000) };
                if r == 0 {
                    return Err(std::io::Error::new(ErrorKind::TimedOut, "no data for 30 s"));
                }
            }
            other => return other,
        }
    }
}
