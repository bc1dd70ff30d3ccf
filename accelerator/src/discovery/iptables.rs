//! A pod's capture, read back from the rules istio-init (or istio-cni) left in its network
//! namespace: `iptables-save` output in, the model's capture fields out.
//!
//! The node is the ground truth: these rules decide where the kernel sends a connection, so they
//! win over anything Envoy's configuration says. Parsing is tolerant of rules Istio adds that
//! cannot change which TCP connections reach the sidecar (DNS capture, UDP twins, loopback-only
//! rules), strict about anything that could: a rule the datapath's prediction cannot mirror turns
//! the outbound hop off (with the rule named) rather than risk stamping a connection iptables
//! does not redirect.
//!
//! The datapath predicts, for a process that is not the proxy, "captured" unless the destination
//! is loopback or the pod's own address, its port is excluded, its address is in an excluded
//! CIDR, or an include list exists and misses it. Exclusions are checked first, so an exclusion
//! Istio lists after an include only makes the prediction more careful, never wrong.

use std::{collections::BTreeMap, io, process::Command};

use super::clip;
use crate::model::{Cidr, OutboundRanges};

/// What the nat (and mangle) rules say about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// `ISTIO_OUTPUT -m owner --uid-owner N -j RETURN`, every one of them.
    pub proxy_uids: Vec<u32>,
    /// `ISTIO_OUTPUT -m owner --gid-owner N -j RETURN`.
    pub proxy_gids: Vec<u32>,
    /// `ISTIO_REDIRECT -j REDIRECT --to-ports P`.
    pub outbound_port: u16,
    /// `ISTIO_IN_REDIRECT -j REDIRECT --to-ports P`.
    pub inbound_port: u16,
    /// TCP destination ports ISTIO_OUTPUT returns (excludeOutboundPorts), plus ports whose
    /// traffic is redirected somewhere other than the sidecar (DNS capture).
    pub exclude_outbound_ports: Vec<u16>,
    /// Ports ISTIO_INBOUND returns (excludeInboundPorts, 15008, and 22 on older releases).
    pub exclude_inbound_ports: Vec<u16>,
    /// `ISTIO_INBOUND --dport P -j ISTIO_IN_REDIRECT` rules without a catch-all jump after
    /// them: includeInboundPorts as a port list. Empty: `*` (or no inbound capture at all).
    pub include_inbound_ports: Vec<u16>,
    /// ISTIO_INBOUND jumps to ISTIO_IN_REDIRECT for some traffic (an empty includeInboundPorts
    /// writes no such rule: nothing is captured inbound).
    pub inbound_captured: bool,
    /// `ISTIO_OUTPUT -d CIDR -j RETURN` outside loopback (excludeOutboundIPRanges).
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// `-d CIDR -j ISTIO_REDIRECT` rules (includeOutboundIPRanges) or a catch-all jump.
    pub include_outbound: OutboundRanges,
    /// Why the datapath cannot mirror the outbound capture exactly, naming the rule; the
    /// outbound hop must then stay on TCP (the inbound hop pairs by exact 4-tuple and is safe).
    pub outbound_unsupported: Option<String>,
}

/// Why no capture could be read from a dump.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No ISTIO_* chain in the nat table: istio-init never ran here (not a meshed pod, or a
    /// gateway).
    #[error("not captured: the nat table has no ISTIO_* chains")]
    NotCaptured,
    /// Inbound interception by TPROXY (mangle table): the sidecar connects to the app from the
    /// client's own address, not from 127.0.0.6, and meshlane does not model that.
    #[error("TPROXY mode: {rule}")]
    Tproxy { rule: String },
    /// A line that is not iptables-save syntax, or a value that does not parse.
    #[error("line {line}: {field}: {message} ({text:?})")]
    Syntax {
        line: usize,
        field: &'static str,
        message: String,
        text: String,
    },
    /// The rules lack something every Istio capture has, or say two things at once.
    #[error("{field}: {message}")]
    Capture {
        field: &'static str,
        message: String,
    },
}

/// The iptables backends, as istio-iptables tries them: its rules are in whichever of the two
/// the image that ran istio-init used (nft on current distributions, legacy on older nodes and
/// images), and `iptables-save` shows only one of them.
pub const BACKENDS: [&str; 2] = ["iptables-nft-save", "iptables-legacy-save"];
/// The same for IPv6: istio-iptables writes a dual-stack or IPv6 pod's IPv6 capture with
/// ip6tables of the same backend.
pub const BACKENDS6: [&str; 2] = ["ip6tables-nft-save", "ip6tables-legacy-save"];

