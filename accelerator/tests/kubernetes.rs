//! The Kubernetes discovery source: pod JSON shaped as Istio's injector writes it mapped to the
//! model, and the kube-rs watcher against a small API server speaking the real list/watch
//! protocol (chunked watch streams, BOOKMARK events, a 410 Gone ERROR forcing a relist, API
//! failures). No kube-apiserver runs here: see the README for what this leaves untested.
//! The mapping and watcher tests need no privilege: pod network namespaces are found in a fake
//! /proc whose `ns/net` links point at a namespace. The daemon test (root) runs `meshlane run
//! --discovery kubernetes` against the same server and times watch event -> policy map.

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use meshlane::{
    discovery::{
        kubernetes::{self, Endpoint, Mapped, NamespaceFacts, Source},
        Reason, Wake,
    },
    model::{Cidr, OutboundRanges},
};
use serde_json::{json, Value};

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kube")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read fixture"))
        .expect("fixture is JSON")
}

fn map_ns(v: Value, ns: Option<&NamespaceFacts>) -> Mapped {
    let pod = kubernetes::decode(v).expect("decodes");
    kubernetes::map(&pod, ns).expect("a running pod is reported")
}

fn map(v: Value) -> Mapped {
    map_ns(v, None)
}

fn declined(m: &Mapped) -> (Reason, String) {
    let d = m.verdict.as_ref().expect_err("declined");
    (d.reason, d.detail.clone())
}

fn annotate(v: &mut Value, key: &str, value: &str) {
    v["metadata"]["annotations"][key] = json!(value);
}

// === mapping ===

