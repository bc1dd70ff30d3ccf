//! An ADS client (state of the world) that asks the control plane for a sidecar's Listener
//! resources with the sidecar's own identity, and reads the real capture ports from them: the
//! listener istiod calls `virtualOutbound` (`use_original_dst`) and `virtualInbound` (the
//! `original_dst` listener filter). Good updates are ACKed; a response that cannot be read is
//! NACKed with the reason (the field named) and the last good state is kept. A broken stream is
//! retried with exponential backoff, resubscribing with the last accepted version.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{
            core::v3::{address, socket_address::PortSpecifier, Node},
            listener::v3::Listener,
        },
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::{protobuf::Any, rpc},
};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::Wake;

/// The resource type this client subscribes to.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const ORIGINAL_DST_FILTER: &str = "envoy.filters.listener.original_dst";
/// gRPC INVALID_ARGUMENT, the code of a NACK's error detail.
const INVALID_ARGUMENT: i32 = 3;

/// Who to ask, and as whom.
#[derive(Clone, Debug)]
pub struct Config {
    /// The control plane, e.g. `http://istiod.istio-system.svc:15010`.
    pub server: String,
    /// The sidecar's node id, as Istio forms it: `sidecar~<pod ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
    pub node_id: String,
    /// The node's cluster (Istio: `<app>.<namespace>`).
    pub cluster: String,
    /// Reconnect backoff: doubles from `backoff_min` up to `backoff_max`, each wait a random
    /// 50-100% of its step ([`super::backoff::Backoff`]).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// What a sidecar's listeners say about how its pod's traffic is captured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    /// Port of the listener outbound traffic is redirected to (`virtualOutbound`).
    pub outbound_port: Option<u16>,
    /// Port of the listener inbound traffic is redirected to (`virtualInbound`).
    pub inbound_port: Option<u16>,
    /// The inbound listener is `transparent`: TPROXY interception.
    pub tproxy: bool,
    /// Listener resources in the accepted update.
    pub listeners: usize,
}

/// The client's state, for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// The last accepted (ACKed) update; kept while later ones are NACKed or the stream is down.
    pub capture: Option<Capture>,
    /// Its `version_info`.
    pub version: String,
    pub connected: bool,
    /// The last NACK reason or connection error; cleared by the next accepted update.
    pub last_error: String,
    pub acks: u64,
    pub nacks: u64,
    /// Streams opened after the first (reconnects).
    pub reconnects: u64,
}

impl Status {
    /// The stream's problem, if it has one: a NACKed update or a connection error (kept until
    /// the next accepted update), or a stream down after it had been up. A first connection
    /// still under way is not a problem yet: it ends in an update or in an error soon (the
    /// connect timeout is 2 s).
    pub fn problem(&self) -> Option<String> {
        if !self.last_error.is_empty() {
            Some(self.last_error.clone())
        } else if !self.connected && (self.acks > 0 || self.reconnects > 0) {
            Some("not connected".into())
        } else {
            None
        }
    }
}

/// A running client; dropping it stops the stream.
pub struct Client {
    status: Arc<Mutex<Status>>,
    updates: watch::Receiver<u64>,
    _stop: watch::Sender<bool>,
}

impl Client {
    /// Starts the client on the current tokio runtime.
    pub fn spawn(cfg: Config) -> Client {
        Client::spawn_waking(cfg, None)
    }

