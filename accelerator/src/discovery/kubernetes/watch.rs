//! The Kubernetes source's watchers: pods of this node and namespaces, followed with kube-rs as
//! one task on the daemon's runtime, kept as last seen, and read by the daemon as a
//! [`Snapshot`] mapped with [`super::map`].

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod as ApiPod};
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::watcher,
    Api, Client,
};

use super::*;
use crate::discovery::{procfs, Discovery, Note, Wake};

// === impl Source ===

/// Where the API server is.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// In-cluster service account, else kubeconfig (`kube::Config::infer`).
    Infer,
    /// A URL with no credentials (tests, `kubectl proxy`).
    Url(String),
}

#[derive(Clone, Debug)]
pub struct Options {
    pub endpoint: Endpoint,
    /// This node's name (`spec.nodeName`).
    pub node_name: String,
    /// `/proc`, searched for each pod's network namespace.
    pub proc_root: PathBuf,
    /// The node's own namespace, never a pod's: `/proc/1/ns/net`.
    pub host_netns: PathBuf,
}

/// A pod as last seen: decoded, or declined because it did not decode.
type Stored = Result<ApiPod, (String, Declined)>;

#[derive(Debug, Default)]
struct State {
    pods: BTreeMap<String, Stored>,
    namespaces: BTreeMap<String, NamespaceFacts>,
    pods_synced: bool,
    namespaces_synced: bool,
    pod_error: Option<String>,
    namespace_error: Option<String>,
    /// The last failure of each watch was the API server throttling this client (429).
    pods_throttled: bool,
    namespaces_throttled: bool,
}

/// What the daemon gets from one read.
#[derive(Debug)]
pub struct Snapshot {
    /// Both lists have been received once: before that, nothing must be removed from the maps.
    pub synced: bool,
    /// The watch's last error, if it has not recovered since (the last good state is kept).
    pub error: Option<String>,
    /// That error is the API server throttling this client (429 Too Many Requests): the source
    /// is degraded rather than broken.
    pub throttled: bool,
    pub discovery: Discovery,
    /// Per pod name: UID and IPs, for status.
    pub identities: BTreeMap<String, (String, Vec<IpAddr>)>,
}

/// The running watchers (a task on the runtime given to [`Source::start`]); dropping it stops
/// them.
pub struct Source {
    opts: Options,
    state: Arc<Mutex<State>>,
    task: tokio::task::AbortHandle,
}

impl Source {
    /// Starts watching on `runtime` (the daemon's one runtime: the watch is all waiting on the
    /// network, so it needs no thread of its own). Never fails for an unreachable API server:
    /// that is reported by [`Source::snapshot`] and retried with backoff.
    pub fn start(opts: Options, wake: Wake, runtime: &tokio::runtime::Handle) -> Source {
        let state = Arc::new(Mutex::new(State::default()));
        let task = runtime
            .spawn(watch_all(opts.clone(), Arc::clone(&state), wake))
            .abort_handle();
        Source { opts, state, task }
    }

