//! The local source: Envoy processes on this node, each namespace's capture rules and the
//! sidecar's admin API (see the module above for what is read and what wins).

use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::*;
use crate::model::{OutboundRanges, Pod};

/// Where to look. [`Options::default`] is the real node.
#[derive(Clone, Debug)]
pub struct Options {
    /// `/proc`.
    pub proc_root: PathBuf,
    /// `/run/netns`: named namespaces give nicer paths than `/proc/PID/ns/net`.
    pub netns_dir: PathBuf,
    /// The namespace that is not a pod: `/proc/1/ns/net`.
    pub host_netns: PathBuf,
    /// `comm` or executable names of the sidecar proxy.
    pub proxy_names: Vec<String>,
    /// The iptables-save binary (the one matching the backend istio-init used).
    pub iptables_save: String,
    /// Timeout of each admin API request.
    pub admin_timeout: Duration,
    /// Also look at namespaces without a proxy for Istio capture rules, to report them as
    /// "no sidecar" (one `iptables-save` per such namespace).
    pub report_uncovered: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            proc_root: "/proc".into(),
            netns_dir: "/run/netns".into(),
            host_netns: "/proc/1/ns/net".into(),
            proxy_names: vec!["envoy".into()],
            iptables_save: "iptables-save".into(),
            admin_timeout: Duration::from_secs(2),
            report_uncovered: true,
        }
    }
}

/// One pass over the node (see the module docs), reading every namespace afresh.
pub fn discover(opts: &Options) -> Result<Discovery, String> {
    Discoverer::new(opts.clone(), Duration::ZERO).pass()
}

/// What one namespace turned out to be.
#[derive(Clone, Debug)]
enum Outcome {
    Pod {
        pod: Pod,
        notes: Vec<String>,
    },
    Skipped(Skipped),
    /// Not a mesh pod: nothing to report.
    Nothing,
}

impl Outcome {
    /// Whether this is what a sidecar looks like while it starts: its admin API not answering
    /// yet, answering before its listeners arrived, or its pod's rules not (fully) written.
    /// Such a reading is not kept for the whole refresh: a restarted sidecar was otherwise left
    /// unaccelerated for that long after it became ready (seen in the benchmark, 30 s).
    fn not_ready(&self) -> bool {
        matches!(
            self,
            Outcome::Skipped(Skipped {
                reason: Reason::AdminUnreachable
                    | Reason::BadAdminConfig
                    | Reason::NotCaptured
                    | Reason::BadCapture,
                ..
            })
        )
    }
}

/// Identifies a namespace and the proxies in it: a new proxy process (a restarted sidecar)
/// makes a new key, so it is read afresh.
type Key = (u64, Vec<u32>);

/// A namespace's last reading, trusted for `valid` from `at`.
#[derive(Clone, Debug)]
struct Cached {
    at: Instant,
    valid: Duration,
    outcome: Outcome,
}

/// How soon a "not ready" reading ([`Outcome::not_ready`]) is read again; each further one in
/// a row waits twice as long, up to the refresh, so a sidecar that never becomes ready costs
/// no more than a ready one.
const NOT_READY_RETRY: Duration = Duration::from_secs(1);

/// Discovery for a daemon that resyncs often: `/proc` is walked every pass (cheap), but a
/// namespace's rules and admin API are read again only when its proxy processes change or its
/// last reading is older than `refresh` (one `iptables-save` pair and five admin requests per
/// namespace, about 10 ms each here). A reading of a sidecar that is not ready yet is retried
/// after [`NOT_READY_RETRY`], backing off.
#[derive(Debug)]
pub struct Discoverer {
    opts: Options,
    refresh: Duration,
    cache: BTreeMap<Key, Cached>,
}

impl Discoverer {
    pub fn new(opts: Options, refresh: Duration) -> Discoverer {
        Discoverer {
            opts,
            refresh,
            cache: BTreeMap::new(),
        }
    }

