//! `meshlane run`: probe the kernel, open (or adopt) the datapath, then keep the policy map equal
//! to the pod list, re-reading it periodically and on SIGHUP. A bad pod list keeps the last good
//! state. Metrics and the status API serve from the start, so a daemon that decided not to
//! accelerate stays visible and says why. On SIGTERM or SIGINT the daemon exits and leaves the
//! datapath pinned: accelerated connections keep flowing until the next daemon adopts the pins,
//! or `meshlane detach` removes them.
//!
//! All of it runs on main's one runtime, so the daemon has no threads of its own to size or to
//! stop: the servers, the Kubernetes watch and the xDS streams are tasks beside the reconcile
//! loop (`daemon/event_loop.rs`), which sleeps until a source, a signal or a timer wants a pass
//! and runs its blocking passes on the runtime's blocking pool.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

mod event_loop;
mod memory_guard;
mod signals;
mod sweep;
use event_loop::off_the_workers;
use memory_guard::MemoryGuard;
use signals::Signals;
use sweep::Sweep;

use crate::{
    config,
    datapath::{self, Datapath, Origin},
    discovery::{self, kubernetes, xds, Discoverer, Discovery, Wake},
    mode, node, policy, probe,
    telemetry::{self, Decline, Phase, PodStatus, Shared},
};

pub struct RunOptions {
    pub datapath: datapath::Options,
    /// Local discovery (Envoy processes, their capture rules and admin API); None: off.
    pub discovery: Option<discovery::Options>,
    /// Kubernetes discovery (pods of this node from the API server, netns from procfs); None: off.
    pub kubernetes: Option<kubernetes::Options>,
    /// ADS server to cross-check each Kubernetes-discovered pod's capture ports against.
    pub xds_server: Option<String>,
    /// Which namespaces' discovered pods may be accelerated.
    pub namespaces: discovery::NamespaceFilter,
    pub config: Option<PathBuf>,
    pub resync: Duration,
    /// Interval of the sweep of sockets that wait for a partner (removed at their second).
    pub sweep: Duration,
    pub detach_on_exit: bool,
    /// Skip the start-up safety probe (break-glass).
    pub force: bool,
    /// The operator's redirect mode; the probe's measurements decide what it becomes.
    pub mode: mode::Choice,
    /// Pair sidecars of accelerated pods on this node with each other (`POLICY_SIDECAR_HOP`).
    pub sidecar_hop: bool,
    pub endpoints: telemetry::Endpoints,
    /// A pod whose memory groups have less room than this is memory-tight (no new pairs, its
    /// redirected directions move to TCP); 0 turns the check off.
    pub memory_headroom: u64,
    /// The node's /proc, where each pod's processes (and so its memory groups) are found.
    pub proc_root: PathBuf,
}

