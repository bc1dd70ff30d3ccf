//! The two measurements: request/response round trips on one connection, and connect() cost.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use minimesh::Netns;

/// Percentiles of one sample set, in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub samples: usize,
}

impl Percentiles {
    pub fn of(mut ns: Vec<u64>) -> Percentiles {
        ns.sort_unstable();
        let at = |q: f64| {
            if ns.is_empty() {
                return 0.0;
            }
            let i = ((ns.len() as f64 - 1.0) * q).round() as usize;
            ns[i] as f64 / 1000.0
        };
        Percentiles {
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            samples: ns.len(),
        }
    }
}

fn connect(ns: &Netns, dst: SocketAddrV4) -> Result<TcpStream> {
    let s = ns.run(|| TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5)))??;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Round trips of `size` bytes against an echo server on one fresh connection, after a warm-up.
pub fn pingpong(ns: &Netns, dst: SocketAddrV4, size: usize, n: usize) -> Result<Percentiles> {
    let mut s = connect(ns, dst).context("connect for ping-pong")?;
    let msg = vec![0x5a_u8; size];
    let mut buf = vec![0u8; size];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        s.write_all(&msg)?;
        read_exact_patient(&mut s, &mut buf)?;
        if i >= n / 10 {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    ensure!(buf == msg, "echo returned different bytes");
    Ok(Percentiles::of(samples))
}

/// connect() latency: each cycle connects, exchanges one byte (so the pair is really used) and
/// closes; only the connect() call is timed.
pub fn connects(ns: &Netns, dst: SocketAddrV4, n: usize) -> Result<Percentiles> {
    ns.run(|| -> Result<Percentiles> {
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))?;
            samples.push(t.elapsed().as_nanos() as u64);
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            read_exact_patient(&mut s, &mut b)?;
        }
        Ok(Percentiles::of(samples))
    })?
}

/// EAGAIN retries of [`read_exact_patient`], process-wide; the relay suite reports the difference
/// over each scenario round (one runs at a time), so a retry is never silent.
static EAGAIN_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// EAGAIN retries so far (see [`EAGAIN_RETRIES`]).
pub fn eagain_retries() -> u64 {
    EAGAIN_RETRIES.load(std::sync::atomic::Ordering::Relaxed)
}

/// read_exact that waits out a spurious EAGAIN on a blocking socket (a kernel quirk of sockets in
/// a sockmap; see the README) instead of failing the benchmark, but not a real read timeout
/// (which is also EAGAIN): a reply that never comes fails after 10 s instead of hanging.
fn read_exact_patient(s: &mut TcpStream, mut buf: &mut [u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                EAGAIN_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
