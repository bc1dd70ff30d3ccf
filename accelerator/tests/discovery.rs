//! The local discovery source against real Envoy 1.40 sidecars and real iptables in the
//! mini-mesh: no pod list is written by hand anywhere here. Discovery scans the whole node, so
//! every assertion looks only at the namespaces this test created (other tests and other
//! processes may run Envoys at the same time).

mod support;

use std::{
    collections::BTreeSet,
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::MetadataExt,
    path::Path,
    time::Duration,
};

use meshlane::{
    discovery::{self, envoy_admin, Discovery, Reason, Skipped},
    model::{Cidr, OutboundRanges, Pod},
};
use minimesh::{
    envoy::{Envoy, EnvoyConfig, Protocol},
    install_istio_capture, CaptureConfig, EchoServer, EnvoyPods, Netns,
};
use support::*;

const ECHO: u16 = 7000;

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).expect("netns inode").ino()
}

/// `iptables <args>` inside `ns`.
fn iptables(ns: &Netns, args: &str) {
    let status = ns
        .cmd("iptables")
        .arg("-w")
        .args(args.split_whitespace())
        .status()
        .expect("run iptables");
    assert!(status.success(), "iptables {args}: {status}");
}

/// The pods and skipped entries of `d` that live in one of `namespaces`.
fn mine(d: &Discovery, namespaces: &[&Netns]) -> (Vec<Pod>, Vec<Skipped>) {
    let want: BTreeSet<u64> = namespaces.iter().map(|n| inode(&n.path())).collect();
    let ours = |p: &Path| std::fs::metadata(p).is_ok_and(|m| want.contains(&m.ino()));
    let pods = d.pods.iter().filter(|p| ours(&p.netns)).cloned().collect();
    let skipped = d
        .skipped
        .iter()
        .filter(|s| ours(&s.netns))
        .cloned()
        .collect();
    (pods, skipped)
}

/// Istio's capture ports of `cfg` as the model must have them learned: ISTIO_INBOUND returns
/// 15008 and (the minimesh rule set's) 22 ahead of the excluded ports.
fn expected_inbound_excludes(cfg: &CaptureConfig) -> Vec<u16> {
    let mut v = vec![15008, 22];
    v.extend(&cfg.exclude_inbound_ports);
    v
}

fn assert_learned(pod: &Pod, ns: &Netns, envoy: &Envoy, capture: &CaptureConfig) {
    let boot = envoy.config();
    assert_eq!(pod.netns, ns.path(), "{pod:?}");
    assert_eq!(
        pod.name,
        format!("default/{}", ns.name()),
        "name from the node id"
    );
    assert_eq!(
        (pod.proxy_uid, pod.proxy_gid),
        (boot.uid, boot.gid),
        "{pod:?}"
    );
    assert_eq!(
        (pod.outbound_port, pod.inbound_port),
        (boot.outbound_port, boot.inbound_port),
        "capture ports must be the bootstrap's: {pod:?}"
    );
    assert_eq!(pod.inbound_bind, Ipv4Addr::new(127, 0, 0, 6));
    assert_eq!(pod.exclude_outbound_ports, capture.exclude_outbound_ports);
    assert_eq!(
        pod.exclude_inbound_ports,
        expected_inbound_excludes(capture)
    );
    let cidrs: Vec<Cidr> = capture
        .exclude_outbound_cidrs
        .iter()
        .map(|(addr, prefix)| Cidr {
            addr: (*addr).into(),
            prefix: *prefix,
        })
        .collect();
    assert_eq!(pod.exclude_outbound_cidrs, cidrs);
    assert_eq!(pod.include_outbound, OutboundRanges::All);
    assert!(pod.accelerate_outbound && pod.accelerate_inbound, "{pod:?}");
}

