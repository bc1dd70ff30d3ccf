//! How much room a pod's memory cgroups leave for socket memory.
//!
//! A redirect charges the reader's memory group from inside the writer's `sendmsg`, and a charge
//! that fails there is the writer's `ENOMEM` (on cgroup v2 it may first reclaim, or invoke the
//! group's OOM killer, in the writer's context), where plain TCP charges in softirq and drops
//! what does not fit (docs/DESIGN.md, "Memory"). So the daemon reads the room of every memory
//! group a pod's processes are in, and of each ancestor, and marks the pod tight below a
//! headroom.
//!
//! - cgroup v1 charges socket memory only to a group whose TCP limit was set
//!   (`memory.kmem.tcp.limit_in_bytes`), hierarchically: the room is that limit minus
//!   `memory.kmem.tcp.usage_in_bytes`, for the group and each ancestor with a limit.
//! - cgroup v2 charges socket memory to `memory.max`: the room is `memory.max` minus
//!   `memory.current`, plus the group's `inactive_file` (`memory.stat`), which a charge may
//!   reclaim first.

use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Where the memory controller is mounted, from `/proc/self/mountinfo`.
///
/// A process's `/proc/PID/cgroup` paths and a cgroup mount's root (mountinfo's fourth field)
/// are both written relative to the reader's cgroup namespace, so a group is found under the
/// mount whose root is a prefix of its path. In a DaemonSet with a private cgroup namespace the
/// container's own `/sys/fs/cgroup` (root `/`) cannot hold a pod's group (`/../../kubepods/..`),
/// but the host's hierarchy mounted with `--cgroup`'s hostPath (root `/../..`) does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mounts {
    /// cgroup-v1 hierarchies with the memory controller (hybrid and legacy hosts).
    pub v1_memory: Vec<Mount>,
    /// cgroup-v2 hierarchies; used when the memory controller is not on v1.
    pub v2: Vec<Mount>,
}

/// One mount of a cgroup hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    /// The mounted group, relative to this process's cgroup namespace (`/`: the namespace's
    /// root; `/../..`: two levels above it).
    pub root: String,
}

impl Mount {
    /// The directory of the group at `path` (as `/proc/PID/cgroup` writes it), if it is under
    /// this mount.
    fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let root: Vec<&str> = self.root.split('/').filter(|c| !c.is_empty()).collect();
        let path: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let rest = path.strip_prefix(root.as_slice())?;
        if rest.contains(&"..") {
            return None;
        }
        Some(rest.iter().fold(self.point.clone(), |d, c| d.join(c)))
    }
}

impl Mounts {
    pub fn read() -> io::Result<Mounts> {
        Ok(Mounts::parse(&std::fs::read_to_string(
            "/proc/self/mountinfo",
        )?))
    }

    /// Reads `mountinfo` lines: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [TAGS] - FSTYPE SOURCE
    /// SUPEROPTS`.
    pub fn parse(mountinfo: &str) -> Mounts {
        let mut m = Mounts::default();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mut l = left.split(' ').skip(3);
            let (Some(root), Some(point)) = (l.next(), l.next()) else {
                continue;
            };
            let mut r = right.split(' ');
            let (fstype, _source, opts) = (r.next(), r.next(), r.next().unwrap_or(""));
            let mount = Mount {
                point: PathBuf::from(unescape(point)),
                root: unescape(root),
            };
            match fstype {
                Some("cgroup") if opts.split(',').any(|o| o == "memory") => m.v1_memory.push(mount),
                Some("cgroup2") => m.v2.push(mount),
                _ => {}
            }
        }
        m
    }

    fn dir_of(mounts: &[Mount], path: &str) -> Option<(PathBuf, PathBuf)> {
        mounts
            .iter()
            .find_map(|m| Some((m.dir_of(path)?, m.point.clone())))
    }
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One memory cgroup, as a directory under a mount of its hierarchy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Group {
    pub dir: PathBuf,
    pub v1: bool,
    /// The mount point `dir` is under: ancestors are read up to it.
    pub mount: PathBuf,
}

/// The memory group a process is in, from its `/proc/PID/cgroup` text: the v1 memory line where
/// the controller is on v1, else the v2 line. None when neither hierarchy is mounted here.
/// None also when no mount here shows the group.
pub fn group_of(proc_cgroup: &str, mounts: &Mounts) -> Option<Group> {
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if !mounts.v1_memory.is_empty() && controllers.split(',').any(|c| c == "memory") {
            let (dir, mount) = Mounts::dir_of(&mounts.v1_memory, path)?;
            return Some(Group {
                dir,
                v1: true,
                mount,
            });
        }
        if controllers.is_empty() {
            v2 = Mounts::dir_of(&mounts.v2, path).map(|(dir, mount)| Group {
                dir,
                v1: false,
                mount,
            });
        }
    }
    if !mounts.v1_memory.is_empty() {
        // The controller is on v1 but the process has no memory line: nothing charges it.
        return None;
    }
    v2
}

