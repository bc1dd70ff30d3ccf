//! Real Istio-shaped sidecar traffic through real Envoy 1.40: client app -> client Envoy
//! (virtualOutbound, tcp_proxy or HTTP connection manager) -> server Envoy (virtualInbound with
//! the original_dst, tls_inspector and http_inspector listener filters, which MSG_PEEK) -> app,
//! connected from 127.0.0.6. Every case runs twice, accelerated and with the pods unlisted
//! (programs attached, nothing touched), asserts the same observable results both times, and that
//! the counters moved only when accelerated.

mod support;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use meshlane::datapath::Counters;
use minimesh::{
    envoy::Protocol,
    grpc::{GrpcClient, GrpcServer},
    nginx::{self, Nginx},
    CaptureConfig, EchoServer, EnvoyPods,
};
use support::*;

const ECHO: u16 = 7000;
const WEB: u16 = 80;
const GRPC: u16 = 50051;
const RAW: u16 = 7100;
/// Excluded from the client pod's outbound capture (excludeOutboundPorts), declared TCP on the
/// server pod, whose sidecar still captures it inbound.
const EXCLUDED: u16 = 9000;
/// Connections held open at once in the concurrency case.
const CONCURRENT: u64 = 1000;

fn services() -> Vec<(String, u16, Protocol)> {
    vec![
        ("echo".into(), ECHO, Protocol::Tcp),
        ("raw".into(), RAW, Protocol::Tcp),
        ("excluded".into(), EXCLUDED, Protocol::Tcp),
        ("web".into(), WEB, Protocol::Http),
        ("grpc".into(), GRPC, Protocol::Http),
    ]
}

/// Builds the Envoy pods, runs `case` accelerated, then with the pods unlisted; asserts the
/// results match and that only the accelerated run moved the counters. Returns them.
fn matrix<T: PartialEq + std::fmt::Debug>(
    test: &str,
    subnet: u8,
    case: impl Fn(&EnvoyPods) -> T,
) -> Option<(T, Counters)> {
    let (fast, plain, c) = both_runs(test, subnet, case)?;
    assert_eq!(fast, plain, "{test}: accelerated and plain runs differ");
    Some((fast, c))
}

/// Like [`matrix`], but returns both runs' results for a case whose difference is documented.
fn both_runs<T>(
    test: &str,
    subnet: u8,
    case: impl Fn(&EnvoyPods) -> T,
) -> Option<(T, T, Counters)> {
    both_runs_with(test, subnet, CaptureConfig::default(), case)
}

/// Like [`both_runs`], with the client pod's istio-init configuration given.
fn both_runs_with<T>(
    test: &str,
    subnet: u8,
    client_capture: CaptureConfig,
    case: impl Fn(&EnvoyPods) -> T,
) -> Option<(T, T, Counters)> {
    both_runs_of(
        test,
        subnet,
        client_capture,
        CaptureConfig::default(),
        false,
        case,
    )
}

/// The general form: the client pod's istio-init configuration, and Istio's mTLS between the
/// sidecars or plaintext.
fn both_runs_of<T>(
    test: &str,
    subnet: u8,
    client_capture: CaptureConfig,
    server_capture: CaptureConfig,
    mtls: bool,
    case: impl Fn(&EnvoyPods) -> T,
) -> Option<(T, T, Counters)> {
    let mut accel = Accel::new(test)?;
    raise_fd_limit();
    let pods = EnvoyPods::build(subnet, &services(), client_capture, server_capture, mtls)
        .expect("Envoy pods");
    // Both pods with the sidecar hop, as the daemon lists them: every case also crosses the
    // client Envoy -> server Envoy hop through the sockhash, both ways.
    accel.add_pod_with_sidecar_hop(&pods.client.ns, &pods.client.capture, &[pods.client.ip]);
    accel.add_pod_with_sidecar_hop(&pods.server.ns, &pods.server.capture, &[pods.server.ip]);
    let fast = run_phase(test, "accelerated", &pods, &case);
    let c = accel.counters();
    assert_accelerated(test, &c);
    assert!(
        c.get("pairs_sidecar") > 0 && c.get("bytes_redirected_sidecar_client_to_server") > 0,
        "{test}: the Envoy -> Envoy hop was not redirected: {c:?}"
    );
    accel.remove_pod(&pods.client.ns);
    accel.remove_pod(&pods.server.ns);
    let plain = run_phase(test, "plain", &pods, &case);
    // The client Envoy pools its upstream connections (HTTP keep-alive, HTTP/2): one paired in
    // the accelerated run carries the plain run's requests too, as a live pair outlives its
    // pod's removal. So the sidecar hop's per-message counters may move; nothing new may be
    // stamped or paired, and the app hops (fresh connections) stay untouched.
    let pooled = |c: &Counters| {
        let mut c = c.clone();
        c.0.retain(|k, _| {
            !(k.contains("_sidecar_client_to_server")
                || k.contains("_sidecar_server_to_client")
                || matches!(
                    *k,
                    "pass_tcp_pinned" | "pass_over_budget" | "pass_peer_gone"
                ))
        });
        c
    };
    assert_eq!(
        pooled(&accel.counters()),
        pooled(&c),
        "{test}: the plain run must not touch the datapath"
    );
    Some((fast, plain, c))
}

