//! The `meshlane.v1` gRPC API on a unix socket (read-only), and its client for `meshlane status`.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hyper_util::rt::TokioIo;
use meshlane_api::v1::{
    self as pb,
    meshlane_client::MeshlaneClient,
    meshlane_server::{Meshlane, MeshlaneServer},
};
use meshlane_common::{PodStats, DIRECTIONS};
use tokio::net::{UnixListener, UnixStream};
use tonic::{Request, Response, Status};

use super::state::{unix_secs, Phase, Shared, Snapshot};
use crate::{datapath::Counters, probe};

pub const DEFAULT_SOCKET: &str = "/run/meshlane/api.sock";

struct Api(Arc<Shared>);

#[tonic::async_trait]
impl Meshlane for Api {
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        let shared = Arc::clone(&self.0);
        let status = tokio::task::spawn_blocking(move || build_status(&shared))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(status))
    }

    async fn list_pods(
        &self,
        _: Request<pb::ListPodsRequest>,
    ) -> Result<Response<pb::ListPodsResponse>, Status> {
        let shared = Arc::clone(&self.0);
        let pods = tokio::task::spawn_blocking(move || build_status(&shared).pods)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListPodsResponse { pods }))
    }

    async fn get_counters(
        &self,
        _: Request<pb::GetCountersRequest>,
    ) -> Result<Response<pb::Counters>, Status> {
        let shared = Arc::clone(&self.0);
        let counters =
            tokio::task::spawn_blocking(move || shared.datapath().as_ref().map(|dp| dp.counters()))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        match counters {
            Some(Ok(c)) => Ok(Response::new(counters_pb(&c))),
            Some(Err(e)) => Err(Status::internal(e.to_string())),
            None => Err(Status::unavailable(
                "no datapath: the daemon is in pass-through or starting",
            )),
        }
    }

    async fn get_probe_report(
        &self,
        _: Request<pb::GetProbeReportRequest>,
    ) -> Result<Response<pb::ProbeReport>, Status> {
        Ok(Response::new(probe_pb(self.0.read().probe.as_ref())))
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
                last_success_unix: h.last_success.map(unix_secs).unwrap_or(0.0),
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
        last_reconcile_unix: snap.last_reconcile.map(unix_secs).unwrap_or(0.0),
    }
}

fn counters_pb(c: &Counters) -> pb::Counters {
    pb::Counters {
        values: c.0.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    }
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
    // One service, so no router: serve it directly.
    if let Err(e) = tonic::transport::Server::builder()
        .serve_with_incoming(MeshlaneServer::new(Api(shared)), incoming)
        .await
    {
        tracing::error!(error = %e, "status API server stopped");
    }
}

/// `GetStatus` from the daemon at `socket` (for `meshlane status`).
pub fn fetch_status(socket: &Path) -> anyhow::Result<pb::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket: PathBuf = socket.to_path_buf();
    rt.block_on(async move {
        let path = socket.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        });
        // The URI is a placeholder: the connector always dials the unix socket.
        let channel = tonic::transport::Endpoint::from_static("http://meshlane.local")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach the meshlane daemon at {} ({e}); is `meshlane run` started, with this --api-socket?",
                    socket.display()
                )
            })?;
        let status = MeshlaneClient::new(channel)
            .get_status(pb::GetStatusRequest {})
            .await?
            .into_inner();
        Ok(status)
    })
}
