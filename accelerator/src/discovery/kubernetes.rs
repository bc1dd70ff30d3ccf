//! Pods of this node from the Kubernetes API: a kube-rs watcher on `spec.nodeName=NODE`, a second
//! one on namespaces (opt-out label, OpenShift uid range), and the node itself for each pod's
//! network namespace (a process whose cgroup path carries the pod UID).
//!
//! What Istio injected decides, not what a user asked for: the capture comes from the arguments
//! istio-init ran with; without istio-init the istio-cni plugin wrote the rules, from the
//! `traffic.sidecar.istio.io/*` annotations and its own defaults (status port 15020 excluded both
//! ways), which is what is read then (`istio-validation`'s arguments only check those rules).
//! The proxy uid/gid come from istio-init's arguments (`-u`, `-g`), else the sidecar's
//! `securityContext`, else the pod's, else the namespace's OpenShift uid range, else Istio's
//! 1337; with istio-cni, from the istio-proxy container's own `securityContext`, else 1337.
//!
//! [`map`] turns one API pod into a pod of the model or a [`Declined`] reason; a resource that
//! does not decode, or a bad annotation or argument, is declined with the field named, never a
//! panic and never a failure of the whole source. [`Source`] (`kubernetes/watch.rs`) runs the
//! watchers as a task on the daemon's runtime and wakes the daemon
//! ([`crate::discovery::Wake`]) on every change.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod as ApiPod};

use super::{Reason, Skipped};
use crate::model::{Cidr, OutboundRanges, Pod};

mod source;
mod watch;
pub use source::KubeSource;
pub use watch::{Endpoint, Options, Snapshot, Source};

/// Pod annotation (and namespace label) that opts out: `"false"`.
pub const OPT_OUT: &str = "meshlane.io/accelerate";
/// Pod annotation (and namespace label) naming the pod's redirect mode: `reader`, `two-way` or
/// `off` (absent: the node's `--mode`). The pod's annotation wins over its namespace's label.
pub const MODE_KEY: &str = "meshlane.io/mode";
const STATUS: &str = "sidecar.istio.io/status";
const MODE: &str = "sidecar.istio.io/interceptionMode";
const TRAFFIC: &str = "traffic.sidecar.istio.io/";
const UID_RANGE: &str = "openshift.io/sa.scc.uid-range";
const ISTIO_UID: u32 = 1337;
/// istio-cni's status port, which the plugin excludes by default both ways.
const CNI_STATUS_PORT: u16 = 15020;

/// What matters about a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceFacts {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Why a pod is not accelerated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declined {
    pub reason: Reason,
    pub detail: String,
    /// What was derived before the decline, when the pod got that far.
    pub derived: Option<super::Derived>,
}

/// One API pod, mapped. `verdict`'s pod has an empty `netns`: the node fills it in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    /// namespace/name.
    pub name: String,
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub verdict: Result<Pod, Declined>,
    pub notes: Vec<String>,
}

/// The detail may quote what the pod wrote, which can be any size: it is cut for the log and
/// status.
fn decline(reason: Reason, detail: impl Into<String>) -> Declined {
    Declined {
        reason,
        detail: super::clip(&detail.into()),
        derived: None,
    }
}

fn bad(field: impl std::fmt::Display, message: impl std::fmt::Display) -> Declined {
    // Both may quote what the pod wrote (a value, an env var's name), which can be any size.
    decline(
        Reason::BadResource,
        super::clip(&format!("{field}: {message}")),
    )
}

fn ann_field(key: &str) -> String {
    format!("metadata.annotations[{key:?}]")
}

/// Decodes a pod from the API's JSON. A resource that does not decode gives the JSON path of the
/// offending field, and the pod's name when it can be read.
pub fn decode(value: serde_json::Value) -> Result<ApiPod, (String, Declined)> {
    let name = format!(
        "{}/{}",
        value["metadata"]["namespace"].as_str().unwrap_or("?"),
        value["metadata"]["name"].as_str().unwrap_or("?")
    );
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        (name, bad(path, e.into_inner()))
    })
}

