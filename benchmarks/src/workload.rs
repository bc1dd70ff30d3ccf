//! The workloads of the Envoy suite: closed-loop load generators on blocking sockets, one thread
//! per connection, every request timed, every reply checked. Percentiles are exact (sorted
//! samples), not bucketed.

use std::{
    io::{BufReader, Read, Write},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use minimesh::{grpc::GrpcClient, Netns};

use crate::measure::Percentiles;

// The HTTP workload's request loop: hand written, not the workspace's `httpc` (see the module).
mod http1;

/// How long one reply may take before the workload fails.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes echoed per connect cycle. Not one byte: the server sidecar's `tls_inspector` holds a
/// connection until it has seen enough bytes to rule out TLS.
pub const CONNECT_ECHO_BYTES: usize = 64;
/// What the HTTP workload GETs from nginx (a 1 KiB file).
const HTTP_PATH: &str = "/1k";

/// The request line of every HTTP request ([`http1::get`] writes it as is): the part
/// of a request every HTTP/1.1 hop forwards unchanged, whatever headers Envoy adds.
pub fn http_request_line() -> String {
    format!("GET {HTTP_PATH} HTTP/1.1\r\n")
}

/// What one workload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Kind {
    /// `size`-byte writes echoed back, through `tcp_proxy`.
    TcpPingPong,
    /// HTTP/1.1 keep-alive `GET /1k` from nginx, through the HTTP chains.
    Http,
    /// gRPC unary calls with `size`-byte payloads (tonic), through the HTTP chains (h2c).
    Grpc,
    /// connect(), one byte echoed, close: connection-setup cost.
    Connect,
    /// One connection streaming `total` bytes in `size`-byte writes to the echo server.
    Bulk,
}

/// One workload of the matrix.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Workload {
    pub name: String,
    pub kind: Kind,
    pub size: usize,
    pub conns: usize,
    /// Requests per connection (bulk: bytes in total).
    pub count: usize,
    /// tcp ping-pong only: which sockets the apps use.
    pub family: Family,
    /// Open loop: requests sent on a fixed schedule instead of each after the previous reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_loop: Option<OpenLoop>,
}

/// A fixed-rate run at a share of B's capacity in a closed-loop workload of the same shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpenLoop {
    /// The closed-loop workload whose B throughput is the capacity.
    pub base: String,
    /// The share of that capacity to send.
    pub fraction: f64,
    /// Requests per second over all connections (set once B's capacity is measured).
    pub rate: f64,
}

/// When connection `conn` of `conns` sends its `j`-th request, from the common start, for
/// `rate` requests per second in all: each connection sends every `conns / rate` seconds, the
/// connections spread evenly over one such interval, so the load arrives at a steady rate
/// rather than in bursts of `conns`.
pub fn scheduled(rate: f64, conns: usize, conn: usize, j: usize) -> Duration {
    let interval = conns as f64 / rate;
    Duration::from_secs_f64(interval * (j as f64 + conn as f64 / conns as f64))
}

/// The apps' sockets in a tcp ping-pong workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// AF_INET on both sides.
    Ipv4,
    /// As Go, Java and Node make them by default: a server on `[::]` with IPV6_V6ONLY off and
    /// clients on AF_INET6 sockets to the v4-mapped service address, so both app ends are
    /// AF_INET6 sockets carrying IPv4 (and every other hop is IPv4).
    DualStack,
    /// True IPv6 in dual-stack pods: the same apps, the client dialling the server pod's IPv6
    /// address, a Service whose endpoint is IPv6, so every hop is IPv6 (the inbound one from
    /// `::6`).
    Ipv6,
}

/// What one workload measured in one round.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Measured {
    pub latency: Percentiles,
    /// Requests (or connect cycles) per second; bulk: MiB/s.
    pub throughput: f64,
    pub requests: u64,
    pub wall_s: f64,
    /// Reads of a blocking socket that returned EAGAIN and were retried (a socket in a sockhash
    /// can do that; plain TCP never does): reported per scenario, never hidden.
    pub eagain_retries: u64,
    /// When the workload started, seconds since the Unix epoch (the HdrHistogram log's
    /// interval start).
    pub start_unix_s: f64,
    /// Every timed request's latency in ns, sorted (for the CDF plot; results.json keeps the
    /// plotted quantiles, not these).
    #[serde(skip)]
    pub samples_ns: Vec<u64>,
}

/// EAGAIN retries of the load generators' blocking reads, process-wide; `run` reports the
/// difference over one workload (workloads run one at a time).
static EAGAIN_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_eagain() {
    EAGAIN_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Where the workload's servers are, for one scenario.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    pub echo: SocketAddrV4,
    /// The dual-stack echo server, by its v4-mapped address.
    pub echo_dual_stack: SocketAddrV6,
    /// The IPv6 echo server (a dual-stack one on its own port), by the pod's IPv6 address.
    pub echo_ipv6: SocketAddrV6,
    pub http: SocketAddrV4,
    pub grpc: SocketAddrV4,
}

