//! Shared scaffolding of the privileged datapath tests: a fresh meshlane datapath per test, pinned
//! in its own bpffs directory and attached to its own cgroup (which this process joins while the
//! test runs), plus stream helpers that check every byte.
//!
//! Tests in one binary run on parallel threads, but cgroup membership is per process, so the
//! fixture holds a process-wide lock: privileged tests run one at a time.
#![allow(dead_code)]

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddrV4, TcpStream},
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use meshlane::{
    datapath::{self, Counters, Datapath, Options},
    model::{Cidr, Pod},
    policy,
};
use minimesh::{CaptureConfig, Cgroup, CgroupGuard, Netns};

static SERIAL: Mutex<()> = Mutex::new(());
static PIN_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A loaded, attached datapath scoped to this test. Drop detaches it and removes the cgroup.
pub struct Accel {
    // Field order is drop order.
    pub dp: Option<Datapath>,
    pub pin_dir: PathBuf,
    /// For a daemon this test starts: its own API socket and metrics port, so tests never meet
    /// each other's (or a real daemon's) endpoints.
    pub api_socket: PathBuf,
    pub metrics_port: u16,
    _in_cgroup: CgroupGuard,
    pub cgroup: Cgroup,
    _serial: MutexGuard<'static, ()>,
}

impl Accel {
    /// `None` when privileged tests cannot run here (and CI is not set: under CI=true that panics).
    pub fn new(test: &str) -> Option<Accel> {
        let mut a = Self::cgroup_only(test)?;
        a.dp = Some(Datapath::open(&a.options()).expect("load the datapath"));
        Some(a)
    }

    /// Like [`Accel::new`], with sockhashes (and the maps sized from them) for `max_sockets`.
    pub fn with_max_sockets(test: &str, max_sockets: u32) -> Option<Accel> {
        let mut a = Self::cgroup_only(test)?;
        let opts = Options {
            max_sockets,
            ..a.options()
        };
        a.dp = Some(Datapath::open(&opts).expect("load the datapath"));
        Some(a)
    }