/// Runs one phase; on failure, shows both Envoys' logs and their connection stats first.
fn run_phase<T>(test: &str, phase: &str, pods: &EnvoyPods, case: &impl Fn(&EnvoyPods) -> T) -> T {
    eprintln!("{test}: {phase} run");
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(pods))) {
        Ok(v) => v,
        Err(panic) => {
            for (side, envoy) in [
                ("client", &pods.client_envoy),
                ("server", &pods.server_envoy),
            ] {
                eprintln!("--- {side} Envoy log (tail):\n{}", envoy.log_tail());
                if let Ok(stats) = envoy.admin("/stats?filter=cx_") {
                    let moved: Vec<_> = stats.lines().filter(|l| !l.ends_with(": 0")).collect();
                    eprintln!("--- {side} Envoy connection stats:\n{}", moved.join("\n"));
                }
            }
            std::panic::resume_unwind(panic)
        }
    }
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65536), hard);
    }
}

/// Four 1 MiB echo streams, then 30 connections that write right after connect() and then
/// 5000 one-byte writes.
fn tcp_streams(pods: &EnvoyPods) {
    let dst = pods.service_addr(ECHO);
    let _echo = EchoServer::spawn(&pods.server.ns, dst).unwrap();
    for i in 0..4 {
        let data = pattern(i, 1 << 20);
        let out = echo_exchange_settled(connect(&pods.client.ns, dst).unwrap(), &data, 64 * 1024)
            .unwrap();
        assert_same(&format!("1 MiB stream {i}"), &out.bytes, &data);
    }
    for i in 0..30 {
        let s = connect(&pods.client.ns, dst).unwrap();
        let want = pattern(100 + i, 5001);
        let out = echo_exchange_settled(s, &want, 1).unwrap();
        assert_same(&format!("tiny writes {i}"), &out.bytes, &want);
    }
}

/// 300 keep-alive requests to nginx on one connection, then 64 KiB and 16 MiB bodies.
fn http_keepalive(pods: &EnvoyPods) {
    let dst = pods.service_addr(WEB);
    let _nginx = Nginx::spawn(&pods.server.ns, dst).unwrap();
    let mut conn = http_conn(&pods.client.ns, dst, "web").unwrap();
    for i in 0..300 {
        let r = conn.get("/1k").unwrap();
        assert_eq!(r.status, 200, "request {i}");
        assert_same(&format!("/1k #{i}"), &r.body, &nginx::body("1k"));
    }
    // nginx serves these with sendfile(): the server app's side of the hop uses it.
    for name in ["64k", "16m"] {
        let r = conn.get(&format!("/{name}")).unwrap();
        assert_same(name, &r.body, &nginx::body(name));
    }
}

/// 200 unary calls and two bidirectional streams; returns the calls the server saw.
fn grpc_calls(pods: &EnvoyPods) -> u64 {
    let dst = pods.service_addr(GRPC);
    let server = GrpcServer::spawn(&pods.server.ns, dst).unwrap();
    let mut client = GrpcClient::connect(&pods.client.ns, dst).unwrap();
    for i in 0..200 {
        let payload = pattern(i, 512);
        assert_eq!(client.unary(i, payload.clone()).unwrap(), payload);
    }
    client.chat(1000, 1024).unwrap();
    client.chat(20, 256 * 1024).unwrap();
    drop(client);
    server.calls()
}

#[test]
fn tcp_streams_through_envoy_are_byte_exact() {
    let Some((_, c)) = matrix("envoy_tcp_streams", 101, tcp_streams) else {
        return;
    };
    assert!(c.get("bytes_redirected_outbound_app_to_sidecar") >= 4 << 20);
}

