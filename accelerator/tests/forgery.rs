//! The pairing token cannot be forged. Raw-socket handshakes to the sidecar's capture port carry
//! meshlane's option: a waiting app socket's cookie (a node-wide counter, the token meshlane used
//! to send), sent from the app's own address as a process in the pod with CAP_NET_RAW (a default
//! container capability) would; and the app's real token copied off the wire, sent from another
//! address. Neither may pair with the app's socket: the token is random per connection, and the
//! sidecar's end must see the app's address as its peer. (A process in the pod that sniffs the
//! pod's loopback could replay a copied token from the pod's own address while the app waits;
//! it could as well read and inject that loopback traffic itself, so it gains nothing.)

mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use meshlane_common::{TCP_OPT_EXID, TCP_OPT_KIND, TCP_OPT_LEN};
use minimesh::{CaptureConfig, Netns, SynCapture};
use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
    SockType, SockaddrIn,
};
use support::*;

const APP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const CAPTURE_PORT: u16 = 15001;
/// Source ports of the forged handshakes (the kernel's RSTs from them are dropped).
const FORGED_PORTS: [u16; 2] = [40123, 40124];

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// A TCP segment from `src`:`sport` to 127.0.0.1:`dport` with a correct checksum.
fn segment(
    src: Ipv4Addr,
    (sport, dport): (u16, u16),
    (seq, ack): (u32, u32),
    flags: u8,
    options: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let len = 20 + options.len();
    let mut s = Vec::with_capacity(len);
    s.extend(sport.to_be_bytes());
    s.extend(dport.to_be_bytes());
    s.extend(seq.to_be_bytes());
    s.extend(ack.to_be_bytes());
    s.push(((len / 4) as u8) << 4);
    s.push(flags);
    s.extend(65535u16.to_be_bytes());
    s.extend([0, 0, 0, 0]); // checksum, urgent pointer
    s.extend(options);
    // Checksum over the pseudo-header (addresses, protocol 6, length) and the segment.
    let [a, b, c, d] = src.octets();
    let mut sum: u32 = u32::from(u16::from_be_bytes([a, b]))
        + u32::from(u16::from_be_bytes([c, d]))
        + 0x7f00
        + 0x0001
        + 6
        + len as u32;
    for pair in s.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    s[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    s
}

/// A handshake from a raw socket bound to `src` to the capture port whose final ACK carries
/// `token` in meshlane's option, as a stamped app socket's would.
fn forge(ns: &Netns, src: Ipv4Addr, sport: u16, token: [u8; 8]) {
    let raw: OwnedFd = ns
        .run(|| {
            socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Tcp,
            )
        })
        .unwrap()
        .expect("raw socket (CAP_NET_RAW)");
    setsockopt(
        &raw,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(2, 0),
    )
    .unwrap();
    nix::sys::socket::bind(
        raw.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(src, 0)),
    )
    .unwrap();
    let to = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, CAPTURE_PORT));
    let isn = 0x1234_5678u32;
    let syn = segment(src, (sport, CAPTURE_PORT), (isn, 0), SYN, &[]);
    sendto(raw.as_raw_fd(), &syn, &to, MsgFlags::empty()).unwrap();
    // The SYN-ACK (the raw socket also sees our own segments on lo: filter by direction).
    let deadline = Instant::now() + Duration::from_secs(5);
    let server_isn = loop {
        assert!(
            Instant::now() < deadline,
            "no SYN-ACK from the capture port"
        );
        let mut buf = [0u8; 1500];
        let Ok(n) = recv(raw.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
            continue;
        };
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n < ihl + 20 {
            continue;
        }
        let tcp = &buf[ihl..n];
        let (src, dst) = (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        );
        if src == CAPTURE_PORT && dst == sport && tcp[13] & (SYN | ACK) == SYN | ACK {
            break u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        }
    };
    let exid = TCP_OPT_EXID.to_be_bytes();
    let mut option = vec![TCP_OPT_KIND, TCP_OPT_LEN, exid[0], exid[1]];
    option.extend(token);
    let ack = segment(
        src,
        (sport, CAPTURE_PORT),
        (isn + 1, server_isn.wrapping_add(1)),
        ACK,
        &option,
    );
    sendto(raw.as_raw_fd(), &ack, &to, MsgFlags::empty()).unwrap();
}

#[test]
fn a_forged_handshake_pairs_with_nothing() {
    let Some(mut accel) = Accel::new("forgery") else {
        return;
    };
    let ns = Netns::new("forge").unwrap();
    for ip in [APP, SERVER] {
        minimesh::add_addr(&ns, "lo", ip, 32).unwrap();
    }
    let ports = format!("{}:{}", FORGED_PORTS[0], FORGED_PORTS[1]);
    let dropped = ns
        .cmd("iptables")
        .args(["-w", "-A", "OUTPUT", "-p", "tcp", "--sport", &ports])
        .args(["--tcp-flags", "RST", "RST", "-j", "DROP"])
        .status()
        .unwrap();
    assert!(
        dropped.success(),
        "drop the kernel's RSTs to the raw socket's ports"
    );
    // Listed with Istio's defaults, but without capture rules: the app's connection to SERVER
    // is predicted captured and stamped, and goes straight to SERVER, so its stamp waits.
    accel.add_pod(&ns, &CaptureConfig::default());
    let sidecar = ns
        .run(|| TcpListener::bind(("0.0.0.0", CAPTURE_PORT)))
        .unwrap()
        .unwrap();
    let server = ns
        .run(|| TcpListener::bind(SocketAddrV4::new(SERVER, 8080)))
        .unwrap()
        .unwrap();
    let tap = SynCapture::start(&ns, "lo").unwrap();
    let mut app = connect_from(
        &ns,
        SocketAddrV4::new(APP, 0),
        SocketAddrV4::new(SERVER, 8080),
    )
    .unwrap();
    let (mut server_side, _) = server.accept().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let stamped = tap.stop();
    let c = accel.counters();
    assert_eq!(
        (c.get("stamps_written"), c.pairs()),
        (1, 0),
        "the app's stamp waits: {c:?}"
    );
    let real: [u8; 8] = stamped
        .iter()
        .filter(|r| *r.src.ip() == APP)
        .find_map(|r| r.options.iter().find(|(k, _)| *k == TCP_OPT_KIND))
        .map(|(_, data)| data[2..10].try_into().unwrap())
        .expect("the app's stamp on the wire");
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_COOKIE writes a u64 into the buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            app.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);

    // Guessed (the socket cookie, the old token) from the app's own address, then copied (the
    // real one) from another address.
    sidecar.set_nonblocking(true).unwrap();
    let mut forged = Vec::new();
    let attempts = [(APP, cookie.to_ne_bytes()), (Ipv4Addr::LOCALHOST, real)];
    for (sport, (src, token)) in FORGED_PORTS.into_iter().zip(attempts) {
        forge(&ns, src, sport, token);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match sidecar.accept() {
                Ok((s, _)) => break forged.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "forged handshake not accepted");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }
    let c = accel.counters();
    assert_eq!(
        c.get("stamps_found"),
        2,
        "both forged options were read: {c:?}"
    );
    assert_eq!(c.pairs(), 0, "a forged handshake paired: {c:?}");

    // The app's bytes still go where it connected, and nowhere else.
    let data = pattern(5, 32 * 1024);
    app.write_all(&data).unwrap();
    let mut got = vec![0u8; data.len()];
    server_side.read_exact(&mut got).unwrap();
    assert_same("app -> server", &got, &data);
    assert_eq!(accel.counters().redirected_bytes(), 0);
    for mut s in forged {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a forged connection received bytes"
        );
    }
}