#[test]
fn istio_init_injected_pod() {
    let m = map(fixture("injected-istio-init.json"));
    assert_eq!(m.name, "bookinfo/reviews-v1-5b5d6494f4-abcde");
    assert_eq!(m.uid, "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
    assert_eq!(
        m.ips,
        vec![
            "10.244.1.17".parse::<std::net::IpAddr>().unwrap(),
            "fd00:10:244:1::11".parse().unwrap()
        ]
    );
    let p = m.verdict.expect("accelerated");
    // The model carries the identity too: it is the single input to policy.
    assert_eq!((&p.uid, &p.ips), (&m.uid, &m.ips));
    assert_eq!(p.interception, meshlane::model::Interception::Redirect);
    assert_eq!((p.proxy_uid, p.proxy_gid), (1337, 1337));
    assert_eq!((p.outbound_port, p.inbound_port), (15001, 15006));
    // -d, plus the inbound tunnel port istio-iptables always returns.
    assert_eq!(p.exclude_inbound_ports, vec![15090, 15021, 15020, 15008]);
    assert!(p.exclude_outbound_ports.is_empty() && p.exclude_outbound_cidrs.is_empty());
    assert_eq!(p.include_outbound, OutboundRanges::All);
    assert!(p.accelerate_inbound && p.accelerate_outbound);
    assert!(p.include_inbound_ports.is_empty(), "includeInboundPorts *");
    // The fixture is dual-stack without ISTIO_DUAL_STACK: IPv4 capture only, said once.
    assert!(!p.capture_ipv6);
    assert_eq!(m.notes.len(), 1, "{:?}", m.notes);
    assert!(m.notes[0].contains("ISTIO_DUAL_STACK"), "{:?}", m.notes);
}

/// istio-iptables also reads its settings from istio-init's environment (`flag.BindEnv`), for
/// the flags its arguments leave unset; the arguments win. Owner groups are environment-only.
#[test]
fn istio_init_environment_is_read_like_istio_iptables() {
    let init = |v: &mut Value| -> usize {
        v["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .position(|c| c["name"] == "istio-init")
            .unwrap()
    };
    let mut v = fixture("injected-istio-init.json");
    let i = init(&mut v);
    v["spec"]["initContainers"][i]["env"] = json!([
        {"name": "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "value": "9000,9001"},
        {"name": "PROXY_GID", "value": "1400"},
        // The arguments say -u 1337, -z 15006 and -x '' (set, empty): they win.
        {"name": "PROXY_UID", "value": "4242"},
        {"name": "INBOUND_CAPTURE_PORT", "value": "15999"},
        {"name": "ISTIO_SERVICE_EXCLUDE_CIDR", "value": "10.96.0.0/12"},
    ]);
    let p = map(v).verdict.expect("accelerated");
    assert_eq!(p.exclude_outbound_ports, vec![9000, 9001]);
    assert_eq!((p.proxy_uid, p.proxy_gid), (1337, 1400));
    assert_eq!(p.inbound_port, 15006);
    assert!(p.exclude_outbound_cidrs.is_empty(), "{p:?}");

    // Capture by the process's group is not modelled: the outbound hop is off, and says why.
    let mut v = fixture("injected-istio-init.json");
    let i = init(&mut v);
    v["spec"]["initContainers"][i]["env"] =
        json!([{"name": "ISTIO_OUTBOUND_OWNER_GROUPS", "value": "1000,1001"}]);
    let m = map(v);
    let p = m.verdict.as_ref().expect("accelerated");
    assert!(!p.accelerate_outbound && p.accelerate_inbound);
    assert!(
        m.notes
            .iter()
            .any(|n| n.contains("ISTIO_OUTBOUND_OWNER_GROUPS")),
        "{:?}",
        m.notes
    );
    let mut v = fixture("injected-istio-init.json");
    let i = init(&mut v);
    v["spec"]["initContainers"][i]["env"] =
        json!([{"name": "ISTIO_OUTBOUND_OWNER_GROUPS", "value": "*"}]);
    assert!(map(v).verdict.expect("accelerated").accelerate_outbound);

    // A value from a reference cannot be read: declined, naming the variable.
    let mut v = fixture("injected-istio-init.json");
    let i = init(&mut v);
    v["spec"]["initContainers"][i]["env"] = json!([{"name": "ISTIO_OUTBOUND_PORTS",
        "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]);
    let (r, d) = declined(&map(v));
    assert_eq!(r, Reason::BadResource);
    assert!(
        d.contains("ISTIO_OUTBOUND_PORTS") && d.contains("valueFrom"),
        "{d}"
    );
}

#[test]
fn native_sidecar_pod() {
    let m = map(fixture("native-sidecar.json"));
    let p = m.verdict.expect("accelerated");
    assert_eq!(p.proxy_uid, 1337);
    assert!(
        m.notes.iter().any(|n| n.contains("native sidecar")),
        "{:?}",
        m.notes
    );
    // An istio-proxy init container that is not restartPolicy Always is not a sidecar.
    let mut v = fixture("native-sidecar.json");
    v["spec"]["initContainers"][1]
        .as_object_mut()
        .unwrap()
        .remove("restartPolicy");
    let (r, d) = declined(&map(v));
    assert_eq!(r, Reason::NoSidecar);
    assert!(d.contains("sidecar.istio.io/status"), "{d}");
}

/// With istio-cni there is no istio-init: the CNI plugin writes the rules from the pod's
/// annotations and its own defaults (istio-cni's `NewRedirect`), and istio-validation only checks
/// them, so its arguments never decide.
#[test]
fn istio_cni_pod_follows_the_plugin_annotations_and_defaults() {
    let m = map(fixture("istio-cni.json"));
    let p = m.verdict.expect("accelerated");
    assert_eq!(p.exclude_outbound_ports, vec![5432]);
    assert_eq!(
        p.exclude_outbound_cidrs,
        vec!["169.254.169.254/32".parse::<Cidr>().unwrap()]
    );
    // The annotation's 15020, then the ports the plugin always adds, then the tunnel port.
    assert_eq!(p.exclude_inbound_ports, vec![15020, 15021, 15090, 15008]);
    assert!(
        m.notes.iter().any(|n| n.contains("istio-cni")),
        "{:?}",
        m.notes
    );
    // istio-validation's arguments saying otherwise change nothing.
    let mut v = fixture("istio-cni.json");
    let args = v["spec"]["initContainers"][0]["args"]
        .as_array_mut()
        .unwrap();
    let o = args.iter().position(|a| a == "-o").unwrap();
    args[o + 1] = json!("9999");
    assert_eq!(
        map(v).verdict.expect("accelerated").exclude_outbound_ports,
        vec![5432]
    );
    // No annotations: the plugin's defaults exclude its status port both ways.
    let mut v = fixture("istio-cni.json");
    for key in [
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "traffic.sidecar.istio.io/excludeInboundPorts",
    ] {
        v["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(key);
    }
    let p = map(v).verdict.expect("accelerated");
    assert_eq!(p.exclude_outbound_ports, vec![15020]);
    assert_eq!(p.exclude_inbound_ports, vec![15020, 15021, 15090, 15008]);
    // The plugin skips a pod the injector did not mark: nothing is captured around its proxy.
    let mut v = fixture("istio-cni.json");
    v["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("sidecar.istio.io/status");
    let (r, d) = declined(&map(v));
    assert_eq!(r, Reason::NotCaptured);
    assert!(d.contains("sidecar.istio.io/status"), "{d}");
    // Without istio-validation only the annotations are left.
    let mut v = fixture("istio-cni.json");
    v["spec"]["initContainers"] = json!([]);
    annotate(
        &mut v,
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "5432, 6379",
    );
    annotate(
        &mut v,
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "10.96.0.0/12,fd00::/108",
    );
    let m = map(v);
    let p = m.verdict.clone().expect("accelerated");
    assert_eq!(p.exclude_outbound_ports, vec![5432, 6379]);
    assert_eq!(p.exclude_inbound_ports, vec![15020, 15021, 15090, 15008]);
    // Both families' ranges: istio-iptables writes each to its family's rules.
    assert_eq!(
        p.include_outbound,
        OutboundRanges::Only(vec![
            "10.96.0.0/12".parse().unwrap(),
            "fd00::/108".parse().unwrap()
        ])
    );
}

/// istio-iptables captures IPv6 when the pod's first address is IPv6 (an IPv6-only pod), or,
/// with ISTIO_DUAL_STACK=true, when it has one at all (`getLocalIP`); a dual-stack pod without
/// it is captured for IPv4 only, and its IPv6 hops must not be predicted as captured.
#[test]
fn ipv6_capture_follows_istio_iptables_rule() {
    let dual = fixture("injected-istio-init.json");
    let m = map(dual.clone());
    assert!(!m.verdict.clone().expect("accelerated").capture_ipv6);
    assert!(
        m.notes.iter().any(|n| n.contains("ISTIO_DUAL_STACK")),
        "{:?}",
        m.notes
    );
    for (i, c) in ["initContainers", "containers"].iter().enumerate() {
        let mut v = dual.clone();
        let env = &mut v["spec"][c][0]["env"];
        if env.is_null() {
            *env = json!([]);
        }
        env.as_array_mut()
            .expect("env")
            .push(json!({"name": "ISTIO_DUAL_STACK", "value": "true"}));
        let m = map(v);
        assert!(m.verdict.expect("accelerated").capture_ipv6, "case {i}");
        assert!(!m.notes.iter().any(|n| n.contains("ISTIO_DUAL_STACK")));
    }
    let mut v6 = dual.clone();
    v6["status"]["podIP"] = json!("fd00:10:244:1::11");
    v6["status"]["podIPs"] = json!([{"ip": "fd00:10:244:1::11"}]);
    assert!(map(v6).verdict.expect("accelerated").capture_ipv6);
    let mut v4 = dual;
    v4["status"]["podIPs"] = json!([{"ip": "10.244.1.17"}]);
    let m = map(v4);
    assert!(!m.verdict.expect("accelerated").capture_ipv6);
    assert!(!m.notes.iter().any(|n| n.contains("IPv6")), "{:?}", m.notes);
}

/// includeInboundPorts as a list is the set of ports inbound capture covers (the sidecar hop is
/// stamped only toward them); `*` anywhere in it means every port.
#[test]
fn an_inbound_port_list_is_modelled() {
    let mut v = fixture("injected-istio-init.json");
    v["spec"]["initContainers"] = json!([]);
    annotate(
        &mut v,
        "traffic.sidecar.istio.io/includeInboundPorts",
        "8080, 9090",
    );
    let p = map(v.clone()).verdict.expect("accelerated");
    assert_eq!(p.include_inbound_ports, vec![8080, 9090]);
    assert!(p.accelerate_inbound);
    annotate(
        &mut v,
        "traffic.sidecar.istio.io/includeInboundPorts",
        "8080,*",
    );
    let p = map(v).verdict.expect("accelerated");
    assert!(p.include_inbound_ports.is_empty());
}

#[test]
fn capture_arguments_win_and_name_their_flag() {
    let mut v = fixture("injected-istio-init.json");
    v["spec"]["initContainers"][0]["args"] = json!([
        "istio-iptables",
        "-p",
        "15101",
        "-z",
        "15106",
        "-u",
        "2000",
        "-g",
        "3000",
        "-m",
        "REDIRECT",
        "-i",
        "10.0.0.0/8",
        "-x",
        "10.1.0.0/16",
        "-b",
        "",
        "-d",
        "15090,15021,15020",
        "-o",
        "25,587",
        "--log_output_level=default:info"
    ]);
    v["spec"]["containers"][1]["securityContext"]["runAsUser"] = json!(2000);
    let m = map(v.clone());
    let p = m.verdict.expect("accelerated");
    assert_eq!((p.proxy_uid, p.proxy_gid), (2000, 3000));
    assert_eq!((p.outbound_port, p.inbound_port), (15101, 15106));
    assert_eq!(p.exclude_outbound_ports, vec![25, 587]);
    assert_eq!(
        p.include_outbound,
        OutboundRanges::Only(vec!["10.0.0.0/8".parse().unwrap()])
    );
    assert!(!p.accelerate_inbound, "-b '' captures no inbound port");
    // DNS capture: TCP 53 goes to the agent (the flag, or the sidecar's env with istio-cni).
    let mut dns = v.clone();
    dns["spec"]["initContainers"][0]["args"]
        .as_array_mut()
        .unwrap()
        .push(json!("--redirect-dns"));
    let p = map(dns).verdict.expect("accelerated");
    assert_eq!(p.exclude_outbound_ports, vec![25, 587, 53]);
    let mut dns = fixture("istio-cni.json");
    dns["spec"]["initContainers"] = json!([]);
    dns["spec"]["containers"][1]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}));
    let p = map(dns).verdict.expect("accelerated");
    assert_eq!(p.exclude_outbound_ports, vec![5432, 53]);
    // The sidecar running as another uid than -u: -u (what iptables exempts) wins, with a note.
    v["spec"]["containers"][1]["securityContext"]["runAsUser"] = json!(1337);
    let m = map(v.clone());
    assert_eq!(m.verdict.as_ref().unwrap().proxy_uid, 2000);
    assert!(
        m.notes.iter().any(|n| n.contains("-u exempts 2000")),
        "{:?}",
        m.notes
    );
    // A bad value names the container and flag.
    v["spec"]["initContainers"][0]["args"][2] = json!("fifteen");
    let (r, d) = declined(&map(v));
    assert_eq!(r, Reason::BadResource);
    assert!(
        d.contains("spec.initContainers[0] (istio-init) args -p") && d.contains("fifteen"),
        "{d}"
    );
}

/// istio-iptables' own flag names (tools/istio-iptables/pkg/cmd/root.go): `-q` is
/// `--istio-outbound-ports`, `-c` is `--istio-exclude-interfaces`, booleans never take the next
/// word, and a flag it does not have declines the pod, naming the flag.
#[test]
fn capture_flags_are_istio_iptables_own() {
    let with_args = |args: Value| {
        let mut v = fixture("injected-istio-init.json");
        v["spec"]["initContainers"][0]["args"] = args;
        map(v)
    };
    for args in [
        json!(["istio-iptables", "-p", "15001", "-q", "8080"]),
        json!(["istio-iptables", "--istio-outbound-ports=8080"]),
        json!(["istio-iptables", "--istio-outbound-ports", "8080"]),
    ] {
        let m = with_args(args.clone());
        let p = m.verdict.as_ref().expect("accelerated");
        assert!(!p.accelerate_outbound, "{args}: an outbound include list");
        assert!(p.accelerate_inbound, "{args}");
        assert!(
            m.notes.iter().any(|n| n.contains("include list")),
            "{args}: {:?}",
            m.notes
        );
    }
    // -c: traffic through those NICs is never captured; outbound is not predicted.
    for args in [
        json!(["istio-iptables", "-c", "eth1"]),
        json!(["istio-iptables", "--istio-exclude-interfaces=eth1,eth2"]),
    ] {
        let m = with_args(args.clone());
        let p = m.verdict.as_ref().expect("accelerated");
        assert!(!p.accelerate_outbound, "{args}: excluded interfaces");
        assert!(
            m.notes.iter().any(|n| n.contains("interfaces")),
            "{args}: {:?}",
            m.notes
        );
    }
    // The same from istio-cni's annotation, and an empty list changes nothing.
    let mut v = fixture("istio-cni.json");
    v["spec"]["initContainers"] = json!([]);
    annotate(&mut v, "traffic.sidecar.istio.io/excludeInterfaces", "eth1");
    assert!(!map(v).verdict.expect("accelerated").accelerate_outbound);
    let p = with_args(json!(["istio-iptables", "-c", ""]))
        .verdict
        .expect("accelerated");
    assert!(p.accelerate_outbound);
    // Booleans take no value: -p after them is still read.
    let p = with_args(json!([
        "istio-iptables",
        "--iptables-trace-logging",
        "--run-validation",
        "--redirect-dns=false",
        "-p",
        "15101",
        "--log_output_level",
        "default:debug",
        "-z",
        "15106"
    ]))
    .verdict
    .expect("accelerated");
    assert_eq!((p.outbound_port, p.inbound_port), (15101, 15106));
    // Istio's nftables backend (`values.global.nativeNftables`) is the same capture in an nft
    // table: accelerated, and said.
    let m = with_args(json!([
        "istio-iptables",
        "--native-nftables",
        "-p",
        "15001",
        "-z",
        "15006"
    ]));
    let p = m.verdict.as_ref().expect("accelerated");
    assert!(p.accelerate_outbound && p.accelerate_inbound);
    assert!(
        m.notes.iter().any(|n| n.contains("nftables")),
        "{:?}",
        m.notes
    );
    // Flags with which istio-iptables writes no rules: nothing is captured.
    for flag in [
        "--cleanup-only",
        "--dry-run",
        "-n",
        "--skip-rule-apply=true",
    ] {
        let (r, d) = declined(&with_args(json!(["istio-iptables", flag, "-p", "15001"])));
        assert_eq!(r, Reason::NotCaptured, "{flag}");
        assert!(
            d.contains(flag) && d.contains("writes no capture rules"),
            "{flag}: {d}"
        );
    }
    assert!(
        with_args(json!(["istio-iptables", "--dry-run=false", "-p", "15001"]))
            .verdict
            .is_ok()
    );
    // A flag istio-iptables does not have (this one was meshlane's own misspelling of -q).
    for bogus in ["--istio-local-outbound-ports", "--frobnicate", "-Q"] {
        let (r, d) = declined(&with_args(json!(["istio-iptables", bogus, "8080"])));
        assert_eq!(r, Reason::BadResource, "{bogus}");
        assert!(
            d.contains("spec.initContainers[0] (istio-init) args")
                && d.contains(bogus)
                && d.contains("unknown istio-iptables flag"),
            "{bogus}: {d}"
        );
    }
}

#[test]
fn proxy_identity_with_istio_cni() {
    // The plugin exempts the istio-proxy container's own runAsUser and runAsGroup, each 1337
    // where unset or 0; istio-iptables' "gid follows uid" does not apply, nor does the pod's
    // securityContext.
    let mut v = fixture("istio-cni.json");
    v["spec"]["containers"][1]["securityContext"]["runAsUser"] = json!(1000650001);
    v["spec"]["containers"][1]["securityContext"]
        .as_object_mut()
        .unwrap()
        .remove("runAsGroup");
    let p = map(v.clone()).verdict.expect("accelerated");
    assert_eq!((p.proxy_uid, p.proxy_gid), (1000650001, 1337));
    v["spec"]["containers"][1]["securityContext"]["runAsGroup"] = json!(0);
    v["spec"]["securityContext"] = json!({"runAsUser": 2000, "runAsGroup": 2000});
    let p = map(v.clone()).verdict.expect("accelerated");
    assert_eq!((p.proxy_uid, p.proxy_gid), (1000650001, 1337));
    v["spec"]["containers"][1]["securityContext"]
        .as_object_mut()
        .unwrap()
        .remove("runAsUser");
    let p = map(v).verdict.expect("accelerated");
    assert_eq!((p.proxy_uid, p.proxy_gid), (1337, 1337));
}

#[test]
fn proxy_identity_without_a_uid_argument() {
    // istio-init without -u: the sidecar's securityContext, else OpenShift's range, else
    // 1337; the gid follows the uid.
    let mut v = fixture("injected-istio-init.json");
    let args = v["spec"]["initContainers"][0]["args"]
        .as_array_mut()
        .unwrap();
    let u = args.iter().position(|a| a == "-u").unwrap();
    args.drain(u..u + 2);
    let proxy = v["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .position(|c| c["name"] == "istio-proxy")
        .unwrap();
    v["spec"]["containers"][proxy]["securityContext"]["runAsUser"] = json!(1000650001);
    v["spec"]["containers"][proxy]["securityContext"]
        .as_object_mut()
        .unwrap()
        .remove("runAsGroup");
    let p = map(v.clone()).verdict.expect("accelerated");
    assert_eq!((p.proxy_uid, p.proxy_gid), (1000650001, 1000650001));
    v["spec"]["containers"][proxy]["securityContext"]
        .as_object_mut()
        .unwrap()
        .remove("runAsUser");
    let openshift = NamespaceFacts {
        annotations: BTreeMap::from([(
            "openshift.io/sa.scc.uid-range".to_string(),
            "1000680000/10000".to_string(),
        )]),
        ..Default::default()
    };
    let p = map_ns(v.clone(), Some(&openshift))
        .verdict
        .expect("accelerated");
    assert_eq!(p.proxy_uid, 1000680000);
    let p = map(v.clone()).verdict.expect("accelerated");
    assert_eq!(p.proxy_uid, 1337);
    let broken = NamespaceFacts {
        annotations: BTreeMap::from([(
            "openshift.io/sa.scc.uid-range".to_string(),
            "lots".to_string(),
        )]),
        ..Default::default()
    };
    let (r, d) = declined(&map_ns(v, Some(&broken)));
    assert_eq!(r, Reason::BadResource);
    assert!(d.contains("openshift.io/sa.scc.uid-range"), "{d}");
}

#[test]
fn interception_modes() {
    let mut v = fixture("istio-cni.json");
    annotate(&mut v, "sidecar.istio.io/interceptionMode", "TPROXY");
    // istio-validation says -m REDIRECT, but the CNI plugin writes its rules from the
    // annotation.
    let (r, d) = declined(&map(v.clone()));
    assert_eq!(r, Reason::Tproxy);
    assert!(d.contains("uid 0") && d.contains("127.0.0.6"), "{d}");
    annotate(&mut v, "sidecar.istio.io/interceptionMode", "NONE");
    assert_eq!(declined(&map(v.clone())).0, Reason::NotCaptured);
    annotate(&mut v, "sidecar.istio.io/interceptionMode", "sideways");
    let (r, d) = declined(&map(v));
    assert_eq!(r, Reason::BadResource);
    assert!(d.contains("sidecar.istio.io/interceptionMode"), "{d}");
    let mut v = fixture("injected-istio-init.json");
    v["spec"]["initContainers"][0]["args"][8] = json!("TPROXY");
    assert_eq!(declined(&map(v)).0, Reason::Tproxy);
}

#[test]
fn opt_out_by_pod_annotation_or_namespace_label() {
    let mut v = fixture("injected-istio-init.json");
    annotate(&mut v, "meshlane.io/accelerate", "false");
    assert_eq!(declined(&map(v.clone())).0, Reason::OptedOut);
    annotate(&mut v, "meshlane.io/accelerate", "nope");
    let (r, d) = declined(&map(v.clone()));
    assert_eq!(r, Reason::BadResource);
    assert!(
        d.contains("meshlane.io/accelerate") && d.contains("nope"),
        "{d}"
    );
    let off = NamespaceFacts {
        labels: BTreeMap::from([("meshlane.io/accelerate".to_string(), "false".to_string())]),
        ..Default::default()
    };
    let plain = fixture("injected-istio-init.json");
    let (r, d) = declined(&map_ns(plain, Some(&off)));
    assert_eq!(r, Reason::OptedOut);
    assert!(d.contains("namespace label"), "{d}");
    // The pod's own "true" overrides its namespace's "false".
    annotate(&mut v, "meshlane.io/accelerate", "true");
    assert!(map_ns(v, Some(&off)).verdict.is_ok());
}

#[test]
fn a_pod_or_its_namespace_names_its_redirect_mode() {
    use meshlane::mode::Mode;
    let mode_of = |m: &Mapped| m.verdict.as_ref().expect("accelerated").mode;
    let plain = fixture("injected-istio-init.json");
    assert_eq!(
        mode_of(&map(plain.clone())),
        None,
        "no opt-in: the node's mode"
    );
    let mut v = plain.clone();
    annotate(&mut v, "meshlane.io/mode", "two-way");
    assert_eq!(mode_of(&map(v.clone())), Some(Mode::TwoWay));
    let reader_ns = NamespaceFacts {
        labels: BTreeMap::from([("meshlane.io/mode".to_string(), "reader".to_string())]),
        ..Default::default()
    };
    assert_eq!(
        mode_of(&map_ns(plain.clone(), Some(&reader_ns))),
        Some(Mode::Reader)
    );
    // The pod's annotation wins over its namespace's label.
    assert_eq!(
        mode_of(&map_ns(v.clone(), Some(&reader_ns))),
        Some(Mode::TwoWay)
    );
    annotate(&mut v, "meshlane.io/mode", "sideways");
    let (r, d) = declined(&map(v));
    assert_eq!(r, Reason::BadResource);
    assert!(
        d.contains("meshlane.io/mode") && d.contains("sideways"),
        "{d}"
    );
}

#[test]
fn pods_that_are_not_meshed() {
    let (r, d) = declined(&map(fixture("no-sidecar.json")));
    assert_eq!(r, Reason::NoSidecar);
    assert!(d.contains("not injected"), "{d}");
    let mut v = fixture("injected-istio-init.json");
    v["spec"]["hostNetwork"] = json!(true);
    assert_eq!(declined(&map(v)).0, Reason::NotCaptured);
    let mut v = fixture("injected-istio-init.json");
    v["status"]["phase"] = json!("Succeeded");
    let pod = kubernetes::decode(v).unwrap();
    assert!(kubernetes::map(&pod, None).is_none());
    // A gateway: the same istio-proxy container, running `proxy router`, no istio-init.
    let mut v = fixture("injected-istio-init.json");
    v["spec"]["initContainers"] = json!([]);
    v["spec"]["containers"][1]["args"] = json!(["proxy", "router", "--domain", "x.svc"]);
    let (r, d) = declined(&map(v));
    assert_eq!(r, Reason::NotCaptured);
    assert!(d.contains("proxy router"), "{d}");
}

/// A meshed pod is accelerated only once Running with an address: while Pending, istio-init
/// may still be writing the rules the datapath mirrors.
#[test]
fn pending_pods_wait_for_running_and_an_address() {
    let mut v = fixture("injected-istio-init.json");
    v["status"]["phase"] = json!("Pending");
    let m = map(v);
    let (r, d) = declined(&m);
    assert_eq!((r, r.as_str()), (Reason::Pending, "pending"));
    assert!(d.contains("Pending"), "{d}");
    // Status shows what was derived about the sidecar, not zeros.
    assert_eq!(
        m.verdict.unwrap_err().derived,
        Some(meshlane::discovery::Derived {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006
        })
    );
    let mut v = fixture("injected-istio-init.json");
    v["status"]["podIP"] = Value::Null;
    v["status"]["podIPs"] = json!([]);
    let (r, d) = declined(&map(v));
    assert_eq!(r, Reason::Pending);
    assert!(d.contains("podIP"), "{d}");
    // Not meshed stays not meshed, whatever the phase; nothing was derived.
    let mut v = fixture("no-sidecar.json");
    v["status"]["phase"] = json!("Pending");
    let m = map(v);
    assert_eq!(declined(&m).0, Reason::NoSidecar);
    assert_eq!(m.verdict.unwrap_err().derived, None);
}

/// A pod with a user namespace of its own: its rules exempt uid 1337 inside it, BPF would see
/// another uid on the host, and the API does not say which.
#[test]
fn user_namespaced_pods_are_declined_with_a_reason() {
    let mut v = fixture("injected-istio-init.json");
    v["spec"]["hostUsers"] = json!(false);
    let (r, d) = declined(&map(v));
    assert_eq!((r, r.as_str()), (Reason::UserNamespace, "user_namespace"));
    assert!(d.contains("spec.hostUsers"), "{d}");
    let mut v = fixture("injected-istio-init.json");
    v["spec"]["hostUsers"] = json!(true);
    assert!(map(v).verdict.is_ok());
    // Not meshed stays not meshed.
    let mut v = fixture("no-sidecar.json");
    v["spec"]["hostUsers"] = json!(false);
    assert_eq!(declined(&map(v)).0, Reason::NoSidecar);
}

#[test]
fn bad_input_names_the_field() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "traffic.sidecar.istio.io/excludeOutboundPorts",
            Box::new(|v: &mut Value| {
                v["spec"]["initContainers"] = json!([]);
                annotate(
                    v,
                    "traffic.sidecar.istio.io/excludeOutboundPorts",
                    "80,http",
                );
            }),
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            Box::new(|v: &mut Value| {
                v["spec"]["initContainers"] = json!([]);
                annotate(
                    v,
                    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                    "10.0.0.0/33",
                );
            }),
        ),
        (
            "traffic.sidecar.istio.io/includeInboundPorts",
            Box::new(|v: &mut Value| {
                v["spec"]["initContainers"] = json!([]);
                annotate(v, "traffic.sidecar.istio.io/includeInboundPorts", "0");
            }),
        ),
        (
            "status.podIPs[0].ip",
            Box::new(|v: &mut Value| v["status"]["podIPs"][0]["ip"] = json!("not-an-ip")),
        ),
        (
            "istio-proxy securityContext.runAsUser",
            Box::new(|v: &mut Value| {
                v["spec"]["containers"][1]["securityContext"]["runAsUser"] = json!(-5)
            }),
        ),
    ];
    for (field, edit) in cases {
        let mut v = fixture("istio-cni.json");
        edit(&mut v);
        let (r, d) = declined(&map(v));
        assert_eq!(r, Reason::BadResource, "{field}: {d}");
        assert!(d.contains(field), "{field}: {d}");
    }
    // A resource that does not decode: the JSON path of the field, and the pod's name.
    let mut v = fixture("injected-istio-init.json");
    v["spec"]["containers"][0]["ports"][0]["containerPort"] = json!("eighty");
    let (name, d) = kubernetes::decode(v).expect_err("does not decode");
    assert_eq!(name, "bookinfo/reviews-v1-5b5d6494f4-abcde");
    assert!(
        d.detail
            .contains("spec.containers[0].ports[0].containerPort"),
        "{}",
        d.detail
    );
    // Unknown fields are ignored, and the sidecar status annotation is informational.
    let mut v = fixture("injected-istio-init.json");
    v["spec"]["someFutureField"] = json!({"x": 1});
    v["spec"]["containers"][1]["alsoNew"] = json!(true);
    annotate(&mut v, "sidecar.istio.io/status", "{not json");
    let m = map(v);
    assert!(m.verdict.is_ok());
    assert!(
        m.notes.iter().any(|n| n.contains("not JSON")),
        "{:?}",
        m.notes
    );
}

// === a small API server ===

/// Speaks enough of the Kubernetes API for kube-rs's watcher: `GET /api/v1/pods` and
/// `/api/v1/namespaces` lists (with `metadata.resourceVersion`), and `watch=true` requests
/// answered with a chunked stream of `{"type":..,"object":..}` lines that stays open until the
/// test pushes an event, an ERROR or closes it.
struct ApiServer {
    addr: String,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    pods: BTreeMap<String, Value>,
    namespaces: BTreeMap<String, Value>,
    pod_watches: Vec<mpsc::Sender<Option<String>>>,
    ns_watches: Vec<mpsc::Sender<Option<String>>>,
    requests: Vec<String>,
    /// Answer everything with 500 (an API server outage).
    broken: bool,
    /// Answer everything with 429, asking the client to wait this many seconds (`Retry-After`
    /// and the Status' `details.retryAfterSeconds`, as API Priority and Fairness does).
    throttled: Option<u32>,
    /// When each pod list or watch that got a 429 arrived.
    throttled_pod_requests: Vec<Instant>,
}

fn key(o: &Value) -> String {
    format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or(""),
        o["metadata"]["name"].as_str().unwrap_or("")
    )
}

impl ApiServer {
    fn start(pods: Vec<Value>, namespaces: Vec<Value>) -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner {
            rv: 100,
            pods: pods.into_iter().map(|p| (key(&p), p)).collect(),
            namespaces: namespaces.into_iter().map(|n| (key(&n), n)).collect(),
            ..Default::default()
        }));
        let i = Arc::clone(&inner);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let i = Arc::clone(&i);
                std::thread::spawn(move || serve(conn, &i));
            }
        });
        ApiServer { addr, inner }
    }

    /// Changes the stored pods and sends the event to every open pod watch.
    fn pod_event(&self, kind: &str, mut pod: Value) {
        let mut s = self.inner.lock().unwrap();
        s.rv += 1;
        pod["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        if kind == "DELETED" {
            s.pods.remove(&key(&pod));
        } else {
            s.pods.insert(key(&pod), pod.clone());
        }
        let line = json!({"type": kind, "object": pod}).to_string();
        s.pod_watches.retain(|w| w.send(Some(line.clone())).is_ok());
    }

    fn ns_event(&self, kind: &str, mut ns: Value) {
        let mut s = self.inner.lock().unwrap();
        s.rv += 1;
        ns["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        s.namespaces.insert(key(&ns), ns.clone());
        let line = json!({"type": kind, "object": ns}).to_string();
        s.ns_watches.retain(|w| w.send(Some(line.clone())).is_ok());
    }

    fn bookmark(&self) {
        let mut s = self.inner.lock().unwrap();
        s.rv += 1;
        let line = json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"resourceVersion": s.rv.to_string(),
                "annotations": {"k8s.io/initial-events-end": "true"}}}})
        .to_string();
        s.pod_watches.retain(|w| w.send(Some(line.clone())).is_ok());
    }

    /// Changes the stored pods without telling any watch (an event the watcher missed).
    fn silently_remove(&self, pod: &Value) {
        self.inner.lock().unwrap().pods.remove(&key(pod));
    }

    /// The watch's resourceVersion is too old: ERROR 410, then the stream ends.
    fn gone(&self) {
        let mut s = self.inner.lock().unwrap();
        let line = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "metadata": {}, "status": "Failure",
            "message": "too old resource version: 101 (4711)", "reason": "Expired", "code": 410}})
        .to_string();
        for w in s.pod_watches.drain(..) {
            let _ = w.send(Some(line.clone()));
            let _ = w.send(None);
        }
    }

    fn set_broken(&self, broken: bool) {
        self.set(|s| s.broken = broken);
    }

    fn set_throttled(&self, retry_after: Option<u32>) {
        self.set(|s| s.throttled = retry_after);
    }

    fn throttled_pod_requests(&self) -> Vec<Instant> {
        self.inner.lock().unwrap().throttled_pod_requests.clone()
    }

    /// Changes how the server answers, and ends the open watches (the client lists again).
    fn set(&self, f: impl FnOnce(&mut Inner)) {
        let mut guard = self.inner.lock().unwrap();
        let s = &mut *guard;
        f(s);
        for w in s.pod_watches.drain(..).chain(s.ns_watches.drain(..)) {
            let _ = w.send(None);
        }
    }

    fn requests(&self) -> Vec<String> {
        self.inner.lock().unwrap().requests.clone()
    }

    fn open_pod_watches(&self) -> usize {
        self.inner.lock().unwrap().pod_watches.len()
    }
}