/// The same TCP, HTTP/1.1 and gRPC cases with Istio's mutual TLS between the two sidecars (what
/// users run): the TLS records are just bytes to the sidecar hop's redirect, both ways.
#[test]
fn tcp_http_and_grpc_with_mtls_between_the_sidecars() {
    let Some((fast, plain, c)) = both_runs_of(
        "envoy_mtls",
        110,
        CaptureConfig::default(),
        CaptureConfig::default(),
        true,
        |pods| {
            assert!(pods.mtls());
            let handshakes = || {
                pods.server_envoy
                    .stat("listener.0.0.0.0_15006.ssl.handshake")
                    .unwrap()
            };
            let before = handshakes();
            tcp_streams(pods);
            http_keepalive(pods);
            let calls = grpc_calls(pods);
            // Every Envoy -> Envoy connection was TLS: the server's inbound counted a
            // handshake for each, and none went to a plaintext chain.
            let tls = handshakes() - before;
            assert!(tls >= 34, "{tls} TLS handshakes on the server's inbound");
            calls
        },
    ) else {
        return;
    };
    assert_eq!((fast, plain), (202, 202));
    for dir in ["sidecar_client_to_server", "sidecar_server_to_client"] {
        assert!(
            c.get(&format!("bytes_redirected_{dir}")) >= 4 << 20,
            "{dir}: {c:?}"
        );
    }
}

/// Both pods captured by Istio's native nftables rules (`inet istio-proxy-nat`, what
/// `values.global.nativeNftables` installs) instead of iptables: the kernel's nftables
/// REDIRECT hands the sidecar the same connections, and every hop pairs as under iptables.
#[test]
fn tcp_http_and_grpc_through_nftables_captured_pods() {
    let nft = CaptureConfig {
        native_nftables: true,
        ..CaptureConfig::default()
    };
    let Some((fast, plain, c)) =
        both_runs_of("envoy_nftables", 118, nft.clone(), nft, false, |pods| {
            for ns in [&pods.client.ns, &pods.server.ns] {
                let listed = ns.cmd("nft").args(["list", "tables"]).output().unwrap();
                assert!(
                    String::from_utf8_lossy(&listed.stdout).contains("inet istio-proxy-nat"),
                    "{} has no nftables capture",
                    ns.name()
                );
            }
            tcp_streams(pods);
            http_keepalive(pods);
            grpc_calls(pods)
        })
    else {
        return;
    };
    assert_eq!((fast, plain), (202, 202));
    // Every direction the default (reader rule) mode redirects: into the sidecars only.
    for dir in [
        "outbound_app_to_sidecar",
        "inbound_app_to_sidecar",
        "sidecar_client_to_server",
        "sidecar_server_to_client",
    ] {
        assert!(
            c.get(&format!("bytes_redirected_{dir}")) > 0,
            "{dir}: {c:?}"
        );
    }
    assert!(
        c.get("bytes_redirected_outbound_app_to_sidecar") >= 4 << 20,
        "{c:?}"
    );
}

#[test]
fn http_keepalive_and_16_mib_bodies_through_envoy_to_nginx() {
    let Some((_, c)) = matrix("envoy_http", 102, http_keepalive) else {
        return;
    };
    // nginx's sendfile() bytes were redirected: all 16 MiB, or (when Envoy's flow control let
    // more than the unread budget pile up) at least the budget's worth before the rest took TCP.
    let redirected = c.get("bytes_redirected_inbound_app_to_sidecar");
    let want = if c.get("pass_over_budget") == 0 {
        16 << 20
    } else {
        meshlane_common::UNREAD_BUDGET as u64
    };
    assert!(redirected >= want, "{c:?}");
}

#[test]
fn grpc_unary_and_bidi_streaming_through_envoy() {
    let Some((calls, _)) = matrix("envoy_grpc", 103, grpc_calls) else {
        return;
    };
    assert_eq!(calls, 202);
}

#[test]
fn a_thousand_concurrent_connections_through_envoy() {
    let Some((_, c)) = matrix("envoy_thousand", 104, |pods| {
        let dst = pods.service_addr(ECHO);
        let _echo = EchoServer::spawn(&pods.server.ns, dst).unwrap();
        // Each connection sends right after connect() and stays open: CONCURRENT connections
        // are established at once, each with its echo in flight, before any is read.
        let conns: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let mut s = connect(&pods.client.ns, dst).unwrap();
                s.write_all(&pattern(i, 2048)).unwrap();
                (i, s)
            })
            .collect();
        par_each(conns, 16, |(i, mut s)| {
            let mut got = vec![0u8; 2048];
            s.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("stream {i}: {e}"));
            assert_same(&format!("stream {i}"), &got, &pattern(i, 2048));
            s.shutdown(Shutdown::Write).unwrap();
            let rest = read_to_end(&s).unwrap();
            assert!(rest.bytes.is_empty(), "stream {i}: extra bytes");
        });
    }) else {
        return;
    };
    // tcp_proxy opens one upstream per downstream: each Envoy -> Envoy connection was paired
    // exactly once, like each app hop.
    for hop in ["outbound", "inbound", "sidecar"] {
        assert_eq!(c.get(&format!("pairs_{hop}")), CONCURRENT, "{hop}: {c:?}");
    }
}

