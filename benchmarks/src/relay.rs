//! The relay-chain suite (`--suite relay`): before/after latency of the relay chain.
//!
//! client app -> (REDIRECT) -> client sidecar -> veth -> (REDIRECT) -> server sidecar -> server app
//!
//! The sidecars are minimesh relays (uid 1337, SO_ORIGINAL_DST), so both local hops of both pods
//! are what meshlane accelerates. Each round runs one scenario on a fresh connection; scenarios
//! alternate round by round (plain, meshlane, plain, ...) so drift on this noisy machine hits both
//! alike. Reported: per-round percentiles, then the median over rounds with the min..max spread.
//! "plain" means no meshlane program loaded at all; "meshlane" means loaded, attached, pods listed.
//! The datapath is loaded in-process here; the Envoy suite runs the real daemon.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context, Result};
use meshlane::datapath::{self, Datapath, Options};
use minimesh::{CaptureConfig, Cgroup, EchoServer, TwoPods};

use crate::{
    measure,
    progstats::{self, Programs, StatsEnabled},
    report,
    results::relay::{Round, SCENARIOS},
    Args,
};

/// Runs the suite and prints/writes its results (nothing when interrupted).
pub fn suite(args: &Args, stop: &AtomicBool) -> Result<()> {
    let results = run(args, stop)?;
    if stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    report::print(args, &results);
    report::write(args, &results)
}

pub fn run(args: &Args, stop: &AtomicBool) -> Result<Vec<Round>> {
    let cgroup = Cgroup::new("bench")?;
    let _inside = cgroup.enter()?;
    let mesh = TwoPods::new(201, CaptureConfig::default(), CaptureConfig::default())?;
    let dst = SocketAddrV4::new(mesh.server.ip, 8080);
    let _app = EchoServer::spawn(&mesh.server.ns, dst)?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/meshlane-bench-{}", std::process::id()));
    let opts = Options {
        pin_dir: pin_dir.clone(),
        cgroup: cgroup.path().to_path_buf(),
        max_sockets: meshlane::datapath::DEFAULT_MAX_SOCKETS,
    };
    let _bpf_stats = StatsEnabled::enable()?;
    let mut out = Vec::new();
    let total = args.rounds * SCENARIOS.len();
    for round in 0..args.rounds {
        for (k, &scenario) in SCENARIOS.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Ok(out);
            }
            let (dp, progs) = if scenario == "meshlane" {
                let before = progstats::meshlane_ids()?;
                let dp = attach(&opts, &mesh, args.sidecar_hop == "on")?;
                (Some(dp), Some(Programs::since(&before)?))
            } else {
                (None, None)
            };
            let snap = || progs.as_ref().map(Programs::snapshot).transpose();
            let s0 = snap()?;
            let eagain0 = measure::eagain_retries();
            let rtt = measure::pingpong(&mesh.client.ns, dst, 64, args.pingpongs)?;
            let s1 = snap()?;
            let connect = measure::connects(&mesh.client.ns, dst, args.connects)?;
            let s2 = snap()?;
            let eagain_retries = measure::eagain_retries() - eagain0;
            let (pingpong_progs, connect_progs) = match (&progs, s0, s1, s2) {
                (Some(p), Some(s0), Some(s1), Some(s2)) => (p.cost(&s0, &s1), p.cost(&s1, &s2)),
                _ => (Vec::new(), Vec::new()),
            };
            let (pairs, redirected_bytes) = match &dp {
                Some(dp) => {
                    let c = dp.counters()?;
                    (c.pairs(), c.redirected_bytes())
                }
                None => (0, 0),
            };
            drop(dp);
            datapath::detach(&pin_dir)?;
            if scenario == "meshlane" && pairs == 0 {
                bail!("the meshlane scenario paired nothing; the numbers would be meaningless");
            }
            eprintln!(
                "[{:>2}/{total}] {scenario:<8} rtt p50 {:>6.1} us  p99 {:>6.1} us  connect p50 {:>6.1} us  pairs {pairs}",
                round * SCENARIOS.len() + k + 1,
                rtt.p50_us,
                rtt.p99_us,
                connect.p50_us
            );
            out.push(Round {
                scenario,
                round,
                rtt,
                connect,
                pairs,
                redirected_bytes,
                eagain_retries,
                pingpong_progs,
                connect_progs,
            });
        }
    }
    Ok(out)
}

/// Loads the datapath on the bench cgroup and lists both pods, with the sidecar hop (relay ->
/// relay across the veth) when `sidecar_hop` is set, as the daemon does.
fn attach(opts: &Options, mesh: &TwoPods, sidecar_hop: bool) -> Result<Datapath> {
    let mut dp = Datapath::open(opts).context("load meshlane")?;
    let mut ips = std::collections::BTreeMap::new();
    for pod in [&mesh.client, &mesh.server] {
        // minimesh installs istio-init's default capture, so the model is Istio's defaults.
        let model = meshlane::model::Pod::with_istio_defaults(pod.ns.name(), pod.ns.path());
        let mut policy = meshlane::policy::pod_policy(&model)?;
        let cookie = pod.ns.cookie()?;
        if sidecar_hop {
            policy.flags |= meshlane_common::POLICY_SIDECAR_HOP;
            ips.insert(pod.ip.into(), cookie);
        }
        dp.set_pod(cookie, &policy)?;
    }
    let failed = dp.set_pod_ips(&ips)?;
    if failed > 0 {
        bail!("{failed} pod addresses could not be written");
    }
    Ok(dp)
}
