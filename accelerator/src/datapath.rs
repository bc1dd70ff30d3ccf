//! The only module that touches the kernel's BPF objects: loads the programs, attaches them, pins
//! everything under one bpffs directory, adopts those pins after a restart, updates the policy map,
//! reads the counters, and detaches without a trace.
//!
//! Pins are what keep accelerated connections alive while the daemon is stopped, restarting or
//! crashed (invariant 6): the sockhash, its sk_msg program and the sock_ops link live on in the
//! kernel, and the next daemon adopts them instead of loading a second copy.

mod btf;
mod fs;
mod read_hints;
mod sys;
mod upgrade;

pub use upgrade::Replaced;

/// The raw bpf(2) call and the program-statistics commands aya has no public call for (the
/// benchmark and the tests read what each program costs with them).
pub use sys::{
    bpf, enable_stats, link_prog_id, link_update, obj_get, prog_fd_by_id, prog_info, prog_next_id,
    ProgInfo,
};

use std::{
    collections::BTreeMap,
    fs as stdfs, io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, SockHash},
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSockAddr, FExit, RawTracePoint, SkMsg, SockOps,
    },
    Btf, Ebpf, EbpfLoader,
};
pub use fs::{cgroup2_root, ensure_bpffs};
use meshlane_common::{
    counter, maps, programs, Addr, PodPolicy, PodStats, CONTROL_BUDGET, CONTROL_DRAIN,
    CONTROL_FLAGS, CONTROL_MEMORY_TIGHT,
};
pub use read_hints::ReadHints;

/// The eBPF object, built from ebpf/programs by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshlane-ebpf"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/meshlane";

/// Sockets each sockhash holds at once unless `--max-sockets` says otherwise.
pub const DEFAULT_MAX_SOCKETS: u32 = maps::SOCKS_MAX;
/// What `--max-sockets` accepts: a handful of connections at the bottom (the start-up probe has
/// its own copy, [`SCRATCH_MAX_SOCKETS`]); the top keeps the preallocated pairing and unread maps
/// (docs/DESIGN.md "Capacity") within a few hundred MB.
pub const MAX_SOCKETS_RANGE: std::ops::RangeInclusive<u32> = 16..=1 << 20;
/// The start-up probe's private copy holds a handful of sockets; it need not preallocate the
/// node's full pairing map.
const SCRATCH_MAX_SOCKETS: u32 = 1024;

/// The maps sized by `max_sockets`, with their sizes: each sockhash holds `max_sockets` sockets,
/// the pairing map one waiting end per hop (at most one per socket), and the unread map one entry
/// per socket that may receive (at most every socket of both sockhashes).
pub fn socket_maps(max_sockets: u32) -> [(&'static str, u32); 4] {
    [
        (maps::SOCKS, max_sockets),
        (maps::TARGETS, max_sockets),
        (maps::RENDEZVOUS, max_sockets),
        (maps::UNREAD, max_sockets.saturating_mul(2)),
    ]
}
const PIN_PROG_SOCK_OPS: &str = "prog_sockops";
const PIN_PROG_SK_MSG: &str = "prog_sk_msg";
const PIN_LINK_SOCK_OPS: &str = "link_sockops";
/// The connect hook's link (it records who calls connect(), for sock_ops).
const PIN_LINK_CONNECT: &str = "link_connect4";
/// The same hook for IPv6 sockets (connects to v4-mapped addresses).
const PIN_LINK_CONNECT6: &str = "link_connect6";
/// The read tracer's link when it is the fexit on `tcp_bpf_recvmsg` (sockhash sockets only).
const PIN_LINK_RECV_EXIT: &str = "link_recv_exit";
/// The read tracer's link when it is the `sock_recv_length` tracepoint (every read on the node).
const PIN_LINK_RECV: &str = "link_recv";
/// Both read tracer links; at most one exists, none where the kernel offers neither.
const PIN_LINKS_RECV: [&str; 2] = [PIN_LINK_RECV_EXIT, PIN_LINK_RECV];
/// `BPF_NOEXIST` map update flag: create only.
const BPF_NOEXIST: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("meshlane must run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN): {0}")]
    Privilege(String),
    #[error(
        "no cgroup v2 hierarchy is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup) or pass --cgroup"
    )]
    NoCgroup2,
    #[error("cgroup {0} does not exist; pass an existing cgroup v2 directory with --cgroup")]
    NoCgroup(PathBuf),
    #[error(
        "{0} is not a cgroup v2 directory; pass one with --cgroup (the unified hierarchy is mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified)"
    )]
    NotCgroup2(PathBuf),
    #[error("{0} is not on a bpffs and is not under /sys/fs/bpf; choose a --pin-dir on a bpffs")]
    NoBpffs(PathBuf),
    #[error(
        "could not mount bpffs at /sys/fs/bpf ({0}); mount it with: mount -t bpf bpf /sys/fs/bpf"
    )]
    MountBpffs(String),
    #[error(
        "this kernel cannot run meshlane's programs ({0}); they need BPF sock_ops with TCP header options, cgroup connect hooks, sockhash and sk_msg, socket storage and BTF (Linux 6.1 or newer with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, CONFIG_NET_SOCK_MSG, CONFIG_DEBUG_INFO_BTF)"
    )]
    Kernel(String),
    #[error(
        "the pinned datapath was made by an incompatible meshlane build ({0}); run `meshlane detach` (live connections keep working) and start again"
    )]
    Incompatible(String),
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    #[error("bpf map {0}: {1}")]
    Map(&'static str, String),
}

impl Error {
    fn from_load(e: impl std::error::Error) -> Error {
        let msg = chain(&e);
        if msg.contains("Operation not permitted") || msg.contains("EPERM") {
            Error::Privilege(msg)
        } else {
            Error::Kernel(msg)
        }
    }
}

/// Where the datapath lives and what it hooks.
#[derive(Clone, Debug)]
pub struct Options {
    /// bpffs directory holding every pin (default /sys/fs/bpf/meshlane).
    pub pin_dir: PathBuf,
    /// cgroup v2 directory sock_ops attaches to (default: the unified root).
    pub cgroup: PathBuf,
    /// Sockets each sockhash holds at once; the pairing and unread maps are sized from it
    /// ([`socket_maps`]). Applies when the maps are created: pins are adopted at their size.
    pub max_sockets: u32,
}

impl Options {
    pub fn with_defaults(pin_dir: Option<PathBuf>, cgroup: Option<PathBuf>) -> Result<Self, Error> {
        let cgroup = match cgroup {
            Some(c) => c,
            None => cgroup2_root()?,
        };
        Ok(Options {
            pin_dir: pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
            cgroup,
            max_sockets: DEFAULT_MAX_SOCKETS,
        })
    }
}