/// Maps one pod. None: nothing to report (a finished pod).
pub fn map(pod: &ApiPod, ns: Option<&NamespaceFacts>) -> Option<Mapped> {
    let meta = &pod.metadata;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let name = format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("?"),
        meta.name.as_deref().unwrap_or("?")
    );
    let mut out = Mapped {
        name,
        uid: meta.uid.clone().unwrap_or_default(),
        ips: Vec::new(),
        verdict: Err(decline(Reason::NoSidecar, "")),
        notes: Vec::new(),
    };
    out.verdict = (|| {
        if meta.name.is_none() {
            return Err(bad("metadata.name", "missing"));
        }
        if out.uid.is_empty() {
            return Err(bad("metadata.uid", "missing"));
        }
        out.ips = pod_ips(pod)?;
        let mut p = map_capture(pod, ns, &out.name, &mut out.notes)?;
        p.capture_ipv6 = ipv6_captured(pod, &out.ips, &mut out.notes);
        // Declined from here on, the pod still shows what was derived about its sidecar.
        let derived = Some(super::Derived::from(&p));
        let decline = |reason, detail: &str| Declined {
            derived,
            ..decline(reason, detail)
        };
        if pod.spec.as_ref().and_then(|s| s.host_users) == Some(false) {
            // Its capture rules name the proxy's ids inside the pod's user namespace, and BPF
            // sees the host's; kubelet picks the mapping and the API does not say it. (Local
            // discovery reads it from the proxy's uid_map and accelerates such pods.)
            return Err(decline(
                Reason::UserNamespace,
                "spec.hostUsers is false: the proxy's ids in the capture rules are not the host ids BPF sees, and the API does not say how they map",
            ));
        }
        // Only a running pod with an address: before that istio-init may still be writing the
        // rules the datapath's prediction mirrors, and the sandbox may have no process yet.
        if phase != Some("Running") {
            return Err(decline(
                Reason::Pending,
                &format!(
                    "status.phase is {}: accelerated once Running",
                    phase.unwrap_or("not set")
                ),
            ));
        }
        if out.ips.is_empty() {
            return Err(decline(
                Reason::Pending,
                "no status.podIP yet: accelerated once the pod has an address",
            ));
        }
        p.uid = out.uid.clone();
        p.ips = out.ips.clone();
        Ok(p)
    })();
    // Notes quote annotations and arguments too.
    for n in &mut out.notes {
        *n = super::clip(n);
    }
    Some(out)
}

fn pod_ips(pod: &ApiPod) -> Result<Vec<IpAddr>, Declined> {
    let Some(status) = &pod.status else {
        return Ok(Vec::new());
    };
    let mut ips = Vec::new();
    for (i, p) in status.pod_ips.iter().flatten().enumerate() {
        ips.push(p.ip.parse().map_err(|_| {
            bad(
                format!("status.podIPs[{i}].ip"),
                format!("{:?} is not an IP address", p.ip),
            )
        })?);
    }
    if ips.is_empty() {
        if let Some(ip) = &status.pod_ip {
            ips.push(
                ip.parse()
                    .map_err(|_| bad("status.podIP", format!("{ip:?} is not an IP address")))?,
            );
        }
    }
    Ok(ips)
}

/// What `pilot-agent proxy <role>` the container runs (`sidecar`, `router`), when its arguments
/// say.
fn proxy_role(c: &Container) -> Option<&str> {
    let words: Vec<&str> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(String::as_str)
        .collect();
    let i = words.iter().position(|w| *w == "proxy")?;
    words.get(i + 1).copied().filter(|w| !w.starts_with('-'))
}

/// The sidecar: an `istio-proxy` container, or a native sidecar (an init container of that name
/// with `restartPolicy: Always`).
fn sidecar(pod: &ApiPod) -> Option<(&Container, bool)> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .find(|c| c.name == "istio-proxy")
        .map(|c| (c, false))
        .or_else(|| {
            spec.init_containers
                .iter()
                .flatten()
                .find(|c| c.name == "istio-proxy" && c.restart_policy.as_deref() == Some("Always"))
                .map(|c| (c, true))
        })
}