/// `iptables-save` for whichever backend holds Istio's rules in `netns`: with `program` the
/// plain `iptables-save`, each of [`BACKENDS`] is read and the first with an `ISTIO_` chain
/// wins (else the first that ran, so "not captured" is still reported); any other `program`
/// (`--iptables-save` style configuration) is used alone. Returns the program that answered.
pub fn dump_any(netns: &std::fs::File, program: &str) -> io::Result<(String, String)> {
    dump_first(netns, program, "iptables-save", &BACKENDS)
}

/// [`dump_any`] for the IPv6 rules: `ip6tables-save` of each of [`BACKENDS6`], or `program`
/// with `iptables` in its name turned into `ip6tables`.
pub fn dump_any6(netns: &std::fs::File, program: &str) -> io::Result<(String, String)> {
    dump_first(
        netns,
        &program.replacen("iptables", "ip6tables", 1),
        "ip6tables-save",
        &BACKENDS6,
    )
}

fn dump_first(
    netns: &std::fs::File,
    program: &str,
    plain: &str,
    backends: &[&str],
) -> io::Result<(String, String)> {
    if program != plain {
        return dump(netns, program).map(|d| (program.to_string(), d));
    }
    let mut first: Option<io::Result<(String, String)>> = None;
    for &backend in backends {
        let got = dump(netns, backend);
        if let Ok(d) = &got {
            if d.contains(":ISTIO_") {
                return Ok((backend.to_string(), d.clone()));
            }
        }
        let ok = got.is_ok();
        if first.as_ref().is_none_or(|f| f.is_err() && ok) {
            first = Some(got.map(|d| (backend.to_string(), d)));
        }
    }
    // Neither backend binary: the plain one, whatever it is.
    match first {
        Some(Ok(found)) => Ok(found),
        _ => dump(netns, program).map(|d| (program.to_string(), d)),
    }
}

/// Runs `iptables-save` (nat and mangle tables) inside the network namespace `netns`.
pub fn dump(netns: &std::fs::File, program: &str) -> io::Result<String> {
    let mut out = String::new();
    for table in ["nat", "mangle"] {
        out.push_str(&run_in(netns, program, &["-t", table])?);
    }
    Ok(out)
}

/// Runs `program args` with its stdout captured, in the network namespace `netns`: the child
/// forked from a thread inside it starts there.
pub(crate) fn run_in(netns: &std::fs::File, program: &str, args: &[&str]) -> io::Result<String> {
    let output = crate::node::in_netns(netns, || {
        Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
    })??;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One `-A CHAIN ...` rule, split into options.
#[derive(Debug)]
struct Rule<'a> {
    line: usize,
    text: &'a str,
    table: String,
    chain: String,
    opts: Vec<Opt>,
    target: Option<String>,
    /// Options after `-j TARGET` (`--to-ports 15001`).
    target_opts: Vec<Opt>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Opt {
    negated: bool,
    name: String,
    value: Option<String>,
}

impl Rule<'_> {
    fn opt(&self, names: &[&str]) -> Option<&Opt> {
        self.opts.iter().find(|o| names.contains(&o.name.as_str()))
    }

    fn target_value(&self, names: &[&str]) -> Option<&str> {
        self.target_opts
            .iter()
            .find(|o| names.contains(&o.name.as_str()))
            .and_then(|o| o.value.as_deref())
    }

    fn syntax(&self, field: &'static str, message: impl Into<String>) -> Error {
        Error::Syntax {
            line: self.line,
            field,
            message: clip(&message.into()),
            text: clip(self.text),
        }
    }

    /// The options that restrict which packets match, without module loads (`-m tcp`) and
    /// comments.
    fn matchers(&self) -> impl Iterator<Item = &Opt> {
        self.opts
            .iter()
            .filter(|o| o.name != "-m" && o.name != "--comment")
    }

    fn is_udp_only(&self) -> bool {
        self.opt(&["-p", "--protocol"])
            .is_some_and(|o| !o.negated && o.value.as_deref() == Some("udp"))
    }

    /// Only matches packets leaving through `lo`.
    fn is_loopback_only(&self) -> bool {
        self.opt(&["-o", "--out-interface"])
            .is_some_and(|o| !o.negated && o.value.as_deref() == Some("lo"))
    }
}

/// Chain names declared per table.
type Chains = BTreeMap<String, Vec<String>>;