/// How the datapath came to be in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Loaded and attached now.
    Loaded,
    /// Found complete in the pin directory and adopted; nothing was reloaded.
    Adopted,
    /// Adopted from another build: the programs whose instructions differ from this build's
    /// were replaced in place, on the same maps, with live connections kept (`upgrade.rs`).
    Upgraded,
}

/// Per-counter totals summed over CPUs, by name (see `meshlane_common::counter::NAMES`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters(pub BTreeMap<&'static str, u64>);

impl Counters {
    /// By index (`meshlane_common::counter`): what the daemon's own code uses, so a wrong name
    /// does not compile.
    pub fn at(&self, index: u32) -> u64 {
        counter::NAMES
            .get(index as usize)
            .and_then(|n| self.0.get(n))
            .copied()
            .unwrap_or(0)
    }
    /// By name, for tests and reports. A name no counter has is a bug that would read 0
    /// forever: debug builds (the tests) panic on it.
    pub fn get(&self, name: &str) -> u64 {
        debug_assert!(
            counter::NAMES.contains(&name),
            "no counter is named {name:?} (meshlane_common::counter::NAMES)"
        );
        self.0.get(name).copied().unwrap_or(0)
    }
    pub fn pairs(&self) -> u64 {
        self.at(counter::PAIRS_OUTBOUND)
            + self.at(counter::PAIRS_INBOUND)
            + self.at(counter::PAIRS_SIDECAR)
    }
    pub fn redirected_bytes(&self) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with("bytes_redirected"))
            .map(|(_, v)| v)
            .sum()
    }
    pub fn redirected_msgs(&self) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with("msgs_redirected"))
            .map(|(_, v)| v)
            .sum()
    }
}

/// The live datapath: typed handles on the pinned maps.
pub struct Datapath {
    opts: Options,
    origin: Origin,
    policy: HashMap<MapData, u64, PodPolicy>,
    counters: PerCpuArray<MapData, u64>,
    control: Array<MapData, u32>,
    pod_stats: PerCpuHashMap<MapData, u64, PodStats>,
    pod_ips: HashMap<MapData, Addr, u64>,
    /// What an upgrade replaced at adoption (empty otherwise).
    replaced: Vec<Replaced>,
}

/// How full one of the datapath's maps is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: u32,
    pub capacity: u32,
}

impl Datapath {
    /// Adopts a complete set of pins under `opts.pin_dir`, or loads, attaches and pins afresh.
    /// A partial set (an earlier start that died half-way) is removed first. On any error nothing
    /// this call created stays attached or pinned.
    pub fn open(opts: &Options) -> Result<Datapath, Error> {
        check(opts)?;
        match pin_state(&opts.pin_dir) {
            PinState::Complete => return Self::adopt(opts),
            PinState::Partial if opts.pin_dir.join(PIN_LINK_SOCK_OPS).exists() => {
                // The link is pinned last, so a start that died half-way never left one: these
                // pins are a complete datapath of a build with other maps. Removing them would
                // detach a running datapath behind its owner's back.
                let missing: Vec<_> = pin_names()
                    .filter(|n| !opts.pin_dir.join(n).exists())
                    .collect();
                return Err(Error::Incompatible(format!(
                    "{} has no {}",
                    opts.pin_dir.display(),
                    missing.join(", ")
                )));
            }
            PinState::Partial => {
                tracing::warn!(pin_dir = %opts.pin_dir.display(), "incomplete pins from an earlier start; removing them");
                remove_pins(&opts.pin_dir)?;
            }
            PinState::Absent => {}
        }
        let result = Self::load(opts);
        if result.is_err() {
            // Leave nothing behind from a failed start.
            let _ = remove_pins(&opts.pin_dir);
        }
        result
    }

    fn load(opts: &Options) -> Result<Datapath, Error> {
        stdfs::create_dir_all(&opts.pin_dir).map_err(|e| {
            Error::Io(
                format!("create pin directory {}", opts.pin_dir.display()),
                e,
            )
        })?;
        let Attached {
            ebpf: _ebpf,
            sock_ops_link,
            connect_links,
            recv_link,
        } = load_and_attach(&opts.cgroup, Some(&opts.pin_dir), opts.max_sockets)?;
        if let Some((tracer, link)) = recv_link {
            let pin = match tracer {
                ReadTracer::Exit => PIN_LINK_RECV_EXIT,
                ReadTracer::Tracepoint => PIN_LINK_RECV,
            };
            link.pin(opts.pin_dir.join(pin))
                .map_err(|e| Error::Kernel(format!("pin the read tracer's link: {e}")))?;
        }
        for (pin, link) in connect_links {
            link.pin(opts.pin_dir.join(pin))
                .map_err(|e| Error::Kernel(format!("pin the connect hook's link: {e}")))?;
        }
        // The sock_ops link is pinned last: its pin marks a complete datapath.
        sock_ops_link
            .pin(opts.pin_dir.join(PIN_LINK_SOCK_OPS))
            .map_err(|e| Error::Kernel(format!("pin sock_ops link: {e}")))?;
        tracing::info!(pin_dir = %opts.pin_dir.display(), cgroup = %opts.cgroup.display(), "datapath loaded and attached");
        read_hints::enable_fresh(&opts.pin_dir)?;
        let mut dp = Self::open_pins(opts)?;
        dp.origin = Origin::Loaded;
        Ok(dp)
    }

    /// Opens the pins as they are (what `load` just made).
    fn open_pins(opts: &Options) -> Result<Datapath, Error> {
        check_layout(&opts.pin_dir)?;
        let dp = Datapath {
            opts: opts.clone(),
            origin: Origin::Adopted,
            replaced: Vec::new(),
            policy: typed(&opts.pin_dir, maps::POLICY)?,
            counters: typed(&opts.pin_dir, maps::COUNTERS)?,
            control: typed(&opts.pin_dir, maps::CONTROL)?,
            pod_stats: typed(&opts.pin_dir, maps::POD_STATS)?,
            pod_ips: typed(&opts.pin_dir, maps::POD_IPS)?,
        };
        tracing::info!(pin_dir = %opts.pin_dir.display(), "datapath pins opened");
        Ok(dp)
    }

