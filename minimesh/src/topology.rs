//! Ready-made node shapes built from the pieces of this crate, so tests, benchmarks and the demo
//! build the same thing: a client pod and a server pod, each with istio-init's capture rules and a
//! sidecar stand-in, joined by a veth pair.
//!
//! ```text
//!  client pod (10.<n>.0.1)                      server pod (10.<n>.0.2)
//!  app --REDIRECT 15001--> relay --veth--> REDIRECT 15006 --> relay --127.0.0.6--> app
//! ```
//! Each `TwoPods` lives in its own pair of namespaces, so two of them may use the same addresses.
//! [`TwoPods::dual_stack`] also gives both pods an IPv6 address (`fd00:<n>::1`, `fd00:<n>::2`),
//! Istio's ip6tables capture and sidecars that take IPv6 too.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};

use crate::{
    capture::install_istio_capture_dual, install_istio_capture, veth::add_addr6, veth_link,
    CaptureConfig, Netns, Relay, RelayConfig,
};

/// A dual-stack pod's IPv6 address: `fd00:<subnet>::<host>`, beside its `10.<subnet>.0.<host>`.
pub fn pod_ip6(subnet: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, subnet.into(), 0, 0, 0, 0, 0, host)
}

/// One pod: its namespace, address, capture rules and sidecar.
#[derive(Debug)]
pub struct Pod {
    // Field order is drop order: the sidecar's threads stop before the namespace goes.
    pub relay: Option<Relay>,
    pub capture: CaptureConfig,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address in a dual-stack pair.
    pub ip6: Option<Ipv6Addr>,
    pub ns: Netns,
}

/// A client pod and a server pod linked by `eth0` on both sides.
#[derive(Debug)]
pub struct TwoPods {
    pub client: Pod,
    pub server: Pod,
}

impl TwoPods {
    /// Builds both pods on subnet `10.<subnet>.0.0/24` with the given capture rules and a relay in
    /// each, running as the proxy uid/gid of its capture config.
    pub fn new(subnet: u8, client: CaptureConfig, server: CaptureConfig) -> Result<TwoPods> {
        Self::build(subnet, client, server, false)
    }

    /// [`TwoPods::new`] with dual-stack pods: each also has an IPv6 address on `eth0`, the
    /// IPv6 half of istio-init's capture, and a sidecar listening on both families that binds
    /// `::6` for the inbound hop of IPv6 connections.
    pub fn dual_stack(subnet: u8, client: CaptureConfig, server: CaptureConfig) -> Result<TwoPods> {
        Self::build(subnet, client, server, true)
    }

    fn build(
        subnet: u8,
        client: CaptureConfig,
        server: CaptureConfig,
        dual_stack: bool,
    ) -> Result<TwoPods> {
        let client_ns = Netns::new(if dual_stack { "cli6" } else { "cli" })?;
        let server_ns = Netns::new(if dual_stack { "srv6" } else { "srv" })?;
        let (cip, sip) = (
            Ipv4Addr::new(10, subnet, 0, 1),
            Ipv4Addr::new(10, subnet, 0, 2),
        );
        veth_link(&client_ns, "eth0", cip, &server_ns, "eth0", sip, 24).context("pod link")?;
        let (cip6, sip6) = if dual_stack {
            let (c, s) = (pod_ip6(subnet, 1), pod_ip6(subnet, 2));
            add_addr6(&client_ns, "eth0", c, 64)?;
            add_addr6(&server_ns, "eth0", s, 64)?;
            (Some(c), Some(s))
        } else {
            (None, None)
        };
        let client = Pod::start(client_ns, cip, cip6, client)?;
        let server = Pod::start(server_ns, sip, sip6, server)?;
        Ok(TwoPods { client, server })
    }
}

impl Pod {
    /// A pod with istio-init's capture rules but no sidecar process: for callers that run their
    /// own (a real Envoy, see [`crate::envoy::EnvoyPods`]).
    pub fn without_sidecar(ns: Netns, ip: Ipv4Addr, capture: CaptureConfig) -> Result<Pod> {
        install_istio_capture(&ns, &capture)?;
        Ok(Pod {
            relay: None,
            capture,
            ip,
            ip6: None,
            ns,
        })
    }

    fn start(
        ns: Netns,
        ip: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
        capture: CaptureConfig,
    ) -> Result<Pod> {
        if ip6.is_some() {
            install_istio_capture_dual(&ns, &capture)?;
        } else {
            install_istio_capture(&ns, &capture)?;
        }
        let relay = Relay::spawn(
            &ns,
            RelayConfig {
                uid: capture.proxy_uid,
                gid: capture.proxy_gid,
                outbound_port: capture.outbound_port,
                inbound_port: capture.inbound_port,
                inbound_bind6: ip6.map(|_| Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
                ..RelayConfig::default()
            },
        )?;
        Ok(Pod {
            relay: Some(relay),
            capture,
            ip,
            ip6,
            ns,
        })
    }

    /// The pod's sidecar statistics.
    pub fn relay_stats(&self) -> crate::RelayStats {
        self.relay.as_ref().map(Relay::stats).unwrap_or_default()
    }
}

/// Scenario "no mesh": a client and a server namespace joined by a veth pair, with no capture
/// rules and no sidecar, so apps talk to each other directly. Benchmarks compare it with
/// [`crate::EnvoyPods`] on the same machine to measure the sidecar tax.
#[derive(Debug)]
pub struct BarePods {
    pub client_ip: Ipv4Addr,
    pub server_ip: Ipv4Addr,
    pub client_ip6: Ipv6Addr,
    pub server_ip6: Ipv6Addr,
    pub client: Netns,
    pub server: Netns,
}

impl BarePods {
    /// Both namespaces on `10.<subnet>.0.0/24` (client `.1`, server `.2`), and on
    /// `fd00:<subnet>::/64` (`::1`, `::2`).
    pub fn new(subnet: u8) -> Result<BarePods> {
        let client = Netns::new("bcli")?;
        let server = Netns::new("bsrv")?;
        let (client_ip, server_ip) = (
            Ipv4Addr::new(10, subnet, 0, 1),
            Ipv4Addr::new(10, subnet, 0, 2),
        );
        veth_link(&client, "eth0", client_ip, &server, "eth0", server_ip, 24)
            .context("bare pod link")?;
        let (client_ip6, server_ip6) = (pod_ip6(subnet, 1), pod_ip6(subnet, 2));
        add_addr6(&client, "eth0", client_ip6, 64)?;
        add_addr6(&server, "eth0", server_ip6, 64)?;
        Ok(BarePods {
            client_ip,
            server_ip,
            client_ip6,
            server_ip6,
            client,
            server,
        })
    }
}
