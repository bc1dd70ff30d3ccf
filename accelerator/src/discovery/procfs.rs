//! Sidecars as the kernel sees them: Envoy processes in /proc, their credentials, network
//! namespaces and listening sockets. Read with plain file reads; every parser takes text so it
//! can be tested without a live process.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// One proxy process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// Real uid and gid (`/proc/PID/status`): what istio-init's owner match exempts.
    pub uid: u32,
    pub gid: u32,
    /// Inode of `/proc/PID/ns/net`: names the network namespace.
    pub netns: u64,
    /// `/proc/PID/uid_map` and `gid_map` as the daemon reads them: the proxy's ids (what the
    /// rules in its pod name) against the host's (what `status`, and BPF, see). The identity
    /// map unless the pod has a user namespace of its own (`hostUsers: false`).
    pub uid_map: Vec<IdRange>,
    pub gid_map: Vec<IdRange>,
}

/// One line of a user namespace's id map: `count` ids from `inside` (in the namespace) are the
/// ids from `outside` in the namespace of whoever reads the map (the host's, for the daemon).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// The map of a process in the host's user namespace.
pub const IDENTITY: IdRange = IdRange {
    inside: 0,
    outside: 0,
    count: u32::MAX,
};

/// `/proc/PID/uid_map` (or `gid_map`) text.
pub fn parse_id_map(text: &str) -> Result<Vec<IdRange>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let n = |k: usize| f.get(k).and_then(|v| v.parse::<u32>().ok());
        match (f.len(), n(0), n(1), n(2)) {
            (0, ..) => continue,
            (3, Some(inside), Some(outside), Some(count)) => out.push(IdRange {
                inside,
                outside,
                count,
            }),
            _ => return Err(format!("line {}: {}", i + 1, super::excerpt(line))),
        }
    }
    Ok(out)
}

/// The host's id for `id` inside the namespace of `map`; None when the namespace has no such id
/// (no process there can hold it).
pub fn to_host(map: &[IdRange], id: u32) -> Option<u32> {
    map.iter().find_map(|r| {
        let off = id.checked_sub(r.inside)?;
        (off < r.count)
            .then(|| r.outside.checked_add(off))
            .flatten()
    })
}

/// Every process's network namespace, and which processes look like a sidecar proxy.
#[derive(Debug, Default)]
pub struct Scan {
    /// Network namespace inode -> the lowest pid living in it.
    pub namespaces: BTreeMap<u64, u32>,
    /// Processes whose `comm` or executable name is one of the proxy names.
    pub proxies: Vec<Process>,
}

/// Walks `proc_root` (normally `/proc`). Processes that exit during the walk are skipped.
pub fn scan(proc_root: &Path, proxy_names: &[String]) -> io::Result<Scan> {
    let mut out = Scan::default();
    for entry in fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(ns) = fs::metadata(dir.join("ns/net")) else {
            continue;
        };
        let netns = ns.ino();
        out.namespaces
            .entry(netns)
            .and_modify(|p| *p = (*p).min(pid))
            .or_insert(pid);
        if !is_proxy(&dir, proxy_names) {
            continue;
        }
        let Ok(status) = fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let map = |file: &str| -> Vec<IdRange> {
            // A kernel without user namespaces has no map: every id is the host's.
            match fs::read_to_string(dir.join(file)) {
                Ok(text) => parse_id_map(&text).unwrap_or_default(),
                Err(_) => vec![IDENTITY],
            }
        };
        if let Ok((uid, gid)) = parse_status(&status) {
            out.proxies.push(Process {
                pid,
                uid,
                gid,
                netns,
                uid_map: map("uid_map"),
                gid_map: map("gid_map"),
            });
        }
    }
    out.proxies.sort_by_key(|p| p.pid);
    Ok(out)
}

fn is_proxy(dir: &Path, names: &[String]) -> bool {
    let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
    if names.iter().any(|n| n == comm.trim_end()) {
        return true;
    }
    fs::read_link(dir.join("exe")).is_ok_and(|exe| {
        exe.file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| names.iter().any(|n| n == f))
    })
}