    /// Adopts pins found complete: the same build's are used as they are; another build's
    /// programs are replaced in place where they differ (maps and live connections kept).
    fn adopt(opts: &Options) -> Result<Datapath, Error> {
        check_layout(&opts.pin_dir)?;
        warn_capacity(opts);
        // Hints another build's sock_ops did not keep must not be trusted (read_hints.rs); an
        // earlier build's pins have no hint maps yet (the upgrade makes them), nor the bit.
        let dir = &opts.pin_dir;
        let hints_were_on =
            dir.join(maps::READ_HINTS).exists() && read_hints::enabled(dir).unwrap_or(false);
        if hints_were_on {
            read_hints::disable(dir)?;
        }
        // A failed replacement leaves the other build's programs running (or some replaced, on
        // the same maps, which both builds read alike: the layouts are equal): still a working
        // datapath, so it is adopted as it is and the error said, instead of giving up on it.
        let replaced = match upgrade::replace_changed(opts) {
            Ok(replaced) => {
                let hints = if hints_were_on && replaced.is_empty() {
                    // This build kept them all along.
                    read_hints::enable_fresh(dir).map(|()| None)
                } else {
                    read_hints::seed_and_enable(dir).map(Some)
                };
                match hints {
                    Ok(Some(seeded)) => tracing::info!(
                        seeded_slots = seeded,
                        "read hints rebuilt for the sockets another build joined"
                    ),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "read hints stay off: the read tracer looks up every read")
                    }
                }
                replaced
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot replace the programs of the build that made these pins; running them as they are");
                Vec::new()
            }
        };
        let mut dp = Self::open_pins(opts)?;
        if !replaced.is_empty() {
            for r in &replaced {
                tracing::info!(program = r.program, old_tag = %r.old_tag, new_tag = %r.new_tag, "program of another build replaced in place");
            }
            dp.origin = Origin::Upgraded;
            dp.replaced = replaced;
        }
        Ok(dp)
    }

    /// The programs replaced when this datapath was adopted from another build.
    pub fn replaced(&self) -> &[Replaced] {
        &self.replaced
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Inserts or replaces one pod's policy. Its stats entry is created first (zeroed, or kept
    /// if the pod was already listed), so the programs credit the pod from its first pair.
    pub fn set_pod(&mut self, netns_cookie: u64, policy: &PodPolicy) -> Result<(), Error> {
        let zero = PerCpuValues::try_from(vec![PodStats::default(); nr_cpus()?])
            .map_err(|e| Error::Map(maps::POD_STATS, e.to_string()))?;
        match self.pod_stats.insert(netns_cookie, zero, BPF_NOEXIST) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(Error::Map(maps::POD_STATS, e.to_string())),
        }
        self.policy
            .insert(netns_cookie, policy, 0)
            .map_err(|e| Error::Map(maps::POLICY, e.to_string()))
    }

    /// Removes one pod; removing an absent pod is success. Its live pairs keep flowing; new
    /// connections in that namespace are no longer touched.
    pub fn remove_pod(&mut self, netns_cookie: u64) -> Result<(), Error> {
        absent_ok(self.policy.remove(&netns_cookie), maps::POLICY)?;
        absent_ok(self.pod_stats.remove(&netns_cookie), maps::POD_STATS)
    }

    /// Makes the node's pod-address map equal `desired` (address -> the pod's namespace
    /// cookie): sidecar connections to these addresses are stamped for the sidecar hop.
    /// Returns how many entries could not be written or removed (the others are).
    pub fn set_pod_ips(
        &mut self,
        desired: &BTreeMap<std::net::IpAddr, u64>,
    ) -> Result<usize, Error> {
        let current: BTreeMap<Addr, u64> = self
            .pod_ips
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Map(maps::POD_IPS, e.to_string()))?;
        let wanted: BTreeMap<Addr, u64> = desired
            .iter()
            .map(|(ip, c)| (crate::policy::addr(*ip), *c))
            .collect();
        let mut failed = 0;
        for ip in current.keys().filter(|ip| !wanted.contains_key(*ip)) {
            if let Err(e) = self.pod_ips.remove(ip) {
                if !is_not_found(&e) {
                    tracing::error!(error = %e, "pod address removal failed");
                    failed += 1;
                }
            }
        }
        for (ip, cookie) in wanted.iter().filter(|(ip, c)| current.get(*ip) != Some(c)) {
            if let Err(e) = self.pod_ips.insert(ip, cookie, 0) {
                tracing::error!(error = %e, "pod address write failed");
                failed += 1;
            }
        }
        Ok(failed)
    }

    /// This node's pod addresses as the datapath has them.
    pub fn pod_ips(&self) -> Result<BTreeMap<std::net::IpAddr, u64>, Error> {
        read_pod_ips(&self.pod_ips)
    }

    /// Each listed pod's traffic through the fast lane, summed over CPUs, by namespace cookie.
    pub fn pod_stats(&self) -> Result<BTreeMap<u64, PodStats>, Error> {
        let mut out = BTreeMap::new();
        for r in self.pod_stats.iter() {
            let (cookie, per_cpu) = r.map_err(|e| Error::Map(maps::POD_STATS, e.to_string()))?;
            let mut sum = PodStats::default();
            for s in per_cpu.iter() {
                for (sum, n) in sum.pairs.iter_mut().zip(s.pairs) {
                    *sum += n;
                }
                for i in 0..s.msgs.len() {
                    sum.msgs[i] += s.msgs[i];
                    sum.bytes[i] += s.bytes[i];
                }
            }
            out.insert(cookie, sum);
        }
        Ok(out)
    }

    /// Entries in use against capacity for the maps that can fill up (when one is full, new
    /// hops stay on plain TCP and a `*_full` counter moves).
    pub fn map_usage(&self) -> Result<Vec<MapUsage>, Error> {
        let dir = &self.opts.pin_dir;
        let socks: SockHash<MapData, u64> = typed(dir, maps::SOCKS)?;
        let targets: SockHash<MapData, u64> = typed(dir, maps::TARGETS)?;
        let rendezvous: HashMap<MapData, meshlane_common::PairKey, meshlane_common::Waiter> =
            typed(dir, maps::RENDEZVOUS)?;
        let unread: HashMap<MapData, u64, i64> = typed(dir, maps::UNREAD)?;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let entries = [
            (
                maps::POLICY,
                count(self.policy.keys().filter(Result::is_ok).count()),
            ),
            (
                maps::POD_IPS,
                count(self.pod_ips.keys().filter(Result::is_ok).count()),
            ),
            (
                maps::SOCKS,
                count(socks.keys().filter(Result::is_ok).count()),
            ),
            (
                maps::TARGETS,
                count(targets.keys().filter(Result::is_ok).count()),
            ),
            (
                maps::RENDEZVOUS,
                count(rendezvous.keys().filter(Result::is_ok).count()),
            ),
            (
                maps::UNREAD,
                count(unread.keys().filter(Result::is_ok).count()),
            ),
        ];
        // The size each map was made with, not this build's default: adopted pins keep theirs.
        entries
            .into_iter()
            .map(|(name, entries)| {
                Ok(MapUsage {
                    name,
                    entries,
                    capacity: pinned_capacity(dir, name)?,
                })
            })
            .collect()
    }

    /// Removes ends that waited for a partner through two sweeps (`previous` is what the last
    /// sweep returned; the caller spaces sweeps by seconds, while a hop's two ends meet within
    /// its handshake). Such an end was stamped for a connection iptables did not capture (a
    /// prediction that missed) or its partner failed to join: it will never pair, yet it sits in
    /// a sockhash, whose read path apps can tell apart from plain TCP, for as long as it lives.
    /// It never redirected or received a byte, so leaving the sockhash loses nothing; its
    /// rendezvous entry goes first, so a partner arriving now cannot pair with it half-removed.
    /// Returns the ends still waiting (for the next sweep) and how many were removed.
    pub fn sweep_unpaired(
        &self,
        previous: &std::collections::BTreeSet<(meshlane_common::PairKey, u64)>,
    ) -> Result<
        (
            std::collections::BTreeSet<(meshlane_common::PairKey, u64)>,
            usize,
        ),
        Error,
    > {
        use meshlane_common::{PairKey, Waiter};
        let dir = &self.opts.pin_dir;
        let mut rendezvous: HashMap<MapData, PairKey, Waiter> = typed(dir, maps::RENDEZVOUS)?;
        let map_err = |name, e: aya::maps::MapError| Error::Map(name, e.to_string());
        let waiting: std::collections::BTreeSet<(PairKey, u64)> = rendezvous
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, w)| w.partner == 0)
            .map(|(k, w)| (k, w.cookie))
            .collect();
        let mut removed = 0;
        for (key, cookie) in waiting.intersection(previous) {
            // Still the same end, still alone (it may have paired since the listing).
            let w = match rendezvous.get(key, 0) {
                Ok(w) if w.cookie == *cookie && w.partner == 0 => w,
                _ => continue,
            };
            match rendezvous.remove(key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(map_err(maps::RENDEZVOUS, e)),
            }
            // Under the reader rule a sidecar end sits in the program-less target map.
            let sidecar_end = matches!(
                w.role,
                meshlane_common::ROLE_OUT_PROXY | meshlane_common::ROLE_IN_PROXY
            );
            let name = if sidecar_end && w.two_way == 0 {
                maps::TARGETS
            } else {
                maps::SOCKS
            };
            let mut socks: SockHash<MapData, u64> = typed(dir, name)?;
            match socks.remove(cookie) {
                Ok(()) => removed += 1,
                // It closed meanwhile: the kernel took it out itself.
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err(name, e)),
            }
        }
        let still: std::collections::BTreeSet<_> = waiting.difference(previous).copied().collect();
        Ok((still, removed))
    }

    /// The pods in the policy map, by namespace cookie.
    pub fn pods(&self) -> Result<BTreeMap<u64, PodPolicy>, Error> {
        self.policy
            .iter()
            .map(|r| r.map_err(|e| Error::Map(maps::POLICY, e.to_string())))
            .collect()
    }

    pub fn counters(&self) -> Result<Counters, Error> {
        read_counters(&self.counters)
    }

    /// Stops new redirects and pairs; each direction finishes on TCP (see `sk_msg.rs`).
    pub fn set_draining(&mut self, on: bool) -> Result<(), Error> {
        self.set_control(CONTROL_DRAIN, on)
    }

    /// Marks pods whose memory groups have too little room (`POLICY_MEMORY_TIGHT`): each
    /// listed pod that is in the policy map loses its hop bits (no new pairs) and gains the
    /// flag, and the control bit makes sk_msg move the redirected directions whose reader may
    /// be in such a pod to TCP at their next message. An empty list clears the control bit;
    /// the pods' own flags are restored by the next policy write. Returns the pods marked.
    pub fn set_memory_tight(&mut self, pods: &[u64]) -> Result<usize, Error> {
        let mut marked = 0;
        for cookie in pods {
            let Ok(mut p) = self.policy.get(cookie, 0) else {
                continue;
            };
            p.flags = crate::policy::memory_tight(p.flags);
            self.policy
                .insert(cookie, p, 0)
                .map_err(|e| Error::Map(maps::POLICY, e.to_string()))?;
            marked += 1;
        }
        self.set_control(CONTROL_MEMORY_TIGHT, !pods.is_empty())?;
        Ok(marked)
    }

    fn set_control(&mut self, bit: u32, on: bool) -> Result<(), Error> {
        let flags = self
            .control
            .get(&CONTROL_FLAGS, 0)
            .map_err(|e| Error::Map(maps::CONTROL, e.to_string()))?;
        let flags = if on { flags | bit } else { flags & !bit };
        self.control
            .set(CONTROL_FLAGS, flags, 0)
            .map_err(|e| Error::Map(maps::CONTROL, e.to_string()))
    }

    /// The read tracer's hints against the unread entries they must cover (walks every slot:
    /// for tests and diagnosis, not for each scrape).
    pub fn read_hints(&self) -> Result<ReadHints, Error> {
        read_hints::read(&self.opts.pin_dir)
    }

    /// Whether the read tracer trusts its hints, so reads of sockets meshlane never paired cost
    /// it two array loads instead of a hash lookup (`CONTROL_READ_HINTS`).
    pub fn read_hints_enabled(&self) -> bool {
        self.control
            .get(&CONTROL_FLAGS, 0)
            .is_ok_and(|f| f & meshlane_common::CONTROL_READ_HINTS != 0)
    }

    /// Whether the unread budget is enforced (the read tracer is attached).
    pub fn budget_enforced(&self) -> bool {
        self.control
            .get(&CONTROL_FLAGS, 0)
            .is_ok_and(|f| f & CONTROL_BUDGET != 0)
    }

    /// Each attached program's run statistics, by what it is: `sock_ops`, `sk_msg`, `connect4`
    /// and `recv` (the read tracer, where attached). They only move while the kernel's
    /// statistics are on (`kernel.bpf_stats_enabled=1`).
    pub fn program_stats(&self) -> Result<Vec<(&'static str, ProgInfo)>, Error> {
        let dir = &self.opts.pin_dir;
        let io_err = |what: &str, e| Error::Io(format!("program statistics: {what}"), e);
        let mut out = Vec::new();
        for (kind, pin) in [("sock_ops", PIN_PROG_SOCK_OPS), ("sk_msg", PIN_PROG_SK_MSG)] {
            let prog = sys::obj_get(&dir.join(pin)).map_err(|e| io_err(pin, e))?;
            out.push((kind, sys::prog_info(&prog).map_err(|e| io_err(pin, e))?));
        }
        for (kind, pin) in [
            ("connect4", PIN_LINK_CONNECT),
            ("connect6", PIN_LINK_CONNECT6),
            ("recv", PIN_LINK_RECV_EXIT),
            ("recv", PIN_LINK_RECV),
        ] {
            let link = match sys::obj_get(&dir.join(pin)) {
                Ok(link) => link,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(pin, e)),
            };
            let id = sys::link_prog_id(&link).map_err(|e| io_err(pin, e))?;
            let Some(prog) = sys::prog_fd_by_id(id).map_err(|e| io_err(pin, e))? else {
                continue;
            };
            out.push((kind, sys::prog_info(&prog).map_err(|e| io_err(pin, e))?));
        }
        Ok(out)
    }

    /// Which read tracer is attached, from the link pinned for it.
    pub fn read_tracer(&self) -> Option<ReadTracer> {
        if self.opts.pin_dir.join(PIN_LINK_RECV_EXIT).exists() {
            Some(ReadTracer::Exit)
        } else if self.opts.pin_dir.join(PIN_LINK_RECV).exists() {
            Some(ReadTracer::Tracepoint)
        } else {
            None
        }
    }
}

