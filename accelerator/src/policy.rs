//! Model -> map entries: a pod becomes a `PodPolicy` keyed by its namespace cookie; a desired set
//! is diffed against what the map holds so a reconcile writes only what changed.

use std::{collections::BTreeMap, net::IpAddr};

use meshlane_common::{
    Addr, Cidr4, Cidr6, PodPolicy, MAX_CIDRS, MAX_CIDRS6, MAX_PORTS, POLICY_INBOUND,
    POLICY_INBOUND_CAPTURED, POLICY_INBOUND_PORTS_LISTED, POLICY_INCLUDE_CIDRS,
    POLICY_INCLUDE_CIDRS6, POLICY_IPV6, POLICY_OUTBOUND,
};

use crate::model::{Cidr, OutboundRanges, Pod};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("pod {pod}: {field} lists {n} entries; at most {max} fit the datapath")]
    TooMany {
        pod: String,
        field: &'static str,
        n: usize,
        max: usize,
    },
    #[error("pod {pod}: {field} contains port 0")]
    PortZero { pod: String, field: &'static str },
    #[error("pod {0}: interception mode TPROXY is not accelerated (Envoy runs as uid 0 and inbound does not come from 127.0.0.6, so the pairing rules do not hold)")]
    Tproxy(String),
}

/// The datapath entry for `pod`.
pub fn pod_policy(pod: &Pod) -> Result<PodPolicy, Error> {
    if pod.interception == crate::model::Interception::Tproxy {
        return Err(Error::Tproxy(pod.name.clone()));
    }
    let mut p = PodPolicy::istio_default();
    p.proxy_uid = pod.proxy_uid;
    p.proxy_gid = pod.proxy_gid;
    p.outbound_port = pod.outbound_port;
    p.inbound_port = pod.inbound_port;
    p.inbound_bind_ip4 = u32::from_ne_bytes(pod.inbound_bind.octets());
    p.inbound_bind_ip6 = addr(IpAddr::V6(pod.inbound_bind6));
    p.flags = 0;
    if pod.capture_ipv6 {
        p.flags |= POLICY_IPV6;
    }
    if pod.accelerate_outbound {
        p.flags |= POLICY_OUTBOUND;
    }
    if pod.accelerate_inbound {
        p.flags |= POLICY_INBOUND | POLICY_INBOUND_CAPTURED;
    }
    fill_ports(
        &mut p.exclude_outbound_ports,
        &pod.exclude_outbound_ports,
        pod,
        "excludeOutboundPorts",
    )?;
    // istio-iptables captures only the listed ports when includeInboundPorts is a list, and
    // consults the exclusions only for `*`.
    if pod.include_inbound_ports.is_empty() {
        fill_ports(
            &mut p.inbound_ports,
            &pod.exclude_inbound_ports,
            pod,
            "excludeInboundPorts",
        )?;
    } else {
        p.flags |= POLICY_INBOUND_PORTS_LISTED;
        fill_ports(
            &mut p.inbound_ports,
            &pod.include_inbound_ports,
            pod,
            "includeInboundPorts",
        )?;
    }
    p.n_exclude_cidrs = fill_cidrs(
        &mut p.exclude_outbound_cidrs,
        &pod.exclude_outbound_cidrs,
        pod,
        "excludeOutboundIPRanges",
    )?;
    p.n_exclude_cidrs6 = fill_cidrs6(
        &mut p.exclude_outbound_cidrs6,
        &pod.exclude_outbound_cidrs,
        pod,
        "excludeOutboundIPRanges (IPv6 entries)",
    )?;
    if let OutboundRanges::Only(list) = &pod.include_outbound {
        // Each family's rules get the list's entries of that family; one without any captures
        // nothing of that family (istio-iptables writes no redirect rule for it).
        p.flags |= POLICY_INCLUDE_CIDRS | POLICY_INCLUDE_CIDRS6;
        p.n_include_cidrs = fill_cidrs(
            &mut p.include_outbound_cidrs,
            list,
            pod,
            "includeOutboundIPRanges",
        )?;
        p.n_include_cidrs6 = fill_cidrs6(
            &mut p.include_outbound_cidrs6,
            list,
            pod,
            "includeOutboundIPRanges (IPv6 entries)",
        )?;
    }
    Ok(p)
}