/// The names the sources go by in status and metrics.
const CONFIG_SOURCE: &str = "config";
const LOCAL_SOURCE: &str = "local";
/// How long local discovery trusts a namespace's reading while its sidecar processes stay the
/// same (a changed sidecar is read again at once).
const DISCOVERY_REFRESH: Duration = Duration::from_secs(30);

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;

    // Configuration errors (privilege, cgroup, bpffs, ports) end the daemon with one clear
    // sentence; only the kernel's behaviour is left to the probe.
    datapath::check(&opts.datapath)?;
    let shared = Arc::new(Shared::new(
        opts.datapath.pin_dir.clone(),
        opts.datapath.cgroup.clone(),
    ));
    let _servers = telemetry::start(&opts.endpoints, Arc::clone(&shared)).await?;

    // The probe runs traffic through a scratch namespace for seconds: off the workers, so the
    // servers answer meanwhile (`starting`).
    let opts = Arc::new(opts);
    let deferred = {
        let (opts, shared) = (Arc::clone(&opts), Arc::clone(&shared));
        off_the_workers(move || start_datapath(&opts, &shared)).await?
    };

    // Sources that learn of changes by themselves (the watch, xDS streams) wake the loop at once.
    let wake = Wake::default();
    let runtime = tokio::runtime::Handle::current();
    let primary: Option<Box<dyn discovery::Source>> = match (&opts.kubernetes, &opts.discovery) {
        (Some(k), _) => {
            let watch = kubernetes::Source::start(k.clone(), wake.clone(), &runtime);
            let xds = opts
                .xds_server
                .clone()
                .map(|server| xds::Pool::new(server, wake.clone(), runtime.clone()));
            Some(Box::new(kubernetes::KubeSource::new(watch, xds)))
        }
        (None, Some(o)) => Some(Box::new(Discoverer::new(o.clone(), DISCOVERY_REFRESH))),
        (None, None) => None,
    };
    let passes = event_loop::Passes {
        sources: Sources {
            primary,
            namespaces: opts.namespaces.clone(),
            config: opts.config.clone(),
            last_good: None,
            identities: BTreeMap::new(),
            logged: BTreeMap::new(),
            deferred,
            sidecar_hop: opts.sidecar_hop,
        },
        memory: MemoryGuard::new(opts.memory_headroom, opts.proc_root.clone()),
        sweep: Sweep::new(opts.sweep),
        resync: opts.resync,
        next_reconcile: Instant::now(),
    };
    event_loop::run(Arc::clone(&shared), passes, wake, &mut signals).await?;

    let (detach_on_exit, pin_dir) = (opts.detach_on_exit, opts.datapath.pin_dir.clone());
    off_the_workers(move || stop(&shared, detach_on_exit, &pin_dir)).await?
}

/// What the daemon leaves behind: the datapath pinned (accelerated connections keep flowing
/// until the next daemon adopts it), or detached with `--detach-on-exit`.
fn stop(shared: &Shared, detach_on_exit: bool, pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let had_datapath = shared.datapath().take().is_some();
    if detach_on_exit && had_datapath {
        tracing::info!("stopping: detaching the datapath (--detach-on-exit)");
        datapath::detach(pin_dir)?;
    } else if had_datapath {
        tracing::info!(
            "stopping; the datapath stays pinned and accelerated connections keep flowing"
        );
    } else {
        tracing::info!("stopping; nothing was attached by this daemon");
    }
    Ok(())
}

/// A pass of the memory guard over the accelerated pods, when one is due. Newly tight pods are
/// marked in the datapath at once (sk_msg moves their redirected directions to TCP at the next
/// message); the reconcile that follows, asked for by the return value, writes every pod's
/// flags from scratch, which is also how a released pod gets its hop bits back.
fn check_memory(shared: &Shared, guard: &mut MemoryGuard) -> bool {
    // Checked before the pod list is copied out of the snapshot: most loop turns do nothing.
    if !guard.due() {
        return false;
    }
    let watched: Vec<memory_guard::Watched> = shared
        .read()
        .pods
        .iter()
        .filter(|p| p.accelerated())
        .filter_map(|p| {
            Some(memory_guard::Watched {
                cookie: p.netns_cookie?,
                name: p.name.clone(),
                netns: p.netns.clone(),
            })
        })
        .collect();
    if !guard.run(&watched) {
        return false;
    }
    let tight: BTreeMap<u64, String> = guard
        .tight()
        .iter()
        .map(|(c, t)| (*c, t.describe(guard.headroom)))
        .collect();
    let cookies: Vec<u64> = tight.keys().copied().collect();
    if let Some(dp) = shared.datapath().as_mut() {
        if let Err(e) = dp.set_memory_tight(&cookies) {
            tracing::error!(error = %e, "cannot mark memory-tight pods in the datapath");
        }
    }
    shared.write().memory_tight = tight;
    true
}