/// How the read tracer (the unread budget's reads) is attached; docs/DESIGN.md, "Kernel facts".
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadTracer {
    /// fexit on `tcp_bpf_recvmsg`: runs only for reads of sockets in a sockhash.
    Exit,
    /// The `sock_recv_length` raw tracepoint (6.4+): runs for every read on the node.
    Tracepoint,
}

impl ReadTracer {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadTracer::Exit => "fexit",
            ReadTracer::Tracepoint => "tracepoint",
        }
    }
}

/// The programs loaded into the kernel and attached, still held by this process.
struct Attached {
    ebpf: Ebpf,
    sock_ops_link: FdLink,
    /// The connect hooks (connect4, connect6) by pin name; none where sock_ops asks for the
    /// caller itself (the kernel offers it the helper).
    connect_links: Vec<(&'static str, FdLink)>,
    /// None where the kernel offers neither attachment: no unread budget there.
    recv_link: Option<(ReadTracer, FdLink)>,
}

/// Loads the object, attaches sk_msg to the sockhash and sock_ops to `cgroup`. With `pin_dir`,
/// maps and programs are pinned there before anything is attached (the caller pins the link).
fn load_and_attach(
    cgroup: &Path,
    pin_dir: Option<&Path>,
    max_sockets: u32,
) -> Result<Attached, Error> {
    let cgroup_fd = stdfs::File::open(cgroup).map_err(|_| Error::NoCgroup(cgroup.to_path_buf()))?;
    let (mut ebpf, owner_in_sockops) = load_object(None, max_sockets)?;
    if let Some(dir) = pin_dir {
        for name in maps::ALL.into_iter().chain(maps::ADDED) {
            let map = ebpf
                .map(name)
                .ok_or_else(|| Error::Map(name, "missing from the object".into()))?;
            map.pin(dir.join(name))
                .map_err(|e| Error::Map(name, format!("pin: {e}")))?;
        }
    }

    // sk_msg first: a socket takes the sockhash's programs when it is inserted, so the program
    // must be on the map before sock_ops can insert anything.
    let socks: SockHash<&MapData, u64> = SockHash::try_from(
        ebpf.map(maps::SOCKS)
            .ok_or(Error::Map(maps::SOCKS, "missing".into()))?,
    )
    .map_err(|e| Error::Map(maps::SOCKS, e.to_string()))?;
    let socks_fd = socks
        .fd()
        .try_clone()
        .map_err(|e| Error::Map(maps::SOCKS, e.to_string()))?;
    let sk_msg: &mut SkMsg = program(&mut ebpf, programs::SK_MSG)?;
    let link = sk_msg.attach(&socks_fd).map_err(Error::from_load)?;
    if let Some(dir) = pin_dir {
        // The attachment belongs to the map, not to this process: keep aya from detaching it
        // when this handle drops.
        std::mem::forget(sk_msg.take_link(link).map_err(Error::from_load)?);
        sk_msg
            .pin(dir.join(PIN_PROG_SK_MSG))
            .map_err(|e| Error::Map(maps::SOCKS, format!("pin sk_msg: {e}")))?;
    }

    // The read tracer before sock_ops, so every read of a paired socket is counted.
    let recv_link = attach_read_tracer(&mut ebpf)?;

    // The connect hook before sock_ops, so sock_ops finds the owner of every connect it sees
    // (one it does not find is left on TCP). Not needed where sock_ops asks itself.
    let mut connect_links = Vec::new();
    if !owner_in_sockops {
        for (name, pin) in [
            (programs::CONNECT4, PIN_LINK_CONNECT),
            (programs::CONNECT6, PIN_LINK_CONNECT6),
        ] {
            let connect: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            connect.load().map_err(Error::from_load)?;
            let link = connect
                .attach(&cgroup_fd, CgroupAttachMode::Single)
                .map_err(Error::from_load)?;
            connect_links.push((pin, fd_link(connect.take_link(link), "connect hook")?));
        }
    }

    let sock_ops: &mut SockOps = program(&mut ebpf, programs::SOCK_OPS)?;
    if let Some(dir) = pin_dir {
        sock_ops
            .pin(dir.join(PIN_PROG_SOCK_OPS))
            .map_err(|e| Error::Kernel(format!("pin sock_ops: {e}")))?;
    }
    // With a bpf_link (kernel 5.7+) the attachment coexists with other programs on the cgroup;
    // the kernel rejects explicit multi flags on link_create.
    let link = sock_ops
        .attach(&cgroup_fd, CgroupAttachMode::Single)
        .map_err(Error::from_load)?;
    let sock_ops_link = fd_link(sock_ops.take_link(link), "sock_ops")?;
    Ok(Attached {
        ebpf,
        sock_ops_link,
        connect_links,
        recv_link,
    })
}

/// Creates the object's maps and loads sock_ops and sk_msg. sock_ops decides how it learns who
/// connects: it asks the kernel itself where sock_ops may call `bpf_get_current_uid_gid` (6.18
/// and 7.x allow it), which spares every connect() in the cgroup a second program; elsewhere
/// (6.1, 6.12) the verifier refuses that build and the object is loaded again for the connect
/// hook. sk_msg gets the offsets of the `tcp_sock` fields it reads from the kernel's BTF (see
/// [`tcp_offsets`]); a kernel that refuses those reads gets a build without them, logged.
///
/// With `pinned_maps`, the object's maps are the ones pinned there (an upgrade loads new programs
/// onto the running datapath's maps) instead of new ones, at whatever size they were made;
/// otherwise the socket maps are made for `max_sockets`.
fn load_object(pinned_maps: Option<&Path>, max_sockets: u32) -> Result<(Ebpf, bool), Error> {
    let offsets = tcp_offsets();
    match load_with(pinned_maps, max_sockets, offsets) {
        Err(e) if offsets.is_some() => {
            tracing::warn!(
                error = %e,
                "sk_msg may not read the socket's TCP sequence here; loading it without the check for writes that raced connect() (README: Known kernel limitations)"
            );
            load_with(pinned_maps, max_sockets, None)
        }
        r => r,
    }
}

fn load_with(
    pinned_maps: Option<&Path>,
    max_sockets: u32,
    offsets: Option<[u32; 3]>,
) -> Result<(Ebpf, bool), Error> {
    let offsets = offsets.unwrap_or_default();
    let loader = || {
        let mut l = EbpfLoader::new();
        for (name, entries) in socket_maps(max_sockets) {
            l.map_max_entries(name, entries);
        }
        if let Some(dir) = pinned_maps {
            // An earlier build's pins lack the ADDED maps: the loader makes and pins them.
            for name in maps::ALL.into_iter().chain(maps::ADDED) {
                l.map_pin_path(name, dir.join(name));
            }
        }
        l.override_global(programs::TCP_WRITE_SEQ, &offsets[0], true)
            .override_global(programs::TCP_SND_NXT, &offsets[1], true)
            .override_global(programs::TCP_DATA_SEGS_OUT, &offsets[2], true);
        l
    };
    let mut ebpf = loader()
        .override_global(programs::OWNER_IN_SOCKOPS, &1u8, true)
        .load(OBJECT)
        .map_err(Error::from_load)?;
    let sock_ops: &mut SockOps = program(&mut ebpf, programs::SOCK_OPS)?;
    let owner_in_sockops = match sock_ops.load() {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(
                error = %Error::from_load(e),
                "sock_ops may not ask for the caller's uid on this kernel; the connect hook records it"
            );
            drop(ebpf);
            ebpf = loader().load(OBJECT).map_err(Error::from_load)?;
            let sock_ops: &mut SockOps = program(&mut ebpf, programs::SOCK_OPS)?;
            sock_ops.load().map_err(Error::from_load)?;
            false
        }
    };
    let sk_msg: &mut SkMsg = program(&mut ebpf, programs::SK_MSG)?;
    sk_msg.load().map_err(Error::from_load)?;
    Ok((ebpf, owner_in_sockops))
}