/// The arguments istio-init ran istio-iptables with: the field path, the words and the
/// container. (istio-cni's `istio-validation` runs the same flags with `--run-validation`, but
/// only checks the rules the plugin wrote from the annotations: it is not read.)
fn capture_args(pod: &ApiPod) -> Option<(String, Vec<String>, &Container)> {
    let inits = pod.spec.as_ref()?.init_containers.as_ref()?;
    let (i, c) = inits
        .iter()
        .enumerate()
        .find(|(_, c)| c.name == "istio-init")?;
    let words: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect();
    (words.iter().any(|w| w.ends_with("istio-iptables")) || words.iter().any(|w| w == "-p")).then(
        || {
            (
                format!("spec.initContainers[{i}] (istio-init) args"),
                words,
                c,
            )
        },
    )
}

/// The environment variables istio-iptables reads for a flag the command line does not set
/// (`flag.BindEnv`: the flag's long name in upper case, `-` as `_`; `-p` has none), as the flag's
/// canonical letter.
const ENV_FLAGS: [(&str, &str); 12] = [
    ("INBOUND_CAPTURE_PORT", "z"),
    ("INBOUND_TUNNEL_PORT", "e"),
    ("PROXY_UID", "u"),
    ("PROXY_GID", "g"),
    ("ISTIO_INBOUND_INTERCEPTION_MODE", "m"),
    ("ISTIO_INBOUND_PORTS", "b"),
    ("ISTIO_LOCAL_EXCLUDE_PORTS", "d"),
    ("ISTIO_EXCLUDE_INTERFACES", "c"),
    ("ISTIO_SERVICE_CIDR", "i"),
    ("ISTIO_SERVICE_EXCLUDE_CIDR", "x"),
    ("ISTIO_OUTBOUND_PORTS", "q"),
    ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "o"),
];

/// Settings istio-iptables reads only from the environment: whose traffic is captured, by the
/// process's group (default `*` and none). Any other value makes capture depend on a process's
/// groups, which the datapath's prediction does not model.
const ENV_OWNER_GROUPS: [(&str, &str); 2] = [
    ("ISTIO_OUTBOUND_OWNER_GROUPS", "*"),
    ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", ""),
];

/// istio-init's capture settings from its environment, for the flags its arguments leave unset
/// (the arguments win, as in istio-iptables). `settings` maps a flag to (field, value). A
/// variable set from a reference (`valueFrom`) cannot be read here, so the pod is declined.
fn env_settings(
    container: &Container,
    prefix: &str,
    settings: &mut BTreeMap<&'static str, (String, String)>,
    notes: &mut Vec<String>,
) -> Result<bool, Declined> {
    let env = container.env.as_deref().unwrap_or_default();
    let lookup = |name: &str| -> Result<Option<(String, String)>, Declined> {
        let Some((i, e)) = env.iter().enumerate().find(|(_, e)| e.name == name) else {
            return Ok(None);
        };
        let field = format!("{prefix} env[{i}] {name}");
        match (&e.value, &e.value_from) {
            (_, Some(_)) => Err(bad(
                field,
                "set from a reference (valueFrom): its value cannot be read, so the capture cannot be predicted",
            )),
            (v, None) => Ok(Some((field, v.clone().unwrap_or_default()))),
        }
    };
    for (name, flag) in ENV_FLAGS {
        if settings.contains_key(flag) {
            continue;
        }
        if let Some(found) = lookup(name)? {
            settings.insert(flag, found);
        }
    }
    let mut outbound = true;
    for (name, default) in ENV_OWNER_GROUPS {
        if let Some((field, value)) = lookup(name)? {
            if value.trim() != default {
                notes.push(format!(
                    "{field} = {value:?}: capture depends on the process's groups, which is not modelled; outbound hop not accelerated"
                ));
                outbound = false;
            }
        }
    }
    Ok(outbound)
}