    /// The current pods, each with its network namespace found on the node.
    pub fn snapshot(&self) -> Snapshot {
        let (mapped, synced, error, throttled) = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let mapped: Vec<Mapped> = st
                .pods
                .values()
                .filter_map(|p| match p {
                    Ok(pod) => {
                        let ns = pod
                            .metadata
                            .namespace
                            .as_ref()
                            .and_then(|n| st.namespaces.get(n));
                        map(pod, ns)
                    }
                    Err((name, d)) => Some(Mapped {
                        name: name.clone(),
                        uid: String::new(),
                        ips: Vec::new(),
                        verdict: Err(d.clone()),
                        notes: Vec::new(),
                    }),
                })
                .collect();
            let error = st.pod_error.clone().or_else(|| {
                st.namespace_error
                    .clone()
                    .map(|e| format!("namespaces: {e}"))
            });
            let throttled = (st.pod_error.is_some() && st.pods_throttled)
                || (st.pod_error.is_none()
                    && st.namespace_error.is_some()
                    && st.namespaces_throttled);
            (
                mapped,
                st.pods_synced && st.namespaces_synced,
                error,
                throttled,
            )
        };
        let host = procfs::netns_inode(&self.opts.host_netns).ok();
        let by_uid = if mapped.iter().any(|m| m.verdict.is_ok()) {
            procfs::pods_by_uid(&self.opts.proc_root, host)
        } else {
            Default::default()
        };
        let mut d = Discovery::default();
        let mut identities = BTreeMap::new();
        for m in mapped {
            identities.insert(m.name.clone(), (m.uid.clone(), m.ips.clone()));
            d.notes.extend(m.notes.into_iter().map(|message| Note {
                pod: m.name.clone(),
                message,
            }));
            match m.verdict {
                Ok(mut pod) => match by_uid.get(&m.uid) {
                    Some(pid) => {
                        pod.netns = self.opts.proc_root.join(pid.to_string()).join("ns/net");
                        d.pods.push(pod);
                    }
                    None => d.skipped.push(Skipped {
                        derived: Some((&pod).into()),
                        name: m.name,
                        netns: PathBuf::new(),
                        reason: Reason::NetnsNotFound,
                        detail: format!(
                            "no process outside the host namespace has pod UID {} in its cgroup path",
                            m.uid
                        ),
                    }),
                },
                Err(dc) => d.skipped.push(Skipped {
                    name: m.name,
                    netns: PathBuf::new(),
                    reason: dc.reason,
                    detail: dc.detail,
                    derived: dc.derived,
                }),
            }
        }
        Snapshot {
            synced,
            error,
            throttled,
            discovery: d,
            identities,
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn watch_all(opts: Options, state: Arc<Mutex<State>>, wake: Wake) {
    let client = loop {
        let config = match &opts.endpoint {
            Endpoint::Infer => kube::Config::infer().await.map_err(|e| e.to_string()),
            Endpoint::Url(u) => u
                .parse()
                .map(kube::Config::new)
                .map_err(|e| format!("{u:?}: {e}")),
        };
        // kube-rs would retry a 429, 503 or 504 itself, silently, up to 15 times with a backoff
        // growing from 5 ms (minutes in all): the watch here restarts with its own jittered
        // backoff instead, so throttling and outages show in status and logs as they happen.
        let config = config.map(|mut c| {
            c.default_retry = false;
            c
        });
        match config.and_then(|c| Client::try_from(c).map_err(|e| e.to_string())) {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(error = %e, "Kubernetes client not configured; retrying");
                {
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    st.pod_error = Some(format!("client: {e}"));
                }
                wake.notify();
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let pods = watch_pods(client.clone(), &opts.node_name, &state, &wake);
    let namespaces = watch_namespaces(client, &state, &wake);
    futures::future::join(pods, namespaces).await;
}

fn pod_key(o: &DynamicObject) -> String {
    format!(
        "{}/{}",
        o.metadata.namespace.as_deref().unwrap_or(""),
        o.metadata.name.as_deref().unwrap_or("")
    )
}

fn decode_dynamic(o: DynamicObject) -> Stored {
    let value = serde_json::to_value(&o).map_err(|e| {
        (
            pod_key(&o),
            bad("(object)", format!("cannot re-encode: {e}")),
        )
    })?;
    decode(value)
}

/// A watcher error; a 410 Gone is the expected end of a stale watch, followed by a relist.
fn is_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(s) if s.code == 410)
}

/// The least wait before listing again after a 429.
const THROTTLED_MIN_DELAY: Duration = Duration::from_secs(1);
/// The most a 429's `retryAfterSeconds` can make the watch wait (a bad value must not stall
/// discovery for hours).
const THROTTLED_MAX_DELAY: Duration = Duration::from_secs(300);

/// When a watcher error is the API server throttling this client (429 Too Many Requests, API
/// Priority and Fairness), how long it asks the client to wait: the Status body's
/// `details.retryAfterSeconds` (the API server sends it with the `Retry-After` header), at
/// least [`THROTTLED_MIN_DELAY`], at most [`THROTTLED_MAX_DELAY`]. None for other errors.
fn throttled_for(e: &watcher::Error) -> Option<Duration> {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s,
        watcher::Error::WatchError(s) => s,
        _ => return None,
    };
    (status.code == 429).then(|| {
        let asked = status
            .details
            .as_ref()
            .map_or(0, |d| u64::from(d.retry_after_seconds));
        Duration::from_secs(asked).clamp(THROTTLED_MIN_DELAY, THROTTLED_MAX_DELAY)
    })
}

/// What a watch tells its owner.
enum Change<K> {
    /// A complete list (at start, after a 410 Gone, after a failure): replaces everything.
    Replace(Vec<K>),
    Apply(K),
    Delete(K),
    /// The watch failed; it is restarted (with a fresh list) after a backoff. `throttled`: the
    /// failure was a 429 Too Many Requests.
    Failed {
        error: String,
        throttled: bool,
    },
}

/// Runs a watcher forever. kube-rs relists by itself on 410 Gone; on any other error the stream
/// is dropped and started afresh after a backoff (250 ms doubling to 30 s, each wait a random
/// 50-100% of its step, back to 250 ms once a list succeeds), so recovery always
/// comes with a complete list and a missed Delete cannot linger.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    wake: &Wake,
    mut on: impl FnMut(Change<K>),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut backoff = crate::discovery::backoff::Backoff::new(
        Duration::from_millis(250),
        Duration::from_secs(30),
    );
    loop {
        let mut throttled: Option<Duration> = None;
        let mut stream = watcher(api.clone(), config.clone()).boxed();
        let mut buffer = Vec::new();
        while let Some(ev) = stream.next().await {
            let change = match ev {
                Ok(watcher::Event::Init) => {
                    buffer.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) => {
                    buffer.push(o);
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    backoff.reset();
                    tracing::info!(what, objects = buffer.len(), "listed");
                    Change::Replace(std::mem::take(&mut buffer))
                }
                Ok(watcher::Event::Apply(o)) => Change::Apply(o),
                Ok(watcher::Event::Delete(o)) => Change::Delete(o),
                Err(e) if is_gone(&e) => {
                    tracing::info!(what, error = %e, "watch expired; relisting");
                    continue;
                }
                Err(e) => {
                    throttled = throttled_for(&e);
                    match throttled {
                        Some(wait) => {
                            tracing::warn!(what, error = %e, retry_after = ?wait, "the API server is throttling this client (429 Too Many Requests); backing off as it asks, keeping the last good state")
                        }
                        None => {
                            tracing::error!(what, error = %e, "watch failed; keeping the last good state")
                        }
                    }
                    on(Change::Failed {
                        error: e.to_string(),
                        throttled: throttled.is_some(),
                    });
                    wake.notify();
                    break;
                }
            };
            on(change);
            wake.notify();
        }
        let mut delay = backoff.next_delay();
        if let Some(wait) = throttled {
            // A throttled client waits as long as the API server asked (at least a second).
            delay = delay.max(wait);
        }
        tracing::info!(what, retry_in = ?delay, "restarting the watch with a fresh list");
        tokio::time::sleep(delay).await;
    }
}