/// Where `struct tcp_sock` keeps `write_seq`, `snd_nxt` and `data_segs_out` on this kernel, from
/// its BTF: sk_msg reads them once per socket to see whether bytes left on TCP before its first
/// message (a write racing connect(); README "Known kernel limitations"). None without BTF.
fn tcp_offsets() -> Option<[u32; 3]> {
    let read = || -> Result<[u32; 3], String> {
        let btf = btf::Btf::from_kernel()?;
        let off = |f: &str| btf.field_offset("tcp_sock", f);
        Ok([off("write_seq")?, off("snd_nxt")?, off("data_segs_out")?])
    };
    match read() {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(error = %e, "no tcp_sock offsets; sk_msg loads without the check for writes that raced connect()");
            None
        }
    }
}

/// A cgroup attachment taken from its program as the bpf_link the caller pins (cgroup programs
/// attach with bpf_link_create on 5.7+, which every kernel meshlane loads on has).
fn fd_link<L>(taken: Result<L, aya::programs::ProgramError>, what: &str) -> Result<FdLink, Error>
where
    L: TryInto<FdLink>,
    L::Error: std::fmt::Display,
{
    taken
        .map_err(Error::from_load)?
        .try_into()
        .map_err(|e| Error::Kernel(format!("{what} link is not a bpf_link: {e}")))
}