/// The least room found in a group or one of its ancestors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    pub bytes: u64,
    /// The limit of the group that has the least room.
    pub limit: u64,
    /// That group.
    pub group: PathBuf,
}

/// A v1 TCP limit or v2 `memory.max` at or above this is "no limit" (the kernel's
/// `PAGE_COUNTER_MAX` pages, rounded down to a page, is just under 2^63).
const UNLIMITED: u64 = 1 << 62;

/// The least room in `g` and each ancestor below its hierarchy's mount; None when no group on
/// the way has a limit (socket memory can then fail only under the node's `tcp_mem`, which
/// plain TCP meets too). A group that vanished meanwhile (its pod went) is an error.
pub fn room(g: &Group) -> io::Result<Option<Room>> {
    let root = g.mount.as_path();
    let mut least: Option<Room> = None;
    let mut dir = g.dir.as_path();
    loop {
        if let Some(r) = room_of(dir, g.v1)? {
            if least.as_ref().is_none_or(|l| r.bytes < l.bytes) {
                least = Some(r);
            }
        }
        if dir == root {
            break;
        }
        match dir.parent() {
            Some(p) if p.starts_with(root) => dir = p,
            _ => break,
        }
    }
    Ok(least)
}

/// The room of one group, None when it has no limit of its own (the root of a hierarchy has
/// none of these files).
fn room_of(dir: &Path, v1: bool) -> io::Result<Option<Room>> {
    let read = |name: &str| -> io::Result<Option<String>> {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir.exists() => Ok(None),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("{}: {e}", dir.join(name).display()),
            )),
        }
    };
    let number = |name: &str, v: &str| -> io::Result<u64> {
        v.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a number: {v:?}", dir.join(name).display()),
            )
        })
    };
    let (limit, used) = if v1 {
        let Some(limit) = read("memory.kmem.tcp.limit_in_bytes")? else {
            return Ok(None);
        };
        let limit = number("memory.kmem.tcp.limit_in_bytes", &limit)?;
        if limit >= UNLIMITED {
            return Ok(None);
        }
        let usage = read("memory.kmem.tcp.usage_in_bytes")?.unwrap_or_default();
        (limit, number("memory.kmem.tcp.usage_in_bytes", &usage)?)
    } else {
        let Some(max) = read("memory.max")? else {
            return Ok(None);
        };
        if max == "max" {
            return Ok(None);
        }
        let limit = number("memory.max", &max)?;
        if limit >= UNLIMITED {
            return Ok(None);
        }
        let current = read("memory.current")?.unwrap_or_default();
        let current = number("memory.current", &current)?;
        let reclaimable = read("memory.stat")?
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("inactive_file ")?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        (limit, current.saturating_sub(reclaimable))
    };
    Ok(Some(Room {
        bytes: limit.saturating_sub(used),
        limit,
        group: dir.to_path_buf(),
    }))
}

/// The processes of each network namespace on the node, keyed by the namespace's device and
/// inode (what `stat` of `/run/netns/NAME` or `/proc/PID/ns/net` gives). Processes that exit
/// meanwhile, or whose namespace cannot be read, are left out.
pub fn processes_by_netns(proc_root: &Path) -> io::Result<BTreeMap<(u64, u64), Vec<u32>>> {
    let mut by = BTreeMap::<(u64, u64), Vec<u32>>::new();
    for e in std::fs::read_dir(proc_root)? {
        let Ok(e) = e else { continue };
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(m) = std::fs::metadata(e.path().join("ns/net")) {
            by.entry((m.dev(), m.ino())).or_default().push(pid);
        }
    }
    Ok(by)
}

/// The key [`processes_by_netns`] uses for the namespace at `netns`.
pub fn netns_key(netns: &Path) -> io::Result<(u64, u64)> {
    let m = std::fs::metadata(netns)?;
    Ok((m.dev(), m.ino()))
}

