//! Workloads for the pods: an echo server, the simplest app whose replies
//! prove bytes went through intact and whose half-close handling shows FINs
//! travel end to end.

use crate::netns::Netns;
use crate::sock;
use anyhow::{Context, Result};
use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A TCP echo server listening inside a pod. Stops listening on drop;
/// connections in flight finish on their own threads.
#[derive(Debug)]
pub struct EchoServer {
    listener: Arc<TcpListener>,
    addr: SocketAddrV4,
    accepted: Arc<AtomicU64>,
    misrouted: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The 6-byte header a client of [`EchoServer::spawn_checked`] sends first: the destination it
/// meant to reach (IPv4 address and port, network order).
pub fn dest_header(dst: SocketAddrV4) -> [u8; 6] {
    let o = dst.ip().octets();
    let p = dst.port().to_be_bytes();
    [o[0], o[1], o[2], o[3], p[0], p[1]]
}

impl EchoServer {
    /// Listens on `addr` inside `ns` (the socket is created there, so it
    /// stays there whichever thread accepts on it) and echoes every
    /// connection on its own thread.
    pub fn spawn(ns: &Netns, addr: SocketAddrV4) -> Result<EchoServer> {
        Self::start(ns, addr, false)
    }

    /// Like [`EchoServer::spawn`], but every connection must start with [`dest_header`] naming
    /// this server. A stream that arrives here although it was meant for another destination
    /// (bytes handed to the wrong socket somewhere on the way) is counted in
    /// [`EchoServer::misrouted`] and reset, so the client sees it too. The header is echoed.
    pub fn spawn_checked(ns: &Netns, addr: SocketAddrV4) -> Result<EchoServer> {
        Self::start(ns, addr, true)
    }

    /// Like [`EchoServer::spawn`], on `[::]:port` with IPV6_V6ONLY off (Go's, Java's and Node's
    /// default listener): IPv4 clients are accepted on AF_INET6 sockets with v4-mapped
    /// addresses. [`EchoServer::addr`] is then `0.0.0.0:port`.
    pub fn spawn_dual_stack(ns: &Netns, port: u16) -> Result<EchoServer> {
        let listener = ns
            .run(|| sock::listen_dual_stack(port))?
            .with_context(|| format!("dual-stack echo server on [::]:{port} in {}", ns.name()))?;
        Self::serve(
            listener,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
            false,
        )
    }

    fn start(ns: &Netns, addr: SocketAddrV4, checked: bool) -> Result<EchoServer> {
        let listener = ns
            .run(|| sock::listen_reuseaddr(addr))?
            .with_context(|| format!("echo server on {addr} in {}", ns.name()))?;
        Self::serve(listener, addr, checked)
    }

    fn serve(listener: TcpListener, addr: SocketAddrV4, checked: bool) -> Result<EchoServer> {
        let listener = Arc::new(listener);
        let accepted = Arc::new(AtomicU64::new(0));
        let misrouted = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, accepted, stopping) = (
                Arc::clone(&listener),
                Arc::clone(&accepted),
                Arc::clone(&stopping),
            );
            let check = checked.then(|| (addr, Arc::clone(&misrouted)));
            std::thread::Builder::new()
                .name(format!("echo-{}", addr.port()))
                .spawn(move || accept_loop(&listener, &accepted, &stopping, check))
                .context("spawning the echo accept thread")?
        };
        Ok(EchoServer {
            listener,
            addr,
            accepted,
            misrouted,
            stopping,
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections whose header named another destination (see [`EchoServer::spawn_checked`]).
    pub fn misrouted(&self) -> u64 {
        self.misrouted.load(Ordering::SeqCst)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept() (EINVAL), see Relay's Drop.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Spurious EAGAINs seen by echo servers in this process (see `sock::read_like_epoll`).
pub static SPURIOUS_EAGAIN: AtomicU64 = AtomicU64::new(0);

type Check = Option<(SocketAddrV4, Arc<AtomicU64>)>;

fn accept_loop(listener: &TcpListener, accepted: &AtomicU64, stopping: &AtomicBool, check: Check) {
    loop {
        let result = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match result {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                let check = check.clone();
                if let Err(e) =
                    std::thread::Builder::new()
                        .name("echo-conn".into())
                        .spawn(move || {
                            if let Some((addr, misrouted)) = check {
                                if !header_matches(&stream, addr) {
                                    misrouted.fetch_add(1, Ordering::SeqCst);
                                    sock::set_linger_zero(&stream);
                                    return;
                                }
                            }
                            echo(stream)
                        })
                {
                    eprintln!("minimesh echo: spawning a connection thread: {e}");
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
                Some(libc::EINVAL) => return,
                _ => {
                    eprintln!("minimesh echo: accept: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            },
        }
    }
}

/// Reads the 6-byte destination header and echoes it back when it names `addr`.
fn header_matches(mut stream: &TcpStream, addr: SocketAddrV4) -> bool {
    let mut h = [0u8; 6];
    let mut got = 0;
    while got < h.len() {
        match sock::read_like_epoll(stream, &mut h[got..], &SPURIOUS_EAGAIN) {
            Ok(0) => {
                eprintln!("minimesh echo: stream ended after {got} header bytes");
                return false;
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("minimesh echo: reading the destination header: {e}");
                return false;
            }
        }
    }
    if h != dest_header(addr) {
        eprintln!("minimesh echo: header names {h:?}, this is {addr}");
        return false;
    }
    stream.write_all(&h).is_ok()
}

/// Echoes until the client half-closes, then half-closes back (after
/// everything read was written). A reset from the client is passed on as a
/// reset, an abortive close.
fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sock::read_like_epoll(&stream, &mut buf, &SPURIOUS_EAGAIN) {
            Ok(0) => {
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                sock::set_linger_zero(&stream);
                return;
            }
        }
    }
}