#[test]
fn envoy_pods_are_found_as_their_bootstrap_says() {
    let Some(_serial) = Accel::cgroup_only("discovery_envoy_pods") else {
        return;
    };
    let pods = EnvoyPods::new(161, &[("echo".into(), ECHO, Protocol::Tcp)]).expect("Envoy pods");
    // Bystanders: a namespace without anything, and one with Istio's rules but no sidecar.
    let bare = Netns::new("dbare").expect("netns");
    let orphan = Netns::new("dorph").expect("netns");
    install_istio_capture(&orphan, &CaptureConfig::default()).expect("capture rules");

    // The admin API alone, as discovery reads it: the bootstrap's ports.
    for envoy in [&pods.client_envoy, &pods.server_envoy] {
        let boot = envoy.config();
        let ns = std::fs::File::open(
            Path::new("/proc")
                .join(envoy.pid().to_string())
                .join("ns/net"),
        )
        .expect("envoy netns");
        let admin = SocketAddrV4::new(Ipv4Addr::LOCALHOST, boot.admin_port);
        let facts = envoy_admin::fetch(&ns, admin, Duration::from_secs(5)).expect("admin API");
        assert_eq!(
            (facts.outbound_port, facts.inbound_port),
            (boot.outbound_port, boot.inbound_port)
        );
    }

    let started = std::time::Instant::now();
    let d = discovery::discover(&discovery::Options::default()).unwrap();
    eprintln!(
        "discovery pass: {:?} for {} pods, {} skipped on the node",
        started.elapsed(),
        d.pods.len(),
        d.skipped.len()
    );
    let (found, skipped) = mine(&d, &[&pods.client.ns, &pods.server.ns, &bare, &orphan]);
    assert_eq!(found.len(), 2, "exactly the two sidecar pods: {d:#?}");
    let by_ns = |ns: &Netns| {
        found
            .iter()
            .find(|p| p.netns == ns.path())
            .unwrap_or_else(|| panic!("{} not discovered: {d:#?}", ns.name()))
    };
    assert_learned(
        by_ns(&pods.client.ns),
        &pods.client.ns,
        &pods.client_envoy,
        &pods.client.capture,
    );
    assert_learned(
        by_ns(&pods.server.ns),
        &pods.server.ns,
        &pods.server_envoy,
        &pods.server.capture,
    );
    assert_eq!(
        skipped
            .iter()
            .map(|s| (s.netns.clone(), s.reason))
            .collect::<Vec<_>>(),
        vec![(orphan.path(), Reason::NoSidecar)],
        "only the namespace with rules and no sidecar is reported: {skipped:#?}"
    );
    let notes: Vec<_> = d
        .notes
        .iter()
        .filter(|n| found.iter().any(|p| p.name == n.pod))
        .collect();
    assert!(
        notes.is_empty(),
        "iptables and the admin API agree: {notes:#?}"
    );
}

/// istio-init settings other than the defaults: uid/gid, capture ports, excluded ports and a
/// range.
fn custom_capture() -> CaptureConfig {
    CaptureConfig {
        proxy_uid: 1400,
        proxy_gid: 1401,
        outbound_port: 15011,
        inbound_port: 15016,
        exclude_outbound_ports: vec![9000, 9443],
        exclude_inbound_ports: vec![15090, 8081],
        exclude_outbound_cidrs: vec![(Ipv4Addr::new(10, 99, 0, 0), 16)],
        ..CaptureConfig::default()
    }
}

/// The sidecar for [`custom_capture`], with its admin API on 15100 instead of 15000.
fn custom_envoy(ns: &Netns, capture: &CaptureConfig) -> Envoy {
    Envoy::spawn(
        ns,
        &EnvoyConfig {
            admin_port: 15100,
            ..EnvoyConfig::for_capture(capture)
        },
    )
    .expect("Envoy")
}

#[test]
fn non_default_capture_is_learned_from_the_node() {
    let Some(_serial) = Accel::cgroup_only("discovery_custom_pod") else {
        return;
    };
    let capture = custom_capture();
    let ns = Netns::new("dcust").expect("netns");
    install_istio_capture(&ns, &capture).expect("capture rules");
    let envoy = custom_envoy(&ns, &capture);

    let d = discovery::discover(&discovery::Options::default()).unwrap();
    let (found, skipped) = mine(&d, &[&ns]);
    assert!(skipped.is_empty(), "{skipped:#?}");
    assert_eq!(found.len(), 1, "{d:#?}");
    assert_learned(&found[0], &ns, &envoy, &capture);
}