/// Probe, then load or adopt. Any failure leaves the daemon in pass-through with the reason:
/// nothing is attached, so all traffic takes the normal TCP path, and the daemon stays up to
/// say so instead of crash-looping.
/// Returns the datapath options when the mode is off, so the datapath can be loaded later for
/// the first pod that opts in.
fn start_datapath(opts: &RunOptions, shared: &Shared) -> Option<datapath::Options> {
    let report = if opts.force {
        tracing::warn!("--force: the start-up safety probe is skipped");
        None
    } else {
        let report = probe::run(None);
        log_probe(&report);
        let verdict = (!report.ok).then(|| {
            format!(
                "safety probe failed ({}); fix the cause, or pass --force to override",
                report.reasons()
            )
        });
        shared.write().probe = Some(report.clone());
        if let Some(reason) = verdict {
            pass_through(shared, reason);
            return None;
        }
        Some(report)
    };
    let decision = mode::decide(opts.mode, report.as_ref(), opts.sidecar_hop);
    for d in &decision.differences {
        if decision.mode.app_hops() {
            tracing::warn!(mode = decision.mode.as_str(), "app-visible difference: {d}");
        } else {
            tracing::info!(
                mode = decision.mode.as_str(),
                "app hops left alone for: {d}"
            );
        }
    }
    tracing::info!(mode = decision.mode.as_str(), why = %decision.why, "redirect mode decided");
    let off = decision.mode == mode::Mode::Off;
    let why = decision.why.clone();
    shared.write().mode = Some(decision);
    if off {
        // Nothing to redirect: attach nothing, so meshlane costs nothing on this node, until a
        // pod opts in with a mode of its own (`reconcile` loads the datapath then).
        tracing::info!(why = %why, "mode off: nothing attached until a pod opts in (meshlane.io/mode, the pod list's mode)");
        shared.write().phase = Phase::PassThrough(format!("mode off: {why}"));
        return Some(opts.datapath.clone());
    }
    open_datapath(&opts.datapath, shared);
    None
}

/// Loads or adopts the datapath; a failure leaves the daemon in pass-through with the reason.
fn open_datapath(opts: &datapath::Options, shared: &Shared) {
    match Datapath::open(opts) {
        Ok(mut dp) => {
            tracing::info!(origin = ?dp.origin(), pin_dir = %opts.pin_dir.display(), cgroup = %opts.cgroup.display(), "datapath ready");
            // A daemon that adopts pins left in drain mode by an interrupted detach resumes.
            if let Err(e) = dp.set_draining(false) {
                tracing::error!(error = %e, "cannot clear drain mode; adopted pins stay draining");
            }
            let origin = match dp.origin() {
                Origin::Loaded => "loaded",
                Origin::Adopted => "adopted",
                Origin::Upgraded => "upgraded",
            };
            *shared.datapath() = Some(dp);
            let mut s = shared.write();
            s.origin = Some(origin);
            s.phase = Phase::Accelerating;
        }
        Err(e) => pass_through(shared, format!("datapath not loaded: {e}")),
    }
}

fn pass_through(shared: &Shared, reason: String) {
    tracing::error!(
        reason = %reason,
        "not accelerating: all traffic stays on plain TCP; the daemon keeps serving metrics and status"
    );
    shared.write().phase = Phase::PassThrough(reason);
}

fn log_probe(report: &probe::Report) {
    for c in &report.checks {
        match c.status {
            probe::Status::Fail => {
                tracing::error!(check = c.name, detail = %c.detail, "probe check failed")
            }
            probe::Status::Warn => {
                tracing::warn!(check = c.name, detail = %c.detail, "probe warning")
            }
            _ => tracing::debug!(check = c.name, detail = %c.detail, "probe check passed"),
        }
    }
    if report.ok {
        tracing::info!(kernel = %report.kernel, "safety probe passed");
    }
}