/// Splits iptables-save text into rules, tracking the table.
fn rules(text: &str) -> Result<(Vec<Rule<'_>>, Chains), Error> {
    let mut table = String::new();
    let mut chains = Chains::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') || t == "COMMIT" {
            continue;
        }
        let syntax = |field: &'static str, message: &str| Error::Syntax {
            line,
            field,
            message: clip(message),
            text: clip(raw),
        };
        if let Some(name) = t.strip_prefix('*') {
            table = name.trim().to_string();
            continue;
        }
        if table.is_empty() {
            return Err(syntax("table", "a rule or chain before any *table line"));
        }
        if let Some(decl) = t.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            chains
                .entry(table.clone())
                .or_default()
                .push(name.to_string());
            continue;
        }
        let tokens = tokenize(t).map_err(|m| syntax("quoting", &m))?;
        let mut it = tokens.into_iter().peekable();
        match it.next().as_deref() {
            Some("-N") => {
                let name = it.next().ok_or_else(|| syntax("-N", "no chain name"))?;
                chains.entry(table.clone()).or_default().push(name);
                continue;
            }
            Some("-A") | Some("-I") => {}
            _ => return Err(syntax("rule", "expected -A, -N, :CHAIN, *table or COMMIT")),
        }
        let chain = it.next().ok_or_else(|| syntax("-A", "no chain name"))?;
        // `-I CHAIN 2 ...`: an insert position (istio-iptables' own listing uses it).
        if it.peek().is_some_and(|t| t.parse::<u32>().is_ok()) {
            it.next();
        }
        let mut rule = Rule {
            line,
            text: raw,
            table: table.clone(),
            chain,
            opts: Vec::new(),
            target: None,
            target_opts: Vec::new(),
        };
        let mut negated = false;
        while let Some(tok) = it.next() {
            if tok == "!" {
                negated = true;
                continue;
            }
            if !tok.starts_with('-') {
                return Err(syntax("rule", &format!("unexpected {tok:?}")));
            }
            let value = match it.peek() {
                Some(v) if !v.starts_with('-') && v != "!" => it.next(),
                _ => None,
            };
            if tok == "-j" || tok == "--jump" || tok == "-g" || tok == "--goto" {
                if rule.target.is_some() {
                    return Err(syntax("-j", "two targets"));
                }
                rule.target = Some(value.ok_or_else(|| syntax("-j", "no target"))?);
            } else if rule.target.is_some() {
                rule.target_opts.push(Opt {
                    negated,
                    name: tok,
                    value,
                });
            } else {
                rule.opts.push(Opt {
                    negated,
                    name: tok,
                    value,
                });
            }
            negated = false;
        }
        out.push(rule);
    }
    Ok((out, chains))
}

/// Whitespace-separated tokens; iptables-save double-quotes values with spaces (comments).
fn tokenize(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_token = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    out.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if in_token {
        out.push(cur);
    }
    Ok(out)
}

fn port(rule: &Rule, field: &'static str, s: &str) -> Result<u16, Error> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(rule.syntax(field, format!("{s:?} is not a port"))),
        Ok(p) => Ok(p),
    }
}

/// `--dport P`, `--dports a,b,c:d`. Ranges are expanded (the datapath lists single ports).
fn ports(rule: &Rule, field: &'static str, s: &str) -> Result<Vec<u16>, Error> {
    let mut out = Vec::new();
    for part in s.split(',') {
        match part.split_once(':') {
            Some((a, b)) => {
                let (a, b) = (port(rule, field, a)?, port(rule, field, b)?);
                if b < a || usize::from(b - a) >= meshlane_common::MAX_PORTS {
                    return Err(rule.syntax(
                        field,
                        format!("range {part} is wider than the datapath's port list"),
                    ));
                }
                out.extend(a..=b);
            }
            None => out.push(port(rule, field, part)?),
        }
    }
    Ok(out)
}

fn cidr(rule: &Rule, field: &'static str, s: &str) -> Result<Cidr, Error> {
    s.parse::<Cidr>().map_err(|m| rule.syntax(field, m))
}