#[test]
fn iptables_wins_when_the_admin_api_disagrees() {
    let Some(_serial) = Accel::cgroup_only("discovery_disagree") else {
        return;
    };
    // istio-init redirects to 15001, but the sidecar's outbound listener is on 15011.
    let ns = Netns::new("ddis").expect("netns");
    install_istio_capture(&ns, &CaptureConfig::default()).expect("capture rules");
    let _envoy = Envoy::spawn(
        &ns,
        &EnvoyConfig {
            outbound_port: 15011,
            ..EnvoyConfig::default()
        },
    )
    .expect("Envoy");
    let d = discovery::discover(&discovery::Options::default()).unwrap();
    let (found, skipped) = mine(&d, &[&ns]);
    assert!(skipped.is_empty(), "{skipped:#?}");
    assert_eq!(found.len(), 1, "{d:#?}");
    assert_eq!(
        (found[0].outbound_port, found[0].inbound_port),
        (15001, 15006)
    );
    let notes: Vec<&str> = d
        .notes
        .iter()
        .filter(|n| n.pod == found[0].name)
        .map(|n| n.message.as_str())
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("iptables redirects to 15001")
                && n.contains("outbound listener is on 15011")),
        "{notes:#?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("does not listen on the outbound capture port 15001")),
        "{notes:#?}"
    );
}

#[test]
fn envoy_without_capture_rules_is_not_a_pod() {
    let Some(_serial) = Accel::cgroup_only("discovery_gateway") else {
        return;
    };
    // Like an ingress gateway: Envoy as uid 1337 in its own namespace, no istio-init.
    let ns = Netns::new("dgw").expect("netns");
    let _envoy = Envoy::spawn(&ns, &EnvoyConfig::default()).expect("Envoy");
    let d = discovery::discover(&discovery::Options::default()).unwrap();
    let (found, skipped) = mine(&d, &[&ns]);
    assert!(found.is_empty(), "{found:#?}");
    assert_eq!(skipped.len(), 1, "{skipped:#?}");
    assert_eq!(skipped[0].reason, Reason::NotCaptured, "{skipped:#?}");
}

/// istio-init images on older nodes write with the legacy backend, which the nft-backed
/// `iptables-save` does not show: discovery reads both backends, as istio-iptables does.
#[test]
fn legacy_backend_capture_is_read_too() {
    let Some(_serial) = Accel::cgroup_only("discovery_legacy") else {
        return;
    };
    let ns = Netns::new("dleg").expect("netns");
    let capture = CaptureConfig::default();
    let mut restore = ns.cmd("iptables-legacy-restore");
    restore.arg("--wait=10").stdin(std::process::Stdio::piped());
    let mut child = restore.spawn().expect("run iptables-legacy-restore");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(minimesh::capture_rules(&capture).as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "iptables-legacy-restore");
    let nft = ns
        .cmd("iptables-nft-save")
        .output()
        .expect("iptables-nft-save");
    assert!(
        !String::from_utf8_lossy(&nft.stdout).contains(":ISTIO_"),
        "the nft backend must not show the legacy rules, or this tests nothing"
    );
    let envoy = Envoy::spawn(&ns, &EnvoyConfig::default()).expect("Envoy");
    let d = discovery::discover(&discovery::Options::default()).unwrap();
    let (found, skipped) = mine(&d, &[&ns]);
    assert!(skipped.is_empty(), "{skipped:#?}");
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_learned(&found[0], &ns, &envoy, &capture);
}

