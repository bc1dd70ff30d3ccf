//! Socket-API conformance: what an app observes through both accelerated hops, against plain
//! TCP through the same pods (docs/DESIGN.md invariant 7, the reader rule). Every behaviour of
//! `meshlane::probe::appview` runs with the app as client (its socket is the outbound hop's app
//! end) and as server (the inbound hop's app end), through the pods' uid-1337 relays, three ways:
//! plain (pods unlisted), the default reader rule, and the two-way opt-in. The counters must show
//! that each accelerated run redirected exactly the directions its mode promises, or the
//! comparison would prove nothing. The reader rule also runs for apps on IPv6 sockets, carrying
//! IPv4 (v4-mapped) and true IPv6, in dual-stack pods.

mod support;

use std::net::{TcpListener, TcpStream};

use meshlane::{
    mode::{self, Mode},
    probe::{self, appview},
};
use minimesh::{CaptureConfig, TwoPods};
use support::*;

type Observations = Vec<(&'static str, String)>;

/// (app as client, app as server) observations, with `family`'s sockets.
fn observe(mesh: &TwoPods, family: Family, port: u16) -> (Observations, Observations) {
    let net = Net { mesh, family };
    let dst = net.dst(port);
    let listen = net.listen_addr(port);
    let l = mesh
        .server
        .ns
        .run(|| TcpListener::bind(listen))
        .unwrap()
        .unwrap();
    let pair = || -> std::io::Result<(TcpStream, TcpStream)> {
        let c = net.connect(dst)?;
        let (s, _) = l.accept()?;
        Ok((c, s))
    };
    let as_client = appview::observe_all(&pair);
    let as_server = appview::observe_all(&|| pair().map(|(c, s)| (s, c)));
    (as_client, as_server)
}

fn differences(plain: &Observations, fast: &Observations) -> Vec<String> {
    plain
        .iter()
        .zip(fast)
        .filter(|((_, p), (_, f))| p != f)
        .map(|((n, p), (_, f))| format!("{n}: plain {p:?}, meshlane {f:?}"))
        .collect()
}

fn names(diffs: &[String]) -> Vec<String> {
    let mut n: Vec<String> = diffs
        .iter()
        .map(|d| d.split(':').next().unwrap_or_default().to_string())
        .collect();
    n.sort();
    n.dedup();
    n
}

struct Run {
    diffs: Vec<String>,
    counters: meshlane::datapath::Counters,
}

/// Plain, then accelerated in `two_way` or the reader rule, on fresh pods (dual-stack unless
/// the apps use IPv4 sockets).
fn run(test: &str, subnet: u8, two_way: bool, family: Family) -> Option<Run> {
    let mut accel = Accel::new(test)?;
    let (client, server) = (CaptureConfig::default(), CaptureConfig::default());
    let mesh = match family {
        Family::V4 => TwoPods::new(subnet, client, server),
        _ => TwoPods::dual_stack(subnet, client, server),
    }
    .unwrap();
    let (pc, ps) = observe(&mesh, family, 8080);
    assert_eq!(
        accel.counters().pairs(),
        0,
        "{test}: the plain run touched the datapath"
    );
    for pod in [&mesh.client, &mesh.server] {
        let mut model = pod_model(&pod.ns, &pod.capture);
        model.capture_ipv6 = pod.ip6.is_some();
        accel.add_model_pod_in(&model, two_way);
    }
    let (fc, fs) = observe(&mesh, family, 8081);
    let counters = accel.counters();
    let mut diffs: Vec<String> = differences(&pc, &fc)
        .into_iter()
        .map(|d| format!("{d} [app as client]"))
        .collect();
    diffs.extend(
        differences(&ps, &fs)
            .into_iter()
            .map(|d| format!("{d} [app as server]")),
    );
    eprintln!(
        "{test}: {} of {} behaviours differ:",
        names(&diffs).len(),
        appview::ALL.len()
    );
    for d in &diffs {
        eprintln!("  {d}");
    }
    Some(Run { diffs, counters })
}

/// Both app -> sidecar directions were redirected; into the app, only with `two_way`.
fn assert_directions(test: &str, c: &meshlane::datapath::Counters, two_way: bool) {
    for dir in ["outbound_app_to_sidecar", "inbound_app_to_sidecar"] {
        assert!(
            c.get(&format!("bytes_redirected_{dir}")) > 0,
            "{test}: {dir} never redirected: {c:?}"
        );
    }
    for dir in ["outbound_sidecar_to_app", "inbound_sidecar_to_app"] {
        let n = c.get(&format!("bytes_redirected_{dir}"));
        if two_way {
            assert!(n > 0, "{test}: {dir} never redirected in two-way: {c:?}");
        } else {
            assert_eq!(n, 0, "{test}: the reader rule redirected {dir}: {c:?}");
        }
    }
}

/// The default mode is what `auto` picks on this kernel. The probe must not miss what the suite
/// sees through real relays: where the suite finds a difference the probe must find one too, and
/// `auto` must then leave app sockets alone and name what the probe found. (Some differences
/// depend on timing, e.g. a wake-up racing the app's own half-close under emulation, so either
/// side may see one the other did not in a given run; none of them may go unreported.)
#[test]
fn the_default_mode_is_invisible_to_apps_or_leaves_them_alone() {
    let Some(r) = run("default_mode_apps_see_plain_tcp", 91, false, Family::V4) else {
        return;
    };
    assert_directions("reader", &r.counters, false);
    assert!(
        r.counters.get("app_unpaired_at_half_close") > 0,
        "no app socket left the sockhash at its own half-close: {:?}",
        r.counters
    );
    let report = probe::run(None);
    assert!(report.ok, "{}", report.render());
    let decision = mode::decide(mode::Choice::Auto, Some(&report), true);
    let reader = report
        .mode(Mode::Reader)
        .expect("the probe measured the reader rule");
    if r.diffs.is_empty() && reader.differences.is_empty() {
        assert_eq!(decision.mode, Mode::Reader, "{}", report.render());
        return;
    }
    assert!(
        !reader.differences.is_empty(),
        "the suite found {:?} but the probe found nothing: auto could pick a mode apps notice",
        r.diffs
    );
    assert!(
        !decision.mode.app_hops(),
        "apps can tell under the reader rule here, so auto must leave them alone:\n{}",
        report.render()
    );
    // ... and redirect the sidecar <-> sidecar hop, no app socket's business, where it works.
    let sidecar = if report.passed(meshlane::probe::SIDECAR_HOP_CHECK) {
        Mode::Sidecar
    } else {
        Mode::Off
    };
    assert_eq!(decision.mode, sidecar, "{}", report.render());
    for n in reader.difference_names() {
        assert!(
            decision.why.contains(&n),
            "{n} not named in {:?}",
            decision.why
        );
    }
}

/// Apps on IPv6 sockets, carrying IPv4 or true IPv6, under the reader rule: both app -> sidecar
/// directions redirected, nothing into the app, and what they can notice is no more than what
/// the probe (IPv4) reports, so `auto` leaves them alone wherever IPv4 apps could tell too.
#[test]
fn ipv6_and_v4_mapped_apps_see_what_ipv4_apps_see() {
    for (family, subnet) in [(Family::V4Mapped, 93), (Family::V6, 94)] {
        let test = format!("reader_{family:?}").to_lowercase();
        let Some(r) = run(&test, subnet, false, family) else {
            return;
        };
        assert_directions(&test, &r.counters, false);
        if r.diffs.is_empty() {
            continue;
        }
        let report = probe::run(None);
        let reader = report
            .mode(Mode::Reader)
            .expect("the probe measured the reader rule");
        assert!(
            !reader.differences.is_empty(),
            "{test}: the suite found {:?} but the probe found nothing",
            r.diffs
        );
        let decision = mode::decide(mode::Choice::Auto, Some(&report), true);
        assert!(
            !decision.mode.app_hops(),
            "{test}: apps can tell here, so auto must leave them alone"
        );
    }
}

/// The opt-in: every direction redirected, and the differences documented (printed); the
/// behaviours that make the reader rule necessary must show up here.
#[test]
fn the_two_way_opt_in_redirects_into_the_app_and_its_differences_are_listed() {
    let Some(r) = run("two_way_differences", 92, true, Family::V4) else {
        return;
    };
    assert_directions("two-way", &r.counters, true);
    let n = names(&r.diffs);
    for known in ["splice_to_pipe", "recv_waitall"] {
        assert!(
            n.iter().any(|x| x == known),
            "two-way should differ in {known} (tcp_bpf reads redirected bytes): {:?}",
            r.diffs
        );
    }
}
