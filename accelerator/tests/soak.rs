//! The soak: mixed traffic through real Envoy (Istio's mTLS between the sidecars, all three hops
//! accelerated) while the daemon is SIGKILLed and restarted every few seconds (three restarts
//! in four skip the start-up probe so that they reconcile before they die), the pod list
//! flaps (pods listed, unlisted, a pod list that does not parse), and short-lived pods come and
//! go with connections open. Afterwards: every byte of every connection arrived, in order; no
//! connection broke; no daemon panicked; all three hops were redirected; and once the pods are
//! gone, every per-socket map of the datapath is empty.
//!
//! `MESHLANE_SOAK_SECS` sets how long the traffic runs: 60 by default, the form CI runs (about
//! a dozen restarts). The full form, about 100 restarts:
//! `MESHLANE_SOAK_SECS=600 cargo test --test soak -- --nocapture`.

mod support;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::{Duration, Instant},
};

use meshlane::datapath::{self, Datapath};
use minimesh::{
    envoy::Protocol,
    grpc::{GrpcClient, GrpcServer},
    nginx::{self, Nginx},
    CaptureConfig, EchoServer, EnvoyPods, TwoPods,
};
use support::*;

const ECHO: u16 = 7000;
const WEB: u16 = 80;
const GRPC: u16 = 50051;
/// Subnets of the Envoy pods and of the short-lived pods (used in turn).
const ENVOY_SUBNET: u8 = 171;
const CHURN_SUBNETS: [u8; 3] = [172, 173, 174];
/// How long a daemon lives before its SIGKILL: uniformly in this range (milliseconds).
const DAEMON_LIFE_MS: (u64, u64) = (2000, 8000);

/// A small deterministic generator, so a failing run can be told apart from another by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// What the traffic did, and what went wrong.
#[derive(Default)]
struct Tally {
    stop: AtomicBool,
    bytes: AtomicU64,
    connections: AtomicU64,
    requests: AtomicU64,
    calls: AtomicU64,
    /// Blocking reads that returned EAGAIN and were retried (see `short_connections`).
    eagain: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    fn fail(&self, what: String) {
        eprintln!("soak: {what}");
        self.errors.lock().unwrap().push(what);
    }

    /// Runs `round` until the soak ends; the first error ends this worker and is recorded.
    fn worker(&self, name: &str, mut round: impl FnMut(u64) -> Result<(), String>) {
        let mut i = 0;
        while !self.stopped() {
            if let Err(e) = round(i) {
                self.fail(format!("{name}, round {i}: {e}"));
                return;
            }
            i += 1;
        }
    }
}

/// One echo exchange of `data` on an open connection, checked byte for byte: a writer thread
/// sends while this one reads, so no buffer anywhere on the path has to hold the whole round.
fn echo_round(s: &TcpStream, data: &[u8]) -> Result<(), String> {
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| (&*s).write_all(data));
        let mut got = vec![0u8; data.len()];
        let read = (&*s).read_exact(&mut got);
        writer.join().unwrap().map_err(|e| format!("write: {e}"))?;
        read.map_err(|e| format!("read: {e}"))?;
        match got.iter().zip(data).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(at) => Err(format!(
                "{} bytes echoed, first difference at byte {at}",
                data.len()
            )),
        }
    })
}