/// Istio's native nftables mode (`values.global.nativeNftables`): its `inet istio-proxy-nat`
/// table and no iptables ISTIO_* chains. Read with the real `nft -j`, the pod is learned as
/// the same settings in iptables form are.
#[test]
fn nftables_capture_is_read_like_iptables() {
    let Some(_serial) = Accel::cgroup_only("discovery_nftables") else {
        return;
    };
    let capture = custom_capture();
    let ns = Netns::new("dnft").expect("netns");
    minimesh::install_istio_nftables_capture(&ns, &capture, false).expect("nftables capture");
    let saved = ns.cmd("iptables-save").output().expect("iptables-save");
    assert!(
        !String::from_utf8_lossy(&saved.stdout).contains("ISTIO_"),
        "iptables must not show the nftables capture, or this tests nothing"
    );
    let envoy = custom_envoy(&ns, &capture);
    // A table of that name without Istio's chains is not a capture meshlane can read.
    let empty = Netns::new("dnfe").expect("netns");
    let status = empty
        .cmd("nft")
        .args(["add", "table", "inet", "istio-proxy-nat"])
        .status()
        .expect("run nft");
    assert!(status.success(), "nft add table: {status}");
    let _envoy2 = Envoy::spawn(&empty, &EnvoyConfig::default()).expect("Envoy");

    let d = discovery::discover(&discovery::Options::default()).unwrap();
    let (found, skipped) = mine(&d, &[&ns, &empty]);
    assert_eq!(found.len(), 1, "{d:#?}");
    let mut pod = found[0].clone();
    // nft keeps a port set sorted; the order carries no meaning.
    let mut want = expected_inbound_excludes(&capture);
    want.sort();
    pod.exclude_inbound_ports.sort();
    assert_eq!(pod.exclude_inbound_ports, want, "{pod:?}");
    pod.exclude_inbound_ports = expected_inbound_excludes(&capture);
    assert_learned(&pod, &ns, &envoy, &capture);
    assert!(
        d.notes
            .iter()
            .any(|n| n.pod == pod.name && n.message.contains("nftables")),
        "the pod's status says where its rules came from: {:#?}",
        d.notes
    );
    assert_eq!(skipped.len(), 1, "{skipped:#?}");
    assert_eq!(skipped[0].netns, empty.path(), "{skipped:#?}");
    assert_eq!(skipped[0].reason, Reason::BadCapture, "{skipped:#?}");
    assert!(
        skipped[0].detail.contains("istio-proxy-nat"),
        "{skipped:#?}"
    );
}

#[test]
fn unreachable_admin_api_is_a_named_reason() {
    let Some(_serial) = Accel::cgroup_only("discovery_admin_unreachable") else {
        return;
    };
    let ns = Netns::new("dnoadm").expect("netns");
    install_istio_capture(&ns, &CaptureConfig::default()).expect("capture rules");
    let _envoy = Envoy::spawn(&ns, &EnvoyConfig::default()).expect("Envoy");
    // A short timeout: an unreachable sidecar must not stall the pass.
    let opts = discovery::Options {
        admin_timeout: Duration::from_millis(500),
        ..discovery::Options::default()
    };
    // Block the admin port from inside the pod: a REJECT for lo:15000 in the filter table.
    iptables(
        &ns,
        "-A OUTPUT -o lo -p tcp --dport 15000 -j REJECT --reject-with tcp-reset",
    );
    let d = discovery::discover(&opts).unwrap();
    let (found, skipped) = mine(&d, &[&ns]);
    assert!(found.is_empty(), "{found:#?}");
    assert_eq!(skipped.len(), 1, "{skipped:#?}");
    assert_eq!(skipped[0].reason, Reason::AdminUnreachable, "{skipped:#?}");
    assert!(
        skipped[0].detail.contains("127.0.0.1:15000"),
        "{skipped:#?}"
    );
    // What the rules said is shown for the declined pod too.
    assert_eq!(
        skipped[0].derived,
        Some(discovery::Derived {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
        }),
        "{skipped:#?}"
    );
}

