//! Discovery's vocabulary (what a source found: pods, [`Skipped`] namespaces with a
//! [`Reason`], [`Note`]s) and its sources: the local node ([`local`]), the Kubernetes API
//! ([`kubernetes`]), and the xDS cross-check ([`xds`]).
//!
//! The local source: a pass ([`discover`]) finds every Envoy process in `/proc`, groups them by network
//! namespace (the host's own is never a pod), and for each namespace reads the same facts two
//! ways:
//! - the capture rules istio-init left there (`iptables-save`, [`iptables`]): uid/gid exempted,
//!   capture ports, excluded ports and ranges. These decide where the kernel sends traffic, so
//!   they win;
//! - the sidecar's admin API (`/config_dump` on its 127.0.0.1 listening socket, [`envoy_admin`]):
//!   capture listeners, inbound source address, and the pod's name from the node id.
//!
//! A disagreement between the two is reported as a [`Note`] and iptables is used. Namespaces
//! that carry Istio's rules but run no sidecar, sidecars without capture rules (gateways),
//! TPROXY pods and unreadable sidecars are reported in [`Discovery::skipped`] with a [`Reason`],
//! never as pods. Nothing here panics on bad input; errors name the field.

pub mod backoff;
pub mod envoy_admin;
pub mod iptables;
pub mod kubernetes;
mod local;
pub mod nftables;
pub mod procfs;
pub mod source;
mod wake;
pub mod xds;

pub use local::{discover, Discoverer, Options};
pub use source::{Health, Reading, Source};
pub use wake::Wake;

use std::{collections::BTreeMap, path::PathBuf};

use crate::model::Pod;

/// At most this many characters of a peer's text go into one error message or note.
const EXCERPT_CHARS: usize = 200;

/// `text` for an error message or a status note, cut to [`EXCERPT_CHARS`] characters (with its
/// full size said): the text comes from a pod, and one bad answer must not put kilobytes into
/// the log and the status API.
pub(crate) fn clip(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], text.len()),
    }
}

/// Like [`clip`], quoted.
pub(crate) fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
    }
}

/// Why a namespace that looked like a pod is not accelerated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Istio's capture rules, but no proxy process.
    NoSidecar,
    /// A proxy, but no ISTIO_* rules (a gateway, or istio-init has not run).
    NotCaptured,
    /// Inbound interception by TPROXY.
    Tproxy,
    /// The namespace vanished or cannot be opened.
    NetnsNotFound,
    /// `iptables-save` failed there, or its output is not an Istio capture.
    BadCapture,
    /// No admin socket, or it did not answer.
    AdminUnreachable,
    /// The admin API answered with a configuration without capture listeners.
    BadAdminConfig,
    /// The pod does not fit the datapath (too many ports or ranges).
    Policy,
    /// Opted out: `accelerate = false` in the pod list file, or `meshlane.io/accelerate: "false"`.
    OptedOut,
    /// A Kubernetes resource that does not decode, or a bad annotation or capture argument
    /// (the detail names the field).
    BadResource,
    /// The pod has a user namespace of its own, and the proxy ids its capture rules name cannot
    /// be turned into the host ids BPF sees (no mapping for them, or, from the Kubernetes API
    /// alone, `hostUsers: false` with the mapping unknown).
    UserNamespace,
    /// A meshed pod not running yet (phase Pending, or no pod IP): istio-init may still be
    /// writing its rules. Accelerated once Running with an IP.
    Pending,
}

impl Reason {
    /// Every reason, for the checks that each has its label and its API enum value.
    pub const ALL: [Reason; 12] = [
        Reason::NoSidecar,
        Reason::NotCaptured,
        Reason::UserNamespace,
        Reason::Tproxy,
        Reason::NetnsNotFound,
        Reason::BadCapture,
        Reason::AdminUnreachable,
        Reason::BadAdminConfig,
        Reason::Policy,
        Reason::OptedOut,
        Reason::BadResource,
        Reason::Pending,
    ];

    /// A stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoSidecar => "no_sidecar",
            Reason::NotCaptured => "not_captured",
            Reason::UserNamespace => "user_namespace",
            Reason::Tproxy => "tproxy_mode",
            Reason::NetnsNotFound => "netns_not_found",
            Reason::BadCapture => "bad_capture_rules",
            Reason::AdminUnreachable => "admin_api_unreachable",
            Reason::BadAdminConfig => "bad_admin_config",
            Reason::Policy => "policy",
            Reason::OptedOut => "opted_out",
            Reason::BadResource => "bad_resource",
            Reason::Pending => "pending",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespace seen but not accelerated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub name: String,
    pub netns: PathBuf,
    pub reason: Reason,
    pub detail: String,
    /// What was derived about its sidecar before it was declined, when it got that far.
    pub derived: Option<Derived>,
}

/// A sidecar's identity and capture ports as discovery derived them (status shows them for
/// pods that are not accelerated too, instead of zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Derived {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
}

impl From<&Pod> for Derived {
    fn from(p: &Pod) -> Derived {
        Derived {
            proxy_uid: p.proxy_uid,
            proxy_gid: p.proxy_gid,
            outbound_port: p.outbound_port,
            inbound_port: p.inbound_port,
        }
    }
}