/// Where pods come from, and what the daemon remembers between passes.
struct Sources {
    /// Where pods come from besides the pod list file: local or Kubernetes discovery, or none.
    primary: Option<Box<dyn discovery::Source>>,
    namespaces: discovery::NamespaceFilter,
    config: Option<PathBuf>,
    /// The last pod list file that parsed; kept while a bad one is refused.
    last_good: Option<config::PodList>,
    /// Pod name -> Kubernetes UID and IPs, from the last Kubernetes snapshot.
    identities: BTreeMap<String, (String, Vec<std::net::IpAddr>)>,
    /// What was last logged per pod (skip reasons, notes), so a steady state logs once.
    logged: BTreeMap<String, String>,
    /// The datapath not loaded because the node's mode is off; loaded for the first pod that
    /// opts into a mode of its own.
    deferred: Option<datapath::Options>,
    /// `--sidecar-hop`: accelerated pods' sidecars are paired with each other.
    sidecar_hop: bool,
}

impl Sources {
    /// Discovery (if on), then the pod list file (if any) folded in: the operator's word wins.
    /// None while the Kubernetes source has not listed once: the maps are left as they are, so
    /// a restarted daemon removes nothing before it knows.
    fn read(&mut self, shared: &Shared) -> Option<Discovery> {
        let mut d = Discovery::default();
        if let Some(source) = &mut self.primary {
            let started = Instant::now();
            let reading = source.read();
            shared
                .timings
                .discovery
                .observe(started.elapsed().as_secs_f64());
            for (name, health) in reading.health {
                match health {
                    discovery::Health::Ok => source_ok(shared, name),
                    discovery::Health::Failed(e) => source_failed(shared, name, e),
                    discovery::Health::Degraded(e) => source_degraded(shared, name, e),
                    discovery::Health::Waiting(e) => {
                        let mut s = shared.write();
                        let h = s.sources.entry(name.to_string()).or_default();
                        h.healthy = false;
                        h.last_error = e;
                    }
                }
            }
            d = reading.discovery?;
            self.identities = reading.identities;
        }
        // The operator's namespace choice applies to discovered pods; the pod list file, the
        // operator's explicit word, is folded in after it and wins.
        self.namespaces.apply(&mut d);
        if let Some(path) = &self.config {
            match config::load_all(path) {
                Ok(list) => {
                    source_ok(shared, CONFIG_SOURCE);
                    self.last_good = Some(list);
                }
                Err(e) => {
                    tracing::error!(error = %e, "pod list rejected; keeping the last good state");
                    source_failed(shared, CONFIG_SOURCE, e.to_string());
                }
            }
            if let Some(list) = &self.last_good {
                d = d.with_pod_list(list.clone());
            }
        }
        Some(d)
    }

    /// What discovered pods are attributed to in status.
    fn primary_name(&self) -> &'static str {
        self.primary.as_ref().map_or(LOCAL_SOURCE, |s| s.name())
    }

    /// Fills in the pod's UID and IPs, when the Kubernetes source knows the name.
    fn identify(&self, st: &mut PodStatus) {
        if let Some((uid, ips)) = self.identities.get(&st.name) {
            st.uid = uid.clone();
            st.ips = ips.clone();
        }
    }

    /// Logs a pod's skip reason or note when it changes, not on every pass.
    fn log_once(&mut self, pod: &str, what: String, log: impl FnOnce(&str)) {
        if self.logged.get(pod) != Some(&what) {
            log(&what);
            self.logged.insert(pod.to_string(), what);
        }
    }
}