/// A sidecar whose admin API does not answer yet (what a restarted Envoy looks like for its
/// first moments) is read again within seconds, not after the whole refresh: a long refresh
/// once left a restarted benchmark sidecar unaccelerated for 30 s after it was ready.
#[test]
fn a_sidecar_not_ready_yet_is_read_again_soon() {
    let Some(_serial) = Accel::cgroup_only("discovery_not_ready") else {
        return;
    };
    let (_envoy, ns) = one_pod("dnready");
    let opts = discovery::Options {
        admin_timeout: Duration::from_millis(500),
        ..discovery::Options::default()
    };
    let mut disc = discovery::Discoverer::new(opts, Duration::from_secs(600));
    let block = "OUTPUT -o lo -p tcp --dport 15000 -j REJECT --reject-with tcp-reset";
    iptables(&ns, &format!("-A {block}"));
    let reasons = |d: &Discovery| -> (usize, Vec<Reason>) {
        let (found, skipped) = mine(d, &[&ns]);
        (found.len(), skipped.iter().map(|s| s.reason).collect())
    };
    assert_eq!(
        reasons(&disc.pass().unwrap()),
        (0, vec![Reason::AdminUnreachable])
    );
    // The admin API answers from now on. Straight away the reading still stands (no admin
    // request per pass for a sidecar that is starting) ...
    iptables(&ns, &format!("-D {block}"));
    assert_eq!(
        reasons(&disc.pass().unwrap()),
        (0, vec![Reason::AdminUnreachable])
    );
    // ... and after the first retry interval (1 s) the pod is found, 600 s refresh or not.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(reasons(&disc.pass().unwrap()), (1, vec![]));
    // A ready pod's reading is kept for the refresh again: a change in its rules is not seen.
    iptables(
        &ns,
        "-t nat -I ISTIO_OUTPUT 1 -p tcp --dport 9000 -j RETURN",
    );
    std::thread::sleep(Duration::from_millis(1200));
    let d = disc.pass().unwrap();
    let (found, _) = mine(&d, &[&ns]);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].exclude_outbound_ports.is_empty(), "{found:#?}");
}

#[test]
fn tproxy_pod_is_skipped_with_its_reason() {
    let Some(_serial) = Accel::cgroup_only("discovery_tproxy") else {
        return;
    };
    let ns = Netns::new("dtpx").expect("netns");
    install_istio_capture(&ns, &CaptureConfig::default()).expect("capture rules");
    // The inbound half of istio-iptables' TPROXY mode (mangle table), as its golden files show.
    iptables(&ns, "-t mangle -N ISTIO_TPROXY");
    iptables(
        &ns,
        "-t mangle -A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
    );
    let _envoy = Envoy::spawn(&ns, &EnvoyConfig::default()).expect("Envoy");
    let d = discovery::discover(&discovery::Options::default()).unwrap();
    let (found, skipped) = mine(&d, &[&ns]);
    assert!(found.is_empty(), "{found:#?}");
    assert_eq!(skipped.len(), 1, "{skipped:#?}");
    assert_eq!(skipped[0].reason, Reason::Tproxy, "{skipped:#?}");
    assert!(
        skipped[0].detail.contains("TPROXY --on-port 15006"),
        "{skipped:#?}"
    );
}