/// Real uid and gid from `/proc/PID/status`.
pub fn parse_status(text: &str) -> Result<(u32, u32), String> {
    let field = |name: &str| -> Result<u32, String> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .ok_or_else(|| format!("no {name} line"))?;
        let real = line.split_whitespace().next().unwrap_or_default();
        real.parse()
            .map_err(|_| format!("{name} {} is not a number", super::excerpt(real)))
    };
    Ok((field("Uid:")?, field("Gid:")?))
}

/// The network namespace inode of `path` (`/proc/1/ns/net`, `/run/netns/x`).
pub fn netns_inode(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// Named namespaces under `dir` (`/run/netns`), by inode. A missing directory is no names.
pub fn named_namespaces(dir: &Path) -> BTreeMap<u64, PathBuf> {
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path();
        if let Ok(ino) = netns_inode(&path) {
            // A bind mount reports the nsfs inode; an unmounted placeholder file does not
            // match any process's namespace and is simply never used.
            out.entry(ino).or_insert(path);
        }
    }
    out
}

/// A TCP socket in LISTEN state from `/proc/PID/net/tcp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddrV4,
    pub inode: u64,
}

/// Listening sockets of `/proc/PID/net/tcp` text (IPv4).
pub fn parse_net_tcp(text: &str) -> Result<Vec<Listen>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            return Err(format!(
                "line {}: {} fields, want at least 10",
                i + 1,
                f.len()
            ));
        }
        // st 0A is TCP_LISTEN.
        if f[3] != "0A" {
            continue;
        }
        let bad = |what: &str, v: &str| format!("line {}: {what} {}", i + 1, super::excerpt(v));
        let (ip, port) = f[1]
            .split_once(':')
            .ok_or_else(|| bad("local_address", f[1]))?;
        let ip = u32::from_str_radix(ip, 16).map_err(|_| bad("local_address", f[1]))?;
        let port = u16::from_str_radix(port, 16).map_err(|_| bad("local_address", f[1]))?;
        let inode: u64 = f[9].parse().map_err(|_| bad("inode", f[9]))?;
        // The kernel prints the `__be32` with %08X as a native integer: on a little-endian
        // host 127.0.0.1 reads 0100007F, so the native bytes are the address bytes.
        out.push(Listen {
            addr: SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), port),
            inode,
        });
    }
    Ok(out)
}

/// Socket inodes among `pid`'s open files.
pub fn socket_inodes(proc_root: &Path, pid: u32) -> io::Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    for e in fs::read_dir(proc_root.join(pid.to_string()).join("fd"))?.flatten() {
        if let Ok(target) = fs::read_link(e.path()) {
            if let Some(ino) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
            {
                out.insert(ino);
            }
        }
    }
    Ok(out)
}

/// The TCP sockets `pid` itself listens on (from its namespace's table, kept to its own fds).
pub fn listening(proc_root: &Path, pid: u32) -> io::Result<Vec<Listen>> {
    let text = fs::read_to_string(proc_root.join(pid.to_string()).join("net/tcp"))?;
    let all = parse_net_tcp(&text).map_err(io::Error::other)?;
    let mine = socket_inodes(proc_root, pid)?;
    Ok(all
        .into_iter()
        .filter(|l| mine.contains(&l.inode))
        .collect())
}

/// The pod UID in a process's `/proc/PID/cgroup` text: kubelet's cgroup drivers write it as
/// `pod<uid>` (cgroupfs: `/kubepods/burstable/pod1b4e.../`) or with underscores
/// (systemd: `kubepods-burstable-pod1b4e_..._.slice`). Lower-case, with dashes.
pub fn pod_uid_from_cgroup(text: &str) -> Option<String> {
    for line in text.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or_default();
        let mut rest = path;
        while let Some(at) = rest.find("pod") {
            rest = &rest[at + 3..];
            let Some(cand) = rest.get(..36) else { break };
            let uid = cand.replace('_', "-").to_ascii_lowercase();
            let shape = uid.char_indices().all(|(i, c)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
            if shape {
                return Some(uid);
            }
        }
    }
    None
}