/// Inside 127.0.0.0/8, or `::1` itself (IPv6 has no loopback range).
fn is_loopback(c: &Cidr) -> bool {
    match c.addr {
        std::net::IpAddr::V4(a) => c.prefix >= 8 && a.octets()[0] == 127,
        std::net::IpAddr::V6(a) => c.prefix == 128 && a.is_loopback(),
    }
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

/// The single `REDIRECT --to-ports P` of an Istio redirect chain.
fn redirect_port(rules: &[&Rule], chain: &str, field: &'static str) -> Result<u16, Error> {
    let mut found: Option<u16> = None;
    for r in rules
        .iter()
        .filter(|r| r.table == "nat" && r.chain == chain)
    {
        if r.target.as_deref() != Some("REDIRECT") || r.is_udp_only() {
            continue;
        }
        let v = r
            .target_value(&["--to-ports", "--to-port"])
            .ok_or_else(|| r.syntax(field, "REDIRECT without --to-ports"))?;
        let p = port(r, field, v)?;
        match found {
            Some(q) if q != p => {
                return Err(Error::Capture {
                    field,
                    message: format!("{chain} redirects to both {q} and {p}"),
                })
            }
            _ => found = Some(p),
        }
    }
    found.ok_or_else(|| Error::Capture {
        field,
        message: format!("{chain} has no REDIRECT --to-ports rule"),
    })
}

/// Why a pod's IPv6 capture (`v6`, from ip6tables) cannot be mirrored with its IPv4 settings
/// (`v4`): the datapath keeps one set of ports, owners and capture ports per pod, and
/// istio-iptables writes the same ones for both families. None when they agree.
pub fn ipv6_differs(v4: &Capture, v6: &Capture) -> Option<String> {
    if let Some(why) = &v6.outbound_unsupported {
        return Some(why.clone());
    }
    let same_shape = matches!(
        (&v4.include_outbound, &v6.include_outbound),
        (OutboundRanges::All, OutboundRanges::All)
            | (OutboundRanges::Only(_), OutboundRanges::Only(_))
    );
    let fields = [
        ("proxy uids", v4.proxy_uids == v6.proxy_uids),
        ("proxy gids", v4.proxy_gids == v6.proxy_gids),
        (
            "outbound capture port",
            v4.outbound_port == v6.outbound_port,
        ),
        ("inbound capture port", v4.inbound_port == v6.inbound_port),
        (
            "excluded outbound ports",
            v4.exclude_outbound_ports == v6.exclude_outbound_ports,
        ),
        (
            "excluded inbound ports",
            v4.exclude_inbound_ports == v6.exclude_inbound_ports,
        ),
        (
            "included inbound ports",
            v4.include_inbound_ports == v6.include_inbound_ports
                && v4.inbound_captured == v6.inbound_captured,
        ),
        ("outbound include list", same_shape),
    ];
    fields
        .iter()
        .find(|(_, same)| !same)
        .map(|(what, _)| format!("ip6tables and iptables differ in their {what}"))
}

/// Reads the capture from `iptables-save` output (nat table required, mangle optional); the
/// same parser reads `ip6tables-save` output, whose addresses are IPv6.
pub fn parse(text: &str) -> Result<Capture, Error> {
    let (all, chains) = rules(text)?;
    let nat_chains = chains.get("nat").cloned().unwrap_or_default();
    let has_istio = nat_chains.iter().any(|c| c.starts_with("ISTIO_"))
        || all
            .iter()
            .any(|r| r.table == "nat" && r.chain.starts_with("ISTIO_"));
    // TPROXY first: in that mode the nat table still carries the outbound chains.
    if let Some(r) = all
        .iter()
        .find(|r| r.table == "mangle" && r.target.as_deref() == Some("TPROXY"))
    {
        return Err(Error::Tproxy {
            rule: clip(r.text.trim()),
        });
    }
    if !has_istio {
        return Err(Error::NotCaptured);
    }
    let rules: Vec<&Rule> = all.iter().collect();
    let outbound_port = redirect_port(&rules, "ISTIO_REDIRECT", "ISTIO_REDIRECT --to-ports")?;
    let inbound_port = redirect_port(&rules, "ISTIO_IN_REDIRECT", "ISTIO_IN_REDIRECT --to-ports")?;

    let mut cap = Capture {
        proxy_uids: Vec::new(),
        proxy_gids: Vec::new(),
        outbound_port,
        inbound_port,
        exclude_outbound_ports: Vec::new(),
        exclude_inbound_ports: Vec::new(),
        include_inbound_ports: Vec::new(),
        inbound_captured: false,
        exclude_outbound_cidrs: Vec::new(),
        include_outbound: OutboundRanges::Only(Vec::new()),
        outbound_unsupported: None,
    };
    inbound(&rules, &mut cap)?;
    outbound(&rules, &mut cap)?;
    if cap.proxy_uids.is_empty() && cap.proxy_gids.is_empty() {
        return Err(Error::Capture {
            field: "ISTIO_OUTPUT --uid-owner/--gid-owner",
            message: "no owner match returns the proxy's own traffic (it would loop)".into(),
        });
    }
    if cap.proxy_uids.len() > 1 || cap.proxy_gids.len() > 1 {
        let why = format!(
            "several proxy owners are exempted (uids {:?}, gids {:?}); the datapath models one",
            cap.proxy_uids, cap.proxy_gids
        );
        unsupported(&mut cap, why);
    }
    Ok(cap)
}

fn unsupported(cap: &mut Capture, why: String) {
    if cap.outbound_unsupported.is_none() {
        cap.outbound_unsupported = Some(clip(&why));
    }
}

/// ISTIO_INBOUND: with includeInboundPorts `*` (Istio's default) RETURNs for the excluded ports
/// and then a catch-all jump to ISTIO_IN_REDIRECT; with a port list one jump per port and no
/// catch-all (istio-iptables ignores the exclusions then).
fn inbound(rules: &[&Rule], cap: &mut Capture) -> Result<(), Error> {
    let mut catch_all = false;
    for r in rules
        .iter()
        .filter(|r| r.table == "nat" && r.chain == "ISTIO_INBOUND")
    {
        let target = r.target.as_deref();
        if r.is_udp_only() || !matches!(target, Some("RETURN" | "ISTIO_IN_REDIRECT")) {
            continue;
        }
        let Some(o) = r.opt(&["--dport", "--destination-port", "--dports"]) else {
            if target == Some("ISTIO_IN_REDIRECT") {
                catch_all = true;
            }
            continue;
        };
        if o.negated {
            continue;
        }
        let v = o
            .value
            .as_deref()
            .ok_or_else(|| r.syntax("ISTIO_INBOUND --dport", "no value"))?;
        let list = if target == Some("RETURN") {
            &mut cap.exclude_inbound_ports
        } else {
            cap.inbound_captured = true;
            &mut cap.include_inbound_ports
        };
        for p in ports(r, "ISTIO_INBOUND --dport", v)? {
            push_unique(list, p);
        }
    }
    if catch_all {
        cap.inbound_captured = true;
        cap.include_inbound_ports.clear();
    }
    Ok(())
}

/// Walks OUTPUT up to its jump into ISTIO_OUTPUT, then ISTIO_OUTPUT (and the DNS chain it
/// jumps to) in order, as the kernel would for a TCP connection of an app process to a
/// non-loopback destination.
fn outbound(rules: &[&Rule], cap: &mut Capture) -> Result<(), Error> {
    let mut jumped = false;
    for r in rules
        .iter()
        .filter(|r| r.table == "nat" && r.chain == "OUTPUT")
    {
        if r.target.as_deref() == Some("ISTIO_OUTPUT") {
            if r.matchers()
                .any(|o| !(o.name == "-p" && !o.negated && o.value.as_deref() == Some("tcp")))
            {
                unsupported(
                    cap,
                    format!(
                        "OUTPUT jumps to ISTIO_OUTPUT only for some traffic: {}",
                        r.text.trim()
                    ),
                );
            }
            jumped = true;
            break;
        }
        if r.is_udp_only() || r.is_loopback_only() {
            continue;
        }
        unsupported(
            cap,
            format!("OUTPUT has a rule before ISTIO_OUTPUT: {}", r.text.trim()),
        );
    }
    if !jumped {
        unsupported(
            cap,
            "OUTPUT never jumps to ISTIO_OUTPUT: no outbound capture".into(),
        );
    }
    let mut include = Vec::new();
    let mut catch_all = false;
    walk_output(rules, "ISTIO_OUTPUT", cap, &mut include, &mut catch_all, 0)?;
    cap.include_outbound = if catch_all {
        OutboundRanges::All
    } else {
        if include.is_empty() {
            unsupported(
                cap,
                "ISTIO_OUTPUT never jumps to ISTIO_REDIRECT: no outbound capture".into(),
            );
        }
        OutboundRanges::Only(include)
    };
    Ok(())
}

fn walk_output(
    rules: &[&Rule],
    chain: &str,
    cap: &mut Capture,
    include: &mut Vec<Cidr>,
    catch_all: &mut bool,
    depth: u32,
) -> Result<(), Error> {
    for r in rules
        .iter()
        .filter(|r| r.table == "nat" && r.chain == chain)
    {
        if *catch_all {
            // Unreachable for TCP after an unconditional jump to the redirect.
            break;
        }
        if r.is_udp_only() || r.is_loopback_only() {
            continue;
        }
        let target = r.target.as_deref().unwrap_or("");
        let owner = r.opt(&["--uid-owner", "--gid-owner"]);
        if let Some(o) = owner {
            let v = o
                .value
                .as_deref()
                .ok_or_else(|| r.syntax("ISTIO_OUTPUT --uid-owner", "no value"))?;
            let id: u32 = v.parse().map_err(|_| {
                r.syntax("ISTIO_OUTPUT --uid-owner", format!("{v:?} is not a number"))
            })?;
            let only_owner = r.matchers().all(|m| m.name == o.name);
            if !o.negated && target == "RETURN" && only_owner {
                if o.name == "--uid-owner" {
                    push_unique(&mut cap.proxy_uids, id);
                } else {
                    push_unique(&mut cap.proxy_gids, id);
                }
            } else if o.negated || target != "RETURN" {
                unsupported(cap, format!("owner rule not on lo: {}", r.text.trim()));
            }
            // A narrower owner RETURN (with ports or addresses) only concerns the proxy.
            continue;
        }
        let dport = r.opt(&["--dport", "--destination-port", "--dports"]);
        let dst = r.opt(&["-d", "--destination"]);
        let other = r.matchers().find(|m| {
            !matches!(
                m.name.as_str(),
                "-p" | "--protocol"
                    | "--dport"
                    | "--destination-port"
                    | "--dports"
                    | "-d"
                    | "--destination"
            )
        });
        let proto_ok = r
            .opt(&["-p", "--protocol"])
            .is_none_or(|p| !p.negated && p.value.as_deref() == Some("tcp"));
        let redirects_to_sidecar = target == "ISTIO_REDIRECT"
            || (target == "REDIRECT"
                && r.target_value(&["--to-ports", "--to-port"])
                    .and_then(|v| v.parse::<u16>().ok())
                    == Some(cap.outbound_port));
        match (target, dport, dst) {
            ("ISTIO_OUTPUT_DNS", None, None) if other.is_none() && depth == 0 => {
                walk_output(
                    rules,
                    "ISTIO_OUTPUT_DNS",
                    cap,
                    include,
                    catch_all,
                    depth + 1,
                )?;
            }
            _ if other.is_some() || !proto_ok || dport.is_some_and(|o| o.negated) => {
                unsupported(
                    cap,
                    format!("rule the datapath cannot mirror: {}", r.text.trim()),
                );
            }
            ("RETURN", Some(o), _) => {
                // With a -d too, excluding the port everywhere is the careful side.
                let v = o
                    .value
                    .as_deref()
                    .ok_or_else(|| r.syntax("ISTIO_OUTPUT --dport", "no value"))?;
                for p in ports(r, "ISTIO_OUTPUT --dport", v)? {
                    push_unique(&mut cap.exclude_outbound_ports, p);
                }
            }
            ("RETURN", None, Some(o)) => {
                let v = o
                    .value
                    .as_deref()
                    .ok_or_else(|| r.syntax("ISTIO_OUTPUT -d", "no value"))?;
                let c = cidr(r, "ISTIO_OUTPUT -d", v)?;
                if o.negated {
                    unsupported(
                        cap,
                        format!("negated destination RETURN: {}", r.text.trim()),
                    );
                } else if !is_loopback(&c) {
                    push_unique(&mut cap.exclude_outbound_cidrs, c);
                }
            }
            ("RETURN", None, None) => {
                // Everything else returns: nothing after this is captured.
                break;
            }
            (_, None, None) if redirects_to_sidecar => *catch_all = true,
            (_, None, Some(o)) if redirects_to_sidecar && !o.negated => {
                let v = o
                    .value
                    .as_deref()
                    .ok_or_else(|| r.syntax("ISTIO_OUTPUT -d", "no value"))?;
                include.push(cidr(r, "ISTIO_OUTPUT -d", v)?);
            }
            (_, Some(_), _) if redirects_to_sidecar => {
                unsupported(
                    cap,
                    format!(
                        "includeOutboundPorts is not modelled by the datapath: {}",
                        r.text.trim()
                    ),
                );
            }
            ("REDIRECT", Some(o), _) => {
                // Diverted elsewhere (DNS to 15053): never predict these as captured.
                let v = o
                    .value
                    .as_deref()
                    .ok_or_else(|| r.syntax("ISTIO_OUTPUT --dport", "no value"))?;
                for p in ports(r, "ISTIO_OUTPUT --dport", v)? {
                    push_unique(&mut cap.exclude_outbound_ports, p);
                }
            }
            ("REDIRECT", None, Some(o)) if !o.negated => {
                let v = o
                    .value
                    .as_deref()
                    .ok_or_else(|| r.syntax("ISTIO_OUTPUT -d", "no value"))?;
                let c = cidr(r, "ISTIO_OUTPUT -d", v)?;
                if !is_loopback(&c) {
                    push_unique(&mut cap.exclude_outbound_cidrs, c);
                }
            }
            _ => unsupported(
                cap,
                format!("rule the datapath cannot mirror: {}", r.text.trim()),
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `iptables-save -t nat` in a minimesh pod with Istio's default capture (real output of
    /// iptables v1.8.9, nf_tables backend).
    const MINIMESH: &str = include_str!("../../tests/fixtures/iptables-save-minimesh-default.txt");
    /// `ip6tables-save -t nat` of a dual-stack pod: istio-iptables' IPv6 capture (`::6`, `::1`)
    /// with an excluded and two included IPv6 ranges.
    const DUAL_STACK6: &str = include_str!("../../tests/fixtures/ip6tables-save-dual-stack.txt");

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    /// The nat table of an Istio pod in iptables-save form, with `output` as the body of
    /// ISTIO_OUTPUT after the owner rules.
    fn nat(output_before: &str, output_after: &str) -> String {
        format!(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\n\
             :ISTIO_IN_REDIRECT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n\
             -A PREROUTING -p tcp -j ISTIO_INBOUND\n-A OUTPUT -j ISTIO_OUTPUT\n\
             -A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN\n\
             -A ISTIO_INBOUND -p tcp -m multiport --dports 22,15090 -j RETURN\n\
             -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n\
             -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n\
             -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
             {output_before}\
             -A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN\n\
             -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT\n\
             -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n\
             {output_after}COMMIT\n"
        )
    }

    #[test]
    fn ip6tables_save_reads_like_iptables_save() {
        let v6 = parse(DUAL_STACK6).unwrap();
        assert_eq!((v6.outbound_port, v6.inbound_port), (15001, 15006));
        assert_eq!(
            (&v6.proxy_uids[..], &v6.proxy_gids[..]),
            (&[1337][..], &[1337][..])
        );
        assert_eq!(v6.exclude_outbound_ports, vec![9000]);
        assert_eq!(v6.exclude_outbound_cidrs, vec![cidr("fd00:96::/64")]);
        assert_eq!(
            v6.include_outbound,
            OutboundRanges::Only(vec![cidr("2001:db8::/32"), cidr("fd12::/16")])
        );
        assert!(v6.outbound_unsupported.is_none(), "{v6:?}");
        // ::1 is loopback; ::6's and the proxy's lo rules are not exclusions.
        assert!(!v6.exclude_outbound_cidrs.iter().any(is_loopback));
        let mut v4 = parse(MINIMESH).unwrap();
        assert_eq!(
            ipv6_differs(&v4, &v6).as_deref(),
            Some("ip6tables and iptables differ in their excluded outbound ports")
        );
        v4.exclude_outbound_ports = vec![9000];
        v4.exclude_inbound_ports
            .clone_from(&v6.exclude_inbound_ports);
        v4.include_outbound = OutboundRanges::Only(vec![cidr("10.0.0.0/8")]);
        assert_eq!(ipv6_differs(&v4, &v6), None);
        v4.include_outbound = OutboundRanges::All;
        assert!(ipv6_differs(&v4, &v6).unwrap().contains("include list"));
    }

    #[test]
    fn minimesh_default_capture() {
        let c = parse(MINIMESH).unwrap();
        assert_eq!(c.proxy_uids, vec![1337]);
        assert_eq!(c.proxy_gids, vec![1337]);
        assert_eq!((c.outbound_port, c.inbound_port), (15001, 15006));
        assert_eq!(
            c.exclude_inbound_ports,
            vec![15008, 22, 15090, 15021, 15020]
        );
        assert!(c.exclude_outbound_ports.is_empty());
        assert!(c.exclude_outbound_cidrs.is_empty());
        assert_eq!(c.include_outbound, OutboundRanges::All);
        assert_eq!(c.outbound_unsupported, None);
    }

    #[test]
    fn an_inbound_port_list_is_what_inbound_capture_covers() {
        let c = parse(MINIMESH).unwrap();
        assert!(c.inbound_captured);
        assert!(c.include_inbound_ports.is_empty(), "*: every port");
        // includeInboundPorts=8080,9090: istio-iptables writes one jump per port, no catch-all.
        let list = MINIMESH.replace(
            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT\n\
             -A ISTIO_INBOUND -p tcp -m multiport --dports 9090,8080 -j ISTIO_IN_REDIRECT\n",
        );
        let c = parse(&list).unwrap();
        assert!(c.inbound_captured);
        assert_eq!(c.include_inbound_ports, vec![8080, 9090]);
        // includeInboundPorts="": no jump to ISTIO_IN_REDIRECT at all.
        let none = MINIMESH.replace("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n", "");
        let c = parse(&none).unwrap();
        assert!(!c.inbound_captured);
        assert!(c.include_inbound_ports.is_empty());
    }

    #[test]
    fn exclusions_and_udp_twins() {
        let c = parse(&nat(
            "-A ISTIO_OUTPUT -p tcp -m multiport --dports 22,80,443 -j RETURN\n\
             -A ISTIO_OUTPUT -p udp -m multiport --dports 22,80,443 -j RETURN\n\
             -A ISTIO_OUTPUT -p tcp -m tcp --dport 9000 -m comment --comment \"excluded port\" -j RETURN\n",
            "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n",
        ))
        .unwrap();
        assert_eq!(c.exclude_outbound_ports, vec![22, 80, 443, 9000]);
        assert_eq!(c.exclude_outbound_cidrs, vec![cidr("10.0.0.0/8")]);
        assert_eq!(c.include_outbound, OutboundRanges::All);
        assert_eq!(c.exclude_inbound_ports, vec![15008, 22, 15090]);
        assert_eq!(c.outbound_unsupported, None);
    }

    #[test]
    fn include_ranges_and_dns_capture() {
        let c = parse(&nat(
            "",
            "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS\n\
             -A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-ports 15053\n\
             -A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN\n\
             -A ISTIO_OUTPUT -d 9.9.0.0/16 -j ISTIO_REDIRECT\n\
             -A ISTIO_OUTPUT -j RETURN\n",
        ))
        .unwrap();
        // TCP DNS goes to the agent, never to the sidecar: predicted as not captured.
        assert_eq!(c.exclude_outbound_ports, vec![53]);
        assert_eq!(c.exclude_outbound_cidrs, vec![cidr("1.1.0.0/16")]);
        assert_eq!(
            c.include_outbound,
            OutboundRanges::Only(vec![cidr("9.9.0.0/16")])
        );
        assert_eq!(c.outbound_unsupported, None);
    }

    #[test]
    fn rules_the_datapath_cannot_mirror_turn_outbound_off() {
        for (before, after, why) in [
            (
                "",
                "-A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT\n",
                "includeOutboundPorts",
            ),
            (
                "",
                "-A ISTIO_OUTPUT -m mark --mark 0x1 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n",
                "--mark",
            ),
            (
                "",
                "-A ISTIO_OUTPUT -j RETURN\n",
                "never jumps to ISTIO_REDIRECT",
            ),
            (
                "-A ISTIO_OUTPUT -m owner --uid-owner 1338 -j RETURN\n",
                "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n",
                "several proxy owners",
            ),
        ] {
            let c = parse(&nat(before, after)).unwrap();
            let got = c.outbound_unsupported.unwrap_or_default();
            assert!(got.contains(why), "{why}: {got}");
        }
        // A rule in OUTPUT ahead of the jump (excludeInterfaces) is not mirrored either.
        let text = nat("", "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n").replace(
            "-A OUTPUT -j ISTIO_OUTPUT\n",
            "-A OUTPUT -o not-istio-nic -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n",
        );
        let got = parse(&text).unwrap().outbound_unsupported.unwrap();
        assert!(got.contains("not-istio-nic"), "{got}");
    }

    #[test]
    fn tproxy_and_uncaptured_are_named() {
        let tproxy = format!(
            "*mangle\n:ISTIO_TPROXY - [0:0]\n\
             -A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff\n\
             COMMIT\n{}",
            nat("", "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n")
        );
        assert!(matches!(parse(&tproxy), Err(Error::Tproxy { .. })));
        let plain = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(parse(plain), Err(Error::NotCaptured));
        assert_eq!(parse(""), Err(Error::NotCaptured));
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                MINIMESH.replace("--to-ports 15001", "--to-ports 7x"),
                "ISTIO_REDIRECT --to-ports",
            ),
            (
                MINIMESH.replace("--to-ports 15001", "--to-ports 0"),
                "ISTIO_REDIRECT --to-ports",
            ),
            (
                MINIMESH.replace(
                    "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                    "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15011",
                ),
                "redirects to both 15001 and 15011",
            ),
            (
                MINIMESH.replace("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n", ""),
                "ISTIO_REDIRECT has no REDIRECT",
            ),
            (
                MINIMESH.replace("--uid-owner 1337 -j RETURN", "--uid-owner abc -j RETURN"),
                "--uid-owner",
            ),
            (
                MINIMESH.replace("-m owner --uid-owner 1337 -j RETURN\n", "").replace("-m owner --gid-owner 1337 -j RETURN\n", ""),
                "no owner match",
            ),
            (
                MINIMESH.replace("--dport 15020", "--dport 99999"),
                "ISTIO_INBOUND --dport",
            ),
            (
                MINIMESH.replace("-d 127.0.0.1/32 -j RETURN", "-d 10.0.0.0/40 -j RETURN"),
                "ISTIO_OUTPUT -d",
            ),
            (
                MINIMESH.replace("*nat", "*nat\n-A OUTPUT -m comment --comment \"open"),
                "quoting",
            ),
            (MINIMESH.replace("*nat", "bogus line"), "table"),
            (MINIMESH.replace("COMMIT", "-X FOO"), "expected -A"),
        ];
        for (text, want) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err}");
        }
    }

    #[test]
    fn truncated_and_mangled_input_never_panics() {
        for cut in 0..MINIMESH.len() {
            if MINIMESH.is_char_boundary(cut) {
                let _ = parse(&MINIMESH[..cut]);
            }
        }
        for tok in [
            "!",
            "-j",
            "-A",
            "--dport",
            "-m owner",
            "\"",
            "-j REDIRECT --to-ports",
        ] {
            for line in MINIMESH.lines() {
                let _ = parse(&MINIMESH.replace(line, &format!("{line} {tok}")));
            }
        }
    }
}
