//! Privileged end-to-end tests of the crate: real namespaces, real iptables,
//! real sockets. Each test skips (or fails on CI) without root.

use crate::*;
use anyhow::{ensure, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream};
use std::time::Duration;

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const CAPTURED_PORT: u16 = 8080;
const EXCLUDED_PORT: u16 = 9090;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Two pods, `a` (client side) and `b` (server side), linked by a veth pair
/// named eth0 on both ends.
struct Pods {
    a: Netns,
    b: Netns,
}

fn pods() -> Result<Pods> {
    let a = Netns::new("a")?;
    let b = Netns::new("b")?;
    veth_link(&a, "eth0", A_IP, &b, "eth0", B_IP, 24)?;
    Ok(Pods { a, b })
}

/// Deterministic, non-repeating-looking payload bigger than several buffers.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

fn connect_in(ns: &Netns, dst: SocketAddrV4) -> Result<TcpStream> {
    ns.run(|| TcpStream::connect_timeout(&dst.into(), IO_TIMEOUT))?
        .with_context(|| format!("connecting to {dst} from {}", ns.name()))
}

/// Sends `data` from a socket in `ns`, half-closes, and reads until the
/// peer's FIN: proves bytes and half-close both travel end to end.
fn echo_roundtrip(ns: &Netns, dst: SocketAddrV4, data: &[u8]) -> Result<Vec<u8>> {
    let mut stream = connect_in(ns, dst)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    std::thread::scope(|s| -> Result<Vec<u8>> {
        let w = s.spawn(move || -> std::io::Result<()> {
            writer.write_all(data)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut got = Vec::new();
        stream
            .read_to_end(&mut got)
            .with_context(|| format!("reading the echo from {dst}"))?;
        w.join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))?
            .context("writing")?;
        Ok(got)
    })
}