/// An edge-triggered epoll reader drains every readiness event to EAGAIN; a lost wake-up stalls it.
fn epoll_et_read(s: &TcpStream, want: usize) -> Vec<u8> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    s.set_nonblocking(true).unwrap();
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
    ep.add(
        s,
        EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLET | EpollFlags::EPOLLRDHUP,
            1,
        ),
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = [EpollEvent::empty(); 4];
    while got.len() < want {
        let n = ep
            .wait(
                &mut events,
                EpollTimeout::try_from(Duration::from_secs(10)).unwrap(),
            )
            .unwrap();
        assert!(
            n > 0,
            "edge-triggered reader stalled at {} of {want} bytes (missed wake-up)",
            got.len()
        );
        loop {
            match (&*s).read(&mut buf) {
                Ok(0) => return got,
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
    }
    got
}

#[test]
fn epoll_edge_triggered_fionread_and_msg_peek_through_envoy() {
    if !minimesh::privileged_or_skip("envoy_epoll_fionread_peek") {
        return;
    }
    // FIONREAD on an app socket in the sockhash is a kernel matter (docs/DESIGN.md): the probe
    // measures it, and this run through real Envoy must agree with the probe.
    let report = meshlane::probe::run(None);
    let fionread_differs = report
        .mode(meshlane::mode::Mode::Reader)
        .is_some_and(|m| m.difference_names().iter().any(|n| n == "fionread_tcp"));
    let Some(((avail, peeked), (plain_avail, plain_peeked), _)) =
        both_runs("envoy_epoll_fionread_peek", 105, |pods| {
            let dst = pods.service_addr(ECHO);
            let _echo = EchoServer::spawn(&pods.server.ns, dst).unwrap();

            let s = connect(&pods.client.ns, dst).unwrap();
            let data = pattern(1, 2 << 20);
            let got = std::thread::scope(|sc| {
                sc.spawn(|| {
                    let mut w = s.try_clone().unwrap();
                    w.set_nonblocking(false).unwrap();
                    w.write_all(&data).unwrap();
                });
                epoll_et_read(&s, data.len())
            });
            assert_same("edge-triggered reader", &got, &data);

            // FIONREAD and MSG_PEEK on the app's socket, with 1000 echoed bytes waiting.
            let mut s = connect(&pods.client.ns, dst).unwrap();
            s.write_all(&pattern(2, 1000)).unwrap();
            let mut waited = 0;
            let mut avail: libc::c_int = 0;
            while waited < 200 {
                // SAFETY: FIONREAD writes one int.
                #[allow(unsafe_code)]
                let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut avail) };
                assert_eq!(r, 0);
                if avail >= 1000 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
                waited += 1;
            }
            let mut peek = [0u8; 1000];
            let n = nix::sys::socket::recv(
                s.as_raw_fd(),
                &mut peek,
                nix::sys::socket::MsgFlags::MSG_PEEK,
            )
            .unwrap();
            let mut read = vec![0u8; 1000];
            s.read_exact(&mut read).unwrap();
            assert_same("MSG_PEEK then read", &read, &pattern(2, 1000));
            assert_same("peeked bytes", &peek[..n], &read[..n]);
            (avail, n > 0)
        })
    else {
        return;
    };
    assert!(peeked && plain_peeked);
    assert_eq!(plain_avail, 1000);
    if fionread_differs {
        assert_eq!(
            avail, 0,
            "the probe found FIONREAD blind to TCP bytes on this kernel's sockhash sockets"
        );
    } else {
        assert_eq!(avail, plain_avail, "FIONREAD as on plain TCP");
    }
}

/// What the server app saw when the client went away mid-stream.
#[derive(Debug, PartialEq)]
enum Seen {
    Eof(usize),
    Reset(usize),
}