async fn watch_pods(client: Client, node: &str, state: &Mutex<State>, wake: &Wake) {
    // Pods decode one by one (a malformed pod is declined with its field, not the whole list).
    let api: Api<DynamicObject> = Api::all_with(client, &ApiResource::erase::<ApiPod>(&()));
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    follow(api, config, "pods", wake, |change| {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        match change {
            Change::Replace(all) => {
                st.pods = all
                    .into_iter()
                    .map(|o| (pod_key(&o), decode_dynamic(o)))
                    .collect();
                st.pods_synced = true;
                st.pod_error = None;
            }
            Change::Apply(o) => {
                st.pods.insert(pod_key(&o), decode_dynamic(o));
                st.pod_error = None;
            }
            Change::Delete(o) => {
                st.pods.remove(&pod_key(&o));
                st.pod_error = None;
            }
            Change::Failed { error, throttled } => {
                st.pod_error = Some(error);
                st.pods_throttled = throttled;
            }
        }
    })
    .await
}

async fn watch_namespaces(client: Client, state: &Mutex<State>, wake: &Wake) {
    let api: Api<Namespace> = Api::all(client);
    let facts = |n: &Namespace| {
        (
            n.metadata.name.clone().unwrap_or_default(),
            NamespaceFacts {
                labels: n.metadata.labels.clone().unwrap_or_default(),
                annotations: n.metadata.annotations.clone().unwrap_or_default(),
            },
        )
    };
    follow(
        api,
        watcher::Config::default(),
        "namespaces",
        wake,
        |change| {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            match change {
                Change::Replace(all) => {
                    st.namespaces = all.iter().map(facts).collect();
                    st.namespaces_synced = true;
                    st.namespace_error = None;
                }
                Change::Apply(n) => {
                    let (name, f) = facts(&n);
                    st.namespaces.insert(name, f);
                    st.namespace_error = None;
                }
                Change::Delete(n) => {
                    st.namespaces.remove(&facts(&n).0);
                }
                Change::Failed { error, throttled } => {
                    st.namespace_error = Some(error);
                    st.namespaces_throttled = throttled;
                }
            }
        },
    )
    .await
}
