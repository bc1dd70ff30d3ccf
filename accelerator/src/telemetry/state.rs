//! What the daemon knows about itself, shared between the reconcile loop (the only writer) and
//! the metrics and API servers (readers). The datapath handle lives here too, so scrapes read the
//! kernel's counters live instead of a copy that could be stale.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::{datapath::Datapath, probe};

/// Where the daemon is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Probing or loading; nothing decided yet.
    Starting,
    /// Programs attached; listed pods are accelerated.
    Accelerating,
    /// Nothing attached by this daemon; all traffic on plain TCP, for this reason.
    PassThrough(String),
}

impl Phase {
    /// The `state` labels of `meshlane_datapath_state`, in order.
    pub const NAMES: [&'static str; 3] = ["starting", "accelerating", "pass_through"];

    pub fn name(&self) -> &'static str {
        match self {
            Phase::Starting => Phase::NAMES[0],
            Phase::Accelerating => Phase::NAMES[1],
            Phase::PassThrough(_) => Phase::NAMES[2],
        }
    }
}

/// The daemon's own reasons for not accelerating a listed pod. Discovery's are
/// [`crate::discovery::Reason`]; both share the `reason` label of `meshlane_pods` and the API's
/// `PodReason`, so a code is written once, here or there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decline {
    /// The pod's redirect mode is off.
    ModeOff,
    /// The policy derived for it does not fit the datapath.
    InvalidPolicy,
    /// Writing its policy map entry failed.
    PolicyWriteFailed,
    /// The policy map could not be read.
    PolicyMapUnreadable,
    /// The daemon is in pass-through.
    PassThrough,
    /// The daemon is still starting.
    Starting,
}

impl Decline {
    pub const ALL: [Decline; 6] = [
        Decline::ModeOff,
        Decline::InvalidPolicy,
        Decline::PolicyWriteFailed,
        Decline::PolicyMapUnreadable,
        Decline::PassThrough,
        Decline::Starting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decline::ModeOff => "mode_off",
            Decline::InvalidPolicy => "invalid_policy",
            Decline::PolicyWriteFailed => "policy_write_failed",
            Decline::PolicyMapUnreadable => "policy_map_unreadable",
            Decline::PassThrough => "pass_through",
            Decline::Starting => "starting",
        }
    }
}

/// One pod the daemon was told about, and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodStatus {
    pub name: String,
    pub netns: PathBuf,
    pub netns_cookie: Option<u64>,
    /// Empty when accelerated; otherwise why not, for people (status, logs).
    pub reason: String,
    /// The same as a short stable code for metric labels (`netns_not_found`, ...).
    pub reason_code: &'static str,
    pub source: String,
    /// The sidecar's uid/gid and capture ports, as discovery derived them (also for a pod it
    /// declined, when it got that far); `None` when nothing was derived.
    pub derived: Option<crate::discovery::Derived>,
    /// The Kubernetes pod UID and IPs, when the source knows them.
    pub uid: String,
    pub ips: Vec<std::net::IpAddr>,
    /// The redirect mode it gets, when accelerated.
    pub mode: Option<crate::mode::Mode>,
    /// What discovery noticed without declining it (an xDS disagreement, an unmodelled setting).
    pub notes: Vec<String>,
}

impl PodStatus {
    pub fn accelerated(&self) -> bool {
        self.reason_code.is_empty()
    }

    pub fn decline(&mut self, code: &'static str, reason: String) {
        self.reason_code = code;
        self.reason = reason;
    }
}

/// Health of one discovery source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceHealth {
    pub healthy: bool,
    /// Not healthy because the source is being throttled (an API server's 429), not broken:
    /// it keeps the last good state and retries with backoff.
    pub degraded: bool,
    pub last_error: String,
    pub last_success: Option<SystemTime>,
    pub errors_total: u64,
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub phase: Phase,
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    /// "loaded" or "adopted", once the datapath is open.
    pub origin: Option<&'static str>,
    /// None until the probe ran, and when it was skipped (--force).
    pub probe: Option<probe::Report>,
    /// The mode in force and why; None until decided.
    pub mode: Option<crate::mode::Decision>,
    pub pods: Vec<PodStatus>,
    pub sources: BTreeMap<String, SourceHealth>,
    pub last_reconcile: Option<SystemTime>,
    pub reconciles_total: u64,
    /// Policy-map writes or removals the kernel refused.
    pub policy_errors_total: u64,
    /// Ends removed by the sweep after waiting for a partner through two sweeps.
    pub unpaired_swept_total: u64,
    /// Accelerated pods whose memory groups have too little room, by namespace cookie, with
    /// what the guard found (docs/DESIGN.md, "Memory").
    pub memory_tight: BTreeMap<u64, String>,
}

pub struct Shared {
    snapshot: RwLock<Snapshot>,
    datapath: Mutex<Option<Datapath>>,
    /// Unix milliseconds of the reconcile loop's last turn (liveness).
    heartbeat_ms: AtomicU64,
    /// How long passes take, for `/metrics`.
    pub timings: Timings,
}

/// Durations of the daemon's passes, as Prometheus histograms (the only metrics kept between
/// scrapes: the rest is read from the snapshot and the maps on each scrape).
#[derive(Clone, Debug)]
pub struct Timings {
    /// One reconcile: sources read, policies written, status updated.
    pub reconcile: Histogram,
    /// One read of the discovery source (`discovery::Source::read`).
    pub discovery: Histogram,
}

impl Default for Timings {
    fn default() -> Timings {
        Timings {
            // 0.5 ms to about 8 s: a reconcile with no change is sub-millisecond, one that reads
            // many pods' rules takes seconds.
            reconcile: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            discovery: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
        }
    }
}

impl Shared {
    pub fn new(pin_dir: PathBuf, cgroup: PathBuf) -> Shared {
        Shared {
            snapshot: RwLock::new(Snapshot {
                phase: Phase::Starting,
                pin_dir,
                cgroup,
                origin: None,
                probe: None,
                mode: None,
                pods: Vec::new(),
                sources: BTreeMap::new(),
                last_reconcile: None,
                reconciles_total: 0,
                policy_errors_total: 0,
                unpaired_swept_total: 0,
                memory_tight: BTreeMap::new(),
            }),
            datapath: Mutex::new(None),
            heartbeat_ms: AtomicU64::new(unix_ms(SystemTime::now())),
            timings: Timings::default(),
        }
    }

    // A panicking writer cannot leave a half-updated snapshot worth refusing to serve: every
    // field is replaced whole. So a poisoned lock is read through.
    pub fn read(&self) -> RwLockReadGuard<'_, Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Snapshot> {
        self.snapshot.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn datapath(&self) -> MutexGuard<'_, Option<Datapath>> {
        self.datapath.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn beat(&self) {
        self.heartbeat_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    /// Time since the reconcile loop last turned.
    pub fn since_heartbeat(&self) -> Duration {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(last))
    }

    /// Ready once start-up is decided, whether accelerating or deliberately passing through.
    pub fn ready(&self) -> bool {
        self.read().phase != Phase::Starting
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
