//! Bytes that leave an app socket before sk_msg can see them must never be overtaken by later,
//! redirected bytes (docs/DESIGN.md invariant 2, first byte or never): data in a TCP Fast Open SYN,
//! and a write that another thread started while connect() was still in progress.

mod support;

use std::{
    io::Write,
    net::{Shutdown, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    time::Duration,
};

use minimesh::{CaptureConfig, EchoServer, Netns, TwoPods};
use nix::sys::socket::{
    connect as nix_connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
    SockaddrIn,
};
use support::*;

/// An IPv4 TCP socket created in `ns`, not yet connected.
fn unconnected(ns: &Netns) -> TcpStream {
    let fd: OwnedFd = ns
        .run(|| {
            socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
        })
        .unwrap()
        .unwrap();
    TcpStream::from(fd)
}

/// Both pods accelerated, an echo server behind the server pod's 8080.
fn scene(test: &str, subnet: u8) -> Option<(Accel, TwoPods, SocketAddrV4, EchoServer)> {
    let mut accel = Accel::new(test)?;
    let mesh = TwoPods::new(subnet, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    accel.add_pod(&mesh.client.ns, &mesh.client.capture);
    accel.add_pod(&mesh.server.ns, &mesh.server.capture);
    let dst = SocketAddrV4::new(mesh.server.ip, 8080);
    let echo = EchoServer::spawn(&mesh.server.ns, dst).unwrap();
    Some((accel, mesh, dst, echo))
}

fn sysctl(ns: &Netns, key: &str, value: &str) {
    let status = ns
        .cmd("sysctl")
        .args(["-q", "-w", &format!("{key}={value}")])
        .status()
        .unwrap();
    assert!(status.success(), "sysctl {key}={value} in {}", ns.name());
}

/// Data in the SYN (Fast Open, without cookies, accepted by every listener of the pod) leaves
/// before either end joins: neither end may pair, or the bytes that follow could be redirected
/// past it. The stream stays exact and the early data is counted.
#[test]
fn fast_open_data_keeps_its_place() {
    let Some((accel, mesh, dst, _echo)) = scene("reorder_fast_open", 131) else {
        return;
    };
    // 0x1 client, 0x2 server, 0x4 client without cookie, 0x200 server without cookie, 0x400
    // every listener (the sidecar sets no TCP_FASTOPEN option).
    sysctl(&mesh.client.ns, "net.ipv4.tcp_fastopen", "0x607");
    let before = accel.counters();
    for i in 0..20 {
        let s = unconnected(&mesh.client.ns);
        setsockopt(&s, sockopt::TcpFastOpenConnect, &true).unwrap();
        // Returns at once: the handshake starts with the first write, which rides in the SYN.
        nix_connect(s.as_raw_fd(), &SockaddrIn::from(dst)).unwrap();
        let data = pattern(i, 64 << 10);
        (&s).write_all(&data[..200]).unwrap();
        (&s).write_all(&data[200..]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let out = read_to_end(&s).unwrap();
        assert_same(&format!("fast open connection {i}"), &out.bytes, &data);
    }
    let c = accel.counters();
    let early = c.get("skip_early_data") - before.get("skip_early_data");
    eprintln!("counters: {c:?}");
    // Each connection's early data is seen by at least one of its outbound ends.
    assert!(early >= 20, "skip_early_data moved by {early}, want >= 20");
    assert_eq!(
        c.get("pairs_outbound"),
        before.get("pairs_outbound"),
        "a connection with data in its SYN must not pair"
    );
}

/// A thread writes while another thread's blocking connect() is still in progress: that write
/// entered the kernel before the socket joined the sockhash, so it goes out on plain TCP
/// without sk_msg seeing it. Bytes written after it must not be redirected past it.
///
/// The handshake is held open by dropping the first SYN at the sidecar's capture port, so the
/// connect() takes one SYN retransmission (about a second) and the write surely starts inside it.
///
/// sk_msg sees it at the socket's first message (its `write_seq` and data segments, read
/// through the kernel's BTF) and keeps that direction on TCP; without that check the next
/// write was redirected ahead of the racing one (156 KiB here), and the stream stayed exact
/// only because the relay read the TCP bytes first.
#[test]
fn a_write_racing_connect_is_not_overtaken() {
    let Some((accel, mesh, dst, _echo)) = scene("reorder_write_during_connect", 132) else {
        return;
    };
    let port = mesh.client.capture.outbound_port.to_string();
    let iptables = |op: &str| {
        let status = mesh
            .client
            .ns
            .cmd("iptables")
            .args([
                "-w", op, "INPUT", "-p", "tcp", "--syn", "--dport", &port, "-j", "DROP",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "iptables {op}");
    };
    let before = accel.counters();
    let data = pattern(7, 256 << 10);
    iptables("-I");
    let s = unconnected(&mesh.client.ns);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // connect() below has sent its first SYN by now, and waits for the retransmission.
            std::thread::sleep(Duration::from_millis(300));
            (&s).write_all(&data[..100 << 10]).unwrap();
        });
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(600));
            iptables("-D");
        });
        nix_connect(s.as_raw_fd(), &SockaddrIn::from(dst)).unwrap();
    });
    // Long enough for the sidecar's end to be accepted and the pair to complete.
    std::thread::sleep(Duration::from_millis(300));
    (&s).write_all(&data[100 << 10..]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let out = read_to_end(&s).unwrap();
    assert_same("write racing connect", &out.bytes, &data);
    let c = accel.counters();
    eprintln!("counters: {c:?}");
    let moved = |k: &str| c.get(k) - before.get(k);
    // The bytes after the racing write went to TCP behind it, never redirected past it, and the
    // check that kept them there is counted.
    assert!(
        moved("skip_early_data") >= 1,
        "the racing write was not seen"
    );
    assert_eq!(
        moved("bytes_redirected_outbound_app_to_sidecar"),
        0,
        "bytes were redirected after a write that had already left on TCP"
    );
}
