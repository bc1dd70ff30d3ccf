//! Where the pod list comes from when no one hands it to us: the local node itself.
//!
//! A pass ([`discover`]) finds every Envoy process in `/proc`, groups them by network
//! namespace (the host's own is never a pod), and for each namespace reads the same facts two
//! ways:
//! - the capture rules istio-init left there (`iptables-save`, [`iptables`]): uid/gid exempted,
//!   capture ports, excluded ports and ranges. These decide where the kernel sends traffic, so
//!   they win;
//! - the sidecar's admin API (`/config_dump` on its 127.0.0.1 listening socket, [`envoy_admin`]):
//!   capture listeners, inbound source address, and the pod's name from the node id.
//!
//! A disagreement between the two is reported as a [`Note`] and iptables is used. Namespaces
//! that carry Istio's rules but run no sidecar, sidecars without capture rules (gateways),
//! TPROXY pods and unreadable sidecars are reported in [`Discovery::skipped`] with a [`Reason`],
//! never as pods. Nothing here panics on bad input; errors name the field.

pub mod envoy_admin;
pub mod iptables;
pub mod procfs;

use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use crate::model::Pod;

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

/// Why a namespace that looked like a pod is not accelerated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Istio's capture rules, but no proxy process.
    NoSidecar,
    /// A proxy, but no ISTIO_* rules (a gateway, or istio-init has not run).
    NotCaptured,
    /// Inbound interception by TPROXY.
    Tproxy,
    /// The namespace vanished or cannot be opened.
    NetnsNotFound,
    /// `iptables-save` failed there, or its output is not an Istio capture.
    BadCapture,
    /// No admin socket, or it did not answer.
    AdminUnreachable,
    /// The admin API answered with a configuration without capture listeners.
    BadAdminConfig,
    /// The pod does not fit the datapath (too many ports or ranges).
    Policy,
}

impl Reason {
    /// A stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoSidecar => "no_sidecar",
            Reason::NotCaptured => "not_captured",
            Reason::Tproxy => "tproxy_mode",
            Reason::NetnsNotFound => "netns_not_found",
            Reason::BadCapture => "bad_capture_rules",
            Reason::AdminUnreachable => "admin_api_unreachable",
            Reason::BadAdminConfig => "bad_admin_config",
            Reason::Policy => "policy",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespace seen but not accelerated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub name: String,
    pub netns: PathBuf,
    pub reason: Reason,
    pub detail: String,
}

/// Something worth a log line about a pod that is accelerated (perhaps only one hop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub pod: String,
    pub message: String,
}

/// The outcome of one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    pub pods: Vec<Pod>,
    pub skipped: Vec<Skipped>,
    pub notes: Vec<Note>,
}

/// One pass over the node (see the module docs).
pub fn discover(opts: &Options) -> Discovery {
    let mut out = Discovery::default();
    let scan = match procfs::scan(&opts.proc_root, &opts.proxy_names) {
        Ok(s) => s,
        Err(e) => {
            out.skipped.push(Skipped {
                name: "(node)".into(),
                netns: opts.proc_root.clone(),
                reason: Reason::NetnsNotFound,
                detail: format!("cannot read {}: {e}", opts.proc_root.display()),
            });
            return out;
        }
    };
    let host = procfs::netns_inode(&opts.host_netns).ok();
    let named = procfs::named_namespaces(&opts.netns_dir);
    let mut proxies: BTreeMap<u64, Vec<procfs::Process>> = BTreeMap::new();
    for p in scan.proxies {
        if Some(p.netns) != host {
            proxies.entry(p.netns).or_default().push(p);
        }
    }
    for (ino, procs) in &proxies {
        let path = named
            .get(ino)
            .cloned()
            .unwrap_or_else(|| opts.proc_root.join(procs[0].pid.to_string()).join("ns/net"));
        one_pod(opts, path, procs, &mut out);
    }
    if opts.report_uncovered {
        let mut others: BTreeMap<u64, PathBuf> = BTreeMap::new();
        for (ino, pid) in &scan.namespaces {
            others.insert(*ino, opts.proc_root.join(pid.to_string()).join("ns/net"));
        }
        for (ino, path) in &named {
            others.insert(*ino, path.clone());
        }
        for (ino, path) in others {
            if Some(ino) == host || proxies.contains_key(&ino) {
                continue;
            }
            // A namespace that vanished meanwhile, or is not Istio's, is simply not a pod.
            let Ok(ns) = File::open(&path) else { continue };
            let Ok(dump) = iptables::dump(&ns, &opts.iptables_save) else {
                continue;
            };
            if matches!(
                iptables::parse(&dump),
                Ok(_) | Err(iptables::Error::Tproxy { .. })
            ) {
                out.skipped.push(Skipped {
                    name: fallback_name(&path, None),
                    netns: path,
                    reason: Reason::NoSidecar,
                    detail: "Istio capture rules, but no proxy process".into(),
                });
            }
        }
    }
    out
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

fn one_pod(opts: &Options, path: PathBuf, procs: &[procfs::Process], out: &mut Discovery) {
    let proxy = &procs[0];
    let mut name = fallback_name(&path, Some(proxy.pid));
    let mut skip = |name: &str, reason: Reason, detail: String| {
        out.skipped.push(Skipped {
            name: name.to_string(),
            netns: path.clone(),
            reason,
            detail,
        })
    };
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
    let dump = match iptables::dump(&ns, &opts.iptables_save) {
        Ok(d) => d,
        Err(e) => return skip(&name, Reason::BadCapture, format!("iptables-save: {e}")),
    };
    let cap = match iptables::parse(&dump) {
        Ok(c) => c,
        Err(e @ iptables::Error::NotCaptured) => {
            return skip(&name, Reason::NotCaptured, e.to_string())
        }
        Err(e @ iptables::Error::Tproxy { .. }) => {
            return skip(&name, Reason::Tproxy, e.to_string())
        }
        Err(e) => return skip(&name, Reason::BadCapture, e.to_string()),
    };
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
    let proxy_uid = pick_owner("uid", proxy.uid, &cap.proxy_uids, &mut notes);
    let proxy_gid = pick_owner("gid", proxy.gid, &cap.proxy_gids, &mut notes);
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
        netns: path.clone(),
        proxy_uid,
        proxy_gid,
        outbound_port: cap.outbound_port,
        inbound_port: cap.inbound_port,
        inbound_bind: facts.inbound_bind.unwrap_or(Ipv4Addr::new(127, 0, 0, 6)),
        exclude_outbound_ports: cap.exclude_outbound_ports,
        exclude_inbound_ports: cap.exclude_inbound_ports,
        exclude_outbound_cidrs: cap.exclude_outbound_cidrs,
        include_outbound: cap.include_outbound,
        accelerate_outbound,
        accelerate_inbound: true,
    };
    if let Err(e) = crate::policy::pod_policy(&pod) {
        return skip(&name, Reason::Policy, e.to_string());
    }
    out.notes.extend(notes.into_iter().map(|message| Note {
        pod: name.clone(),
        message,
    }));
    out.pods.push(pod);
}

/// The owner the datapath treats as the proxy: the process's own when iptables exempts it (or
/// exempts nobody by that kind), else the one iptables exempts (iptables decides).
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
