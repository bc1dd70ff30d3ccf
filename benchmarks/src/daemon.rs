//! The real meshlane daemon as scenario C's switch: `meshlane run` with local discovery (no pod
//! list), on the benchmark's own cgroup, pins, API socket and metrics port, stopped with SIGTERM
//! and `--detach-on-exit` so that a B round runs with nothing loaded.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use meshlane_common::DIRECTIONS;

/// How long start-up may take (programs loaded, both pods discovered and accelerated).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the daemon runs and what it must find.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    pub bin: PathBuf,
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub api_socket: PathBuf,
    pub metrics_port: u16,
    pub log: PathBuf,
    /// Network-namespace cookies of the benchmark's two Envoy pods.
    pub cookies: [u64; 2],
    /// `meshlane run --mode`: which directions C redirects.
    pub mode: String,
    /// `meshlane run --sidecar-hop`.
    pub sidecar_hop: String,
    /// A benchmark pod the daemon is told to leave alone (name, netns path), through a pod list
    /// file with `accelerate = false`: the server pod, standing in for one on another node.
    pub opted_out: Option<(String, PathBuf)>,
}

impl DaemonSpec {
    /// How many benchmark pods the daemon must show accelerated.
    fn expected_pods(&self) -> usize {
        self.cookies.len() - usize::from(self.opted_out.is_some())
    }

    /// The pod list file of [`DaemonSpec::opted_out`], next to the log.
    fn pod_list(&self) -> PathBuf {
        self.log.with_extension("pods.toml")
    }
}

/// A running daemon; SIGTERM (then SIGKILL), wait and a belt-and-braces detach on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    spec: DaemonSpec,
    /// The redirect mode it decided (`--mode auto` leaves that to the probe).
    mode: String,
}

impl Daemon {
    /// Starts `meshlane run --discovery local --detach-on-exit` and returns once `/readyz` is 200
    /// and `meshlane status` lists both benchmark pods as accelerated.
    pub fn start(spec: &DaemonSpec) -> Result<Daemon> {
        let log = std::fs::File::create(&spec.log)
            .with_context(|| format!("creating {}", spec.log.display()))?;
        let mut cmd = Command::new(&spec.bin);
        cmd.arg("run");
        if let Some((name, netns)) = &spec.opted_out {
            let list = pod_list(name, netns)?;
            std::fs::write(spec.pod_list(), list)
                .with_context(|| format!("writing {}", spec.pod_list().display()))?;
            cmd.arg("--config").arg(spec.pod_list());
        }
        let child = cmd
            .arg("--pin-dir")
            .arg(&spec.pin_dir)
            .arg("--cgroup")
            .arg(&spec.cgroup)
            .arg("--api-socket")
            .arg(&spec.api_socket)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", spec.metrics_port))
            .args(["--discovery", "local", "--resync", "1s", "--detach-on-exit"])
            .args(["--mode", &spec.mode])
            .args(["--sidecar-hop", &spec.sidecar_hop])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", spec.bin.display()))?;
        let mut d = Daemon {
            child,
            spec: spec.clone(),
            mode: String::new(),
        };
        d.mode = d.wait_accelerated().map_err(|e| {
            let log = std::fs::read_to_string(&spec.log).unwrap_or_default();
            let tail = &log[log.len().saturating_sub(3000)..];
            e.context(format!("meshlane run did not get ready; its log:\n{tail}"))
        })?;
        Ok(d)
    }