/// The memory groups of `pids`, each once.
pub fn groups_of_processes(proc_root: &Path, pids: &[u32], mounts: &Mounts) -> Vec<Group> {
    let mut groups: Vec<Group> = pids
        .iter()
        .filter_map(|pid| {
            let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"));
            group_of(&text.ok()?, mounts)
        })
        .collect();
    groups.sort();
    groups.dedup();
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(point: &str, root: &str) -> Mount {
        Mount {
            point: point.into(),
            root: root.into(),
        }
    }

    #[test]
    fn mounts_of_a_hybrid_host_and_a_daemonset() {
        let hybrid = "\
25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw,nsdelegate
33 25 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory
34 25 0:30 / /sys/fs/cgroup/cpu\\040x rw shared:10 - cgroup cgroup rw,cpu
";
        assert_eq!(
            Mounts::parse(hybrid),
            Mounts {
                v1_memory: vec![mount("/sys/fs/cgroup/memory", "/")],
                v2: vec![mount("/sys/fs/cgroup/unified", "/")],
            }
        );
        // A container in its own cgroup namespace, with the host's hierarchy at /host/cgroup.
        let daemonset = "\
700 690 0:26 / /sys/fs/cgroup ro - cgroup2 cgroup rw
701 690 0:26 /../../.. /host/cgroup ro - cgroup2 cgroup2 rw
";
        let m = Mounts::parse(daemonset);
        let pod = "0::/../../../kubepods.slice/pod1/cri-a\n";
        assert_eq!(
            group_of(pod, &m),
            Some(Group {
                dir: "/host/cgroup/kubepods.slice/pod1/cri-a".into(),
                v1: false,
                mount: "/host/cgroup".into(),
            })
        );
        // Its own group is under both; the first mount that shows it is used.
        assert_eq!(
            group_of("0::/\n", &m).map(|g| g.dir),
            Some("/sys/fs/cgroup".into())
        );
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/a\\04"), "/a\\04");
    }

    #[test]
    fn the_memory_line_wins_on_v1_and_the_unified_line_on_v2() {
        let text = "12:memory:/kubepods/podX/c1\n1:name=systemd:/x\n0::/kubepods/podX/c1\n";
        let v1 = Mounts {
            v1_memory: vec![mount("/m", "/")],
            v2: vec![mount("/u", "/")],
        };
        assert_eq!(
            group_of(text, &v1),
            Some(Group {
                dir: "/m/kubepods/podX/c1".into(),
                v1: true,
                mount: "/m".into(),
            })
        );
        let v2 = Mounts {
            v1_memory: vec![],
            v2: vec![mount("/sys/fs/cgroup", "/")],
        };
        assert_eq!(
            group_of(text, &v2).map(|g| g.dir),
            Some("/sys/fs/cgroup/kubepods/podX/c1".into())
        );
        assert_eq!(group_of("0::/x\n", &v1), None);
        assert_eq!(group_of("garbage\n", &v2), None);
        // A group outside every mount is not guessed at.
        assert_eq!(group_of("0::/../elsewhere\n", &v2), None);
        let bound = Mounts {
            v1_memory: vec![mount("/m", "/kubepods/podX/c1")],
            v2: vec![],
        };
        assert_eq!(group_of("3:memory:/kubepods/podY/c2\n", &bound), None);
    }

    fn write(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (n, v) in files {
            std::fs::write(dir.join(n), v).unwrap();
        }
    }

    #[test]
    fn the_least_room_of_a_group_and_its_ancestors() {
        let t = std::env::temp_dir().join(format!("meshlane-memroom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        let v2 = t.join("v2");
        let group = |dir: PathBuf, v1: bool| Group {
            dir,
            v1,
            mount: if v1 { t.join("v1") } else { v2.clone() },
        };
        // v2: the pod's group has room, its parent less; inactive_file counts as room.
        let pod = v2.join("kubepods/pod");
        let c = pod.join("c");
        write(&v2, &[("memory.stat", "inactive_file 0\n")]);
        write(
            &v2.join("kubepods"),
            &[("memory.max", "max"), ("memory.current", "5")],
        );
        write(
            &pod,
            &[
                ("memory.max", "1000"),
                ("memory.current", "900"),
                ("memory.stat", "anon 700\ninactive_file 50\n"),
            ],
        );
        write(
            &c,
            &[
                ("memory.max", "max"),
                ("memory.current", "100"),
                ("memory.stat", "inactive_file 0\n"),
            ],
        );
        let r = room(&group(c.clone(), false)).unwrap().unwrap();
        assert_eq!((r.bytes, r.limit, r.group), (150, 1000, pod.clone()));
        // No limit on the way: no room to speak of.
        let free = v2.join("kubepods/free");
        write(&free, &[("memory.max", "max"), ("memory.current", "1")]);
        assert_eq!(room(&group(free, false)).unwrap(), None);
        // v1: only TCP limits count; an unset one reads as PAGE_COUNTER_MAX.
        let g = t.join("v1/a/b");
        write(
            &t.join("v1/a"),
            &[
                ("memory.kmem.tcp.limit_in_bytes", "9223372036854771712"),
                ("memory.kmem.tcp.usage_in_bytes", "0"),
            ],
        );
        write(
            &g,
            &[
                ("memory.kmem.tcp.limit_in_bytes", "2097152"),
                ("memory.kmem.tcp.usage_in_bytes", "2000000"),
            ],
        );
        let r = room(&group(g.clone(), true)).unwrap().unwrap();
        assert_eq!((r.bytes, r.limit), (97152, 2097152));
        // Garbage names the file.
        write(&g, &[("memory.kmem.tcp.usage_in_bytes", "lots")]);
        let e = room(&group(g, true)).unwrap_err();
        assert!(
            e.to_string().contains("memory.kmem.tcp.usage_in_bytes"),
            "{e}"
        );
        // A group that went away is an error, not "no limit".
        assert!(room(&group(v2.join("gone"), false)).is_err());
        std::fs::remove_dir_all(&t).unwrap();
    }
}