    /// Like [`Client::spawn`]; an accepted update that changes the capture also wakes `wake`
    /// (the daemon's reconcile loop), so it takes effect at once instead of at the next resync.
    pub fn spawn_waking(cfg: Config, wake: Option<Wake>) -> Client {
        let status = Arc::new(Mutex::new(Status::default()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (upd_tx, upd_rx) = watch::channel(0u64);
        let shared = Shared {
            status: Arc::clone(&status),
            updates: upd_tx,
            wake,
        };
        tokio::spawn(run(cfg, shared, stop_rx));
        Client {
            status,
            updates: upd_rx,
            _stop: stop_tx,
        }
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes whenever the status changes (an ACK, a NACK, a connection event).
    pub fn updates(&self) -> watch::Receiver<u64> {
        self.updates.clone()
    }
}

/// Reads the capture ports from one response's resources. Every resource must be a Listener
/// that decodes; the error names the resource and field at fault.
pub fn parse_listeners(resources: &[Any]) -> Result<Capture, String> {
    let mut cap = Capture {
        listeners: resources.len(),
        ..Capture::default()
    };
    let mut fallback_out = None;
    let mut fallback_in = None;
    let mut names = std::collections::HashMap::new();
    for (i, any) in resources.iter().enumerate() {
        if any.type_url != LISTENER_TYPE {
            return Err(format!(
                "resources[{i}].type_url: {:?}, expected {LISTENER_TYPE}",
                any.type_url
            ));
        }
        let l = Listener::decode(any.value.as_slice())
            .map_err(|e| format!("resources[{i}].value: not a Listener: {e}"))?;
        let at = format!("resources[{i}] ({})", l.name);
        // What Envoy itself refuses in an LDS update (it NACKs the whole update), so a state
        // Envoy would not run is never taken for the sidecar's.
        if let Some(j) = names.insert(l.name.clone(), i) {
            return Err(format!(
                "resources[{i}].name: {:?} is also resources[{j}]'s; listener names must be unique",
                l.name
            ));
        }
        if let Some(address::Address::SocketAddress(sa)) =
            l.address.as_ref().and_then(|a| a.address.as_ref())
        {
            if sa.resolver_name.is_empty() && sa.address.parse::<std::net::IpAddr>().is_err() {
                return Err(format!(
                    "{at}.address.socket_address.address: {:?} is not an IP address",
                    sa.address
                ));
            }
        }
        let original_dst = l.use_original_dst.is_some_and(|b| b.value);
        let sniffs_dst = l
            .listener_filters
            .iter()
            .any(|f| f.name == ORIGINAL_DST_FILTER);
        let named_out = l.name == "virtualOutbound";
        let named_in = l.name == "virtualInbound";
        if !(named_out || named_in || original_dst || sniffs_dst) {
            continue;
        }
        let port = listener_port(&l).map_err(|e| format!("{at}.{e}"))?;
        if named_out {
            cap.outbound_port = Some(port);
        } else if named_in {
            cap.inbound_port = Some(port);
            cap.tproxy = l.transparent.is_some_and(|b| b.value);
        } else if original_dst {
            fallback_out.get_or_insert(port);
        } else {
            fallback_in.get_or_insert(port);
        }
    }
    cap.outbound_port = cap.outbound_port.or(fallback_out);
    cap.inbound_port = cap.inbound_port.or(fallback_in);
    Ok(cap)
}

fn listener_port(l: &Listener) -> Result<u16, String> {
    let sa = match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => sa,
        Some(_) => return Err("address: not a socket address".into()),
        None => return Err("address: missing".into()),
    };
    match &sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(*p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("address.socket_address.port_value: {p} is not a port")),
        Some(PortSpecifier::NamedPort(n)) => Err(format!(
            "address.socket_address.named_port: {n:?} (a capture listener needs a number)"
        )),
        None => Err("address.socket_address.port_value: missing".into()),
    }
}

/// The status, and a tick for each change of it.
struct Shared {
    status: Arc<Mutex<Status>>,
    updates: watch::Sender<u64>,
    /// The daemon's loop, woken when the capture changes.
    wake: Option<Wake>,
}

impl Shared {
    /// Changes the status. A change of health wakes the daemon's loop too, so the source's
    /// state in status follows the stream at once, both ways, instead of at the next resync.
    fn set(&self, f: impl FnOnce(&mut Status)) {
        let health_changed = {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            let before = s.problem().is_none();
            f(&mut s);
            before != s.problem().is_none()
        };
        self.updates.send_modify(|n| *n += 1);
        if let (true, Some(w)) = (health_changed, &self.wake) {
            w.notify();
        }
    }