/// A one-connection server app on RAW; `got_all` fires once `expect` bytes have arrived.
fn serve_raw(
    pods: &EnvoyPods,
    expect: usize,
    got_all: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<Seen> {
    let l = pods
        .server
        .ns
        .run(|| TcpListener::bind(pods.service_addr(RAW)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        // Never hang the suite: a connection that does not arrive within 20 s is a failure.
        l.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the connection never reached the server app"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut n = 0;
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Seen::Eof(n),
                Ok(k) => {
                    n += k;
                    if n == expect {
                        let _ = got_all.send(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Seen::Reset(n),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => panic!("server read: {e}"),
            }
        }
    })
}

#[test]
fn half_close_and_reset_through_envoy() {
    let Some(_) = matrix("envoy_close_semantics", 106, |pods| {
        let dst = pods.service_addr(ECHO);
        let _echo = EchoServer::spawn(&pods.server.ns, dst).unwrap();
        // Half-close by the client: the reply still arrives whole.
        let data = pattern(3, 256 * 1024);
        let out =
            echo_exchange_settled(connect(&pods.client.ns, dst).unwrap(), &data, 8192).unwrap();
        assert_same("client half-close", &out.bytes, &data);

        // The client resets (SO_LINGER 0) after 64 KiB: what the server app sees must not change.
        let (tx, rx) = std::sync::mpsc::channel();
        let server = serve_raw(pods, 64 * 1024, tx);
        let mut s = connect(&pods.client.ns, pods.service_addr(RAW)).unwrap();
        s.write_all(&pattern(4, 64 * 1024)).unwrap();
        // Reset only once the server app has everything, so the outcome does not race the
        // sidecars' forwarding.
        rx.recv_timeout(Duration::from_secs(20))
            .expect("64 KiB reached the server app");
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &l).unwrap();
        drop(s);
        server.join().unwrap()
    }) else {
        return;
    };
}

#[test]
fn slow_reader_and_sendfile_through_envoy() {
    let Some(_) = matrix("envoy_slow_reader_sendfile", 107, |pods| {
        let dst = pods.service_addr(ECHO);
        let _echo = EchoServer::spawn(&pods.server.ns, dst).unwrap();
        // The client sends 8 MiB with sendfile() and reads the echo slowly: the writer must be
        // held back or buffered, never lose or reorder bytes.
        let data = pattern(6, 8 << 20);
        let path = std::env::temp_dir().join(format!("meshlane-sendfile-{}", std::process::id()));
        std::fs::write(&path, &data).unwrap();
        let s = connect(&pods.client.ns, dst).unwrap();
        let got = std::thread::scope(|sc| {
            sc.spawn(|| {
                let f = std::fs::File::open(&path).unwrap();
                let mut off: libc::off_t = 0;
                while (off as usize) < data.len() {
                    let left = data.len() - off as usize;
                    let n = nix::sys::sendfile::sendfile(&s, &f, Some(&mut off), left).unwrap();
                    assert!(n > 0);
                }
                s.shutdown(Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match (&s).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock
                            || e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("slow read: {e}"),
                }
            }
            got
        });
        let _ = std::fs::remove_file(&path);
        assert_same("sendfile + slow reader", &got, &data);
    }) else {
        return;
    };
}

/// The server app closes while bytes Envoy handed it are still unread. In the two-way opt-in
/// those bytes would wait in the app socket's psock queue, which close() does not count as
/// unread, so the app would send FIN where plain TCP sends RST (the socket-API suite, appview.rs,
/// lists it). Under the reader rule nothing is redirected into the app: its unread bytes are
/// ordinary TCP bytes, the close resets as on plain TCP, and Envoy passes the reset on.
#[test]
fn server_closing_with_unread_data_through_envoy() {
    let Some((fast, plain, _)) = both_runs("envoy_unread_close", 108, |pods| {
        let addr = pods.service_addr(RAW);
        let l = pods
            .server
            .ns
            .run(|| TcpListener::bind(addr))
            .unwrap()
            .unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            // Let the client's bytes arrive, read none of them, close.
            std::thread::sleep(Duration::from_millis(300));
            drop(s);
        });
        let mut s = connect(&pods.client.ns, addr).unwrap();
        s.write_all(&pattern(5, 64 * 1024)).unwrap();
        server.join().unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break "eof",
                Ok(_) => break "data",
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break "reset",
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => panic!("client read: {e}"),
            }
        }
    }) else {
        return;
    };
    assert_eq!(
        plain, "reset",
        "plain TCP: the unread close resets, and Envoy passes the reset on"
    );
    assert_eq!(
        fast, "reset",
        "accelerated (reader rule): the unread close resets as on plain TCP"
    );
}