    /// One pass; namespaces no longer on the node are forgotten. An error: the node's /proc
    /// could not be read at all, so nothing is known.
    pub fn pass(&mut self) -> Result<Discovery, String> {
        let opts = &self.opts;
        let mut out = Discovery::default();
        let scan = procfs::scan(&opts.proc_root, &opts.proxy_names)
            .map_err(|e| format!("cannot read {}: {e}", opts.proc_root.display()))?;
        let host = procfs::netns_inode(&opts.host_netns).ok();
        let named = procfs::named_namespaces(&opts.netns_dir);
        let mut proxies: BTreeMap<u64, Vec<procfs::Process>> = BTreeMap::new();
        for p in scan.proxies {
            if Some(p.netns) != host {
                proxies.entry(p.netns).or_default().push(p);
            }
        }
        // Every namespace to look at, with the path that names it best.
        let mut todo: BTreeMap<u64, PathBuf> = BTreeMap::new();
        for (ino, procs) in &proxies {
            if let Some(p) = procs.first() {
                todo.insert(*ino, opts.proc_root.join(p.pid.to_string()).join("ns/net"));
            }
        }
        if opts.report_uncovered {
            for (ino, pid) in &scan.namespaces {
                todo.entry(*ino)
                    .or_insert_with(|| opts.proc_root.join(pid.to_string()).join("ns/net"));
            }
            for ino in named.keys() {
                todo.entry(*ino).or_default();
            }
        }
        let now = Instant::now();
        let mut seen = BTreeMap::new();
        for (ino, mut path) in todo {
            if Some(ino) == host {
                continue;
            }
            if let Some(n) = named.get(&ino) {
                path = n.clone();
            }
            let procs = proxies.get(&ino).map(Vec::as_slice).unwrap_or_default();
            let key: Key = (ino, procs.iter().map(|p| p.pid).collect());
            let last = self.cache.get(&key);
            let entry = match last {
                Some(c) if now.duration_since(c.at) < c.valid => c.clone(),
                _ => {
                    let outcome = if procs.is_empty() {
                        bare_namespace(opts, path)
                    } else {
                        isolated(&path, || proxy_namespace(opts, path.clone(), procs))
                    };
                    let valid = if outcome.not_ready() {
                        last.filter(|c| c.outcome.not_ready())
                            .map_or(NOT_READY_RETRY, |c| c.valid.saturating_mul(2))
                            .min(self.refresh)
                    } else {
                        self.refresh
                    };
                    Cached {
                        at: now,
                        valid,
                        outcome,
                    }
                }
            };
            match &entry.outcome {
                Outcome::Pod { pod, notes } => {
                    out.notes.extend(notes.iter().map(|m| Note {
                        pod: pod.name.clone(),
                        message: m.clone(),
                    }));
                    out.pods.push(pod.clone());
                }
                Outcome::Skipped(s) => out.skipped.push(s.clone()),
                Outcome::Nothing => {}
            }
            seen.insert(key, entry);
        }
        self.cache = seen;
        Ok(out)
    }
}

/// A namespace without a proxy: reported only if it carries Istio's capture rules.
fn bare_namespace(opts: &Options, path: PathBuf) -> Outcome {
    // A namespace that vanished meanwhile, or is not Istio's, is simply not a pod.
    let Ok(ns) = File::open(&path) else {
        return Outcome::Nothing;
    };
    let Ok((_, dump)) = iptables::dump_any(&ns, &opts.iptables_save) else {
        return Outcome::Nothing;
    };
    match iptables::parse(&dump) {
        Ok(_) | Err(iptables::Error::Tproxy { .. }) => Outcome::Skipped(Skipped {
            name: fallback_name(&path, None),
            netns: path,
            reason: Reason::NoSidecar,
            detail: "Istio capture rules, but no proxy process".into(),
            derived: None,
        }),
        Err(_) => Outcome::Nothing,
    }
}

fn fallback_name(path: &std::path::Path, pid: Option<u32>) -> String {
    if let Some(pid) = pid {
        if !path.starts_with("/run") {
            return format!("pid/{pid}");
        }
    }
    match path.file_name().and_then(|f| f.to_str()) {
        Some(n) if n != "net" => format!("netns/{n}"),
        _ => format!("netns/{}", path.display()),
    }
}