/// Attaches the read tracer and turns the unread budget on. The fexit on `tcp_bpf_recvmsg` is
/// preferred: that function is the `recvmsg` of sockets in a sockhash only, so no other read on
/// the node runs a program. Without BTF or trampolines it falls back to the `sock_recv_length`
/// tracepoint (6.4+), which runs on every read; with neither it says so and leaves the budget
/// off, as redirects were before it existed.
fn attach_read_tracer(ebpf: &mut Ebpf) -> Result<Option<(ReadTracer, FdLink)>, Error> {
    let link = match attach_read_exit(ebpf) {
        Ok(link) => (ReadTracer::Exit, link),
        Err(exit_err) => {
            tracing::info!(
                function = programs::RECV_FUNCTION,
                error = %exit_err,
                "no fexit on this kernel; the read tracer falls back to a tracepoint on every read"
            );
            let prog: &mut RawTracePoint = program(ebpf, programs::RECV)?;
            prog.load().map_err(Error::from_load)?;
            match prog.attach(programs::RECV_TRACEPOINT) {
                Ok(link) => (
                    ReadTracer::Tracepoint,
                    prog.take_link(link).map_err(Error::from_load)?.into(),
                ),
                Err(e) => {
                    tracing::warn!(
                        function = programs::RECV_FUNCTION,
                        tracepoint = programs::RECV_TRACEPOINT,
                        error = %e,
                        "no read tracer on this kernel (needs BTF and fexit, or Linux 6.4+): a reader that stops reading no longer holds its writer back, its queue grows without bound"
                    );
                    return Ok(None);
                }
            }
        }
    };
    let mut control: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(maps::CONTROL)
            .ok_or(Error::Map(maps::CONTROL, "missing".into()))?,
    )
    .map_err(|e| Error::Map(maps::CONTROL, e.to_string()))?;
    control
        .set(CONTROL_FLAGS, CONTROL_BUDGET, 0)
        .map_err(|e| Error::Map(maps::CONTROL, e.to_string()))?;
    Ok(Some(link))
}

/// An error with its whole source chain: aya's errors put the errno there.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// The fexit read tracer. Its error is the kernel's answer as is (a kernel that refuses tracing
/// programs, under lockdown or without trampolines, answers EPERM even to root): the caller
/// falls back, so it is not the daemon's error.
fn attach_read_exit(ebpf: &mut Ebpf) -> Result<FdLink, String> {
    let btf = Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {}", chain(&e)))?;
    let prog: &mut FExit = program(ebpf, programs::RECV_EXIT).map_err(|e| e.to_string())?;
    prog.load(programs::RECV_FUNCTION, &btf)
        .map_err(|e| format!("load: {}", chain(&e)))?;
    let link = prog
        .attach()
        .map_err(|e| format!("attach: {}", chain(&e)))?;
    Ok(prog
        .take_link(link)
        .map_err(|e| format!("take the link: {}", chain(&e)))?
        .into())
}

/// A private, unpinned copy of the datapath for `meshlane probe`: attached to `cgroup` while
/// this value lives, gone (link closed, maps freed) when it drops. It acts only on the pods put
/// in its own policy map, so it cannot touch the live datapath's pods or any other socket.
pub struct Scratch {
    policy: HashMap<MapData, u64, PodPolicy>,
    pod_ips: HashMap<MapData, Addr, u64>,
    counters: PerCpuArray<MapData, u64>,
    unread: HashMap<MapData, u64, i64>,
    tracer: Option<ReadTracer>,
    _attached: Attached,
}

