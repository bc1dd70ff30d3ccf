//! The probe's traffic checks, each on fresh connections in the scratch namespace, each judged
//! on the bytes an app would see and on the counters that prove the redirect happened.

use std::{
    io::{self, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    time::Duration,
};

use crate::datapath::{Counters, ReadTracer, Scratch};

use super::scratch::{self, accept, connect_from, drain, echo, pattern, ScratchNs};

/// A check's verdict when it ran to the end.
pub enum Verdict {
    Pass(String),
    /// Works, with a caveat an operator should know about.
    Warn(String),
}

pub type Outcome = Result<Verdict, String>;

pub const INBOUND_BIND: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Where the outbound check's app "calls a service" (TEST-NET-1, routed to lo in the scratch ns).
pub const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 9), 80);
pub const CAPTURE_PORT: u16 = 15001;

fn io(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn delta(before: &Counters, after: &Counters, name: &str) -> u64 {
    after.get(name) - before.get(name)
}

/// The two ends of an inbound hop: (sidecar side from 127.0.0.6, app side).
pub fn inbound_pair(ns: &ScratchNs) -> io::Result<(TcpStream, TcpStream)> {
    let l = ns.run(false, || TcpListener::bind("127.0.0.1:0"))?;
    let std::net::SocketAddr::V4(app) = l.local_addr()? else {
        return Err(io::Error::other("listener is not IPv4"));
    };
    let proxy = ns.run(true, move || connect_from(INBOUND_BIND, app))?;
    let app = accept(&l)?;
    Ok((proxy, app))
}

/// The two ends of an outbound hop through iptables REDIRECT: (app side, sidecar side).
pub fn outbound_pair(ns: &ScratchNs, sidecar: &TcpListener) -> io::Result<(TcpStream, TcpStream)> {
    let app = ns.run(false, || connect_from(Ipv4Addr::UNSPECIFIED, SERVICE))?;
    let side = accept(sidecar)?;
    Ok((app, side))
}

/// Sends `a_to_b` from `a` and `b_to_a` from `b`, each followed by a half-close, and checks both
/// arrive whole.
fn both_ways(a: TcpStream, b: TcpStream, a_to_b: &[u8], b_to_a: &[u8]) -> Result<(), String> {
    std::thread::scope(|s| {
        let wa = s.spawn(|| -> io::Result<()> {
            (&a).write_all(a_to_b)?;
            a.shutdown(Shutdown::Write)
        });
        let wb = s.spawn(|| -> io::Result<()> {
            (&b).write_all(b_to_a)?;
            b.shutdown(Shutdown::Write)
        });
        let at_b = drain(&b).map_err(io("read on the receiving end"))?;
        let at_a = drain(&a).map_err(io("read on the sending end"))?;
        wa.join()
            .map_err(|_| "writer panicked")?
            .map_err(io("write"))?;
        wb.join()
            .map_err(|_| "writer panicked")?
            .map_err(io("write"))?;
        if at_b.bytes != a_to_b || at_a.bytes != b_to_a {
            return Err(format!(
                "bytes differ: sent {} and {}, received {} and {}",
                a_to_b.len(),
                b_to_a.len(),
                at_b.bytes.len(),
                at_a.bytes.len()
            ));
        }
        Ok(())
    })
}

/// The sidecar -> app hop pairs by 4-tuple and carries 64 KiB each way exactly; the sidecar's
/// direction into the app is redirected only in the two-way mode (the reader rule keeps it on
/// TCP).
pub fn inbound_hop(ns: &ScratchNs, dp: &Scratch, two_way: bool) -> Outcome {
    let before = dp.counters().map_err(|e| e.to_string())?;
    let (proxy, app) = inbound_pair(ns).map_err(io("connect from 127.0.0.6"))?;
    both_ways(proxy, app, &pattern(1, 64 * 1024), &pattern(2, 64 * 1024))?;
    let after = dp.counters().map_err(|e| e.to_string())?;
    let pairs = delta(&before, &after, "pairs_inbound");
    let to_app = delta(&before, &after, "bytes_redirected_inbound_sidecar_to_app");
    let to_proxy = delta(&before, &after, "bytes_redirected_inbound_app_to_sidecar");
    let want_to_app = if two_way { 64 * 1024 } else { 0 };
    if pairs != 1 || to_app != want_to_app || to_proxy != 64 * 1024 {
        return Err(format!(
            "not accelerated as the mode says: {pairs} pairs, {to_app} bytes redirected into the app and {to_proxy} into the sidecar (want 1, {want_to_app}, 65536)"
        ));
    }
    Ok(Verdict::Pass(if two_way {
        "paired by 4-tuple; 64 KiB each way, all redirected".into()
    } else {
        "paired by 4-tuple; 64 KiB app -> sidecar redirected, the reply on TCP (reader rule)".into()
    }))
}

/// Reads are counted, so a reader that stops holds its writer back (`UNREAD_BUDGET`): after
/// every redirected byte was read (and some peeked first, which must not count), nothing may be
/// left in the unread count, or live pairs would be moved to TCP for no reason.
pub fn read_accounting(ns: &ScratchNs, dp: &Scratch) -> Outcome {
    if !dp.budget_enforced() {
        return Ok(Verdict::Warn(
            "no read tracer (neither fexit on tcp_bpf_recvmsg nor the sock_recv_length tracepoint): a reader that stops reading does not hold its writer back; its queue grows until TCP memory limits".into(),
        ));
    }
    const SIZE: usize = 256 * 1024;
    let (proxy, app) = inbound_pair(ns).map_err(io("connect from 127.0.0.6"))?;
    let (to_app, to_proxy) = (pattern(5, SIZE), pattern(6, SIZE));
    std::thread::scope(|s| -> Result<(), String> {
        let w = s.spawn(|| (&proxy).write_all(&to_app));
        let mut peeked = [0u8; 100];
        let n = app.peek(&mut peeked).map_err(io("peek"))?;
        let mut got = vec![0u8; SIZE];
        std::io::Read::read_exact(&mut &app, &mut got).map_err(io("read on the app"))?;
        w.join()
            .map_err(|_| "writer panicked")?
            .map_err(io("write"))?;
        if got != to_app || peeked[..n] != to_app[..n] {
            return Err("bytes differ sidecar -> app".into());
        }
        let w = s.spawn(|| (&app).write_all(&to_proxy));
        std::io::Read::read_exact(&mut &proxy, &mut got).map_err(io("read on the sidecar"))?;
        w.join()
            .map_err(|_| "writer panicked")?
            .map_err(io("write"))?;
        if got != to_proxy {
            return Err("bytes differ app -> sidecar".into());
        }
        Ok(())
    })?;
    let unread = dp.unread_total().map_err(|e| e.to_string())?;
    if unread != 0 {
        return Err(format!(
            "{unread} bytes still counted unread after every byte was read: the read tracer misses reads, so live pairs would fall back to TCP"
        ));
    }
    let by = match dp.read_tracer() {
        Some(ReadTracer::Exit) => "fexit on tcp_bpf_recvmsg, sockhash sockets only",
        _ => "the sock_recv_length tracepoint, which runs on every read of the node: this kernel refused fexit",
    };
    Ok(Verdict::Pass(format!(
        "every read counted (256 KiB each way, peeks excluded; by {by}); a reader that stops holds its writer back after {} MiB unread",
        meshlane_common::UNREAD_BUDGET >> 20
    )))
}

/// The app -> sidecar hop through iptables REDIRECT pairs by the ACK's token.
pub fn outbound_hop(ns: &ScratchNs, dp: &Scratch, sidecar: &TcpListener) -> Outcome {
    let before = dp.counters().map_err(|e| e.to_string())?;
    let (app, side) = outbound_pair(ns, sidecar).map_err(io("connect through REDIRECT"))?;
    both_ways(app, side, &pattern(3, 64 * 1024), &pattern(4, 64 * 1024))?;
    let after = dp.counters().map_err(|e| e.to_string())?;
    let pairs = delta(&before, &after, "pairs_outbound");
    let stamps = delta(&before, &after, "stamps_found");
    let bytes = delta(&before, &after, "bytes_redirected_outbound_app_to_sidecar");
    if pairs != 1 || stamps != 1 || bytes != 64 * 1024 {
        return Err(format!(
            "not accelerated: {pairs} pairs, {stamps} stamps found, {bytes} bytes redirected (want 1, 1, 65536)"
        ));
    }
    Ok(Verdict::Pass(
        "paired by the handshake token through NAT; 64 KiB each way".into(),
    ))
}

/// Where the sidecar-hop check's "server pod" is, seen from the "client pod".
/// (TEST-NET-2: apart from the outbound check's TEST-NET-1, which the scratch namespace REDIRECTs.)
pub const SIDECAR_HOP_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const SIDECAR_HOP_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const INBOUND_CAPTURE_PORT: u16 = 15006;

/// The sidecar hop: the client pod's "sidecar" (uid 1337) connects to the server pod's address,
/// whose PREROUTING REDIRECT hands it to the server's "sidecar" on 15006; the two are paired by
/// the token and carry 64 KiB each way, both directions redirected.
pub fn sidecar_hop(client: &ScratchNs, dp: &Scratch, server_sidecar: &TcpListener) -> Outcome {
    let before = dp.counters().map_err(|e| e.to_string())?;
    let up = client
        .run(true, || {
            connect_from(
                Ipv4Addr::UNSPECIFIED,
                SocketAddrV4::new(SIDECAR_HOP_SERVER, 80),
            )
        })
        .map_err(io("connect to the server pod"))?;
    let down = accept(server_sidecar).map_err(io("accept on 15006"))?;
    both_ways(up, down, &pattern(9, 64 * 1024), &pattern(10, 64 * 1024))?;
    let after = dp.counters().map_err(|e| e.to_string())?;
    let pairs = delta(&before, &after, "pairs_sidecar");
    let there = delta(&before, &after, "bytes_redirected_sidecar_client_to_server");
    let back = delta(&before, &after, "bytes_redirected_sidecar_server_to_client");
    if pairs != 1 || there != 64 * 1024 || back != 64 * 1024 {
        return Err(format!(
            "not accelerated: {pairs} pairs, {there} and {back} bytes redirected there and back (want 1, 65536, 65536)"
        ));
    }
    Ok(Verdict::Pass(
        "sidecar -> sidecar across two namespaces, paired by the token through REDIRECT; 64 KiB each way, both redirected".into(),
    ))
}

/// A write right after connect() and 2000 tiny writes keep their order.
pub fn first_byte_order(ns: &ScratchNs, sidecar: &TcpListener) -> Outcome {
    let (app, side) = outbound_pair(ns, sidecar).map_err(io("connect"))?;
    let data = pattern(5, 3 * 2000);
    let echoer = std::thread::spawn(move || echo(side));
    let got = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<()> {
            for c in data.chunks(3) {
                (&app).write_all(c)?;
            }
            app.shutdown(Shutdown::Write)
        });
        drain(&app)
    })
    .map_err(io("read"))?;
    scratch::join(echoer).map_err(io("sidecar echo"))?;
    if got.bytes != data {
        return Err(format!(
            "{} bytes sent, {} came back or out of order",
            data.len(),
            got.bytes.len()
        ));
    }
    Ok(Verdict::Pass(
        "2000 writes of 3 bytes, first one right after connect(), in order".into(),
    ))
}