/// One namespace with Istio's default rules and an Envoy sidecar.
/// A dual-stack pod: istio-iptables with IPv6 enabled writes the same capture to ip6tables,
/// and discovery reads it from there (IPv6 capture on, the IPv6 ranges added); where the two
/// families disagree, the IPv6 hops are left alone and a note says why.
#[test]
fn dual_stack_capture_is_read_from_ip6tables_too() {
    let Some(_serial) = Accel::cgroup_only("discovery_dual_stack") else {
        return;
    };
    let capture = CaptureConfig {
        exclude_outbound_cidrs: vec![(Ipv4Addr::new(10, 99, 0, 0), 16)],
        exclude_outbound_cidrs6: vec![("fd00:99::".parse().unwrap(), 64)],
        ..CaptureConfig::default()
    };
    let ns = Netns::new("ddual").expect("netns");
    install_istio_capture(&ns, &capture).expect("capture rules");
    minimesh::capture::install_istio_capture6(&ns, &capture).expect("IPv6 capture rules");
    let _envoy = Envoy::spawn(&ns, &EnvoyConfig::for_capture(&capture)).expect("Envoy");
    let d = discovery::discover(&discovery::Options::default()).unwrap();
    let (found, skipped) = mine(&d, &[&ns]);
    assert!(skipped.is_empty(), "{skipped:#?}");
    assert_eq!(found.len(), 1, "{d:#?}");
    let pod = &found[0];
    assert!(pod.capture_ipv6, "{pod:#?}");
    let cidrs: Vec<String> = pod
        .exclude_outbound_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(cidrs, ["10.99.0.0/16", "fd00:99::/64"], "{pod:#?}");
    let p = meshlane::policy::pod_policy(pod).expect("policy");
    assert_ne!(p.flags & meshlane_common::POLICY_IPV6, 0);
    assert_eq!((p.n_exclude_cidrs, p.n_exclude_cidrs6), (1, 1));

    // ip6tables that exclude another port: the pod keeps its IPv4 hops, not its IPv6 ones.
    let status = ns
        .cmd("ip6tables")
        .args([
            "-t",
            "nat",
            "-I",
            "ISTIO_OUTPUT",
            "1",
            "-p",
            "tcp",
            "--dport",
            "7777",
            "-j",
            "RETURN",
        ])
        .status()
        .expect("run ip6tables");
    assert!(status.success());
    let d = discovery::discover(&discovery::Options::default()).unwrap();
    let (found, _) = mine(&d, &[&ns]);
    assert_eq!(found.len(), 1, "{d:#?}");
    assert!(!found[0].capture_ipv6, "{:#?}", found[0]);
    assert!(found[0].accelerate_outbound && found[0].accelerate_inbound);
    let name = &found[0].name;
    assert!(
        d.notes.iter().any(|n| &n.pod == name
            && n.message.contains("IPv6 hops not accelerated")
            && n.message.contains("excluded outbound ports")),
        "{:#?}",
        d.notes
    );

    // An IPv4-only pod (no ip6tables capture) is simply IPv4-only, without a note.
    let (_envoy4, ns4) = one_pod("dv4");
    let d = discovery::discover(&discovery::Options::default()).unwrap();
    let (found, _) = mine(&d, &[&ns4]);
    assert!(!found[0].capture_ipv6);
    assert!(!d
        .notes
        .iter()
        .any(|n| n.pod == found[0].name && n.message.contains("IPv6")));
}

fn one_pod(prefix: &str) -> (Envoy, Netns) {
    let ns = Netns::new(prefix).expect("netns");
    install_istio_capture(&ns, &CaptureConfig::default()).expect("capture rules");
    let envoy = Envoy::spawn(&ns, &EnvoyConfig::default()).expect("Envoy");
    (envoy, ns)
}

#[test]
fn cached_readings_are_refreshed_when_the_sidecar_changes() {
    let Some(_serial) = Accel::cgroup_only("discovery_cache") else {
        return;
    };
    let (envoy, ns) = one_pod("dcache");
    let mut disc =
        discovery::Discoverer::new(discovery::Options::default(), Duration::from_secs(600));
    let ports = |d: &Discovery| -> Vec<Vec<u16>> {
        mine(d, &[&ns])
            .0
            .iter()
            .map(|p| p.exclude_outbound_ports.clone())
            .collect()
    };
    assert_eq!(ports(&disc.pass().unwrap()), vec![Vec::<u16>::new()]);
    iptables(
        &ns,
        "-t nat -I ISTIO_OUTPUT 1 -p tcp --dport 9000 -j RETURN",
    );
    // Within `refresh` and with the same sidecar, the cached reading stands ...
    assert_eq!(ports(&disc.pass().unwrap()), vec![Vec::<u16>::new()]);
    // ... while a fresh pass sees the new exclusion.
    assert_eq!(
        ports(&discovery::discover(&discovery::Options::default()).unwrap()),
        vec![vec![9000]]
    );
    // A restarted sidecar (new pid) is read afresh.
    drop(envoy);
    let envoy = Envoy::spawn(&ns, &EnvoyConfig::default()).expect("Envoy again");
    assert_eq!(ports(&disc.pass().unwrap()), vec![vec![9000]]);
    // A sidecar that is gone leaves a namespace with rules and no proxy.
    drop(envoy);
    let d = disc.pass().unwrap();
    let (found, skipped) = mine(&d, &[&ns]);
    assert!(found.is_empty(), "{found:#?}");
    assert_eq!(
        skipped.iter().map(|s| s.reason).collect::<Vec<_>>(),
        vec![Reason::NoSidecar]
    );
}

