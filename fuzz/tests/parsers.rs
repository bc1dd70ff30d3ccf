//! One fuzz target per parser of outside input. Each first checks that its seeds, unchanged, are
//! read as the daemon reads them in production (so the seeds reach deep into the parser and a
//! parser that starts refusing them fails here), then feeds mutated seeds (`meshlane_fuzz`) for
//! the time bolero allows (`BOLERO_RANDOM_TEST_TIME_MS`, 1 s by default; a failure prints the
//! seed to replay with `BOLERO_RANDOM_SEED`).
//!
//! Properties, beyond "no panic, no hang": an error message stays short whatever the input (it
//! goes to the log and to status, and the input is a pod's), and a response body is never
//! longer than the bytes that came in.

use std::{path::Path, time::Duration};

use bolero::check;
use envoy_types::pb::{
    envoy::config::{
        core::v3::{address, socket_address::PortSpecifier, Address, SocketAddress},
        listener::v3::{Listener, ListenerFilter},
    },
    google::protobuf::{Any, BoolValue},
};
use meshlane::{
    config,
    discovery::{envoy_admin, iptables, kubernetes, nftables, procfs, xds},
};
use meshlane_fuzz::Mutation;
use prost::Message as _;

/// What the daemon may log or report about one bad input.
const MAX_MESSAGE: usize = 4096;

fn bounded(what: &str, message: String) {
    assert!(
        message.len() <= MAX_MESSAGE,
        "{what}: a {}-byte message from one bad input: {}...",
        message.len(),
        &message[..message.floor_char_boundary(300)]
    );
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const IPTABLES: &[&[u8]] = &[
    include_bytes!("../../accelerator/tests/fixtures/iptables-save-minimesh-default.txt"),
    include_bytes!("../seeds/iptables-excludes-includes.txt"),
    include_bytes!("../seeds/iptables-tproxy.txt"),
    include_bytes!("../../accelerator/tests/fixtures/ip6tables-save-dual-stack.txt"),
];
const IPTABLES_TOKENS: &[&str] = &[
    "-A ISTIO_OUTPUT ",
    "-A ISTIO_INBOUND ",
    "-A ISTIO_REDIRECT ",
    "-A ISTIO_IN_REDIRECT ",
    "-A OUTPUT ",
    "-A PREROUTING ",
    ":ISTIO_OUTPUT - [0:0]\n",
    "*nat\n",
    "*mangle\n",
    "COMMIT\n",
    "-j RETURN",
    "-j ISTIO_REDIRECT",
    "-j ISTIO_IN_REDIRECT",
    "-j REDIRECT --to-ports ",
    "-j TPROXY --on-port ",
    "-m owner --uid-owner ",
    "-m owner --gid-owner ",
    "! ",
    "-p tcp -m tcp --dport ",
    "-m multiport --dports ",
    "-d ",
    "-s ",
    "-o lo ",
    "-i eth0 ",
    "0.0.0.0/0",
    "10.0.0.0/33",
    "256.1.1.1/8",
    "::1/128",
    "::6/128",
    "fd00::/129",
    "::ffff:10.0.0.1/120",
    "65535",
    "65536",
    "0",
    "-1",
    "4294967296",
    "99999999999999999999",
    "1:65535",
    ",",
    "\n",
    " ",
    "\"",
    "\u{0}",
    "é",
];

#[test]
fn iptables_save() {
    for seed in &IPTABLES[..2] {
        iptables::parse(&text(seed)).expect("the iptables seeds are read");
    }
    // TPROXY interception is read, and declined by name.
    assert!(matches!(
        iptables::parse(&text(IPTABLES[2])),
        Err(iptables::Error::Tproxy { .. })
    ));
    check!().with_type::<Mutation>().for_each(|m| {
        let doc = text(&m.bytes(IPTABLES, IPTABLES_TOKENS));
        match iptables::parse(&doc) {
            Ok(cap) => {
                if let Some(why) = &cap.outbound_unsupported {
                    bounded("iptables outbound_unsupported", why.clone());
                }
            }
            Err(e) => bounded("iptables error", e.to_string()),
        }
    });
}

const NFT: &[&[u8]] = &[
    include_bytes!("../../accelerator/tests/fixtures/nft-json-default.json"),
    include_bytes!("../../accelerator/tests/fixtures/nft-json-custom-dual.json"),
    include_bytes!("../../accelerator/tests/fixtures/nft-json-exclude-interface.json"),
];
const NFT_MANGLE: &[u8] =
    include_bytes!("../../accelerator/tests/fixtures/nft-json-tproxy-mangle.json");
const NFT_TOKENS: &[&str] = &[
    "{\"jump\": {\"target\": \"istio-redirect\"}}",
    "{\"return\": null}",
    "{\"redirect\": {\"port\": 70000}}",
    "{\"tproxy\": {\"port\": 15006}}",
    "{\"set\": []}",
    "{\"range\": [9, 1]}",
    "{\"prefix\": {\"addr\": \"::\", \"len\": 200}}",
    "\"skuid\"",
    "\"nfproto\"",
    "\"!=\"",
    "\"hook\": \"output\"",
    "null",
    "-1",
    "18446744073709551616",
    "\\u0000",
    "[",
    "{",
];

/// Istio's nftables capture: `nft -j` output, turned into iptables form and read by the same
/// parser, for both families, with and without the TPROXY mangle table.
#[test]
fn nft_json() {
    for seed in NFT {
        let tables = nftables::Tables {
            nat: text(seed),
            mangle: None,
        };
        for family in [nftables::Family::V4, nftables::Family::V6] {
            let ipt = nftables::to_iptables_save(&tables, family).expect("the nft seeds convert");
            iptables::parse(&ipt).expect("the nft seeds are read");
        }
    }
    check!()
        .with_type::<(bool, bool, Mutation)>()
        .for_each(|(v6, mangle, m)| {
            let tables = nftables::Tables {
                nat: text(&m.json(NFT, NFT_TOKENS).0),
                mangle: mangle.then(|| text(NFT_MANGLE)),
            };
            let family = if *v6 {
                nftables::Family::V6
            } else {
                nftables::Family::V4
            };
            match nftables::to_iptables_save(&tables, family) {
                Ok(ipt) => match iptables::parse(&ipt) {
                    Ok(cap) => {
                        if let Some(why) = &cap.outbound_unsupported {
                            bounded("nft outbound_unsupported", why.clone());
                        }
                    }
                    Err(e) => bounded("nft parse error", e.to_string()),
                },
                Err(e) => bounded("nft error", e.to_string()),
            }
        });
}

const ADMIN_LISTENERS: &[&[u8]] = &[
    include_bytes!("../../accelerator/tests/fixtures/envoy-1.40-client-static-listeners.json"),
    include_bytes!("../../accelerator/tests/fixtures/envoy-1.40-server-static-listeners.json"),
    include_bytes!("../seeds/envoy-dynamic-listeners.json"),
];
const ADMIN_CLUSTERS: &[&[u8]] = &[
    include_bytes!("../../accelerator/tests/fixtures/envoy-1.40-server-static-clusters.json"),
    include_bytes!("../seeds/envoy-dynamic-clusters.json"),
];
const ADMIN_BOOTSTRAP: &[&[u8]] = &[include_bytes!("../seeds/envoy-bootstrap-node.json")];
const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "null",
    "true",
    "1e999",
    "-1",
    "18446744073709551616",
    "\"port_value\": 70000",
    "\"address\": \"::\"",
    "\"use_original_dst\": true",
    "\"name\": \"envoy.filters.listener.original_dst\"",
    "\\u0000",
    "\\ud800",
];
const EMPTY_DUMP: &str = r#"{"configs": []}"#;

