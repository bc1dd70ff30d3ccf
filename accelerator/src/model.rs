//! The daemon's picture of the pods on this node: the single input to policy.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

/// An IPv4 prefix as written by Istio (`10.0.0.0/8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
        let prefix: u8 = prefix
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} has a bad prefix length"))?;
        if prefix > 32 {
            return Err(format!("{s:?} has a prefix length over 32"));
        }
        Ok(Cidr { addr, prefix })
    }
}

/// Istio's includeOutboundIPRanges: everything (`*`, the default) or a list.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum OutboundRanges {
    #[default]
    All,
    Only(Vec<Cidr>),
}

/// How the sidecar intercepts traffic (`sidecar.istio.io/interceptionMode`, istio-init `-m`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Interception {
    /// iptables REDIRECT: what meshlane accelerates.
    #[default]
    Redirect,
    /// TPROXY: Envoy runs as uid 0 / gid 1337 and inbound does not come from 127.0.0.6; the
    /// datapath's pairing rules do not hold, so policy declines it.
    Tproxy,
}

/// One meshed pod and how its sidecar captures traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// namespace/name, for logs and status.
    pub name: String,
    /// Kubernetes UID, when a source knows it (empty otherwise).
    pub uid: String,
    /// Pod IPs (v4 and v6), when a source knows them.
    pub ips: Vec<IpAddr>,
    pub interception: Interception,
    /// Path of the pod's network namespace (`/run/netns/X`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub inbound_bind: Ipv4Addr,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    /// Istio's includeInboundPorts when it is a port list: inbound capture covers only these
    /// (and istio-iptables then ignores `exclude_inbound_ports`). Empty: `*`, every port but
    /// the excluded ones.
    pub include_inbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
    pub include_outbound: OutboundRanges,
    pub accelerate_outbound: bool,
    pub accelerate_inbound: bool,
    /// The pod's own redirect mode (`meshlane.io/mode`, the pod list's `mode`); None follows
    /// the node's (`--mode`). An opt-in is still refused where the probe finds it unsafe.
    pub mode: Option<crate::mode::Mode>,
}

impl Pod {
    /// A pod whose sidecar was injected with Istio's defaults: uid/gid 1337, 15001/15006,
    /// inbound from 127.0.0.6, nothing excluded, both hops accelerated.
    pub fn with_istio_defaults(name: impl Into<String>, netns: impl Into<PathBuf>) -> Pod {
        Pod {
            name: name.into(),
            uid: String::new(),
            ips: Vec::new(),
            interception: Interception::Redirect,
            netns: netns.into(),
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            inbound_bind: Ipv4Addr::new(127, 0, 0, 6),
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            include_inbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            include_outbound: OutboundRanges::All,
            accelerate_outbound: true,
            accelerate_inbound: true,
            mode: None,
        }
    }
}
