//! Model -> map entries: a pod becomes a `PodPolicy` keyed by its namespace cookie; a desired set
//! is diffed against what the map holds so a reconcile writes only what changed.

use std::{collections::BTreeMap, net::Ipv4Addr};

use meshlane_common::{
    Cidr4, PodPolicy, MAX_CIDRS, MAX_PORTS, POLICY_INBOUND, POLICY_INBOUND_CAPTURED,
    POLICY_INBOUND_PORTS_LISTED, POLICY_INCLUDE_CIDRS, POLICY_OUTBOUND,
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
    p.flags = 0;
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
    if let OutboundRanges::Only(list) = &pod.include_outbound {
        p.flags |= POLICY_INCLUDE_CIDRS;
        p.n_include_cidrs = fill_cidrs(
            &mut p.include_outbound_cidrs,
            list,
            pod,
            "includeOutboundIPRanges",
        )?;
    }
    Ok(p)
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

fn fill_cidrs(
    dst: &mut [Cidr4; MAX_CIDRS],
    src: &[Cidr],
    pod: &Pod,
    field: &'static str,
) -> Result<u16, Error> {
    if src.len() > MAX_CIDRS {
        return Err(Error::TooMany {
            pod: pod.name.clone(),
            field,
            n: src.len(),
            max: MAX_CIDRS,
        });
    }
    for (slot, c) in dst.iter_mut().zip(src) {
        let mask: u32 = if c.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - c.prefix)
        };
        *slot = Cidr4 {
            addr: u32::from_ne_bytes(c.addr.octets()),
            mask: u32::from_ne_bytes(mask.to_be_bytes()),
        };
    }
    Ok(src.len() as u16)
}

/// What a reconcile must write and remove to turn `current` into `desired`.
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    pub upsert: Vec<(u64, PodPolicy)>,
    pub remove: Vec<u64>,
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
/// and IPv4 addresses. An address that two pods claim (separate networks reusing addresses, or
/// a stale reading) names no pod for sure, so it is left out and returned apart: a sidecar
/// connection to it is not stamped, which is always safe.
pub fn pod_addresses<'a>(
    pods: impl IntoIterator<Item = (u64, &'a [Ipv4Addr])>,
) -> (BTreeMap<Ipv4Addr, u64>, Vec<Ipv4Addr>) {
    let mut seen: BTreeMap<Ipv4Addr, Option<u64>> = BTreeMap::new();
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
        Pod {
            name: "ns/p".into(),
            uid: String::new(),
            ips: Vec::new(),
            interception: crate::model::Interception::Redirect,
            netns: "/run/netns/x".into(),
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            inbound_bind: Ipv4Addr::new(127, 0, 0, 6),
            exclude_outbound_ports: vec![9000],
            exclude_inbound_ports: vec![],
            include_inbound_ports: vec![],
            exclude_outbound_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            include_outbound: OutboundRanges::All,
            accelerate_outbound: true,
            accelerate_inbound: true,
            mode: None,
        }
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
        let (a, b, shared) = (
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 9),
        );
        let (map, ambiguous) =
            pod_addresses([(1, &[a, shared][..]), (2, &[b, shared][..]), (1, &[a][..])]);
        assert_eq!(map, BTreeMap::from([(a, 1), (b, 2)]));
        assert_eq!(ambiguous, vec![shared]);
    }
}