#[test]
fn the_pod_list_file_wins_over_discovery() {
    let Some(_serial) = Accel::cgroup_only("discovery_pod_list") else {
        return;
    };
    let (envoy_a, ns_a) = one_pod("dfilea");
    let (_envoy_b, ns_b) = one_pod("dfileb");
    // The file names pod A by another path to the same namespace, and opts pod B out.
    let text = format!(
        "[[pod]]\nname = \"file/a\"\nnetns = \"/proc/{}/ns/net\"\nexclude_outbound_ports = [5432]\n\n\
         [[pod]]\nname = \"file/b\"\nnetns = \"{}\"\naccelerate = false\n",
        envoy_a.pid(),
        ns_b.path().display()
    );
    let list = meshlane::config::parse_all(Path::new("pods.toml"), &text).expect("pod list");
    let d = discovery::discover(&discovery::Options::default())
        .unwrap()
        .with_pod_list(list);
    let (found, skipped) = mine(&d, &[&ns_a, &ns_b]);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].name, "file/a");
    assert_eq!(found[0].exclude_outbound_ports, vec![5432]);
    assert_eq!(skipped.len(), 1, "{skipped:#?}");
    assert_eq!(
        (skipped[0].name.as_str(), skipped[0].reason),
        ("file/b", Reason::OptedOut)
    );
    assert!(
        d.notes
            .iter()
            .any(|n| n.pod == "file/a" && n.message.contains(&format!("default/{}", ns_a.name()))),
        "{:#?}",
        d.notes
    );
}

#[test]
fn discovered_pods_are_accelerated_end_to_end() {
    let Some(mut accel) = Accel::new("discovery_end_to_end") else {
        return;
    };
    let pods = EnvoyPods::new(162, &[("echo".into(), ECHO, Protocol::Tcp)]).expect("Envoy pods");
    let dst = pods.service_addr(ECHO);
    let _echo = EchoServer::spawn(&pods.server.ns, dst).expect("echo server");

    let d = discovery::discover(&discovery::Options::default()).unwrap();
    let (found, _) = mine(&d, &[&pods.client.ns, &pods.server.ns]);
    assert_eq!(found.len(), 2, "{d:#?}");
    for pod in &found {
        accel.add_model_pod(pod);
    }
    let before = accel.counters();
    assert_eq!(before.pairs(), 0, "{before:?}");
    echo_streams(&pods.client.ns, dst, 4);
    let c = accel.counters();
    assert_accelerated("discovery_end_to_end", &c);
    // One app->sidecar and one sidecar->app pair per connection, none missed.
    assert_eq!(
        (c.get("pairs_outbound"), c.get("pairs_inbound")),
        (4, 4),
        "{c:?}"
    );
}