fn serve(conn: TcpStream, inner: &Mutex<Inner>) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        let _ = reader.read_exact(&mut body);
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let (kind, list_kind) = match path {
            "/api/v1/pods" => ("pods", "PodList"),
            "/api/v1/namespaces" => ("namespaces", "NamespaceList"),
            _ => {
                respond(
                    &mut conn,
                    404,
                    &json!({"kind": "Status", "code": 404}).to_string(),
                );
                continue;
            }
        };
        let mut s = inner.lock().unwrap();
        s.requests.push(target.clone());
        if let Some(retry_after) = s.throttled {
            if kind == "pods" {
                s.throttled_pod_requests.push(Instant::now());
            }
            drop(s);
            let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "Too many requests, please try again later.",
                "reason": "TooManyRequests", "code": 429,
                "details": {"retryAfterSeconds": retry_after}})
            .to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: {retry_after}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.flush();
            continue;
        }
        if s.broken {
            drop(s);
            respond(
                &mut conn,
                500,
                &json!({"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "message": "etcdserver: request timed out",
                "reason": "InternalError", "code": 500})
                .to_string(),
            );
            continue;
        }
        if !watch {
            let items: Vec<Value> = if kind == "pods" {
                s.pods.values().cloned().collect()
            } else {
                s.namespaces.values().cloned().collect()
            };
            let body = json!({"kind": list_kind, "apiVersion": "v1",
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
            drop(s);
            respond(&mut conn, 200, &body.to_string());
            continue;
        }
        let (tx, rx) = mpsc::channel();
        if kind == "pods" {
            s.pod_watches.push(tx);
        } else {
            s.ns_watches.push(tx);
        }
        drop(s);
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if conn.write_all(head.as_bytes()).is_err() {
            return;
        }
        let _ = conn.flush();
        // The watch ends when the test says so, or after the request's timeoutSeconds.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(line)) => {
                    let data = format!("{line}\n");
                    let chunk = format!("{:x}\r\n{data}\r\n", data.len());
                    if conn.write_all(chunk.as_bytes()).is_err() {
                        return;
                    }
                    let _ = conn.flush();
                }
                Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        let _ = conn.write_all(b"0\r\n\r\n");
        // The stream is over; the connection goes too (the client opens a new one).
        return;
    }
}

