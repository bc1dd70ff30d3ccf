//! `meshlane-bench`: is the mesh faster with meshlane, by how much, with what spread.
//!
//! Default suite (`--suite envoy`, see `suite.rs`): real Envoy sidecars on the mini-mesh,
//! scenarios A (no mesh), B (Envoy + iptables capture) and C (B + the meshlane daemon with local
//! discovery), interleaved round by round; TCP ping-pong, HTTP/1.1, gRPC unary, 1/16/64
//! connections, connect cost and bulk throughput. `--suite relay` runs the older relay-chain
//! comparison (thread-per-connection sidecar stand-ins, datapath loaded in-process).

mod daemon;
mod hdrlog;
mod measure;
mod progstats;
mod proof;
mod provenance;
mod readme;
mod relay;
mod report;
mod results;
mod suite;
mod summary;
mod workload;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{bail, Context, Result};
use clap::Parser;

/// Before/after latency and throughput of meshlane on a local Istio-shaped node (needs root).
#[derive(Parser, Debug, Clone)]
#[command(name = "meshlane-bench")]
pub struct Args {
    /// Which benchmark: `envoy` (A/B/C with real Envoy and the daemon) or `relay`.
    #[arg(long, default_value = "envoy", value_parser = ["envoy", "relay"])]
    pub suite: String,
    /// Rounds per scenario (interleaved; at least 5 for numbers worth reading).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// envoy suite: multiplies every request count (1.0 is about 20 s per round here).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// relay suite: round trips measured per round.
    #[arg(long, default_value_t = 5000)]
    pub pingpongs: usize,
    /// relay suite: connect()+close cycles measured per round.
    #[arg(long, default_value_t = 300)]
    pub connects: usize,
    /// The meshlane binary (default: `meshlane` next to this program).
    #[arg(long)]
    pub meshlane: Option<PathBuf>,
    /// Directory for results.json, results.md and the SVG plots.
    #[arg(long, default_value = "benchmarks/out")]
    pub out: PathBuf,
    /// Tiny counts, one round, to prove the harness works (CI). The numbers mean nothing.
    #[arg(long)]
    pub smoke: bool,
    /// envoy suite: the daemon's `--mode` for C. "auto" (the default, what users run): the
    /// reader rule where the probe finds apps cannot tell, else only the sidecar <-> sidecar hop
    /// ("sidecar"; every kernel measured so far). "reader" (app -> sidecar on both app hops, plus
    /// the sidecar hop) and "two-way" measure the opt-ins. The mode the daemon decided is
    /// recorded with the results.
    #[arg(long, default_value = "auto", value_parser = ["auto", "sidecar", "reader", "two-way"])]
    pub mode: String,
    /// The sidecar hop in C (envoy suite: the daemon's `--sidecar-hop`; relay suite: relay ->
    /// relay). "on": the client sidecar -> server sidecar hop is redirected too (both pods are
    /// on this node); "off": what C gets when the server pod is on another node: the app hops
    /// only under "reader" and "two-way"; under "auto"/"sidecar", which pair no app hop, the
    /// daemon runs with the server pod opted out and nothing may pair, so C measures what the
    /// attached programs cost traffic meshlane leaves alone.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub sidecar_hop: String,
    /// envoy suite: Istio's mutual TLS between the two sidecars in B and C ("on", what Istio
    /// does by default), or plaintext ("off").
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub mtls: String,
    /// envoy suite: worker threads of both sidecars in B and C (Envoy's `--concurrency`). 2 is
    /// Istio's default for sidecars (`proxy.istio.io/config` concurrency), what users run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Rewrite the generated tables of the READMEs (`--readme`) from the results.json files
    /// their markers name, then exit (no root, no benchmark run).
    #[arg(long, conflicts_with = "check_readme")]
    pub update_readme: bool,
    /// Fail if a generated table of the READMEs differs from what its results.json gives (CI).
    #[arg(long)]
    pub check_readme: bool,
    /// The READMEs with generated tables, for --update-readme and --check-readme.
    #[arg(long, default_values = ["README.md", "benchmarks/README.md"])]
    pub readme: Vec<PathBuf>,
}

impl Args {
    pub fn meshlane_bin(&self) -> Result<PathBuf> {
        let bin = match &self.meshlane {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("the directory of meshlane-bench")?
                .join("meshlane"),
        };
        if !bin.is_file() {
            bail!(
                "{} not found; build it (cargo build -p meshlane) or pass --meshlane",
                bin.display()
            );
        }
        Ok(bin)
    }
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.update_readme || args.check_readme {
        return readme::run(&args.readme, args.update_readme);
    }
    if args.smoke {
        args.rounds = args.rounds.min(2);
        args.pingpongs = 200;
        args.connects = 20;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("meshlane-bench needs root (network namespaces, iptables, BPF)");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    // Everything is dropped (namespaces, cgroup, daemon, pins) before these return, also on
    // Ctrl-C and on errors.
    let result = match args.suite.as_str() {
        "relay" => relay::suite(&args, &stop),
        _ => suite::suite(&args, &stop),
    };
    if stop.load(Ordering::Relaxed) {
        eprintln!("interrupted; everything was cleaned up");
        std::process::exit(130);
    }
    result
}
