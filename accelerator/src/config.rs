//! The local pod list: a TOML file naming pods by network-namespace path, used until (and
//! alongside) discovery. Every field but `name` and `netns` has Istio's default.
//!
//! ```toml
//! [[pod]]
//! name = "default/client"            # namespace/name, for logs and status
//! netns = "/run/netns/client"        # or /proc/<pid>/ns/net
//! # proxy_uid = 1337                 # istio-init -u
//! # proxy_gid = 1337                 # istio-init -g (default: proxy_uid, as istio-iptables)
//! # outbound_port = 15001            # istio-init -p
//! # inbound_port = 15006             # istio-init -z
//! # inbound_bind = "127.0.0.6"       # the sidecar's inbound source address
//! # capture_ipv6 = false             # the pod's ip6tables capture IPv6 too (istio-iptables
//! #                                  # with IPv6 enabled: dual-stack and IPv6 pods)
//! # inbound_bind6 = "::6"            # the sidecar's IPv6 inbound source address
//! # exclude_outbound_ports = [9000]  # traffic.sidecar.istio.io/excludeOutboundPorts
//! # exclude_inbound_ports = []       # traffic.sidecar.istio.io/excludeInboundPorts
//! # include_inbound_ports = []       # includeInboundPorts as a list (empty: "*")
//! # exclude_outbound_cidrs = []      # traffic.sidecar.istio.io/excludeOutboundIPRanges
//! # include_outbound_cidrs = ["*"]   # traffic.sidecar.istio.io/includeOutboundIPRanges
//! #                                  # (both lists take IPv4 and IPv6 ranges, like Istio's)
//! # accelerate = true                # false: leave this pod alone
//! # accelerate_outbound = true
//! # accelerate_inbound = true
//! # mode = "reader"                  # this pod's mode: "reader", "two-way", "sidecar" or "off"
//! #                                  # (default: the node's --mode; README "What an app can notice")
//! ```

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::model::{Cidr, OutboundRanges, Pod};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: pod[{index}] ({name}): field `{field}`: {message}")]
    Field {
        path: PathBuf,
        index: usize,
        name: String,
        field: &'static str,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    pod: Vec<PodEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodEntry {
    name: String,
    netns: PathBuf,
    #[serde(default = "d_uid")]
    proxy_uid: u32,
    /// Unset: the same as `proxy_uid`, as istio-iptables' `-g` defaults to `-u`.
    #[serde(default)]
    proxy_gid: Option<u32>,
    #[serde(default = "d_out")]
    outbound_port: u16,
    #[serde(default = "d_in")]
    inbound_port: u16,
    #[serde(default = "d_bind")]
    inbound_bind: String,
    #[serde(default)]
    capture_ipv6: bool,
    #[serde(default = "d_bind6")]
    inbound_bind6: String,
    #[serde(default)]
    exclude_outbound_ports: Vec<u16>,
    #[serde(default)]
    exclude_inbound_ports: Vec<u16>,
    #[serde(default)]
    include_inbound_ports: Vec<u16>,
    #[serde(default)]
    exclude_outbound_cidrs: Vec<String>,
    #[serde(default)]
    include_outbound_cidrs: Option<Vec<String>>,
    #[serde(default = "d_true")]
    accelerate: bool,
    #[serde(default = "d_true")]
    accelerate_outbound: bool,
    #[serde(default = "d_true")]
    accelerate_inbound: bool,
    #[serde(default)]
    mode: Option<String>,
}

fn d_bind6() -> String {
    crate::model::ISTIO_INBOUND_BIND6.to_string()
}
fn d_uid() -> u32 {
    1337
}
fn d_out() -> u16 {
    15001
}
fn d_in() -> u16 {
    15006
}
fn d_bind() -> String {
    "127.0.0.6".into()
}
fn d_true() -> bool {
    true
}

/// Reads and validates the file; pods with `accelerate = false` are left out.
pub fn load(path: &Path) -> Result<Vec<Pod>, Error> {
    load_all(path).map(|f| f.pods)
}

pub fn parse(path: &Path, text: &str) -> Result<Vec<Pod>, Error> {
    parse_all(path, text).map(|f| f.pods)
}

/// Deepest nesting of arrays and inline tables a pod list may use before it is parsed.
const MAX_NESTING: usize = 16;

/// The line where `[` / `{` outside strings and comments nest deeper than [`MAX_NESTING`]. The
/// TOML parser recurses once per level, and a file of a few thousand `[` (found by fuzzing)
/// overflowed its thread's stack, which aborts the daemon: such a file is refused first.
fn too_deep(text: &str) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (_, '\n') => {
                line += 1;
                // Single-line strings end with their line (multi-line ones only matter
                // for brackets inside them, which at worst makes this stricter).
                quote = None;
            }
            (Some('"'), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
            }
            (None, '[' | '{') => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(line);
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            (None, _) => {}
        }
    }
    None
}

