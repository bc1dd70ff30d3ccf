//! A stand-in for the Envoy sidecar: a plain TCP relay on Envoy's capture
//! ports that dials each connection's original destination, the way Envoy's
//! passthrough clusters do.
//!
//! It runs as threads of the calling process, but inside the pod's namespace
//! and with the proxy's uid/gid on those threads only, so the capture rules'
//! `--uid-owner`/`--gid-owner` matches treat its upstream connections as the
//! proxy's. It preserves TCP semantics end to end, which is what meshlane has
//! to keep too: a FIN is forwarded as a half-close, a RST as a RST.

use crate::creds::become_thread_uid_gid;
use crate::netns::{enter_netns_current_thread, Netns};
use crate::sock;
use anyhow::{anyhow, Context, Result};
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Copy buffer per direction.
const BUF_SIZE: usize = 64 * 1024;

/// How the relay is placed in the pod, mirroring Envoy's bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayConfig {
    /// Proxy uid the relay threads run as (istio-proxy is 1337).
    pub uid: u32,
    /// Proxy gid the relay threads run as.
    pub gid: u32,
    /// Where outbound traffic arrives (virtualOutbound, 15001).
    pub outbound_port: u16,
    /// Where inbound traffic arrives (virtualInbound, 15006).
    pub inbound_port: u16,
    /// Source address for inbound passthrough connections to the app
    /// (127.0.0.6, which the capture rules let through).
    pub inbound_bind: Ipv4Addr,
    /// Some: also listen for IPv6 on both ports (`[::]`, IPv6 only, as Envoy's extra
    /// listener addresses in a dual-stack pod) and bind this address (Istio's `::6`) for the
    /// inbound hop of IPv6 connections.
    pub inbound_bind6: Option<Ipv6Addr>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            uid: 1337,
            gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            inbound_bind: Ipv4Addr::new(127, 0, 0, 6),
            inbound_bind6: None,
        }
    }
}

/// A snapshot of the relay's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Connections accepted on the outbound port.
    pub outbound_accepted: u64,
    /// Connections accepted on the inbound port.
    pub inbound_accepted: u64,
    /// Accepted connections whose original destination could not be dialled
    /// (the client got a RST).
    pub upstream_connect_failures: u64,
    /// Reads that returned EAGAIN although the socket is blocking (see `sock::read_like_epoll`).
    pub spurious_eagain: u64,
}

#[derive(Debug, Default)]
struct Counters {
    outbound_accepted: AtomicU64,
    inbound_accepted: AtomicU64,
    upstream_connect_failures: AtomicU64,
    spurious_eagain: Arc<AtomicU64>,
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy)]
enum Side {
    Outbound,
    /// Inbound, with the passthrough source address.
    /// The source address to bind per family.
    Inbound(Ipv4Addr, Option<Ipv6Addr>),
}

