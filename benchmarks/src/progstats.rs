//! What meshlane's BPF programs cost, as the kernel measures it: with `kernel.bpf_stats_enabled`
//! the kernel counts, per loaded program, how often it ran and for how long (`run_cnt`,
//! `run_time_ns` of `struct bpf_prog_info`). C rounds read them for their own daemon's programs
//! around every workload.
//!
//! Which programs are the daemon's: the `meshlane_*` programs loaded while it started (ids taken
//! before `Daemon::start`, compared once it is ready). Other meshlane copies on the node (tests)
//! are left out; if one loaded during that window too, the round is ambiguous and says so.

use meshlane::datapath::bpf;
use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{bail, ensure, Context, Result};

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The kernel truncates program names to 15 bytes (`meshlane_sockop`, `meshlane_connec`).
const NAME_PREFIX: &str = "meshlane_";

/// `enum bpf_prog_type` values of meshlane's programs, and the names the tables use.
const KIND_OF_TYPE: [(u32, &str); 4] = [
    (13, "sock_ops"), // BPF_PROG_TYPE_SOCK_OPS
    (16, "sk_msg"),   // BPF_PROG_TYPE_SK_MSG
    (18, "connect4"), // BPF_PROG_TYPE_CGROUP_SOCK_ADDR (cgroup/connect4)
    (17, "recv"),     // BPF_PROG_TYPE_RAW_TRACEPOINT (sock_recv_length, the read tracer)
];

/// Every kind, in table order.
pub const KINDS: [&str; 4] = ["sock_ops", "sk_msg", "connect4", "recv"];

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
    /// `sock_ops`, `sk_msg`, `connect4` or `recv` (the read tracer), from the program type.
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
    /// one per kind; fails if there are none or two of a kind (another copy loaded meanwhile).
    pub fn since(before: &BTreeSet<u32>) -> Result<Programs> {
        let mut progs = Vec::new();
        for info in meshlane_programs()? {
            if before.contains(&info.id) {
                continue;
            }
            let Some(&(_, kind)) = KIND_OF_TYPE.iter().find(|(t, _)| *t == info.prog_type) else {
                continue;
            };
            if let Some((_, other, id)) = progs.iter().find(|(k, _, _)| *k == kind) {
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
                let fd = fd_by_id(*id)
                    .with_context(|| format!("opening {kind} program {name} (id {id})"))?
                    .with_context(|| format!("{kind} program {name} (id {id}) is gone"))?;
                let info = info(&fd)
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
            .collect()
    }
}

/// Ids of every `meshlane_*` program loaded now.
pub fn meshlane_ids() -> Result<BTreeSet<u32>> {
    Ok(meshlane_programs()?.into_iter().map(|p| p.id).collect())
}

/// One program's identity and counters, as `BPF_OBJ_GET_INFO_BY_FD` gives them.
#[derive(Debug)]
struct Info {
    prog_type: u32,
    id: u32,
    name: String,
    run_cnt: u64,
    run_time_ns: u64,
}

fn meshlane_programs() -> Result<Vec<Info>> {
    let mut found = Vec::new();
    let mut id = 0;
    while let Some(next) = next_id(id).context("listing BPF programs (BPF_PROG_GET_NEXT_ID)")? {
        id = next;
        // A program unloaded between the two calls is simply not there any more.
        let Some(fd) = fd_by_id(id).with_context(|| format!("opening BPF program id {id}"))? else {
            continue;
        };
        let info = info(&fd).with_context(|| format!("reading BPF program id {id}"))?;
        if info.name.starts_with(NAME_PREFIX) {
            found.push(info);
        }
    }
    Ok(found)
}

/// The prefix of `union bpf_attr` for BPF_PROG_GET_NEXT_ID and BPF_PROG_GET_FD_BY_ID.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The prefix of `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The prefix of `struct bpf_prog_info` up to `run_cnt`; the kernel fills what it has of it.
#[repr(C)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    _tag_to_map_ids: [u8; 56],
    name: [u8; 16],
    _ifindex_to_prog_tags: [u8; 112],
    run_time_ns: u64,
    run_cnt: u64,
}

const _: () = {
    assert!(std::mem::offset_of!(ProgInfo, name) == 64);
    assert!(std::mem::offset_of!(ProgInfo, run_time_ns) == 192);
    assert!(std::mem::offset_of!(ProgInfo, run_cnt) == 200);
};

/// The id of the first program after `id`, or None after the last.
fn next_id(id: u32) -> io::Result<Option<u32>> {
    let mut attr = IdAttr {
        id,
        ..Default::default()
    };
    match bpf(BPF_PROG_GET_NEXT_ID, &mut attr) {
        Ok(_) => Ok(Some(attr.next_id)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A descriptor of program `id`, or None if it is no longer loaded.
fn fd_by_id(id: u32) -> io::Result<Option<OwnedFd>> {
    let mut attr = IdAttr {
        id,
        ..Default::default()
    };
    match bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) {
        // SAFETY: on success the kernel returned a fresh descriptor that nothing else owns.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn info(fd: &OwnedFd) -> Result<Info> {
    // SAFETY: ProgInfo is plain integers and byte arrays, for which all zeroes is valid; zeroed
    // pointer and count fields ask the kernel for no arrays.
    let mut info: ProgInfo = unsafe { std::mem::zeroed() };
    // attr.info points at `info`, which outlives the call and is as long as info_len says.
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<ProgInfo>() as u32,
        info: &mut info as *mut ProgInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // The kernel writes back how much of the struct it knows; run_cnt came with Linux 5.1.
    ensure!(
        attr.info_len as usize >= std::mem::size_of::<ProgInfo>(),
        "the kernel's bpf_prog_info has no run_cnt ({} bytes)",
        attr.info_len
    );
    let name_len = info.name.iter().position(|&b| b == 0).unwrap_or(16);
    Ok(Info {
        prog_type: info.prog_type,
        id: info.id,
        name: String::from_utf8_lossy(&info.name[..name_len]).into_owned(),
        run_cnt: info.run_cnt,
        run_time_ns: info.run_time_ns,
    })
}
