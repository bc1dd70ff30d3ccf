//! `minimesh`: an Istio-shaped node on one machine, for privileged tests,
//! benchmarks and the demo of meshlane.
//!
//! meshlane accelerates traffic between Istio sidecars with eBPF sockmaps. To
//! prove that it keeps Istio's semantics we need the real shape of an Istio pod
//! without Kubernetes: a network namespace per pod ([`Netns`]), veth links
//! between pods ([`veth_link`]), the exact nat rules that `istio-init` installs
//! ([`install_istio_capture`]), a sidecar that sits where Envoy sits and runs
//! as the proxy uid/gid so the owner matches in those rules work ([`Relay`]),
//! a workload ([`EchoServer`]), a cgroup to attach cgroup-scoped BPF programs
//! to ([`Cgroup`]) and a packet tap that shows which SYNs carried meshlane's TCP
//! option ([`SynCapture`]).
//!
//! Rules every type here follows:
//! - everything created is torn down on `Drop`, so a panicking test leaves
//!   nothing behind (iptables rules live inside the namespaces and die with
//!   them);
//! - every kernel-visible name contains the pid and a process-wide counter, so
//!   parallel test processes never collide;
//! - traffic only flows between namespaces this crate created.
//!
//! Everything needs root (`CAP_SYS_ADMIN`, `CAP_NET_ADMIN`); tests should start
//! with [`privileged_or_skip`].

pub mod apps;
pub mod capture;
pub mod cgroup;
pub mod creds;
pub mod envoy;
mod exec;
pub mod grpc;
pub mod mtls;
pub mod netns;
pub mod nginx;
mod process;
pub mod relay;
mod sock;
pub mod syncap;
pub mod topology;
pub mod veth;

pub use apps::{dest_header, EchoServer};
pub use capture::{
    capture_nftables, capture_rules, install_istio_capture, install_istio_nftables_capture,
    CaptureConfig, InboundPorts,
};
pub use cgroup::{cgroup2_root, Cgroup, CgroupGuard};
pub use creds::become_thread_uid_gid;
pub use envoy::{Envoy, EnvoyConfig, EnvoyPods, OutboundService, Protocol};
pub use netns::{enter_netns_current_thread, Netns};
pub use nginx::Nginx;
pub use relay::{Relay, RelayConfig, RelayStats};
pub use syncap::{SynCapture, SynRecord};
pub use topology::{BarePods, Pod, TwoPods};
pub use veth::{add_addr, veth_link};

use std::sync::atomic::{AtomicU64, Ordering};

/// Process-wide counter that makes names unique within one process; the pid
/// makes them unique across the test processes cargo runs in parallel.
static NAME_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `<pid>-<n>`: the suffix every kernel-visible name gets.
pub(crate) fn unique_suffix() -> String {
    let n = NAME_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{}", std::process::id(), n)
}

/// Fails with a clear message unless the effective uid is 0, because every
/// piece of this crate needs root (netns, veth, iptables, cgroups, setns).
pub fn require_root() -> anyhow::Result<()> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        anyhow::bail!(
            "minimesh needs root (network namespaces, veth, iptables, cgroups); running as euid {euid}"
        );
    }
    Ok(())
}

/// Decides whether a privileged test can run here.
///
/// Returns true when we are root and can really create a network namespace.
/// Otherwise a developer's unprivileged `cargo test` should not fail, so it
/// prints `SKIP <name>: <reason>` to stderr and returns false; but on CI
/// (`CI=true`) a silent skip would hide a broken environment, so it panics.
pub fn privileged_or_skip(test_name: &str) -> bool {
    let probe = require_root().and_then(|()| Netns::new("probe").map(drop));
    let reason = match probe {
        Ok(()) => return true,
        Err(e) => format!("{e:#}"),
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test_name}: privileged test cannot run although CI=true: {reason}");
    }
    eprintln!("SKIP {test_name}: {reason}");
    false
}

#[cfg(test)]
mod tests;
