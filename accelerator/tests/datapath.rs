//! The datapath on the real kernel: exact pairing of both local hops of a pod, the first-byte
//! rule, pod isolation, stream semantics, and survival across daemon restarts and detach.
//! Each test builds its own pods (network namespaces with istio-init's rules and a uid-1337
//! relay), its own cgroup and its own pins, and removes them all even when it fails.

mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use minimesh::{CaptureConfig, EchoServer, TwoPods};
use support::*;

const APP_PORT: u16 = 8080;

fn mesh(subnet: u8) -> TwoPods {
    TwoPods::new(subnet, CaptureConfig::default(), CaptureConfig::default()).expect("two pods")
}

/// `n` echo exchanges of `size` bytes from the client pod's app to the server pod's app.
fn exchanges(mesh: &TwoPods, n: u64, size: usize) {
    let dst = SocketAddrV4::new(mesh.server.ip, APP_PORT);
    for i in 0..n {
        let s = connect(&mesh.client.ns, dst).expect("connect through the mesh");
        let data = pattern(i + 1, size);
        let out = echo_exchange(s, &data, 16 * 1024).expect("exchange");
        assert_same(&format!("connection {i}"), &out.bytes, &data);
    }
}

#[test]
fn streams_are_byte_exact_through_both_hops_and_counters_prove_the_redirect() {
    byte_exact_through_both_hops("streams_are_byte_exact", 71, false);
}

#[test]
fn two_way_streams_are_byte_exact_and_redirect_into_the_app_too() {
    byte_exact_through_both_hops("two_way_streams_are_byte_exact", 61, true);
}

/// Under the reader rule only app -> sidecar is redirected (the sidecar's replies into the app
/// stay on TCP); in the two-way opt-in every direction of both hops is.
fn byte_exact_through_both_hops(test: &str, subnet: u8, two_way: bool) {
    let Some(mut accel) = Accel::new(test) else {
        return;
    };
    let mesh = mesh(subnet);
    let _app =
        EchoServer::spawn(&mesh.server.ns, SocketAddrV4::new(mesh.server.ip, APP_PORT)).unwrap();
    accel.add_pod_in(&mesh.client.ns, &mesh.client.capture, two_way);
    accel.add_pod_in(&mesh.server.ns, &mesh.server.capture, two_way);

    const N: u64 = 6;
    const SIZE: usize = 1 << 20;
    exchanges(&mesh, N, SIZE);
    let c = accel.counters();
    eprintln!("counters after the accelerated run: {c:?}");
    assert_eq!(
        c.get("pairs_outbound"),
        N,
        "one app->sidecar pair per connection"
    );
    assert_eq!(
        c.get("pairs_inbound"),
        N,
        "one sidecar->app pair per connection"
    );
    assert_eq!(c.get("stamps_written"), N);
    assert_eq!(c.get("stamps_found"), N);
    let into_app = if two_way { N * SIZE as u64 } else { 0 };
    for (dir, want) in [
        ("outbound_app_to_sidecar", N * SIZE as u64),
        ("outbound_sidecar_to_app", into_app),
        ("inbound_sidecar_to_app", into_app),
        ("inbound_app_to_sidecar", N * SIZE as u64),
    ] {
        // Every byte of every stream the mode redirects went through the sockhash, and under the
        // reader rule not one byte went into an app's socket.
        assert_eq!(c.get(&format!("bytes_redirected_{dir}")), want, "{dir}");
    }
    if !two_way {
        assert_eq!(
            c.get("app_unpaired_at_half_close"),
            N,
            "each client app socket left the sockhash at its own half-close (the server app's \
             close comes after the client's FIN: LAST_ACK, not a half-close of its own)"
        );
    }
    assert_eq!(c.get("pass_no_peer"), 0, "no direction fell back to TCP");
    // The same traffic, credited to the pod each hop belongs to: the client pod owns the
    // outbound hop, the server pod the inbound one.
    let stats = accel.dp().pod_stats().expect("pod stats");
    let client = stats[&mesh.client.ns.cookie().unwrap()];
    let server = stats[&mesh.server.ns.cookie().unwrap()];
    let all = N * SIZE as u64;
    assert_eq!(client.pairs, [N, 0, 0], "client pod pairs");
    assert_eq!(server.pairs, [0, N, 0], "server pod pairs");
    let into = if two_way { all } else { 0 };
    assert_eq!(
        client.bytes,
        [all, into, 0, 0, 0, 0],
        "client pod bytes by direction"
    );
    assert_eq!(
        server.bytes,
        [0, 0, into, all, 0, 0],
        "server pod bytes by direction"
    );
    let relay = mesh.client.relay_stats();
    assert_eq!(
        relay.outbound_accepted, N,
        "the sidecar still saw every connection"
    );

    // Programs attached but the pods not listed: nothing is touched, everything still works.
    accel.remove_pod(&mesh.client.ns);
    accel.remove_pod(&mesh.server.ns);
    assert!(
        accel.dp().pod_stats().unwrap().is_empty(),
        "a removed pod's stats go with it"
    );
    exchanges(&mesh, N, SIZE);
    assert_eq!(
        accel.counters(),
        c,
        "unlisted pods must leave every counter still"
    );

    // Programs detached: the same traffic still flows.
    accel.detach();
    assert!(!accel.pin_dir.exists(), "detach removed the pins");
    exchanges(&mesh, N, SIZE);
    assert_eq!(mesh.client.relay_stats().outbound_accepted, 3 * N);
}