/// The running relay. Dropping it stops accepting; connections in flight
/// finish on their own (detached) threads.
#[derive(Debug)]
pub struct Relay {
    listeners: Vec<Arc<TcpListener>>,
    accept_threads: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl Relay {
    /// Starts the relay in `ns`: a setup thread enters the namespace, takes
    /// the proxy's credentials, binds `0.0.0.0:outbound_port` and
    /// `0.0.0.0:inbound_port`, and spawns one accept thread per listener,
    /// which inherit both the namespace and the credentials (so every
    /// upstream socket is created as the proxy).
    pub fn spawn(ns: &Netns, cfg: RelayConfig) -> Result<Relay> {
        let path = ns.path();
        let name = ns.name().to_owned();
        let setup = std::thread::Builder::new()
            .name("relay-setup".into())
            .spawn(move || -> Result<Relay> {
                enter_netns_current_thread(&path)?;
                become_thread_uid_gid(cfg.uid, cfg.gid)?;
                let mut relay = Relay {
                    listeners: Vec::new(),
                    accept_threads: Vec::new(),
                    stopping: Arc::new(AtomicBool::new(false)),
                    counters: Arc::new(Counters::default()),
                };
                // On any error below, dropping `relay` stops what was started.
                let sides = [
                    (cfg.outbound_port, Side::Outbound),
                    (
                        cfg.inbound_port,
                        Side::Inbound(cfg.inbound_bind, cfg.inbound_bind6),
                    ),
                ];
                let families = if cfg.inbound_bind6.is_some() {
                    &[false, true][..]
                } else {
                    &[false][..]
                };
                for ((port, side), v6) in sides
                    .into_iter()
                    .flat_map(|s| families.iter().map(move |v6| (s, *v6)))
                {
                    let listener = if v6 {
                        sock::listen_v6_only(port)
                            .with_context(|| format!("relay listener [::]:{port}"))?
                    } else {
                        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
                        sock::listen_reuseaddr(addr)
                            .with_context(|| format!("relay listener {addr}"))?
                    };
                    let listener = Arc::new(listener);
                    relay.listeners.push(Arc::clone(&listener));
                    let stopping = Arc::clone(&relay.stopping);
                    let counters = Arc::clone(&relay.counters);
                    let thread = std::thread::Builder::new()
                        .name(format!("relay-accept-{port}"))
                        .spawn(move || accept_loop(&listener, side, &stopping, &counters))
                        .context("spawning a relay accept thread")?;
                    relay.accept_threads.push(thread);
                }
                Ok(relay)
            })
            .context("spawning the relay setup thread")?;
        setup
            .join()
            .map_err(|_| anyhow!("relay setup thread panicked"))?
            .with_context(|| format!("starting the relay in netns {name}"))
    }

    /// Current counters.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            outbound_accepted: self.counters.outbound_accepted.load(Ordering::SeqCst),
            inbound_accepted: self.counters.inbound_accepted.load(Ordering::SeqCst),
            upstream_connect_failures: self
                .counters
                .upstream_connect_failures
                .load(Ordering::SeqCst),
            spurious_eagain: self.counters.spurious_eagain.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // shutdown() on a listening socket makes a blocked accept() return
        // EINVAL on Linux; close() alone would not wake it.
        for listener in &self.listeners {
            let _ =
                nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        for thread in self.accept_threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    side: Side,
    stopping: &AtomicBool,
    counters: &Arc<Counters>,
) {
    loop {
        let accepted = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let (client, _peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => continue,
                Some(libc::EINVAL) => return, // the listener was shut down
                _ => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("minimesh relay: accept: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        let counter = match side {
            Side::Outbound => &counters.outbound_accepted,
            Side::Inbound(..) => &counters.inbound_accepted,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        let counters = Arc::clone(counters);
        let spawned = std::thread::Builder::new()
            .name("relay-conn".into())
            .spawn(move || handle_connection(client, side, &counters));
        if let Err(e) = spawned {
            // The closure (and the client socket) is dropped: the client sees
            // the connection closed.
            eprintln!("minimesh relay: spawning a connection thread: {e}");
        }
    }
}

/// Resets `client` (RST, no FIN) by closing it with SO_LINGER 0.
fn reset(client: TcpStream) {
    sock::set_linger_zero(&client);
    drop(client);
}

fn handle_connection(client: TcpStream, side: Side, counters: &Counters) {
    let dst = match sock::original_dst_any(&client) {
        Ok(dst) => dst,
        Err(e) => {
            // Not a redirected connection (someone dialled the port directly).
            eprintln!("minimesh relay: {e:#}");
            return reset(client);
        }
    };
    let src = match side {
        Side::Outbound => None,
        Side::Inbound(bind, _) if dst.is_ipv4() => Some(IpAddr::V4(bind)),
        Side::Inbound(_, bind6) => bind6.map(IpAddr::V6),
    };
    let upstream = match sock::connect_from_any(src, dst) {
        Ok(upstream) => upstream,
        Err(_) => {
            counters
                .upstream_connect_failures
                .fetch_add(1, Ordering::SeqCst);
            return reset(client);
        }
    };
    // Envoy disables Nagle on both sides; a relay that adds 40 ms delayed-ACK
    // stalls would distort latency comparisons with meshlane.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let conn = Arc::new(Connection {
        client,
        upstream,
        aborted: AtomicBool::new(false),
        spurious_eagain: Arc::clone(&counters.spurious_eagain),
    });
    let reverse = Arc::clone(&conn);
    let spawned = std::thread::Builder::new()
        .name("relay-pump".into())
        .spawn(move || reverse.pump(Dir::UpstreamToClient));
    match spawned {
        Ok(thread) => {
            conn.pump(Dir::ClientToUpstream);
            let _ = thread.join();
        }
        Err(e) => {
            eprintln!("minimesh relay: spawning a pump thread: {e}");
            sock::set_linger_zero(&conn.client);
            sock::set_linger_zero(&conn.upstream);
        }
    }
    // Both sockets close here, once both directions are done.
}

/// Both sockets of one relayed connection. Shared (not dup'ed) by the two
/// pump threads, so the final close, which is what sends a RST when
/// SO_LINGER is 0, happens exactly once, when both are finished.
struct Connection {
    client: TcpStream,
    upstream: TcpStream,
    /// Set when one side was reset: the other pump must then not turn the
    /// wake-up below into a FIN, which the peer would take as a clean EOF.
    aborted: AtomicBool,
    /// Shared with the relay's counters.
    spurious_eagain: Arc<AtomicU64>,
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    ClientToUpstream,
    UpstreamToClient,
}

impl Connection {
    fn pump(&self, dir: Dir) {
        let (from, mut to) = match dir {
            Dir::ClientToUpstream => (&self.client, &self.upstream),
            Dir::UpstreamToClient => (&self.upstream, &self.client),
        };
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            match sock::read_like_epoll(from, &mut buf, &self.spurious_eagain) {
                Ok(0) => {
                    // EOF from `from`'s peer: half-close towards `to`'s peer,
                    // unless this EOF is our own wake-up after a reset.
                    if !self.aborted.load(Ordering::SeqCst) {
                        let _ = to.shutdown(Shutdown::Write);
                    }
                    return;
                }
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        // `to` was reset: reset `from` as well.
                        self.abort(from, to);
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    // ECONNRESET (or a timeout, which ends the same way):
                    // propagate as a RST to the other side.
                    self.abort(to, from);
                    return;
                }
            }
        }
    }

    /// Makes the final close of `victim` send a RST, and wakes the pump that
    /// reads `victim` (SHUT_RD sends nothing on the wire) so the connection
    /// can finish; `dead` is the side that already failed.
    fn abort(&self, victim: &TcpStream, dead: &TcpStream) {
        self.aborted.store(true, Ordering::SeqCst);
        sock::set_linger_zero(victim);
        let _ = victim.shutdown(Shutdown::Read);
        let _ = dead.shutdown(Shutdown::Read);
    }
}
