//! istio-init's traffic capture: the nat rules that steer a pod's TCP traffic
//! through its sidecar, installed with the real `iptables-restore` inside a
//! pod's namespace.
//!
//! The rules mirror what `istio-iptables` of the Istio 1.2x series
//! (`tools/istio-iptables/pkg/capture/run.go`, checked against its golden
//! files) produces for `--inbound-interception-mode REDIRECT` without DNS
//! capture, including the rule order, which matters: meshlane must
//! keep exactly the semantics these rules give (which connections Envoy sees,
//! which bypass it). Two deliberate choices where releases differ:
//! - `-A OUTPUT -p tcp -j ISTIO_OUTPUT` and TCP-only outbound port
//!   exclusions, as before Istio started capturing UDP there (later releases
//!   jump for every protocol and add a `-p udp` twin per excluded port);
//! - `-p tcp --dport 22 -j RETURN` in ISTIO_INBOUND when all inbound ports
//!   are captured, as older istio-iptables hard-coded, so a pod's ssh is
//!   never captured (current releases only exclude what `-d` lists).
//!
//! A dual-stack pod (istio-iptables with IPv6 enabled) gets the same rules in ip6tables
//! ([`install_istio_capture6`]), with `::1` and `::6` for 127.0.0.1 and 127.0.0.6 and the IPv6
//! entries of the CIDR lists, and `::6` on `lo` for Envoy's inbound passthrough to bind.

use crate::exec;
use crate::netns::Netns;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Istio's HBONE tunnel port; always bypasses capture.
const INBOUND_TUNNEL_PORT: u16 = 15008;
/// The addresses the rules name, per family: the loopback CIDR that Envoy-aware apps use
/// explicitly (never captured), and the source of Envoy's inbound passthrough connections.
struct Family {
    host_loopback: &'static str,
    inbound_passthrough_src: &'static str,
}

const IPV4: Family = Family {
    host_loopback: "127.0.0.1/32",
    inbound_passthrough_src: "127.0.0.6/32",
};

const IPV6: Family = Family {
    host_loopback: "::1/128",
    inbound_passthrough_src: "::6/128",
};

/// Which inbound ports are redirected to the sidecar (`-b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    /// `*`: everything except the excluded ports (Istio's default).
    All,
    /// Only these ports.
    List(Vec<u16>),
}

/// The knobs of `istio-iptables` that matter for REDIRECT mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// `-u`: traffic of this uid is the proxy's own and is not captured again.
    pub proxy_uid: u32,
    /// `-g`: same for the gid.
    pub proxy_gid: u32,
    /// `-p`: where outbound traffic is redirected (Envoy's 15001).
    pub outbound_port: u16,
    /// `-z`: where inbound traffic is redirected (Envoy's 15006).
    pub inbound_port: u16,
    /// `-o`: destination ports that bypass the outbound capture.
    pub exclude_outbound_ports: Vec<u16>,
    /// `-d`: destination ports that bypass the inbound capture.
    pub exclude_inbound_ports: Vec<u16>,
    /// `-x`: destination CIDRs that bypass the outbound capture.
    pub exclude_outbound_cidrs: Vec<(Ipv4Addr, u8)>,
    /// `-x`'s IPv6 entries, for [`install_istio_capture6`].
    pub exclude_outbound_cidrs6: Vec<(Ipv6Addr, u8)>,
    /// `-b`: which inbound ports are captured.
    pub inbound_ports: InboundPorts,
}

impl Default for CaptureConfig {
    /// What the sidecar injector passes to istio-init by default.
    fn default() -> Self {
        CaptureConfig {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_outbound_ports: Vec::new(),
            // Envoy's prometheus, health and merged-metrics ports.
            exclude_inbound_ports: vec![15090, 15021, 15020],
            exclude_outbound_cidrs: Vec::new(),
            exclude_outbound_cidrs6: Vec::new(),
            inbound_ports: InboundPorts::All,
        }
    }
}

/// The `iptables-restore` input for `cfg` (nat table only).
pub fn capture_rules(cfg: &CaptureConfig) -> String {
    let cidrs: Vec<String> = cfg
        .exclude_outbound_cidrs
        .iter()
        .map(|(a, len)| format!("{a}/{len}"))
        .collect();
    rules(cfg, &IPV4, &cidrs)
}

/// The `ip6tables-restore` input for `cfg` (nat table only).
pub fn capture_rules6(cfg: &CaptureConfig) -> String {
    let cidrs: Vec<String> = cfg
        .exclude_outbound_cidrs6
        .iter()
        .map(|(a, len)| format!("{a}/{len}"))
        .collect();
    rules(cfg, &IPV6, &cidrs)
}