/// What an istio-iptables flag is (its flags in `tools/istio-iptables/pkg/cmd/root.go`, plus
/// Istio's logging flags).
enum Flag {
    /// Takes a value; the canonical short letter ("_": read and not used).
    Value(&'static str),
    /// A boolean (`--flag` or `--flag=false`): never takes the next word.
    Bool,
}

fn flag_kind(flag: &str) -> Option<Flag> {
    Some(Flag::Value(match flag {
        "p" | "envoy-port" => "p",
        "z" | "inbound-capture-port" => "z",
        "u" | "proxy-uid" => "u",
        "g" | "proxy-gid" => "g",
        "m" | "istio-inbound-interception-mode" => "m",
        "b" | "istio-inbound-ports" => "b",
        "d" | "istio-local-exclude-ports" => "d",
        "o" | "istio-local-outbound-ports-exclude" => "o",
        "q" | "istio-outbound-ports" => "q",
        "i" | "istio-service-cidr" => "i",
        "x" | "istio-service-exclude-cidr" => "x",
        "e" | "inbound-tunnel-port" => "e",
        "c" | "istio-exclude-interfaces" => "c",
        // Taken with their value and not used: TPROXY settings (TPROXY pods are declined),
        // VM interfaces, the validation probe, where the rules go, logging.
        "t"
        | "istio-inbound-tproxy-mark"
        | "r"
        | "istio-inbound-tproxy-route-table"
        | "k"
        | "kube-virt-interfaces"
        | "iptables-probe-port"
        | "probe-timeout"
        | "network-namespace"
        | "log_output_level"
        | "log_caller"
        | "log_stacktrace_level"
        | "log_target"
        | "log_rotate"
        | "log_rotate_max_age"
        | "log_rotate_max_backups"
        | "log_rotate_max_size" => "_",
        "n"
        | "dry-run"
        | "f"
        | "restore-format"
        | "iptables-trace-logging"
        | "skip-rule-apply"
        | "run-validation"
        | "redirect-dns"
        | "drop-invalid"
        | "dual-stack"
        | "capture-all-dns"
        | "cni-mode"
        | "host-nsenter-exec"
        // Istio's nftables backend writes the same capture (read back by local discovery
        // from its `inet istio-proxy-nat` table).
        | "native-nftables"
        | "force-legacy-iptables"
        | "reconcile"
        | "cleanup-only"
        | "force-apply"
        | "log_as_json" => return Some(Flag::Bool),
        _ => return None,
    }))
}

/// Parses istio-iptables words into canonical flag -> value; `--flag=value` and `-f value`
/// both work. A flag istio-iptables does not have is an error naming it: whether it takes the
/// next word is unknown, so every setting after it could be misread.
fn parse_flags(words: &[String]) -> Result<BTreeMap<&'static str, String>, String> {
    let mut out = BTreeMap::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        let Some(flag) = w.strip_prefix("--").or_else(|| w.strip_prefix('-')) else {
            continue;
        };
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (flag, None),
        };
        if flag.is_empty() {
            continue;
        }
        let key = match flag_kind(flag) {
            Some(Flag::Value(key)) => key,
            Some(Flag::Bool) => continue,
            None => return Err(format!("unknown istio-iptables flag {w:?}")),
        };
        let value = match inline {
            Some(v) => v,
            None => it.next().cloned().unwrap_or_default(),
        };
        // The injector's template quotes some values for a shell ('*', '').
        let value = value.trim_matches('\'').to_string();
        out.insert(key, value);
    }
    Ok(out)
}

/// One capture setting and where it was read, for error messages.
struct Setting<'a> {
    field: String,
    value: &'a str,
}

fn ports(s: &Setting) -> Result<Vec<u16>, Declined> {
    let mut out = Vec::new();
    for p in s.value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => out.push(n),
            _ => return Err(bad(&s.field, format!("{p:?} is not a port"))),
        }
    }
    Ok(out)
}

fn port(s: &Setting) -> Result<u16, Declined> {
    match s.value.trim().parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(bad(&s.field, format!("{:?} is not a port", s.value))),
    }
}

fn id(s: &Setting) -> Result<u32, Declined> {
    s.value
        .trim()
        .parse()
        .map_err(|_| bad(&s.field, format!("{:?} is not a uid/gid", s.value)))
}

/// The CIDRs of a list, both families (istio-iptables writes each to its family's rules).
fn cidrs(s: &Setting) -> Result<Vec<Cidr>, Declined> {
    s.value
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| c.parse().map_err(|m: String| bad(&s.field, m)))
        .collect()
}