/// The sidecar hop: the client pod's sidecar connects to the server pod's address, the server
/// pod's PREROUTING REDIRECT hands it to its sidecar on 15006, and the two sidecars' sockets are
/// paired on the token the client's end stamps. Both directions are redirected (both ends are
/// sidecars), every byte arrives in order, and each pod counts the pair. Without the server's
/// address in the node's pod-address map nothing is stamped toward it.
#[test]
fn the_sidecar_hop_is_byte_exact_both_ways_and_counted_in_both_pods() {
    let Some(mut accel) = Accel::new("sidecar_hop") else {
        return;
    };
    let mesh = mesh(75);
    let _app =
        EchoServer::spawn(&mesh.server.ns, SocketAddrV4::new(mesh.server.ip, APP_PORT)).unwrap();
    accel.add_pod_with_sidecar_hop(&mesh.client.ns, &mesh.client.capture, &[mesh.client.ip]);
    accel.add_pod_with_sidecar_hop(&mesh.server.ns, &mesh.server.capture, &[mesh.server.ip]);

    const N: u64 = 6;
    const SIZE: usize = 1 << 20;
    exchanges(&mesh, N, SIZE);
    let c = accel.counters();
    eprintln!("counters after the accelerated run: {c:?}");
    for hop in ["outbound", "inbound", "sidecar"] {
        assert_eq!(c.get(&format!("pairs_{hop}")), N, "{hop} pairs: {c:?}");
    }
    assert_eq!(
        c.get("stamps_written"),
        2 * N,
        "outbound and sidecar stamps"
    );
    assert_eq!(c.get("stamps_found"), 2 * N);
    let all = N * SIZE as u64;
    for (dir, want) in [
        ("outbound_app_to_sidecar", all),
        ("outbound_sidecar_to_app", 0),
        ("inbound_sidecar_to_app", 0),
        ("inbound_app_to_sidecar", all),
        ("sidecar_client_to_server", all),
        ("sidecar_server_to_client", all),
    ] {
        assert_eq!(c.get(&format!("bytes_redirected_{dir}")), want, "{dir}");
    }
    assert_eq!(c.get("pass_no_peer"), 0, "no direction fell back to TCP");
    assert_eq!(c.get("pair_rejected"), 0);
    let stats = accel.dp().pod_stats().expect("pod stats");
    let client = stats[&mesh.client.ns.cookie().unwrap()];
    let server = stats[&mesh.server.ns.cookie().unwrap()];
    assert_eq!(client.pairs, [N, 0, N], "client pod pairs");
    assert_eq!(server.pairs, [0, N, N], "server pod pairs");
    assert_eq!(client.bytes, [all, 0, 0, 0, all, 0], "client pod bytes");
    assert_eq!(server.bytes, [0, 0, 0, all, 0, all], "server pod bytes");
    assert_eq!(mesh.server.relay_stats().inbound_accepted, N);

    // The server's address gone from the node's map: the sidecars' connections are not
    // stamped (only the app hops pair), and the traffic is just as exact.
    assert_eq!(
        accel
            .dp()
            .set_pod_ips(&std::collections::BTreeMap::new())
            .unwrap(),
        0
    );
    exchanges(&mesh, N, SIZE);
    let after = accel.counters();
    assert_eq!(after.get("pairs_sidecar"), N, "{after:?}");
    assert_eq!(
        after.get("stamps_written"),
        3 * N,
        "only the outbound hop stamped"
    );
    assert_eq!(after.get("bytes_redirected_sidecar_client_to_server"), all);
    assert_eq!(after.get("pairs_outbound"), 2 * N);
}

