//! Istio's native nftables capture (`values.global.nativeNftables`, istio-iptables
//! `--native-nftables`): the tables `inet istio-proxy-nat` (and `inet istio-proxy-mangle` in
//! TPROXY mode), read with `nft -j` and turned, rule by rule, into the iptables-save form that
//! [`super::iptables::parse`] reads. One parser keeps one set of rules about what can be
//! mirrored: a rule shape this module does not know becomes an option the parser does not know,
//! which turns the outbound hop off with the rule named, exactly as an unknown iptables rule
//! does.
//!
//! An `inet` table serves both address families, so the translation is done per family: a rule
//! that matches IPv4 addresses (`ip daddr`) does not exist for IPv6 traffic and is left out of
//! the IPv6 view, and the other way round. Chains keep their meaning under iptables' names:
//! a base chain takes its hook's name (`output` -> `OUTPUT`), any other chain its own name in
//! upper case with `_` (`istio-in-redirect` -> `ISTIO_IN_REDIRECT`). Every rule carries a
//! comment with its nft handle, so a message about it can be found with
//! `nft -a list table inet istio-proxy-nat`.

use std::{collections::BTreeMap, fmt::Write as _, io};

use serde_json::Value;

use super::iptables::{run_in, Error};

/// The nat table of Istio's nftables capture.
pub const NAT_TABLE: &str = "istio-proxy-nat";
/// Its mangle table, present in TPROXY mode.
pub const MANGLE_TABLE: &str = "istio-proxy-mangle";

/// Which address family's view of an `inet` table to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The `nft -j` listings of Istio's tables in one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub nat: String,
    pub mangle: Option<String>,
}

/// Reads Istio's tables in `netns` (with the `nft` program, run there); None when there is no
/// `inet istio-proxy-nat` table.
pub fn read(netns: &std::fs::File) -> io::Result<Option<Tables>> {
    let tables = run_in(netns, "nft", &["list", "tables"])?;
    let has = |name: &str| has_table(&tables, name);
    if !has(NAT_TABLE) {
        return Ok(None);
    }
    let list = |name: &str| run_in(netns, "nft", &["-j", "list", "table", "inet", name]);
    Ok(Some(Tables {
        nat: list(NAT_TABLE)?,
        mangle: if has(MANGLE_TABLE) {
            Some(list(MANGLE_TABLE)?)
        } else {
            None
        },
    }))
}

/// Whether `nft list tables` output lists `table inet NAME`.
fn has_table(tables: &str, name: &str) -> bool {
    tables.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w == ["table", "inet", name]
    })
}

/// `family`'s view of `tables` as iptables-save text (`*nat`, and `*mangle` when present).
pub fn to_iptables_save(tables: &Tables, family: Family) -> Result<String, Error> {
    let mut out = table_to_iptables("nat", &tables.nat, family)?;
    if let Some(m) = &tables.mangle {
        out.push_str(&table_to_iptables("mangle", m, family)?);
    }
    Ok(out)
}

fn bad(message: impl Into<String>) -> Error {
    Error::Capture {
        field: "nft -j",
        message: super::clip(&message.into()),
    }
}

/// One table's `nft -j list table` output as an iptables-save `*table` section.
fn table_to_iptables(table: &str, json: &str, family: Family) -> Result<String, Error> {
    let doc: Value =
        serde_json::from_str(json).map_err(|e| bad(format!("not JSON from nft: {e}")))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no \"nftables\" array"))?;
    // Chains first (nft lists them before the rules), so jumps can be named.
    let mut chains: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for chain in items.iter().filter_map(|i| i.get("chain")) {
        let name = chain
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a chain without a name"))?;
        let mapped = iptables_name(chain.get("hook").and_then(Value::as_str).unwrap_or(name));
        if !order.contains(&mapped) {
            order.push(mapped.clone());
        }
        chains.insert(name.to_string(), mapped);
    }
    let mut out = format!("*{table}\n");
    for c in &order {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for rule in items.iter().filter_map(|i| i.get("rule")) {
        let chain = rule
            .get("chain")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a rule without a chain"))?;
        let handle = rule.get("handle").and_then(Value::as_u64).unwrap_or(0);
        let exprs = rule
            .get("expr")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("rule {handle} in {chain} has no expressions")))?;
        let mapped = chains
            .get(chain)
            .cloned()
            .unwrap_or_else(|| iptables_name(chain));
        if let Some(line) = rule_line(&mapped, handle, exprs, &chains, family) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out.push_str("COMMIT\n");
    Ok(out)
}

