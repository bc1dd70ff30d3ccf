//! `meshlane run`: open (or adopt) the datapath, then keep the policy map equal to the pod list,
//! re-reading it periodically and on SIGHUP. A bad pod list keeps the last good state. On SIGTERM
//! or SIGINT the daemon exits and leaves the datapath pinned: accelerated connections keep
//! flowing until the next daemon adopts the pins, or `meshlane detach` removes them.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    config,
    datapath::{self, Datapath},
    model::Pod,
    node, policy,
};

pub struct RunOptions {
    pub datapath: datapath::Options,
    pub config: Option<PathBuf>,
    pub resync: Duration,
    pub detach_on_exit: bool,
    /// Skip the start-up safety probe (break-glass).
    pub force: bool,
}

pub fn run(opts: RunOptions) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("install signal handler")?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))
        .context("install SIGHUP handler")?;

    // Configuration errors (privilege, cgroup, bpffs) end the daemon with one clear sentence;
    // only the kernel's behaviour is left to the probe.
    datapath::check(&opts.datapath)?;
    if opts.force {
        tracing::warn!("--force: the start-up safety probe is skipped");
    } else if !probe_passes() {
        // Stay up and say why, instead of crash-looping: nothing is loaded or attached, so all
        // traffic takes the normal TCP path.
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        return Ok(());
    }

    let mut dp = Datapath::open(&opts.datapath)?;
    tracing::info!(origin = ?dp.origin(), pin_dir = %opts.datapath.pin_dir.display(), cgroup = %opts.datapath.cgroup.display(), "datapath ready");
    // A daemon that adopts pins left in drain mode by an interrupted detach resumes service.
    dp.set_draining(false)?;

    let mut last_good: Option<Vec<Pod>> = None;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if hup.swap(false, Ordering::Relaxed) || Instant::now() >= next {
            reconcile(&mut dp, opts.config.as_deref(), &mut last_good);
            next = Instant::now() + opts.resync;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if opts.detach_on_exit {
        tracing::info!("stopping: detaching the datapath (--detach-on-exit)");
        datapath::detach(&opts.datapath.pin_dir)?;
    } else {
        tracing::info!(
            "stopping; the datapath stays pinned and accelerated connections keep flowing"
        );
    }
    Ok(())
}

/// Runs `meshlane probe` in-process and logs its verdict, check by check.
fn probe_passes() -> bool {
    let report = crate::probe::run(None);
    for c in &report.checks {
        match c.status {
            crate::probe::Status::Fail => {
                tracing::error!(check = c.name, detail = %c.detail, "probe check failed")
            }
            crate::probe::Status::Warn => {
                tracing::warn!(check = c.name, detail = %c.detail, "probe warning")
            }
            _ => tracing::debug!(check = c.name, detail = %c.detail, "probe check passed"),
        }
    }
    if report.ok {
        tracing::info!(kernel = %report.kernel, "safety probe passed");
    } else {
        tracing::error!(
            kernel = %report.kernel,
            reasons = %report.reasons(),
            "not accelerating: the safety probe found this kernel unsafe; traffic stays on plain TCP (fix the cause, or pass --force to override)"
        );
    }
    report.ok
}

/// One pass: pod list -> policies by namespace cookie -> diff -> map writes.
fn reconcile(
    dp: &mut Datapath,
    config: Option<&std::path::Path>,
    last_good: &mut Option<Vec<Pod>>,
) {
    let span = tracing::info_span!("reconcile");
    let _g = span.enter();
    let pods = match config.map(config::load) {
        None => Vec::new(),
        Some(Ok(p)) => {
            *last_good = Some(p.clone());
            p
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "pod list rejected; keeping the last good state");
            match last_good {
                Some(p) => p.clone(),
                None => return,
            }
        }
    };
    let mut desired = BTreeMap::new();
    for pod in &pods {
        let cookie = match node::netns_cookie(&pod.netns) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(pod = %pod.name, netns = %pod.netns.display(), error = %e, "netns not found; pod not accelerated");
                continue;
            }
        };
        match policy::pod_policy(pod) {
            Ok(p) => {
                desired.insert(cookie, p);
            }
            Err(e) => tracing::error!(error = %e, "pod not accelerated"),
        }
    }
    let current = match dp.pods() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the policy map");
            return;
        }
    };
    let diff = policy::diff(&current, &desired);
    for (cookie, p) in &diff.upsert {
        match dp.set_pod(*cookie, p) {
            Ok(()) => tracing::info!(netns_cookie = cookie, "pod accelerated"),
            Err(e) => tracing::error!(netns_cookie = cookie, error = %e, "policy write failed"),
        }
    }
    for cookie in &diff.remove {
        match dp.remove_pod(*cookie) {
            Ok(()) => tracing::info!(netns_cookie = cookie, "pod removed"),
            Err(e) => tracing::error!(netns_cookie = cookie, error = %e, "policy removal failed"),
        }
    }
}