/// A pod the file lists with `accelerate = false`: discovery must leave it alone too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptOut {
    pub name: String,
    pub netns: PathBuf,
}

/// The whole file: the pods to accelerate and the ones opted out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodList {
    pub pods: Vec<Pod>,
    pub opted_out: Vec<OptOut>,
}

/// Like [`load`], keeping the opted-out entries.
pub fn load_all(path: &Path) -> Result<PodList, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    parse_all(path, &text)
}

/// Like [`parse`], keeping the opted-out entries.
pub fn parse_all(path: &Path, text: &str) -> Result<PodList, Error> {
    if let Some(line) = too_deep(text) {
        return Err(Error::Parse {
            path: path.into(),
            message: format!(
                "line {line}: arrays or inline tables nested deeper than {MAX_NESTING}; a pod list needs 2"
            ),
        });
    }
    let file: File = toml::from_str(text).map_err(|e| Error::Parse {
        path: path.into(),
        message: e.to_string(),
    })?;
    let mut pods = Vec::new();
    let mut opted_out = Vec::new();
    for (index, e) in file.pod.into_iter().enumerate() {
        let field_err = |field: &'static str, message: String| Error::Field {
            path: path.into(),
            index,
            name: e.name.clone(),
            field,
            message,
        };
        if e.name.trim().is_empty() {
            return Err(field_err("name", "must not be empty".into()));
        }
        if !e.netns.is_absolute() {
            return Err(field_err(
                "netns",
                format!("{} is not an absolute path", e.netns.display()),
            ));
        }
        let inbound_bind6: Ipv6Addr = e.inbound_bind6.parse().map_err(|_| {
            field_err(
                "inbound_bind6",
                format!("{:?} is not an IPv6 address", e.inbound_bind6),
            )
        })?;
        let inbound_bind: Ipv4Addr = e.inbound_bind.parse().map_err(|_| {
            field_err(
                "inbound_bind",
                format!("{:?} is not an IPv4 address", e.inbound_bind),
            )
        })?;
        if e.outbound_port == 0 {
            return Err(field_err("outbound_port", "must not be 0".into()));
        }
        if e.inbound_port == 0 {
            return Err(field_err("inbound_port", "must not be 0".into()));
        }
        let cidrs = |field: &'static str, list: &[String]| -> Result<Vec<Cidr>, Error> {
            list.iter()
                .map(|s| s.parse().map_err(|m| field_err(field, m)))
                .collect()
        };
        let exclude_outbound_cidrs = cidrs("exclude_outbound_cidrs", &e.exclude_outbound_cidrs)?;
        let include_outbound = match &e.include_outbound_cidrs {
            None => OutboundRanges::All,
            Some(list) if list.iter().any(|s| s.trim() == "*") => OutboundRanges::All,
            Some(list) => OutboundRanges::Only(cidrs("include_outbound_cidrs", list)?),
        };
        let mode = match e.mode.as_deref() {
            None => None,
            Some(m) => Some(crate::mode::Mode::parse(m).ok_or_else(|| {
                field_err(
                    "mode",
                    format!("{m:?} is not one of \"reader\", \"two-way\", \"sidecar\", \"off\""),
                )
            })?),
        };
        if !e.accelerate {
            tracing::info!(pod = %e.name, "accelerate = false; leaving the pod alone");
            opted_out.push(OptOut {
                name: e.name,
                netns: e.netns,
            });
            continue;
        }
        pods.push(Pod {
            uid: String::new(),
            ips: Vec::new(),
            interception: crate::model::Interception::Redirect,
            name: e.name,
            netns: e.netns,
            proxy_uid: e.proxy_uid,
            proxy_gid: e.proxy_gid.unwrap_or(e.proxy_uid),
            outbound_port: e.outbound_port,
            inbound_port: e.inbound_port,
            inbound_bind,
            inbound_bind6,
            capture_ipv6: e.capture_ipv6,
            exclude_outbound_ports: e.exclude_outbound_ports,
            exclude_inbound_ports: e.exclude_inbound_ports,
            include_inbound_ports: e.include_inbound_ports,
            exclude_outbound_cidrs,
            include_outbound,
            accelerate_outbound: e.accelerate_outbound,
            accelerate_inbound: e.accelerate_inbound,
            mode,
        });
    }
    Ok(PodList { pods, opted_out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let path = Path::new("pods.toml");
        let deep = format!(
            "[[pod]]\nname = \"a/b\"\nnetns = \"/x\"\nx = {}",
            "[".repeat(100_000)
        );
        // On a thread with a small stack, as the fuzz test ran it: this overflowed before.
        let e = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || parse_all(path, &deep).unwrap_err().to_string())
            .unwrap()
            .join()
            .unwrap();
        assert!(
            e.contains("line 4: arrays or inline tables nested deeper than 16"),
            "{e}"
        );
        // Brackets in strings and comments do not count; a real list still parses.
        let ok = format!(
            "# {}\n[[pod]]\nname = \"{}\"\nnetns = \"/x\"\nexclude_outbound_ports = [1, 2]\n",
            "[".repeat(40),
            "[".repeat(40)
        );
        assert_eq!(parse_all(path, &ok).unwrap().pods.len(), 1);
    }

    #[test]
    fn defaults_are_istios() {
        let pods = parse(
            Path::new("t.toml"),
            "[[pod]]\nname = \"a/b\"\nnetns = \"/run/netns/x\"\n",
        )
        .unwrap();
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].proxy_uid, 1337);
        assert_eq!(pods[0].outbound_port, 15001);
        assert_eq!(pods[0].inbound_bind, Ipv4Addr::new(127, 0, 0, 6));
        assert_eq!(pods[0].include_outbound, OutboundRanges::All);
        assert!(!pods[0].capture_ipv6, "IPv6 capture is opted into");
        assert_eq!(pods[0].inbound_bind6, crate::model::ISTIO_INBOUND_BIND6);
    }

    #[test]
    fn dual_stack_pods_list_both_families() {
        let pods = parse(
            Path::new("t.toml"),
            "[[pod]]
name = \"a/b\"
netns = \"/x\"
capture_ipv6 = true
exclude_outbound_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]
",
        )
        .unwrap();
        assert!(pods[0].capture_ipv6);
        assert_eq!(pods[0].exclude_outbound_cidrs.len(), 2);
        let err = parse(
            Path::new("t.toml"),
            "[[pod]]
name = \"a/b\"
netns = \"/x\"
inbound_bind6 = \"127.0.0.6\"
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("inbound_bind6") && err.contains("a/b"),
            "{err}"
        );
        let err = parse(
            Path::new("t.toml"),
            "[[pod]]
name = \"a/b\"
netns = \"/x\"
exclude_outbound_cidrs = [\"fd00::/129\"]
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("exclude_outbound_cidrs") && err.contains("128"),
            "{err}"
        );
    }

    #[test]
    fn bad_field_is_named() {
        let err = parse(
            Path::new("t.toml"),
            "[[pod]]\nname = \"a/b\"\nnetns = \"/run/netns/x\"\nexclude_outbound_cidrs = [\"10.0.0.0/40\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("exclude_outbound_cidrs") && err.contains("a/b"),
            "{err}"
        );
        let err = parse(
            Path::new("t.toml"),
            "[[pod]]\nname = \"a/b\"\nnetns = \"/x\"\nbogus = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = parse(
            Path::new("t.toml"),
            "[[pod]]\nname = \"a/b\"\nnetns = \"/x\"\nmode = \"fast\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mode") && err.contains("fast"), "{err}");
        let pods = parse(
            Path::new("t.toml"),
            "[[pod]]\nname = \"a/b\"\nnetns = \"/x\"\nmode = \"two-way\"\n",
        )
        .unwrap();
        assert_eq!(pods[0].mode, Some(crate::mode::Mode::TwoWay));
    }

    #[test]
    fn proxy_gid_follows_proxy_uid_like_istio_iptables() {
        let pods = parse(
            Path::new("t.toml"),
            "[[pod]]\nname = \"a/b\"\nnetns = \"/x\"\nproxy_uid = 1000\n",
        )
        .unwrap();
        assert_eq!((pods[0].proxy_uid, pods[0].proxy_gid), (1000, 1000));
        let pods = parse(
            Path::new("t.toml"),
            "[[pod]]\nname = \"a/b\"\nnetns = \"/x\"\nproxy_uid = 1000\nproxy_gid = 7\n",
        )
        .unwrap();
        assert_eq!((pods[0].proxy_uid, pods[0].proxy_gid), (1000, 7));
    }

    #[test]
    fn opted_out_pods_are_skipped() {
        let pods = parse(
            Path::new("t.toml"),
            "[[pod]]\nname = \"a/b\"\nnetns = \"/x\"\naccelerate = false\n",
        )
        .unwrap();
        assert!(pods.is_empty());
        let all = parse_all(
            Path::new("t.toml"),
            "[[pod]]\nname = \"a/b\"\nnetns = \"/x\"\naccelerate = false\n",
        )
        .unwrap();
        assert_eq!(
            all.opted_out,
            vec![OptOut {
                name: "a/b".into(),
                netns: "/x".into()
            }]
        );
    }
}