/// Names in `ip netns list` (lines are "name" or "name (id: N)").
fn netns_names() -> Result<Vec<String>> {
    let out = exec::run(exec::command("ip").args(["netns", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

#[test]
fn capture_rules_follow_istio_order() {
    let rules = capture_rules(&CaptureConfig::default());
    println!("{rules}");
    let expected = "\
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";
    assert_eq!(rules, expected);

    let custom_cfg = CaptureConfig {
        proxy_uid: 2000,
        proxy_gid: 2001,
        outbound_port: 16001,
        inbound_port: 16006,
        exclude_outbound_ports: vec![5432],
        exclude_inbound_ports: vec![15090],
        exclude_outbound_cidrs: vec![(Ipv4Addr::new(10, 96, 0, 0), 12)],
        exclude_outbound_cidrs6: vec![("fd00:96::".parse().unwrap(), 64)],
        inbound_ports: InboundPorts::List(vec![80, 443]),
        native_nftables: false,
    };
    // The IPv6 rules are the IPv4 ones with IPv6's loopback, `::6` and the IPv6 ranges.
    let v6 = crate::capture::capture_rules6(&custom_cfg);
    let expected6 = capture_rules(&custom_cfg)
        .replace("127.0.0.1/32", "::1/128")
        .replace("127.0.0.6/32", "::6/128")
        .replace("10.96.0.0/12", "fd00:96::/64");
    assert_eq!(v6, expected6);
    let custom = capture_rules(&custom_cfg);
    let lines: Vec<&str> = custom.lines().collect();
    let pos = |needle: &str| {
        lines
            .iter()
            .position(|l| *l == needle)
            .unwrap_or_else(|| panic!("missing {needle:?} in\n{custom}"))
    };
    assert!(
        pos("-A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN")
            < pos("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN")
    );
    assert!(
        pos("-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN") < pos("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
    );
    pos("-A ISTIO_INBOUND -p tcp --dport 80 -j ISTIO_IN_REDIRECT");
    pos("-A ISTIO_INBOUND -p tcp --dport 443 -j ISTIO_IN_REDIRECT");
    pos("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001");
    pos("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006");
    pos("-A ISTIO_OUTPUT -m owner --uid-owner 2000 -j RETURN");
    pos("-A ISTIO_OUTPUT -m owner --gid-owner 2001 -j RETURN");
    assert!(
        !custom.contains("--dport 22 "),
        "ssh RETURN only when all ports are captured"
    );
    assert!(!custom.contains("ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"));
}

#[test]
fn outbound_capture_relays_captured_port_and_bypasses_excluded_port() -> Result<()> {
    if !privileged_or_skip("outbound_capture_relays_captured_port_and_bypasses_excluded_port") {
        return Ok(());
    }
    let pods = pods()?;
    let cfg = CaptureConfig {
        exclude_outbound_ports: vec![EXCLUDED_PORT],
        ..CaptureConfig::default()
    };
    install_istio_capture(&pods.a, &cfg)?;
    let saved = exec::run(pods.a.cmd("iptables-save").args(["-t", "nat"]))?;
    ensure!(
        saved.contains("--uid-owner 1337") && saved.contains("--dport 9090 -j RETURN"),
        "rules not installed in {}:\n{saved}",
        pods.a.name()
    );

    let captured = EchoServer::spawn(&pods.b, SocketAddrV4::new(B_IP, CAPTURED_PORT))?;
    let excluded = EchoServer::spawn(&pods.b, SocketAddrV4::new(B_IP, EXCLUDED_PORT))?;
    let relay = Relay::spawn(&pods.a, RelayConfig::default())?;
    let cap = SynCapture::start(&pods.a, "eth0")?;

    let data = payload(300 * 1024);
    let got = echo_roundtrip(&pods.a, SocketAddrV4::new(B_IP, CAPTURED_PORT), &data)?;
    ensure!(
        got == data,
        "captured echo differs ({} of {} bytes)",
        got.len(),
        data.len()
    );
    let got = echo_roundtrip(&pods.a, SocketAddrV4::new(B_IP, EXCLUDED_PORT), b"direct")?;
    ensure!(got == b"direct", "excluded echo differs: {got:?}");

    let syns = cap.stop();
    let stats = relay.stats();
    assert_eq!(
        stats,
        RelayStats {
            outbound_accepted: 1,
            inbound_accepted: 0,
            upstream_connect_failures: 0,
            spurious_eagain: 0
        }
    );
    assert_eq!(captured.accepted(), 1);
    assert_eq!(excluded.accepted(), 1);
    for port in [CAPTURED_PORT, EXCLUDED_PORT] {
        let syn = syns
            .iter()
            .find(|s| s.dst == SocketAddrV4::new(B_IP, port))
            .with_context(|| format!("no SYN to port {port} on a/eth0: {syns:?}"))?;
        assert_eq!(*syn.src.ip(), A_IP);
        assert!(syn.has_option(2), "SYN without MSS option: {syn:?}");
    }
    assert_eq!(syns.len(), 2, "exactly the two connections: {syns:?}");
    Ok(())
}

#[test]
fn sidecar_to_sidecar_path_uses_outbound_and_inbound_capture() -> Result<()> {
    if !privileged_or_skip("sidecar_to_sidecar_path_uses_outbound_and_inbound_capture") {
        return Ok(());
    }
    let pods = pods()?;
    let cfg = CaptureConfig::default();
    install_istio_capture(&pods.a, &cfg)?;
    install_istio_capture(&pods.b, &cfg)?;
    let server = EchoServer::spawn(&pods.b, SocketAddrV4::new(B_IP, CAPTURED_PORT))?;
    let relay_a = Relay::spawn(&pods.a, RelayConfig::default())?;
    let relay_b = Relay::spawn(&pods.b, RelayConfig::default())?;
    let cap = SynCapture::start(&pods.b, "lo")?;

    let data = payload(100 * 1024);
    let got = echo_roundtrip(&pods.a, SocketAddrV4::new(B_IP, CAPTURED_PORT), &data)?;
    ensure!(got == data, "echo through both sidecars differs");

    assert_eq!(relay_a.stats().outbound_accepted, 1);
    assert_eq!(relay_a.stats().inbound_accepted, 0);
    assert_eq!(relay_b.stats().inbound_accepted, 1);
    assert_eq!(relay_b.stats().outbound_accepted, 0);
    assert_eq!(server.accepted(), 1);
    // The inbound sidecar dialled the app from 127.0.0.6, like Envoy.
    let syns = cap.stop();
    assert!(
        syns.iter()
            .any(|s| *s.src.ip() == Ipv4Addr::new(127, 0, 0, 6)
                && s.dst == SocketAddrV4::new(B_IP, CAPTURED_PORT)),
        "no 127.0.0.6 -> app SYN on b/lo: {syns:?}"
    );
    Ok(())
}

#[test]
fn relay_propagates_reset_and_connect_failure() -> Result<()> {
    if !privileged_or_skip("relay_propagates_reset_and_connect_failure") {
        return Ok(());
    }
    let pods = pods()?;
    install_istio_capture(&pods.a, &CaptureConfig::default())?;
    let relay = Relay::spawn(&pods.a, RelayConfig::default())?;

    // A server in b that reads one byte and then resets the connection.
    let rst_addr = SocketAddrV4::new(B_IP, 7070);
    let listener = pods.b.run(|| sock::listen_reuseaddr(rst_addr))??;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut conn, _) = listener.accept()?;
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte)?;
        sock::set_linger_zero(&conn);
        Ok(())
    });

    let mut client = connect_in(&pods.a, rst_addr)?;
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.write_all(b"x")?;
    let mut buf = [0u8; 16];
    let read = client.read(&mut buf);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    match read {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset through the relay, read {n} bytes (0 = FIN)"),
    }

    // Nothing listens on 7071: the relay's upstream connect is refused and
    // the client, already connected to the relay, gets a reset. The reset can
    // beat the client's connect() to reporting success (std's connect with a
    // timeout polls, then reads SO_ERROR), so both places count.
    let refused = SocketAddrV4::new(B_IP, 7071);
    let outcome = pods.a.run(|| -> std::io::Result<usize> {
        let mut client = TcpStream::connect_timeout(&refused.into(), IO_TIMEOUT)?;
        client.set_read_timeout(Some(IO_TIMEOUT))?;
        client.read(&mut buf)
    })?;
    match outcome {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset for a refused upstream, read {n} bytes"),
    }
    let stats = relay.stats();
    assert_eq!(stats.outbound_accepted, 2);
    assert_eq!(stats.upstream_connect_failures, 1);
    Ok(())
}

#[test]
fn netns_run_cmd_and_cookie() -> Result<()> {
    if !privileged_or_skip("netns_run_cmd_and_cookie") {
        return Ok(());
    }
    let a = Netns::new("c")?;
    let b = Netns::new("c")?;
    assert_ne!(a.name(), b.name());
    assert_eq!(a.path(), std::path::Path::new("/run/netns").join(a.name()));
    let (ca, cb) = (a.cookie()?, b.cookie()?);
    assert!(ca != 0 && cb != 0 && ca != cb, "cookies {ca} {cb}");
    assert_eq!(a.cookie()?, ca, "cookie is stable");

    // Only lo exists inside, and it is up.
    let links = exec::run(a.cmd("ip").args(["-o", "link", "show"]))?;
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains("UP"), "{links}");

    // run() really runs inside, and threads spawned there stay inside.
    let inner = a.run(|| {
        std::thread::spawn(|| nix::net::if_::if_nameindex().map(|l| l.iter().count())).join()
    })?;
    assert_eq!(inner.map_err(|_| anyhow::anyhow!("panic"))??, 1);

    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.run(|| panic!("boom inside netns"))
    }));
    assert!(panicked.is_err(), "a panic in run() reaches the caller");
    Ok(())
}

