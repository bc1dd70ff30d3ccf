//! A running sidecar's own account of where it listens: its admin API's `/config_dump`, read
//! from inside the pod's network namespace (the admin port listens on 127.0.0.1 there).
//!
//! Istio names the capture listeners `virtualOutbound` (`use_original_dst`) and
//! `virtualInbound` (the `original_dst` listener filter); those names are tried first, the
//! listener shapes second. The inbound source address is the `upstream_bind_config` of the
//! inbound clusters (`inbound|<port>||`, `InboundPassthroughCluster[Ipv4]`). Requests carry a
//! field mask, so a sidecar with thousands of clusters still answers in a few KiB per cluster.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use serde_json::Value;

use super::clip;

mod http;
pub use http::{client, get, MAX_BODY};

/// What one sidecar's configuration says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvoyFacts {
    /// `node.id` of the bootstrap (Istio: `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc...`).
    pub node_id: Option<String>,
    /// Port of the outbound capture listener.
    pub outbound_port: u16,
    /// Port of the inbound capture listener.
    pub inbound_port: u16,
    /// Source address of the inbound clusters, when they set one.
    pub inbound_bind: Option<Ipv4Addr>,
    /// The inbound listener is `transparent` (Istio's TPROXY interception mode).
    pub inbound_transparent: bool,
    /// Things worth a log line (several bind addresses, fallbacks used).
    pub notes: Vec<String>,
}

/// What the pod's sidecar answered (a body, a value) is cut to a few hundred characters when
/// shown: it goes to the log and to status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("admin API at {addr} unreachable: {source}")]
    Unreachable {
        addr: SocketAddrV4,
        source: io::Error,
    },
    #[error("admin API {path}: HTTP {status}: {}", clip(body))]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("admin API {path}: {}", clip(message))]
    Http { path: String, message: String },
    #[error("{what}: not JSON: {}", clip(message))]
    Json { what: String, message: String },
    #[error("{what}: field `{}`: {}", clip(field), clip(message))]
    Field {
        what: String,
        field: String,
        message: String,
    },
}

/// The masks applied to each resource, so only the fields read here travel.
const LISTENER_FIELDS: [&str; 5] = [
    "name",
    "address",
    "use_original_dst",
    "transparent",
    "listener_filters",
];