/// With Istio's includeInboundPorts as a port list the server pod's PREROUTING captures only
/// those ports; istio-iptables then ignores excludeInboundPorts. A sidecar connection to any
/// other port of that pod reaches the app directly, with no sidecar to read a stamp, so it must
/// not be stamped (before the include list was modelled it was, and its end waited in the
/// sockhash until it moved to TCP). The listed port pairs all three hops as usual.
#[test]
fn the_sidecar_hop_follows_an_inbound_port_include_list() {
    const OTHER: u16 = APP_PORT + 1;
    let Some(mut accel) = Accel::new("sidecar_hop_include") else {
        return;
    };
    let server_capture = CaptureConfig {
        inbound_ports: minimesh::InboundPorts::List(vec![APP_PORT]),
        ..CaptureConfig::default()
    };
    let mesh = TwoPods::new(78, CaptureConfig::default(), server_capture).expect("two pods");
    let _app =
        EchoServer::spawn(&mesh.server.ns, SocketAddrV4::new(mesh.server.ip, APP_PORT)).unwrap();
    let _other =
        EchoServer::spawn(&mesh.server.ns, SocketAddrV4::new(mesh.server.ip, OTHER)).unwrap();
    accel.add_pod_with_sidecar_hop(&mesh.client.ns, &mesh.client.capture, &[mesh.client.ip]);
    accel.add_pod_with_sidecar_hop(&mesh.server.ns, &mesh.server.capture, &[mesh.server.ip]);

    const N: u64 = 4;
    const SIZE: usize = 256 * 1024;
    for port in [APP_PORT, OTHER] {
        let dst = SocketAddrV4::new(mesh.server.ip, port);
        for i in 0..N {
            let s = connect(&mesh.client.ns, dst).expect("connect through the mesh");
            let data = pattern(i + u64::from(port), SIZE);
            let out = echo_exchange(s, &data, 16 * 1024).expect("exchange");
            assert_same(&format!("port {port} connection {i}"), &out.bytes, &data);
        }
    }
    let c = accel.counters();
    // The captured port: outbound, sidecar and inbound pairs; the other: the outbound hop only.
    assert_eq!(c.get("pairs_outbound"), 2 * N, "{c:?}");
    assert_eq!(c.get("pairs_sidecar"), N, "{c:?}");
    assert_eq!(c.get("pairs_inbound"), N, "{c:?}");
    assert_eq!(
        c.get("stamps_written"),
        3 * N,
        "2N outbound stamps and N sidecar stamps, none toward the uncaptured port: {c:?}"
    );
    assert_eq!(
        c.get("pass_no_peer"),
        0,
        "no stamped end waited in vain: {c:?}"
    );
    assert_eq!(
        c.get("bytes_redirected_sidecar_client_to_server"),
        N * SIZE as u64
    );
    assert_eq!(mesh.server.relay_stats().inbound_accepted, N);
}