/// A blocking read at the end of a stream the peer closed returns 0, never EAGAIN.
pub fn end_of_stream(ns: &ScratchNs) -> Outcome {
    for i in 0..20 {
        let (proxy, app) = inbound_pair(ns).map_err(io("connect"))?;
        let data = pattern(100 + i, 8 * 1024);
        (&proxy).write_all(&data).map_err(io("write"))?;
        drop(proxy);
        let got = drain(&app).map_err(io("read"))?;
        if got.spurious_eagain > 0 {
            return Err(format!(
                "a blocking read at end of stream returned EAGAIN ({} times on stream {i})",
                got.spurious_eagain
            ));
        }
        if got.bytes != data {
            return Err(format!(
                "stream {i}: {} of {} bytes",
                got.bytes.len(),
                data.len()
            ));
        }
    }
    Ok(Verdict::Pass(
        "20 streams closed by the peer: every read at the end returned 0".into(),
    ))
}

/// MSG_PEEK (Envoy's listener inspectors use it) sees redirected bytes without consuming them.
pub fn msg_peek(ns: &ScratchNs) -> Outcome {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let (proxy, app) = inbound_pair(ns).map_err(io("connect"))?;
    let data = pattern(7, 100);
    (&proxy).write_all(&data).map_err(io("write"))?;
    let mut peeked = [0u8; 100];
    let n = recv(app.as_raw_fd(), &mut peeked, MsgFlags::MSG_PEEK)
        .map_err(|e| format!("MSG_PEEK: {e}"))?;
    let mut read = Vec::new();
    let mut buf = [0u8; 100];
    while read.len() < 100 {
        let m =
            recv(app.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|e| format!("read: {e}"))?;
        if m == 0 {
            break;
        }
        read.extend_from_slice(&buf[..m]);
    }
    if n == 0 || peeked[..n] != data[..n] || read != data {
        return Err(format!(
            "peeked {n} bytes, then read {} bytes; the data did not match",
            read.len()
        ));
    }
    Ok(Verdict::Pass(format!(
        "peeked {n} of 100 bytes, then read all 100"
    )))
}

