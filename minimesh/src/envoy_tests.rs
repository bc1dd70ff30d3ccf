//! Privileged tests of the Envoy sidecar and the nginx app: real Envoy 1.40 and nginx processes
//! in real pods with istio-init's rules. Each skips (or fails on CI) without root.

use super::*;
use crate::nginx::{self, Nginx};
use crate::EchoServer;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn connect_in(ns: &Netns, dst: SocketAddrV4) -> Result<TcpStream> {
    let s = ns
        .run(|| TcpStream::connect_timeout(&SocketAddr::V4(dst), IO_TIMEOUT))?
        .with_context(|| format!("connecting to {dst} from {}", ns.name()))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Keep-alive HTTP to nginx through the sidecars, from inside `ns`.
fn http_in(ns: &Netns, dst: SocketAddrV4, host: &str) -> Result<httpc::Conn> {
    Ok(httpc::Client::new(IO_TIMEOUT).keep_alive(connect_in(ns, dst)?, host)?)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

fn services(list: &[(&str, u16, Protocol)]) -> Vec<(String, u16, Protocol)> {
    list.iter()
        .map(|(n, p, k)| (n.to_string(), *p, *k))
        .collect()
}

#[test]
fn bootstraps_validate() -> Result<()> {
    if !crate::privileged_or_skip("bootstraps_validate") {
        return Ok(());
    }
    let ep = |last: u8, port: u16| SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, last), port).into();
    let configs = [
        EnvoyConfig::default(),
        EnvoyConfig {
            concurrency: 2,
            outbound: vec![
                OutboundService {
                    name: "echo".into(),
                    port: 9000,
                    endpoints: vec![ep(2, 9000)],
                    protocol: Protocol::Tcp,
                },
                OutboundService {
                    name: "web.default.svc.cluster.local".into(),
                    port: 80,
                    endpoints: vec![ep(2, 80), ep(3, 8080)],
                    protocol: Protocol::Http,
                },
                OutboundService {
                    name: "grpc".into(),
                    port: 50051,
                    endpoints: vec![ep(4, 50051)],
                    protocol: Protocol::Http,
                },
            ],
            inbound_http_ports: vec![80, 50051],
            inbound_tcp_ports: vec![9000],
            ..EnvoyConfig::default()
        },
        // A dual-stack pod's sidecar: listeners on [::] too, ::6 for IPv6 inbound.
        EnvoyConfig {
            dual_stack: true,
            outbound: vec![OutboundService {
                name: "echo6".into(),
                port: 9000,
                endpoints: vec!["[fd00:9::2]:9000".parse().unwrap()],
                protocol: Protocol::Tcp,
            }],
            inbound_tcp_ports: vec![9000],
            ..EnvoyConfig::default()
        },
    ];
    let dir = TempDir::new("envoy-validate")?;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = configs
            .iter()
            .enumerate()
            .map(|(i, cfg)| {
                let dir = &dir;
                s.spawn(move || -> Result<()> {
                    cfg.check()?;
                    let yaml = cfg
                        .bootstrap_yaml("sidecar~10.9.0.1~test.default~default.svc.cluster.local");
                    let path = dir.write(&format!("envoy-{i}.yaml"), yaml.as_bytes())?;
                    validate_bootstrap(&path).with_context(|| format!("bootstrap:\n{yaml}"))
                })
            })
            .collect();
        for h in handles {
            h.join().expect("validation thread panicked")?;
        }
        Ok(())
    })?;

    // The shape istiod gives a sidecar, spot-checked on the JSON value.
    let b = configs[1].bootstrap("n");
    let listeners = b["static_resources"]["listeners"].as_array().unwrap();
    let names: Vec<&str> = listeners
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "virtualOutbound",
            "0.0.0.0_9000",
            "0.0.0.0_80",
            "0.0.0.0_50051",
            "virtualInbound"
        ]
    );
    assert_eq!(listeners[0]["use_original_dst"], true);
    assert!(listeners[1..4].iter().all(|l| l["bind_to_port"] == false));
    let inbound = &listeners[4];
    let filters: Vec<&str> = inbound["listener_filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        filters,
        [
            "envoy.filters.listener.original_dst",
            "envoy.filters.listener.tls_inspector",
            "envoy.filters.listener.http_inspector"
        ]
    );
    let clusters = b["static_resources"]["clusters"].as_array().unwrap();
    let inbound_passthrough = clusters
        .iter()
        .find(|c| c["name"] == "InboundPassthroughClusterIpv4")
        .unwrap();
    assert_eq!(inbound_passthrough["type"], "ORIGINAL_DST");
    assert_eq!(
        inbound_passthrough["upstream_bind_config"]["source_address"]["address"],
        "127.0.0.6"
    );
    assert!(clusters
        .iter()
        .any(|c| c["name"] == "outbound|80||web.default.svc.cluster.local"));
    assert!(clusters.iter().any(|c| c["name"] == "inbound|50051||"));
    assert!(clusters.iter().any(|c| c["name"] == "inbound|9000||"));

    // Bad configurations are refused before Envoy sees them.
    let mut dup = configs[1].clone();
    dup.outbound[1].port = 9000;
    assert!(dup.check().is_err());
    let clash = EnvoyConfig {
        admin_port: 15001,
        ..EnvoyConfig::default()
    };
    assert!(clash.check().is_err());
    let twice = EnvoyConfig {
        inbound_http_ports: vec![80],
        inbound_tcp_ports: vec![80],
        ..EnvoyConfig::default()
    };
    assert!(twice.check().is_err());
    Ok(())
}