#[test]
fn the_daemon_finds_and_accelerates_envoy_pods_with_no_pod_list() {
    let Some(accel) = Accel::cgroup_only("daemon_local_discovery") else {
        return;
    };
    let pods = EnvoyPods::new(163, &[("echo".into(), ECHO, Protocol::Tcp)]).expect("Envoy pods");
    let dst = pods.service_addr(ECHO);
    let _echo = EchoServer::spawn(&pods.server.ns, dst).expect("echo server");
    let log = std::env::temp_dir().join(format!(
        "meshlane-discovery-daemon-{}.log",
        std::process::id()
    ));
    // `meshlane run` as a user would start it: no --config, discovery on by default.
    let mut daemon = Daemon(
        accel
            .daemon_command()
            .args(["--resync", "200ms"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start meshlane run"),
    );
    // Other tests may run sidecars on this node too: look only at this test's namespaces.
    let cookies = [
        pods.client.ns.cookie().unwrap(),
        pods.server.ns.cookie().unwrap(),
    ];
    let ours = |st: &serde_json::Value| status_pods(st, &cookies);
    accel.wait_ready();
    wait_until("both Envoy pods discovered and accelerated", || {
        ours(&try_status_json(&accel).unwrap_or_default())
            .iter()
            .filter(|p| p["state"] == "accelerated")
            .count()
            == 2
    });
    echo_streams(&pods.client.ns, dst, 4);
    let c = accel.counters();
    // All three hops: app -> client Envoy, client Envoy -> server Envoy (the sidecar hop, on by
    // default: both pods' addresses were read from their namespaces), server Envoy -> app.
    assert_eq!(
        (
            c.get("pairs_outbound"),
            c.get("pairs_inbound"),
            c.get("pairs_sidecar")
        ),
        (4, 4, 4),
        "{c:?}"
    );
    let st = status_json(&accel);
    let ips = [pods.client.ip.to_string(), pods.server.ip.to_string()];
    for p in ours(&st) {
        assert_eq!(
            p["counters"]["pairs_sidecar"], 4,
            "each pod counts the pair: {p}"
        );
        let own = p["pod_ips"].as_array().unwrap();
        assert!(
            own.len() == 1 && ips.contains(&own[0].as_str().unwrap().to_string()),
            "its address from its namespace: {p}"
        );
        assert_eq!(p["source"], "local", "{p}");
        assert_eq!(p["outbound_port"], 15001, "{p}");
        assert_eq!(p["inbound_port"], 15006, "{p}");
        assert_eq!(p["proxy_uid"], 1337, "{p}");
        assert!(!p["name"].as_str().unwrap().is_empty(), "{p}");
    }
    let local = st["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "local")
        .cloned()
        .unwrap_or_default();
    assert_eq!(local["healthy"], true, "{st:#}");
    let (_, metrics) = accel.http_get("/metrics").unwrap();
    assert_eq!(
        sample(&metrics, "meshlane_source_up{source=\"local\"}"),
        Some(1.0)
    );
    assert!(
        sample(&metrics, "meshlane_pairs_total{hop=\"sidecar\"}").is_some_and(|n| n >= 4.0),
        "{metrics}"
    );
    assert!(daemon.terminate().success());
    let _ = std::fs::remove_file(&log);
}

#[test]
fn excluded_namespaces_are_left_alone_and_say_why() {
    let Some(accel) = Accel::cgroup_only("daemon_namespace_exclude") else {
        return;
    };
    let pods = EnvoyPods::new(164, &[("echo".into(), ECHO, Protocol::Tcp)]).expect("Envoy pods");
    // minimesh's sidecars identify as pods of namespace "default".
    let mut daemon = Daemon(
        accel
            .daemon_command()
            .args([
                "--resync",
                "200ms",
                "--namespace-exclude",
                "kube-system,default",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start meshlane run"),
    );
    let cookies = [
        pods.client.ns.cookie().unwrap(),
        pods.server.ns.cookie().unwrap(),
    ];
    let inodes = [inode(&pods.client.ns.path()), inode(&pods.server.ns.path())];
    accel.wait_ready();
    // Skipped pods have no cookie in status: find ours by their namespace's identity.
    let ours = |st: &serde_json::Value| -> Vec<serde_json::Value> {
        st["pods"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter(|p| {
                        p["netns"]
                            .as_str()
                            .and_then(|n| std::fs::metadata(n).ok())
                            .is_some_and(|m| inodes.contains(&m.ino()))
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until("both pods listed as opted out", || {
        try_status_json(&accel).is_some_and(|st| {
            let o = ours(&st);
            o.len() == 2 && o.iter().all(|p| p["state"] == "not_accelerated")
        })
    });
    for p in ours(&status_json(&accel)) {
        let reason = p["reason"].as_str().unwrap();
        assert!(
            reason.contains("opted_out") && reason.contains("namespace default is excluded"),
            "{p}"
        );
    }
    let map = meshlane::datapath::pinned_pods(&accel.pin_dir).unwrap();
    assert!(
        cookies.iter().all(|c| !map.contains_key(c)),
        "an excluded pod reached the policy map"
    );
    assert!(daemon.terminate().success());
}