/// Where the admin API may listen: the proxy's own listening sockets on 127.0.0.1, Istio's
/// 15000 first.
fn admin_candidates(opts: &Options, procs: &[procfs::Process]) -> (Vec<SocketAddrV4>, Vec<u16>) {
    let mut loopback = Vec::new();
    let mut ports = Vec::new();
    for p in procs {
        for l in procfs::listening(&opts.proc_root, p.pid).unwrap_or_default() {
            ports.push(l.addr.port());
            if l.addr.ip().is_loopback() && !loopback.contains(&l.addr) {
                loopback.push(l.addr);
            }
        }
    }
    loopback.sort_by_key(|a| (a.port() != 15000, a.port()));
    (loopback, ports)
}

/// A namespace with proxy processes: a pod, or skipped with the reason.
/// Reads one pod's namespace so that a bug triggered by what that pod serves (its admin API,
/// its rules) is that pod's error: a panic becomes a skipped pod, never the daemon's end.
fn isolated(path: &Path, read: impl FnOnce() -> Outcome) -> Outcome {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(netns = %path.display(), panic = %what, "reading this pod's namespace panicked; the pod is skipped");
        Outcome::Skipped(Skipped {
            name: fallback_name(path, None),
            netns: path.to_path_buf(),
            reason: Reason::BadAdminConfig,
            detail: format!("reading this pod panicked ({what}); please report it"),
            derived: None,
        })
    })
}