#[test]
fn envoy_admin_config_dump() {
    for (i, l) in ADMIN_LISTENERS.iter().enumerate() {
        let (sl, dl) = if i < 2 {
            (text(l), EMPTY_DUMP.to_string())
        } else {
            (EMPTY_DUMP.to_string(), text(l))
        };
        let clusters = text(ADMIN_CLUSTERS[i % ADMIN_CLUSTERS.len()]);
        envoy_admin::parse(
            &sl,
            &dl,
            &clusters,
            EMPTY_DUMP,
            Some(&text(ADMIN_BOOTSTRAP[0])),
        )
        .unwrap_or_else(|e| panic!("admin seed {i} is read: {e}"));
    }
    assert_eq!(
        envoy_admin::node_id(&text(ADMIN_BOOTSTRAP[0])).unwrap(),
        Some("sidecar~10.1.2.3~productpage-v1-abc.default~default.svc.cluster.local".into())
    );
    // Which of the five answers this input changes; the others stay their seeds.
    check!()
        .with_type::<(u8, Mutation)>()
        .for_each(|(which, m)| {
            let mut answers = [
                text(ADMIN_LISTENERS[0]),
                text(ADMIN_LISTENERS[2]),
                text(ADMIN_CLUSTERS[0]),
                text(ADMIN_CLUSTERS[1]),
                text(ADMIN_BOOTSTRAP[0]),
            ];
            let which = usize::from(*which) % answers.len();
            let seeds = match which {
                0 | 1 => ADMIN_LISTENERS,
                2 | 3 => ADMIN_CLUSTERS,
                _ => ADMIN_BOOTSTRAP,
            };
            answers[which] = text(&m.json(seeds, JSON_TOKENS).0);
            let [sl, dl, sc, dc, boot] = &answers;
            if let Err(e) = envoy_admin::parse(sl, dl, sc, dc, Some(boot)) {
                bounded("admin API error", e.to_string());
            }
            match envoy_admin::node_id(boot) {
                Ok(Some(id)) => {
                    let _ = envoy_admin::pod_name_from_node_id(&id);
                }
                Ok(None) => {}
                Err(e) => bounded("node id error", e.to_string()),
            }
        });
}