/// Whether istio-iptables captured IPv6 in this pod. It decides from the pod's own addresses
/// (`getLocalIP`): IPv6 is captured when the first address it finds is IPv6 (an IPv6-only pod),
/// or, with `ISTIO_DUAL_STACK=true`, when the pod has any IPv6 address. A dual-stack pod without
/// it has no ip6tables capture, so its IPv6 hops go straight to their destination and must not
/// be predicted as captured.
fn ipv6_captured(pod: &ApiPod, ips: &[IpAddr], notes: &mut Vec<String>) -> bool {
    let (v4, v6) = (
        ips.iter().any(IpAddr::is_ipv4),
        ips.iter().any(IpAddr::is_ipv6),
    );
    if !v6 {
        return false;
    }
    if !v4 {
        return true;
    }
    let spec = pod.spec.as_ref();
    let dual_stack = spec
        .into_iter()
        .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
        .flat_map(|c| c.env.iter().flatten())
        .any(|e| {
            e.name == "ISTIO_DUAL_STACK"
                && e.value
                    .as_deref()
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        });
    if !dual_stack {
        notes.push(
            "dual-stack pod without ISTIO_DUAL_STACK=true: istio-iptables captures IPv4 only, so its IPv6 hops are not paired".into(),
        );
    }
    dual_stack
}

