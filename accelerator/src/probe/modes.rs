//! The probe's app-view comparison: every behaviour of `appview` on the scratch namespace's
//! accelerated hops, against the same hops in a second namespace meshlane does not list, so the
//! only difference between the two is meshlane. A mode is judged on what differs, and on the
//! counters that prove it redirected exactly the directions it promises (a comparison made with
//! nothing redirected would prove nothing).

use std::{io, net::TcpListener};

use meshlane_common::{PodPolicy, POLICY_INTO_APP};

use super::{
    appview,
    checks::{inbound_pair, outbound_pair, Verdict},
    scratch::ScratchNs,
    Difference, ModeReport,
};
use crate::{
    datapath::{Counters, Scratch},
    mode::Mode,
};

type Observations = Vec<(&'static str, String)>;

/// What an app saw on both hops of one namespace.
pub struct Observed {
    inbound: Observations,
    /// None where the namespace has no REDIRECT (no iptables).
    outbound: Option<Observations>,
}

/// Both hops at once: they use different sockets and listeners.
fn observe(ns: &ScratchNs, sidecar: Option<&TcpListener>) -> Observed {
    std::thread::scope(|s| {
        let outbound =
            sidecar.map(|l| s.spawn(move || appview::observe_all(&|| outbound_pair(ns, l))));
        let inbound = appview::observe_all(&|| inbound_app_first(ns));
        let outbound = outbound.map(|h| {
            h.join()
                .unwrap_or_else(|_| vec![("outbound", "panic: observer thread".to_string())])
        });
        Observed { inbound, outbound }
    })
}

/// Plain TCP on the same hops, in a second scratch namespace meshlane does not list.
pub fn plain() -> io::Result<Observed> {
    let ns = ScratchNs::new()?;
    let sidecar = super::outbound_setup(&ns).ok();
    Ok(observe(&ns, sidecar.as_ref()))
}

/// The app's socket first, as `appview` wants it.
fn inbound_app_first(ns: &ScratchNs) -> io::Result<appview::Pair> {
    inbound_pair(ns).map(|(proxy, app)| (app, proxy))
}

/// The scratch pod's policy in the two-way opt-in.
pub fn two_way_policy() -> PodPolicy {
    let mut p = PodPolicy::istio_default();
    p.flags |= POLICY_INTO_APP;
    p
}

/// Every behaviour on both accelerated hops under the policy now in force for `mode`, and
/// whether the counters show exactly the mode's directions redirected (empty: they do).
pub fn accelerated(
    ns: &ScratchNs,
    dp: &Scratch,
    sidecar: Option<&TcpListener>,
    mode: Mode,
) -> (Observed, String) {
    let before = dp.counters();
    let seen = observe(ns, sidecar);
    let problem = match (before, dp.counters()) {
        (Ok(before), Ok(after)) => redirect_problem(&before, &after, mode, sidecar.is_some()),
        (Err(e), _) | (_, Err(e)) => format!("counters: {e}"),
    };
    (seen, problem)
}

/// The mode's report: what differed from `plain`, and whether the mode is usable at all.
pub fn judge(
    mode: Mode,
    plain: &Observed,
    fast: &Observed,
    problem: String,
    checks_passed: bool,
) -> ModeReport {
    let mut report = ModeReport {
        mode,
        safe: false,
        problem,
        differences: Vec::new(),
    };
    compare(&mut report, "inbound", &plain.inbound, &fast.inbound);
    if let (Some(p), Some(f)) = (&plain.outbound, &fast.outbound) {
        compare(&mut report, "outbound", p, f);
    }
    if !checks_passed && report.problem.is_empty() {
        report.problem = "one of its datapath checks failed (see the checks above)".into();
    }
    report.safe = report.problem.is_empty();
    report
}

fn compare(report: &mut ModeReport, hop: &'static str, plain: &Observations, fast: &Observations) {
    for ((name, p), (_, f)) in plain.iter().zip(fast) {
        if p != f {
            report.differences.push(Difference {
                behaviour: name,
                hop,
                plain: p.clone(),
                meshlane: f.clone(),
            });
        }
    }
}

/// The counters must show the mode's directions redirected and, under the reader rule, nothing
/// redirected into an app.
fn redirect_problem(before: &Counters, after: &Counters, mode: Mode, outbound: bool) -> String {
    let d = |name: &str| after.get(name) - before.get(name);
    let mut want = vec!["inbound_app_to_sidecar"];
    let mut into_app = vec!["inbound_sidecar_to_app"];
    if outbound {
        want.push("outbound_app_to_sidecar");
        into_app.push("outbound_sidecar_to_app");
    }
    let mut problems = Vec::new();
    for dir in &want {
        if d(&format!("bytes_redirected_{dir}")) == 0 {
            problems.push(format!("{dir} was never redirected"));
        }
    }
    for dir in &into_app {
        let n = d(&format!("bytes_redirected_{dir}"));
        match mode {
            Mode::Reader if n != 0 => problems.push(format!(
                "{n} bytes were redirected {dir} under the reader rule"
            )),
            Mode::TwoWay if n == 0 => problems.push(format!("{dir} was never redirected")),
            _ => {}
        }
    }
    problems.join("; ")
}

/// The mode's line in the check table: a warning, never a failure, because it decides the
/// mode, not whether the datapath is safe.
pub fn verdict(m: &ModeReport) -> Verdict {
    if !m.safe {
        Verdict::Warn(format!("not usable: {}", m.problem))
    } else if m.differences.is_empty() {
        Verdict::Pass(format!(
            "{} behaviours on both hops, as on plain TCP, with the mode's directions redirected",
            appview::ALL.len()
        ))
    } else {
        Verdict::Warn(format!(
            "apps can notice: {}",
            m.difference_names().join(", ")
        ))
    }
}