    /// The test cgroup and a pin directory name, but nothing loaded (for tests that run the daemon).
    pub fn cgroup_only(test: &str) -> Option<Accel> {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        if !minimesh::privileged_or_skip(test) {
            return None;
        }
        let cgroup = Cgroup::new("dp").expect("test cgroup");
        let in_cgroup = cgroup.enter().expect("join the test cgroup");
        let n = PIN_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/meshlane-test-{}-{n}",
            std::process::id()
        ));
        let api_socket =
            std::env::temp_dir().join(format!("meshlane-test-{}-{n}.sock", std::process::id()));
        Some(Accel {
            dp: None,
            pin_dir,
            api_socket,
            metrics_port: free_port(),
            _in_cgroup: in_cgroup,
            cgroup,
            _serial: serial,
        })
    }

    pub fn options(&self) -> Options {
        Options {
            pin_dir: self.pin_dir.clone(),
            cgroup: self.cgroup.path().to_path_buf(),
            max_sockets: datapath::DEFAULT_MAX_SOCKETS,
        }
    }

    /// `meshlane run` on this test's pins, cgroup, API socket and metrics port, with discovery
    /// off: tests name their pods, and sidecars of other tests running on the node stay out.
    pub fn run_command(&self) -> std::process::Command {
        let mut cmd = self.daemon_command();
        cmd.args(["--discovery", "none"]);
        cmd
    }

    /// Like [`Accel::run_command`], with the daemon's own discovery default (the caller may
    /// pass `--discovery ...`). The mode is the reader rule, named explicitly: `auto` leaves
    /// app sockets alone on kernels where the probe finds the reader rule visible to apps (this
    /// machine's FIONREAD), and these tests are about pairing and telemetry, not that choice
    /// (`modes.rs` tests it).
    pub fn daemon_command(&self) -> std::process::Command {
        let mut cmd = self.daemon_command_auto();
        cmd.args(["--mode", "reader"]);
        cmd
    }

    /// The daemon exactly as a user starts it: `--mode auto`.
    pub fn daemon_command_auto(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meshlane"));
        cmd.arg("run")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--api-socket")
            .arg(&self.api_socket)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// `GET path` on this test's daemon's metrics port: (status code, body).
    pub fn http_get(&self, path: &str) -> io::Result<(u16, String)> {
        http_get(self.metrics_port, path)
    }

    /// Waits for this test's daemon to answer `/readyz` with 200. Ready comes after the start-up
    /// probe, which runs a dozen kernel scenarios with their own timeouts; on a nested-VM 6.1
    /// kernel under CI load that took over 20 s, so this allows 90 s.
    pub fn wait_ready(&self) {
        wait_until_within("/readyz", Duration::from_secs(90), || {
            matches!(self.http_get("/readyz"), Ok((200, _)))
        });
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("datapath open")
    }

    /// Registers a pod whose sidecar captures as `capture` says, in the default mode (the
    /// reader rule: only app -> sidecar is redirected).
    pub fn add_pod(&mut self, ns: &Netns, capture: &CaptureConfig) {
        self.add_pod_in(ns, capture, false)
    }

    /// Registers a pod, in the two-way opt-in (also sidecar -> app, into the app's socket)
    /// when `two_way` is set.
    pub fn add_pod_in(&mut self, ns: &Netns, capture: &CaptureConfig, two_way: bool) {
        let pod = pod_model(ns, capture);
        let cookie = ns.cookie().expect("netns cookie");
        let mut p = policy::pod_policy(&pod).expect("policy");
        if two_way {
            p.flags |= meshlane_common::POLICY_INTO_APP;
        }
        self.dp().set_pod(cookie, &p).expect("policy write");
    }

    /// Registers a pod in the reader rule with the sidecar hop on, its addresses `ips` in the
    /// node's pod-address map (added to what earlier calls put there), as the daemon does for
    /// each accelerated pod.
    pub fn add_pod_with_sidecar_hop(
        &mut self,
        ns: &Netns,
        capture: &CaptureConfig,
        ips: &[impl Into<std::net::IpAddr> + Copy],
    ) {
        self.add_model_pod_with_sidecar_hop(&pod_model(ns, capture), ips);
    }

    /// [`Accel::add_pod_with_sidecar_hop`] for a pod exactly as the model has it (e.g. one
    /// whose ip6tables capture IPv6 too).
    pub fn add_model_pod_with_sidecar_hop(
        &mut self,
        pod: &Pod,
        ips: &[impl Into<std::net::IpAddr> + Copy],
    ) {
        let cookie = meshlane::node::netns_cookie(&pod.netns).expect("netns cookie");
        let mut p = policy::pod_policy(pod).expect("policy");
        p.flags |= meshlane_common::POLICY_SIDECAR_HOP;
        self.dp().set_pod(cookie, &p).expect("policy write");
        let mut all = self.dp().pod_ips().expect("pod addresses");
        all.extend(ips.iter().map(|ip| ((*ip).into(), cookie)));
        assert_eq!(self.dp().set_pod_ips(&all).expect("pod addresses"), 0);
    }

    /// Registers a pod exactly as the model has it (e.g. as discovery found it), keyed by the
    /// cookie of its `netns` path.
    pub fn add_model_pod(&mut self, pod: &Pod) {
        self.add_model_pod_in(pod, false)
    }

    /// [`Accel::add_model_pod`], in the two-way opt-in when `two_way` is set.
    pub fn add_model_pod_in(&mut self, pod: &Pod, two_way: bool) {
        let cookie = meshlane::node::netns_cookie(&pod.netns).expect("netns cookie");
        let mut p = policy::pod_policy(pod).expect("policy");
        if two_way {
            p.flags |= meshlane_common::POLICY_INTO_APP;
        }
        self.dp().set_pod(cookie, &p).expect("policy write");
    }

    pub fn remove_pod(&mut self, ns: &Netns) {
        let cookie = ns.cookie().expect("netns cookie");
        self.dp().remove_pod(cookie).expect("policy removal");
    }

    /// The datapath's counters once they have stopped moving. Sockets add what they redirected
    /// to the counters every few messages and when they half-close or close (`FOLD_EVERY`), and
    /// a test's last exchange can return before the far end has closed (on its own thread), so
    /// a read a test compares with a later one waits for that: two reads 100 ms apart agree, or
    /// 5 s passed and the last read is returned as it is (the comparison then says what moved).
    pub fn counters(&self) -> Counters {
        let read = || datapath::pinned_counters(&self.pin_dir).expect("counters");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut last = read();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = read();
            if now == last || std::time::Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// Detaches everything now (the test goes on without programs).
    pub fn detach(&mut self) {
        self.dp = None;
        datapath::detach(&self.pin_dir).expect("detach");
    }
}

impl Drop for Accel {
    fn drop(&mut self) {
        self.dp = None;
        // A daemon killed with SIGKILL leaves its socket file.
        let _ = std::fs::remove_file(&self.api_socket);
        if let Err(e) = datapath::detach(&self.pin_dir) {
            eprintln!("test cleanup: detach {}: {e}", self.pin_dir.display());
        }
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A GET on 127.0.0.1:port (the daemon's metrics port, Prometheus): (status code, body).
pub fn http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    let r = httpc::Client::new(Duration::from_secs(10))
        .get(([127, 0, 0, 1], port), path)
        .map_err(io::Error::other)?;
    Ok((r.status, r.text()))
}

/// Keep-alive HTTP from inside `ns` to `dst` (`host` in the Host header), 30 s per request.
pub fn http_conn(ns: &Netns, dst: SocketAddrV4, host: &str) -> io::Result<httpc::Conn> {
    httpc::Client::new(Duration::from_secs(30))
        .keep_alive(connect(ns, dst)?, host)
        .map_err(io::Error::other)
}

/// Polls `ok` every 50 ms for up to 60 s. Generous on purpose: many waits follow a daemon's
/// start, which runs the probe first (6.5 s here, over 20 s once on a nested-VM 6.1 guest under
/// CI load); a wait that succeeds costs no more for it.
pub fn wait_until(what: &str, ok: impl FnMut() -> bool) {
    wait_until_within(what, Duration::from_secs(60), ok)
}

/// Polls `ok` every 50 ms for up to `limit`.
pub fn wait_until_within(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting {limit:?} for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `meshlane status --json`, or None while the daemon is not answering yet (for polling).
pub fn try_status_json(accel: &Accel) -> Option<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshlane"))
        .args(["status", "--json", "--api-socket"])
        .arg(&accel.api_socket)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// `meshlane status --json` from this test's daemon.
pub fn status_json(accel: &Accel) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshlane"))
        .args(["status", "--json", "--api-socket"])
        .arg(&accel.api_socket)
        .output()
        .expect("run meshlane status");
    assert!(
        out.status.success(),
        "meshlane status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// The value of one sample line (`name{labels} value`) in a Prometheus text body.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The value of the first sample of metric `name`, whatever its labels.
pub fn first_sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The model of a pod whose istio-init ran with `capture`.
pub fn pod_model(ns: &Netns, capture: &CaptureConfig) -> Pod {
    Pod {
        proxy_uid: capture.proxy_uid,
        proxy_gid: capture.proxy_gid,
        outbound_port: capture.outbound_port,
        inbound_port: capture.inbound_port,
        exclude_outbound_ports: capture.exclude_outbound_ports.clone(),
        exclude_inbound_ports: capture.exclude_inbound_ports.clone(),
        include_inbound_ports: match &capture.inbound_ports {
            minimesh::InboundPorts::All => Vec::new(),
            minimesh::InboundPorts::List(ports) => ports.clone(),
        },
        exclude_outbound_cidrs: capture
            .exclude_outbound_cidrs
            .iter()
            .map(|(addr, prefix)| Cidr {
                addr: (*addr).into(),
                prefix: *prefix,
            })
            .collect(),
        ..Pod::with_istio_defaults(format!("test/{}", ns.name()), ns.path())
    }
}

/// Connects from inside `ns` (the socket lives there, and in this process's cgroup).
pub fn connect(ns: &Netns, dst: impl Into<std::net::SocketAddr>) -> io::Result<TcpStream> {
    let dst = dst.into();
    let s = ns
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(10)))
        .map_err(io::Error::other)??;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// Deterministic, connection-specific bytes, so a byte delivered to the wrong stream shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What a blocking reader saw: the bytes, and how many times the kernel said EAGAIN on a
/// blocking socket (the tcp_bpf_recvmsg hazard; 0 on plain TCP).
#[derive(Debug, Default)]
pub struct ReadOutcome {
    pub bytes: Vec<u8>,
    pub spurious_eagain: u32,
}

/// Reads to end of stream on a blocking socket. An EAGAIN before the read timeout is the kernel
/// hazard; it is counted and the read retried, as a careful app would.
pub fn read_to_end(mut s: &TcpStream) -> io::Result<ReadOutcome> {
    let mut out = ReadOutcome::default();
    let mut buf = vec![0u8; 64 * 1024];
    let timeout = s.read_timeout()?.unwrap_or(Duration::from_secs(30));
    loop {
        let started = std::time::Instant::now();
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock && started.elapsed() < timeout => {
                out.spurious_eagain += 1;
                if out.spurious_eagain > 1000 {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Full-duplex exchange with an echo peer: a writer thread sends `payload` in `chunk`-sized
/// writes and half-closes; this thread reads everything back to end of stream.
pub fn echo_exchange(s: TcpStream, payload: &[u8], chunk: usize) -> io::Result<ReadOutcome> {
    std::thread::scope(|scope| {
        let w = scope.spawn(|| -> io::Result<()> {
            let mut ws = &s;
            for c in payload.chunks(chunk.max(1)) {
                ws.write_all(c)?;
            }
            s.shutdown(Shutdown::Write)
        });
        let r = read_to_end(&s);
        w.join().expect("writer thread")?;
        r
    })
}

/// Like [`echo_exchange`], but the half-close waits until the echo has begun. Through Envoy a
/// FIN that arrives while the server sidecar's listener filters are still deciding gets the
/// connection dropped, with or without meshlane (see the README); once the app has echoed a
/// byte, those filters are done, and the FIN still races the rest of the reply.
/// `n` connections from `ns` to the echo service at `dst`, each echoing a distinct 256 KiB
/// pattern in 16 KiB writes; every byte must come back in order.
pub fn echo_streams(ns: &Netns, dst: SocketAddrV4, n: u64) {
    for i in 0..n {
        let data = pattern(i, ECHO_STREAM_BYTES);
        let out = echo_exchange_settled(connect(ns, dst).expect("connect"), &data, 16 * 1024)
            .expect("echo through both sidecars");
        assert_same(&format!("stream {i}"), &out.bytes, &data);
    }
}

/// The size of each of [`echo_streams`]' streams.
pub const ECHO_STREAM_BYTES: usize = 256 * 1024;

/// The pods of a `meshlane status --json` document whose netns cookie is one of `cookies`
/// (other tests' sidecars may run on the node too).
pub fn status_pods(st: &serde_json::Value, cookies: &[u64]) -> Vec<serde_json::Value> {
    st["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["netns_cookie"]
                .as_u64()
                .is_some_and(|c| cookies.contains(&c))
        })
        .cloned()
        .collect()
}

pub fn echo_exchange_settled(
    s: TcpStream,
    payload: &[u8],
    chunk: usize,
) -> io::Result<ReadOutcome> {
    let (begun, wait) = std::sync::mpsc::channel::<()>();
    let s = &s;
    std::thread::scope(|scope| {
        let w = scope.spawn(move || -> io::Result<()> {
            let mut ws = s;
            for c in payload.chunks(chunk.max(1)) {
                ws.write_all(c)?;
            }
            let _ = wait.recv_timeout(Duration::from_secs(30));
            s.shutdown(Shutdown::Write)
        });
        let mut first = [0u8; 1];
        let n = loop {
            match (&*s).read(&mut first) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        let _ = begun.send(());
        let n = n?;
        let mut out = if n == 0 {
            ReadOutcome::default()
        } else {
            read_to_end(s)?
        };
        out.bytes.splice(0..0, first[..n].iter().copied());
        w.join().expect("writer thread")?;
        Ok(out)
    })
}

/// Asserts two byte streams are identical, reporting the first difference instead of dumping MiBs.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: got {} bytes, want {}; first difference at byte {first}",
        got.len(),
        want.len()
    );
}

/// Sends `payload` to `s` and collects everything echoed back (see [`echo_exchange`]), for an
/// [`minimesh::EchoServer::spawn_checked`] peer: the stream starts with the destination header.
pub fn checked_echo(s: TcpStream, dst: SocketAddrV4, seed: u64, size: usize) {
    let mut payload = minimesh::dest_header(dst).to_vec();
    payload.extend(pattern(seed, size));
    let out = echo_exchange(s, &payload, 16 * 1024)
        .unwrap_or_else(|e| panic!("stream {seed} to {dst}: {e}"));
    assert_same(&format!("stream {seed} to {dst}"), &out.bytes, &payload);
}

/// A TCP socket bound to `src` with SO_REUSEADDR (so several may share one local port), connected
/// to `dst` from inside `ns`.
pub fn connect_from(ns: &Netns, src: SocketAddrV4, dst: SocketAddrV4) -> io::Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect as nconnect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
        SockaddrIn,
    };
    use std::os::fd::AsRawFd;
    ns.run(|| -> io::Result<TcpStream> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        bind(fd.as_raw_fd(), &SockaddrIn::from(src))?;
        nconnect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
        let s = TcpStream::from(fd);
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(s)
    })
    .map_err(io::Error::other)?
}

/// Runs `work` over `items` on `threads` threads and waits for all of them.
pub fn par_each<T: Send>(items: Vec<T>, threads: usize, work: impl Fn(T) + Sync) {
    let queue = Mutex::new(items);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Some(item) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                    return;
                };
                work(item);
            });
        }
    });
}

