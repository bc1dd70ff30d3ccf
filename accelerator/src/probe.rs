//! `meshlane probe`: may this node's kernel be accelerated?
//!
//! Runs the quick subset of the hazard matrix on the node's own kernel: a private, unpinned copy
//! of the datapath attached to this process's own cgroup, acting only on a throw-away network
//! namespace, with a uid-1337 "sidecar" and an app on both hops. Each check looks at what an app
//! would see (bytes, EOF, EAGAIN, MSG_PEEK, FIONREAD) and at the counters that prove the redirect
//! happened. A failed check means acceleration is unsafe here; a warning names a caveat that does
//! not hurt event-driven sidecars such as Envoy. Nothing outlives the probe.

pub mod appview;
mod checks;
mod modes;
mod scratch;
mod sys;

use std::{
    net::{SocketAddrV4, TcpListener},
    path::{Path, PathBuf},
    time::Instant,
};

use meshlane_common::PodPolicy;
use serde::Serialize;

use crate::{
    datapath::{self, Scratch},
    mode::Mode,
};
use checks::Verdict;
use scratch::ScratchNs;

/// The check that decides whether the sidecar hop (and so the sidecar mode) is used.
pub const SIDECAR_HOP_CHECK: &str = "sidecar hop";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Skip,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub ms: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    /// No check failed: acceleration is safe on this kernel.
    pub ok: bool,
    pub checks: Vec<Check>,
    /// What an app would notice in each mode on this kernel (docs/DESIGN.md invariant 7).
    pub modes: Vec<ModeReport>,
}

/// One mode, measured: whether the datapath did what the mode promises, and every app-visible
/// behaviour that differed from plain TCP.
#[derive(Clone, Debug, Serialize)]
pub struct ModeReport {
    pub mode: Mode,
    /// The hops paired and exactly the mode's directions were redirected; for two-way, the
    /// kernel also passed the checks that redirecting into an app needs (FIONREAD, EOF).
    pub safe: bool,
    /// Why not safe; empty when safe.
    pub problem: String,
    pub differences: Vec<Difference>,
}

/// An app-visible behaviour (`probe::appview`) whose outcome differed from plain TCP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub behaviour: &'static str,
    /// The app socket it was seen on: `outbound` (the app connects) or `inbound` (it accepts).
    pub hop: &'static str,
    pub plain: String,
    pub meshlane: String,
}

impl Report {
    /// Whether the check `name` ran and passed (a skipped check did not).
    pub fn passed(&self, name: &str) -> bool {
        self.checks
            .iter()
            .any(|c| c.name == name && c.status == Status::Pass)
    }
}

impl ModeReport {
    /// The differing behaviours' names, each once.
    pub fn difference_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for d in &self.differences {
            if !names.iter().any(|n| n == d.behaviour) {
                names.push(d.behaviour.to_string());
            }
        }
        names
    }

    /// One line per difference, for status and logs.
    pub fn describe(&self) -> Vec<String> {
        self.differences
            .iter()
            .map(|d| {
                format!(
                    "{} ({} hop): plain TCP {:?}, meshlane {:?}",
                    d.behaviour, d.hop, d.plain, d.meshlane
                )
            })
            .collect()
    }
}

impl Report {
    pub fn mode(&self, mode: Mode) -> Option<&ModeReport> {
        self.modes.iter().find(|m| m.mode == mode)
    }

    /// The failed checks, as one sentence for logs.
    /// Whether the checks reached the kernel: false when the probe could not even start (no
    /// privilege, no cgroup, no network namespace), which says nothing about the kernel.
    pub fn judged_kernel(&self) -> bool {
        !self.checks.iter().any(|c| {
            c.status == Status::Fail && [PREREQUISITES, SCRATCH_NAMESPACE].contains(&c.name)
        })
    }

