//! The sidecar's bootstrap: Istio's listener and cluster layout (see the module above) built as
//! JSON and written as YAML.

use super::*;

/// Istio's connect timeout for every cluster.
const CONNECT_TIMEOUT: &str = "10s";
/// Istio's circuit-breaker thresholds: effectively unlimited.
const UNLIMITED: u64 = u32::MAX as u64;

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