/// One pass: sources -> pods -> policies by namespace cookie -> diff -> map writes -> status.
fn reconcile(shared: &Shared, sources: &mut Sources) {
    let span = tracing::info_span!("reconcile");
    let _g = span.enter();
    let Some(found) = sources.read(shared) else {
        tracing::debug!("a source has not synced yet; maps left as they are");
        return;
    };
    let from_file: std::collections::BTreeSet<String> = sources
        .last_good
        .iter()
        .flat_map(|l| l.pods.iter().map(|p| p.name.clone()))
        .collect();
    for n in &found.notes {
        sources.log_once(
            &n.pod,
            n.message.clone(),
            |m| tracing::warn!(pod = %n.pod, "{m}"),
        );
    }
    let opted_out_by_file: std::collections::BTreeSet<String> = sources
        .last_good
        .iter()
        .flat_map(|l| l.opted_out.iter().map(|o| o.name.clone()))
        .collect();
    let notes_of = |pod: &str| -> Vec<String> {
        found
            .notes
            .iter()
            .filter(|n| n.pod == pod)
            .map(|n| n.message.clone())
            .collect()
    };
    let mut statuses = Vec::with_capacity(found.pods.len() + found.skipped.len());
    for sk in &found.skipped {
        sources.log_once(
            &sk.name,
            format!("{}: {}", sk.reason, sk.detail),
            |m| tracing::info!(pod = %sk.name, netns = %sk.netns.display(), "not accelerated: {m}"),
        );
        let mut st = PodStatus {
            name: sk.name.clone(),
            netns: sk.netns.clone(),
            netns_cookie: None,
            reason: String::new(),
            reason_code: "",
            // Only the pod list's own opt-outs are the config source's; an annotation, a
            // namespace label or --namespace-exclude are the primary source's word.
            source: if opted_out_by_file.contains(&sk.name) {
                CONFIG_SOURCE.into()
            } else {
                sources.primary_name().into()
            },
            derived: sk.derived,
            uid: String::new(),
            ips: Vec::new(),
            mode: None,
            notes: notes_of(&sk.name),
        };
        sources.identify(&mut st);
        st.decline(sk.reason.as_str(), format!("{}: {}", sk.reason, sk.detail));
        statuses.push(st);
    }
    let pods = found.pods;

    // The sidecar hop only where the probe saw it work (or was skipped with --force).
    let sidecar_hop = sources.sidecar_hop
        && shared
            .read()
            .probe
            .as_ref()
            .is_none_or(|r| r.passed("sidecar hop"));
    if sources.sidecar_hop && !sidecar_hop {
        sources.log_once("(sidecar hop)", "refused".into(), |_| {
            tracing::warn!("the probe's sidecar hop check did not pass: the sidecar hop stays off")
        });
    }
    // Each pod's mode: its own opt-in (checked against the probe like --mode), else the node's.
    let modes: Vec<mode::Decision> = {
        let s = shared.read();
        pods.iter()
            .map(|p| {
                pod_mode(
                    p.mode,
                    s.mode.as_ref(),
                    s.probe.as_ref(),
                    sources.sidecar_hop,
                )
            })
            .collect()
    };
    if modes.iter().any(|m| m.mode != mode::Mode::Off) {
        if let Some(opts) = sources.deferred.take() {
            tracing::info!("a pod opted into a redirect mode of its own: loading the datapath");
            open_datapath(&opts, shared);
        }
    }
    let pass_reason = match &shared.read().phase {
        Phase::PassThrough(r) => Some((
            Decline::PassThrough.as_str(),
            format!("daemon in pass-through: {r}"),
        )),
        Phase::Starting => Some((Decline::Starting.as_str(), "daemon starting".to_string())),
        Phase::Accelerating => None,
    };
    let mut desired = BTreeMap::new();
    let memory_tight = shared.read().memory_tight.clone();
    // Each accelerated pod's addresses, for the sidecar hop.
    let mut addresses: Vec<(u64, Vec<std::net::IpAddr>)> = Vec::new();
    for (pod, pod_mode) in pods.iter().zip(&modes) {
        let mut st = PodStatus {
            name: pod.name.clone(),
            netns: pod.netns.clone(),
            netns_cookie: None,
            reason: String::new(),
            reason_code: "",
            source: if from_file.contains(&pod.name) {
                CONFIG_SOURCE.into()
            } else {
                sources.primary_name().into()
            },
            derived: Some(pod.into()),
            uid: String::new(),
            ips: Vec::new(),
            mode: Some(pod_mode.mode),
            notes: notes_of(&pod.name),
        };
        sources.identify(&mut st);
        // A pod whose own mode is off or refused says so; one that follows the node's mode off
        // gets the pass-through reason below (it names the node's decision).
        if pod_mode.mode == mode::Mode::Off && (pass_reason.is_none() || pod.mode.is_some()) {
            st.decline(
                Decline::ModeOff.as_str(),
                format!("redirect mode off: {}", pod_mode.why),
            );
        }
        let mut pod_ips = Vec::new();
        match node::netns_facts(&pod.netns) {
            Ok(f) => {
                st.netns_cookie = Some(f.cookie);
                if st.ips.is_empty() {
                    st.ips = f.ips.clone();
                }
                pod_ips = f.ips;
            }
            Err(e) => {
                tracing::warn!(pod = %pod.name, netns = %pod.netns.display(), error = %e, "netns not found; pod not accelerated");
                st.decline(
                    discovery::Reason::NetnsNotFound.as_str(),
                    format!("netns not found: {e}"),
                );
            }
        }
        if let (Some(cookie), true) = (st.netns_cookie, st.accelerated()) {
            match policy::pod_policy(pod) {
                Ok(mut p) => {
                    if pod_mode.mode == mode::Mode::TwoWay {
                        p.flags |= meshlane_common::POLICY_INTO_APP;
                    }
                    if !pod_mode.mode.app_hops() {
                        // The sidecar mode: the pod's capture facts stay (its sidecar accepts
                        // the hop on its inbound port), but no app socket is paired.
                        p.flags &=
                            !(meshlane_common::POLICY_OUTBOUND | meshlane_common::POLICY_INBOUND);
                    }
                    if let Some(why) = memory_tight.get(&cookie) {
                        // No new pairs, and no sidecar of this node is stamped toward it.
                        p.flags = policy::memory_tight(p.flags);
                        st.notes.push(why.clone());
                    } else if sidecar_hop {
                        p.flags |= meshlane_common::POLICY_SIDECAR_HOP;
                        addresses.push((cookie, pod_ips));
                    }
                    desired.insert(cookie, (p, statuses.len()));
                }
                Err(e) => {
                    tracing::error!(pod = %st.name, error = %e, "pod not accelerated");
                    st.decline(
                        Decline::InvalidPolicy.as_str(),
                        format!("invalid policy: {e}"),
                    );
                }
            }
        }
        if st.accelerated() {
            if let Some((code, r)) = &pass_reason {
                st.decline(code, r.clone());
            }
        }
        statuses.push(st);
    }

    // Removed pods are named from the last pass (a pod listed by an earlier daemon has no name
    // here: its cookie is all there is). Read before the datapath lock is taken.
    let known: BTreeMap<u64, String> = shared
        .read()
        .pods
        .iter()
        .filter_map(|p| Some((p.netns_cookie?, p.name.clone())))
        .collect();
    let mut errors = 0;
    if let Some(dp) = shared.datapath().as_mut() {
        errors = write_policies(dp, &desired, &mut statuses, &known);
        // The control bit follows the tight pods still listed (the flags are already written).
        let tight: Vec<u64> = memory_tight
            .keys()
            .filter(|c| desired.contains_key(c))
            .copied()
            .collect();
        if let Err(e) = dp.set_memory_tight(&tight) {
            tracing::error!(error = %e, "cannot update the memory-tight control bit");
            errors += 1;
        }
        let (unique, ambiguous) =
            policy::pod_addresses(addresses.iter().map(|(c, ips)| (*c, ips.as_slice())));
        for ip in ambiguous {
            sources.log_once(&format!("(address {ip})"), "ambiguous".into(), |_| {
                tracing::warn!(%ip, "several accelerated pods have this address; the sidecar hop leaves it alone")
            });
        }
        match dp.set_pod_ips(&unique) {
            Ok(failed) => errors += failed as u64,
            Err(e) => {
                tracing::error!(error = %e, "cannot update the pod address map");
                errors += 1;
            }
        }
    }
    let mut s = shared.write();
    s.pods = statuses;
    s.last_reconcile = Some(SystemTime::now());
    s.reconciles_total += 1;
    s.policy_errors_total += errors;
}

