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
    /// `--native-nftables`: the same capture as Istio's nftables table ([`capture_nftables`])
    /// instead of iptables rules.
    pub native_nftables: bool,
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
            native_nftables: false,
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

/// Installs [`capture_rules`] in `ns` with `iptables-restore` (or, with
/// `native_nftables`, [`capture_nftables`] for IPv4 with `nft`). The nat table
/// of the namespace is replaced as a whole, so calling it again with another
/// config is not cumulative. The rules die with the namespace.
pub fn install_istio_capture(ns: &Netns, cfg: &CaptureConfig) -> Result<()> {
    if cfg.native_nftables {
        return install_istio_nftables_capture(ns, cfg, false);
    }
    restore(ns, "iptables-restore", &capture_rules(cfg))
}

/// A dual-stack pod's whole capture: IPv4 and IPv6 rules, and `::6` on `lo`.
pub fn install_istio_capture_dual(ns: &Netns, cfg: &CaptureConfig) -> Result<()> {
    if cfg.native_nftables {
        return install_istio_nftables_capture(ns, cfg, true);
    }
    install_istio_capture(ns, cfg)?;
    install_istio_capture6(ns, cfg)
}

/// The IPv6 half of a dual-stack pod's capture, as istio-iptables writes it with IPv6
/// enabled: `::6/128` on `lo` (IPv6 does not route a loopback range, so Envoy could not bind
/// it otherwise) and [`capture_rules6`] with `ip6tables-restore`.
/// With `native_nftables` the IPv4-only table [`install_istio_capture`] wrote is replaced by the
/// dual-stack one.
pub fn install_istio_capture6(ns: &Netns, cfg: &CaptureConfig) -> Result<()> {
    if cfg.native_nftables {
        exec::run(
            ns.cmd("nft")
                .args(["delete", "table", "inet", "istio-proxy-nat"]),
        )
        .with_context(|| format!("replacing the nftables capture in {}", ns.name()))?;
        return install_istio_nftables_capture(ns, cfg, true);
    }
    add_inbound_bind6(ns)?;
    restore(ns, "ip6tables-restore", &capture_rules6(cfg))
}

fn add_inbound_bind6(ns: &Netns) -> Result<()> {
    exec::run(
        ns.cmd("ip")
            .args(["-6", "addr", "add", "::6/128", "dev", "lo"]),
    )
    .with_context(|| format!("adding ::6 to lo in {}", ns.name()))?;
    Ok(())
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

/// The `nft -f` input for `cfg` in Istio's native nftables mode (`values.global.nativeNftables`,
/// istio-iptables `--native-nftables`): one `inet istio-proxy-nat` table for both families, with
/// the chains and rule order of Istio's nftables capture (checked against the shapes of its
/// `tools/istio-nftables` golden files): lower-case chain names, base chains on the nat hooks,
/// ports as sets, `skuid`/`skgid` for the owner match, and IPv6 twins of the address rules when
/// `dual_stack`.
pub fn capture_nftables(cfg: &CaptureConfig, dual_stack: bool) -> String {
    const T: &str = "inet istio-proxy-nat";
    let mut r = String::new();
    let mut line = |s: String| {
        r.push_str(&s);
        r.push('\n');
    };
    line(format!("add table {T}"));
    line(format!(
        "add chain {T} prerouting {{ type nat hook prerouting priority -100 ; }}"
    ));
    line(format!(
        "add chain {T} output {{ type nat hook output priority -100 ; }}"
    ));
    for chain in [
        "istio-inbound",
        "istio-redirect",
        "istio-in-redirect",
        "istio-output",
    ] {
        line(format!("add chain {T} {chain}"));
    }
    line(format!(
        "add rule {T} istio-inbound meta l4proto tcp tcp dport {INBOUND_TUNNEL_PORT} return"
    ));
    line(format!(
        "add rule {T} istio-redirect meta l4proto tcp redirect to :{}",
        cfg.outbound_port
    ));
    line(format!(
        "add rule {T} istio-in-redirect meta l4proto tcp redirect to :{}",
        cfg.inbound_port
    ));

    // Inbound.
    line(format!(
        "add rule {T} prerouting meta l4proto tcp jump istio-inbound"
    ));
    match &cfg.inbound_ports {
        InboundPorts::All => {
            let mut excluded = vec![22];
            excluded.extend(&cfg.exclude_inbound_ports);
            line(format!(
                "add rule {T} istio-inbound meta l4proto tcp tcp dport {} return",
                nft_set(&excluded)
            ));
            line(format!(
                "add rule {T} istio-inbound meta l4proto tcp jump istio-in-redirect"
            ));
        }
        InboundPorts::List(ports) => {
            for port in ports {
                line(format!(
                    "add rule {T} istio-inbound meta l4proto tcp tcp dport {port} jump istio-in-redirect"
                ));
            }
        }
    }

    // Outbound.
    let families: &[(&str, &Family)] = if dual_stack {
        &[("ip", &IPV4), ("ip6", &IPV6)]
    } else {
        &[("ip", &IPV4)]
    };
    line(format!("add rule {T} output jump istio-output"));
    if !cfg.exclude_outbound_ports.is_empty() {
        line(format!(
            "add rule {T} istio-output meta l4proto tcp tcp dport {} return",
            nft_set(&cfg.exclude_outbound_ports)
        ));
    }
    for (ip, fam) in families {
        line(format!(
            "add rule {T} istio-output oifname lo {ip} saddr {} return",
            fam.inbound_passthrough_src
        ));
    }
    for (kind, id) in [("skuid", cfg.proxy_uid), ("skgid", cfg.proxy_gid)] {
        for (ip, fam) in families {
            line(format!(
                "add rule {T} istio-output oifname lo meta l4proto tcp {ip} daddr != {} tcp dport != {INBOUND_TUNNEL_PORT} {kind} {id} jump istio-in-redirect",
                fam.host_loopback
            ));
        }
        line(format!(
            "add rule {T} istio-output oifname lo {kind} != {id} return"
        ));
        line(format!("add rule {T} istio-output {kind} {id} return"));
    }
    for (ip, fam) in families {
        line(format!(
            "add rule {T} istio-output {ip} daddr {} return",
            fam.host_loopback
        ));
    }
    for (a, len) in &cfg.exclude_outbound_cidrs {
        line(format!(
            "add rule {T} istio-output ip daddr {a}/{len} return"
        ));
    }
    if dual_stack {
        for (a, len) in &cfg.exclude_outbound_cidrs6 {
            line(format!(
                "add rule {T} istio-output ip6 daddr {a}/{len} return"
            ));
        }
    }
    line(format!("add rule {T} istio-output jump istio-redirect"));
    r
}

/// `53` or `{ 53, 15008 }`.
fn nft_set(ports: &[u16]) -> String {
    match ports {
        [one] => one.to_string(),
        many => format!(
            "{{ {} }}",
            many.iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Installs [`capture_nftables`] in `ns` with `nft -f -`, and no iptables rules: a pod of
/// Istio's native nftables mode (with `dual_stack`, `::6` on `lo` too). The table dies with
/// the namespace.
pub fn install_istio_nftables_capture(
    ns: &Netns,
    cfg: &CaptureConfig,
    dual_stack: bool,
) -> Result<()> {
    if dual_stack {
        add_inbound_bind6(ns)?;
    }
    let rules = capture_nftables(cfg, dual_stack);
    exec::run_with_stdin(ns.cmd("nft").args(["-f", "-"]), Some(&rules)).with_context(|| {
        format!(
            "installing istio nftables capture in {}:\n{rules}",
            ns.name()
        )
    })?;
    Ok(())
}