/// A one-connection app that reports the peer and local address it saw, then echoes.
type PeerReport = mpsc::Receiver<(SocketAddr, SocketAddr)>;

fn peer_reporting_app(ns: &Netns, port: u16) -> Result<(PeerReport, std::thread::JoinHandle<()>)> {
    let listener = ns
        .run(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))?
        .context("binding the peer-reporting app")?;
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        if let Ok((mut s, peer)) = listener.accept() {
            let local = s.local_addr().expect("local_addr");
            let _ = tx.send((peer, local));
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = s.read(&mut buf) {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    Ok((rx, thread))
}

/// Sends `data` from the client pod to the service on `port`, half-closes, and returns what
/// came back through both Envoys.
fn echo_through(pods: &EnvoyPods, port: u16, data: &[u8]) -> Result<Vec<u8>> {
    let mut stream = connect_in(&pods.client.ns, pods.service_addr(port))?;
    let mut writer = stream.try_clone()?;
    std::thread::scope(|s| -> Result<Vec<u8>> {
        let w = s.spawn(|| -> std::io::Result<()> {
            writer.write_all(data)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut got = Vec::new();
        stream.read_to_end(&mut got).context("reading the echo")?;
        w.join().expect("writer panicked").context("writing")?;
        Ok(got)
    })
}

#[test]
fn tcp_through_both_envoys() -> Result<()> {
    if !crate::privileged_or_skip("tcp_through_both_envoys") {
        return Ok(());
    }
    let pods = EnvoyPods::new(
        81,
        &services(&[("echo", 9000, Protocol::Tcp), ("peer", 9001, Protocol::Tcp)]),
    )?;
    let echo = EchoServer::spawn(
        &pods.server.ns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9000),
    )?;
    let (peer_rx, peer_thread) = peer_reporting_app(&pods.server.ns, 9001)?;

    // Bytes and the half-close travel app -> 15001 -> Envoy -> veth -> 15006 -> Envoy -> app.
    let data = payload(1 << 20);
    let echoed = echo_through(&pods, 9000, &data)?;
    assert_eq!(echoed.len(), data.len(), "echoed length");
    assert!(echoed == data, "echoed bytes differ");
    assert_eq!(echo.accepted(), 1);

    // The app sees Envoy's inbound connection from 127.0.0.6, to the original destination. Five
    // bytes without a newline: on a port declared TCP nothing waits for protocol sniffing.
    let mut probe = connect_in(&pods.client.ns, pods.service_addr(9001))?;
    probe.write_all(b"hello")?;
    let mut back = [0u8; 5];
    probe.read_exact(&mut back)?;
    assert_eq!(&back, b"hello");
    let (peer, local) = peer_rx.recv_timeout(IO_TIMEOUT)?;
    assert_eq!(peer.ip(), IpAddr::V4(INBOUND_PASSTHROUGH_SRC), "app's peer");
    assert_eq!(
        local,
        SocketAddr::V4(pods.service_addr(9001)),
        "app's local address"
    );
    drop(probe);
    peer_thread.join().expect("peer app panicked");

    // virtualOutbound handed both connections to the per-port listeners; the server side took
    // them on virtualInbound and passed them through.
    let c = &pods.client_envoy;
    assert_eq!(c.stat("listener.0.0.0.0_9000.downstream_cx_total")?, 1);
    assert_eq!(c.stat("listener.0.0.0.0_9001.downstream_cx_total")?, 1);
    assert_eq!(c.stat("cluster.outbound|9000||echo.upstream_cx_total")?, 1);
    assert_eq!(c.stat("cluster.PassthroughCluster.upstream_cx_total")?, 0);
    // A handed-over connection counts on the target listener only, not on virtualOutbound.
    assert_eq!(c.stat("listener.0.0.0.0_15001.downstream_cx_total")?, 0);
    let s = &pods.server_envoy;
    assert_eq!(s.stat("listener.0.0.0.0_15006.downstream_cx_total")?, 2);
    assert_eq!(s.stat("cluster.inbound|9000||.upstream_cx_total")?, 1);
    assert_eq!(s.stat("cluster.inbound|9001||.upstream_cx_total")?, 1);
    assert_eq!(
        s.stat("cluster.inbound|9000||.upstream_cx_tx_bytes_total")?,
        data.len() as u64
    );
    assert_eq!(
        s.stat("cluster.InboundPassthroughClusterIpv4.upstream_cx_total")?,
        0
    );
    Ok(())
}

#[test]
fn http_keepalive_through_both_envoys_to_nginx() -> Result<()> {
    if !crate::privileged_or_skip("http_keepalive_through_both_envoys_to_nginx") {
        return Ok(());
    }
    let pods = EnvoyPods::new(82, &services(&[("web", 80, Protocol::Http)]))?;
    let _nginx = Nginx::spawn(
        &pods.server.ns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80),
    )?;
    let addr = pods.service_addr(80);
    let mut conn = http_in(&pods.client.ns, addr, &addr.to_string())?;
    let small = nginx::body("1k");
    for i in 0..200 {
        let r = conn.get("/1k").with_context(|| format!("request {i}"))?;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert!(r.body == small, "request {i}: body differs");
    }
    for name in ["/64k", "/16m"] {
        let r = conn.get(name)?;
        assert_eq!(r.status, 200, "{name}");
        assert!(r.body == nginx::body(name), "{name}: body differs");
    }
    drop(conn);

    // One downstream connection carried all requests on each side; the server Envoy matched
    // its HTTP chain for port 80 (http_inspector saw HTTP/1.1) and connected from 127.0.0.6.
    let c = &pods.client_envoy;
    assert_eq!(c.stat("listener.0.0.0.0_80.downstream_cx_total")?, 1);
    assert_eq!(c.stat("http.outbound_0.0.0.0_80.downstream_rq_total")?, 202);
    assert_eq!(c.stat("cluster.outbound|80||web.upstream_rq_200")?, 202);
    let s = &pods.server_envoy;
    assert_eq!(s.stat("listener.0.0.0.0_15006.downstream_cx_total")?, 1);
    assert_eq!(s.stat("http.inbound_0.0.0.0_80.downstream_rq_total")?, 202);
    assert_eq!(s.stat("cluster.inbound|80||.upstream_rq_200")?, 202);
    assert_eq!(s.stat("cluster.inbound|80||.upstream_cx_total")?, 1);
    Ok(())
}

fn alive(pid: u32) -> bool {
    // A reaped child is gone from /proc; a zombie would still be there.
    Path::new(&format!("/proc/{pid}")).exists()
}

fn netns_list() -> Result<String> {
    crate::exec::run(crate::exec::command("ip").args(["netns", "list"]))
}

#[test]
fn drop_leaves_nothing() -> Result<()> {
    if !crate::privileged_or_skip("drop_leaves_nothing") {
        return Ok(());
    }
    let pods = EnvoyPods::new(83, &services(&[("web", 80, Protocol::Http)]))?;
    let nginx = Nginx::spawn(
        &pods.server.ns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80),
    )?;
    // Traffic first, so open connections are part of what goes away.
    let mut conn = http_in(&pods.client.ns, pods.service_addr(80), "web")?;
    let r = conn.get("/1k")?;
    assert_eq!(r.status, 200);

    let pids = [
        pods.client_envoy.pid(),
        pods.server_envoy.pid(),
        nginx.pid(),
    ];
    let dirs = [
        pods.client_envoy.dir().to_path_buf(),
        pods.server_envoy.dir().to_path_buf(),
        nginx.dir().to_path_buf(),
    ];
    let names = [
        pods.client.ns.name().to_owned(),
        pods.server.ns.name().to_owned(),
    ];
    assert!(pids.iter().all(|p| alive(*p)));
    let listed = netns_list()?;
    assert!(names.iter().all(|n| listed.contains(n.as_str())));

    let started = Instant::now();
    drop(nginx);
    drop(pods);
    let took = started.elapsed();
    drop(conn);
    for pid in pids {
        assert!(!alive(pid), "process {pid} survived the drop");
    }
    for dir in &dirs {
        assert!(!dir.exists(), "{} survived the drop", dir.display());
    }
    let listed = netns_list()?;
    for name in &names {
        assert!(
            !listed.contains(name.as_str()),
            "netns {name} survived the drop"
        );
    }
    assert!(took < Duration::from_secs(5), "teardown took {took:?}");
    Ok(())
}