/// An address as the datapath keys it ([`Addr`]: network-order words, IPv4 v4-mapped).
pub fn addr(ip: IpAddr) -> Addr {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// The address a datapath [`Addr`] stands for: IPv4 when it is v4-mapped.
pub fn ip_of(a: Addr) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn fill_ports(
    dst: &mut [u16; MAX_PORTS],
    src: &[u16],
    pod: &Pod,
    field: &'static str,
) -> Result<(), Error> {
    if src.len() > MAX_PORTS {
        return Err(Error::TooMany {
            pod: pod.name.clone(),
            field,
            n: src.len(),
            max: MAX_PORTS,
        });
    }
    for (slot, port) in dst.iter_mut().zip(src) {
        if *port == 0 {
            return Err(Error::PortZero {
                pod: pod.name.clone(),
                field,
            });
        }
        *slot = *port;
    }
    Ok(())
}

/// The IPv4 entries of `src` into `dst`; their count.
fn fill_cidrs(
    dst: &mut [Cidr4; MAX_CIDRS],
    src: &[Cidr],
    pod: &Pod,
    field: &'static str,
) -> Result<u16, Error> {
    let v4: Vec<(std::net::Ipv4Addr, u8)> = src
        .iter()
        .filter_map(|c| match c.addr {
            IpAddr::V4(a) => Some((a, c.prefix)),
            IpAddr::V6(_) => None,
        })
        .collect();
    if v4.len() > MAX_CIDRS {
        return Err(Error::TooMany {
            pod: pod.name.clone(),
            field,
            n: v4.len(),
            max: MAX_CIDRS,
        });
    }
    for (slot, (a, prefix)) in dst.iter_mut().zip(&v4) {
        let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
        *slot = Cidr4 {
            addr: u32::from_ne_bytes(a.octets()),
            mask: u32::from_ne_bytes(mask.to_be_bytes()),
        };
    }
    Ok(v4.len() as u16)
}

/// The IPv6 entries of `src` into `dst`; their count.
fn fill_cidrs6(
    dst: &mut [Cidr6; MAX_CIDRS6],
    src: &[Cidr],
    pod: &Pod,
    field: &'static str,
) -> Result<u16, Error> {
    let v6: Vec<&Cidr> = src.iter().filter(|c| !c.is_ipv4()).collect();
    if v6.len() > MAX_CIDRS6 {
        return Err(Error::TooMany {
            pod: pod.name.clone(),
            field,
            n: v6.len(),
            max: MAX_CIDRS6,
        });
    }
    for (slot, c) in dst.iter_mut().zip(&v6) {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(c.prefix))
            .unwrap_or(0);
        *slot = Cidr6 {
            addr: addr(c.addr),
            mask: addr(IpAddr::V6(std::net::Ipv6Addr::from(mask))),
        };
    }
    Ok(v6.len() as u16)
}

/// What a reconcile must write and remove to turn `current` into `desired`.
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    pub upsert: Vec<(u64, PodPolicy)>,
    pub remove: Vec<u64>,
}

/// A pod's policy flags while one of its memory groups is tight: no hop is paired (the hop
/// bits go; the capture facts stay, so the daemon can restore them unchanged) and sk_msg moves
/// its redirected directions to TCP (docs/DESIGN.md, "Memory").
pub fn memory_tight(flags: u32) -> u32 {
    use meshlane_common::{
        POLICY_INBOUND, POLICY_INTO_APP, POLICY_MEMORY_TIGHT, POLICY_OUTBOUND, POLICY_SIDECAR_HOP,
    };
    (flags & !(POLICY_OUTBOUND | POLICY_INBOUND | POLICY_INTO_APP | POLICY_SIDECAR_HOP))
        | POLICY_MEMORY_TIGHT
}

pub fn diff(current: &BTreeMap<u64, PodPolicy>, desired: &BTreeMap<u64, PodPolicy>) -> Diff {
    let mut d = Diff::default();
    for (k, v) in desired {
        if current.get(k) != Some(v) {
            d.upsert.push((*k, *v));
        }
    }
    d.remove = current
        .keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect();
    d
}