impl Scratch {
    pub fn load(cgroup: &Path) -> Result<Scratch, Error> {
        let mut attached = load_and_attach(cgroup, None, SCRATCH_MAX_SOCKETS)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(Error::Map(name, "missing".into()))
        };
        let policy = HashMap::try_from(take(&mut attached.ebpf, maps::POLICY)?)
            .map_err(|e| Error::Map(maps::POLICY, e.to_string()))?;
        let counters = PerCpuArray::try_from(take(&mut attached.ebpf, maps::COUNTERS)?)
            .map_err(|e| Error::Map(maps::COUNTERS, e.to_string()))?;
        let pod_ips = HashMap::try_from(take(&mut attached.ebpf, maps::POD_IPS)?)
            .map_err(|e| Error::Map(maps::POD_IPS, e.to_string()))?;
        let unread = HashMap::try_from(take(&mut attached.ebpf, maps::UNREAD)?)
            .map_err(|e| Error::Map(maps::UNREAD, e.to_string()))?;
        Ok(Scratch {
            policy,
            pod_ips,
            counters,
            unread,
            tracer: attached.recv_link.as_ref().map(|(t, _)| *t),
            _attached: attached,
        })
    }

    /// Whether the read tracer is attached (and so the unread budget enforced).
    pub fn budget_enforced(&self) -> bool {
        self.tracer.is_some()
    }

    /// How the read tracer is attached, if it is.
    pub fn read_tracer(&self) -> Option<ReadTracer> {
        self.tracer
    }

    /// Redirected bytes not yet read, summed over every paired socket still open.
    pub fn unread_total(&self) -> Result<i64, Error> {
        self.unread
            .iter()
            .map(|r| r.map(|(_, v)| v))
            .sum::<Result<i64, _>>()
            .map_err(|e| Error::Map(maps::UNREAD, e.to_string()))
    }

    pub fn set_pod(&mut self, netns_cookie: u64, policy: &PodPolicy) -> Result<(), Error> {
        self.policy
            .insert(netns_cookie, policy, 0)
            .map_err(|e| Error::Map(maps::POLICY, e.to_string()))
    }

    /// Puts a pod's address in this copy's pod-address map (the sidecar hop).
    pub fn set_pod_ip(&mut self, ip: std::net::IpAddr, netns_cookie: u64) -> Result<(), Error> {
        self.pod_ips
            .insert(crate::policy::addr(ip), netns_cookie, 0)
            .map_err(|e| Error::Map(maps::POD_IPS, e.to_string()))
    }

    pub fn counters(&self) -> Result<Counters, Error> {
        read_counters(&self.counters)
    }
}

/// Removing an absent key is success.
fn absent_ok(r: Result<(), aya::maps::MapError>, name: &'static str) -> Result<(), Error> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::Map(name, e.to_string())),
    }
}

fn nr_cpus() -> Result<usize, Error> {
    aya::util::nr_cpus().map_err(|(path, e)| Error::Io(format!("read {path}"), e))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Kernel(format!("program {name} missing from the object")))?;
    prog.try_into()
        .map_err(|_| Error::Kernel(format!("program {name} has an unexpected type")))
}

/// A map operation that failed because the key is not there (aya reports ENOENT from a
/// delete as a syscall error, from a lookup as `KeyNotFound`).
fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// The key and value sizes this build's programs use, per map.
fn expected_layout() -> [(&'static str, usize, usize); 8] {
    use meshlane_common::{PairKey, SockState, Waiter};
    use std::mem::size_of;
    [
        (maps::POLICY, size_of::<u64>(), size_of::<PodPolicy>()),
        (maps::RENDEZVOUS, size_of::<PairKey>(), size_of::<Waiter>()),
        (maps::SOCK_STATE, size_of::<i32>(), size_of::<SockState>()),
        (maps::COUNTERS, size_of::<u32>(), size_of::<u64>()),
        (maps::POD_STATS, size_of::<u64>(), size_of::<PodStats>()),
        (maps::UNREAD, size_of::<u64>(), size_of::<i64>()),
        (maps::OWNERS, size_of::<u64>(), size_of::<u64>()),
        (maps::POD_IPS, size_of::<Addr>(), size_of::<u64>()),
    ]
}

/// Refuses to adopt pins whose maps were made by a build with other map layouts (an upgrade that
/// changed a shared type): reading or writing them with this build's types would be garbage.
/// The counter array must also have this build's number of counters.
fn check_layout(pin_dir: &Path) -> Result<(), Error> {
    for (name, key, value) in expected_layout() {
        let data = MapData::from_pin(pin_dir.join(name))
            .map_err(|e| Error::Map(name, format!("open pin: {e}")))?;
        let info = data.info().map_err(|e| Error::Map(name, e.to_string()))?;
        let counters_ok = name != maps::COUNTERS || info.max_entries() == counter::SLOTS;
        if info.key_size() as usize != key || info.value_size() as usize != value || !counters_ok {
            return Err(Error::Incompatible(format!(
                "{name} has key/value sizes {}/{} and {} entries, this build expects {key}/{value}",
                info.key_size(),
                info.value_size(),
                info.max_entries()
            )));
        }
    }
    Ok(())
}

/// The number of entries the pinned map `name` was made for.
fn pinned_capacity(pin_dir: &Path, name: &'static str) -> Result<u32, Error> {
    let data = MapData::from_pin(pin_dir.join(name))
        .map_err(|e| Error::Map(name, format!("open pin: {e}")))?;
    let info = data.info().map_err(|e| Error::Map(name, e.to_string()))?;
    Ok(info.max_entries())
}

/// Adopted maps keep the size they were made with: a map cannot be resized, and remaking it would
/// drop every live pairing. A `max_sockets` other than theirs is said once, with what applies it.
fn warn_capacity(opts: &Options) {
    for (name, asked) in socket_maps(opts.max_sockets) {
        match pinned_capacity(&opts.pin_dir, name) {
            Ok(pinned) if pinned != asked => {
                tracing::warn!(
                    map = name,
                    pinned,
                    asked,
                    max_sockets = opts.max_sockets,
                    "the adopted maps keep the size they were made with; to apply --max-sockets, run `meshlane detach` (live connections fall back to TCP) and start again"
                );
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read a pinned map's size"),
        }
    }
}

fn typed<T>(pin_dir: &Path, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map>,
    <T as TryFrom<Map>>::Error: std::fmt::Display,
{
    let data = MapData::from_pin(pin_dir.join(name))
        .map_err(|e| Error::Map(name, format!("open pin: {e}")))?;
    let map = Map::from_map_data(data).map_err(|e| Error::Map(name, e.to_string()))?;
    T::try_from(map).map_err(|e| Error::Map(name, e.to_string()))
}

fn read_counters(map: &PerCpuArray<MapData, u64>) -> Result<Counters, Error> {
    let mut out = BTreeMap::new();
    for (i, name) in counter::NAMES.iter().enumerate() {
        let values = map
            .get(&(i as u32), 0)
            .map_err(|e| Error::Map(maps::COUNTERS, e.to_string()))?;
        out.insert(*name, values.iter().sum());
    }
    Ok(Counters(out))
}

/// Reads the counters of a pinned datapath without adopting it (for `meshlane status`).
pub fn pinned_counters(pin_dir: &Path) -> Result<Counters, Error> {
    read_counters(&typed(pin_dir, maps::COUNTERS)?)
}

/// The read tracer's hints of a pinned datapath, against the unread entries they must cover.
pub fn pinned_read_hints(pin_dir: &Path) -> Result<ReadHints, Error> {
    read_hints::read(pin_dir)
}

/// Pods of a pinned datapath, by namespace cookie.
pub fn pinned_pods(pin_dir: &Path) -> Result<BTreeMap<u64, PodPolicy>, Error> {
    let policy: HashMap<MapData, u64, PodPolicy> = typed(pin_dir, maps::POLICY)?;
    policy
        .iter()
        .map(|r| r.map_err(|e| Error::Map(maps::POLICY, e.to_string())))
        .collect()
}

/// The pod addresses of a pinned datapath, with each pod's namespace cookie.
pub fn pinned_pod_ips(pin_dir: &Path) -> Result<BTreeMap<std::net::IpAddr, u64>, Error> {
    read_pod_ips(&typed(pin_dir, maps::POD_IPS)?)
}

fn read_pod_ips(
    map: &HashMap<MapData, Addr, u64>,
) -> Result<BTreeMap<std::net::IpAddr, u64>, Error> {
    map.iter()
        .map(|r| {
            r.map(|(ip, c)| (crate::policy::ip_of(ip), c))
                .map_err(|e| Error::Map(maps::POD_IPS, e.to_string()))
        })
        .collect()
}

/// How many sock_ops programs (meshlane's or anyone's) are attached directly to `cgroup`.
pub fn sock_ops_attached(cgroup: &Path) -> Result<u32, Error> {
    let fd = stdfs::File::open(cgroup).map_err(|_| Error::NoCgroup(cgroup.to_path_buf()))?;
    sys::prog_count(&fd, sys::BPF_CGROUP_SOCK_OPS)
        .map_err(|e| Error::Io(format!("query {}", cgroup.display()), e))
}

/// The prerequisites `open` needs, checked without loading anything: privilege, a cgroup v2
/// directory, a bpffs for the pins (mounted at /sys/fs/bpf if missing).
pub fn check(opts: &Options) -> Result<(), Error> {
    preflight(opts)?;
    ensure_bpffs(&opts.pin_dir)
}

fn preflight(opts: &Options) -> Result<(), Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::Privilege(format!(
            "running as uid {}",
            nix::unistd::geteuid()
        )));
    }
    let magic =
        nix::sys::statfs::statfs(&opts.cgroup).map_err(|_| Error::NoCgroup(opts.cgroup.clone()))?;
    if magic.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(Error::NotCgroup2(opts.cgroup.clone()));
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum PinState {
    Absent,
    Partial,
    Complete,
}

/// The pins every complete datapath has.
fn pin_names() -> impl Iterator<Item = &'static str> {
    maps::ALL
        .into_iter()
        .chain([PIN_PROG_SOCK_OPS, PIN_PROG_SK_MSG, PIN_LINK_SOCK_OPS])
}