/// The admin requests [`fetch`] makes, as (what, path).
pub fn requests() -> Vec<(&'static str, String)> {
    let mask = |prefix: &str| {
        LISTENER_FIELDS
            .iter()
            .map(|f| format!("{prefix}{f}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    vec![
        (
            "static_listeners",
            format!(
                "/config_dump?resource=static_listeners&mask={}",
                mask("listener.")
            ),
        ),
        (
            "dynamic_listeners",
            format!(
                "/config_dump?resource=dynamic_listeners&mask={}",
                mask("active_state.listener.")
            ),
        ),
        (
            "static_clusters",
            "/config_dump?resource=static_clusters&mask=cluster.name,cluster.upstream_bind_config"
                .into(),
        ),
        (
            "dynamic_active_clusters",
            "/config_dump?resource=dynamic_active_clusters&mask=cluster.name,cluster.upstream_bind_config"
                .into(),
        ),
        ("bootstrap", "/config_dump?mask=bootstrap.node.id".into()),
    ]
}

/// Reads the sidecar's facts from its admin API at `admin`, inside the network namespace
/// `netns` (entered by a short-lived thread).
pub fn fetch(
    netns: &std::fs::File,
    admin: SocketAddrV4,
    timeout: Duration,
) -> Result<EnvoyFacts, Error> {
    let bodies = crate::node::in_netns(netns, || -> Result<Vec<String>, Error> {
        requests()
            .iter()
            .map(|(_, path)| get(admin, path, timeout))
            .collect()
    })
    .map_err(|e| Error::Unreachable {
        addr: admin,
        source: e,
    })
    .and_then(|r| r)?;
    let [sl, dl, sc, dc, boot] = <[String; 5]>::try_from(bodies).map_err(|_| Error::Http {
        path: "/config_dump".into(),
        message: "wrong number of answers".into(),
    })?;
    parse(&sl, &dl, &sc, &dc, Some(&boot))
}

/// Interprets the answers to [`requests`] (the bootstrap one is optional).
pub fn parse(
    static_listeners: &str,
    dynamic_listeners: &str,
    static_clusters: &str,
    dynamic_clusters: &str,
    bootstrap: Option<&str>,
) -> Result<EnvoyFacts, Error> {
    let mut listeners = entries("static_listeners", static_listeners, &["listener"])?;
    listeners.extend(entries(
        "dynamic_listeners",
        dynamic_listeners,
        &["active_state", "listener"],
    )?);
    let mut notes = Vec::new();
    let outbound = pick_outbound(&listeners, &mut notes)?;
    let inbound = pick_inbound(&listeners, outbound.as_ref().map(|l| l.index), &mut notes)?;
    let outbound = outbound.ok_or_else(|| Error::Field {
        what: "listeners".into(),
        field: "virtualOutbound".into(),
        message: "no listener named virtualOutbound, and no single 0.0.0.0 listener with use_original_dst: true".into(),
    })?;
    let inbound = inbound.ok_or_else(|| Error::Field {
        what: "listeners".into(),
        field: "virtualInbound".into(),
        message: "no listener named virtualInbound, and no single other 0.0.0.0 listener with the original_dst listener filter".into(),
    })?;

    let mut clusters = entries("static_clusters", static_clusters, &["cluster"])?;
    clusters.extend(entries(
        "dynamic_active_clusters",
        dynamic_clusters,
        &["cluster"],
    )?);
    let mut binds: Vec<Ipv4Addr> = Vec::new();
    for c in &clusters {
        let name = str_field(c, "name")?.unwrap_or_default();
        if !(name.starts_with("inbound|") || name.starts_with("InboundPassthroughCluster")) {
            continue;
        }
        let Some(addr) = c
            .value
            .pointer("/upstream_bind_config/source_address/address")
        else {
            continue;
        };
        let field = format!("{}.upstream_bind_config.source_address.address", c.path);
        let ip: Ipv4Addr =
            addr.as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::Field {
                    what: c.what.into(),
                    field,
                    message: format!("{} is not an IPv4 address", clip(&addr.to_string())),
                })?;
        if !binds.contains(&ip) {
            binds.push(ip);
        }
    }
    if binds.len() > 1 {
        notes.push(format!(
            "inbound clusters bind to several addresses {binds:?}; using {}",
            binds[0]
        ));
    }
    let node_id = match bootstrap {
        Some(b) => node_id(b)?,
        None => None,
    };
    Ok(EnvoyFacts {
        node_id,
        outbound_port: outbound.port,
        inbound_port: inbound.port,
        inbound_bind: binds.first().copied(),
        inbound_transparent: inbound.transparent,
        notes,
    })
}

/// `bootstrap.node.id` from `/config_dump?mask=bootstrap.node.id`.
pub fn node_id(text: &str) -> Result<Option<String>, Error> {
    let list = entries("bootstrap", text, &["bootstrap", "node"])?;
    for e in list {
        if let Some(id) = str_field(&e, "id")? {
            return Ok(Some(id.to_string()));
        }
    }
    Ok(None)
}

/// `<namespace>/<pod>` from an Istio sidecar node id
/// (`sidecar~10.1.2.3~productpage-v1-abc.default~default.svc.cluster.local`).
pub fn pod_name_from_node_id(id: &str) -> Option<String> {
    let mut parts = id.split('~');
    let (kind, _ip, pod_ns, _domain) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind != "sidecar" || parts.next().is_some() {
        return None;
    }
    let (pod, ns) = pod_ns.rsplit_once('.')?;
    (!pod.is_empty() && !ns.is_empty()).then(|| format!("{ns}/{pod}"))
}

/// One resource of a config dump, with where it came from for error messages.
struct Entry {
    what: &'static str,
    path: String,
    value: Value,
}

/// `configs[i].<inner...>` of a config-dump answer (an empty `{}` when nothing matched).
fn entries(what: &'static str, text: &str, inner: &[&str]) -> Result<Vec<Entry>, Error> {
    let doc: Value = serde_json::from_str(text).map_err(|e| Error::Json {
        what: what.into(),
        message: e.to_string(),
    })?;
    let field = |field: String, message: &str| Error::Field {
        what: what.into(),
        field,
        message: message.into(),
    };
    let obj = doc
        .as_object()
        .ok_or_else(|| field("(top level)".into(), "is not an object"))?;
    let Some(configs) = obj.get("configs") else {
        return Ok(Vec::new());
    };
    let configs = configs
        .as_array()
        .ok_or_else(|| field("configs".into(), "is not a list"))?;
    let mut out = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        let mut path = format!("configs[{i}]");
        if !c.is_object() {
            return Err(field(path, "is not an object"));
        }
        let mut v = c;
        let mut missing = false;
        for key in inner {
            match v.get(key) {
                Some(next) => {
                    path.push('.');
                    path.push_str(key);
                    v = next;
                }
                None => {
                    missing = true;
                    break;
                }
            }
        }
        // A dynamic listener that is only warming, draining or failed has no active state.
        if missing {
            continue;
        }
        if !v.is_object() {
            return Err(field(path, "is not an object"));
        }
        out.push(Entry {
            what,
            path,
            value: v.clone(),
        });
    }
    Ok(out)
}