/// Go, Java and Node apps use IPv6 sockets for IPv4 by default: a Go server listens on `[::]`
/// with IPV6_V6ONLY off, so the sidecar's inbound connection from 127.0.0.6 arrives on an
/// AF_INET6 socket with v4-mapped addresses; a Java client opens AF_INET6 sockets and connects
/// to `::ffff:a.b.c.d`. Both hops must pair exactly as for AF_INET sockets, and every byte
/// arrive.
/// A Go-style echo server in `ns` (`[::]:8080`, IPV6_V6ONLY off: IPv4 clients arrive
/// v4-mapped) that serves `n` connections one after another; it returns their peers.
fn dual_stack_echo(ns: &minimesh::Netns, n: u64) -> std::thread::JoinHandle<Vec<SocketAddr>> {
    let listener = ns
        .run(|| std::net::TcpListener::bind("[::]:8080"))
        .unwrap()
        .expect("a [::] listener (Go's default)");
    std::thread::spawn(move || {
        let mut peers = Vec::new();
        for _ in 0..n {
            let (s, peer) = listener.accept().unwrap();
            peers.push(peer);
            let mut r = &s;
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                (&s).write_all(&buf[..n]).unwrap();
            }
            s.shutdown(Shutdown::Write).unwrap();
        }
        peers
    })
}

/// `n` byte-exact echo exchanges of `size` bytes from an AF_INET6 socket in `ns` to `dst`.
fn exchanges_v6(ns: &minimesh::Netns, dst: SocketAddrV6, n: u64, size: usize) {
    for i in 0..n {
        let s = ns
            .run(|| std::net::TcpStream::connect(dst))
            .unwrap()
            .expect("connect from an AF_INET6 socket");
        let data = pattern(i + 1, size);
        let out = echo_exchange(s, &data, 16 * 1024).expect("exchange");
        assert_same(&format!("connection {i} to {dst}"), &out.bytes, &data);
    }
}

#[test]
fn dual_stack_app_sockets_pair_on_both_hops() {
    let Some(mut accel) = Accel::new("dual_stack_apps") else {
        return;
    };
    let mesh = mesh(77);
    const N: u64 = 6;
    const SIZE: usize = 256 * 1024;
    let server = dual_stack_echo(&mesh.server.ns, N);
    accel.add_pod(&mesh.client.ns, &mesh.client.capture);
    accel.add_pod(&mesh.server.ns, &mesh.server.capture);
    // Java's default: an AF_INET6 socket for an IPv4 destination.
    let dst = SocketAddrV6::new(mesh.server.ip.to_ipv6_mapped(), 8080, 0, 0);
    exchanges_v6(&mesh.client.ns, dst, N, SIZE);
    let peers = server.join().unwrap();
    assert!(
        peers
            .iter()
            .all(|p| p.ip() == std::net::Ipv4Addr::new(127, 0, 0, 6).to_ipv6_mapped()),
        "the app's sockets are AF_INET6, its peer the sidecar at ::ffff:127.0.0.6: {peers:?}"
    );
    let c = accel.counters();
    eprintln!("counters: {c:?}");
    assert_eq!(c.get("pairs_outbound"), N, "{c:?}");
    assert_eq!(c.get("pairs_inbound"), N, "{c:?}");
    for dir in ["outbound_app_to_sidecar", "inbound_app_to_sidecar"] {
        assert_eq!(
            c.get(&format!("bytes_redirected_{dir}")),
            N * SIZE as u64,
            "{dir}: {c:?}"
        );
    }
    assert_eq!(c.get("pass_no_peer"), 0, "{c:?}");
}

/// What one run of the port-reuse traffic left: the datapath's counters, the captured
/// connections, and those the client pod's outbound relay accepted.
struct PortReuse {
    counters: meshlane::datapath::Counters,
    captured: u64,
    outbound_accepted: u64,
}