/// The node's pod-address map for the sidecar hop, from each accelerated pod's namespace cookie
/// and addresses. An address that two pods claim (separate networks reusing addresses, or
/// a stale reading) names no pod for sure, so it is left out and returned apart: a sidecar
/// connection to it is not stamped, which is always safe.
pub fn pod_addresses<'a>(
    pods: impl IntoIterator<Item = (u64, &'a [IpAddr])>,
) -> (BTreeMap<IpAddr, u64>, Vec<IpAddr>) {
    let mut seen: BTreeMap<IpAddr, Option<u64>> = BTreeMap::new();
    for (cookie, ips) in pods {
        for ip in ips {
            seen.entry(*ip)
                .and_modify(|c| {
                    if *c != Some(cookie) {
                        *c = None
                    }
                })
                .or_insert(Some(cookie));
        }
    }
    let unique = seen
        .iter()
        .filter_map(|(ip, c)| Some((*ip, (*c)?)))
        .collect();
    let ambiguous = seen
        .into_iter()
        .filter_map(|(ip, c)| c.is_none().then_some(ip))
        .collect();
    (unique, ambiguous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        let mut p = Pod::with_istio_defaults("ns/p", "/run/netns/x");
        p.exclude_outbound_ports = vec![9000];
        p.exclude_outbound_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        p
    }

    #[test]
    fn an_inbound_port_list_replaces_the_exclusions_as_istio_iptables_does() {
        let mut pod = pod();
        pod.exclude_inbound_ports = vec![15090, 15008];
        let p = pod_policy(&pod).unwrap();
        assert_eq!(p.flags & POLICY_INBOUND_PORTS_LISTED, 0);
        assert_eq!(&p.inbound_ports[..3], &[15090, 15008, 0]);
        assert_ne!(p.flags & POLICY_INBOUND_CAPTURED, 0);
        pod.include_inbound_ports = vec![8080, 9090];
        let p = pod_policy(&pod).unwrap();
        assert_ne!(p.flags & POLICY_INBOUND_PORTS_LISTED, 0);
        assert_eq!(&p.inbound_ports[..3], &[8080, 9090, 0]);
        pod.include_inbound_ports = vec![0];
        let e = pod_policy(&pod).unwrap_err().to_string();
        assert!(e.contains("includeInboundPorts"), "{e}");
    }

    #[test]
    fn cidrs_match_like_the_kernel_sees_addresses() {
        let p = pod_policy(&pod()).unwrap();
        assert_eq!(p.n_exclude_cidrs, 1);
        let inside = u32::from_ne_bytes([10, 1, 2, 3]);
        let outside = u32::from_ne_bytes([11, 1, 2, 3]);
        assert!(p.exclude_outbound_cidrs[0].contains(inside));
        assert!(!p.exclude_outbound_cidrs[0].contains(outside));
        assert_eq!(p.exclude_outbound_ports[0], 9000);
        assert_eq!(p.flags & POLICY_INCLUDE_CIDRS, 0);
    }

    #[test]
    fn each_family_gets_its_own_ranges_and_addresses_map_like_the_kernel_shows_them() {
        let mut pod = pod();
        pod.exclude_outbound_cidrs = ["10.0.0.0/8", "fd00::/8", "2001:db8::1"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        pod.include_outbound = OutboundRanges::Only(vec!["192.168.0.0/16".parse().unwrap()]);
        let p = pod_policy(&pod).unwrap();
        assert_eq!((p.n_exclude_cidrs, p.n_exclude_cidrs6), (1, 2));
        // An include list with IPv4 ranges only captures no IPv6 destination.
        assert_eq!((p.n_include_cidrs, p.n_include_cidrs6), (1, 0));
        assert_ne!(p.flags & POLICY_INCLUDE_CIDRS6, 0);
        assert_eq!(
            p.flags & POLICY_IPV6,
            0,
            "IPv6 capture is a fact, off by default"
        );
        let inside = addr("fd12::1".parse().unwrap());
        let outside = addr("fe00::1".parse().unwrap());
        assert!(p.exclude_outbound_cidrs6[0].contains(&inside));
        assert!(!p.exclude_outbound_cidrs6[0].contains(&outside));
        assert!(p.exclude_outbound_cidrs6[1].contains(&addr("2001:db8::1".parse().unwrap())));
        assert!(!p.exclude_outbound_cidrs6[1].contains(&addr("2001:db8::2".parse().unwrap())));
        pod.capture_ipv6 = true;
        let p = pod_policy(&pod).unwrap();
        assert_ne!(p.flags & POLICY_IPV6, 0);
        assert_eq!(ip_of(p.inbound_bind_ip6), "::6".parse::<IpAddr>().unwrap());
        // IPv4 is v4-mapped, as the kernel shows a dual-stack socket's IPv4 peer.
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            addr(v4),
            meshlane_common::v4_mapped(u32::from_ne_bytes([10, 1, 2, 3]))
        );
        assert_eq!(ip_of(addr(v4)), v4);
        pod.exclude_outbound_cidrs = (0..9)
            .map(|i| format!("fd00:{i}::/32").parse().unwrap())
            .collect();
        let e = pod_policy(&pod).unwrap_err().to_string();
        assert!(e.contains("excludeOutboundIPRanges (IPv6 entries)"), "{e}");
    }

    #[test]
    fn too_many_ports_names_the_field() {
        let mut p = pod();
        p.exclude_outbound_ports = (1..=40).collect();
        let err = pod_policy(&p).unwrap_err();
        assert!(err.to_string().contains("excludeOutboundPorts"), "{err}");
    }

    #[test]
    fn tproxy_pods_are_declined_by_policy() {
        let mut p = pod();
        p.interception = crate::model::Interception::Tproxy;
        assert!(matches!(pod_policy(&p), Err(Error::Tproxy(_))));
    }

    #[test]
    fn diff_writes_only_changes() {
        let a = pod_policy(&pod()).unwrap();
        let mut b = a;
        b.proxy_uid = 1;
        let current = BTreeMap::from([(1, a), (2, a)]);
        let desired = BTreeMap::from([(1, a), (3, b)]);
        let d = diff(&current, &desired);
        assert_eq!(d.remove, vec![2]);
        assert_eq!(d.upsert.len(), 1);
        assert_eq!(d.upsert[0].0, 3);
    }

    #[test]
    fn an_address_two_pods_claim_is_left_out() {
        let (a, b, shared): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            "10.0.0.9".parse().unwrap(),
        );
        let (map, ambiguous) =
            pod_addresses([(1, &[a, shared][..]), (2, &[b, shared][..]), (1, &[a][..])]);
        assert_eq!(map, BTreeMap::from([(a, 1), (b, 2)]));
        assert_eq!(ambiguous, vec![shared]);
    }
}