/// A `meshlane run` child that is killed and reaped when dropped, also when a test panics.
pub struct Daemon(pub std::process::Child);

/// `meshlane run --force --resync 200ms --config <config>` for `accel`, its log appended to
/// `log`: the daemon attaches whatever the start-up probe says.
pub fn start_forced_daemon(
    accel: &Accel,
    config: &std::path::Path,
    log: &std::path::Path,
) -> Daemon {
    let child = accel
        .run_command()
        .arg("--force")
        .args(["--resync", "200ms"])
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(append_to(log))
        .spawn()
        .expect("start meshlane run");
    Daemon(child)
}

impl Daemon {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.id() as i32)
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM);
        self.0.wait().expect("reap meshlane run")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A run that passed with nothing paired or redirected proves nothing about the datapath: both
/// hops must have been paired and bytes redirected.
pub fn assert_accelerated(test: &str, c: &Counters) {
    assert!(
        c.get("pairs_outbound") > 0,
        "{test}: no app->sidecar hop was paired: {c:?}"
    );
    assert!(
        c.get("pairs_inbound") > 0,
        "{test}: no sidecar->app hop was paired: {c:?}"
    );
    assert!(
        c.redirected_bytes() > 0,
        "{test}: nothing was redirected: {c:?}"
    );
}