fn proxy_namespace(opts: &Options, path: PathBuf, procs: &[procfs::Process]) -> Outcome {
    let Some(proxy) = procs.first() else {
        return Outcome::Nothing;
    };
    let mut name = fallback_name(&path, Some(proxy.pid));
    let skip_with = |name: &str, reason: Reason, detail: String, derived: Option<Derived>| {
        Outcome::Skipped(Skipped {
            name: name.to_string(),
            netns: path.clone(),
            reason,
            detail,
            derived,
        })
    };
    let skip = |name: &str, reason: Reason, detail: String| skip_with(name, reason, detail, None);
    let ns = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            return skip(
                &name,
                Reason::NetnsNotFound,
                format!("{}: {e}", path.display()),
            )
        }
    };

    // The rules first: they decide whether this is a captured pod at all.
    let (cap, rules) = match capture_rules(&ns, opts) {
        Ok(found) => found,
        Err((reason, detail)) => return skip(&name, reason, detail),
    };
    // What the rules say, for status when the pod is declined from here on.
    let derived = Some(Derived {
        proxy_uid: cap.proxy_uids.first().copied().unwrap_or(proxy.uid),
        proxy_gid: cap.proxy_gids.first().copied().unwrap_or(proxy.gid),
        outbound_port: cap.outbound_port,
        inbound_port: cap.inbound_port,
    });
    let skip =
        |name: &str, reason: Reason, detail: String| skip_with(name, reason, detail, derived);
    // Then the sidecar's own account; it also names the pod.
    let (candidates, listen_ports) = admin_candidates(opts, procs);
    let mut facts = Err(format!(
        "pid {} has no listening socket on 127.0.0.1",
        proxy.pid
    ));
    for addr in &candidates {
        match envoy_admin::fetch(&ns, *addr, opts.admin_timeout) {
            Ok(f) => {
                facts = Ok(f);
                break;
            }
            Err(e @ envoy_admin::Error::Field { .. })
            | Err(e @ envoy_admin::Error::Json { .. }) => {
                return skip(&name, Reason::BadAdminConfig, format!("{addr}: {e}"));
            }
            Err(e) => facts = Err(format!("{addr}: {e}")),
        }
    }
    let facts = match facts {
        Ok(f) => f,
        Err(detail) => return skip(&name, Reason::AdminUnreachable, detail),
    };
    if let Some(n) = facts
        .node_id
        .as_deref()
        .and_then(envoy_admin::pod_name_from_node_id)
    {
        name = n;
    }

    if facts.inbound_transparent {
        return skip(
            &name,
            Reason::Tproxy,
            "the inbound listener is transparent (TPROXY interception)".into(),
        );
    }

    let mut notes = Vec::new();
    if let Rules::Nftables(_) = &rules {
        notes.push(format!(
            "Istio's native nftables capture (table inet {}), read with nft -j",
            nftables::NAT_TABLE
        ));
    }
    let ipv6 = ipv6_capture(&ns, opts, &rules, &cap, &mut notes);
    for n in &facts.notes {
        notes.push(format!("admin API: {n}"));
    }
    if facts.outbound_port != cap.outbound_port {
        notes.push(format!(
            "outbound capture port: iptables redirects to {}, Envoy's outbound listener is on {}; using iptables",
            cap.outbound_port, facts.outbound_port
        ));
    }
    if facts.inbound_port != cap.inbound_port {
        notes.push(format!(
            "inbound capture port: iptables redirects to {}, Envoy's inbound listener is on {}; using iptables",
            cap.inbound_port, facts.inbound_port
        ));
    }
    for (what, port) in [
        ("outbound", cap.outbound_port),
        ("inbound", cap.inbound_port),
    ] {
        if !listen_ports.contains(&port) {
            notes.push(format!(
                "the proxy (pid {}) does not listen on the {what} capture port {port}",
                proxy.pid
            ));
        }
    }
    // The rules name the proxy's ids as seen in its pod; BPF (and /proc/PID/status, read
    // from here) see the host's. They differ when the pod has a user namespace of its own
    // (`hostUsers: false`): map the rules' ids through the proxy's id maps.
    let (exempt_uids, exempt_gids) = match (
        host_ids("uid", &proxy.uid_map, &cap.proxy_uids, &mut notes),
        host_ids("gid", &proxy.gid_map, &cap.proxy_gids, &mut notes),
    ) {
        (Ok(u), Ok(g)) => (u, g),
        (Err(e), _) | (_, Err(e)) => return skip(&name, Reason::UserNamespace, e),
    };
    let proxy_uid = pick_owner("uid", proxy.uid, &exempt_uids, &mut notes);
    let proxy_gid = pick_owner("gid", proxy.gid, &exempt_gids, &mut notes);
    if procs
        .iter()
        .any(|p| (p.uid, p.gid) != (proxy.uid, proxy.gid))
    {
        notes.push(format!(
            "several proxy processes with different owners: {:?}",
            procs
                .iter()
                .map(|p| (p.pid, p.uid, p.gid))
                .collect::<Vec<_>>()
        ));
    }
    let accelerate_outbound = match &cap.outbound_unsupported {
        Some(why) => {
            notes.push(format!("outbound hop not accelerated: {why}"));
            false
        }
        None => true,
    };
    let pod = Pod {
        name: name.clone(),
        uid: String::new(),
        ips: Vec::new(),
        interception: crate::model::Interception::Redirect,
        netns: path.clone(),
        proxy_uid,
        proxy_gid,
        outbound_port: cap.outbound_port,
        inbound_port: cap.inbound_port,
        inbound_bind: facts.inbound_bind.unwrap_or(Ipv4Addr::new(127, 0, 0, 6)),
        inbound_bind6: crate::model::ISTIO_INBOUND_BIND6,
        capture_ipv6: ipv6.is_some(),
        exclude_outbound_ports: cap.exclude_outbound_ports,
        exclude_inbound_ports: cap.exclude_inbound_ports,
        include_inbound_ports: cap.include_inbound_ports,
        exclude_outbound_cidrs: [
            cap.exclude_outbound_cidrs,
            ipv6.as_ref()
                .map(|c| c.exclude_outbound_cidrs.clone())
                .unwrap_or_default(),
        ]
        .concat(),
        include_outbound: match (cap.include_outbound, ipv6.map(|c| c.include_outbound)) {
            (OutboundRanges::Only(v4), Some(OutboundRanges::Only(v6))) => {
                OutboundRanges::Only([v4, v6].concat())
            }
            (include, _) => include,
        },
        accelerate_outbound,
        accelerate_inbound: cap.inbound_captured,
        mode: None,
    };
    if let Err(e) = crate::policy::pod_policy(&pod) {
        return skip(&name, Reason::Policy, e.to_string());
    }
    Outcome::Pod { pod, notes }
}

