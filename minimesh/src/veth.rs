//! Wiring pods together with veth pairs.
//!
//! Both ends are created directly inside their namespaces
//! (`ip link add NAME netns A type veth peer name NAME netns B`): the kernel
//! builds each device in its target namespace, so no temporary name ever
//! exists in the host namespace where it could collide with another test
//! process or leak if we died between "create" and "move". The pair is
//! destroyed with either namespace.

use crate::exec;
use crate::netns::Netns;
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;

/// Linux `IFNAMSIZ` minus the NUL.
const MAX_IFNAME: usize = 15;

fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_IFNAME
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        bail!("interface name {name:?} must be 1..={MAX_IFNAME} bytes without '/', ':' or spaces");
    }
    Ok(())
}

fn check_prefix(prefix_len: u8) -> Result<()> {
    if prefix_len > 32 {
        bail!("IPv4 prefix length {prefix_len} is larger than 32");
    }
    Ok(())
}

/// Creates a veth pair with `a_if` in `a` and `b_if` in `b`, assigns the
/// addresses and brings both ends up.
pub fn veth_link(
    a: &Netns,
    a_if: &str,
    a_addr: Ipv4Addr,
    b: &Netns,
    b_if: &str,
    b_addr: Ipv4Addr,
    prefix_len: u8,
) -> Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    check_prefix(prefix_len)?;
    exec::run(exec::command("ip").args([
        "link",
        "add",
        "name",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]))
    .with_context(|| format!("creating veth {}/{a_if} <-> {}/{b_if}", a.name(), b.name()))?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        add_addr(ns, ifname, addr, prefix_len)?;
        exec::run(exec::command("ip").args(["-n", ns.name(), "link", "set", ifname, "up"]))
            .with_context(|| format!("bringing {}/{ifname} up", ns.name()))?;
    }
    Ok(())
}

/// Adds an IPv6 address to `ifname` in `ns`, usable at once (`nodad`: a tentative address
/// could not be bound or reached during duplicate address detection).
pub fn add_addr6(ns: &Netns, ifname: &str, addr: std::net::Ipv6Addr, prefix_len: u8) -> Result<()> {
    check_ifname(ifname)?;
    if prefix_len > 128 {
        bail!("IPv6 prefix length {prefix_len} is larger than 128");
    }
    let cidr = format!("{addr}/{prefix_len}");
    exec::run(exec::command("ip").args([
        "-n",
        ns.name(),
        "-6",
        "addr",
        "add",
        &cidr,
        "dev",
        ifname,
        "nodad",
    ]))
    .with_context(|| format!("adding {cidr} to {}/{ifname}", ns.name()))?;
    Ok(())
}

/// Adds another address to `ifname` in `ns`, e.g. several service
/// destinations served by one pod.
pub fn add_addr(ns: &Netns, ifname: &str, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
    check_ifname(ifname)?;
    check_prefix(prefix_len)?;
    let cidr = format!("{addr}/{prefix_len}");
    exec::run(exec::command("ip").args(["-n", ns.name(), "addr", "add", &cidr, "dev", ifname]))
        .with_context(|| format!("adding {cidr} to {}/{ifname}", ns.name()))?;
    Ok(())
}