/// 500 concurrent connections from one pod through a 64-port range to 20 destinations (half
/// captured, half excluded by port), plus five connections sharing one bound port, with both pods
/// listed (`accelerate`) or not. Every stream must come back whole from the destination it named,
/// and no segment leaving the pod may carry meshlane's option.
/// True IPv6 in dual-stack pods: an AF_INET6 client to the server pod's IPv6 address goes app
/// -> ip6tables REDIRECT -> client sidecar -> server pod's ip6tables REDIRECT -> server sidecar
/// -> from `::6` -> the app, and all three hops pair, once per connection, byte-exact. IPv4
/// connections between the same pods pair as before, and a policy without the pod's IPv6
/// capture leaves IPv6 connections on TCP (nothing stamped, nothing paired, still exact).
#[test]
fn true_ipv6_hops_pair_on_all_three_hops_in_dual_stack_pods() {
    let Some(mut accel) = Accel::new("ipv6_hops") else {
        return;
    };
    let mesh = TwoPods::dual_stack(78, CaptureConfig::default(), CaptureConfig::default())
        .expect("dual-stack pods");
    const N: u64 = 6;
    const SIZE: usize = 256 * 1024;
    let register = |accel: &mut Accel, ipv6: bool| {
        for pod in [&mesh.client, &mesh.server] {
            let mut model = pod_model(&pod.ns, &pod.capture);
            model.capture_ipv6 = ipv6;
            let ips: [std::net::IpAddr; 2] = [pod.ip.into(), pod.ip6.expect("dual stack").into()];
            accel.add_model_pod_with_sidecar_hop(&model, &ips);
        }
    };
    register(&mut accel, true);
    let server_ip6 = mesh.server.ip6.expect("dual stack");
    let server = dual_stack_echo(&mesh.server.ns, 2 * N + 2);
    exchanges_v6(
        &mesh.client.ns,
        SocketAddrV6::new(server_ip6, 8080, 0, 0),
        N,
        SIZE,
    );
    let c = accel.counters();
    eprintln!("counters after IPv6: {c:?}");
    for hop in ["outbound", "inbound", "sidecar"] {
        assert_eq!(c.get(&format!("pairs_{hop}")), N, "{hop}: {c:?}");
    }
    for dir in [
        "outbound_app_to_sidecar",
        "inbound_app_to_sidecar",
        "sidecar_client_to_server",
        "sidecar_server_to_client",
    ] {
        assert_eq!(
            c.get(&format!("bytes_redirected_{dir}")),
            N * SIZE as u64,
            "{dir}: {c:?}"
        );
    }
    assert_eq!(c.get("stamps_written"), 2 * N, "{c:?}");
    assert_eq!(c.get("pass_no_peer"), 0, "{c:?}");
    assert_eq!(c.get("pair_rejected"), 0, "{c:?}");

    // IPv4 between the same pods: the same three pairs per connection.
    exchanges_v6(
        &mesh.client.ns,
        SocketAddrV6::new(mesh.server.ip.to_ipv6_mapped(), 8080, 0, 0),
        N,
        SIZE,
    );
    let c = accel.counters();
    for hop in ["outbound", "inbound", "sidecar"] {
        assert_eq!(c.get(&format!("pairs_{hop}")), 2 * N, "{hop}: {c:?}");
    }

    // Without the pod's IPv6 capture in its policy, an IPv6 connection is not predicted as
    // captured (ip6tables still sends it through both sidecars): nothing pairs, all exact.
    register(&mut accel, false);
    let before = accel.counters();
    exchanges_v6(
        &mesh.client.ns,
        SocketAddrV6::new(server_ip6, 8080, 0, 0),
        2,
        SIZE,
    );
    let after = accel.counters();
    for name in [
        "pairs_outbound",
        "pairs_inbound",
        "pairs_sidecar",
        "stamps_written",
    ] {
        assert_eq!(after.get(name), before.get(name), "{name}: {after:?}");
    }
    let peers = server.join().unwrap();
    let bind6: std::net::IpAddr = "::6".parse().unwrap();
    assert!(
        peers[..N as usize].iter().all(|p| p.ip() == bind6),
        "the app's IPv6 peer is the sidecar's ::6: {peers:?}"
    );
    assert!(
        mesh.server.relay_stats().inbound_accepted >= 2 * N + 2,
        "every connection went through the server's sidecar"
    );
}

