//! The metrics port: `/metrics` (Prometheus), `/healthz` (liveness: the reconcile loop is
//! turning) and `/readyz` (readiness: start-up is decided, accelerating or in pass-through).

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::{metrics, state::Shared};

/// A loop turn older than this makes `/healthz` fail: the daemon is wedged and should restart.
const STALE: Duration = Duration::from_secs(30);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn wants_openmetrics<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let registry = Arc::new(metrics::registry(Arc::clone(&shared)));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (shared, registry) = (Arc::clone(&shared), Arc::clone(&registry));
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (shared, registry) = (Arc::clone(&shared), Arc::clone(&registry));
                async move { Ok::<_, Infallible>(route(&req, &shared, &registry).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn route<B>(
    req: &Request<B>,
    shared: &Arc<Shared>,
    registry: &Arc<Registry>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            // Reading the maps makes syscalls: keep them off the async workers.
            let registry = Arc::clone(registry);
            match super::read_maps(move || metrics::render(&registry)).await {
                Ok(Ok(body)) if wants_openmetrics(req) => reply(StatusCode::OK, OPENMETRICS, body),
                Ok(Ok(body)) => reply(
                    StatusCode::OK,
                    PROMETHEUS_TEXT,
                    metrics::to_prometheus_text(&body),
                ),
                _ => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding failed\n".into(),
                ),
            }
        }
        "/healthz" => {
            let age = shared.since_heartbeat();
            if age < STALE {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("reconcile loop stalled for {}s\n", age.as_secs()),
                )
            }
        }
        "/readyz" => {
            if shared.ready() {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "starting\n".into(),
                )
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "meshlane serves /metrics, /healthz and /readyz\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}
