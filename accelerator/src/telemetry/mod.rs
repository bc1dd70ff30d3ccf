//! What the daemon tells the outside: Prometheus metrics and health on an HTTP port, and the
//! `meshlane.v1` status API on a unix socket. Both only read [`state::Shared`].

pub mod api;
pub mod http;
pub mod metrics;
pub mod state;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, LazyLock},
};

use anyhow::Context as _;

pub use state::{Decline, Phase, PodStatus, Shared, SourceHealth};

/// Map reads for scrapes and status calls (syscalls, and the datapath lock the reconcile loop
/// also takes) run on the runtime's blocking pool, at most this many at once, as when the
/// servers had a runtime of their own: a flood of scrapes queues here instead of filling the
/// pool the daemon's passes and the xDS streams' lookups use.
const READERS: usize = 2;

/// Runs `read` on the blocking pool, within [`READERS`].
async fn read_maps<T: Send + 'static>(
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    static PERMITS: LazyLock<Arc<tokio::sync::Semaphore>> =
        LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(READERS)));
    // Never closed, so never an error; the permit goes with the read, so a caller that gives
    // up does not let another read start before this one ends.
    let permit = Arc::clone(&*PERMITS).acquire_owned().await.ok();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        read()
    })
    .await
}

/// Where to serve; `None` turns a server off.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub metrics: Option<SocketAddr>,
    pub api_socket: Option<PathBuf>,
}

/// Running servers; dropping this stops them and removes the API socket.
pub struct Servers {
    tasks: Vec<tokio::task::AbortHandle>,
    api_socket: Option<PathBuf>,
}

/// Binds both endpoints now (so a port clash is a start-up error that names it), then serves
/// them as tasks on the current runtime. They only read [`Shared`], and their map reads go to
/// the blocking pool (`read_maps`), so a slow read never holds a worker.
pub async fn start(endpoints: &Endpoints, shared: Arc<Shared>) -> anyhow::Result<Servers> {
    // Built first: a failure to bind the second endpoint stops the first again.
    let mut servers = Servers {
        tasks: Vec::new(),
        api_socket: None,
    };
    if let Some(addr) = endpoints.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
        let local = listener.local_addr().ok();
        let task = tokio::spawn(http::serve(listener, Arc::clone(&shared)));
        servers.tasks.push(task.abort_handle());
        tracing::info!(addr = ?local, "serving /metrics, /healthz and /readyz");
    }
    if let Some(path) = &endpoints.api_socket {
        let listener =
            api::bind(path).with_context(|| format!("--api-socket {}", path.display()))?;
        servers.api_socket = Some(path.clone());
        let task = tokio::spawn(api::serve(listener, Arc::clone(&shared)));
        servers.tasks.push(task.abort_handle());
        tracing::info!(socket = %path.display(), "serving the meshlane.v1 status API");
    }
    Ok(servers)
}

impl Drop for Servers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(path) = &self.api_socket {
            let _ = std::fs::remove_file(path);
        }
    }
}