/// Pins a datapath has or not, depending on the kernel: the connect hook, the read tracer.
const OPTIONAL_PINS: [&str; 4] = [
    PIN_LINK_CONNECT,
    PIN_LINK_CONNECT6,
    PIN_LINK_RECV_EXIT,
    PIN_LINK_RECV,
];

fn pin_state(dir: &Path) -> PinState {
    let present = pin_names().filter(|n| dir.join(n).exists()).count();
    match present {
        0 => PinState::Absent,
        n if n == pin_names().count() => PinState::Complete,
        _ => PinState::Partial,
    }
}

/// What `detach` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct DetachReport {
    pub found: bool,
    pub removed_pins: Vec<String>,
}

/// Detaches and removes everything under `pin_dir`:
/// 1. drain: sk_msg stops redirecting, so every accelerated direction continues on TCP after the
///    bytes it already handed over (the receiver reads those first, so order holds);
/// 2. sock_ops comes off the cgroup, so no new socket is tracked or stamped, then the connect
///    hook;
/// 3. sk_msg comes off the sockhash and every pin is removed.
///
/// Nothing is deleted from the sockhash: deleting a socket purges redirected bytes it has not
/// read yet. Sockets already in the map keep their psock (and its queue) until they close; the
/// kernel frees the map and programs when the last of them does. So detach never cuts or
/// truncates a live connection, and leaves nothing pinned or attached.
/// Idempotent: with nothing pinned it reports `found: false` and succeeds.
pub fn detach(pin_dir: &Path) -> Result<DetachReport, Error> {
    let mut report = DetachReport::default();
    if pin_state(pin_dir) == PinState::Absent {
        if pin_dir.exists() {
            let _ = stdfs::remove_dir(pin_dir);
        }
        return Ok(report);
    }
    report.found = true;
    if let Ok(mut control) = typed::<Array<MapData, u32>>(pin_dir, maps::CONTROL) {
        control
            .set(CONTROL_FLAGS, CONTROL_DRAIN, 0)
            .map_err(|e| Error::Map(maps::CONTROL, e.to_string()))?;
    }
    if let Ok(link) = sys::obj_get(&pin_dir.join(PIN_LINK_SOCK_OPS)) {
        if let Err(e) = sys::link_detach(&link) {
            tracing::warn!(error = %e, "sock_ops link detach");
        }
    }
    // After sock_ops: a connect it still sees finds its owner.
    for pin in [PIN_LINK_CONNECT, PIN_LINK_CONNECT6] {
        if let Ok(link) = sys::obj_get(&pin_dir.join(pin)) {
            if let Err(e) = sys::link_detach(&link) {
                tracing::warn!(error = %e, "connect hook link detach");
            }
        }
    }
    for pin in PIN_LINKS_RECV {
        if let Ok(link) = sys::obj_get(&pin_dir.join(pin)) {
            match sys::link_detach(&link) {
                Ok(()) => {}
                // 6.1 cannot force a tracing link off; it goes when its pin is removed below
                // (nothing else holds it).
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::debug!(error = %e, "read tracer link: detached with its pin")
                }
                Err(e) => tracing::warn!(error = %e, "read tracer link detach"),
            }
        }
    }
    if let (Ok(prog), Ok(socks)) = (
        sys::obj_get(&pin_dir.join(PIN_PROG_SK_MSG)),
        sys::obj_get(&pin_dir.join(maps::SOCKS)),
    ) {
        if let Err(e) = sys::prog_detach(&socks, &prog, sys::BPF_SK_MSG_VERDICT) {
            tracing::debug!(error = %e, "sk_msg already detached");
        }
    }
    report.removed_pins = remove_pins(pin_dir)?;
    tracing::info!(pin_dir = %pin_dir.display(), pins = report.removed_pins.len(), "datapath detached");
    Ok(report)
}

fn remove_pins(dir: &Path) -> Result<Vec<String>, Error> {
    let mut removed = Vec::new();
    for name in pin_names().chain(OPTIONAL_PINS).chain(maps::ADDED) {
        let p = dir.join(name);
        match stdfs::remove_file(&p) {
            Ok(()) => removed.push(name.to_string()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Io(format!("remove {}", p.display()), e)),
        }
    }
    upgrade::remove_staged(dir);
    match stdfs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Io(format!("remove {}", dir.display()), e)),
    }
    Ok(removed)
}