/// FIONREAD counts redirected bytes. Where it does not (6.1's sockmap has no FIONREAD of its
/// own), an app that sizes its reads with it, or takes 0 for "nothing yet", waits for bytes that
/// are already there: a hang, the failure that ended other meshes' eBPF modes. So it refuses.
pub fn fionread(ns: &ScratchNs) -> Outcome {
    let (proxy, app) = inbound_pair(ns).map_err(io("connect"))?;
    (&proxy).write_all(&pattern(8, 1000)).map_err(io("write"))?;
    // Wait until all 1000 bytes are there (a peek sees them either way), so a slow machine
    // cannot make FIONREAD look short.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut peek = [0u8; 1000];
    while app.peek(&mut peek).map_err(io("peek"))? < peek.len()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let n = super::sys::fionread(&app).map_err(io("FIONREAD"))?;
    if n == 1000 {
        Ok(Verdict::Pass(
            "FIONREAD reports the 1000 redirected bytes".into(),
        ))
    } else {
        Err(format!(
            "FIONREAD reports {n} of 1000 redirected bytes waiting: apps that size their reads with FIONREAD would stall on this kernel's sockmap"
        ))
    }
}

/// The kernel's spurious EAGAIN: a blocking read after the reader's own half-close.
pub fn half_close_then_read(ns: &ScratchNs, sidecar: &TcpListener) -> Outcome {
    let (app, side) = outbound_pair(ns, sidecar).map_err(io("connect"))?;
    let server = std::thread::spawn(move || -> io::Result<()> {
        let req = drain(&side)?;
        // Reply after the app's FIN was ACKed on its own (delayed ACK, ~40 ms).
        std::thread::sleep(Duration::from_millis(80));
        (&side).write_all(&req.bytes)
    });
    (&app).write_all(b"request").map_err(io("write"))?;
    app.shutdown(Shutdown::Write).map_err(io("shutdown"))?;
    let got = drain(&app).map_err(io("read"))?;
    scratch::join(server).map_err(io("sidecar"))?;
    if got.bytes != b"request" {
        return Err("the reply did not come back whole".into());
    }
    if got.spurious_eagain > 0 {
        return Ok(Verdict::Warn(
            "a blocking read after the app's own half-close returned EAGAIN (kernel tcp_bpf_recvmsg); \
             event-driven apps are unaffected, blocking apps that half-close then read may fail"
                .into(),
        ));
    }
    Ok(Verdict::Pass(
        "no spurious EAGAIN after a half-close".into(),
    ))
}

/// A stream keeps flowing, whole and in order, while the datapath is detached under it.
pub fn survives_detach(ns: &ScratchNs, dp: Scratch) -> Outcome {
    let (proxy, app) = inbound_pair(ns).map_err(io("connect"))?;
    let first = pattern(9, 32 * 1024);
    let second = pattern(10, 32 * 1024);
    let mut all = first.clone();
    all.extend_from_slice(&second);
    (&proxy)
        .write_all(&first)
        .map_err(io("write before detach"))?;
    drop(dp);
    (&proxy)
        .write_all(&second)
        .map_err(io("write after detach"))?;
    drop(proxy);
    let got = drain(&app).map_err(io("read"))?;
    if got.bytes != all {
        return Err(format!(
            "{} of {} bytes arrived in order across the detach",
            got.bytes.len(),
            all.len()
        ));
    }
    Ok(Verdict::Pass(
        "64 KiB across the detach, whole and in order".into(),
    ))
}