fn port_reuse_traffic(test: &str, subnet: u8, accelerate: bool) -> Option<PortReuse> {
    let mut accel = Accel::new(test)?;
    let client_capture = CaptureConfig {
        exclude_outbound_ports: vec![9000],
        ..CaptureConfig::default()
    };
    let mesh = TwoPods::new(subnet, client_capture, CaptureConfig::default()).unwrap();
    let status = mesh
        .client
        .ns
        .cmd("sysctl")
        .args(["-qw", "net.ipv4.ip_local_port_range=40000 40063"])
        .status()
        .unwrap();
    assert!(status.success(), "narrow the client pod's port range");
    let mut servers = Vec::new();
    let mut dsts = Vec::new();
    for k in 0..10u8 {
        let ip = Ipv4Addr::new(10, subnet, 0, 10 + k);
        minimesh::add_addr(&mesh.server.ns, "eth0", ip, 24).unwrap();
        for port in [80, 9000] {
            let addr = SocketAddrV4::new(ip, port);
            servers.push(EchoServer::spawn_checked(&mesh.server.ns, addr).unwrap());
            dsts.push(addr);
        }
    }
    if accelerate {
        accel.add_pod(&mesh.client.ns, &mesh.client.capture);
        accel.add_pod(&mesh.server.ns, &mesh.server.capture);
    }
    let tap = minimesh::SynCapture::start(&mesh.client.ns, "eth0").unwrap();

    // All connections are open at once, so local ports are shared across destinations.
    let mut conns = Vec::new();
    for i in 0..500usize {
        let dst = dsts[i % dsts.len()];
        conns.push((
            i as u64,
            dst,
            connect(&mesh.client.ns, dst).expect("connect"),
        ));
    }
    let shared = SocketAddrV4::new(mesh.client.ip, 41000);
    for k in 0..5usize {
        let dst = dsts[2 * k]; // port 80: captured, so all five NAT to the same 127.0.0.1:15001 tuple
        conns.push((
            1000 + k as u64,
            dst,
            connect_from(&mesh.client.ns, shared, dst).expect("bound connect"),
        ));
    }
    let captured = conns.iter().filter(|(_, d, _)| d.port() == 80).count() as u64;
    par_each(conns, 12, |(seed, dst, s)| {
        checked_echo(s, dst, seed, 32 * 1024)
    });

    let segments = tap.stop();
    let stamped: Vec<_> = segments
        .iter()
        .filter(|r| r.has_option(meshlane_common::TCP_OPT_KIND))
        .collect();
    assert!(
        stamped.is_empty(),
        "segments left the pod carrying meshlane's option: {stamped:?}"
    );
    // Distinct connections, not SYN segments: under load a SYN may be retransmitted.
    let excluded_syns: std::collections::BTreeSet<_> = segments
        .iter()
        .filter(|r| r.syn && r.src.ip() == &mesh.client.ip && r.dst.port() == 9000)
        .map(|r| (r.src, r.dst))
        .collect();
    assert_eq!(
        excluded_syns.len(),
        250,
        "every excluded connection went straight out, unstamped"
    );

    let misrouted: u64 = servers.iter().map(EchoServer::misrouted).sum();
    assert_eq!(
        misrouted, 0,
        "bytes reached a destination their stream did not name"
    );
    let c = accel.counters();
    eprintln!("counters: {c:?}");
    Some(PortReuse {
        counters: c,
        captured,
        outbound_accepted: mesh.client.relay_stats().outbound_accepted,
    })
}

/// Port reuse and NAT remaps (`port_reuse_traffic`) through the datapath: besides every stream
/// whole and nothing stamped leaving the pod, every captured connection must be paired exactly
/// once and every captured byte redirected.
#[test]
fn port_reuse_and_nat_remaps_never_cross_streams() {
    let Some(PortReuse {
        counters: c,
        captured,
        outbound_accepted,
    }) = port_reuse_traffic("port_reuse_and_nat_remaps", 73, true)
    else {
        return;
    };
    assert_eq!(
        c.get("stamps_written"),
        captured,
        "only captured connections are stamped"
    );
    assert_eq!(c.get("stamps_found"), captured);
    assert_eq!(
        c.get("pairs_outbound"),
        captured,
        "each captured connection paired once"
    );
    assert_eq!(
        c.get("pairs_inbound"),
        505,
        "each connection's inbound hop paired once"
    );
    assert_eq!(c.get("pair_rejected"), 0);
    assert_eq!(
        c.get("bytes_redirected_outbound_app_to_sidecar"),
        captured * (6 + 32 * 1024),
        "every captured byte went through the sockhash"
    );
    assert_eq!(outbound_accepted, captured);
}

