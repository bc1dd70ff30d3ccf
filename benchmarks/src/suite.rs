//! The Envoy suite (default): scenarios A (no mesh), B (Envoy sidecars with istio-init's
//! capture) and C (B plus the meshlane daemon), interleaved round by round on one mini-mesh.
//!
//! ```text
//! A  client ns ------------------------------veth-----------------------------> server ns app
//! B  app -REDIRECT 15001-> Envoy -veth-> REDIRECT 15006 -> Envoy -127.0.0.6-> app
//! C  B, with `meshlane run --discovery local` attached to the benchmark's cgroup
//! ```
//!
//! Each scenario round starts fresh apps (so no pooled upstream connection of Envoy outlives a
//! round) and opens fresh connections. C rounds start the real daemon and wait until `/readyz`
//! is 200 and `meshlane status` shows both pods accelerated; each C workload must show, in the
//! daemon's counters, every direction its mode redirects carrying the workload's bytes, no
//! message left on TCP without a peer or pinned, and the mode's pairs (`proof.rs`), or its
//! numbers are discarded and counted as rejected, with the reasons. B rounds run with the
//! daemon stopped (SIGTERM with `--detach-on-exit`) and are checked to have no pins and no
//! sock_ops program on the cgroup. Before the rounds, B's capacity is measured for the
//! open-loop rows' rates.
//!
//! With `kernel.bpf_stats_enabled` on for the whole run, each C workload also records what the
//! daemon's own BPF programs cost in the kernel during it (`progstats.rs`).

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use minimesh::{grpc::GrpcServer, BarePods, Cgroup, EchoServer, EnvoyPods, Nginx, Protocol};

use crate::{
    daemon::{self, Counters, Daemon, DaemonSpec},
    progstats::{self, Programs, StatsEnabled},
    proof,
    provenance::Provenance,
    results::suite::{RoundProgCost, Row, SCENARIOS},
    summary,
    workload::{self, Kind, OpenLoop, Targets, Workload},
    Args,
};

const ECHO: u16 = 8080;
const HTTP: u16 = 8081;
const GRPC: u16 = 8082;
const ECHO_DUAL_STACK: u16 = 8083;
/// The IPv6 rows' echo server: its Service's endpoint is the server pod's IPv6 address.
const ECHO_IPV6: u16 = 8084;

/// The warm-up before a round's workloads: the first workload's shape (tcp 64 B on one
/// connection), a quarter of its count.
fn warmup(matrix: &[Workload]) -> Workload {
    let first = &matrix[0];
    Workload {
        name: "warm-up".into(),
        count: (first.count / 4).max(5),
        ..first.clone()
    }
}

/// The workload matrix, counts scaled by `scale`.
pub fn workloads(scale: f64) -> Vec<Workload> {
    let n = |base: usize| ((base as f64 * scale).round() as usize).max(5);
    let mut v = Vec::new();
    let mut add = |name: &str, kind, size, conns, count, family| {
        v.push(Workload {
            name: name.to_string(),
            kind,
            size,
            conns,
            count,
            family,
            open_loop: None,
        })
    };
    use workload::Family::{DualStack, Ipv4, Ipv6};
    let ping = Kind::TcpPingPong;
    add("tcp 64B x1", ping, 64, 1, n(2000), Ipv4);
    add("tcp 1KiB x1", ping, 1024, 1, n(2000), Ipv4);
    add("tcp 16KiB x1", ping, 16 << 10, 1, n(1000), Ipv4);
    add("tcp 64KiB x1", ping, 64 << 10, 1, n(500), Ipv4);
    add("tcp 64B x16", ping, 64, 16, n(200), Ipv4);
    add("tcp 64B x64", ping, 64, 64, n(50), Ipv4);
    add("tcp 64B x1 dual-stack", ping, 64, 1, n(2000), DualStack);
    add("tcp 64B x16 dual-stack", ping, 64, 16, n(200), DualStack);
    add("tcp 64B x1 ipv6", ping, 64, 1, n(2000), Ipv6);
    add("tcp 64B x16 ipv6", ping, 64, 16, n(200), Ipv6);
    add("http 1KiB x1", Kind::Http, 1024, 1, n(1000), Ipv4);
    add("http 1KiB x16", Kind::Http, 1024, 16, n(100), Ipv4);
    add("http 1KiB x64", Kind::Http, 1024, 64, n(30), Ipv4);
    add("grpc 1KiB x1", Kind::Grpc, 1024, 1, n(500), Ipv4);
    add("grpc 1KiB x16", Kind::Grpc, 1024, 16, n(50), Ipv4);
    add("connect+close", Kind::Connect, 1, 1, n(300), Ipv4);
    let bulk = ((64 << 20) as f64 * scale).max((2 << 20) as f64) as usize;
    add("bulk 64KiB writes", Kind::Bulk, 64 << 10, 1, bulk, Ipv4);
    add("bulk 1MiB writes", Kind::Bulk, 1 << 20, 1, bulk, Ipv4);
    // Open loop at a share of B's capacity (measured before the rounds), as fortio runs: the
    // latency a service sees at a given load, which closed-loop ping-pong (always at capacity
    // for its connection count) cannot show.
    for base in OPEN_LOOP_BASES {
        let b = v
            .iter()
            .find(|w| w.name == base)
            .expect("open-loop base")
            .clone();
        for fraction in OPEN_LOOP_SHARES {
            v.push(Workload {
                name: format!("{base} @{:.0}% of B", fraction * 100.0),
                open_loop: Some(OpenLoop {
                    base: base.to_string(),
                    fraction,
                    rate: 0.0,
                }),
                ..b.clone()
            });
        }
    }
    v
}

