//! The `meshlane.v1` gRPC API on a unix socket (read-only), and its client for `meshlane status`.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::Path,
    sync::Arc,
    time::Duration,
};

use hyper_util::rt::TokioIo;
use meshlane_api::v1::{
    self as pb,
    meshlane_service_client::MeshlaneServiceClient,
    meshlane_service_server::{MeshlaneService, MeshlaneServiceServer},
};
use meshlane_common::{PodStats, DIRECTIONS};
use tokio::net::{UnixListener, UnixStream};
use tonic::{transport::Channel, Request, Response, Status};

use super::state::{Phase, Shared, Snapshot};
use crate::{datapath::Counters, probe};

pub const DEFAULT_SOCKET: &str = "/run/meshlane/api.sock";

struct Api(Arc<Shared>);

#[tonic::async_trait]
impl MeshlaneService for Api {
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let shared = Arc::clone(&self.0);
        let status = super::read_maps(move || build_status(&shared))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::GetStatusResponse {
            status: Some(status),
        }))
    }

    async fn list_pods(
        &self,
        _: Request<pb::ListPodsRequest>,
    ) -> Result<Response<pb::ListPodsResponse>, Status> {
        let shared = Arc::clone(&self.0);
        let pods = super::read_maps(move || build_status(&shared).pods)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListPodsResponse { pods }))
    }

    async fn get_counters(
        &self,
        _: Request<pb::GetCountersRequest>,
    ) -> Result<Response<pb::GetCountersResponse>, Status> {
        let shared = Arc::clone(&self.0);
        let counters = super::read_maps(move || shared.datapath().as_ref().map(|dp| dp.counters()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match counters {
            Some(Ok(c)) => Ok(Response::new(pb::GetCountersResponse {
                counters: Some(counters_pb(&c)),
            })),
            Some(Err(e)) => Err(Status::internal(e.to_string())),
            None => Err(Status::unavailable(
                "no datapath: the daemon is in pass-through or starting",
            )),
        }
    }

    async fn get_probe_report(
        &self,
        _: Request<pb::GetProbeReportRequest>,
    ) -> Result<Response<pb::GetProbeReportResponse>, Status> {
        Ok(Response::new(pb::GetProbeReportResponse {
            report: Some(probe_pb(self.0.read().probe.as_ref())),
        }))
    }
}

fn build_status(shared: &Shared) -> pb::Status {
    let snap: Snapshot = shared.read().clone();
    let (counters, stats, maps) = match shared.datapath().as_ref() {
        Some(dp) => (
            dp.counters().ok(),
            dp.pod_stats().unwrap_or_default(),
            dp.map_usage().unwrap_or_default(),
        ),
        None => (None, BTreeMap::new(), Vec::new()),
    };
    let (state, reason) = match &snap.phase {
        Phase::Starting => (pb::DatapathState::Starting, String::new()),
        Phase::Accelerating => (pb::DatapathState::Accelerating, String::new()),
        Phase::PassThrough(r) => (pb::DatapathState::PassThrough, r.clone()),
    };
    pb::Status {
        version: env!("CARGO_PKG_VERSION").into(),
        state: state.into(),
        reason,
        pin_dir: snap.pin_dir.display().to_string(),
        cgroup: snap.cgroup.display().to_string(),
        origin: snap.origin.unwrap_or_default().into(),
        pods: snap
            .pods
            .iter()
            .map(|p| pb::Pod {
                name: p.name.clone(),
                netns: p.netns.display().to_string(),
                netns_cookie: p.netns_cookie.unwrap_or(0),
                state: if p.accelerated() {
                    pb::PodState::Accelerated
                } else {
                    pb::PodState::NotAccelerated
                }
                .into(),
                reason: p.reason.clone(),
                reason_code: pod_reason(p.reason_code).into(),
                proxy_uid: p.derived.map(|d| d.proxy_uid),
                proxy_gid: p.derived.map(|d| d.proxy_gid),
                outbound_port: p.derived.map(|d| d.outbound_port.into()),
                inbound_port: p.derived.map(|d| d.inbound_port.into()),
                source: p.source.clone(),
                uid: p.uid.clone(),
                pod_ips: p.ips.iter().map(|ip| ip.to_string()).collect(),
                mode: p
                    .mode
                    .filter(|_| p.accelerated())
                    .map(|m| m.as_str().to_string())
                    .unwrap_or_default(),
                notes: p.notes.clone(),
                counters: p
                    .netns_cookie
                    .and_then(|c| stats.get(&c))
                    .map(pod_counters_pb),
            })
            .collect(),
        counters: counters.as_ref().map(counters_pb),
        probe: Some(probe_pb(snap.probe.as_ref())),
        mode: snap
            .mode
            .as_ref()
            .map(|m| m.mode.as_str().to_string())
            .unwrap_or_default(),
        mode_reason: snap
            .mode
            .as_ref()
            .map(|m| m.why.clone())
            .unwrap_or_default(),
        mode_differences: snap
            .mode
            .as_ref()
            .map(|m| m.differences.clone())
            .unwrap_or_default(),
        sources: snap
            .sources
            .iter()
            .map(|(name, h)| pb::Source {
                name: name.clone(),
                healthy: h.healthy,
                degraded: h.degraded,
                last_error: h.last_error.clone(),
                last_success_time: h.last_success.map(Into::into),
                errors_total: h.errors_total,
            })
            .collect(),
        maps: maps
            .iter()
            .map(|m| pb::MapUsage {
                name: m.name.into(),
                entries: m.entries,
                capacity: m.capacity,
            })
            .collect(),
        last_reconcile_time: snap.last_reconcile.map(Into::into),
    }
}

fn counters_pb(c: &Counters) -> pb::Counters {
    pb::Counters {
        counters: c
            .0
            .iter()
            .map(|(name, v)| pb::Counter {
                name: counter_name(name).into(),
                value: *v,
            })
            .collect(),
    }
}

/// The proto enum of a datapath counter: its name in upper case after `COUNTER_NAME_` (the
/// proto documents the rule; the tests hold every name to it).
pub fn counter_name(name: &str) -> pb::CounterName {
    pb::CounterName::from_str_name(&format!("COUNTER_NAME_{}", name.to_ascii_uppercase()))
        .unwrap_or(pb::CounterName::Unspecified)
}

/// The proto enum of a pod's reason code (the `reason` label of `meshlane_pods`), by the same
/// rule with `POD_REASON_`. Accelerated pods, with no code, get UNSPECIFIED.
pub fn pod_reason(code: &str) -> pb::PodReason {
    pb::PodReason::from_str_name(&format!("POD_REASON_{}", code.to_ascii_uppercase()))
        .unwrap_or(pb::PodReason::Unspecified)
}

fn pod_counters_pb(s: &PodStats) -> pb::PodCounters {
    let by_dir = |v: &[u64]| -> HashMap<String, u64> {
        DIRECTIONS
            .iter()
            .zip(v)
            .map(|(d, n)| (d.to_string(), *n))
            .collect()
    };
    pb::PodCounters {
        pairs_outbound: s.pairs[0],
        pairs_inbound: s.pairs[1],
        pairs_sidecar: s.pairs[2],
        redirected_messages: by_dir(&s.msgs),
        redirected_bytes: by_dir(&s.bytes),
    }
}

fn probe_pb(r: Option<&probe::Report>) -> pb::ProbeReport {
    let Some(r) = r else {
        return pb::ProbeReport::default();
    };
    pb::ProbeReport {
        ran: true,
        ok: r.ok,
        kernel: r.kernel.clone(),
        checks: r
            .checks
            .iter()
            .map(|c| pb::ProbeCheck {
                name: c.name.into(),
                status: match c.status {
                    probe::Status::Pass => pb::CheckStatus::Pass,
                    probe::Status::Warn => pb::CheckStatus::Warn,
                    probe::Status::Fail => pb::CheckStatus::Fail,
                    probe::Status::Skip => pb::CheckStatus::Skip,
                }
                .into(),
                detail: c.detail.clone(),
            })
            .collect(),
    }
}

/// Binds the socket (root-only permissions), replacing a stale one from a dead daemon, but
/// refusing to steal the socket of a live one.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only a socket may be replaced: a mistyped --api-socket must never delete a file.
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it (choose another --api-socket)",
                    path.display()
                ),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another running meshlane", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    // grpc.health.v1 answers for the server ("") and for the meshlane service by name: both
    // serve as long as this socket does. Whether the datapath accelerates is /readyz's and
    // GetStatus's to say, not the API's health.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<MeshlaneServiceServer<Api>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(meshlane_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1alpha too: grpcurl before 1.9 and other older clients ask only for it.
    let (v1, v1alpha) = match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => (Some(v1), Some(v1alpha)),
        (Err(e), _) | (_, Err(e)) => {
            // Only the descriptor sets compiled into this binary are read: a failure is a build
            // defect, and the status API is still worth serving without reflection.
            tracing::error!(error = %e, "gRPC reflection unavailable");
            (None, None)
        }
    };
    if let Err(e) = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_optional_service(v1)
        .add_optional_service(v1alpha)
        .add_service(MeshlaneServiceServer::new(Api(shared)))
        .serve_with_incoming(incoming)
        .await
    {
        tracing::error!(error = %e, "status API server stopped");
    }
}