/// `istio-in-redirect` -> `ISTIO_IN_REDIRECT` (anything but letters and digits as `_`, so a
/// name can never split the line it is written into).
fn iptables_name(chain: &str) -> String {
    chain
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// A value from the JSON as one iptables-save word: the characters of names, numbers and
/// addresses only, never a leading `-` (which would read as an option). Anything else becomes a
/// word no iptables value parses, so the rule is refused rather than misread.
fn word(s: &str) -> String {
    let fine = !s.is_empty()
        && !s.starts_with('-')
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '/' | '_' | '-' | '+' | '*')
        });
    if fine {
        s.to_string()
    } else {
        "(unreadable)".into()
    }
}

/// The iptables-save line of one rule, None when the rule cannot match `family`'s packets.
fn rule_line(
    chain: &str,
    handle: u64,
    exprs: &[Value],
    chains: &BTreeMap<String, String>,
    family: Family,
) -> Option<String> {
    let mut opts: Vec<String> = Vec::new();
    let mut target: Option<String> = None;
    let mut proto: Option<String> = None;
    for e in exprs {
        // nft writes each expression as an object of one key; anything else is not read.
        let Some((key, body)) = e
            .as_object()
            .filter(|o| o.len() == 1)
            .and_then(|o| o.iter().next())
        else {
            opts.push("--nft-unknown".into());
            continue;
        };
        let verdict = match key.as_str() {
            "counter" => continue,
            "match" => {
                match matcher(body, family, &mut proto) {
                    Matched::Opt(o) => opts.push(o),
                    Matched::Nothing => {}
                    Matched::OtherFamily => return None,
                }
                continue;
            }
            "jump" => {
                let to = body.get("target").and_then(Value::as_str).unwrap_or("");
                let to = chains.get(to).cloned().unwrap_or_else(|| iptables_name(to));
                format!("-j {to}")
            }
            "return" => "-j RETURN".into(),
            "accept" => "-j ACCEPT".into(),
            "drop" => "-j DROP".into(),
            "redirect" => match body.get("port").and_then(Value::as_u64) {
                Some(p) => format!("-j REDIRECT --to-ports {p}"),
                None => "-j REDIRECT".into(),
            },
            "tproxy" => "-j TPROXY".into(),
            other => {
                // A statement this module does not model (a mark, a log, NAT to an address):
                // named, so the parser refuses to mirror the rule.
                opts.push(format!("--nft-{}", word(other)));
                continue;
            }
        };
        // The first verdict decides (`tproxy ... accept`: what matters is the TPROXY).
        if target.is_none() {
            target = Some(verdict);
        }
    }
    let mut line = format!("-A {chain} -m comment --comment \"nft handle {handle}\"");
    if let Some(p) = proto {
        let _ = write!(line, " -p {p}");
    }
    for o in opts {
        let _ = write!(line, " {o}");
    }
    if let Some(t) = target {
        let _ = write!(line, " {t}");
    }
    Some(line)
}

enum Matched {
    /// An iptables option (with its `!`).
    Opt(String),
    /// Nothing to add (the protocol, recorded apart; or a family check that holds).
    Nothing,
    /// The rule only matches the other address family.
    OtherFamily,
}