/// The injection and capture of one pod; see the module docs for the precedence.
fn map_capture(
    pod: &ApiPod,
    ns: Option<&NamespaceFacts>,
    name: &str,
    notes: &mut Vec<String>,
) -> Result<Pod, Declined> {
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let spec = pod.spec.as_ref().ok_or_else(|| bad("spec", "missing"))?;
    if spec.host_network == Some(true) {
        return Err(decline(
            Reason::NotCaptured,
            "spec.hostNetwork: the pod shares the node's network namespace",
        ));
    }

    // Opt-out: the pod's annotation, else its namespace's label.
    let opt = |field: String, v: &str| match v.trim() {
        "false" => Ok(Some(false)),
        "true" => Ok(Some(true)),
        other => Err(bad(
            field,
            format!("{other:?}: expected \"true\" or \"false\""),
        )),
    };
    let pod_opt = match ann.get(OPT_OUT) {
        Some(v) => opt(ann_field(OPT_OUT), v)?,
        None => None,
    };
    let ns_opt = match ns.and_then(|n| n.labels.get(OPT_OUT)) {
        Some(v) => opt(format!("namespace metadata.labels[{OPT_OUT:?}]"), v)?,
        None => None,
    };
    match (pod_opt, ns_opt) {
        (Some(false), _) => {
            return Err(decline(
                Reason::OptedOut,
                format!("{} is \"false\"", ann_field(OPT_OUT)),
            ))
        }
        (None, Some(false)) => {
            return Err(decline(
                Reason::OptedOut,
                format!("namespace label {OPT_OUT}=false"),
            ))
        }
        _ => {}
    }

    // Injected?
    let status = ann.get(STATUS);
    let Some((proxy, native)) = sidecar(pod) else {
        return Err(decline(
            Reason::NoSidecar,
            match status {
                Some(_) => format!("{STATUS} is set but there is no istio-proxy container"),
                None => "not injected (no istio-proxy container)".to_string(),
            },
        ));
    };
    match status {
        None => notes.push(format!(
            "istio-proxy container without the {STATUS} annotation; treated as injected"
        )),
        Some(s) => {
            if let Err(e) = serde_json::from_str::<serde_json::Value>(s) {
                notes.push(format!("{}: not JSON ({e}); ignored", ann_field(STATUS)));
            }
        }
    }
    if native {
        notes.push("native sidecar (init container with restartPolicy: Always)".into());
    }
    // A gateway runs the same container as `proxy router`: nothing is captured around it.
    if let Some(role) = proxy_role(proxy) {
        if role != "sidecar" {
            return Err(decline(
                Reason::NotCaptured,
                format!("istio-proxy runs `proxy {role}` (a gateway): no traffic is captured"),
            ));
        }
    }

    // Capture settings: the arguments istio-init ran. Without istio-init the istio-cni plugin
    // wrote the rules, from the pod's annotations (the injector copies the mesh-wide values
    // there) and its own defaults; istio-validation's arguments only check what it wrote.
    let args = capture_args(pod);
    let cni = args.is_none();
    // The istio-cni plugin only writes rules for pods the injector marked (it skips a pod
    // without the status annotation), so such a pod has no capture at all.
    if cni && status.is_none() {
        return Err(decline(
            Reason::NotCaptured,
            format!(
                "no istio-init container and no {STATUS} annotation: the istio-cni plugin skips such a pod, so nothing is captured"
            ),
        ));
    }
    // Flags with which istio-iptables writes no capture at all: whatever else the arguments
    // say, nothing is redirected around this proxy.
    if let Some((field, words, _)) = &args {
        if let Some(w) = words.iter().find(|w| {
            let flag = w.trim_start_matches('-');
            let (flag, value) = flag.split_once('=').unwrap_or((flag, "true"));
            w.starts_with('-')
                && matches!(flag, "cleanup-only" | "dry-run" | "n" | "skip-rule-apply")
                && value != "false"
        }) {
            return Err(decline(
                Reason::NotCaptured,
                format!("{field}: {w} writes no capture rules"),
            ));
        }
    }
    let nftables = args.as_ref().is_some_and(|(_, w, _)| {
        w.iter()
            .any(|w| w == "--native-nftables" || w == "--native-nftables=true")
    });
    if nftables {
        notes.push("istio-init writes Istio's native nftables capture (--native-nftables)".into());
    }
    let mut flags: BTreeMap<&'static str, (String, String)> = BTreeMap::new();
    let mut owner_groups_ok = true;
    if let Some((field, words, container)) = &args {
        flags = parse_flags(words)
            .map_err(|e| {
                bad(
                    field,
                    format!("{e}: the capture cannot be predicted from these arguments"),
                )
            })?
            .into_iter()
            .map(|(flag, v)| (flag, (format!("{field} -{flag}"), v)))
            .collect();
        // istio-init runs istio-iptables with its own environment.
        let prefix = field.trim_end_matches(" args");
        owner_groups_ok = env_settings(container, prefix, &mut flags, notes)?;
    }
    // A flag's value from the arguments (or istio-init's environment) when Istio ran any, else
    // the annotation `traffic.sidecar.istio.io/<annotation>` that istio-cni reads.
    let get = |flag: &'static str, annotation: Option<&str>| -> Option<Setting> {
        if args.is_some() {
            return flags.get(flag).map(|(field, v)| Setting {
                field: field.clone(),
                value: v.as_str(),
            });
        }
        let key = format!("{TRAFFIC}{}", annotation?);
        ann.get(&key).map(|v| Setting {
            field: ann_field(&key),
            value: v.as_str(),
        })
    };

    // Interception mode: the arguments, else the annotation (both names are Istio's).
    let mode = match (flags.get("m"), ann.get(MODE)) {
        (Some((field, m)), a) => {
            if let Some(a) = a.filter(|a| !a.eq_ignore_ascii_case(m)) {
                notes.push(format!(
                    "{} says {a} but {field} is {m}; using {field}",
                    ann_field(MODE)
                ));
            }
            Setting {
                field: field.clone(),
                value: m.as_str(),
            }
        }
        (None, Some(a)) => Setting {
            field: ann_field(MODE),
            value: a.as_str(),
        },
        (None, None) => Setting {
            field: String::new(),
            value: "REDIRECT",
        },
    };
    match mode.value.trim().to_ascii_uppercase().as_str() {
        "REDIRECT" => {}
        "TPROXY" => {
            return Err(decline(
                Reason::Tproxy,
                format!(
                    "{} is TPROXY: Envoy runs as uid 0 / gid 1337 and connects to the app from the client's address, not 127.0.0.6",
                    mode.field
                ),
            ))
        }
        "NONE" => {
            return Err(decline(
                Reason::NotCaptured,
                format!("{} is NONE: no traffic is captured", mode.field),
            ))
        }
        other => {
            return Err(bad(
                mode.field,
                format!("{other:?}: expected REDIRECT, TPROXY or NONE"),
            ))
        }
    }
    if cni {
        notes.push(
            "no istio-init: istio-cni's rules, from the pod's annotations and the plugin's defaults".into(),
        );
    }

    // Proxy identity.
    let sc_user = proxy.security_context.as_ref().and_then(|s| s.run_as_user);
    let sc_group = proxy.security_context.as_ref().and_then(|s| s.run_as_group);
    let pod_sc = spec.security_context.as_ref();
    let from_ctx = |v: Option<i64>, field: &str| -> Result<Option<u32>, Declined> {
        v.map(|n| u32::try_from(n).map_err(|_| bad(field, format!("{n} is not a uid/gid"))))
            .transpose()
    };
    let ctx_uid = from_ctx(sc_user, "istio-proxy securityContext.runAsUser")?.or(from_ctx(
        pod_sc.and_then(|s| s.run_as_user),
        "spec.securityContext.runAsUser",
    )?);
    let ctx_gid = from_ctx(sc_group, "istio-proxy securityContext.runAsGroup")?.or(from_ctx(
        pod_sc.and_then(|s| s.run_as_group),
        "spec.securityContext.runAsGroup",
    )?);
    // OpenShift's range start is the uid istio-init exempts when nothing else names one.
    let openshift = || {
        ns.and_then(|n| n.annotations.get(UID_RANGE)).map(|r| {
            r.split('/')
                .next()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .ok_or_else(|| {
                    bad(
                        format!("namespace metadata.annotations[{UID_RANGE:?}]"),
                        format!("{r:?}: expected START/SIZE"),
                    )
                })
        })
    };
    let uid_setting = get("u", None);
    let arg_uid = uid_setting.as_ref().map(id).transpose()?;
    let uid_field = uid_setting.map(|s| s.field).unwrap_or_default();
    let arg_gid = get("g", None).map(|s| id(&s)).transpose()?;
    let (proxy_uid, proxy_gid) = if cni {
        // The plugin exempts the istio-proxy container's own runAsUser and runAsGroup (not the
        // pod's), each 1337 where unset or 0 (istio-cni's NewRedirect).
        let own = |v: Option<i64>, field: &str| -> Result<u32, Declined> {
            Ok(from_ctx(v, field)?.filter(|&n| n != 0).unwrap_or(ISTIO_UID))
        };
        (
            own(sc_user, "istio-proxy securityContext.runAsUser")?,
            own(sc_group, "istio-proxy securityContext.runAsGroup")?,
        )
    } else {
        let runs_as = match ctx_uid {
            Some(u) => Some(u),
            None => openshift().transpose()?,
        };
        let uid = match (arg_uid, runs_as) {
            (Some(a), Some(r)) if a != r => {
                notes.push(format!(
                    "istio-proxy runs as uid {r} but {uid_field} exempts {a}; using {a}"
                ));
                a
            }
            (Some(a), _) => a,
            (None, Some(r)) => r,
            (None, None) => ISTIO_UID,
        };
        // istio-iptables defaults the gid to the uid.
        (uid, arg_gid.or(ctx_gid).unwrap_or(uid))
    };

    let outbound_port = get("p", None)
        .map(|s| port(&s))
        .transpose()?
        .unwrap_or(15001);
    let inbound_port = get("z", None)
        .map(|s| port(&s))
        .transpose()?
        .unwrap_or(15006);
    // The plugin's default for excludeOutboundPorts is its status port, 15020.
    let mut exclude_outbound_ports = get("o", Some("excludeOutboundPorts"))
        .map(|s| ports(&s))
        .transpose()?
        .unwrap_or_else(|| {
            if cni {
                vec![CNI_STATUS_PORT]
            } else {
                Vec::new()
            }
        });
    // DNS capture (istio-iptables --redirect-dns; istio-cni follows the sidecar's
    // ISTIO_META_DNS_CAPTURE) sends TCP port 53 to the agent, never to Envoy: never predict it
    // as captured.
    let dns_flag = args.as_ref().is_some_and(|(_, w, _)| {
        w.iter()
            .any(|w| w == "--redirect-dns" || w == "--redirect-dns=true")
    });
    let dns_env = proxy.env.iter().flatten().any(|e| {
        e.name == "ISTIO_META_DNS_CAPTURE"
            && e.value
                .as_deref()
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    });
    if (dns_flag || dns_env) && !exclude_outbound_ports.contains(&53) {
        notes.push("DNS capture: TCP port 53 goes to the agent, treated as excluded".into());
        exclude_outbound_ports.push(53);
    }
    let mut exclude_inbound_ports = get("d", Some("excludeInboundPorts"))
        .map(|s| ports(&s))
        .transpose()?
        .unwrap_or_else(|| {
            if cni {
                vec![CNI_STATUS_PORT]
            } else {
                Vec::new()
            }
        });
    if cni {
        // The plugin always adds the agent's and Envoy's own ports.
        for p in [CNI_STATUS_PORT, 15021, 15090] {
            if !exclude_inbound_ports.contains(&p) {
                exclude_inbound_ports.push(p);
            }
        }
    }
    // istio-iptables always returns the inbound tunnel port (-e, default 15008) before capture.
    let tunnel = match get("e", None) {
        Some(s) => port(&s)?,
        None => 15008,
    };
    if !exclude_inbound_ports.contains(&tunnel) {
        exclude_inbound_ports.push(tunnel);
    }
    let mut accelerate_inbound = true;
    let mut include_inbound_ports = Vec::new();
    if let Some(s) = get("b", Some("includeInboundPorts")) {
        if s.value.trim().is_empty() {
            notes.push(format!("{} is empty: inbound is not captured", s.field));
            accelerate_inbound = false;
        } else if !s.value.split(',').any(|p| p.trim() == "*") {
            include_inbound_ports = ports(&s)?;
        }
    }
    let mut accelerate_outbound = owner_groups_ok;
    if let Some(s) = get("q", Some("includeOutboundPorts")) {
        if !ports(&s)?.is_empty() {
            notes.push(format!(
                "{}: an outbound port include list is not modelled; outbound hop not accelerated",
                s.field
            ));
            accelerate_outbound = false;
        }
    }
    // istio-iptables returns traffic leaving through these NICs before capture (-A OUTPUT -o nic
    // -j RETURN); which NIC a connection takes is routing's choice, not predicted here.
    if let Some(s) = get("c", Some("excludeInterfaces")) {
        if !s.value.trim().is_empty() {
            notes.push(format!(
                "{} = {:?}: traffic through those interfaces is not captured and the route is not predicted; outbound hop not accelerated",
                s.field, s.value
            ));
            accelerate_outbound = false;
        }
    }
    let exclude_outbound_cidrs = match get("x", Some("excludeOutboundIPRanges")) {
        Some(s) => cidrs(&s)?,
        None => Vec::new(),
    };
    let include_outbound = match get("i", Some("includeOutboundIPRanges")) {
        None => OutboundRanges::All,
        Some(s) if s.value.split(',').any(|c| c.trim() == "*") => OutboundRanges::All,
        Some(s) => OutboundRanges::Only(cidrs(&s)?),
    };

    let parse_mode = |field: String, v: &str| {
        crate::mode::Mode::parse(v).ok_or_else(|| {
            bad(
                field,
                format!("{v:?}: expected \"reader\", \"two-way\", \"sidecar\" or \"off\""),
            )
        })
    };
    let mode = match (ann.get(MODE_KEY), ns.and_then(|n| n.labels.get(MODE_KEY))) {
        (Some(v), _) => Some(parse_mode(ann_field(MODE_KEY), v)?),
        (None, Some(v)) => Some(parse_mode(
            format!("namespace metadata.labels[{MODE_KEY:?}]"),
            v,
        )?),
        (None, None) => None,
    };

    let pod = Pod {
        name: name.to_string(),
        uid: String::new(),
        ips: Vec::new(),
        interception: crate::model::Interception::Redirect,
        netns: PathBuf::new(),
        proxy_uid,
        proxy_gid,
        outbound_port,
        inbound_port,
        inbound_bind: std::net::Ipv4Addr::new(127, 0, 0, 6),
        inbound_bind6: crate::model::ISTIO_INBOUND_BIND6,
        capture_ipv6: false,
        exclude_outbound_ports,
        exclude_inbound_ports,
        include_inbound_ports,
        exclude_outbound_cidrs,
        include_outbound,
        accelerate_outbound,
        accelerate_inbound,
        mode,
    };
    if let Err(e) = crate::policy::pod_policy(&pod) {
        return Err(decline(Reason::Policy, e.to_string()));
    }
    Ok(pod)
}