/// A connection kept for the whole soak, echoing rounds of 1 byte to 256 KiB.
fn long_stream(tally: &Tally, ns: &minimesh::Netns, dst: SocketAddrV4, seed: u64) {
    let s = match connect(ns, dst) {
        Ok(s) => s,
        Err(e) => return tally.fail(format!("long stream {seed}: connect: {e}")),
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
    tally.worker(&format!("long stream {seed}"), |i| {
        let data = pattern(seed << 32 | i, rng.between((1, 256 * 1024)) as usize);
        echo_round(&s, &data)?;
        tally.bytes.fetch_add(data.len() as u64, Relaxed);
        Ok(())
    });
    // Its end: a half-close answered by the echo's, nothing more on the stream.
    if s.shutdown(Shutdown::Write).is_ok() {
        match read_to_end(&s) {
            Ok(rest) if rest.bytes.is_empty() => {}
            Ok(rest) => tally.fail(format!(
                "long stream {seed}: {} bytes after the last round",
                rest.bytes.len()
            )),
            Err(e) => tally.fail(format!("long stream {seed}: closing: {e}")),
        }
    }
}

/// New connections one after another: random sizes and write sizes, half-close, read to the end.
fn short_connections(tally: &Tally, ns: &minimesh::Netns, dst: SocketAddrV4, seed: u64) {
    let mut rng = Rng(0xd1b5_4a32_d192_ed03 ^ seed);
    tally.worker(&format!("short connections {seed}"), |i| {
        let data = pattern(seed << 32 | i, rng.between((1, 64 * 1024)) as usize);
        let chunk = rng.between((1, 16 * 1024)) as usize;
        let s = connect(ns, dst).map_err(|e| format!("connect: {e}"))?;
        // Half-closed once the echo has begun: an immediate half-close can be dropped by the
        // server Envoy's listener filters, with or without meshlane (README "Tests").
        let out = echo_exchange_settled(s, &data, chunk).map_err(|e| format!("exchange: {e}"))?;
        if out.bytes != data {
            return Err(format!(
                "{} bytes sent, {} echoed, not the same",
                data.len(),
                out.bytes.len()
            ));
        }
        // The reader rule's one documented difference for blocking readers (docs/DESIGN.md "What an
        // app can notice"): a read already waiting in tcp_bpf_recvmsg when the app's own FIN is
        // ACKed returns EAGAIN once; the retry gets every byte. Counted and reported.
        tally
            .eagain
            .fetch_add(u64::from(out.spurious_eagain), Relaxed);
        tally.bytes.fetch_add(data.len() as u64, Relaxed);
        tally.connections.fetch_add(1, Relaxed);
        Ok(())
    });
}

/// HTTP/1.1 keep-alive to nginx, 50 requests per connection, bodies checked.
fn http(tally: &Tally, ns: &minimesh::Netns, dst: SocketAddrV4) {
    let (small, large) = (nginx::body("1k"), nginx::body("64k"));
    tally.worker("http", |_| {
        let mut conn = http_conn(ns, dst, "web").map_err(|e| format!("connect: {e}"))?;
        for k in 0..50 {
            let (path, want) = if k % 10 == 9 {
                ("/64k", &large)
            } else {
                ("/1k", &small)
            };
            let r = conn.get(path).map_err(|e| format!("{e:#}"))?;
            if r.status != 200 || r.body != *want {
                return Err(format!(
                    "GET {path}: {} with {} bytes",
                    r.status,
                    r.body.len()
                ));
            }
            tally.requests.fetch_add(1, Relaxed);
            if tally.stopped() {
                break;
            }
        }
        Ok(())
    });
}

/// gRPC unary calls, 100 per channel.
fn grpc(tally: &Tally, ns: &minimesh::Netns, dst: SocketAddrV4) {
    tally.worker("grpc", |i| {
        let mut client = GrpcClient::connect(ns, dst).map_err(|e| format!("{e:#}"))?;
        for k in 0..100 {
            let payload = pattern(i << 8 | k, 512);
            let got = client
                .unary(i * 100 + k, payload.clone())
                .map_err(|e| format!("{e:#}"))?;
            if got != payload {
                return Err(format!("call {k}: the reply's payload differs"));
            }
            tally.calls.fetch_add(1, Relaxed);
            if tally.stopped() {
                break;
            }
        }
        Ok(())
    });
}

/// The pod list the daemon reads: the two Envoy pods, each listed or not as the flapper last
/// decided, the short-lived pods alive now, or (rarely) a file that does not parse.
#[derive(Default)]
struct PodList {
    envoy: Vec<(String, PathBuf, bool)>,
    churn: Vec<(String, PathBuf)>,
    broken: bool,
}

impl PodList {
    fn write(&self, path: &Path) {
        let mut out = String::new();
        if self.broken {
            out.push_str("[[pod]]\nname = \"soak/broken\"\nnetns = 42\n");
        }
        let listed = self.envoy.iter().filter(|(_, _, on)| *on);
        for (name, netns) in listed
            .map(|(n, p, _)| (n, p))
            .chain(self.churn.iter().map(|(n, p)| (n, p)))
        {
            out.push_str(&format!(
                "[[pod]]\nname = \"{name}\"\nnetns = \"{}\"\n\n",
                netns.display()
            ));
        }
        // Renamed into place, so the daemon never reads half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, out).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

/// Flaps the Envoy pods' entries every 0.3-3 s: mostly both listed, sometimes one or none, and
/// now and then a pod list that does not parse (the daemon keeps the last good one).
fn flap_pod_list(tally: &Tally, list: &Mutex<PodList>, path: &Path, flaps: &AtomicU64) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    while !tally.stopped() {
        std::thread::sleep(Duration::from_millis(rng.between((300, 3000))));
        let mut l = list.lock().unwrap();
        let pick = rng.below(20);
        l.broken = pick == 0;
        for (k, entry) in l.envoy.iter_mut().enumerate() {
            entry.2 = match pick {
                1..=3 => k != 0,
                4..=6 => k != 1,
                7 => false,
                _ => true,
            };
        }
        l.write(path);
        flaps.fetch_add(1, Relaxed);
    }
    let mut l = list.lock().unwrap();
    l.broken = false;
    l.envoy.iter_mut().for_each(|e| e.2 = true);
    l.write(path);
}

/// Short-lived pods (relay sidecars): each lives a few seconds, listed while it lives, carries
/// checked connections, and goes away with one of them still open (its pod unlisted first).
fn churn_pods(tally: &Tally, list: &Mutex<PodList>, path: &Path, lives: &AtomicU64) {
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    let mut n = 0u64;
    while !tally.stopped() {
        let subnet = CHURN_SUBNETS[(n % CHURN_SUBNETS.len() as u64) as usize];
        let mesh = match TwoPods::new(subnet, CaptureConfig::default(), CaptureConfig::default()) {
            Ok(m) => m,
            Err(e) => return tally.fail(format!("short-lived pods {n}: {e:#}")),
        };
        let dst = SocketAddrV4::new(mesh.server.ip, 8080);
        let _echo = match EchoServer::spawn(&mesh.server.ns, dst) {
            Ok(e) => e,
            Err(e) => return tally.fail(format!("short-lived pods {n}: echo: {e:#}")),
        };
        let names = [
            (format!("soak/churn-{n}-client"), mesh.client.ns.path()),
            (format!("soak/churn-{n}-server"), mesh.server.ns.path()),
        ];
        {
            let mut l = list.lock().unwrap();
            l.churn = names.to_vec();
            l.write(path);
        }
        let until = Instant::now() + Duration::from_millis(rng.between((2000, 6000)));
        let held = connect(&mesh.client.ns, dst);
        let mut k = 0;
        let mut run = || -> Result<(), String> {
            let held = held.as_ref().map_err(|e| format!("connect: {e}"))?;
            while Instant::now() < until && !tally.stopped() {
                let data = pattern(n << 32 | k, rng.between((1, 32 * 1024)) as usize);
                let s = connect(&mesh.client.ns, dst).map_err(|e| format!("connect: {e}"))?;
                let out = echo_exchange(s, &data, 4096).map_err(|e| format!("exchange: {e}"))?;
                if out.bytes != data {
                    return Err(format!(
                        "{} bytes sent, {} echoed",
                        data.len(),
                        out.bytes.len()
                    ));
                }
                echo_round(held, &data)?;
                tally.bytes.fetch_add(2 * data.len() as u64, Relaxed);
                tally.connections.fetch_add(1, Relaxed);
                k += 1;
            }
            // Unlisted while the held connection is open, which then carries one more round
            // and closes: its ends must still leave every map.
            {
                let mut l = list.lock().unwrap();
                l.churn.clear();
                l.write(path);
            }
            std::thread::sleep(Duration::from_millis(300));
            echo_round(held, b"last round after the pod was unlisted")?;
            Ok(())
        };
        if let Err(e) = run() {
            return tally.fail(format!("short-lived pods {n}, connection {k}: {e}"));
        }
        drop(held);
        lives.fetch_add(1, Relaxed);
        n += 1;
    }
}

/// Starts a daemon. `probe`: run the start-up probe (several seconds, so most such daemons are
/// killed while probing); otherwise `--force`, so the daemon reconciles within its short life.
fn start_daemon(accel: &Accel, config: &Path, log: &Path, probe: bool) -> Daemon {
    let log = append_to(log);
    let mut cmd = accel.run_command();
    if !probe {
        cmd.arg("--force");
    }
    Daemon(
        cmd.args(["--resync", "100ms", "--sweep", "1s", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start meshlane run"),
    )
}

/// Ends the soak's workers when dropped, also when the daemon's loop panics (the scope would
/// otherwise wait for them forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

fn soak_secs() -> u64 {
    match std::env::var("MESHLANE_SOAK_SECS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("MESHLANE_SOAK_SECS={v:?}: expected whole seconds")),
        Err(_) => 60,
    }
}

#[test]
fn soak_daemon_kills_pod_churn_and_list_flaps_under_mixed_traffic() {
    let Some(mut accel) = Accel::cgroup_only("soak") else {
        return;
    };
    let secs = soak_secs();
    let dir = std::env::temp_dir().join(format!("meshlane-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (config, log) = (dir.join("pods.toml"), dir.join("daemon.log"));
    let _ = std::fs::remove_file(&log);

    let services = [
        ("echo".to_string(), ECHO, Protocol::Tcp),
        ("web".to_string(), WEB, Protocol::Http),
        ("grpc".to_string(), GRPC, Protocol::Http),
    ];
    let pods = EnvoyPods::build(
        ENVOY_SUBNET,
        &services,
        CaptureConfig::default(),
        CaptureConfig::default(),
        true,
    )
    .expect("Envoy pods");
    let echo = EchoServer::spawn(&pods.server.ns, pods.service_addr(ECHO)).unwrap();
    let web = Nginx::spawn(&pods.server.ns, pods.service_addr(WEB)).unwrap();
    let grpc_server = GrpcServer::spawn(&pods.server.ns, pods.service_addr(GRPC)).unwrap();
    let list = Mutex::new(PodList {
        envoy: vec![
            ("soak/client".into(), pods.client.ns.path(), true),
            ("soak/server".into(), pods.server.ns.path(), true),
        ],
        ..PodList::default()
    });
    list.lock().unwrap().write(&config);

    let mut daemon = start_daemon(&accel, &config, &log, true);
    accel.wait_ready();
    wait_until("both Envoy pods accelerated", || {
        datapath::pinned_pods(&accel.pin_dir).is_ok_and(|p| p.len() == 2)
    });

    let tally = Tally::default();
    let (flaps, lives, restarts) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|scope| {
        let (ns, echo_dst) = (&pods.client.ns, pods.service_addr(ECHO));
        let tally = &tally;
        let _stop = StopOnDrop(&tally.stop);
        for seed in 0..2 {
            scope.spawn(move || long_stream(tally, ns, echo_dst, seed));
            scope.spawn(move || short_connections(tally, ns, echo_dst, seed));
        }
        scope.spawn(|| http(tally, ns, pods.service_addr(WEB)));
        scope.spawn(|| grpc(tally, ns, pods.service_addr(GRPC)));
        scope.spawn(|| flap_pod_list(tally, &list, &config, &flaps));
        scope.spawn(|| churn_pods(tally, &list, &config, &lives));

        // The daemon: SIGKILLed at random points of its life (adopting, reconciling,
        // sweeping; every fourth one while it probes) and started again, until the time is up.
        let mut rng = Rng(0xbf58_476d_1ce4_e5b9);
        while started.elapsed() < Duration::from_secs(secs) && !tally.stopped() {
            std::thread::sleep(Duration::from_millis(rng.between(DAEMON_LIFE_MS)));
            nix::sys::signal::kill(daemon.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
            daemon.0.wait().unwrap();
            let n = restarts.fetch_add(1, Relaxed) + 1;
            daemon = start_daemon(&accel, &config, &log, n % 4 == 0);
        }
    });
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "soak: {secs} s, {} daemon restarts, {} pod list flaps, {} short-lived pod pairs; \
         {} bytes echoed and checked, {} connections, {} HTTP requests, {} gRPC calls, \
         {} blocking reads retried after EAGAIN",
        restarts.load(Relaxed),
        flaps.load(Relaxed),
        lives.load(Relaxed),
        tally.bytes.load(Relaxed),
        tally.connections.load(Relaxed),
        tally.requests.load(Relaxed),
        tally.calls.load(Relaxed),
        tally.eagain.load(Relaxed),
    );
    let errors = tally.errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "broken or inexact connections: {errors:#?}"
    );
    assert!(!said.contains("panicked"), "a daemon panicked:\n{said}");
    assert!(
        restarts.load(Relaxed) >= secs / 10,
        "too few restarts to call this a soak"
    );
    assert!(lives.load(Relaxed) >= 1 && tally.calls.load(Relaxed) > 0);
    // The restarted daemons acted on the flaps and the short-lived pods, not only probed.
    let (removed, accelerated) = (
        said.matches("pod removed").count(),
        said.matches("pod accelerated").count(),
    );
    eprintln!("soak: the daemons logged {accelerated} pods accelerated, {removed} removed");
    assert!(
        removed as u64 >= secs / 20 && accelerated as u64 >= secs / 20,
        "the daemons hardly reconciled: {accelerated} accelerated, {removed} removed"
    );

    // The last daemon settles with both Envoy pods listed; every hop was redirected.
    accel.wait_ready();
    assert!(daemon.terminate().success());
    let c = datapath::pinned_counters(&accel.pin_dir).unwrap();
    eprintln!("soak: counters {c:?}");
    for k in [
        "pairs_outbound",
        "pairs_inbound",
        "pairs_sidecar",
        "bytes_redirected_outbound_app_to_sidecar",
        "bytes_redirected_inbound_app_to_sidecar",
        "bytes_redirected_sidecar_client_to_server",
        "bytes_redirected_sidecar_server_to_client",
    ] {
        assert!(c.get(k) > 0, "{k} never moved: {c:?}");
    }

    // Every socket gone (the Envoys hold pooled upstream connections until they stop): nothing
    // of any connection may stay in a per-socket map.
    drop((grpc_server, web, echo, pods));
    accel.dp = Some(Datapath::open(&accel.options()).expect("adopt the soak's pins"));
    let per_socket = |accel: &mut Accel| -> Vec<(&'static str, u32)> {
        use meshlane_common::maps;
        accel
            .dp()
            .map_usage()
            .unwrap()
            .into_iter()
            .filter(|m| {
                [maps::SOCKS, maps::TARGETS, maps::RENDEZVOUS, maps::UNREAD].contains(&m.name)
            })
            .map(|m| (m.name, m.entries))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while per_socket(&mut accel).iter().any(|(_, e)| *e > 0) {
        assert!(
            Instant::now() < deadline,
            "entries left after every socket closed: {:?}",
            per_socket(&mut accel)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