#[test]
fn excluded_ports_and_the_sidecars_own_upstreams_are_never_touched() {
    const N: u64 = 20;
    let client_capture = CaptureConfig {
        exclude_outbound_ports: vec![EXCLUDED],
        ..CaptureConfig::default()
    };
    let Some((fast, plain, c)) = both_runs_with("envoy_exclusions", 109, client_capture, |pods| {
        let passed = |port: u16| {
            pods.client_envoy
                .stat(&format!("listener.0.0.0.0_{port}.downstream_cx_total"))
                .unwrap()
        };
        let before = [passed(EXCLUDED), passed(ECHO)];
        let _excluded = EchoServer::spawn(&pods.server.ns, pods.service_addr(EXCLUDED)).unwrap();
        let _echo = EchoServer::spawn(&pods.server.ns, pods.service_addr(ECHO)).unwrap();
        let mut out = Vec::new();
        // Request, whole reply, then close: the server Envoy's listener filters have decided
        // before any FIN arrives (see the README on the listener-filter drop).
        for port in [EXCLUDED, ECHO] {
            for i in 0..N {
                let s = connect(&pods.client.ns, pods.service_addr(port)).unwrap();
                let data = pattern(i, 32 * 1024);
                let got = request_reply(&s, &data);
                assert_same(&format!("port {port} stream {i}"), &got, &data);
                out.push(got.len());
            }
        }
        // The excluded port went straight to the server pod, bypassing the client's sidecar.
        let after = [passed(EXCLUDED), passed(ECHO)];
        assert_eq!(
            [after[0] - before[0], after[1] - before[1]],
            [0, N],
            "only the captured port passed the client sidecar"
        );
        out
    }) else {
        return;
    };
    assert_eq!(fast, plain);
    eprintln!("counters: {c:?}");
    // Client pod: the N excluded connects were predicted uncaptured and never stamped; only the
    // N captured ones were stamped and paired. The sidecar's own 2N upstream connects (uid 1337)
    // were never stamped for the outbound hop; the N it made for the captured port went to the
    // server pod, which captures that port, so they were stamped for the sidecar hop. The
    // excluded port's N went from the app to the server pod directly: no sidecar there.
    // (Plus the test's own four admin-API reads on 127.0.0.1:15000 in the client pod: loopback,
    // which istio-init never captures either.)
    assert_eq!(c.get("connect_not_captured"), N + 4, "{c:?}");
    assert_eq!(c.get("stamps_written"), 2 * N, "{c:?}");
    assert_eq!(c.get("pairs_outbound"), N, "{c:?}");
    assert_eq!(c.get("pairs_sidecar"), N, "{c:?}");
    // Server pod: its sidecar captures both ports inbound, so both hops to the app are paired.
    assert_eq!(c.get("pairs_inbound"), 2 * N, "{c:?}");
    assert_eq!(c.get("pair_rejected"), 0, "{c:?}");
}

/// Writes `data`, reads exactly as many bytes back, then closes.
fn request_reply(s: &TcpStream, data: &[u8]) -> Vec<u8> {
    let mut got = vec![0; data.len()];
    std::thread::scope(|sc| {
        sc.spawn(|| (&*s).write_all(data).unwrap());
        (&*s).read_exact(&mut got).unwrap();
    });
    got
}

/// The sidecar hop's option never leaves the node: with the server pod not in the node's pod
/// map (what a pod on another node looks like), the client Envoy's upstream connections to it
/// carry no option on any segment its veth sees, and pair nothing; with the server pod listed,
/// the same traffic is stamped and paired (so the capture would see a stamp if one were sent).
#[test]
fn a_server_pod_not_on_this_node_is_never_stamped() {
    const N: u64 = 8;
    let Some(mut accel) = Accel::new("envoy_remote_peer") else {
        return;
    };
    raise_fd_limit();
    let pods = EnvoyPods::new(111, &services()).expect("Envoy pods");
    let _echo = EchoServer::spawn(&pods.server.ns, pods.service_addr(ECHO)).unwrap();
    accel.add_pod_with_sidecar_hop(&pods.client.ns, &pods.client.capture, &[pods.client.ip]);
    // Listed for its own hops, but its address is not in the node's map.
    accel.add_pod(&pods.server.ns, &pods.server.capture);
    let run = |what: &str| -> Vec<minimesh::SynRecord> {
        let tap = minimesh::SynCapture::start(&pods.client.ns, "eth0").unwrap();
        for i in 0..N {
            let s = connect(&pods.client.ns, pods.service_addr(ECHO)).unwrap();
            let data = pattern(i, 64 * 1024);
            assert_same(
                &format!("{what} stream {i}"),
                &request_reply(&s, &data),
                &data,
            );
        }
        std::thread::sleep(Duration::from_millis(200));
        tap.stop()
    };
    let stamped = |seen: &[minimesh::SynRecord]| {
        seen.iter()
            .filter(|r| r.has_option(meshlane_common::TCP_OPT_KIND))
            .count()
    };

    let seen = run("remote");
    let c = accel.counters();
    assert_eq!(stamped(&seen), 0, "a stamp left the node: {seen:?}");
    assert_eq!(c.get("pairs_sidecar"), 0, "{c:?}");
    assert_eq!(c.get("stamps_written"), N, "only the outbound hop: {c:?}");
    assert!(
        seen.iter().filter(|r| r.syn).count() as u64 >= N,
        "the capture saw the sidecar's connections: {seen:?}"
    );

    accel.add_pod_with_sidecar_hop(&pods.server.ns, &pods.server.capture, &[pods.server.ip]);
    let seen = run("local");
    let c = accel.counters();
    assert_eq!(
        stamped(&seen) as u64,
        N,
        "one stamp per sidecar connection: {seen:?}"
    );
    assert_eq!(c.get("pairs_sidecar"), N, "{c:?}");
}