/// Something worth a log line about a pod that is accelerated (perhaps only one hop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub pod: String,
    pub message: String,
}

/// The outcome of one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    pub pods: Vec<Pod>,
    pub skipped: Vec<Skipped>,
    pub notes: Vec<Note>,
}

impl Discovery {
    /// Folds in the local pod list file ([`crate::config::load_all`]), the operator's word:
    /// a listed pod replaces whatever discovery read in the same network namespace, and an
    /// opted-out one is skipped. Namespaces are matched by identity (inode), not by path.
    pub fn with_pod_list(mut self, list: crate::config::PodList) -> Discovery {
        let ino = |p: &std::path::Path| procfs::netns_inode(p).ok();
        // Namespace identity -> the name the file gives it.
        let mut in_file: BTreeMap<u64, String> = BTreeMap::new();
        for (name, netns) in list
            .pods
            .iter()
            .map(|p| (&p.name, &p.netns))
            .chain(list.opted_out.iter().map(|o| (&o.name, &o.netns)))
        {
            if let Some(i) = ino(netns) {
                in_file.entry(i).or_insert_with(|| name.clone());
            }
        }
        let mut replaced = Vec::new();
        self.pods
            .retain(|p| match ino(&p.netns).and_then(|i| in_file.get(&i)) {
                Some(file_name) => {
                    replaced.push((file_name.clone(), p.name.clone()));
                    false
                }
                None => true,
            });
        self.notes
            .retain(|n| !replaced.iter().any(|(_, found)| *found == n.pod));
        self.skipped
            .retain(|s| ino(&s.netns).is_none_or(|i| !in_file.contains_key(&i)));
        for (file_name, found) in replaced {
            self.notes.push(Note {
                pod: file_name,
                message: format!(
                    "the pod list file names this namespace (discovered as {found}); the file wins"
                ),
            });
        }
        self.pods.extend(list.pods);
        self.skipped
            .extend(list.opted_out.into_iter().map(|o| Skipped {
                name: o.name,
                netns: o.netns,
                reason: Reason::OptedOut,
                detail: "accelerate = false in the pod list file".into(),
                derived: None,
            }));
        self
    }
}

/// The operator's namespace choice (`--namespace-include`, `--namespace-exclude`): which
/// discovered pods may be accelerated, by the namespace in their `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceFilter {
    /// If not empty, only these namespaces.
    pub include: Vec<String>,
    /// Never these (wins over `include`).
    pub exclude: Vec<String>,
}

impl NamespaceFilter {
    /// None if `pod` may be accelerated, else why not.
    pub fn refuses(&self, pod: &str) -> Option<String> {
        let ns = pod.split_once('/').map_or(pod, |(ns, _)| ns);
        if self.exclude.iter().any(|e| e == ns) {
            return Some(format!("namespace {ns} is excluded (--namespace-exclude)"));
        }
        if !self.include.is_empty() && !self.include.iter().any(|i| i == ns) {
            return Some(format!(
                "namespace {ns} is not among the included ones (--namespace-include {})",
                self.include.join(",")
            ));
        }
        None
    }

    /// Moves the pods it refuses to `skipped`, as opted out.
    pub fn apply(&self, d: &mut Discovery) {
        if self.include.is_empty() && self.exclude.is_empty() {
            return;
        }
        let mut kept = Vec::with_capacity(d.pods.len());
        for pod in std::mem::take(&mut d.pods) {
            match self.refuses(&pod.name) {
                None => kept.push(pod),
                Some(why) => d.skipped.push(Skipped {
                    derived: Some((&pod).into()),
                    name: pod.name,
                    netns: pod.netns,
                    reason: Reason::OptedOut,
                    detail: why,
                }),
            }
        }
        d.pods = kept;
    }
}

#[cfg(test)]
mod excerpt_tests {
    use super::{clip, excerpt};

    #[test]
    fn long_peer_text_is_cut_on_a_character_and_sized() {
        assert_eq!(clip("short"), "short");
        assert_eq!(excerpt("a\"b"), "\"a\\\"b\"");
        let long = "é".repeat(300);
        let c = clip(&long);
        assert!(
            c.starts_with(&"é".repeat(200)) && c.ends_with("... (600 bytes)"),
            "{c}"
        );
        assert!(excerpt(&long).ends_with("\"... (600 bytes)"));
    }
}

#[cfg(test)]
mod namespace_filter_tests {
    use super::NamespaceFilter;

    #[test]
    fn exclude_wins_and_include_limits() {
        let f = NamespaceFilter {
            include: vec!["shop".into(), "web".into()],
            exclude: vec!["web".into()],
        };
        assert_eq!(f.refuses("shop/cart-0"), None);
        assert!(f.refuses("web/front-0").unwrap().contains("excluded"));
        assert!(f.refuses("kube-system/dns").unwrap().contains("not among"));
        assert_eq!(NamespaceFilter::default().refuses("any/pod"), None);
    }
}