fn respond(conn: &mut TcpStream, code: u16, body: &str) {
    let (reason, extra) = match code {
        200 => ("OK", ""),
        404 => ("Not Found", ""),
        _ => ("Internal Server Error", ""),
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.flush();
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("ns-{name}"), "resourceVersion": "1", "labels": labels},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

/// A fake /proc: pid 1 in a namespace of its own (a plain file, so no pod matches it), and one
/// process per pod UID whose cgroup path names the pod (systemd driver) and whose `ns/net`
/// links to this process's real network namespace.
fn fake_proc(dir: &Path, uids: &[&str]) -> PathBuf {
    let root = dir.join("proc");
    std::fs::create_dir_all(root.join("1/ns")).unwrap();
    std::fs::write(root.join("1/ns/net"), "host").unwrap();
    std::fs::write(root.join("1/cgroup"), "0::/init.scope\n").unwrap();
    for (i, uid) in uids.iter().enumerate() {
        let pid = root.join((1000 + i).to_string());
        std::fs::create_dir_all(pid.join("ns")).unwrap();
        std::fs::write(
            pid.join("cgroup"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-0a1b.scope\n",
                uid.replace('-', "_")
            ),
        )
        .unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/net", pid.join("ns/net")).unwrap();
    }
    root
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("meshlane-kube-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The runtime the watcher runs on, and the wake it rings on every change: the test's thread
/// waits on it instead of polling.
struct Events {
    rt: tokio::runtime::Runtime,
    wake: Wake,
}

impl Events {
    fn new() -> Events {
        Events {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            wake: Wake::default(),
        }
    }

    /// Until the watcher rings, at most `timeout`.
    fn wait(&self, timeout: Duration) {
        self.rt.block_on(async {
            let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
        });
    }
}

fn wait_for(
    what: &str,
    source: &Source,
    events: &Events,
    ok: impl Fn(&kubernetes::Snapshot) -> bool,
) -> kubernetes::Snapshot {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let snap = source.snapshot();
        if ok(&snap) {
            return snap;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {snap:#?}"
        );
        events.wait(Duration::from_millis(100));
    }
}

fn reason_of(snap: &kubernetes::Snapshot, name: &str) -> Option<Reason> {
    snap.discovery
        .skipped
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.reason)
}

fn has_pod(snap: &kubernetes::Snapshot, name: &str) -> bool {
    snap.discovery.pods.iter().any(|p| p.name == name)
}

#[test]
fn watcher_against_the_api_protocol() {
    let injected = fixture("injected-istio-init.json");
    let native = fixture("native-sidecar.json");
    let cni = fixture("istio-cni.json");
    let plain = fixture("no-sidecar.json");
    let mut malformed = fixture("injected-istio-init.json");
    malformed["metadata"]["name"] = json!("broken-0");
    malformed["metadata"]["uid"] = json!("5f8c6cfe-6ce5-4d51-8c33-445a07a0e86b");
    malformed["spec"]["containers"] = json!("not a list");
    let tmp = TempDir::new("watch");
    // The native-sidecar pod has no process on this node (yet).
    let proc_root = fake_proc(
        &tmp.0,
        &[
            "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "3d6a4adc-4ac3-4b2f-8a11-2238f5eec649",
        ],
    );
    let server = ApiServer::start(
        vec![
            injected.clone(),
            native.clone(),
            cni.clone(),
            plain,
            malformed,
        ],
        vec![
            namespace("bookinfo", json!({"istio-injection": "enabled"})),
            namespace("shop", json!({})),
            namespace("kube-system", json!({})),
        ],
    );
    let events = Events::new();
    let source = Source::start(
        kubernetes::Options {
            endpoint: Endpoint::Url(server.addr.clone()),
            node_name: "node-a".into(),
            proc_root: proc_root.clone(),
            host_netns: proc_root.join("1/ns/net"),
        },
        events.wake.clone(),
        events.rt.handle(),
    );

    // The initial lists.
    let snap = wait_for("the first lists", &source, &events, |s| s.synced);
    assert!(snap.error.is_none(), "{:?}", snap.error);
    assert!(
        has_pod(&snap, "bookinfo/reviews-v1-5b5d6494f4-abcde"),
        "{snap:#?}"
    );
    assert!(
        has_pod(&snap, "shop/details-v1-65599dcf68-q8h2k"),
        "{snap:#?}"
    );
    let p = snap
        .discovery
        .pods
        .iter()
        .find(|p| p.name == "bookinfo/reviews-v1-5b5d6494f4-abcde")
        .unwrap();
    assert_eq!(p.netns, proc_root.join("1000/ns/net"));
    assert_eq!(
        reason_of(&snap, "bookinfo/ratings-v1-7d9c8f5c6b-xyz12"),
        Some(Reason::NetnsNotFound)
    );
    assert_eq!(
        reason_of(&snap, "kube-system/coredns-76f75df574-9zx4p"),
        Some(Reason::NoSidecar)
    );
    let broken = snap
        .discovery
        .skipped
        .iter()
        .find(|s| s.name == "bookinfo/broken-0")
        .expect("the malformed pod is reported");
    assert_eq!(broken.reason, Reason::BadResource);
    assert!(
        broken.detail.contains("spec.containers"),
        "{}",
        broken.detail
    );
    let (uid, ips) = &snap.identities["bookinfo/reviews-v1-5b5d6494f4-abcde"];
    assert_eq!(uid, "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
    assert_eq!(ips.len(), 2);
    let reqs = server.requests();
    assert!(
        reqs.iter().any(|r| r.starts_with("/api/v1/pods?")
            && r.contains("fieldSelector=spec.nodeName%3Dnode-a")
            && !r.contains("watch=true")),
        "{reqs:#?}"
    );
    // The watch follows the list: wait for it before looking at its request.
    wait_for_watch(&server);
    let reqs = server.requests();
    assert!(
        reqs.iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "{reqs:#?}"
    );

    // Bookmarks change nothing.
    server.bookmark();
    server.bookmark();

    // Event -> snapshot latency: MODIFIED toggles the opt-out annotation, many times.
    let name = "bookinfo/reviews-v1-5b5d6494f4-abcde";
    let mut lat = Vec::new();
    for i in 0..60 {
        let mut v = injected.clone();
        let out = i % 2 == 0;
        annotate(
            &mut v,
            "meshlane.io/accelerate",
            if out { "false" } else { "true" },
        );
        let t = Instant::now();
        server.pod_event("MODIFIED", v);
        let deadline = t + Duration::from_secs(5);
        loop {
            events.wait(Duration::from_millis(20));
            let snap = source.snapshot();
            let seen = if out {
                reason_of(&snap, name) == Some(Reason::OptedOut)
            } else {
                has_pod(&snap, name)
            };
            if seen {
                lat.push(t.elapsed());
                break;
            }
            assert!(Instant::now() < deadline, "event {i} never applied");
        }
    }
    lat.sort();
    let p50 = lat[lat.len() / 2];
    let p99 = lat[(lat.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "event -> snapshot latency over {} MODIFIED events: p50 {p50:?}, p99 {p99:?}, max {:?}",
        lat.len(),
        lat[lat.len() - 1]
    );
    // The 100 ms target is a benchmark figure (printed above); a test only proves the event, not
    // a timer, drives the update: even on a loaded CI machine that is far under a second.
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");

    // A namespace label change re-maps its pods.
    server.ns_event(
        "MODIFIED",
        namespace("shop", json!({"meshlane.io/accelerate": "false"})),
    );
    wait_for("the namespace opt-out", &source, &events, |s| {
        reason_of(s, "shop/details-v1-65599dcf68-q8h2k") == Some(Reason::OptedOut)
    });

    // ADDED and DELETED.
    let mut extra = fixture("native-sidecar.json");
    extra["metadata"]["name"] = json!("ratings-v1-7d9c8f5c6b-new01");
    server.pod_event("ADDED", extra.clone());
    wait_for("ADDED", &source, &events, |s| {
        reason_of(s, "bookinfo/ratings-v1-7d9c8f5c6b-new01").is_some()
    });
    server.pod_event("DELETED", extra);
    wait_for("DELETED", &source, &events, |s| {
        reason_of(s, "bookinfo/ratings-v1-7d9c8f5c6b-new01").is_none()
    });

    // 410 Gone: the watcher relists, and a deletion it never saw as an event is applied.
    let lists_before = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("/api/v1/pods?") && !r.contains("watch=true"))
        .count();
    server.silently_remove(&native);
    server.gone();
    let snap = wait_for("the relist after 410", &source, &events, |s| {
        reason_of(s, "bookinfo/ratings-v1-7d9c8f5c6b-xyz12").is_none()
    });
    assert!(
        snap.error.is_none(),
        "410 is not a failure: {:?}",
        snap.error
    );
    let lists_after = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("/api/v1/pods?") && !r.contains("watch=true"))
        .count();
    assert!(lists_after > lists_before, "no relist after 410");

    // An outage: the error is reported and the last good state kept; then it recovers.
    server.set_broken(true);
    let snap = wait_for("the outage to be reported", &source, &events, |s| {
        s.error.is_some()
    });
    assert!(
        has_pod(&snap, "bookinfo/reviews-v1-5b5d6494f4-abcde"),
        "last good state kept"
    );
    assert!(snap.synced);
    server.set_broken(false);
    wait_for("recovery", &source, &events, |s| s.error.is_none());
}

fn wait_for_watch(server: &ApiServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.open_pod_watches() == 0 {
        assert!(Instant::now() < deadline, "the watcher never watched");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// === the daemon ===

fn source_health(accel: &support::Accel) -> Option<(bool, String)> {
    let st = support::try_status_json(accel)?;
    st["sources"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == "kubernetes")
        .map(|x| {
            (
                x["healthy"].as_bool().unwrap_or(false),
                x["last_error"].as_str().unwrap_or("").to_string(),
            )
        })
}

fn start_kube_daemon(
    accel: &support::Accel,
    api: &str,
    proc_root: &Path,
    log: &Path,
) -> support::Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = accel
        .daemon_command()
        .args([
            "--discovery",
            "kubernetes",
            "--node-name",
            "node-a",
            "--kube-api",
            api,
        ])
        .arg("--proc-root")
        .arg(proc_root)
        // Only watch events may trigger a reconcile within the test's time frame.
        .args(["--resync", "1m"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start meshlane run");
    support::Daemon(child)
}

/// Watch event -> policy map, timed; deletion; source failure keeping the maps; a restart during
/// an API outage removing nothing; health in status and metrics.
#[test]
fn daemon_follows_the_watch_into_the_policy_map() {
    let Some(accel) = support::Accel::cgroup_only("daemon_follows_the_watch_into_the_policy_map")
    else {
        return;
    };
    let ns = minimesh::Netns::new("kube").expect("netns");
    let cookie = ns.cookie().expect("cookie");
    let tmp = TempDir::new("daemon");
    let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    let proc_root = fake_proc(&tmp.0, &[uid]);
    // The pod's process lives in the test's namespace.
    let link = proc_root.join("1000/ns/net");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(ns.path(), &link).unwrap();
    let injected = fixture("injected-istio-init.json");
    let server = ApiServer::start(
        vec![injected.clone(), fixture("no-sidecar.json")],
        vec![
            namespace("bookinfo", json!({})),
            namespace("kube-system", json!({})),
        ],
    );
    let log = tmp.0.join("daemon.log");
    let in_map = |accel: &support::Accel| {
        meshlane::datapath::pinned_pods(&accel.pin_dir)
            .map(|p| p.get(&cookie).map(|pol| pol.proxy_uid))
            .ok()
            .flatten()
    };
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut daemon = start_kube_daemon(&accel, &server.addr, &proc_root, &log);
    support::wait_until("the pod in the policy map", || in_map(&accel) == Some(1337));
    support::wait_until("source healthy", || {
        source_health(&accel).is_some_and(|(ok, _)| ok)
    });
    let st = support::status_json(&accel);
    let pods = st["pods"].as_array().unwrap();
    let reviews = pods
        .iter()
        .find(|p| p["name"] == "bookinfo/reviews-v1-5b5d6494f4-abcde")
        .expect("pod in status");
    assert_eq!(reviews["source"], "kubernetes", "{reviews}");
    assert_eq!(reviews["uid"], uid, "{reviews}");
    assert_eq!(
        reviews["pod_ips"],
        json!(["10.244.1.17", "fd00:10:244:1::11"]),
        "{reviews}"
    );
    assert_eq!(reviews["state"], "accelerated", "{reviews}\n{}", logs());
    let coredns = pods
        .iter()
        .find(|p| p["name"] == "kube-system/coredns-76f75df574-9zx4p")
        .expect("non-mesh pod in status");
    assert!(
        coredns["reason"].as_str().unwrap().contains("no_sidecar"),
        "{coredns}"
    );
    wait_for_watch(&server);

    // Event -> map: opt the pod out and back in, polling the pinned map.
    let mut lat = Vec::new();
    for i in 0..40 {
        let out = i % 2 == 0;
        let mut v = injected.clone();
        annotate(
            &mut v,
            "meshlane.io/accelerate",
            if out { "false" } else { "true" },
        );
        let t = Instant::now();
        server.pod_event("MODIFIED", v);
        loop {
            if in_map(&accel).is_some() != out {
                lat.push(t.elapsed());
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "event {i} never reached the map\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    lat.sort();
    let p50 = lat[lat.len() / 2];
    let p99 = lat[(lat.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "watch event -> policy map over {} events (--resync 1m): p50 {p50:?}, p99 {p99:?}, max {:?}",
        lat.len(),
        lat[lat.len() - 1]
    );
    // The 100 ms target is a benchmark figure (printed above); a test only proves the event, not
    // a timer, drives the update: even on a loaded CI machine that is far under a second.
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");

    // An annotation's opt-out is the Kubernetes source's word (no pod list is given here).
    let mut v = injected.clone();
    annotate(&mut v, "meshlane.io/accelerate", "false");
    server.pod_event("MODIFIED", v);
    let opted_out = |st: &Value| {
        st["pods"].as_array().and_then(|p| {
            p.iter()
                .find(|p| {
                    p["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("opted_out"))
                })
                .cloned()
        })
    };
    support::wait_until("the opted-out pod in status", || {
        support::try_status_json(&accel).is_some_and(|st| opted_out(&st).is_some())
    });
    let pod = opted_out(&support::status_json(&accel)).unwrap();
    assert_eq!(pod["source"], "kubernetes", "{pod}");
    // Declined before its capture was read: nothing derived, so nothing shown (not zeros).
    assert!(
        pod["proxy_uid"].is_null() && pod["outbound_port"].is_null(),
        "{pod}"
    );

    // Deletion removes the pod from the map.
    server.pod_event("DELETED", injected.clone());
    support::wait_until("the deleted pod out of the map", || {
        in_map(&accel).is_none()
    });
    server.pod_event("ADDED", injected.clone());
    support::wait_until("the pod back", || in_map(&accel).is_some());

    // Throttling (429): the source is degraded, not failing; status, metrics and the log say
    // so, the map keeps the last good state, and it is healthy again once the throttling ends.
    server.set_throttled(Some(3));
    support::wait_until("source degraded", || {
        support::try_status_json(&accel).is_some_and(|st| {
            st["sources"].as_array().is_some_and(|s| {
                s.iter().any(|x| {
                    x["name"] == "kubernetes"
                        && x["healthy"] == false
                        && x["degraded"] == true
                        && x["last_error"].as_str().is_some_and(|e| e.contains("429"))
                })
            })
        })
    });
    let (_, body) = accel.http_get("/metrics").expect("metrics");
    assert_eq!(
        support::sample(&body, "meshlane_source_degraded{source=\"kubernetes\"}"),
        Some(1.0),
        "{body}"
    );
    assert!(logs().contains("throttling this client (429 Too Many Requests)"));
    assert!(in_map(&accel).is_some(), "last good state kept");
    // The API server asked for 3 s between tries: the pod watch waits that long (its own
    // backoff would retry within a second).
    support::wait_until("three throttled pod requests", || {
        server.throttled_pod_requests().len() >= 3
    });
    let times = server.throttled_pod_requests();
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(2900),
            "the pod watch tried again {gap:?} after a 429 asking for 3 s: {times:?}"
        );
    }
    server.set_throttled(None);
    support::wait_until("source healthy after the throttling", || {
        source_health(&accel).is_some_and(|(ok, _)| ok)
    });
    let (_, body) = accel.http_get("/metrics").expect("metrics");
    assert_eq!(
        support::sample(&body, "meshlane_source_degraded{source=\"kubernetes\"}"),
        Some(0.0),
        "{body}"
    );

    // An outage: status and metrics say so, the map keeps the last good state.
    server.set_broken(true);
    support::wait_until("source unhealthy", || {
        source_health(&accel).is_some_and(|(ok, e)| !ok && !e.is_empty())
    });
    let (_, body) = accel.http_get("/metrics").expect("metrics");
    assert_eq!(
        support::sample(&body, "meshlane_source_up{source=\"kubernetes\"}"),
        Some(0.0),
        "{body}"
    );
    assert!(in_map(&accel).is_some(), "last good state kept");

    // Restart while the API is still down: nothing is removed before the first list.
    daemon.terminate();
    let mut daemon = start_kube_daemon(&accel, &server.addr, &proc_root, &log);
    support::wait_until("the restarted daemon's status", || {
        source_health(&accel).is_some()
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(source_health(&accel).map(|h| h.0), Some(false));
    assert!(
        in_map(&accel).is_some(),
        "restart during an outage removed the pod\n{}",
        logs()
    );
    server.set_broken(false);
    support::wait_until("source healthy after the outage", || {
        source_health(&accel).is_some_and(|(ok, _)| ok)
    });
    let (_, body) = accel.http_get("/metrics").expect("metrics");
    assert_eq!(
        support::sample(&body, "meshlane_source_up{source=\"kubernetes\"}"),
        Some(1.0),
        "{body}"
    );
    assert!(in_map(&accel).is_some());
    daemon.terminate();
}

/// With --xds-server, each Kubernetes-discovered pod gets an ADS stream with its own sidecar
/// identity; its Listeners are held against the pod's capture: differing ports are reported
/// (the capture rules still decide), a transparent (TPROXY) inbound listener declines the pod.
/// An accepted xDS change wakes the daemon's loop like a Kubernetes event (the resync here is
/// ten minutes).
#[test]
fn daemon_cross_checks_each_pod_against_its_sidecars_xds_listeners() {
    let Some(py) = support::AdsServer::python() else {
        return;
    };
    let Some(accel) = support::Accel::cgroup_only("daemon_cross_checks_xds") else {
        return;
    };
    let ns = minimesh::Netns::new("kxds").expect("netns");
    let cookie = ns.cookie().expect("cookie");
    let tmp = TempDir::new("xds");
    let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    let proc_root = fake_proc(&tmp.0, &[uid]);
    let link = proc_root.join("1000/ns/net");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(ns.path(), &link).unwrap();
    let server = ApiServer::start(
        vec![fixture("injected-istio-init.json")],
        vec![namespace("bookinfo", json!({}))],
    );
    let xds_port = support::free_port();
    // The sidecar's inbound listener is on 15016 while istio-init redirects to 15006.
    let ads = support::AdsServer::start(
        &py,
        xds_port,
        &json!([{"version": "1", "listeners": support::istio_listeners(15001, 15016, false)}]),
        "differ",
    );
    let log = tmp.0.join("daemon.log");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let in_map = |accel: &support::Accel| {
        meshlane::datapath::pinned_pods(&accel.pin_dir)
            .map(|p| p.contains_key(&cookie))
            .unwrap_or(false)
    };
    let start = |accel: &support::Accel| {
        support::Daemon(
            accel
                .daemon_command()
                .args([
                    "--discovery",
                    "kubernetes",
                    "--node-name",
                    "node-a",
                    "--kube-api",
                ])
                .arg(&server.addr)
                .arg("--proc-root")
                .arg(&proc_root)
                .arg("--xds-server")
                .arg(format!("http://127.0.0.1:{xds_port}"))
                // Far beyond the waits below: a change must wake the loop, not wait for this.
                .args(["--resync", "10m"])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start meshlane run"),
        )
    };
    let mut daemon = start(&accel);
    support::wait_until("the disagreement reported", || {
        logs().contains("xDS and the capture rules disagree")
    });
    assert!(
        logs().contains("inbound listener 15016, capture rules 15006"),
        "{}",
        logs()
    );
    support::wait_until("the pod accelerated (the rules decide)", || in_map(&accel));
    // The stream was opened as the pod's own sidecar.
    let reqs = ads.requests();
    assert_eq!(
        reqs[0]["node_id"],
        "sidecar~10.244.1.17~reviews-v1-5b5d6494f4-abcde.bookinfo~bookinfo.svc.cluster.local",
        "{reqs:#?}"
    );
    // Status and metrics carry it too, not only the log.
    let st = support::status_json(&accel);
    let notes = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bookinfo/reviews-v1-5b5d6494f4-abcde")
        .map(|p| p["notes"].clone())
        .expect("pod in status");
    assert!(
        notes.as_array().unwrap().iter().any(|n| n
            .as_str()
            .unwrap()
            .contains("inbound listener 15016, capture rules 15006")),
        "{st:#}"
    );
    let (_, body) = accel.http_get("/metrics").unwrap();
    assert_eq!(
        support::sample(&body, "meshlane_xds_disagreements"),
        Some(1.0),
        "{body}"
    );
    let xds_healthy = |accel: &support::Accel| {
        support::try_status_json(accel).and_then(|st| {
            st["sources"]
                .as_array()?
                .iter()
                .find(|x| x["name"] == "xds")?["healthy"]
                .as_bool()
        })
    };
    support::wait_until("xds source healthy", || xds_healthy(&accel) == Some(true));

    // The control plane goes away: the source says so at once (not at the next resync, ten
    // minutes away), and is healthy again as soon as the stream is back and has ACKed, though
    // the listeners (so the capture) are the same as before.
    ads.stop();
    support::wait_until_within("xds source unhealthy", Duration::from_secs(10), || {
        xds_healthy(&accel) == Some(false)
    });
    let ads = support::AdsServer::start(
        &py,
        xds_port,
        &json!([{"version": "1", "listeners": support::istio_listeners(15001, 15016, false)}]),
        "differ-again",
    );
    // Its reconnect backoff may be a few seconds by now; the resync is ten minutes away.
    support::wait_until_within("xds source healthy again", Duration::from_secs(45), || {
        xds_healthy(&accel) == Some(true)
    });

    // The control plane now says TPROXY: the pod is declined and leaves the map.
    ads.stop();
    let _ads = support::AdsServer::start(
        &py,
        xds_port,
        &json!([{"version": "2", "listeners": support::istio_listeners(15001, 15006, true)}]),
        "tproxy",
    );
    // The stream reconnects within its backoff (250 ms, then 500 ms), and the accepted update
    // wakes the reconcile loop; the resync alone would take ten minutes.
    support::wait_until_within(
        "the TPROXY pod out of the map",
        Duration::from_secs(10),
        || !in_map(&accel),
    );
    let st = support::status_json(&accel);
    let pod = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bookinfo/reviews-v1-5b5d6494f4-abcde")
        .cloned()
        .expect("pod in status");
    assert_eq!(pod["state"], "not_accelerated", "{pod}");
    assert!(
        pod["reason"].as_str().unwrap().contains("transparent"),
        "{pod}"
    );
    // Declined after its capture was derived: status shows it.
    assert_eq!(
        (
            &pod["proxy_uid"],
            &pod["proxy_gid"],
            &pod["outbound_port"],
            &pod["inbound_port"]
        ),
        (&json!(1337), &json!(1337), &json!(15001), &json!(15006)),
        "{pod}"
    );
    daemon.terminate();
}