/// Makes the policy map equal `desired`; a pod whose write fails is marked with the error.
/// Returns how many map operations failed.
fn write_policies(
    dp: &mut Datapath,
    desired: &BTreeMap<u64, (meshlane_common::PodPolicy, usize)>,
    statuses: &mut [PodStatus],
    known: &BTreeMap<u64, String>,
) -> u64 {
    let current = match dp.pods() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the policy map");
            for st in statuses.iter_mut().filter(|s| s.accelerated()) {
                st.decline(
                    Decline::PolicyMapUnreadable.as_str(),
                    format!("policy map unreadable: {e}"),
                );
            }
            return 1;
        }
    };
    let policies: BTreeMap<u64, meshlane_common::PodPolicy> =
        desired.iter().map(|(c, (p, _))| (*c, *p)).collect();
    let diff = policy::diff(&current, &policies);
    let mut errors = 0;
    for (cookie, p) in &diff.upsert {
        // Log lines name the pod, not only its namespace cookie.
        let pod = desired
            .get(cookie)
            .map_or("", |(_, i)| statuses[*i].name.as_str());
        match dp.set_pod(*cookie, p) {
            Ok(()) => tracing::info!(
                pod,
                netns_cookie = cookie,
                policy_flags = p.flags,
                "pod accelerated"
            ),
            Err(e) => {
                errors += 1;
                tracing::error!(pod, netns_cookie = cookie, error = %e, "policy write failed");
                if let Some((_, i)) = desired.get(cookie) {
                    statuses[*i].decline(
                        Decline::PolicyWriteFailed.as_str(),
                        format!("policy write failed: {e}"),
                    );
                }
            }
        }
    }
    for cookie in &diff.remove {
        let pod = known
            .get(cookie)
            .map_or("(listed by an earlier daemon)", String::as_str);
        match dp.remove_pod(*cookie) {
            Ok(()) => tracing::info!(pod, netns_cookie = cookie, "pod removed"),
            Err(e) => {
                errors += 1;
                tracing::error!(pod, netns_cookie = cookie, error = %e, "policy removal failed")
            }
        }
    }
    errors
}