/// The control of the test above: the same traffic with no pod listed, so the datapath touches
/// nothing. On a kernel where the test above fails, this one failing the same way shows the
/// failure is the kernel's, not meshlane's (6.1: scripts/kernel-matrix/kernels.toml).
#[test]
fn port_reuse_and_nat_remaps_control_without_meshlane() {
    let Some(PortReuse {
        counters: c,
        outbound_accepted,
        captured,
    }) = port_reuse_traffic("port_reuse_control", 74, false)
    else {
        return;
    };
    assert_eq!(
        c.pairs() + c.get("stamps_written"),
        0,
        "the control touched nothing: {c:?}"
    );
    assert_eq!(outbound_accepted, captured);
}

/// Two pods with identical addresses in separate namespaces, driven at the same time, with the
/// inbound hop's 4-tuple identical in both: no pair may span them (invariant 3).
#[test]
fn identical_addresses_in_two_pods_never_pair_across() {
    let Some(mut accel) = Accel::new("identical_addresses") else {
        return;
    };
    let meshes = [mesh(74), mesh(74)];
    let mut apps = Vec::new();
    for m in &meshes {
        accel.add_pod(&m.client.ns, &m.client.capture);
        accel.add_pod(&m.server.ns, &m.server.capture);
        apps.push(
            EchoServer::spawn_checked(&m.server.ns, SocketAddrV4::new(m.server.ip, APP_PORT))
                .unwrap(),
        );
    }
    const N: u64 = 30;
    std::thread::scope(|s| {
        for (which, m) in meshes.iter().enumerate() {
            s.spawn(move || {
                let dst = SocketAddrV4::new(m.server.ip, APP_PORT);
                for i in 0..N {
                    let seed = (which as u64 + 1) * 10_000 + i;
                    checked_echo(connect(&m.client.ns, dst).unwrap(), dst, seed, 64 * 1024);
                }
            });
        }
    });
    // The sidecar's inbound hop with the very same tuple in both pods, opened concurrently.
    let app_addr = SocketAddrV4::new(meshes[0].server.ip, 7000);
    let listeners: Vec<_> = meshes
        .iter()
        .map(|m| {
            m.server
                .ns
                .run(|| std::net::TcpListener::bind(app_addr))
                .unwrap()
                .unwrap()
        })
        .collect();
    let barrier = std::sync::Barrier::new(2);
    for round in 0..20u16 {
        // Below the ephemeral range, so no relay connection holds the port.
        let src = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 6), 20000 + round);
        std::thread::scope(|s| {
            for (which, (m, l)) in meshes.iter().zip(&listeners).enumerate() {
                let barrier = &barrier;
                s.spawn(move || {
                    let payload = pattern(u64::from(round) * 2 + which as u64, 8 * 1024);
                    let mut c = m
                        .server
                        .ns
                        .run(|| {
                            minimesh::become_thread_uid_gid(1337, 1337).unwrap();
                            barrier.wait();
                            connect_from_here(src, app_addr)
                        })
                        .unwrap();
                    let (mut a, _) = l.accept().unwrap();
                    c.write_all(&payload).unwrap();
                    c.shutdown(Shutdown::Write).unwrap();
                    let mut got = Vec::new();
                    a.read_to_end(&mut got).unwrap();
                    assert_same(&format!("pod {which} round {round}"), &got, &payload);
                });
            }
        });
    }
    assert_eq!(apps.iter().map(EchoServer::misrouted).sum::<u64>(), 0);
    let c = accel.counters();
    assert_eq!(c.get("pairs_outbound"), 2 * N);
    assert_eq!(
        c.get("pairs_inbound"),
        2 * N + 40,
        "every inbound hop paired inside its own pod"
    );
    assert_eq!(c.get("pair_rejected"), 0);
}