    /// Waits until ready with both pods accelerated; returns the mode it decided. A daemon that
    /// decided `off` fails at once: C would accelerate nothing.
    fn wait_accelerated(&mut self) -> Result<String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("meshlane run exited during start-up ({st})");
            }
            let ready = matches!(http_get(self.spec.metrics_port, "/readyz"), Ok((200, _)));
            if ready {
                let mode = self.decided_mode()?;
                ensure!(
                    mode != "off",
                    "meshlane run decided mode off (see `meshlane status`): C would accelerate nothing"
                );
                if self.accelerated_pods()? == self.spec.expected_pods() {
                    return Ok(mode);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "after {READY_TIMEOUT:?}: readyz {ready}, benchmark pods accelerated {}",
                self.accelerated_pods().unwrap_or(0)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `meshlane status --json`, or None while the daemon does not answer.
    fn status(&self) -> Result<Option<serde_json::Value>> {
        let out = Command::new(&self.spec.bin)
            .args(["status", "--json", "--api-socket"])
            .arg(&self.spec.api_socket)
            .stderr(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Ok(None);
        }
        Ok(serde_json::from_slice(&out.stdout).ok())
    }

    /// The redirect mode the daemon decided at start-up.
    pub fn mode(&self) -> &str {
        &self.mode
    }

    fn decided_mode(&self) -> Result<String> {
        let st = self.status()?.context("meshlane status did not answer")?;
        st["mode"]
            .as_str()
            .map(str::to_string)
            .context("meshlane status has no mode")
    }

    /// How many of the benchmark's pods `meshlane status --json` shows as accelerated (other
    /// Envoys on the node are ignored by netns cookie).
    pub fn accelerated_pods(&self) -> Result<usize> {
        let Some(st) = self.status()? else {
            return Ok(0);
        };
        Ok(st["pods"]
            .as_array()
            .map(|pods| {
                pods.iter()
                    .filter(|p| {
                        p["state"] == "accelerated"
                            && p["netns_cookie"]
                                .as_u64()
                                .is_some_and(|c| self.spec.cookies.contains(&c))
                    })
                    .count()
            })
            .unwrap_or(0))
    }

    /// What `meshlane status` says of each benchmark pod (state and reason), for errors.
    fn pods_described(&self) -> String {
        let st = self.status().ok().flatten().unwrap_or_default();
        let pods = st["pods"].as_array().cloned().unwrap_or_default();
        self.spec
            .cookies
            .iter()
            .map(|cookie| {
                match pods
                    .iter()
                    .find(|p| p["netns_cookie"].as_u64() == Some(*cookie))
                {
                    Some(p) => format!(
                        "{} {} {}",
                        p["name"].as_str().unwrap_or("?"),
                        p["state"],
                        p["reason"].as_str().unwrap_or("")
                    ),
                    None => format!("netns cookie {cookie} not listed"),
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The node counters from `/metrics`. sock_ops acts only on the benchmark's cgroup, so they
    /// count the benchmark's own connections.
    pub fn counters(&self) -> Result<Counters> {
        let (code, body) = http_get(self.spec.metrics_port, "/metrics")?;
        ensure!(code == 200, "/metrics answered {code}");
        let sum = |prefix: &str| metric_sum(&body, prefix);
        Ok(Counters {
            pairs_outbound: sum("meshlane_pairs_total{hop=\"outbound\"}"),
            pairs_inbound: sum("meshlane_pairs_total{hop=\"inbound\"}"),
            pairs_sidecar: sum("meshlane_pairs_total{hop=\"sidecar\"}"),
            redirected_bytes: sum("meshlane_redirected_bytes_total{"),
            bytes_by_direction: DIRECTIONS.map(|d| {
                sum(&format!(
                    "meshlane_redirected_bytes_total{{direction=\"{d}\"}}"
                ))
            }),
            pass_no_peer: sum("meshlane_passthrough_total{reason=\"no_peer\"}"),
            pass_tcp_pinned: sum("meshlane_passthrough_total{reason=\"tcp_pinned\"}"),
            pass_other: PASS_OTHER
                .map(|r| sum(&format!("meshlane_passthrough_total{{reason=\"{r}\"}}"))),
        })
    }

    /// After a sidecar of a benchmark pod was restarted: returns once two discovery passes have
    /// ended (the first may have begun while the old Envoy was gone, and dropped the pod) and
    /// `meshlane status` shows both pods accelerated again; fails after [`READY_TIMEOUT`].
    pub fn wait_rediscovered(&self) -> Result<()> {
        let passes = || -> Result<u64> {
            let (code, body) = http_get(self.spec.metrics_port, "/metrics")?;
            ensure!(code == 200, "/metrics answered {code}");
            Ok(metric_sum(
                &body,
                "meshlane_discovery_pass_duration_seconds_count",
            ))
        };
        let first = passes()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if passes()? >= first + 2 && self.accelerated_pods()? == self.spec.expected_pods() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "after {READY_TIMEOUT:?} the daemon had not accelerated the restarted sidecar's \
                 pod again: {}",
                self.pods_described()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, wait, then check that nothing is left: no pin directory, no sock_ops program
    /// on the cgroup.
    pub fn stop(mut self) -> Result<()> {
        self.terminate();
        ensure_detached(&self.spec.pin_dir, &self.spec.cgroup)
    }

    fn terminate(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_file(&self.spec.api_socket);
        if self.spec.opted_out.is_some() {
            let _ = std::fs::remove_file(self.spec.pod_list());
        }
        if let Err(e) = meshlane::datapath::detach(&self.spec.pin_dir) {
            eprintln!("cleanup: detach {}: {e:#}", self.spec.pin_dir.display());
        }
    }
}

/// The sum of the samples of every series whose line starts with `prefix` (name and labels).
fn metric_sum(body: &str, prefix: &str) -> u64 {
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Node counters of one moment (or, from [`Counters::since`], what moved over a workload).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counters {
    pub pairs_outbound: u64,
    pub pairs_inbound: u64,
    pub pairs_sidecar: u64,
    /// All directions together.
    pub redirected_bytes: u64,
    /// `meshlane_redirected_bytes_total` by direction, in [`DIRECTIONS`] order (written as an
    /// object keyed by direction).
    #[serde(serialize_with = "by_direction")]
    pub bytes_by_direction: [u64; DIRECTIONS.len()],
    /// Messages left on TCP because the socket's pair had no partner (`passthrough{reason="no_peer"}`).
    pub pass_no_peer: u64,
    /// Messages of sockets pinned to TCP earlier (`passthrough{reason="tcp_pinned"}`).
    pub pass_tcp_pinned: u64,
    /// The other `passthrough` reasons, in [`PASS_OTHER`] order (written as an object): not
    /// part of the rule, kept to tell why a direction was pinned.
    #[serde(serialize_with = "by_pass_reason")]
    pub pass_other: [u64; PASS_OTHER.len()],
}

/// `meshlane_passthrough_total` reasons besides `no_peer` and `tcp_pinned`.
pub const PASS_OTHER: [&str; 8] = [
    "untracked",
    "peer_gone",
    "draining",
    "not_captured",
    "early_data",
    "pair_rejected",
    "over_budget",
    "owner_unknown",
];

fn by_pass_reason<S: serde::Serializer>(
    v: &[u64; PASS_OTHER.len()],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(PASS_OTHER.iter().zip(v))
}

fn by_direction<S: serde::Serializer>(
    v: &[u64; DIRECTIONS.len()],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(DIRECTIONS.iter().zip(v))
}

impl Counters {
    pub fn since(&self, before: &Counters) -> Counters {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Counters {
            pairs_outbound: d(self.pairs_outbound, before.pairs_outbound),
            pairs_inbound: d(self.pairs_inbound, before.pairs_inbound),
            pairs_sidecar: d(self.pairs_sidecar, before.pairs_sidecar),
            redirected_bytes: d(self.redirected_bytes, before.redirected_bytes),
            bytes_by_direction: std::array::from_fn(|i| {
                d(self.bytes_by_direction[i], before.bytes_by_direction[i])
            }),
            pass_no_peer: d(self.pass_no_peer, before.pass_no_peer),
            pass_tcp_pinned: d(self.pass_tcp_pinned, before.pass_tcp_pinned),
            pass_other: std::array::from_fn(|i| d(self.pass_other[i], before.pass_other[i])),
        }
    }

    /// Bytes redirected in `direction` (one of [`DIRECTIONS`]).
    pub fn bytes(&self, direction: &str) -> u64 {
        DIRECTIONS
            .iter()
            .position(|d| *d == direction)
            .map_or(0, |i| self.bytes_by_direction[i])
    }
}

/// Fails unless the pin directory is gone and no sock_ops program is attached to the cgroup
/// (asked of the kernel directly, with BPF_PROG_QUERY).
pub fn ensure_detached(pin_dir: &Path, cgroup: &Path) -> Result<()> {
    ensure!(
        !pin_dir.exists(),
        "{} still exists after the daemon stopped",
        pin_dir.display()
    );
    let attached = meshlane::datapath::sock_ops_attached(cgroup)?;
    ensure!(
        attached == 0,
        "{attached} sock_ops program(s) still attached to {}",
        cgroup.display()
    );
    Ok(())
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `GET path` on the daemon's metrics port: (status, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let r = httpc::Client::new(Duration::from_secs(5)).get(([127, 0, 0, 1], port), path)?;
    Ok((r.status, r.text()))
}

/// The daemon's pod list (`meshlane run --config`) naming one pod it must leave alone.
fn pod_list(name: &str, netns: &std::path::Path) -> Result<String> {
    #[derive(serde::Serialize)]
    struct Pod<'a> {
        name: &'a str,
        netns: &'a str,
        accelerate: bool,
    }
    #[derive(serde::Serialize)]
    struct List<'a> {
        pod: [Pod<'a>; 1],
    }
    let netns = netns
        .to_str()
        .with_context(|| format!("non-UTF-8 netns path {}", netns.display()))?;
    let list = List {
        pod: [Pod {
            name,
            netns,
            accelerate: false,
        }],
    };
    toml::to_string(&list).context("writing the pod list as TOML")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::pod_list;

    #[test]
    fn the_pod_list_reads_back_as_one_opted_out_pod() {
        // A quote and a backslash: Rust's Debug quoting is not TOML's, a serializer's is.
        let netns = Path::new("/run/netns/bench \"server\"\\1");
        let text = pod_list("server \"x\"", netns).unwrap();
        let list = meshlane::config::parse_all(Path::new("pods.toml"), &text).unwrap();
        assert!(list.pods.is_empty(), "{text}");
        assert_eq!(list.opted_out.len(), 1, "{text}");
        assert_eq!(list.opted_out[0].name, "server \"x\"");
        assert_eq!(list.opted_out[0].netns, netns);
    }
}
