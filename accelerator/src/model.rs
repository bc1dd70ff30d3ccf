//! The daemon's picture of the pods on this node: the single input to policy.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

/// An IPv4 or IPv6 prefix as written by Istio (`10.0.0.0/8`, `fd00::/8`); a bare address is
/// the whole-length prefix. Istio's range settings mix both families in one list, and
/// istio-iptables writes each entry to the rules of its own family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} has a bad prefix length"))?,
        };
        if prefix > max {
            return Err(format!("{s:?} has a prefix length over {max}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
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

/// Istio's IPv6 inbound source address (istio-iptables adds it to `lo`; Envoy's inbound
/// passthrough binds it).
pub const ISTIO_INBOUND_BIND6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

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
    /// The sidecar's IPv6 inbound source address (Istio: `::6`), used with `capture_ipv6`.
    pub inbound_bind6: Ipv6Addr,
    /// The pod's ip6tables capture IPv6 like its iptables capture IPv4 (istio-iptables with
    /// IPv6 enabled, in a dual-stack or IPv6 pod). Without it the pod's true IPv6 hops are not
    /// captured, so none is paired.
    pub capture_ipv6: bool,
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
    /// inbound from 127.0.0.6, nothing excluded, both hops accelerated, IPv4 capture only.
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
            inbound_bind6: ISTIO_INBOUND_BIND6,
            capture_ipv6: false,
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
