//! What meshlane's BPF programs cost, as the kernel measures it: with `kernel.bpf_stats_enabled`
//! the kernel counts, per loaded program, how often it ran and for how long (`run_cnt`,
//! `run_time_ns` of `struct bpf_prog_info`). C rounds read them for their own daemon's programs
//! around every workload.
//!
//! Which programs are the daemon's: the `meshlane_*` programs loaded while it started (ids taken
//! before `Daemon::start`, compared once it is ready). Other meshlane copies on the node (tests)
//! are left out; if one loaded during that window too, the round is ambiguous and says so.

use meshlane::datapath::{prog_fd_by_id, prog_info, prog_next_id, ProgInfo};
use std::{collections::BTreeSet, path::Path};

use anyhow::{bail, ensure, Context, Result};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The kernel truncates program names to 15 bytes (`meshlane_sockop`, `meshlane_connec`).
const NAME_PREFIX: &str = "meshlane_";

/// `enum bpf_prog_type` values of meshlane's programs, and the names the tables use.
/// The read tracer is one of two types, whichever the daemon could attach.
const KIND_OF_TYPE: [(u32, &str); 5] = [
    (13, "sock_ops"), // BPF_PROG_TYPE_SOCK_OPS
    (16, "sk_msg"),   // BPF_PROG_TYPE_SK_MSG
    (18, "connect"),  // BPF_PROG_TYPE_CGROUP_SOCK_ADDR (cgroup/connect4 and connect6)
    (26, "recv"),     // BPF_PROG_TYPE_TRACING (fexit on tcp_bpf_recvmsg, the read tracer)
    (17, "recv"),     // BPF_PROG_TYPE_RAW_TRACEPOINT (sock_recv_length, its fallback)
];

/// Every kind, in table order.
pub const KINDS: [&str; 4] = ["sock_ops", "sk_msg", "connect", "recv"];

/// `kernel.bpf_stats_enabled` set to 1 while this lives; the old value is written back on drop
/// (also after an error or Ctrl-C, which end the suite by returning).
#[derive(Debug)]
pub struct StatsEnabled {
    old: String,
}

impl StatsEnabled {
    pub fn enable() -> Result<StatsEnabled> {
        let old = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL} (kernel 5.1+)"))?
            .trim()
            .to_string();
        write_sysctl("1")?;
        Ok(StatsEnabled { old })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = write_sysctl(&self.old) {
            eprintln!("cleanup: restoring {STATS_SYSCTL} to {}: {e:#}", self.old);
        }
    }
}

fn write_sysctl(value: &str) -> Result<()> {
    std::fs::write(Path::new(STATS_SYSCTL), value)
        .with_context(|| format!("writing {value} to {STATS_SYSCTL}"))
}

/// What one program cost during one workload (or one C round).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgCost {
    /// `sock_ops`, `sk_msg`, `connect` (both connect hooks together) or `recv` (the read
    /// tracer), from the program type.
    pub kind: &'static str,
    /// The kernel's (truncated) program name.
    pub name: String,
    pub id: u32,
    /// Runs (`run_cnt`) during the interval.
    pub runs: u64,
    /// Time inside the program (`run_time_ns`) during the interval.
    pub ns: u64,
}

/// The daemon's programs, found once it is ready.
#[derive(Debug)]
pub struct Programs {
    progs: Vec<(&'static str, String, u32)>,
}

/// Run counters of [`Programs`] at one moment, in the same order.
#[derive(Debug, Clone)]
pub struct Snapshot(Vec<(u64, u64)>);

impl Programs {
    /// The `meshlane_*` programs loaded now that were not in `before` (from [`meshlane_ids`]),
    /// one per kind (two connect hooks); fails if there are none or more of a kind (another copy
    /// loaded meanwhile).
    pub fn since(before: &BTreeSet<u32>) -> Result<Programs> {
        let mut progs = Vec::new();
        for info in meshlane_programs()? {
            if before.contains(&info.id) {
                continue;
            }
            let Some(&(_, kind)) = KIND_OF_TYPE.iter().find(|(t, _)| *t == info.prog_type) else {
                continue;
            };
            let allowed = if kind == "connect" { 2 } else { 1 };
            if let Some((_, other, id)) =
                progs.iter().filter(|(k, _, _)| *k == kind).nth(allowed - 1)
            {
                bail!(
                    "two new {kind} programs since the daemon started ({other} id {id}, {} id {}): another meshlane loaded meanwhile",
                    info.name,
                    info.id
                );
            }
            progs.push((kind, info.name, info.id));
        }
        ensure!(
            !progs.is_empty(),
            "no {NAME_PREFIX}* program was loaded while the daemon started"
        );
        progs.sort_by_key(|(kind, _, _)| KINDS.iter().position(|k| k == kind));
        Ok(Programs { progs })
    }

    /// The counters of every program now; fails if one is gone (the daemon lost its datapath).
    pub fn snapshot(&self) -> Result<Snapshot> {
        self.progs
            .iter()
            .map(|(kind, name, id)| {
                let fd = prog_fd_by_id(*id)
                    .with_context(|| format!("opening {kind} program {name} (id {id})"))?
                    .with_context(|| format!("{kind} program {name} (id {id}) is gone"))?;
                let info = prog_info(&fd)
                    .with_context(|| format!("reading {kind} program {name} (id {id})"))?;
                Ok((info.run_cnt, info.run_time_ns))
            })
            .collect::<Result<_>>()
            .map(Snapshot)
    }

    /// Runs and time per program between two snapshots.
    pub fn cost(&self, before: &Snapshot, after: &Snapshot) -> Vec<ProgCost> {
        self.progs
            .iter()
            .zip(before.0.iter().zip(&after.0))
            .map(|((kind, name, id), ((c0, t0), (c1, t1)))| ProgCost {
                kind,
                name: name.clone(),
                id: *id,
                runs: c1.saturating_sub(*c0),
                ns: t1.saturating_sub(*t0),
            })
            .fold(Vec::<ProgCost>::new(), |mut out, c| {
                // One entry per kind: the two connect hooks are added up.
                match out.iter_mut().find(|o| o.kind == c.kind) {
                    Some(o) => {
                        o.runs += c.runs;
                        o.ns += c.ns;
                        o.name = format!("{} + {}", o.name, c.name);
                    }
                    None => out.push(c),
                }
                out
            })
    }
}

/// Ids of every `meshlane_*` program loaded now.
pub fn meshlane_ids() -> Result<BTreeSet<u32>> {
    Ok(meshlane_programs()?.into_iter().map(|p| p.id).collect())
}

fn meshlane_programs() -> Result<Vec<ProgInfo>> {
    let mut found = Vec::new();
    let mut id = 0;
    while let Some(next) =
        prog_next_id(id).context("listing BPF programs (BPF_PROG_GET_NEXT_ID)")?
    {
        id = next;
        // A program unloaded between the two calls is simply not there any more.
        let Some(fd) = prog_fd_by_id(id).with_context(|| format!("opening BPF program id {id}"))?
        else {
            continue;
        };
        let info = prog_info(&fd).with_context(|| format!("reading BPF program id {id}"))?;
        if info.name.starts_with(NAME_PREFIX) {
            found.push(info);
        }
    }
    Ok(found)
}