fn rules(cfg: &CaptureConfig, fam: &Family, exclude_cidrs: &[String]) -> String {
    let (loopback, passthrough) = (fam.host_loopback, fam.inbound_passthrough_src);
    let mut r = String::new();
    let mut line = |s: String| {
        r.push_str(&s);
        r.push('\n');
    };
    line("*nat".into());
    for chain in [
        "ISTIO_INBOUND",
        "ISTIO_REDIRECT",
        "ISTIO_IN_REDIRECT",
        "ISTIO_OUTPUT",
    ] {
        line(format!(":{chain} - [0:0]"));
    }
    line(format!(
        "-A ISTIO_INBOUND -p tcp --dport {INBOUND_TUNNEL_PORT} -j RETURN"
    ));
    line(format!(
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        cfg.outbound_port
    ));
    line(format!(
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        cfg.inbound_port
    ));

    // Inbound.
    line("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
    match &cfg.inbound_ports {
        InboundPorts::All => {
            line("-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN".into());
            for port in &cfg.exclude_inbound_ports {
                line(format!("-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN"));
            }
            line("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
        }
        InboundPorts::List(ports) => {
            for port in ports {
                line(format!(
                    "-A ISTIO_INBOUND -p tcp --dport {port} -j ISTIO_IN_REDIRECT"
                ));
            }
        }
    }

    // Outbound.
    line("-A OUTPUT -p tcp -j ISTIO_OUTPUT".into());
    // Port exclusions come first so they win over the loopback rules below.
    for port in &cfg.exclude_outbound_ports {
        line(format!("-A ISTIO_OUTPUT -p tcp --dport {port} -j RETURN"));
    }
    // Envoy's inbound passthrough connections (bound to 127.0.0.6) to the app.
    line(format!("-A ISTIO_OUTPUT -o lo -s {passthrough} -j RETURN"));
    for (kind, id) in [("uid", cfg.proxy_uid), ("gid", cfg.proxy_gid)] {
        // Envoy calling its own pod's address (app -> VIP -> Envoy -> pod IP):
        // send it through Envoy's inbound side.
        line(format!(
            "-A ISTIO_OUTPUT -o lo ! -d {loopback} -p tcp ! --dport {INBOUND_TUNNEL_PORT} \
             -m owner --{kind}-owner {id} -j ISTIO_IN_REDIRECT"
        ));
        // The app calling itself over lo by pod IP: leave it alone.
        line(format!(
            "-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {id} -j RETURN"
        ));
        // Everything else Envoy sends goes out directly (no redirect loop).
        line(format!(
            "-A ISTIO_OUTPUT -m owner --{kind}-owner {id} -j RETURN"
        ));
    }
    line(format!("-A ISTIO_OUTPUT -d {loopback} -j RETURN"));
    // Istio appends the CIDR exclusions after the loopback RETURN.
    for cidr in exclude_cidrs {
        line(format!("-A ISTIO_OUTPUT -d {cidr} -j RETURN"));
    }
    line("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into());
    line("COMMIT".into());
    r
}

/// Installs [`capture_rules`] in `ns` with `iptables-restore`. The nat table
/// of the namespace is replaced as a whole, so calling it again with another
/// config is not cumulative. The rules die with the namespace.
pub fn install_istio_capture(ns: &Netns, cfg: &CaptureConfig) -> Result<()> {
    restore(ns, "iptables-restore", &capture_rules(cfg))
}

/// The IPv6 half of a dual-stack pod's capture, as istio-iptables writes it with IPv6
/// enabled: `::6/128` on `lo` (IPv6 does not route a loopback range, so Envoy could not bind
/// it otherwise) and [`capture_rules6`] with `ip6tables-restore`.
pub fn install_istio_capture6(ns: &Netns, cfg: &CaptureConfig) -> Result<()> {
    exec::run(
        ns.cmd("ip")
            .args(["-6", "addr", "add", "::6/128", "dev", "lo"]),
    )
    .with_context(|| format!("adding ::6 to lo in {}", ns.name()))?;
    restore(ns, "ip6tables-restore", &capture_rules6(cfg))
}

fn restore(ns: &Netns, program: &str, rules: &str) -> Result<()> {
    let mut cmd = ns.cmd(program);
    // Wait for the xtables lock if the legacy backend is in use (it is global,
    // not per netns); a no-op with the nft backend.
    cmd.arg("--wait=10");
    exec::run_with_stdin(&mut cmd, Some(rules)).with_context(|| {
        let mut msg = format!("installing istio capture rules in {}:\n", ns.name());
        let _ = write!(msg, "{rules}");
        msg
    })?;
    Ok(())
}
