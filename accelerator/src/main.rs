//! The `meshlane` command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser, Subcommand};

mod status;
use meshlane::{daemon, datapath, telemetry};

/// What each exit status means, for scripts and init containers (also in the README).
const EXIT_CODES: &str = "\
Exit status:
  0  success (probe: acceleration is safe on this kernel, warnings included)
  1  error: the command could not do its job (no privilege, a bad pod list, no daemon on
     --api-socket, a probe that could not start, ...)
  2  usage: an unknown flag or a value that does not parse (the message names the flag)
  3  probe: acceleration is NOT safe on this node (a check of the kernel failed; the daemon
     would stay in pass-through)";

/// `meshlane probe` found this node unsafe to accelerate (distinct from an error, 1).
const EXIT_UNSAFE: u8 = 3;

/// meshlane: kernel fast lane for Istio sidecar traffic.
///
/// Pairs the two ends of each localhost hop between an app and its sidecar (app -> sidecar after
/// istio-init's REDIRECT, sidecar -> app from 127.0.0.6) and hands bytes straight from one socket
/// to the other with eBPF sock_ops + sk_msg. Where connections go is still decided by Istio.
#[derive(Parser)]
#[command(
    name = "meshlane",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MESHLANE_GIT_REVISION"), ")"),
    propagate_version = true,
    after_help = EXIT_CODES
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "MESHLANE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "meshlane=debug". A filter that
    /// does not parse is refused (silently logging at another level would hide what was asked).
    #[arg(long, global = true, env = "MESHLANE_LOG", default_value = "info", value_parser = parse_log_filter)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the `run` variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Load (or adopt) the datapath and keep it in step with the pod list until stopped.
    ///
    /// Mounts bpffs if needed, loads the programs, attaches sock_ops to the cgroup and sk_msg to
    /// the sockhash, and pins everything under --pin-dir. If a complete set of pins is already
    /// there (a previous daemon), it is adopted without reloading, so accelerated connections keep
    /// flowing across restarts and crashes. On SIGTERM the datapath stays in place unless
    /// --detach-on-exit is given; `meshlane detach` removes it.
    ///
    /// Before loading anything it runs the safety probe (`meshlane probe`). If a check fails, the
    /// daemon stays up, logs why, and accelerates nothing, unless --force is given.
    Run {
        #[command(flatten)]
        dp: DatapathArgs,
        /// Where pods come from besides --config.
        #[arg(long, env = "MESHLANE_DISCOVERY", value_enum, default_value_t = Discovery::Local)]
        discovery: Discovery,
        /// This node's name, for --discovery kubernetes (the downward API's spec.nodeName).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// API server URL without credentials (e.g. `kubectl proxy`'s); default: in-cluster
        /// service account, else kubeconfig.
        #[arg(long, env = "MESHLANE_KUBE_API")]
        kube_api: Option<String>,
        /// The node's /proc (where each pod's network namespace is found by its UID).
        #[arg(long, env = "MESHLANE_PROC_ROOT", default_value = "/proc")]
        proc_root: PathBuf,
        /// Control plane to ask for each pod's Listener resources, as the pod's own sidecar
        /// does (ADS, e.g. http://istiod.istio-system.svc:15010), to cross-check the capture
        /// ports and spot TPROXY sidecars. Needs --discovery kubernetes (for each pod's identity).
        #[arg(long, env = "MESHLANE_XDS_SERVER")]
        xds_server: Option<String>,
        /// Accelerate discovered pods only in these namespaces (repeat, or comma-separated).
        #[arg(
            long,
            env = "MESHLANE_NAMESPACE_INCLUDE",
            value_delimiter = ',',
            value_name = "NAMESPACE"
        )]
        namespace_include: Vec<String>,
        /// Never accelerate discovered pods in these namespaces (repeat, or comma-separated);
        /// wins over --namespace-include. Per pod or namespace, the meshlane.io/accelerate
        /// annotation/label does the same with --discovery kubernetes.
        #[arg(
            long,
            env = "MESHLANE_NAMESPACE_EXCLUDE",
            value_delimiter = ',',
            value_name = "NAMESPACE"
        )]
        namespace_exclude: Vec<String>,
        /// Pod list (TOML; see the README). Re-read every --resync and on SIGHUP. With
        /// discovery on, the file wins for the namespaces it names, and `accelerate = false`
        /// opts a discovered pod out.
        #[arg(long, env = "MESHLANE_CONFIG")]
        config: Option<PathBuf>,
        /// How often the sources are read and the policy map reconciled (e.g. 500ms, 90s, 2m,
        /// 1h; a bare number is seconds; 10ms to 1h).
        #[arg(long, env = "MESHLANE_RESYNC", default_value = "2s", value_parser = parse_duration)]
        resync: Duration,
        /// How often sockets that waited for a partner are checked; one still alone at the next
        /// check (a stamp no sidecar read) leaves the sockhash, so its reads are plain TCP.
        /// Same units and range as --resync.
        #[arg(long, env = "MESHLANE_SWEEP", default_value = "10s", value_parser = parse_duration)]
        sweep: Duration,
        /// Detach everything on SIGTERM/SIGINT instead of leaving it pinned.
        #[arg(long, env = "MESHLANE_DETACH_ON_EXIT")]
        detach_on_exit: bool,
        /// Break-glass: accelerate without running the start-up safety probe (`meshlane probe`).
        /// Without it, a failed probe keeps the daemon up but accelerating nothing.
        #[arg(long, env = "MESHLANE_FORCE")]
        force: bool,
        /// Which directions to redirect. A pod's own mode wins (the pod list's `mode`, the
        /// meshlane.io/mode pod annotation or namespace label), judged by the same probe.
        /// README: "What an app can notice".
        #[arg(long, env = "MESHLANE_MODE", value_enum, default_value = "auto")]
        mode: meshlane::mode::Choice,
        /// The sidecar hop: pair a sidecar's upstream connection to another accelerated pod on
        /// this node with that pod's sidecar (both directions: both ends are sidecars, no app
        /// socket is involved). Each pod's own addresses, read from its network namespace, tell
        /// which destinations are on this node; nothing is stamped toward any other address.
        /// Applies to pods accelerated in any mode but off.
        #[arg(long, env = "MESHLANE_SIDECAR_HOP", value_enum, default_value_t = OnOff::On)]
        sidecar_hop: OnOff,
        /// Address for Prometheus `/metrics`, `/healthz` (liveness) and `/readyz` (readiness:
        /// start-up decided, accelerating or in pass-through). "off" disables it.
        #[arg(long, env = "MESHLANE_METRICS_ADDR", default_value = "127.0.0.1:9464", value_parser = parse_metrics_addr)]
        metrics_addr: MetricsAddr,
        /// Unix socket for the meshlane.v1 status API that `meshlane status` reads (created
        /// root-only). "off" disables it.
        #[arg(long, env = "MESHLANE_API_SOCKET", default_value = telemetry::api::DEFAULT_SOCKET)]
        api_socket: PathBuf,
        /// Memory room a pod must keep for redirects into it (bytes, or with KiB, MiB, GiB). A
        /// redirect charges the reading socket's memory cgroup from inside the writer's send,
        /// where a refused charge is the writer's ENOMEM (plain TCP would drop and retransmit).
        /// Every 250 ms the daemon reads the memory groups of each accelerated pod's processes
        /// (v1: the TCP limit; v2: memory.max less what is used, counting inactive file pages
        /// as room) and their ancestors: below this room the pod pairs nothing new and its
        /// redirected directions move to TCP; above twice it, pairing resumes. 0: off.
        #[arg(long, env = "MESHLANE_MEMORY_HEADROOM", default_value = "16MiB", value_parser = parse_size)]
        memory_headroom: u64,
    },
    /// Remove every meshlane program, link, pin and map. Live connections keep working.
    ///
    /// Stops new redirects (each accelerated direction continues on plain TCP after the bytes it
    /// already handed over, which its reader gets first), detaches sock_ops from the cgroup and
    /// sk_msg from the sockhash, and removes all pins. No socket is pulled out of the sockhash, so
    /// no queued byte is lost; the kernel frees the maps when the last accelerated connection
    /// closes. Safe to run when nothing is attached.
    Detach {
        /// bpffs directory of the pins.
        #[arg(long, env = "MESHLANE_PIN_DIR", default_value = datapath::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Check whether this node's kernel may be accelerated, and report why.
    ///
    /// Loads a private copy of the programs on this process's cgroup, acting only on a throw-away
    /// network namespace, and runs the quick subset of the hazard matrix there: both hops paired
    /// and byte-exact with the redirect proven by counters, end of stream, MSG_PEEK, FIONREAD,
    /// ordering of tiny writes, the half-close EAGAIN quirk, survival across detach. Exits 3 when
    /// a check of the kernel fails (acceleration unsafe), 1 when the probe cannot start (no
    /// privilege, a --cgroup that is not cgroup v2), 0 otherwise (warnings included). Leaves
    /// nothing.
    #[command(after_help = EXIT_CODES)]
    Probe {
        #[command(flatten)]
        output: OutputArgs,
        /// cgroup v2 directory to attach the private copy to (default: this process's own).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Ask the running daemon what it is doing: accelerating or passing through (and why), each
    /// pod with its state and the reason when not accelerated, counters, the probe report,
    /// discovery sources and map usage.
    ///
    /// Reads the meshlane.v1 API on --api-socket. With --pins it reads the pinned datapath
    /// directly instead (pods by namespace cookie and counters), which works with no daemon.
    Status {
        /// The daemon's API socket.
        #[arg(long, env = "MESHLANE_API_SOCKET", default_value = telemetry::api::DEFAULT_SOCKET)]
        api_socket: PathBuf,
        /// Read the pins under --pin-dir instead of asking the daemon.
        #[arg(long)]
        pins: bool,
        /// bpffs directory of the pins (with --pins).
        #[arg(long, env = "MESHLANE_PIN_DIR", default_value = datapath::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print a completion script for a shell.
    ///
    /// bash: `meshlane completions bash > /etc/bash_completion.d/meshlane`; zsh: into a
    /// directory on $fpath as `_meshlane`; fish: `~/.config/fish/completions/meshlane.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args)]
struct OutputArgs {
    /// How to print the result: "table" for people; "json" and "yaml" are documents for
    /// scripts, whose field names and values stay stable.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Same as --output json (kept for existing scripts).
    #[arg(long, conflicts_with = "output")]
    json: bool,
}

impl OutputArgs {
    fn get(&self) -> Output {
        if self.json {
            Output::Json
        } else {
            self.output
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

/// A document as `--output json` or `yaml` prints it (ending with a newline).
fn serialize<T: serde::Serialize>(doc: &T, output: Output) -> anyhow::Result<String> {
    Ok(match output {
        Output::Yaml => serde_norway::to_string(doc)?,
        _ => serde_json::to_string_pretty(doc)? + "\n",
    })
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Discovery {
    /// Find Envoy sidecars on this node (processes named envoy, outside the host network
    /// namespace), read istio-init's capture rules in their namespace and the sidecar's admin
    /// API; pods that look meshed but cannot be accelerated are listed with the reason.
    Local,
    /// Watch this node's pods on the API server (--node-name) and read how Istio injected each
    /// one (istio-init or istio-cni arguments, traffic.sidecar.istio.io annotations,
    /// meshlane.io/accelerate opt-out); each pod's network namespace is found in --proc-root by
    /// its UID.
    Kubernetes,
    /// Only --config.
    #[value(name = "none")]
    Disabled,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    /// Pair the sidecar hop.
    On,
    /// Leave that hop on TCP (and the "sidecar" mode, what "auto" gives where apps could tell,
    /// has nothing to do).
    Off,
}

#[derive(clap::Args)]
struct DatapathArgs {
    /// bpffs directory for pins (mounted at /sys/fs/bpf if missing).
    #[arg(long, env = "MESHLANE_PIN_DIR", default_value = datapath::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// cgroup v2 directory to attach sock_ops to (default: the unified root, detected).
    #[arg(long, env = "MESHLANE_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Sockets each of the two sockhashes holds at once (about two per accelerated hop: its
    /// app end and its sidecar end, in the sockhash for their role). When one is full, new hops
    /// stay on plain TCP and `meshlane_map_full_total{map="socks"}` counts them. The pairing and
    /// unread maps, which the kernel preallocates, are sized from it (about 350 bytes per
    /// socket: 23 MB at the default). Takes effect when the maps are made: pins are adopted at
    /// the size they have (a warning says so); `meshlane detach` first to resize.
    #[arg(long, env = "MESHLANE_MAX_SOCKETS", default_value_t = datapath::DEFAULT_MAX_SOCKETS, value_parser = parse_max_sockets)]
    max_sockets: u32,
}

fn parse_max_sockets(s: &str) -> Result<u32, String> {
    let range = datapath::MAX_SOCKETS_RANGE;
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            format!(
                "{s:?}: expected a number of sockets from {} to {}",
                range.start(),
                range.end()
            )
        })
}

/// A duration in any of humantime's units, alone or combined ("500ms", "90s", "2m", "1h30m",
/// "1h 30m"); a bare number is seconds, as before units were required.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("{s:?}: too large; must be between 10ms and 1h"))?
    } else {
        humantime::parse_duration(t)
            .map_err(|e| format!("{s:?}: expected a duration like 500ms, 90s, 2m or 1m30s ({e})"))?
    };
    // The loop adds it to the clock: an unbounded value would overflow there.
    if !(MIN_RESYNC..=MAX_RESYNC).contains(&d) {
        return Err(format!("{s:?}: must be between 10ms and 1h"));
    }
    Ok(d)
}

const MIN_RESYNC: Duration = Duration::from_millis(10);
const MAX_RESYNC: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
struct MetricsAddr(Option<std::net::SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|_| format!("{s:?}: expected ADDRESS:PORT like 0.0.0.0:9464, or off"))
}

/// A size in bytes: a number, optionally with KiB, MiB or GiB (K, M, G and KB, MB, GB are read
/// as the same powers of two, as Kubernetes' own Ki, Mi, Gi).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size like 16MiB, 512KiB or 1048576"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "Ki" | "KB" | "KiB" => 10,
        "M" | "Mi" | "MB" | "MiB" => 20,
        "G" | "Gi" | "GB" | "GiB" => 30,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format, &cli.log_level);
    let result = match cli.command {
        Command::Run {
            dp,
            discovery,
            node_name,
            kube_api,
            proc_root,
            xds_server,
            namespace_include,
            namespace_exclude,
            config,
            resync,
            sweep,
            detach_on_exit,
            force,
            mode,
            sidecar_hop,
            metrics_addr,
            api_socket,
            memory_headroom,
        } => kube_options(discovery, node_name, kube_api, &proc_root)
            .and_then(|k| {
                if xds_server.is_some() && k.is_none() {
                    anyhow::bail!(
                        "--xds-server needs --discovery kubernetes: each pod's xDS identity (pod IP, name, namespace) comes from the API"
                    );
                }
                Ok(k)
            })
            .and_then(|kubernetes| {
                let mut datapath = datapath::Options::with_defaults(Some(dp.pin_dir), dp.cgroup)?;
                datapath.max_sockets = dp.max_sockets;
                Ok((kubernetes, datapath))
            })
            .and_then(|(kubernetes, datapath)| {
                on_runtime(daemon::run(daemon::RunOptions {
                    datapath,
                    discovery: (discovery == Discovery::Local).then(|| meshlane::discovery::Options {
                        proc_root: proc_root.clone(),
                        ..Default::default()
                    }),
                    kubernetes,
                    xds_server,
                    namespaces: meshlane::discovery::NamespaceFilter {
                        include: namespace_include,
                        exclude: namespace_exclude,
                    },
                    config,
                    resync,
                    sweep,
                    detach_on_exit,
                    force,
                    mode,
                    sidecar_hop: sidecar_hop == OnOff::On,
                    endpoints: telemetry::Endpoints {
                        metrics: metrics_addr.0,
                        api_socket: (api_socket.as_os_str() != "off").then_some(api_socket),
                    },
                    memory_headroom,
                    proc_root,
                }))
            }),
        Command::Detach { pin_dir } => detach(&pin_dir),
        Command::Status {
            pins: true,
            pin_dir,
            output,
            ..
        } => pinned_status(&pin_dir, output.get()),
        Command::Status {
            api_socket, output, ..
        } => on_runtime(status::show(&api_socket, output.get())),
        Command::Probe { output, cgroup } => return probe(output.get(), cgroup.as_deref()),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "meshlane", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Worker threads of the one runtime: the daemon's tasks (servers, watch, xDS streams, its
/// loop) mostly wait on sockets and timers; their blocking work goes to the runtime's blocking
/// pool (tokio's default size: a slow DNS lookup of one xDS stream must not hold up a pass).
const WORKERS: usize = 2;
/// How long an exit waits for blocking work still running (a scrape reading the maps).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Runs `work` on the process's one tokio runtime (as ztunnel and linkerd2-proxy do): every
/// async part of the daemon is a task on it, so none owns threads of its own. Built only for
/// the commands that need it (`run`, `status`).
fn on_runtime(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name("meshlane-rt")
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the tokio runtime: {e}"))?;
    let result = rt.block_on(work);
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

fn kube_options(
    discovery: Discovery,
    node_name: Option<String>,
    kube_api: Option<String>,
    proc_root: &std::path::Path,
) -> anyhow::Result<Option<meshlane::discovery::kubernetes::Options>> {
    use meshlane::discovery::kubernetes::{Endpoint, Options};
    if discovery != Discovery::Kubernetes {
        return Ok(None);
    }
    let node_name = node_name.filter(|n| !n.trim().is_empty()).ok_or_else(|| {
        anyhow::anyhow!("--discovery kubernetes needs --node-name (or NODE_NAME from the downward API's spec.nodeName)")
    })?;
    Ok(Some(Options {
        endpoint: kube_api.map_or(Endpoint::Infer, Endpoint::Url),
        node_name,
        proc_root: proc_root.to_path_buf(),
        host_netns: proc_root.join("1/ns/net"),
    }))
}

fn detach(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "detach must run as root (it removes pins under {})",
            pin_dir.display()
        );
    }
    let report = datapath::detach(pin_dir)?;
    if report.found {
        println!(
            "detached: removed {} pins from {}",
            report.removed_pins.len(),
            pin_dir.display(),
        );
    } else {
        println!("nothing to detach at {}", pin_dir.display());
    }
    Ok(())
}

fn probe(output: Output, cgroup: Option<&std::path::Path>) -> ExitCode {
    let report = meshlane::probe::run(cgroup);
    if output == Output::Table {
        print!("{}", report.render());
    } else {
        match serialize(&report, output) {
            Ok(doc) => print!("{doc}"),
            Err(e) => {
                eprintln!("meshlane: {e:#}");
                return ExitCode::FAILURE;
            }
        }
        if !report.ok {
            // The document is for machines; say why on stderr for the human reading the logs.
            let verdict = if report.judged_kernel() {
                "acceleration is NOT safe on this kernel"
            } else {
                "could not run here"
            };
            eprintln!("meshlane probe: {verdict}: {}", report.reasons());
        }
    }
    if report.ok {
        ExitCode::SUCCESS
    } else if report.judged_kernel() {
        ExitCode::from(EXIT_UNSAFE)
    } else {
        ExitCode::FAILURE
    }
}

/// `status --pins --output json|yaml`: what the pinned maps hold, without a daemon.
#[derive(serde::Serialize)]
struct PinnedDoc {
    pods: Vec<PinnedPodDoc>,
    counters: datapath::Counters,
}

#[derive(serde::Serialize)]
struct PinnedPodDoc {
    netns_cookie: u64,
    proxy_uid: u32,
    outbound_port: u16,
    inbound_port: u16,
}

fn pinned_status(pin_dir: &std::path::Path, output: Output) -> anyhow::Result<()> {
    let counters = datapath::pinned_counters(pin_dir).map_err(|e| {
        anyhow::anyhow!(
            "no meshlane datapath at {} ({e}); is `meshlane run` started?",
            pin_dir.display()
        )
    })?;
    let pods = datapath::pinned_pods(pin_dir)?;
    if output != Output::Table {
        let doc = PinnedDoc {
            pods: pods
                .iter()
                .map(|(cookie, p)| PinnedPodDoc {
                    netns_cookie: *cookie,
                    proxy_uid: p.proxy_uid,
                    outbound_port: p.outbound_port,
                    inbound_port: p.inbound_port,
                })
                .collect(),
            counters,
        };
        print!("{}", serialize(&doc, output)?);
    } else {
        println!("pods: {}", pods.len());
        for (cookie, p) in &pods {
            println!(
                "  netns_cookie={cookie} proxy_uid={} outbound={} inbound={}",
                p.proxy_uid, p.outbound_port, p.inbound_port
            );
        }
        println!("counters:");
        for (name, v) in &counters.0 {
            println!("  {name:<44} {v}");
        }
    }
    Ok(())
}

fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("not a log filter ({e}); e.g. \"info\" or \"meshlane=debug,warn\""))
}

fn init_logs(format: LogFormat, level: &str) {
    // Checked by clap (parse_log_filter), so only the default could get here unparsed.
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs in files and journals stay greppable.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_any_unit_and_keep_the_old_forms() {
        for (text, want) in [
            ("2", Duration::from_secs(2)),
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("90s", Duration::from_secs(90)),
            ("2m", Duration::from_secs(120)),
            ("1m30s", Duration::from_secs(90)),
            ("1m 30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("10ms", Duration::from_millis(10)),
            (" 5min ", Duration::from_secs(300)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
        for (text, says) in [
            ("1h30m", "between 10ms and 1h"),
            ("9ms", "between 10ms and 1h"),
            ("0", "between 10ms and 1h"),
            ("99999999999999999999", "between 10ms and 1h"),
            ("18446744073709551615m", "expected a duration"),
            ("5 parsecs", "expected a duration"),
            ("", "expected a duration"),
            ("-1s", "expected a duration"),
        ] {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(says) && err.contains(text), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