fn str_field<'a>(e: &'a Entry, key: &str) -> Result<Option<&'a str>, Error> {
    match e.value.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Error::Field {
            what: e.what.into(),
            field: format!("{}.{key}", e.path),
            message: format!("{} is not a string", clip(&other.to_string())),
        }),
    }
}

fn bool_field(e: &Entry, key: &str) -> Result<bool, Error> {
    match e.value.get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(Error::Field {
            what: e.what.into(),
            field: format!("{}.{key}", e.path),
            message: format!("{} is not a boolean", clip(&other.to_string())),
        }),
    }
}

/// A capture-listener candidate.
struct Listener {
    index: usize,
    port: u16,
    transparent: bool,
    use_original_dst: bool,
}

/// The listener's `address.socket_address`, when it is a socket address: (address, port).
fn socket_address(e: &Entry) -> Result<Option<(String, u16)>, Error> {
    let Some(sa) = e.value.pointer("/address/socket_address") else {
        return Ok(None);
    };
    let field = |f: &str, message: String| Error::Field {
        what: e.what.into(),
        field: format!("{}.address.socket_address.{f}", e.path),
        // The message quotes the listener's value, which can be any size.
        message: clip(&message),
    };
    let addr = match sa.get("address") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(field("address", format!("{other} is not a string"))),
        None => return Err(field("address", "is missing".into())),
    };
    let port = match sa.get("port_value") {
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| field("port_value", format!("{v} is not a port")))?,
        None => return Err(field("port_value", "is missing".into())),
    };
    Ok(Some((addr, port)))
}

fn is_wildcard(addr: &str) -> bool {
    addr == "0.0.0.0" || addr == "::"
}

fn listener(index: usize, e: &Entry) -> Result<Listener, Error> {
    let (_, port) = socket_address(e)?.ok_or_else(|| Error::Field {
        what: e.what.into(),
        field: format!("{}.address.socket_address", e.path),
        message: "is missing".into(),
    })?;
    Ok(Listener {
        index,
        port,
        transparent: bool_field(e, "transparent")?,
        use_original_dst: bool_field(e, "use_original_dst")?,
    })
}

fn named<'a>(list: &'a [Entry], name: &str) -> Result<Vec<(usize, &'a Entry)>, Error> {
    let mut out = Vec::new();
    for (i, e) in list.iter().enumerate() {
        if str_field(e, "name")? == Some(name) {
            out.push((i, e));
        }
    }
    Ok(out)
}

fn pick_outbound(list: &[Entry], notes: &mut Vec<String>) -> Result<Option<Listener>, Error> {
    if let Some((i, e)) = named(list, "virtualOutbound")?.first() {
        let l = listener(*i, e)?;
        if !l.use_original_dst {
            notes.push("virtualOutbound does not set use_original_dst".into());
        }
        return Ok(Some(l));
    }
    let mut found = Vec::new();
    for (i, e) in list.iter().enumerate() {
        if bool_field(e, "use_original_dst")?
            && socket_address(e)?.is_some_and(|(a, _)| is_wildcard(&a))
        {
            found.push(listener(i, e)?);
        }
    }
    if found.len() == 1 {
        notes.push("no listener named virtualOutbound; using the one with use_original_dst".into());
        return Ok(found.pop());
    }
    Ok(None)
}