const HTTP: &[&[u8]] = &[
    include_bytes!("../seeds/http-content-length.bin"),
    include_bytes!("../seeds/http-chunked.bin"),
    include_bytes!("../seeds/http-close-delimited.bin"),
];
const HTTP_TOKENS: &[&str] = &[
    "\r\n",
    "\n",
    "\r",
    "transfer-encoding: chunked\r\n",
    "content-length: ",
    "content-length: 18446744073709551615\r\n",
    "ffffffffffffffff\r\n",
    "fffffffffffffff0\r\n",
    "7fffffffffffffff",
    "0\r\n\r\n",
    ";",
    ":",
    "HTTP/1.1 ",
    "HTTP/2 ",
    "200 ",
    "99999 ",
];

/// The daemon's admin client (hyper underneath, with the daemon's limits) reading what a pod's
/// admin port may answer; it used to be a hand-written reader, fuzzed here the same way.
#[test]
fn admin_http_response() {
    let client = envoy_admin::client(Duration::from_secs(5));
    for seed in HTTP {
        client.replay(seed).expect("the HTTP seeds are read");
    }
    check!().with_type::<Mutation>().for_each(|m| {
        let doc = m.bytes(HTTP, HTTP_TOKENS);
        // replay() feeds the answer seven bytes at a time, as a slow peer's would arrive.
        match client.replay(&doc) {
            Ok(r) => assert!(
                r.body.len() <= doc.len(),
                "a {}-byte body from {} bytes of response",
                r.body.len(),
                doc.len()
            ),
            Err(e) => bounded("HTTP error", e.to_string()),
        }
    });
}

const PODS: &[&[u8]] = &[
    include_bytes!("../../accelerator/tests/fixtures/kube/injected-istio-init.json"),
    include_bytes!("../../accelerator/tests/fixtures/kube/istio-cni.json"),
    include_bytes!("../../accelerator/tests/fixtures/kube/native-sidecar.json"),
    include_bytes!("../../accelerator/tests/fixtures/kube/no-sidecar.json"),
];
const POD_TOKENS: &[&str] = &[
    "\"sidecar.istio.io/inject\": \"false\",",
    "\"traffic.sidecar.istio.io/excludeOutboundPorts\": \"1,2,99999\",",
    "\"traffic.sidecar.istio.io/includeOutboundIPRanges\": \"*,10.0.0.0/33\",",
    "\"traffic.sidecar.istio.io/includeInboundPorts\": \"\",",
    "\"args\": [\"-p\", \"-p\"],",
    "\"-q\",",
    "\"--istio-outbound-ports\",",
    "\"runAsUser\": -1,",
    "\"podIPs\": [{\"ip\": \"fd00::1\"}],",
    "\"phase\": \"Pending\",",
];

#[test]
fn kubernetes_pod() {
    for (i, seed) in PODS.iter().enumerate() {
        let value = serde_json::from_slice(seed).unwrap();
        let pod = kubernetes::decode(value)
            .unwrap_or_else(|(name, d)| panic!("pod seed {i} ({name}) decodes: {d:?}"));
        let mapped = kubernetes::map(&pod, None).expect("a running pod maps");
        // The last seed has no sidecar; the others are accelerated as they come.
        assert_eq!(mapped.verdict.is_ok(), i < 3, "pod seed {i}: {mapped:?}");
    }
    let ns = kubernetes::NamespaceFacts {
        labels: [("istio-injection".to_string(), "enabled".to_string())].into(),
        annotations: Default::default(),
    };
    check!()
        .with_type::<(bool, Mutation)>()
        .for_each(|(with_ns, m)| {
            let Some(value) = m.json(PODS, POD_TOKENS).1 else {
                return;
            };
            match kubernetes::decode(value) {
                Ok(pod) => {
                    let Some(mapped) = kubernetes::map(&pod, with_ns.then_some(&ns)) else {
                        return;
                    };
                    if let Err(d) = &mapped.verdict {
                        bounded("pod declined", d.detail.clone());
                    }
                    for note in &mapped.notes {
                        bounded("pod note", note.clone());
                    }
                }
                Err((_, d)) => bounded("pod decode", d.detail),
            }
        });
}