/// One `match` expression as an iptables option. `proto` collects the layer-4 protocol, which
/// nft states once (`meta l4proto tcp`) or implies (`tcp dport`).
fn matcher(body: &Value, family: Family, proto: &mut Option<String>) -> Matched {
    let op = body.get("op").and_then(Value::as_str).unwrap_or("==");
    let negated = match op {
        "==" | "in" => false,
        "!=" => true,
        _ => return Matched::Opt(format!("--nft-match-op-{}", word(op))),
    };
    let not = if negated { "! " } else { "" };
    let left = body.get("left").unwrap_or(&Value::Null);
    let right = body.get("right").unwrap_or(&Value::Null);
    if let Some(key) = left.pointer("/meta/key").and_then(Value::as_str) {
        return match key {
            "l4proto" if !negated => {
                let p = match right {
                    Value::String(s) => word(s),
                    Value::Number(n) if n.as_u64() == Some(6) => "tcp".into(),
                    Value::Number(n) if n.as_u64() == Some(17) => "udp".into(),
                    other => word(&other.to_string()),
                };
                match proto {
                    // `meta l4proto tcp udp dport 53`: never matches; not mirrored.
                    Some(q) if *q != p => return Matched::Opt("--nft-protocols-disagree".into()),
                    _ => *proto = Some(p),
                }
                Matched::Nothing
            }
            // The family: `meta nfproto ipv4`, or `meta protocol ip` (the EtherType).
            "nfproto" | "protocol" => {
                let v4 = matches!(right.as_str(), Some("ipv4" | "ip"));
                let v6 = matches!(right.as_str(), Some("ipv6" | "ip6"));
                let ours = match family {
                    Family::V4 => v4,
                    Family::V6 => v6,
                };
                if (v4 || v6) && ours == negated {
                    Matched::OtherFamily
                } else if v4 || v6 {
                    Matched::Nothing
                } else {
                    Matched::Opt("--nft-meta-nfproto".into())
                }
            }
            "oifname" | "oif" => Matched::Opt(format!("{not}-o {}", scalar(right))),
            "iifname" | "iif" => Matched::Opt(format!("{not}-i {}", scalar(right))),
            "skuid" => Matched::Opt(format!("-m owner {not}--uid-owner {}", scalar(right))),
            "skgid" => Matched::Opt(format!("-m owner {not}--gid-owner {}", scalar(right))),
            other => Matched::Opt(format!("--nft-meta-{}", word(other))),
        };
    }
    let protocol = left.pointer("/payload/protocol").and_then(Value::as_str);
    let field = left.pointer("/payload/field").and_then(Value::as_str);
    match (protocol, field) {
        (Some(p @ ("tcp" | "udp")), Some(f @ ("dport" | "sport"))) => {
            match proto {
                Some(q) if q != p => return Matched::Opt("--nft-protocols-disagree".into()),
                _ => *proto = Some(p.to_string()),
            }
            let Some(ports) = port_list(right) else {
                return Matched::Opt(format!("--nft-{p}-{f}"));
            };
            let name = match (f, ports.contains(',')) {
                ("dport", false) => "--dport",
                ("dport", true) => "--dports",
                (_, false) => "--sport",
                (_, true) => "--sports",
            };
            Matched::Opt(format!("{not}{name} {ports}"))
        }
        (Some(ip @ ("ip" | "ip6")), Some(f @ ("saddr" | "daddr"))) => {
            let is_v4 = ip == "ip";
            if is_v4 != (family == Family::V4) {
                return Matched::OtherFamily;
            }
            let Some(cidr) = address(right, is_v4) else {
                return Matched::Opt(format!("--nft-{ip}-{f}"));
            };
            let name = if f == "daddr" { "-d" } else { "-s" };
            Matched::Opt(format!("{not}{name} {cidr}"))
        }
        _ => Matched::Opt("--nft-match".into()),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => word(s),
        other => word(&other.to_string()),
    }
}

/// `53`, `{"set": [53, 15008]}` or `{"range": [9000, 9002]}` as `53`, `53,15008`, `9000:9002`.
fn port_list(v: &Value) -> Option<String> {
    fn one(v: &Value) -> Option<String> {
        match v {
            Value::Number(n) => n.as_u64().map(|n| n.to_string()),
            Value::Object(o) => {
                let r = o.get("range")?.as_array()?;
                match r.as_slice() {
                    [a, b] => Some(format!("{}:{}", a.as_u64()?, b.as_u64()?)),
                    _ => None,
                }
            }
            _ => None,
        }
    }
    match v.get("set").and_then(Value::as_array) {
        Some(items) => {
            let parts: Option<Vec<String>> = items.iter().map(one).collect();
            parts.filter(|p| !p.is_empty()).map(|p| p.join(","))
        }
        None => one(v),
    }
}