fn has_original_dst_filter(e: &Entry) -> Result<bool, Error> {
    let Some(filters) = e.value.get("listener_filters") else {
        return Ok(false);
    };
    let filters = filters.as_array().ok_or_else(|| Error::Field {
        what: e.what.into(),
        field: format!("{}.listener_filters", e.path),
        message: "is not a list".into(),
    })?;
    Ok(filters.iter().any(|f| {
        f.get("name").and_then(Value::as_str) == Some("envoy.filters.listener.original_dst")
            || f.pointer("/typed_config/@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(".original_dst.v3.OriginalDst"))
    }))
}

fn pick_inbound(
    list: &[Entry],
    outbound: Option<usize>,
    notes: &mut Vec<String>,
) -> Result<Option<Listener>, Error> {
    if let Some((i, e)) = named(list, "virtualInbound")?.first() {
        return listener(*i, e).map(Some);
    }
    let mut found = Vec::new();
    for (i, e) in list.iter().enumerate() {
        if Some(i) != outbound
            && has_original_dst_filter(e)?
            && socket_address(e)?.is_some_and(|(a, _)| is_wildcard(&a))
        {
            found.push(listener(i, e)?);
        }
    }
    if found.len() == 1 {
        notes.push(
            "no listener named virtualInbound; using the one with the original_dst filter".into(),
        );
        return Ok(found.pop());
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real answers of Envoy 1.40 in minimesh pods to the masked requests of [`requests`].
    const SERVER_LISTENERS: &str =
        include_str!("../../tests/fixtures/envoy-1.40-server-static-listeners.json");
    const CLIENT_LISTENERS: &str =
        include_str!("../../tests/fixtures/envoy-1.40-client-static-listeners.json");
    const SERVER_CLUSTERS: &str =
        include_str!("../../tests/fixtures/envoy-1.40-server-static-clusters.json");
    const BOOTSTRAP: &str = r#"{"configs":[{"@type":"type.googleapis.com/envoy.admin.v3.BootstrapConfigDump","bootstrap":{"node":{"id":"sidecar~10.1.2.3~productpage-v1-6b746f74dc-9stvr.bookinfo~bookinfo.svc.cluster.local"}}}]}"#;

    /// Listeners as istiod delivers them over LDS, in the config dump's DynamicListener shape.
    fn dynamic(out_port: u16, in_port: u16) -> String {
        format!(
            r#"{{"configs":[
            {{"@type":"type.googleapis.com/envoy.admin.v3.ListenersConfigDump.DynamicListener",
              "name":"virtualOutbound",
              "active_state":{{"version_info":"2026-11-26T15:00:00Z/12","listener":{{
                "@type":"type.googleapis.com/envoy.config.listener.v3.Listener","name":"virtualOutbound",
                "address":{{"socket_address":{{"address":"0.0.0.0","port_value":{out_port}}}}},
                "use_original_dst":true}},"last_updated":"2026-11-26T15:00:01Z"}}}},
            {{"@type":"type.googleapis.com/envoy.admin.v3.ListenersConfigDump.DynamicListener",
              "name":"0.0.0.0_9080","warming_state":{{"listener":{{"name":"0.0.0.0_9080"}}}}}},
            {{"@type":"type.googleapis.com/envoy.admin.v3.ListenersConfigDump.DynamicListener",
              "name":"virtualInbound",
              "active_state":{{"listener":{{"name":"virtualInbound",
                "address":{{"socket_address":{{"address":"0.0.0.0","port_value":{in_port}}}}},
                "listener_filters":[{{"name":"envoy.filters.listener.original_dst"}}]}}}}}}
            ]}}"#
        )
    }

    #[test]
    fn real_static_bootstrap() {
        let f = parse(SERVER_LISTENERS, "{}", SERVER_CLUSTERS, "{}", None).unwrap();
        assert_eq!((f.outbound_port, f.inbound_port), (15001, 15006));
        assert_eq!(f.inbound_bind, Some(Ipv4Addr::new(127, 0, 0, 6)));
        assert!(!f.inbound_transparent);
        assert!(f.notes.is_empty(), "{:?}", f.notes);
        let f = parse(CLIENT_LISTENERS, "{}", "{}", "{}", None).unwrap();
        assert_eq!((f.outbound_port, f.inbound_port), (15001, 15006));
        assert_eq!(f.inbound_bind, None);
    }

    #[test]
    fn dynamic_listeners_and_node_id() {
        let f = parse("{}", &dynamic(15011, 15016), "{}", "{}", Some(BOOTSTRAP)).unwrap();
        assert_eq!((f.outbound_port, f.inbound_port), (15011, 15016));
        let id = f.node_id.unwrap();
        assert_eq!(
            pod_name_from_node_id(&id).as_deref(),
            Some("bookinfo/productpage-v1-6b746f74dc-9stvr")
        );
        assert_eq!(pod_name_from_node_id("router~1.2.3.4~gw.ns~ns.svc"), None);
        assert_eq!(pod_name_from_node_id("sidecar~x"), None);
    }

    #[test]
    fn shapes_without_istio_names() {
        let renamed = dynamic(15001, 15006)
            .replace("\"virtualOutbound\"", "\"out\"")
            .replace("\"virtualInbound\"", "\"in\"");
        let f = parse("{}", &renamed, "{}", "{}", None).unwrap();
        assert_eq!((f.outbound_port, f.inbound_port), (15001, 15006));
        assert_eq!(f.notes.len(), 2, "{:?}", f.notes);
    }

    #[test]
    fn transparent_inbound_is_seen() {
        let t = SERVER_LISTENERS.replacen(
            "\"name\": \"virtualInbound\",",
            "\"name\": \"virtualInbound\", \"transparent\": true,",
            1,
        );
        assert!(
            parse(&t, "{}", "{}", "{}", None)
                .unwrap()
                .inbound_transparent
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                SERVER_LISTENERS.replacen("15001", "\"x\"", 1),
                "configs[0].listener.address.socket_address.port_value",
            ),
            (
                SERVER_LISTENERS.replacen("15001", "70000", 1),
                "configs[0].listener.address.socket_address.port_value",
            ),
            (
                SERVER_LISTENERS.replacen(
                    "\"use_original_dst\": true",
                    "\"use_original_dst\": 1",
                    1,
                ),
                "configs[0].listener.use_original_dst",
            ),
            (
                SERVER_LISTENERS
                    .replacen("\"virtualInbound\"", "\"other\"", 1)
                    .replace("original_dst", "x"),
                "virtualInbound",
            ),
            (
                SERVER_LISTENERS
                    .replacen("\"virtualOutbound\"", "\"other\"", 1)
                    .replacen("true", "false", 1),
                "virtualOutbound",
            ),
            (r#"{"configs": {}}"#.to_string(), "field `configs`"),
            (r#"[1]"#.to_string(), "(top level)"),
            (r#"{"configs": [1]}"#.to_string(), "configs[0]"),
            ("{".to_string(), "not JSON"),
        ];
        for (text, want) in cases {
            let err = parse(&text, "{}", "{}", "{}", None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "want {want:?} in {err}");
        }
        let bad_bind = SERVER_CLUSTERS.replacen("127.0.0.6", "localhost", 1);
        let err = parse(SERVER_LISTENERS, "{}", &bad_bind, "{}", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("upstream_bind_config.source_address.address"),
            "{err}"
        );
        for cut in 0..SERVER_LISTENERS.len() {
            let _ = parse(&SERVER_LISTENERS[..cut], "{}", "{}", "{}", None);
        }
    }

    /// Deeply nested JSON from a hostile admin port is a parse error, not a stack overflow.
    #[test]
    fn deeply_nested_json_is_an_error() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let _ = parse(&deep, &deep, &deep, &deep, None);
    }
}