/// A channel to the API at `socket` (the URI is a placeholder: the connector always dials the
/// unix socket). Public for the tests' health and reflection clients.
pub async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    let path = socket.to_path_buf();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
    });
    tonic::transport::Endpoint::from_static("http://meshlane.local")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the meshlane daemon at {} ({e}); is `meshlane run` started, with this --api-socket?",
                socket.display()
            )
        })
}

/// `GetStatus` from the daemon at `socket` (for `meshlane status`, on main's runtime).
pub async fn fetch_status(socket: &Path) -> anyhow::Result<pb::Status> {
    let channel = connect(socket).await?;
    MeshlaneServiceClient::new(channel)
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner()
        .status
        .ok_or_else(|| anyhow::anyhow!("the daemon answered GetStatus without a status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_proto_enum_value() {
        for (i, name) in meshlane_common::counter::NAMES.iter().enumerate() {
            let e = counter_name(name);
            assert_eq!(e as usize, i + 1, "{name}: {e:?}");
        }
        assert_eq!(
            counter_name("no_such_counter"),
            pb::CounterName::Unspecified
        );
    }

    #[test]
    fn every_pod_reason_code_has_its_proto_enum_value() {
        use crate::{discovery::Reason, telemetry::Decline};
        let discovery = Reason::ALL.map(Reason::as_str);
        let daemon = Decline::ALL.map(Decline::as_str);
        // One label, one meaning: no code is written by both vocabularies.
        let mut all: Vec<&str> = discovery.iter().chain(&daemon).copied().collect();
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "a reason code used twice: {all:?}");
        for code in discovery.into_iter().chain(daemon) {
            let e = pod_reason(code);
            assert_ne!(e, pb::PodReason::Unspecified, "{code}");
            // The metric label reads back from the enum, so a client can join the two.
            let back = e
                .as_str_name()
                .trim_start_matches("POD_REASON_")
                .to_ascii_lowercase();
            assert_eq!(back, code);
        }
        assert_eq!(pod_reason(""), pb::PodReason::Unspecified);
    }
}