/// Where a pod's capture rules were found.
enum Rules {
    /// iptables (either backend; its IPv6 half is in ip6tables).
    Iptables,
    /// Istio's native nftables mode: one `inet` table for both families.
    Nftables(nftables::Tables),
}

/// The pod's IPv4 capture: istio-iptables' rules in iptables (whichever backend holds them),
/// else Istio's native nftables tables, which `iptables-save` does not show. Err: the reason
/// the pod is declined, and the detail.
fn capture_rules(
    ns: &File,
    opts: &Options,
) -> Result<(iptables::Capture, Rules), (Reason, String)> {
    let (_, dump) = iptables::dump_any(ns, &opts.iptables_save)
        .map_err(|e| (Reason::BadCapture, format!("iptables-save: {e}")))?;
    let declined = |e: iptables::Error| match e {
        iptables::Error::NotCaptured => (Reason::NotCaptured, e.to_string()),
        iptables::Error::Tproxy { .. } => (Reason::Tproxy, e.to_string()),
        e => (Reason::BadCapture, e.to_string()),
    };
    match iptables::parse(&dump) {
        Ok(cap) => Ok((cap, Rules::Iptables)),
        Err(iptables::Error::NotCaptured) => {
            // No iptables capture: Istio's nftables mode, or none at all. Without the `nft`
            // program the pod is reported as not captured, with the reason.
            let tables = nftables::read(ns)
                .map_err(|e| {
                    (
                        Reason::NotCaptured,
                        format!("{}; nft: {e}", iptables::Error::NotCaptured),
                    )
                })?
                .ok_or_else(|| declined(iptables::Error::NotCaptured))?;
            let text = nftables::to_iptables_save(&tables, nftables::Family::V4)
                .map_err(|e| (Reason::BadCapture, e.to_string()))?;
            let cap = iptables::parse(&text).map_err(|e| match e {
                // The table exists but holds none of Istio's chains.
                iptables::Error::NotCaptured => (
                    Reason::BadCapture,
                    format!("table inet {} has no istio-* chains", nftables::NAT_TABLE),
                ),
                e => declined(e),
            })?;
            Ok((cap, Rules::Nftables(tables)))
        }
        Err(e) => Err(declined(e)),
    }
}

/// The pod's IPv6 capture when its rules capture IPv6 as they capture IPv4 (a dual-stack or
/// IPv6 pod under istio-iptables with IPv6 enabled, or Istio's nftables mode, whose `inet`
/// table serves both families). None without ISTIO_* chains in ip6tables (IPv4-only capture,
/// the common case, said nowhere), or with a note when they exist but cannot be mirrored: its
/// IPv6 hops then stay on TCP.
fn ipv6_capture(
    ns: &std::fs::File,
    opts: &Options,
    rules: &Rules,
    v4: &iptables::Capture,
    notes: &mut Vec<String>,
) -> Option<iptables::Capture> {
    let dump = match rules {
        Rules::Iptables => iptables::dump_any6(ns, &opts.iptables_save)
            .map(|(_, d)| d)
            .map_err(|e| format!("ip6tables-save: {e}")),
        Rules::Nftables(tables) => {
            nftables::to_iptables_save(tables, nftables::Family::V6).map_err(|e| e.to_string())
        }
    };
    let dump = match dump {
        Ok(d) => d,
        Err(e) => {
            notes.push(format!("{e}; IPv6 hops not accelerated"));
            return None;
        }
    };
    match iptables::parse(&dump) {
        Ok(v6) => match iptables::ipv6_differs(v4, &v6) {
            None => Some(v6),
            Some(why) => {
                notes.push(format!("IPv6 hops not accelerated: {why}"));
                None
            }
        },
        Err(iptables::Error::NotCaptured) => None,
        Err(e) => {
            notes.push(format!("ip6tables: {e}; IPv6 hops not accelerated"));
            None
        }
    }
}