fn listener(name: &str, port: u32, original_dst: bool) -> Listener {
    Listener {
        name: name.into(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "0.0.0.0".into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..SocketAddress::default()
            })),
        }),
        use_original_dst: original_dst.then_some(BoolValue { value: true }),
        listener_filters: if original_dst {
            Vec::new()
        } else {
            vec![ListenerFilter {
                name: "envoy.filters.listener.original_dst".into(),
                ..ListenerFilter::default()
            }]
        },
        ..Listener::default()
    }
}

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

#[test]
fn xds_listeners() {
    let seeds: Vec<Vec<u8>> = [
        listener("virtualOutbound", 15001, true),
        listener("virtualInbound", 15006, false),
        listener("0.0.0.0_8080", 8080, false),
    ]
    .iter()
    .map(|l| l.encode_to_vec())
    .collect();
    let seeds: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    let any = |value: Vec<u8>| Any {
        type_url: LISTENER_TYPE.into(),
        value,
    };
    let all: Vec<Any> = seeds.iter().map(|s| any(s.to_vec())).collect();
    let cap = xds::parse_listeners(&all).expect("the xDS seeds are read");
    assert_eq!(
        (cap.outbound_port, cap.inbound_port),
        (Some(15001), Some(15006))
    );
    check!()
        .with_type::<(Vec<Mutation>, bool)>()
        .for_each(|(ms, wrong_type)| {
            let mut resources: Vec<Any> = ms
                .iter()
                .take(8)
                .map(|m| any(m.bytes(&seeds, &[])))
                .collect();
            if *wrong_type {
                if let Some(r) = resources.first_mut() {
                    r.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
                }
            }
            if let Err(e) = xds::parse_listeners(&resources) {
                bounded("xDS NACK", e);
            }
        });
}

const POD_LIST: &[&[u8]] = &[include_bytes!("../seeds/pods.toml")];
const TOML_TOKENS: &[&str] = &[
    "[[pod]]\n",
    "name = \"a/b\"\n",
    "netns = \"/run/netns/x\"\n",
    "proxy_uid = 4294967296\n",
    "outbound_port = 0\n",
    "exclude_outbound_cidrs = [\"10.0.0.0/40\"]\n",
    "mode = \"bogus\"\n",
    "accelerate = \"yes\"\n",
    "\"",
    "=",
    "[",
    "]",
    "\n",
];

#[test]
fn pod_list_toml() {
    let list = config::parse_all(Path::new("pods.toml"), &text(POD_LIST[0]))
        .expect("the pod list seed is read");
    assert_eq!((list.pods.len(), list.opted_out.len()), (2, 1));
    check!().with_type::<Mutation>().for_each(|m| {
        let doc = text(&m.bytes(POD_LIST, TOML_TOKENS));
        // A local file the operator writes: its errors quote it, so only "no panic" holds.
        let _ = config::parse_all(Path::new("pods.toml"), &doc);
    });
}

const STATUS: &[&[u8]] = &[include_bytes!("../seeds/proc-status.txt")];
const NET_TCP: &[&[u8]] = &[include_bytes!("../seeds/proc-net-tcp.txt")];
const CGROUP: &[&[u8]] = &[include_bytes!("../seeds/proc-cgroup.txt")];
const PROC_TOKENS: &[&str] = &[
    "\t",
    " ",
    "\n",
    ":",
    "Uid:",
    "Gid:",
    "4294967296",
    "FFFFFFFF",
    "ZZ",
    "pod",
    "_",
    "-",
    ".slice",
];

#[test]
fn proc_files() {
    assert_eq!(procfs::parse_status(&text(STATUS[0])), Ok((1337, 1337)));
    assert_eq!(procfs::parse_net_tcp(&text(NET_TCP[0])).unwrap().len(), 3);
    assert_eq!(
        procfs::pod_uid_from_cgroup(&text(CGROUP[0])).as_deref(),
        Some("1b4e2f3a-5c6d-4e7f-8a9b-0c1d2e3f4a5b")
    );
    check!()
        .with_type::<(u8, Mutation)>()
        .for_each(|(which, m)| match which % 3 {
            0 => {
                if let Err(e) = procfs::parse_status(&text(&m.bytes(STATUS, PROC_TOKENS))) {
                    bounded("status", e);
                }
            }
            1 => {
                if let Err(e) = procfs::parse_net_tcp(&text(&m.bytes(NET_TCP, PROC_TOKENS))) {
                    bounded("net/tcp", e);
                }
            }
            _ => {
                let _ = procfs::pod_uid_from_cgroup(&text(&m.bytes(CGROUP, PROC_TOKENS)));
            }
        });
}