    pub fn reasons(&self) -> String {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn render(&self) -> String {
        let mut out = format!("meshlane probe on Linux {}\n", self.kernel);
        for c in &self.checks {
            let tag = match c.status {
                Status::Pass => "PASS",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skip => "SKIP",
            };
            out.push_str(&format!(
                "  {tag}  {:<22} {:>5} ms  {}\n",
                c.name, c.ms, c.detail
            ));
        }
        for m in &self.modes {
            let verdict = if !m.safe {
                format!("unsafe: {}", m.problem)
            } else if m.differences.is_empty() {
                "apps see plain TCP in every probed behaviour".into()
            } else {
                format!("apps can notice: {}", m.difference_names().join(", "))
            };
            out.push_str(&format!("  mode {:<8} {verdict}\n", m.mode.as_str()));
            for d in m.describe() {
                out.push_str(&format!("      {d}\n"));
            }
        }
        out.push_str(if self.ok {
            "result: the datapath is safe on this kernel\n"
        } else if !self.judged_kernel() {
            "result: the probe could not run here, so it says nothing about this kernel; meshlane will not accelerate\n"
        } else {
            "result: acceleration is NOT safe on this kernel; meshlane will not accelerate\n"
        });
        let auto = crate::mode::decide(crate::mode::Choice::Auto, Some(self), true);
        out.push_str(&format!("mode: {} ({})\n", auto.mode.as_str(), auto.why));
        out
    }
}

struct Recorder {
    checks: Vec<Check>,
    modes: Vec<ModeReport>,
}

impl Recorder {
    fn record(&mut self, name: &'static str, run: impl FnOnce() -> checks::Outcome) -> bool {
        let t = Instant::now();
        let (status, detail) = match run() {
            Ok(Verdict::Pass(d)) => (Status::Pass, d),
            Ok(Verdict::Warn(d)) => (Status::Warn, d),
            Err(d) => (Status::Fail, d),
        };
        self.checks.push(Check {
            name,
            status,
            detail,
            ms: t.elapsed().as_millis() as u64,
        });
        status != Status::Fail
    }

    /// Like `record`, for a check that decides one opt-in mode only: a failure makes that
    /// mode unsafe (the caller marks it) and shows as a warning, not as a failed probe.
    fn record_soft(&mut self, name: &'static str, run: impl FnOnce() -> checks::Outcome) -> bool {
        let ok = self.record(name, run);
        if let Some(c) = self.checks.last_mut().filter(|c| c.status == Status::Fail) {
            c.status = Status::Warn;
            c.detail = format!("refuses the two-way mode: {}", c.detail);
        }
        ok
    }

