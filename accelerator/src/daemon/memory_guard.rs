//! Which accelerated pods are memory-tight: a memory group of theirs has less room than the
//! headroom, so a redirect into one of their sockets could fail in the writer's `sendmsg`
//! (docs/DESIGN.md, "Memory"). Polled, so it is a margin, not a guarantee: what fills a group
//! faster than one pass plus the headroom can still fail a redirect.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::node::memory::{self, Group, Mounts, Room};

/// How often the rooms are read: a few small files per pod.
pub const EVERY: Duration = Duration::from_millis(250);
/// How often the processes of each pod (and so its groups) are looked up again: a pass over
/// the node's /proc.
const GROUPS_EVERY: Duration = Duration::from_secs(5);

/// An accelerated pod to watch.
pub struct Watched {
    pub cookie: u64,
    pub name: String,
    pub netns: PathBuf,
}

/// A pod found tight, with the group that has the least room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tight {
    pub pod: String,
    pub room: Room,
}

impl Tight {
    /// For logs and the pod's status notes.
    pub fn describe(&self, headroom: u64) -> String {
        format!(
            "memory tight: {} has {} of room (limit {}), under the {} headroom; new hops stay on TCP and redirected directions moved to TCP",
            self.room.group.display(),
            mib(self.room.bytes),
            mib(self.room.limit),
            mib(headroom),
        )
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

pub struct MemoryGuard {
    /// 0: off.
    pub headroom: u64,
    proc_root: PathBuf,
    mounts: Option<Mounts>,
    last: Option<Instant>,
    groups: BTreeMap<u64, Vec<Group>>,
    groups_read: Option<Instant>,
    tight: BTreeMap<u64, Tight>,
    warned: bool,
}

/// Whether a pod is tight after a pass: below the headroom it becomes tight, and it stays
/// tight until its room is twice the headroom, so a group near the line does not flap.
pub fn decide(was_tight: bool, room: Option<u64>, headroom: u64) -> bool {
    match room {
        None => false,
        Some(r) if was_tight => r < headroom.saturating_mul(2),
        Some(r) => r < headroom,
    }
}

impl MemoryGuard {
    pub fn new(headroom: u64, proc_root: PathBuf) -> MemoryGuard {
        MemoryGuard {
            headroom,
            proc_root,
            mounts: None,
            last: None,
            groups: BTreeMap::new(),
            groups_read: None,
            tight: BTreeMap::new(),
            warned: false,
        }
    }

    pub fn tight(&self) -> &BTreeMap<u64, Tight> {
        &self.tight
    }

    /// Whether a pass is due: every [`EVERY`] unless the guard is off.
    pub fn due(&self) -> bool {
        self.headroom != 0 && self.last.is_none_or(|t| t.elapsed() >= EVERY)
    }

    /// When the next pass is due (at once before the first); None when the guard is off. The
    /// daemon's loop sleeps until then.
    pub fn next_due(&self) -> Option<Instant> {
        (self.headroom != 0).then(|| self.last.map_or_else(Instant::now, |t| t + EVERY))
    }

    /// One pass: returns whether the set of tight pods changed.
    pub fn run(&mut self, pods: &[Watched]) -> bool {
        self.last = Some(Instant::now());
        let mounts = match &self.mounts {
            Some(m) => m.clone(),
            None => match Mounts::read() {
                Ok(m) => self.mounts.insert(m).clone(),
                Err(e) => {
                    if !std::mem::replace(&mut self.warned, true) {
                        tracing::warn!(error = %e, "cannot read the cgroup mounts; memory-tight pods are not detected");
                    }
                    return false;
                }
            },
        };
        let listed: Vec<u64> = pods.iter().map(|p| p.cookie).collect();
        let stale = self.groups_read.is_none_or(|t| t.elapsed() >= GROUPS_EVERY)
            || listed.iter().any(|c| !self.groups.contains_key(c));
        if stale {
            self.read_groups(pods, &mounts);
        }
        let mut tight = BTreeMap::new();
        for pod in pods {
            let least = self
                .groups
                .get(&pod.cookie)
                .into_iter()
                .flatten()
                // A group that went away (its process exited) is simply not counted; the next
                // lookup of the pod's groups drops it.
                .filter_map(|g| memory::room(g).ok().flatten())
                .min_by_key(|r| r.bytes);
            let was = self.tight.contains_key(&pod.cookie);
            if decide(was, least.as_ref().map(|r| r.bytes), self.headroom) {
                let room = least.or_else(|| self.tight.get(&pod.cookie).map(|t| t.room.clone()));
                if let Some(room) = room {
                    tight.insert(
                        pod.cookie,
                        Tight {
                            pod: pod.name.clone(),
                            room,
                        },
                    );
                }
            }
        }
        let changed = tight.keys().ne(self.tight.keys());
        for (cookie, t) in &tight {
            if !self.tight.contains_key(cookie) {
                tracing::warn!(pod = %t.pod, netns_cookie = cookie, "{}", t.describe(self.headroom));
            }
        }
        for (cookie, t) in &self.tight {
            if !tight.contains_key(cookie) {
                tracing::info!(pod = %t.pod, netns_cookie = cookie, "memory room is back over twice the headroom: new hops are paired again");
            }
        }
        self.tight = tight;
        changed
    }

    fn read_groups(&mut self, pods: &[Watched], mounts: &Mounts) {
        self.groups_read = Some(Instant::now());
        let by_netns = match memory::processes_by_netns(&self.proc_root) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(proc_root = %self.proc_root.display(), error = %e, "cannot list processes for the memory check");
                return;
            }
        };
        self.groups = pods
            .iter()
            .map(|p| {
                let pids = memory::netns_key(&p.netns)
                    .ok()
                    .and_then(|k| by_netns.get(&k))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                (
                    p.cookie,
                    memory::groups_of_processes(&self.proc_root, pids, mounts),
                )
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tight_below_the_headroom_and_released_over_twice_it() {
        let h = 16 << 20;
        assert!(!decide(false, None, h));
        assert!(!decide(true, None, h));
        assert!(decide(false, Some(h - 1), h));
        assert!(!decide(false, Some(h), h));
        assert!(decide(true, Some(2 * h - 1), h));
        assert!(!decide(true, Some(2 * h), h));
        // Off: nothing is ever tight.
        assert!(!decide(false, Some(0), 0));
    }
}