/// The closed-loop workloads whose B capacity the open-loop runs take a share of.
const OPEN_LOOP_BASES: [&str; 2] = ["tcp 64B x16", "http 1KiB x16"];
const OPEN_LOOP_SHARES: [f64; 2] = [0.5, 0.9];

/// Measures B's throughput in each open-loop workload's base (closed loop, unrecorded, the
/// daemon not running) and sets the open-loop rates from it, the same for A, B and C.
fn calibrate(matrix: &mut [Workload], mesh: &mut EnvoyPods) -> Result<()> {
    let mut capacity = Vec::new();
    for base in OPEN_LOOP_BASES {
        let Some(w) = matrix
            .iter()
            .find(|w| w.name == base && w.open_loop.is_none())
        else {
            continue;
        };
        mesh.restart_client_envoy()?;
        let apps = Apps::start(&mesh.server.ns, mesh.server.ip)?;
        let t = targets(
            mesh.server.ip,
            mesh.server.ip6.context("dual-stack server pod")?,
        );
        let m = workload::run(w, &mesh.client.ns, t)
            .with_context(|| format!("measuring B's capacity in {base}"))?;
        drop(apps);
        eprintln!(
            "[bench] B's capacity in {base}: {:.0} requests/s",
            m.throughput
        );
        capacity.push((base.to_string(), m.throughput));
    }
    for w in matrix.iter_mut() {
        if let Some(o) = &mut w.open_loop {
            let cap = capacity
                .iter()
                .find(|(b, _)| *b == o.base)
                .map(|c| c.1)
                .context("open-loop base not measured")?;
            o.rate = cap * o.fraction;
        }
    }
    Ok(())
}

/// Where a scenario's servers are.
fn targets(server_ip: std::net::Ipv4Addr, server_ip6: std::net::Ipv6Addr) -> Targets {
    Targets {
        echo: SocketAddrV4::new(server_ip, ECHO),
        echo_dual_stack: std::net::SocketAddrV6::new(
            server_ip.to_ipv6_mapped(),
            ECHO_DUAL_STACK,
            0,
            0,
        ),
        echo_ipv6: std::net::SocketAddrV6::new(server_ip6, ECHO_IPV6, 0, 0),
        http: SocketAddrV4::new(server_ip, HTTP),
        grpc: SocketAddrV4::new(server_ip, GRPC),
    }
}

/// The apps of one scenario round, fresh each time.
struct Apps {
    // Dropped in order; nginx killed, servers stop listening.
    _echo: EchoServer,
    _echo_dual_stack: EchoServer,
    _echo_ipv6: EchoServer,
    nginx: Nginx,
    _grpc: GrpcServer,
}

impl Apps {
    fn start(ns: &minimesh::Netns, ip: std::net::Ipv4Addr) -> Result<Apps> {
        Ok(Apps {
            _echo: EchoServer::spawn(ns, SocketAddrV4::new(ip, ECHO))?,
            _echo_dual_stack: EchoServer::spawn_dual_stack(ns, ECHO_DUAL_STACK)?,
            _echo_ipv6: EchoServer::spawn_dual_stack(ns, ECHO_IPV6)?,
            nginx: Nginx::spawn(ns, SocketAddrV4::new(ip, HTTP))?,
            _grpc: GrpcServer::spawn(ns, SocketAddrV4::new(ip, GRPC))?,
        })
    }
}