    fn skip(&mut self, name: &'static str, why: String) {
        self.checks.push(Check {
            name,
            status: Status::Skip,
            detail: why,
            ms: 0,
        });
    }
}

/// The cgroup v2 directory this process is in (where the probe attaches its private copy).
/// The checks whose failure is about where the probe runs, not about the kernel.
const PREREQUISITES: &str = "privilege and cgroup";
const SCRATCH_NAMESPACE: &str = "scratch namespace";

pub fn own_cgroup() -> Result<PathBuf, String> {
    let root = datapath::cgroup2_root().map_err(|e| e.to_string())?;
    let me = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("read /proc/self/cgroup: {e}"))?;
    let rel = me
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// Runs every check. `cgroup` overrides where the private copy attaches (default: own cgroup).
pub fn run(cgroup: Option<&Path>) -> Report {
    let mut r = Recorder {
        checks: Vec::new(),
        modes: Vec::new(),
    };
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let ok = run_checks(&mut r, cgroup);
    let ok = ok && r.checks.iter().all(|c| c.status != Status::Fail);
    Report {
        kernel,
        ok,
        checks: r.checks,
        modes: r.modes,
    }
}

fn run_checks(r: &mut Recorder, cgroup: Option<&Path>) -> bool {
    let mut cg = PathBuf::new();
    let prereq = r.record(PREREQUISITES, || {
        if !nix::unistd::geteuid().is_root() {
            return Err(format!(
                "running as uid {}; meshlane needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)",
                nix::unistd::geteuid()
            ));
        }
        cg = match cgroup {
            Some(c) => c.to_path_buf(),
            None => own_cgroup()?,
        };
        // A wrong --cgroup is the operator's mistake, not the kernel's: caught here, it does not
        // reach "load and attach" and read as an unsafe kernel.
        match nix::sys::statfs::statfs(&cg) {
            Ok(fs) if fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => {}
            Ok(_) => return Err(datapath::Error::NotCgroup2(cg.clone()).to_string()),
            Err(_) => return Err(datapath::Error::NoCgroup(cg.clone()).to_string()),
        }
        Ok(Verdict::Pass(format!(
            "root; cgroup v2 at {}",
            cg.display()
        )))
    });
    if !prereq {
        return false;
    }
    let mut dp = None;
    if !r.record("load and attach", || {
        let d = Scratch::load(&cg).map_err(|e| e.to_string())?;
        dp = Some(d);
        Ok(Verdict::Pass(
            "sock_ops (header options, socket storage), sockhash, sk_msg".into(),
        ))
    }) {
        return false;
    }
    let Some(mut dp) = dp else { return false };
    let ns = match ScratchNs::new() {
        Ok(ns) => ns,
        Err(e) => {
            r.record(SCRATCH_NAMESPACE, || {
                Err(format!("cannot create a network namespace: {e}"))
            });
            return false;
        }
    };
    let cookie = match ns.cookie() {
        Ok(c) => c,
        Err(e) => {
            r.record(SCRATCH_NAMESPACE, || {
                Err(format!("SO_NETNS_COOKIE (Linux 5.14+): {e}"))
            });
            return false;
        }
    };
    if let Err(e) = dp.set_pod(cookie, &PodPolicy::istio_default()) {
        r.record("policy", || Err(e.to_string()));
        return false;
    }

    // The default mode first: the reader rule.
    let inbound_ok = r.record("inbound hop", || checks::inbound_hop(&ns, &dp, false));
    r.record("reads counted", || checks::read_accounting(&ns, &dp));
    r.record("end of stream", || checks::end_of_stream(&ns));
    r.record("MSG_PEEK", || checks::msg_peek(&ns));

    // The outbound hop needs istio-init's REDIRECT, which needs iptables in the namespace.
    let sidecar = match outbound_setup(&ns) {
        Ok(sidecar) => {
            r.record("outbound hop", || checks::outbound_hop(&ns, &dp, &sidecar));
            r.record("first byte order", || {
                checks::first_byte_order(&ns, &sidecar)
            });
            r.record("half-close then read", || {
                checks::half_close_then_read(&ns, &sidecar)
            });
            Some(sidecar)
        }
        Err(e) => {
            for name in ["outbound hop", "first byte order", "half-close then read"] {
                r.skip(name, format!("no REDIRECT in the scratch namespace ({e})"));
            }
            None
        }
    };
    // The sidecar hop needs a second namespace, a veth to it and REDIRECT to 15006 there.
    let server = sidecar_hop_setup(&ns, &mut dp, cookie);
    match &server {
        Ok((_, listener)) => {
            r.record(SIDECAR_HOP_CHECK, || {
                checks::sidecar_hop(&ns, &dp, listener)
            });
        }
        Err(e) => r.skip(
            SIDECAR_HOP_CHECK,
            format!("no second namespace with a veth and REDIRECT ({e})"),
        ),
    }
    drop(server);
    // The app-view checks below see the scratch pod as before: app hops only.
    if let Err(e) = dp.set_pod(cookie, &PodPolicy::istio_default()) {
        r.record("policy", || Err(e.to_string()));
        return false;
    }
    // What an app sees in each mode, against the same hops in a namespace meshlane does not
    // list (measured while the reader rule is measured: different namespaces, no shared state).
    let mut reader = None;
    let mut plain = None;
    r.record("app view: reader", || {
        let (p, (seen, problem)) = std::thread::scope(|s| {
            let p = s.spawn(modes::plain);
            let fast = modes::accelerated(&ns, &dp, sidecar.as_ref(), Mode::Reader);
            (p.join(), fast)
        });
        let p = p
            .map_err(|_| "the plain baseline panicked".to_string())?
            .map_err(|e| format!("cannot make the plain baseline namespace: {e}"))?;
        let m = modes::judge(Mode::Reader, &p, &seen, problem, inbound_ok);
        let v = modes::verdict(&m);
        reader = Some(m);
        plain = Some(p);
        Ok(v)
    });
    r.modes.extend(reader);
    if let Some(plain) = plain {
        if let Err(e) = dp.set_pod(cookie, &modes::two_way_policy()) {
            r.record("policy", || Err(e.to_string()));
            return false;
        }
        let two_way_in = r.record_soft("two-way inbound hop", || {
            checks::inbound_hop(&ns, &dp, true)
        });
        let two_way_fionread = r.record_soft("two-way FIONREAD", || checks::fionread(&ns));
        let two_way_eos = r.record_soft("two-way end of stream", || checks::end_of_stream(&ns));
        let mut two_way = None;
        r.record("app view: two-way", || {
            let (seen, problem) = modes::accelerated(&ns, &dp, sidecar.as_ref(), Mode::TwoWay);
            let m = modes::judge(
                Mode::TwoWay,
                &plain,
                &seen,
                problem,
                two_way_in && two_way_fionread && two_way_eos,
            );
            let v = modes::verdict(&m);
            two_way = Some(m);
            Ok(v)
        });
        r.modes.extend(two_way);
    }
    r.record("survives detach", || checks::survives_detach(&ns, dp));
    true
}

/// A second scratch namespace as the "server pod" of the sidecar hop: a veth to the probe's
/// namespace, PREROUTING REDIRECT to 15006 as istio-init's ISTIO_INBOUND, a uid-1337 listener
/// there, both namespaces listed with the sidecar hop and the server's address in the
/// pod-address map. The namespace goes when the returned value drops.
fn sidecar_hop_setup(
    client: &ScratchNs,
    dp: &mut Scratch,
    client_cookie: u64,
) -> Result<(ScratchNs, TcpListener), String> {
    let server = ScratchNs::new().map_err(|e| format!("namespace: {e}"))?;
    let server_cookie = server.cookie().map_err(|e| format!("cookie: {e}"))?;
    let ip = |ns: &ScratchNs, args: &[&str]| ns.command("ip", args, "").map_err(|e| e.to_string());
    ip(
        client,
        &[
            "link",
            "add",
            "mlprobe0",
            "type",
            "veth",
            "peer",
            "name",
            "mlprobe1",
            "netns",
            &server.path(),
        ],
    )?;
    let (cip, sip) = (
        format!("{}/30", checks::SIDECAR_HOP_CLIENT),
        format!("{}/30", checks::SIDECAR_HOP_SERVER),
    );
    ip(client, &["addr", "add", &cip, "dev", "mlprobe0"])?;
    ip(client, &["link", "set", "mlprobe0", "up"])?;
    ip(&server, &["addr", "add", &sip, "dev", "mlprobe1"])?;
    ip(&server, &["link", "set", "mlprobe1", "up"])?;
    let rules = format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n\
         -A PREROUTING -p tcp -j REDIRECT --to-ports {port}\n\
         COMMIT\n",
        port = checks::INBOUND_CAPTURE_PORT
    );
    server
        .command("iptables-restore", &["--noflush"], &rules)
        .map_err(|e| e.to_string())?;
    let listener = server
        .run(true, || {
            TcpListener::bind(SocketAddrV4::new(
                std::net::Ipv4Addr::UNSPECIFIED,
                checks::INBOUND_CAPTURE_PORT,
            ))
        })
        .map_err(|e| format!("sidecar listener: {e}"))?;
    let mut policy = PodPolicy::istio_default();
    policy.flags |= meshlane_common::POLICY_SIDECAR_HOP;
    for cookie in [client_cookie, server_cookie] {
        dp.set_pod(cookie, &policy).map_err(|e| e.to_string())?;
    }
    dp.set_pod_ip(checks::SIDECAR_HOP_SERVER.into(), server_cookie)
        .map_err(|e| e.to_string())?;
    Ok((server, listener))
}

/// istio-init's REDIRECT for TEST-NET-1 in the scratch namespace, and a uid-1337 listener on the
/// capture port standing in for the sidecar.
fn outbound_setup(ns: &ScratchNs) -> Result<TcpListener, String> {
    ns.command("ip", &["addr", "add", "192.0.2.1/24", "dev", "lo"], "")
        .map_err(|e| e.to_string())?;
    let rules = format!(
        "*nat\n:OUTPUT ACCEPT [0:0]\n\
         -A OUTPUT -p tcp -m owner --uid-owner {uid} -j RETURN\n\
         -A OUTPUT -p tcp -d 192.0.2.0/24 -j REDIRECT --to-ports {port}\n\
         COMMIT\n",
        uid = scratch::PROXY_UID,
        port = checks::CAPTURE_PORT
    );
    ns.command("iptables-restore", &["--noflush"], &rules)
        .map_err(|e| e.to_string())?;
    ns.run(true, || {
        TcpListener::bind(SocketAddrV4::new(
            std::net::Ipv4Addr::UNSPECIFIED,
            checks::CAPTURE_PORT,
        ))
    })
    .map_err(|e| format!("sidecar listener: {e}"))
}