fn source_ok(shared: &Shared, name: &str) {
    let mut s = shared.write();
    let h = s.sources.entry(name.to_string()).or_default();
    h.healthy = true;
    h.degraded = false;
    h.last_error.clear();
    h.last_success = Some(SystemTime::now());
}

fn source_failed(shared: &Shared, name: &str, error: String) {
    source_down(shared, name, error, false);
}

/// The source is throttled (not broken): its last good state is kept and it retries.
fn source_degraded(shared: &Shared, name: &str, error: String) {
    source_down(shared, name, error, true);
}

/// One write, so a scrape never sees half of it.
fn source_down(shared: &Shared, name: &str, error: String, degraded: bool) {
    let mut s = shared.write();
    let h = s.sources.entry(name.to_string()).or_default();
    h.healthy = false;
    h.degraded = degraded;
    h.last_error = error;
    h.errors_total += 1;
}

/// A pod's redirect mode: the node's decision, unless the pod names its own, which is judged
/// against the probe exactly like `--mode` (an unsafe opt-in is refused: mode off, with why).
fn pod_mode(
    own: Option<mode::Mode>,
    node: Option<&mode::Decision>,
    report: Option<&probe::Report>,
    sidecar_hop: bool,
) -> mode::Decision {
    let Some(own) = own else {
        return node.cloned().unwrap_or(mode::Decision {
            mode: mode::Mode::Off,
            why: "the node's mode is not decided yet".into(),
            differences: Vec::new(),
        });
    };
    let mut d = mode::decide(own.choice(), report, sidecar_hop);
    d.why = format!("the pod's own mode: {}", d.why);
    d
}