/// Through real Envoy: a Go-style server on `[::]` (IPV6_V6ONLY off) behind the server sidecar,
/// and Java-style clients on AF_INET6 sockets to the v4-mapped service address. All three hops
/// pair once per connection and every byte arrives, accelerated and plain alike.
#[test]
fn dual_stack_apps_through_envoy() {
    const N: u64 = 10;
    let Some((peers, c)) = matrix("envoy_dual_stack", 112, |pods| {
        let listener = pods
            .server
            .ns
            .run(|| TcpListener::bind(("::", ECHO)))
            .unwrap()
            .expect("a [::] listener (Go's default)");
        let server = std::thread::spawn(move || {
            (0..N)
                .map(|_| {
                    let (s, peer) = listener.accept().unwrap();
                    let mut got = vec![0; 64 * 1024];
                    (&s).read_exact(&mut got).unwrap();
                    (&s).write_all(&got).unwrap();
                    peer.is_ipv6()
                })
                .collect::<Vec<_>>()
        });
        let dst = std::net::SocketAddrV6::new(pods.server.ip.to_ipv6_mapped(), ECHO, 0, 0);
        for i in 0..N {
            let s = pods
                .client
                .ns
                .run(|| TcpStream::connect(dst))
                .unwrap()
                .expect("connect from an AF_INET6 socket");
            let data = pattern(i, 64 * 1024);
            let got = request_reply(&s, &data);
            assert_same(&format!("dual-stack stream {i}"), &got, &data);
        }
        server.join().unwrap()
    }) else {
        return;
    };
    assert!(
        peers.iter().all(|v6| *v6),
        "the app accepted on AF_INET6 sockets"
    );
    for hop in ["outbound", "inbound", "sidecar"] {
        assert_eq!(c.get(&format!("pairs_{hop}")), N, "{hop}: {c:?}");
    }
}

/// True IPv6 through real Envoy with Istio's mTLS, in dual-stack pods (ip6tables capture, `::6`,
/// each sidecar listening on both families, the Service's endpoints IPv6): a Java-style AF_INET6
/// client to the server pod's IPv6 address and a Go-style `[::]` server are paired on all three
/// hops, once per connection, and every byte arrives; so are the same apps when the client
/// dials the server's IPv4 address (v4-mapped; the sidecar and inbound hops are IPv6 then).
#[test]
fn true_ipv6_through_envoy_in_dual_stack_pods() {
    const N: u64 = 10;
    const SIZE: usize = 64 * 1024;
    let Some(mut accel) = Accel::new("envoy_ipv6") else {
        return;
    };
    raise_fd_limit();
    let pods =
        EnvoyPods::dual_stack(114, &services(), true, &[ECHO]).expect("dual-stack Envoy pods");
    for pod in [&pods.client, &pods.server] {
        let mut model = pod_model(&pod.ns, &pod.capture);
        model.capture_ipv6 = true;
        let ips: [std::net::IpAddr; 2] = [pod.ip.into(), pod.ip6.expect("dual stack").into()];
        accel.add_model_pod_with_sidecar_hop(&model, &ips);
    }
    let listener = pods
        .server
        .ns
        .run(|| TcpListener::bind(("::", ECHO)))
        .unwrap()
        .expect("a [::] listener (Go's default)");
    let server = std::thread::spawn(move || {
        (0..2 * N)
            .map(|_| {
                let (s, peer) = listener.accept().unwrap();
                let mut got = vec![0; SIZE];
                (&s).read_exact(&mut got).unwrap();
                (&s).write_all(&got).unwrap();
                peer.ip()
            })
            .collect::<Vec<_>>()
    });
    let v6 = std::net::SocketAddrV6::new(pods.server.ip6.expect("dual stack"), ECHO, 0, 0);
    let mapped = std::net::SocketAddrV6::new(pods.server.ip.to_ipv6_mapped(), ECHO, 0, 0);
    for (round, dst) in [v6, mapped].into_iter().enumerate() {
        for i in 0..N {
            let s = pods
                .client
                .ns
                .run(|| TcpStream::connect(dst))
                .unwrap()
                .expect("connect from an AF_INET6 socket");
            let data = pattern(i, SIZE);
            let got = request_reply(&s, &data);
            assert_same(&format!("stream {i} to {dst}"), &got, &data);
        }
        let c = accel.counters();
        eprintln!("after {dst}: {c:?}");
        for hop in ["outbound", "inbound", "sidecar"] {
            assert_eq!(
                c.get(&format!("pairs_{hop}")),
                N * (round as u64 + 1),
                "{hop} after {dst}: {c:?}"
            );
        }
    }
    // The Service's endpoints are IPv6: Envoy -> Envoy and Envoy -> app are IPv6 whichever
    // family the client app used, so every inbound hop came from the sidecar's ::6.
    let peers = server.join().unwrap();
    let bind6: std::net::IpAddr = "::6".parse().unwrap();
    assert!(peers.iter().all(|p| *p == bind6), "{peers:?}");
    let c = accel.counters();
    assert_eq!(c.get("pair_rejected"), 0, "{c:?}");
    assert_eq!(c.get("pass_no_peer"), 0, "{c:?}");
}