/// The owner the datapath treats as the proxy: the process's own when iptables exempts it (or
/// exempts nobody by that kind), else the one iptables exempts (iptables decides).
/// The host's ids for the ids the rules exempt, seen from the pod's user namespace (`map`,
/// the proxy's). Err when one has no host id: no process can hold it, so the rules do not
/// exempt the proxy that is there, and its own connections would be taken for the app's.
fn host_ids(
    kind: &str,
    map: &[procfs::IdRange],
    exempted: &[u32],
    notes: &mut Vec<String>,
) -> Result<Vec<u32>, String> {
    if map == [procfs::IDENTITY] {
        return Ok(exempted.to_vec());
    }
    let mut out = Vec::new();
    for id in exempted {
        let Some(host) = procfs::to_host(map, *id) else {
            return Err(format!(
                "the pod has its own user namespace and its rules exempt {kind} {id}, which maps to no host {kind} ({kind}_map {map:?})"
            ));
        };
        if host != *id {
            notes.push(format!(
                "the pod has its own user namespace: {kind} {id} in its rules is {kind} {host} on the host (what BPF sees)"
            ));
        }
        out.push(host);
    }
    Ok(out)
}

fn pick_owner(kind: &str, process: u32, exempted: &[u32], notes: &mut Vec<String>) -> u32 {
    match exempted.first() {
        None => process,
        Some(_) if exempted.contains(&process) => process,
        Some(first) => {
            notes.push(format!(
                "the proxy runs as {kind} {process} but iptables exempts {kind} {exempted:?}; using {first}"
            ));
            *first
        }
    }
}

/// The local source: a pass over the node.
impl super::Source for Discoverer {
    fn name(&self) -> &'static str {
        "local"
    }

    fn read(&mut self) -> super::Reading {
        match self.pass() {
            Ok(d) => super::Reading {
                discovery: Some(d),
                health: vec![("local", super::Health::Ok)],
                ..Default::default()
            },
            Err(e) => super::Reading {
                health: vec![("local", super::Health::Failed(e))],
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod user_namespace_tests {
    use super::{host_ids, pick_owner, procfs::parse_id_map};

    /// A pod with `hostUsers: false`: istio-init exempted uid 1337 as the pod sees it; the proxy
    /// runs as 1337 there, which /proc (and BPF) show as the host's 1246521.
    #[test]
    fn the_rules_ids_are_mapped_to_the_host_ids_bpf_sees() {
        let map = parse_id_map("0 1245184 65536\n").unwrap();
        let mut notes = Vec::new();
        let uids = host_ids("uid", &map, &[1337], &mut notes).unwrap();
        assert_eq!(uids, vec![1246521]);
        assert!(
            notes[0].contains("uid 1337 in its rules is uid 1246521"),
            "{notes:?}"
        );
        assert_eq!(pick_owner("uid", 1246521, &uids, &mut notes), 1246521);
        assert_eq!(notes.len(), 1, "no mismatch is reported: {notes:?}");
        // Before the mapping, the rules' 1337 was used, which BPF never sees for this proxy.
        // An id the namespace does not map: the pod is declined, not guessed.
        let small = parse_id_map("0 1245184 1000\n").unwrap();
        let e = host_ids("uid", &small, &[1337], &mut notes).unwrap_err();
        assert!(e.contains("maps to no host uid"), "{e}");
        // The host's own namespace changes nothing and notes nothing.
        let mut quiet = Vec::new();
        let host = parse_id_map("0 0 4294967295").unwrap();
        assert_eq!(host_ids("gid", &host, &[1337], &mut quiet), Ok(vec![1337]));
        assert!(quiet.is_empty());
    }
}

#[cfg(test)]
mod isolation_tests {
    use super::*;

    #[test]
    fn a_panic_while_reading_one_pod_skips_that_pod() {
        let out = isolated(Path::new("/run/netns/hostile"), || {
            panic!("bad admin answer")
        });
        match out {
            Outcome::Skipped(s) => {
                assert_eq!(s.reason, Reason::BadAdminConfig);
                assert!(s.detail.contains("bad admin answer"), "{}", s.detail);
            }
            _ => panic!("not skipped"),
        }
    }
}