/// Runs the suite; prints and writes the results unless interrupted.
pub fn suite(args: &Args, stop: &AtomicBool) -> Result<()> {
    // The server pod on another node, in a mode that pairs no app hop (the default, `sidecar`):
    // nothing is left to redirect, but the daemon is still attached and runs for every
    // connection. So the daemon keeps the sidecar hop on and is told to leave the server pod
    // alone; C then measures what meshlane costs the traffic it does not accelerate, and the
    // proof requires that nothing was paired.
    let server_off_node =
        args.sidecar_hop == "off" && matches!(args.mode.as_str(), "auto" | "sidecar");
    let scale = if args.smoke { 0.02 } else { args.scale };
    let rounds = if args.smoke { 1 } else { args.rounds };
    let mut matrix = workloads(scale);
    let started = Instant::now();
    let provenance = Provenance::collect();
    // Restored when this returns, also on errors and Ctrl-C.
    let _bpf_stats = StatsEnabled::enable()?;

    let cgroup = Cgroup::new("bench")?;
    let _inside = cgroup.enter()?;
    eprintln!("[bench] building the mini-mesh: no-mesh pods (A) and two Envoy pods (B, C)");
    let bare = BarePods::new(211)?;
    let services = [
        ("echo".to_string(), ECHO, Protocol::Tcp),
        (
            "echo-dual-stack".to_string(),
            ECHO_DUAL_STACK,
            Protocol::Tcp,
        ),
        ("echo-ipv6".to_string(), ECHO_IPV6, Protocol::Tcp),
        ("web".to_string(), HTTP, Protocol::Http),
        ("grpc".to_string(), GRPC, Protocol::Http),
    ];
    // Dual-stack pods (Istio's ip6tables capture, sidecars on both families); only the IPv6
    // rows' Service has an IPv6 endpoint, every other workload is IPv4 between the sidecars.
    let mut mesh = EnvoyPods::dual_stack(212, &services, args.mtls == "on", &[ECHO_IPV6])
        .context("Envoy pods")?;
    if mesh.client_envoy.config().concurrency != args.concurrency {
        mesh.set_concurrency(args.concurrency)
            .context("Envoy --concurrency")?;
    }
    let id = std::process::id();
    let spec = DaemonSpec {
        bin: args.meshlane_bin()?,
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/meshlane-bench-{id}")),
        cgroup: cgroup.path().to_path_buf(),
        api_socket: std::env::temp_dir().join(format!("meshlane-bench-{id}.sock")),
        metrics_port: daemon::free_port()?,
        log: std::env::temp_dir().join(format!("meshlane-bench-{id}.log")),
        cookies: [mesh.client.ns.cookie()?, mesh.server.ns.cookie()?],
        mode: args.mode.clone(),
        sidecar_hop: if server_off_node {
            "on".into()
        } else {
            args.sidecar_hop.clone()
        },
        opted_out: server_off_node.then(|| {
            (
                format!("bench/{}", mesh.server.ns.name()),
                mesh.server.ns.path(),
            )
        }),
    };
    let _log = RemoveOnDrop(spec.log.clone());
    daemon::ensure_detached(&spec.pin_dir, &spec.cgroup)?;
    calibrate(&mut matrix, &mut mesh)?;

    let mut rows: Vec<Row> = Vec::new();
    let mut prog_rounds: Vec<RoundProgCost> = Vec::new();
    let steps = rounds * SCENARIOS.len();
    let mut step = 0;
    for round in 0..rounds {
        for k in 0..SCENARIOS.len() {
            // Rotate the order each round so no scenario always runs first or last.
            let scenario = SCENARIOS[(k + round) % SCENARIOS.len()];
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            step += 1;
            let t0 = Instant::now();
            let (got, prog_round) =
                scenario_round(scenario, round, &matrix, &bare, &mut mesh, &spec, stop)?;
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let elapsed = started.elapsed().as_secs_f64();
            let left = elapsed / step as f64 * (steps - step) as f64;
            let key = |name: &str| {
                got.iter()
                    .find(|r| r.workload == name)
                    .map(|r| r.measured.latency.p50_us)
                    .unwrap_or(f64::NAN)
            };
            let rejected = got.iter().filter(|r| !r.accelerated).count();
            eprintln!(
                "[{step:>2}/{steps}] round {} {scenario}: tcp 64B p50 {:.1} us, http p50 {:.1} us, grpc p50 {:.1} us ({:.1} s){}; {:.0} s elapsed, ~{:.0} s left",
                round + 1,
                key("tcp 64B x1"),
                key("http 1KiB x1"),
                key("grpc 1KiB x1"),
                t0.elapsed().as_secs_f64(),
                if rejected > 0 { format!(", {rejected} workloads NOT accelerated (discarded)") } else { String::new() },
                elapsed,
                left,
            );
            rows.extend(got);
            prog_rounds.extend(prog_round);
        }
    }
    let accepted_c = rows
        .iter()
        .filter(|r| r.scenario == "C" && r.accelerated)
        .count();
    if accepted_c == 0 {
        bail!("no C workload was accelerated; the comparison would be meaningless");
    }
    let report = summary::Report::new(args, rounds, scale, &matrix, rows, prog_rounds, provenance);
    println!("{}", report.table());
    report.write(&args.out)?;
    eprintln!(
        "[bench] wrote {}/results.json, results.md and plots in {:.0} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn scenario_round(
    scenario: &'static str,
    round: usize,
    matrix: &[Workload],
    bare: &BarePods,
    mesh: &mut EnvoyPods,
    spec: &DaemonSpec,
    stop: &AtomicBool,
) -> Result<(Vec<Row>, Option<RoundProgCost>)> {
    if scenario != "A" {
        // Fresh Envoy -> Envoy connections for every B and C round: a pool left from the other
        // scenario would carry C's HTTP on B's unpaired connections, or B's on C's paired ones.
        mesh.restart_client_envoy()?;
    }
    let (server_ns, server_ip, server_ip6) = match scenario {
        "A" => (&bare.server, bare.server_ip, bare.server_ip6),
        _ => (
            &mesh.server.ns,
            mesh.server.ip,
            mesh.server.ip6.context("dual-stack server pod")?,
        ),
    };
    let apps = Apps::start(server_ns, server_ip)?;
    let targets = targets(server_ip, server_ip6);
    let (daemon, progs) = match scenario {
        "C" => {
            let before = progstats::meshlane_ids()?;
            let d = Daemon::start(spec)?;
            let progs = match Programs::since(&before) {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!(
                        "[bench] round {} C: no BPF program cost this round: {e:#}",
                        round + 1
                    );
                    None
                }
            };
            (Some(d), progs)
        }
        _ => {
            daemon::ensure_detached(&spec.pin_dir, &spec.cgroup)?;
            (None, None)
        }
    };
    // Unrecorded warm-up, the same in every scenario: the first workload of a round otherwise
    // pays for what the round just started (new processes and connections, and in C the
    // daemon's start-up probe, whose network namespaces the kernel tears down in the
    // background). Measured before this existed: A's and C's first workload (tcp 64B x1) was
    // slower than the identical dual-stack one later in the round.
    workload::run(&warmup(matrix), client_ns(scenario, bare, mesh), targets)
        .with_context(|| format!("warm-up in scenario {scenario}, round {}", round + 1))?;
    let ready = progs.as_ref().map(Programs::snapshot).transpose()?;
    let mut pids = vec![std::process::id(), apps.nginx.pid()];
    // Where the client Envoy's pid is in `pids` (it changes when the Envoy is restarted).
    let client_envoy_at = pids.len();
    if scenario != "A" {
        pids.extend([mesh.client_envoy.pid(), mesh.server_envoy.pid()]);
    }
    if let Some(d) = &daemon {
        pids.push(d.pid());
    }
    let mut rows = Vec::new();
    let mode = daemon.as_ref().map(|d| d.mode().to_string());
    for w in matrix {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let before = daemon.as_ref().map(Daemon::counters).transpose()?;
        let cpu0 = workload::cpu_us(&pids);
        // Taken after the /metrics read and before the next, so their connections' sock_ops
        // and connect4 runs are not the workload's.
        let prog0 = progs.as_ref().map(Programs::snapshot).transpose()?;
        let measured = workload::run(w, client_ns(scenario, bare, mesh), targets)
            .with_context(|| format!("{} in scenario {scenario}, round {}", w.name, round + 1))?;
        let prog = match (&progs, prog0) {
            (Some(p), Some(p0)) => p.cost(&p0, &p.snapshot()?),
            _ => Vec::new(),
        };
        let cpu = workload::cpu_us(&pids).saturating_sub(cpu0);
        // HTTP and gRPC leave the client Envoy's pooled upstream connections open, and a socket
        // adds what it redirected to the counters only every 32 messages or 256 KiB, or when it
        // closes: restarting the client Envoy closes them, so the counters read next hold every
        // byte of this workload (proof.rs), and the next workload opens its own pool instead of
        // riding on connections paired, or not, before it. The same in B and C.
        if scenario != "A" && matches!(w.kind, Kind::Http | Kind::Grpc) {
            mesh.restart_client_envoy()?;
            pids[client_envoy_at] = mesh.client_envoy.pid();
            // Local discovery finds Envoys in /proc: a pass while the old one was gone dropped
            // the pod, so wait until the daemon has it again before reading the counters and
            // running the next workload.
            // If it does not, the next workloads fail the proof (no sidecar pair, no bytes) and
            // are discarded with that reason: never counted as C, and the run goes on.
            if let Some(d) = &daemon {
                if let Err(e) = d.wait_rediscovered() {
                    eprintln!("[bench] round {} C after {}: {e:#}", round + 1, w.name);
                }
            }
        }
        let conns = match w.kind {
            Kind::Connect => w.count,
            _ => w.conns,
        } as u64;
        // Whether this is a C measurement of the mode it claims, direction by direction
        // (proof.rs).
        let (counters, proof_failures) = match (&daemon, before) {
            (Some(d), Some(b)) => {
                let expect = proof::Expect {
                    mode: d.mode(),
                    // The sidecar hop as the run claims it: with the server pod "off the
                    // node" (opted out) the daemon's own flag stays on but nothing may pair.
                    sidecar_hop: spec.sidecar_hop == "on" && spec.opted_out.is_none(),
                    conns,
                    min_bytes: proof::min_bytes(w, workload::requests_sent(w, &measured)),
                };
                let (c, why) = settled_counters(d, &b, &expect)?;
                (Some(c), why)
            }
            _ => (None, Vec::new()),
        };
        let accelerated = proof_failures.is_empty();
        if !accelerated {
            eprintln!(
                "[bench] round {} {scenario} {}: not counted as C: {}",
                round + 1,
                w.name,
                proof_failures.join("; ")
            );
        }
        rows.push(Row {
            scenario,
            round,
            workload: w.name.clone(),
            cpu_us_per_req: cpu as f64 / measured.requests.max(1) as f64,
            measured,
            counters,
            accelerated,
            proof_failures,
            prog,
            mode: mode.clone(),
        });
    }
    let prog_round = match (&progs, ready) {
        (Some(p), Some(r)) => Some(RoundProgCost {
            round,
            prog: p.cost(&r, &p.snapshot()?),
        }),
        _ => None,
    };
    if let Some(d) = daemon {
        d.stop()?;
    }
    drop(apps);
    Ok((rows, prog_round))
}

/// Where a scenario's client app runs (a function, not a binding: the client Envoy is restarted
/// between workloads, which needs `mesh` mutably).
fn client_ns<'a>(scenario: &str, bare: &'a BarePods, mesh: &'a EnvoyPods) -> &'a minimesh::Netns {
    match scenario {
        "A" => &bare.client,
        _ => &mesh.client.ns,
    }
}

/// How long a C workload's counters may take to show its last bytes. A socket adds what it
/// redirected to the counters every 32 messages or 256 KiB, and when it closes; the sidecars
/// close their ends of the workload's connections a little after the client closed its own.
const SETTLE: Duration = Duration::from_secs(2);

/// The counters moved since `before`, and why they do not prove `expect` (empty: they do).
/// While they do not, they are read again until [`SETTLE`] has passed, so that connections the
/// sidecars are still closing add their last bytes; a row is never judged on a timing.
fn settled_counters(
    d: &Daemon,
    before: &Counters,
    expect: &proof::Expect,
) -> Result<(Counters, Vec<String>)> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let c = d.counters()?.since(before);
        let why = proof::failures(expect, &c);
        if why.is_empty() || Instant::now() >= deadline {
            return Ok((c, why));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