    fn version(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .version
            .clone()
    }
}

async fn run(cfg: Config, shared: Shared, mut stop: watch::Receiver<bool>) {
    let mut backoff = super::backoff::Backoff::new(cfg.backoff_min, cfg.backoff_max);
    let mut first = true;
    loop {
        if !first {
            shared.set(|s| s.reconnects += 1);
        }
        first = false;
        let outcome = tokio::select! {
            r = stream(&cfg, shared.version(), &shared) => r,
            _ = stop.changed() => return,
        };
        let (err, was_up) = match outcome {
            Ok(()) => ("the control plane closed the stream".to_string(), true),
            Err((e, up)) => (e, up),
        };
        if was_up {
            // The stream had worked: start the backoff over.
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::warn!(server = %cfg.server, node = %cfg.node_id, error = %err, retry_in = ?delay, "xDS stream down; keeping the last good state");
        shared.set(|s| {
            s.connected = false;
            s.last_error = err.clone();
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One stream, until it ends. Err carries the reason and whether the stream was ever up.
async fn stream(cfg: &Config, version: String, shared: &Shared) -> Result<(), (String, bool)> {
    let channel = tonic::transport::Endpoint::from_shared(cfg.server.clone())
        .map_err(|e| (format!("server {:?}: {e}", cfg.server), false))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| (format!("connect {}: {e}", cfg.server), false))?;
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
    let node = Node {
        id: cfg.node_id.clone(),
        cluster: cfg.cluster.clone(),
        ..Node::default()
    };
    // Resubscribe with the version we hold, so the server may skip resending it.
    let hello = DiscoveryRequest {
        version_info: version,
        node: Some(node),
        type_url: LISTENER_TYPE.into(),
        ..DiscoveryRequest::default()
    };
    tx.send(hello)
        .await
        .map_err(|_| ("request queue closed".to_string(), false))?;
    let mut inbound = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| (format!("open ADS stream: {e}"), false))?
        .into_inner();
    shared.set(|s| s.connected = true);
    tracing::info!(server = %cfg.server, node = %cfg.node_id, "xDS stream open");
    loop {
        let resp: DiscoveryResponse = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => return Err((format!("stream: {e}"), true)),
        };
        let reply = judge(&resp, shared);
        if tx.send(reply).await.is_err() {
            return Err(("request queue closed".into(), true));
        }
    }
}

/// ACK (the update is now the state) or NACK (kept the old one, said why) one response.
fn judge(resp: &DiscoveryResponse, shared: &Shared) -> DiscoveryRequest {
    let parsed = if resp.type_url != LISTENER_TYPE {
        Err(format!(
            "type_url: {:?}, this client subscribed to {LISTENER_TYPE} only",
            resp.type_url
        ))
    } else {
        parse_listeners(&resp.resources)
    };
    match parsed {
        Ok(cap) => {
            tracing::info!(version = %resp.version_info, outbound = ?cap.outbound_port, inbound = ?cap.inbound_port, "xDS update accepted");
            let version = resp.version_info.clone();
            let mut changed = false;
            shared.set(|s| {
                changed = s.capture.as_ref() != Some(&cap);
                s.capture = Some(cap);
                s.version = version;
                s.last_error.clear();
                s.acks += 1;
            });
            if let (true, Some(w)) = (changed, &shared.wake) {
                w.notify();
            }
            DiscoveryRequest {
                version_info: resp.version_info.clone(),
                response_nonce: resp.nonce.clone(),
                type_url: LISTENER_TYPE.into(),
                ..DiscoveryRequest::default()
            }
        }
        Err(e) => {
            tracing::warn!(version = %resp.version_info, error = %e, "xDS update rejected (NACK); keeping the last good state");
            shared.set(|s| {
                s.last_error = e.clone();
                s.nacks += 1;
            });
            let kept = shared.version();
            DiscoveryRequest {
                version_info: kept,
                response_nonce: resp.nonce.clone(),
                type_url: LISTENER_TYPE.into(),
                error_detail: Some(rpc::Status {
                    code: INVALID_ARGUMENT,
                    message: e,
                    details: Vec::new(),
                }),
                ..DiscoveryRequest::default()
            }
        }
    }
}

/// Istio's node id for a sidecar: `sidecar~<pod ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`,
/// from a pod named `<namespace>/<pod>`.
pub fn istio_node_id(pod: &str, ip: std::net::IpAddr) -> Option<String> {
    let (ns, name) = pod.split_once('/')?;
    Some(format!("sidecar~{ip}~{name}.{ns}~{ns}.svc.cluster.local"))
}

/// What the sidecar's own listeners say, held against the capture the pod was mapped with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// They agree (or xDS has not answered yet).
    Agree,
    /// The inbound listener is transparent: TPROXY, which meshlane declines.
    Tproxy,
    /// The ports differ: the capture rules decide where the kernel sends traffic, so they are
    /// used, and this is said.
    Differ(String),
}

/// How a disagreement note begins (status notes; `meshlane_xds_disagreements` counts them).
pub const DISAGREES: &str = "xDS and the capture rules disagree";

pub fn cross_check(pod: &crate::model::Pod, cap: &Capture) -> Verdict {
    if cap.tproxy {
        return Verdict::Tproxy;
    }
    let mut diffs = Vec::new();
    if let Some(p) = cap.outbound_port.filter(|p| *p != pod.outbound_port) {
        diffs.push(format!(
            "outbound listener {p}, capture rules {}",
            pod.outbound_port
        ));
    }
    if let Some(p) = cap.inbound_port.filter(|p| *p != pod.inbound_port) {
        diffs.push(format!(
            "inbound listener {p}, capture rules {}",
            pod.inbound_port
        ));
    }
    if diffs.is_empty() {
        Verdict::Agree
    } else {
        Verdict::Differ(format!(
            "{DISAGREES} ({}); the rules decide where traffic goes, so they are used",
            diffs.join("; ")
        ))
    }
}

/// One ADS stream per pod, each with the pod's own identity, each a task on the daemon's runtime.
pub struct Pool {
    server: String,
    wake: Wake,
    runtime: tokio::runtime::Handle,
    clients: std::collections::BTreeMap<String, (String, Client)>,
}

impl Pool {
    /// Streams for the daemon's pods, spawned on `runtime`; a capture change wakes `wake`.
    pub fn new(server: String, wake: Wake, runtime: tokio::runtime::Handle) -> Pool {
        Pool {
            server,
            wake,
            runtime,
            clients: std::collections::BTreeMap::new(),
        }
    }

    /// Keeps exactly one stream per wanted pod (name -> node id): new pods get one, a pod
    /// whose identity changed gets a fresh one, pods gone are dropped.
    pub fn sync(&mut self, wanted: &std::collections::BTreeMap<String, String>) {
        self.clients
            .retain(|pod, (node, _)| wanted.get(pod) == Some(node));
        for (pod, node) in wanted {
            if self.clients.contains_key(pod) {
                continue;
            }
            // Called from the daemon's blocking pass: spawn on the runtime by its handle.
            let _guard = self.runtime.enter();
            let client = Client::spawn_waking(
                Config {
                    server: self.server.clone(),
                    node_id: node.clone(),
                    cluster: pod
                        .split_once('/')
                        .map_or_else(|| pod.clone(), |(ns, name)| format!("{name}.{ns}")),
                    backoff_min: Duration::from_millis(250),
                    backoff_max: Duration::from_secs(30),
                },
                Some(self.wake.clone()),
            );
            self.clients.insert(pod.clone(), (node.clone(), client));
        }
    }

    pub fn status(&self, pod: &str) -> Option<Status> {
        self.clients.get(pod).map(|(_, c)| c.status())
    }

    /// Healthy when no stream has a problem ([`Status::problem`]); else the first problem,
    /// named by pod.
    pub fn health(&self) -> Result<(), String> {
        for (pod, (_, c)) in &self.clients {
            if let Some(p) = c.status().problem() {
                return Err(format!("{pod}: {p}"));
            }
        }
        Ok(())
    }
}

/// Holds each pod against what its sidecar's own Listeners say: a TPROXY sidecar is declined,
/// differing ports are noted (the capture rules win: they decide where traffic goes). Pods
/// xDS has not answered for yet pass as they are. `identities` (pod name -> UID and IPs) name
/// each pod's sidecar as istiod knows it. Returns the xDS streams' health.
pub fn check_pods(
    pool: &mut Pool,
    d: &mut super::Discovery,
    identities: &std::collections::BTreeMap<String, (String, Vec<std::net::IpAddr>)>,
) -> super::Health {
    let wanted: std::collections::BTreeMap<String, String> = d
        .pods
        .iter()
        .filter_map(|p| {
            let (_, ips) = identities.get(&p.name)?;
            let ip = ips.iter().find(|i| i.is_ipv4()).or(ips.first())?;
            Some((p.name.clone(), istio_node_id(&p.name, *ip)?))
        })
        .collect();
    pool.sync(&wanted);
    let health = match pool.health() {
        Ok(()) => super::Health::Ok,
        Err(e) => super::Health::Failed(e),
    };
    let mut kept = Vec::with_capacity(d.pods.len());
    for pod in std::mem::take(&mut d.pods) {
        let Some(cap) = pool.status(&pod.name).and_then(|s| s.capture) else {
            kept.push(pod);
            continue;
        };
        match cross_check(&pod, &cap) {
            Verdict::Agree => kept.push(pod),
            Verdict::Tproxy => d.skipped.push(super::Skipped {
                derived: Some((&pod).into()),
                name: pod.name.clone(),
                netns: pod.netns.clone(),
                reason: super::Reason::Tproxy,
                detail: "xDS: the sidecar's virtualInbound listener is transparent (TPROXY interception)".into(),
            }),
            Verdict::Differ(m) => {
                d.notes.push(super::Note {
                    pod: pod.name.clone(),
                    message: m,
                });
                kept.push(pod);
            }
        }
    }
    d.pods = kept;
    health
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::{
        envoy::config::{
            core::v3::{Address, SocketAddress},
            listener::v3::ListenerFilter,
        },
        google::protobuf::BoolValue,
    };

    use super::*;

    fn any(l: &Listener) -> Any {
        Any {
            type_url: LISTENER_TYPE.into(),
            value: l.encode_to_vec(),
        }
    }

    fn at(name: &str, port: Option<PortSpecifier>) -> Listener {
        Listener {
            name: name.into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "0.0.0.0".into(),
                    port_specifier: port,
                    ..SocketAddress::default()
                })),
            }),
            ..Listener::default()
        }
    }

    #[test]
    fn a_stream_has_a_problem_only_once_it_failed() {
        let mut s = Status::default();
        assert_eq!(s.problem(), None, "a first connection under way");
        s.connected = true;
        s.acks = 1;
        assert_eq!(s.problem(), None);
        s.connected = false;
        assert_eq!(s.problem().as_deref(), Some("not connected"));
        s.last_error = "connect: refused".into();
        assert_eq!(s.problem().as_deref(), Some("connect: refused"));
        s.connected = true;
        assert!(s.problem().is_some(), "up again, but not yet ACKed");
        s.last_error.clear();
        assert_eq!(s.problem(), None);
    }

    #[test]
    fn node_ids_and_cross_checks() {
        let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            istio_node_id("bookinfo/reviews-v1", ip).as_deref(),
            Some("sidecar~10.1.2.3~reviews-v1.bookinfo~bookinfo.svc.cluster.local")
        );
        assert_eq!(istio_node_id("no-namespace", ip), None);
        let pod = crate::model::Pod::with_istio_defaults("ns/p", "/proc/1/ns/net");
        let same = Capture {
            outbound_port: Some(15001),
            inbound_port: Some(15006),
            ..Capture::default()
        };
        assert_eq!(cross_check(&pod, &same), Verdict::Agree);
        let moved = Capture {
            inbound_port: Some(15016),
            ..same.clone()
        };
        assert!(
            matches!(cross_check(&pod, &moved), Verdict::Differ(m) if m.contains("inbound listener 15016, capture rules 15006"))
        );
        let tproxy = Capture {
            tproxy: true,
            ..same
        };
        assert_eq!(cross_check(&pod, &tproxy), Verdict::Tproxy);
    }

    #[test]
    fn unnamed_capture_listeners_are_found_by_what_they_do() {
        let out = Listener {
            use_original_dst: Some(BoolValue { value: true }),
            ..at("catch-all", Some(PortSpecifier::PortValue(15101)))
        };
        let inb = Listener {
            listener_filters: vec![ListenerFilter {
                name: ORIGINAL_DST_FILTER.into(),
                ..ListenerFilter::default()
            }],
            ..at("in", Some(PortSpecifier::PortValue(15106)))
        };
        let svc = at("0.0.0.0_80", Some(PortSpecifier::PortValue(80)));
        let cap = parse_listeners(&[any(&svc), any(&out), any(&inb)]).unwrap();
        assert_eq!(
            (cap.outbound_port, cap.inbound_port),
            (Some(15101), Some(15106))
        );
        assert_eq!(cap.listeners, 3);
    }

    #[test]
    fn a_transparent_inbound_listener_means_tproxy() {
        let inb = Listener {
            transparent: Some(BoolValue { value: true }),
            ..at("virtualInbound", Some(PortSpecifier::PortValue(15006)))
        };
        assert!(parse_listeners(&[any(&inb)]).unwrap().tproxy);
    }

    #[test]
    fn capture_listeners_without_a_numeric_port_are_refused_by_field() {
        for (port, field) in [
            (None, "port_value: missing"),
            (Some(PortSpecifier::PortValue(0)), "0 is not a port"),
            (Some(PortSpecifier::PortValue(70000)), "70000 is not a port"),
            (Some(PortSpecifier::NamedPort("http".into())), "named_port"),
        ] {
            let e = parse_listeners(&[any(&at("virtualOutbound", port))]).unwrap_err();
            assert!(
                e.contains("resources[0] (virtualOutbound).address.socket_address")
                    && e.contains(field),
                "{e}"
            );
        }
        // An ordinary listener's port does not matter.
        assert!(parse_listeners(&[any(&at("0.0.0.0_80", None))]).is_ok());
    }

    #[test]
    fn updates_envoy_would_refuse_are_refused_by_field() {
        let on = |name: &str, ip: &str, resolver: &str| Listener {
            name: name.into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: ip.into(),
                    resolver_name: resolver.into(),
                    port_specifier: Some(PortSpecifier::PortValue(80)),
                    ..SocketAddress::default()
                })),
            }),
            ..Listener::default()
        };
        // Any listener, not only a capture listener: Envoy rejects the whole update.
        for ip in ["not-an-ip", "", "10.0.0.300"] {
            let e = parse_listeners(&[any(&on("l", ip, ""))]).unwrap_err();
            assert!(
                e.contains("resources[0] (l).address.socket_address.address")
                    && e.contains("is not an IP address"),
                "{e}"
            );
        }
        let e =
            parse_listeners(&[any(&on("a", "10.0.0.1", "")), any(&on("a", "::", ""))]).unwrap_err();
        assert!(
            e.contains("resources[1].name") && e.contains("resources[0]'s"),
            "{e}"
        );
        // IPv6 literals and names for a custom resolver are Envoy's to accept.
        assert!(parse_listeners(&[
            any(&on("v6", "::", "")),
            any(&on("dns", "svc.example", "custom"))
        ])
        .is_ok());
    }
}