/// The scripted ADS server (tests/xds/ads_server.py: grpcio on the reference protobufs, in the
/// venv scripts/setup.sh makes) on 127.0.0.1:port; killed on drop. None when the venv is
/// missing outside CI.
pub struct AdsServer {
    child: std::process::Child,
    log: PathBuf,
}

impl AdsServer {
    pub fn python() -> Option<PathBuf> {
        let p = std::env::var_os("MESHLANE_XDS_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/opt/meshlane-tools/xds-venv/bin/python".into());
        if p.exists() {
            return Some(p);
        }
        assert!(
            std::env::var("CI").is_err(),
            "{} is missing: scripts/setup.sh installs grpcio and xds-protos there",
            p.display()
        );
        eprintln!("skipping: no {}", p.display());
        None
    }

    /// Starts the server with `script` (see ads_server.py) and waits until it listens.
    pub fn start(
        python: &std::path::Path,
        port: u16,
        script: &serde_json::Value,
        tag: &str,
    ) -> AdsServer {
        use std::io::BufRead;
        let dir =
            std::env::temp_dir().join(format!("meshlane-xds-{}-{port}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script_path = dir.join("script.json");
        std::fs::write(&script_path, script.to_string()).unwrap();
        let log = dir.join("requests.jsonl");
        let _ = std::fs::remove_file(&log);
        let mut child = std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/xds/ads_server.py"
            ))
            .arg("--port")
            .arg(port.to_string())
            .arg("--script")
            .arg(&script_path)
            .arg("--log")
            .arg(&log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the ADS server");
        let mut line = String::new();
        io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the ADS server did not start");
        AdsServer { child, log }
    }

    /// Every request the server has logged, in order (a line still being written is left out).
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map_while(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AdsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Istio's two capture listeners plus an ordinary per-service one, for an ADS script.
pub fn istio_listeners(outbound: u16, inbound: u16, transparent: bool) -> serde_json::Value {
    serde_json::json!([
        {"name": "virtualOutbound", "port": outbound, "use_original_dst": true},
        {"name": "virtualInbound", "port": inbound, "transparent": transparent,
         "listener_filters": ["envoy.filters.listener.original_dst", "envoy.filters.listener.tls_inspector"]},
        {"name": "0.0.0.0_9080", "port": 9080}
    ])
}

/// The socket family the apps of a run use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// AF_INET on both sides.
    V4,
    /// AF_INET6 sockets carrying IPv4: the server on `[::]` (IPV6_V6ONLY off), the client
    /// dialling `::ffff:a.b.c.d`.
    V4Mapped,
    /// True IPv6 between the pods' IPv6 addresses.
    V6,
}

pub const FAMILIES: [Family; 3] = [Family::V4, Family::V4Mapped, Family::V6];
/// How many times each case runs per mode, for counts that scale with the runs.
pub const RUNS: u64 = FAMILIES.len() as u64;

/// The mesh as one family's apps see it.
pub struct Net<'a> {
    pub mesh: &'a minimesh::TwoPods,
    pub family: Family,
}

impl Net<'_> {
    /// Where the client app dials the server app's `port`.
    pub fn dst(&self, port: u16) -> std::net::SocketAddr {
        let server = &self.mesh.server;
        match self.family {
            Family::V4 => std::net::SocketAddrV4::new(server.ip, port).into(),
            Family::V4Mapped => {
                std::net::SocketAddrV6::new(server.ip.to_ipv6_mapped(), port, 0, 0).into()
            }
            Family::V6 => {
                std::net::SocketAddrV6::new(server.ip6.expect("dual stack"), port, 0, 0).into()
            }
        }
    }

    /// Where the server app listens for `port`: its IPv4 address, or `[::]` (Go's default).
    pub fn listen_addr(&self, port: u16) -> std::net::SocketAddr {
        match self.family {
            Family::V4 => std::net::SocketAddrV4::new(self.mesh.server.ip, port).into(),
            _ => std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0).into(),
        }
    }

    pub fn echo(&self, port: u16) -> minimesh::EchoServer {
        let ns = &self.mesh.server.ns;
        match self.family {
            Family::V4 => minimesh::EchoServer::spawn(
                ns,
                std::net::SocketAddrV4::new(self.mesh.server.ip, port),
            ),
            _ => minimesh::EchoServer::spawn_dual_stack(ns, port),
        }
        .unwrap()
    }

    pub fn connect(&self, dst: std::net::SocketAddr) -> io::Result<TcpStream> {
        connect(&self.mesh.client.ns, dst)
    }
}

/// `path` opened for appending (created if missing): a log that several daemons in turn write.
pub fn append_to(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}