/// Bound to `src` (SO_REUSEADDR) and connected to `dst`, in the calling thread's namespace.
fn connect_from_here(src: SocketAddrV4, dst: SocketAddrV4) -> std::net::TcpStream {
    use nix::sys::socket::{
        bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::from(src)).unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst)).unwrap();
    std::net::TcpStream::from(fd)
}

/// A restart after an upgrade that changed a shared type must not adopt the old maps with the new
/// layout: it refuses with a sentence that says what to do, and touches nothing.
#[test]
fn pins_from_an_incompatible_build_are_not_adopted() {
    let Some(mut accel) = Accel::new("incompatible_pins") else {
        return;
    };
    accel.dp = None;
    // Stand in for an old build: a policy map whose values have another size.
    let policy = accel.pin_dir.join(meshlane_common::maps::POLICY);
    std::fs::remove_file(&policy).unwrap();
    aya::maps::MapData::from_pin(accel.pin_dir.join(meshlane_common::maps::UNREAD))
        .unwrap()
        .pin(&policy)
        .unwrap();
    let err = match meshlane::datapath::Datapath::open(&accel.options()) {
        Ok(_) => panic!("adopted pins with another layout"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("incompatible meshlane build") && err.contains("meshlane detach"),
        "{err}"
    );
    assert!(
        policy.exists(),
        "a refused adoption must leave the pins alone"
    );
}

/// A socket that disconnects (`connect(AF_UNSPEC)`) and connects again keeps its socket storage.
/// Nothing of its first connection (its peer, a pin to TCP) may carry over: the second
/// connection pairs afresh and its bytes go, redirected and whole, to its own destination.
#[test]
fn a_socket_that_connects_again_pairs_afresh() {
    use std::os::fd::AsRawFd;
    let Some(mut accel) = Accel::new("reconnect") else {
        return;
    };
    let mesh = TwoPods::new(99, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    let first_dst = SocketAddrV4::new(mesh.server.ip, 8080);
    let second_dst = SocketAddrV4::new(mesh.server.ip, 8081);
    let _a = EchoServer::spawn(&mesh.server.ns, first_dst).unwrap();
    let _b = EchoServer::spawn(&mesh.server.ns, second_dst).unwrap();
    accel.add_pod(&mesh.client.ns, &mesh.client.capture);
    accel.add_pod(&mesh.server.ns, &mesh.server.capture);

    let mut s = connect(&mesh.client.ns, first_dst).unwrap();
    let first = pattern(11, 4096);
    s.write_all(&first).unwrap();
    let mut back = vec![0u8; first.len()];
    s.read_exact(&mut back).unwrap();
    assert_same("first connection", &back, &first);
    let c = accel.counters();
    assert_eq!(c.get("pairs_outbound"), 1, "{c:?}");

    // Disconnect, then connect the same socket to another destination.
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: a valid descriptor and a sockaddr of the length passed.
    let rc = unsafe {
        libc::connect(
            s.as_raw_fd(),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "disconnect: {}", std::io::Error::last_os_error());
    let addr = nix::sys::socket::SockaddrIn::from(second_dst);
    let mut again = Err(nix::errno::Errno::EAGAIN);
    for _ in 0..50 {
        again = nix::sys::socket::connect(s.as_raw_fd(), &addr);
        if again.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    again.expect("connect the same socket again");
    let second = pattern(12, 64 * 1024);
    let out = echo_exchange(s, &second, 8192).unwrap();
    assert_same("second connection", &out.bytes, &second);

    let c = accel.counters();
    assert_eq!(
        c.get("pairs_outbound"),
        2,
        "the second connection paired: {c:?}"
    );
    assert!(
        c.get("bytes_redirected_outbound_app_to_sidecar") >= (first.len() + second.len()) as u64,
        "both connections' bytes were redirected: {c:?}"
    );
    assert_eq!(
        c.get("pass_peer_gone"),
        0,
        "nothing followed the old peer: {c:?}"
    );
    assert_eq!(c.get("pass_tcp_pinned"), 0, "no pin carried over: {c:?}");
}