/// `"127.0.0.1"` or `{"prefix": {"addr": "10.0.0.0", "len": 8}}` as a CIDR.
fn address(v: &Value, v4: bool) -> Option<String> {
    match v {
        Value::String(a) => Some(format!("{}/{}", word(a), if v4 { 32 } else { 128 })),
        Value::Object(o) => {
            let p = o.get("prefix")?;
            Some(format!(
                "{}/{}",
                word(p.get("addr")?.as_str()?),
                p.get("len")?.as_u64()?
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        discovery::iptables::{self, parse},
        model::OutboundRanges,
    };

    /// Real `nft -j list table inet istio-proxy-nat` output (nftables 1.0.6) after loading
    /// minimesh's Istio-shaped nftables capture: the default settings, IPv4 only.
    const DEFAULT: &str = include_str!("../../tests/fixtures/nft-json-default.json");
    /// uid/gid 1400/1401, capture ports 15011/15016, excluded outbound ports 9000 and 9001,
    /// excluded ranges 10.96.0.0/12 and fd00:10::/64, inbound ports 8080 and 9090 only, and the
    /// IPv6 twins of the address rules (dual stack).
    const CUSTOM_DUAL: &str = include_str!("../../tests/fixtures/nft-json-custom-dual.json");
    /// The default with `output oifname eth9 return` ahead of the jump (excludeInterfaces).
    const EXCLUDE_NIC: &str = include_str!("../../tests/fixtures/nft-json-exclude-interface.json");
    /// An `inet istio-proxy-mangle` table with a `tproxy ip to :15006` rule.
    const TPROXY: &str = include_str!("../../tests/fixtures/nft-json-tproxy-mangle.json");

    fn nat(json: &str) -> Tables {
        Tables {
            nat: json.into(),
            mangle: None,
        }
    }

    fn read(json: &str, family: Family) -> Result<iptables::Capture, Error> {
        parse(&to_iptables_save(&nat(json), family).unwrap())
    }

    #[test]
    fn the_default_capture_reads_as_iptables_would() {
        let cap = read(DEFAULT, Family::V4).unwrap();
        assert_eq!((cap.outbound_port, cap.inbound_port), (15001, 15006));
        assert_eq!(
            (&cap.proxy_uids[..], &cap.proxy_gids[..]),
            (&[1337][..], &[1337][..])
        );
        // nft keeps a set sorted.
        assert_eq!(
            cap.exclude_inbound_ports,
            vec![15008, 22, 15020, 15021, 15090]
        );
        assert!(cap.inbound_captured && cap.include_inbound_ports.is_empty());
        assert_eq!(cap.include_outbound, OutboundRanges::All);
        assert!(cap.exclude_outbound_ports.is_empty() && cap.exclude_outbound_cidrs.is_empty());
        assert_eq!(cap.outbound_unsupported, None);
        // The same rules give the same capture as minimesh's iptables form of that setting.
        let ipt = parse(&minimesh_iptables_default()).unwrap();
        assert_eq!(
            (ipt.proxy_uids, ipt.outbound_port, ipt.include_outbound),
            (
                cap.proxy_uids.clone(),
                cap.outbound_port,
                cap.include_outbound.clone()
            )
        );
    }

    fn minimesh_iptables_default() -> String {
        // The iptables form of the default capture (what install_istio_capture writes).
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/iptables-save-minimesh-default.txt"
        ))
        .unwrap()
    }

    #[test]
    fn every_setting_is_read_in_both_families() {
        let v4 = read(CUSTOM_DUAL, Family::V4).unwrap();
        assert_eq!((v4.outbound_port, v4.inbound_port), (15011, 15016));
        assert_eq!(
            (&v4.proxy_uids[..], &v4.proxy_gids[..]),
            (&[1400][..], &[1401][..])
        );
        assert_eq!(v4.exclude_outbound_ports, vec![9000, 9001]);
        assert_eq!(v4.include_inbound_ports, vec![8080, 9090]);
        assert_eq!(
            v4.exclude_outbound_cidrs,
            vec!["10.96.0.0/12".parse().unwrap()]
        );
        assert_eq!(v4.outbound_unsupported, None);
        let v6 = read(CUSTOM_DUAL, Family::V6).unwrap();
        assert_eq!(
            v6.exclude_outbound_cidrs,
            vec!["fd00:10::/64".parse().unwrap()]
        );
        assert_eq!(iptables::ipv6_differs(&v4, &v6), None);
        // The IPv4 view has no IPv6 rule and the other way round.
        let text4 = to_iptables_save(&nat(CUSTOM_DUAL), Family::V4).unwrap();
        assert!(!text4.contains("::"), "{text4}");
        let text6 = to_iptables_save(&nat(CUSTOM_DUAL), Family::V6).unwrap();
        assert!(!text6.contains("127.0.0."), "{text6}");
    }

    #[test]
    fn an_excluded_interface_turns_the_outbound_hop_off_naming_the_rule() {
        let cap = read(EXCLUDE_NIC, Family::V4).unwrap();
        let why = cap.outbound_unsupported.expect("outbound must be off");
        assert!(
            why.contains("-o eth9") && why.contains("nft handle"),
            "{why}"
        );
    }

    #[test]
    fn a_tproxy_mangle_table_is_tproxy_mode() {
        let tables = Tables {
            nat: DEFAULT.into(),
            mangle: Some(TPROXY.into()),
        };
        let err = parse(&to_iptables_save(&tables, Family::V4).unwrap()).unwrap_err();
        assert!(matches!(err, Error::Tproxy { .. }), "{err:?}");
    }

    /// Rule shapes of Istio's nftables capture that meshlane must not mirror blindly.
    #[test]
    fn unknown_statements_and_matches_are_never_mirrored() {
        let doc = |rules: &str| {
            format!(
                r#"{{"nftables": [
                {{"chain": {{"name": "output", "hook": "output"}}}},
                {{"chain": {{"name": "istio-output"}}}},
                {{"chain": {{"name": "istio-redirect"}}}},
                {{"chain": {{"name": "istio-in-redirect"}}}},
                {{"rule": {{"chain": "istio-redirect", "handle": 1, "expr": [{{"redirect": {{"port": 15001}}}}]}}}},
                {{"rule": {{"chain": "istio-in-redirect", "handle": 2, "expr": [{{"redirect": {{"port": 15006}}}}]}}}},
                {{"rule": {{"chain": "output", "handle": 3, "expr": [{{"jump": {{"target": "istio-output"}}}}]}}}},
                {{"rule": {{"chain": "istio-output", "handle": 4, "expr": [{{"match": {{"op": "==", "left": {{"meta": {{"key": "skuid"}}}}, "right": 1337}}}}, {{"return": null}}]}}}},
                {rules}
                {{"rule": {{"chain": "istio-output", "handle": 99, "expr": [{{"jump": {{"target": "istio-redirect"}}}}]}}}}
                ]}}"#
            )
        };
        // A mark match, a set of addresses, a comparison other than == / !=, NAT to an address,
        // a goto (which does not come back to the chain, unlike a jump), protocols that
        // contradict each other, and an expression object of two keys.
        for bad_rule in [
            r#"{"rule": {"chain": "istio-output", "handle": 5, "expr": [{"goto": {"target": "istio-in-redirect"}}]}},"#,
            r#"{"rule": {"chain": "istio-output", "handle": 5, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 53}}, {"return": null}]}},"#,
            r#"{"rule": {"chain": "istio-output", "handle": 5, "expr": [{"return": null, "accept": null}]}},"#,
            r#"{"rule": {"chain": "istio-output", "handle": 5, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 7}}, {"return": null}]}},"#,
            r#"{"rule": {"chain": "istio-output", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"set": ["1.1.1.1", "2.2.2.2"]}}}, {"return": null}]}},"#,
            r#"{"rule": {"chain": "istio-output", "handle": 5, "expr": [{"match": {"op": "<", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 1024}}, {"return": null}]}},"#,
            r#"{"rule": {"chain": "istio-output", "handle": 5, "expr": [{"snat": {"addr": "10.0.0.1"}}]}},"#,
        ] {
            let cap = read(&doc(bad_rule), Family::V4).unwrap();
            let why = cap.outbound_unsupported.unwrap_or_default();
            assert!(why.contains("nft handle 5"), "{bad_rule}: {why:?}");
        }
        // The same skeleton without them is mirrored.
        let cap = read(&doc(""), Family::V4).unwrap();
        assert_eq!(cap.outbound_unsupported, None);
        assert_eq!(cap.include_outbound, OutboundRanges::All);
        // Rules for the other family only are left out of this one's view.
        let v6_only = r#"{"rule": {"chain": "istio-output", "handle": 5, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}}, {"return": null}]}},"#;
        assert_eq!(
            read(&doc(v6_only), Family::V4).unwrap().include_outbound,
            OutboundRanges::All
        );
        assert!(read(&doc(v6_only), Family::V6)
            .unwrap()
            .outbound_unsupported
            .is_some_and(|w| w.contains("no outbound capture")));
    }

    #[test]
    fn only_istios_inet_tables_count() {
        let listed = "table ip filter\ntable inet istio-proxy-nat\ntable inet istio-proxy-mangle\n";
        assert!(has_table(listed, NAT_TABLE) && has_table(listed, MANGLE_TABLE));
        assert!(!has_table(
            "table ip istio-proxy-nat\ntable inet istio\n",
            NAT_TABLE
        ));
        assert!(!has_table("", NAT_TABLE));
    }

    /// A value that could split or extend the iptables-save line it is written into is never
    /// copied there: the rule is refused instead.
    #[test]
    fn hostile_values_cannot_forge_rules() {
        let doc = r#"{"nftables": [
            {"chain": {"name": "output", "hook": "output\n-A ISTIO_OUTPUT -j RETURN"}},
            {"chain": {"name": "istio-output"}},
            {"chain": {"name": "istio-redirect"}},
            {"chain": {"name": "istio-in-redirect"}},
            {"rule": {"chain": "istio-redirect", "handle": 1, "expr": [{"redirect": {"port": 15001}}]}},
            {"rule": {"chain": "istio-in-redirect", "handle": 2, "expr": [{"redirect": {"port": 15006}}]}},
            {"rule": {"chain": "istio-output", "handle": 4, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": 1337}}, {"return": null}]}},
            {"rule": {"chain": "istio-output", "handle": 5, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo -j ISTIO_REDIRECT\n-A ISTIO_OUTPUT"}}, {"return": null}]}},
            {"rule": {"chain": "istio-output", "handle": 6, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "skgid"}}, "right": "-j"}}, {"return": null}]}},
            {"rule": {"chain": "istio-output", "handle": 99, "expr": [{"jump": {"target": "istio-redirect"}}]}}
            ]}"#;
        let text = to_iptables_save(&nat(doc), Family::V4).unwrap();
        // One line per rule and chain, as many as the JSON has.
        assert_eq!(text.lines().count(), 1 + 4 + 6 + 1, "{text}");
        assert!(!text.contains("-o lo -j ISTIO_REDIRECT"), "{text}");
        assert!(!text.contains("--gid-owner -j"), "{text}");
    }

    #[test]
    fn bad_json_is_an_error_naming_nft() {
        for text in [
            "",
            "{}",
            "[1]",
            r#"{"nftables": [{"rule": {"handle": 1}}]}"#,
        ] {
            let err = to_iptables_save(&nat(text), Family::V4).unwrap_err();
            assert!(err.to_string().starts_with("nft -j"), "{text:?}: {err}");
        }
    }
}