fn connect(ns: &Netns, dst: impl Into<SocketAddr>) -> Result<TcpStream> {
    let dst = dst.into();
    let s = ns
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5)))?
        .with_context(|| format!("connect to {dst}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

/// Runs one workload from the client namespace.
pub fn run(w: &Workload, ns: &Netns, t: Targets) -> Result<Measured> {
    let before = EAGAIN_RETRIES.load(std::sync::atomic::Ordering::Relaxed);
    let start_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut m = match w.kind {
        Kind::TcpPingPong | Kind::Http | Kind::Grpc => load(w, ns, t),
        Kind::Connect => connects(w, ns, t.echo),
        Kind::Bulk => bulk(w, ns, t.echo),
    }?;
    m.eagain_retries = EAGAIN_RETRIES.load(std::sync::atomic::Ordering::Relaxed) - before;
    m.start_unix_s = start_unix_s;
    Ok(m)
}

/// Requests a workload sends in all, the unrecorded warm-up included (`Measured::requests`
/// counts only the timed ones): what the kernel's per-program counters see.
pub fn requests_sent(w: &Workload, measured: &Measured) -> u64 {
    let warm = match w.kind {
        Kind::TcpPingPong | Kind::Http | Kind::Grpc => warmup(w) * w.conns,
        Kind::Connect | Kind::Bulk => 0,
    };
    measured.requests + warm as u64
}

/// Unrecorded requests per connection before a closed-loop workload's timed ones.
fn warmup(w: &Workload) -> usize {
    (w.count / 10).max(5)
}

/// `conns` connections opened first, then all of them run `count` requests each (after a 10%
/// warm-up), started together. Closed loop: each request is sent when the previous reply came.
/// Open loop ([`Workload::open_loop`]): each is sent at its [`scheduled`] time and its latency
/// counts from that time, not from when it could be sent, so a request held up behind a slow
/// one carries the wait (as fortio and wrk2 measure; timing from the send would hide it).
fn load(w: &Workload, ns: &Netns, t: Targets) -> Result<Measured> {
    let rate = w.open_loop.as_ref().map(|o| o.rate);
    if let Some(r) = rate {
        ensure!(
            r > 0.0,
            "{}: open-loop rate {r} (B's capacity not measured)",
            w.name
        );
    }
    let warm = warmup(w);
    let mut clients = Vec::with_capacity(w.conns);
    for _ in 0..w.conns {
        clients.push(Client::open(w, ns, t)?);
    }
    let barrier = std::sync::Barrier::new(w.conns + 1);
    let (samples, wall) = std::thread::scope(|s| -> Result<(Vec<u64>, Duration)> {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(conn, mut c)| {
                let barrier = &barrier;
                s.spawn(move || -> Result<Vec<u64>> {
                    let warmed = (0..warm).try_for_each(|_| c.request());
                    // Reach the barrier even after a failure (a sidecar killed by Ctrl-C), or
                    // every other thread and the caller would wait for this one forever.
                    barrier.wait();
                    let start = Instant::now();
                    warmed?;
                    let mut v = Vec::with_capacity(w.count);
                    for j in 0..w.count {
                        let t0 = match rate {
                            Some(r) => {
                                let due = start + scheduled(r, w.conns, conn, j);
                                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(wait);
                                }
                                due
                            }
                            None => Instant::now(),
                        };
                        c.request()?;
                        v.push(t0.elapsed().as_nanos() as u64);
                    }
                    Ok(v)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut all = Vec::with_capacity(w.conns * w.count);
        let mut first_err = None;
        for h in handles {
            match h.join().expect("load thread") {
                Ok(v) => all.extend(v),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok((all, t0.elapsed()))
    })?;
    let n = samples.len() as u64;
    let mut samples_ns = samples;
    samples_ns.sort_unstable();
    Ok(Measured {
        latency: Percentiles::of(samples_ns.clone()),
        throughput: n as f64 / wall.as_secs_f64(),
        requests: n,
        wall_s: wall.as_secs_f64(),
        eagain_retries: 0,
        start_unix_s: 0.0,
        samples_ns,
    })
}

enum Client {
    Tcp {
        s: TcpStream,
        msg: Vec<u8>,
        buf: Vec<u8>,
    },
    Http(BufReader<TcpStream>, String),
    Grpc(Box<GrpcClient>, usize),
}

impl Client {
    fn open(w: &Workload, ns: &Netns, t: Targets) -> Result<Client> {
        Ok(match w.kind {
            Kind::TcpPingPong => Client::Tcp {
                // An IPv6 destination makes the socket AF_INET6 (Java's default for IPv4 too).
                s: match w.family {
                    Family::Ipv4 => connect(ns, t.echo)?,
                    Family::DualStack => connect(ns, t.echo_dual_stack)?,
                    Family::Ipv6 => connect(ns, t.echo_ipv6)?,
                },
                msg: (0..w.size).map(|i| (i % 251) as u8).collect(),
                buf: vec![0; w.size],
            },
            Kind::Http => Client::Http(BufReader::new(connect(ns, t.http)?), t.http.to_string()),
            Kind::Grpc => Client::Grpc(Box::new(GrpcClient::connect(ns, t.grpc)?), w.size),
            Kind::Connect | Kind::Bulk => unreachable!("not a closed-loop workload"),
        })
    }

    fn request(&mut self) -> Result<()> {
        match self {
            Client::Tcp { s, msg, buf } => {
                s.write_all(msg)?;
                read_exact_patient(s, buf)?;
                ensure!(buf == msg, "echo returned different bytes");
            }
            Client::Http(conn, host) => {
                let r = http1::get(conn, host, HTTP_PATH)?;
                ensure!(
                    r.status == 200 && r.body.len() == 1024,
                    "GET {HTTP_PATH}: {} with {} bytes",
                    r.status,
                    r.body.len()
                );
            }
            Client::Grpc(c, size) => {
                c.unary_latency(1, *size)?;
            }
        }
        Ok(())
    }
}

/// connect() latency over `count` cycles of connect, [`CONNECT_ECHO_BYTES`] echoed, close (only
/// connect() timed); throughput is whole cycles per second.
fn connects(w: &Workload, ns: &Netns, dst: SocketAddrV4) -> Result<Measured> {
    ns.run(|| -> Result<Measured> {
        let mut samples = Vec::with_capacity(w.count);
        let t0 = Instant::now();
        for _ in 0..w.count {
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))?;
            samples.push(t.elapsed().as_nanos() as u64);
            s.set_read_timeout(Some(READ_TIMEOUT))?;
            s.write_all(&[b'x'; CONNECT_ECHO_BYTES])?;
            let mut b = [0u8; CONNECT_ECHO_BYTES];
            read_exact_patient(&mut s, &mut b)?;
        }
        let wall = t0.elapsed();
        Ok(Measured {
            latency: Percentiles::of(samples),
            throughput: w.count as f64 / wall.as_secs_f64(),
            requests: w.count as u64,
            wall_s: wall.as_secs_f64(),
            eagain_retries: 0,
            start_unix_s: 0.0,
            samples_ns: Vec::new(),
        })
    })?
}

/// One connection: a writer thread sends `count` bytes in `size`-byte writes, this thread reads
/// the echo back; throughput in MiB/s of payload (each byte crosses the chain twice).
fn bulk(w: &Workload, ns: &Netns, dst: SocketAddrV4) -> Result<Measured> {
    let s = connect(ns, dst)?;
    let chunk = vec![0x42u8; w.size];
    let writes = w.count.div_ceil(w.size);
    let total = writes * w.size;
    let t0 = Instant::now();
    std::thread::scope(|sc| -> Result<()> {
        let mut ws = s.try_clone()?;
        let writer = sc.spawn(move || -> Result<()> {
            for _ in 0..writes {
                ws.write_all(&chunk)?;
            }
            Ok(())
        });
        let mut rs = &s;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < total {
            match rs.read(&mut buf) {
                Ok(0) => anyhow::bail!("echo ended after {got} of {total} bytes"),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && t0.elapsed() < 6 * READ_TIMEOUT =>
                {
                    count_eagain()
                }
                Err(e) => return Err(e.into()),
            }
        }
        writer.join().expect("bulk writer")
    })?;
    let wall = t0.elapsed();
    Ok(Measured {
        latency: Percentiles::default(),
        throughput: total as f64 / (1 << 20) as f64 / wall.as_secs_f64(),
        requests: writes as u64,
        wall_s: wall.as_secs_f64(),
        eagain_retries: 0,
        start_unix_s: 0.0,
        samples_ns: Vec::new(),
    })
}

/// read_exact that waits out a spurious EAGAIN on a blocking socket (a kernel quirk of sockets in
/// a sockmap; see the README) instead of failing the benchmark, but not a real read timeout.
fn read_exact_patient(s: &mut TcpStream, mut buf: &mut [u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + READ_TIMEOUT;
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                count_eagain()
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// CPU time (user + system, all threads) of a set of processes, from /proc/<pid>/stat, in µs.
pub fn cpu_us(pids: &[u32]) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the parenthesised comm: state is field 3; utime, stime are 14, 15.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks * 1_000_000 / hz)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_spreads_connections_over_one_interval() {
        // 1000 requests/s on 4 connections: each sends every 4 ms, 1 ms apart from the next.
        let at = |conn, j| scheduled(1000.0, 4, conn, j).as_secs_f64();
        assert!((at(0, 0) - 0.0).abs() < 1e-12);
        assert!((at(1, 0) - 0.001).abs() < 1e-12);
        assert!((at(3, 0) - 0.003).abs() < 1e-12);
        assert!((at(0, 1) - 0.004).abs() < 1e-12);
        assert!((at(2, 10) - 0.042).abs() < 1e-12);
        // Over all connections: the requests scheduled before 1 s are the rate.
        let before_1s = (0..4)
            .flat_map(|c| (0..1000).map(move |j| at(c, j)))
            .filter(|t| *t < 1.0)
            .count();
        assert_eq!(before_1s, 1000);
    }
}