#[test]
fn spawn_failure_reports_the_log() -> Result<()> {
    if !crate::privileged_or_skip("spawn_failure_reports_the_log") {
        return Ok(());
    }
    let ns = Netns::new("ebad")?;
    // Something already listens on the outbound port, so Envoy cannot bind virtualOutbound.
    let _squatter = ns.run(|| TcpListener::bind("0.0.0.0:15001"))??;
    let err = Envoy::spawn(&ns, &EnvoyConfig::default()).expect_err("Envoy started anyway");
    let msg = format!("{err:#}");
    assert!(msg.contains("15001"), "error does not show the log: {msg}");
    Ok(())
}

#[test]
fn mtls_between_both_envoys() -> Result<()> {
    if !crate::privileged_or_skip("mtls_between_both_envoys") {
        return Ok(());
    }
    let pods = EnvoyPods::with_mtls(
        83,
        &services(&[("echo", 9000, Protocol::Tcp), ("web", 80, Protocol::Http)]),
    )?;
    let _echo = EchoServer::spawn(
        &pods.server.ns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9000),
    )?;
    let data = payload(256 * 1024);
    let echoed = echo_through(&pods, 9000, &data)?;
    assert!(echoed == data, "echoed bytes differ");
    // The hop between the Envoys was TLS, chosen by the inbound's TLS chain for the port, and
    // each side verified the other's SPIFFE certificate.
    let c = &pods.client_envoy;
    assert_eq!(c.stat("cluster.outbound|9000||echo.ssl.handshake")?, 1);
    assert_eq!(
        c.stat("cluster.outbound|9000||echo.ssl.fail_verify_san")?,
        0
    );
    let s = &pods.server_envoy;
    assert_eq!(s.stat("listener.0.0.0.0_15006.ssl.handshake")?, 1);
    assert_eq!(s.stat("cluster.inbound|9000||.upstream_cx_total")?, 1);

    // HTTP over the same mTLS (the HTTP chain's ALPN, Istio's istio-http/1.1).
    let _nginx = crate::Nginx::spawn(
        &pods.server.ns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80),
    )?;
    let mut conn = http_in(&pods.client.ns, pods.service_addr(80), "web")?;
    let r = conn.get("/1k")?;
    assert_eq!(r.status, 200);
    assert_eq!(s.stat("listener.0.0.0.0_15006.ssl.handshake")?, 2);
    Ok(())
}