/// Pod UID -> the lowest pid whose cgroup path carries it and whose network namespace is not the
/// host's (`host`). Processes that exit during the walk are skipped.
pub fn pods_by_uid(proc_root: &Path, host: Option<u64>) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir(proc_root) else {
        return out;
    };
    for entry in rd.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Some(uid) = fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|t| pod_uid_from_cgroup(&t))
        else {
            continue;
        };
        match netns_inode(&dir.join("ns/net")) {
            Ok(ino) if Some(ino) != host => {}
            _ => continue,
        }
        out.entry(uid)
            .and_modify(|p: &mut u32| *p = (*p).min(pid))
            .or_insert(pid);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uid_from_both_cgroup_drivers() {
        let cgroupfs = "0::/kubepods/burstable/pod1B4E28BA-2FA1-11D2-883F-0016D3CCA427/0a1b2c\n";
        assert_eq!(
            pod_uid_from_cgroup(cgroupfs).as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        let systemd = "12:pids:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/cri-containerd-abc.scope\n0::/\n";
        assert_eq!(
            pod_uid_from_cgroup(systemd).as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert_eq!(pod_uid_from_cgroup("0::/user.slice/podman-1.scope\n"), None);
        assert_eq!(pod_uid_from_cgroup("garbage"), None);
    }

    #[test]
    fn status_gives_real_ids() {
        let text = "Name:\tenvoy\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1337\t1338\t1337\t1337\nGid:\t1337\t1337\t1337\t1337\n";
        assert_eq!(parse_status(text), Ok((1337, 1337)));
        let host = parse_id_map("         0          0 4294967295\n").unwrap();
        assert_eq!(host, vec![IDENTITY]);
        assert_eq!(to_host(&host, 1337), Some(1337));
        // A pod with hostUsers: false (kubelet gives it 65536 ids of its own).
        let pod = parse_id_map("0 1245184 65536\n").unwrap();
        assert_eq!(to_host(&pod, 1337), Some(1246521));
        assert_eq!(to_host(&pod, 65536), None);
        let split = parse_id_map("0 1000 1\n1 100000 65535\n").unwrap();
        assert_eq!(
            (to_host(&split, 0), to_host(&split, 1)),
            (Some(1000), Some(100000))
        );
        assert_eq!(
            to_host(&parse_id_map("4294967295 0 1").unwrap(), 4294967295),
            Some(0)
        );
        assert_eq!(to_host(&parse_id_map("0 4294967295 2").unwrap(), 1), None);
        assert!(parse_id_map("0 x 1").unwrap_err().contains("line 1"));
        assert!(parse_status("Name:\tx\n").unwrap_err().contains("Uid:"));
        assert!(parse_status("Uid:\tx\nGid:\t1\n")
            .unwrap_err()
            .contains("Uid:"));
    }

    #[test]
    fn net_tcp_listeners() {
        // Shape of /proc/PID/net/tcp on a little-endian host.
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 51234 1 0000000000000000 100 0 0 10 0\n\
           1: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 51235 1 0000000000000000 100 0 0 10 0\n\
           2: 0100007F:3A98 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1337        0 51236 1 0000000000000000 20 4 30 10 -1\n";
        let got = parse_net_tcp(text).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(
                got,
                vec![
                    Listen {
                        addr: "127.0.0.1:15000".parse().unwrap(),
                        inode: 51234
                    },
                    Listen {
                        addr: "0.0.0.0:15001".parse().unwrap(),
                        inode: 51235
                    },
                ]
            );
        }
        assert!(parse_net_tcp("hdr\n 0: zz:1 0 0A\n").is_err());
        assert!(parse_net_tcp("hdr\n0: XYZ:3A98 00000000:0000 0A 0 0 0 0 0 1\n").is_err());
    }
}