/// The daemon as a user starts it (`--mode auto`, local discovery), through real Envoy with
/// Istio's mTLS between the sidecars. Where apps could tell the reader rule from plain TCP (every
/// kernel measured so far) auto takes the sidecar mode: the Envoy -> Envoy hop is paired once per
/// connection and redirected both ways, and no app socket is touched (no app-hop pair, stamp or
/// redirected byte); every byte arrives.
#[test]
fn the_default_mode_redirects_the_sidecar_hop_and_leaves_apps_alone() {
    const N: u64 = 8;
    const SIZE: usize = ECHO_STREAM_BYTES;
    let Some(accel) = Accel::cgroup_only("envoy_default_mode") else {
        return;
    };
    raise_fd_limit();
    let pods = EnvoyPods::build(
        113,
        &services(),
        CaptureConfig::default(),
        CaptureConfig::default(),
        true,
    )
    .expect("Envoy pods");
    let dst = pods.service_addr(ECHO);
    let _echo = EchoServer::spawn(&pods.server.ns, dst).expect("echo server");
    let mut daemon = Daemon(
        accel
            .daemon_command_auto()
            .args(["--resync", "200ms"])
            .spawn()
            .expect("start meshlane run"),
    );
    accel.wait_ready();
    // Other tests' sidecars may be on this node too: look only at this test's namespaces.
    let cookies = [
        pods.client.ns.cookie().unwrap(),
        pods.server.ns.cookie().unwrap(),
    ];
    let ours = |st: &serde_json::Value| status_pods(st, &cookies);
    let st = status_json(&accel);
    let mode = st["mode"].as_str().unwrap().to_string();
    if mode == "off" {
        // The probe's sidecar hop check failed on this kernel: nothing may be attached.
        assert_eq!(st["state"], "pass-through", "{st:#}");
        assert!(!accel.pin_dir.exists(), "{st:#}");
        eprintln!("envoy_default_mode: auto is off on this kernel: {st:#}");
        return;
    }
    wait_until("both Envoy pods discovered and accelerated", || {
        ours(&try_status_json(&accel).unwrap_or_default())
            .iter()
            .filter(|p| p["state"] == "accelerated" && p["mode"] == mode.as_str())
            .count()
            == 2
    });
    echo_streams(&pods.client.ns, dst, N);
    let c = accel.counters();
    // tcp_proxy opens one upstream per downstream connection.
    assert_eq!(c.get("pairs_sidecar"), N, "{c:?}");
    for dir in ["sidecar_client_to_server", "sidecar_server_to_client"] {
        assert!(
            c.get(&format!("bytes_redirected_{dir}")) >= N * SIZE as u64,
            "{dir}: {c:?}"
        );
    }
    if mode == "sidecar" {
        for k in [
            "pairs_outbound",
            "pairs_inbound",
            "bytes_redirected_outbound_app_to_sidecar",
            "bytes_redirected_inbound_app_to_sidecar",
            "bytes_redirected_outbound_sidecar_to_app",
            "bytes_redirected_inbound_sidecar_to_app",
        ] {
            assert_eq!(c.get(k), 0, "{k}: an app socket was touched: {c:?}");
        }
        // Only the sidecars' connections were stamped.
        assert_eq!(c.get("stamps_written"), N, "{c:?}");
    } else {
        assert_eq!(mode, "reader", "{st:#}");
        assert!(c.get("pairs_outbound") >= N, "{c:?}");
    }
    assert!(daemon.terminate().success());
}