/// `Uid:`/`Gid:` lines of the calling thread, e.g. "1337\t1337\t0\t1337".
fn thread_ids() -> Result<(String, String)> {
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("no {name} in /proc/thread-self/status"))
    };
    Ok((field("Uid:")?, field("Gid:")?))
}

#[test]
fn thread_credentials_stay_on_the_thread() -> Result<()> {
    if !privileged_or_skip("thread_credentials_stay_on_the_thread") {
        return Ok(());
    }
    let before = thread_ids()?;
    let (own, child) = std::thread::spawn(|| -> Result<_> {
        become_thread_uid_gid(1337, 1338)?;
        let own = thread_ids()?;
        let child = std::thread::spawn(thread_ids)
            .join()
            .map_err(|_| anyhow::anyhow!("panic"))??;
        Ok((own, child))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("panic"))??;
    let expected = (
        "1337\t1337\t0\t1337".to_owned(),
        "1338\t1338\t0\t1338".to_owned(),
    );
    assert_eq!(own, expected);
    assert_eq!(child, expected, "spawned threads inherit");
    assert_eq!(thread_ids()?, before, "the test thread is untouched");
    assert!(nix::unistd::geteuid().is_root());
    Ok(())
}

#[test]
fn cgroup_enter_moves_process_and_guard_moves_it_back() -> Result<()> {
    if !privileged_or_skip("cgroup_enter_moves_process_and_guard_moves_it_back") {
        return Ok(());
    }
    let root = cgroup2_root()?;
    let cg = Cgroup::new("enter")?;
    assert!(cg.path().starts_with(&root) && cg.path().is_dir());
    let before = std::fs::read_to_string("/proc/self/cgroup")?;
    let name = cg
        .path()
        .file_name()
        .context("cgroup has a name")?
        .to_string_lossy()
        .into_owned();
    {
        let _guard = cg.enter()?;
        let now = std::fs::read_to_string("/proc/self/cgroup")?;
        assert!(now.lines().any(|l| l == format!("0::/{name}")), "{now}");
        let procs = std::fs::read_to_string(cg.path().join("cgroup.procs"))?;
        assert!(procs
            .split_whitespace()
            .any(|p| p == std::process::id().to_string()));
    }
    assert_eq!(std::fs::read_to_string("/proc/self/cgroup")?, before);
    let path = cg.path().to_owned();
    drop(cg);
    assert!(!path.exists());
    Ok(())
}

#[test]
fn everything_is_torn_down_on_drop_and_on_panic() -> Result<()> {
    if !privileged_or_skip("everything_is_torn_down_on_drop_and_on_panic") {
        return Ok(());
    }
    let (names, cgroup_path) = {
        let pods = pods()?;
        install_istio_capture(&pods.a, &CaptureConfig::default())?;
        let _relay = Relay::spawn(&pods.a, RelayConfig::default())?;
        let _echo = EchoServer::spawn(&pods.b, SocketAddrV4::new(B_IP, CAPTURED_PORT))?;
        let _cap = SynCapture::start(&pods.a, "eth0")?;
        let cg = Cgroup::new("drop")?;
        let list = netns_names()?;
        for ns in [&pods.a, &pods.b] {
            assert!(
                list.iter().any(|n| n == ns.name()),
                "{} not in {list:?}",
                ns.name()
            );
        }
        (
            vec![pods.a.name().to_owned(), pods.b.name().to_owned()],
            cg.path().to_owned(),
        )
    };
    let list = netns_names()?;
    for name in &names {
        assert!(!list.contains(name), "{name} still listed: {list:?}");
    }
    assert!(
        !cgroup_path.exists(),
        "{} still exists",
        cgroup_path.display()
    );

    // Same when the owner panics half-way.
    let created = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ns = Netns::new("panic").expect("netns");
        let cg = Cgroup::new("panic").expect("cgroup");
        *created.lock().expect("lock") = Some((ns.name().to_owned(), cg.path().to_owned()));
        panic!("test failure in the middle");
    }));
    assert!(result.is_err());
    let (name, path) = created
        .into_inner()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .context("resources were created")?;
    assert!(!netns_names()?.contains(&name));
    assert!(!path.exists());
    Ok(())
}
