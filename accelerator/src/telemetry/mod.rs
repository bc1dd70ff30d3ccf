//! What the daemon tells the outside: Prometheus metrics and health on an HTTP port, and the
//! `meshlane.v1` status API on a unix socket. Both only read [`state::Shared`].

pub mod api;
pub mod http;
pub mod metrics;
pub mod state;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;

pub use state::{Decline, Phase, PodStatus, Shared, SourceHealth};

/// Where to serve; `None` turns a server off.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub metrics: Option<SocketAddr>,
    pub api_socket: Option<PathBuf>,
}

/// Running servers; dropping this stops them and removes the API socket.
pub struct Servers {
    runtime: Option<tokio::runtime::Runtime>,
    api_socket: Option<PathBuf>,
}

/// Binds both endpoints now (so a port clash is a start-up error that names it), then serves
/// them on a small runtime of their own, away from the reconcile loop.
pub fn start(endpoints: &Endpoints, shared: Arc<Shared>) -> anyhow::Result<Servers> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(2)
        .thread_name("meshlane-telemetry")
        .enable_all()
        .build()
        .context("start the telemetry runtime")?;
    if let Some(addr) = endpoints.metrics {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
        let local = listener.local_addr().ok();
        runtime.spawn(http::serve(listener, Arc::clone(&shared)));
        tracing::info!(addr = ?local, "serving /metrics, /healthz and /readyz");
    }
    if let Some(path) = &endpoints.api_socket {
        let listener = {
            let _guard = runtime.enter();
            api::bind(path).with_context(|| format!("--api-socket {}", path.display()))?
        };
        runtime.spawn(api::serve(listener, Arc::clone(&shared)));
        tracing::info!(socket = %path.display(), "serving the meshlane.v1 status API");
    }
    Ok(Servers {
        runtime: Some(runtime),
        api_socket: endpoints.api_socket.clone(),
    })
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        if let Some(path) = &self.api_socket {
            let _ = std::fs::remove_file(path);
        }
    }
}
