//! A private cgroup v2 directory to attach cgroup-scoped BPF programs
//! (sockops, connect4) to, so tests never attach to a cgroup that other
//! processes on the machine live in.
//!
//! The cgroup2 mount point differs between hosts (`/sys/fs/cgroup` on pure v2,
//! `/sys/fs/cgroup/unified` on hybrid), so it is read from
//! `/proc/self/mountinfo`, never assumed.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The cgroup2 mount: where it is mounted, and which directory of the
/// hierarchy it shows (not `/` when a container bind-mounts a subtree).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cgroup2Mount {
    mount_point: PathBuf,
    root: String,
}

/// Undoes the octal escapes (`\040` for space ...) mountinfo uses in paths.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(value) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the first cgroup2 mount in mountinfo text.
fn parse_mountinfo(text: &str) -> Option<Cgroup2Mount> {
    text.lines().find_map(|line| {
        // "id parent maj:min root mount_point opts [optional...] - fstype source superopts"
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = unescape_mountinfo(fields.nth(3)?);
        let mount_point = PathBuf::from(unescape_mountinfo(fields.next()?));
        Some(Cgroup2Mount { mount_point, root })
    })
}

fn cgroup2_mount() -> Result<Cgroup2Mount> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    parse_mountinfo(&text).context("no cgroup2 mount in /proc/self/mountinfo")
}

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> Result<PathBuf> {
    Ok(cgroup2_mount()?.mount_point)
}

/// The calling process's cgroup v2 directory as an absolute path under the
/// mount (the `0::` line of `/proc/self/cgroup`).
fn current_cgroup_dir(mount: &Cgroup2Mount) -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 (\"0::\") line in /proc/self/cgroup")?;
    // Paths in /proc/self/cgroup are relative to the hierarchy root; the mount
    // may show only a subtree of it.
    let rel = if mount.root != "/" {
        rel.strip_prefix(mount.root.as_str()).unwrap_or(rel)
    } else {
        rel
    };
    Ok(mount.mount_point.join(rel.trim_start_matches('/')))
}

fn write_pid(dir: &Path, pid: &str) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid).with_context(|| format!("writing pid {pid} to {}", procs.display()))
}

/// `<cgroup2 root>/meshlane-test-<prefix>-<pid>-<n>`, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    mount_point: PathBuf,
}

impl Cgroup {
    /// Creates a fresh child of the cgroup2 root.
    pub fn new(prefix: &str) -> Result<Cgroup> {
        if prefix.contains('/') || prefix.is_empty() {
            bail!("cgroup prefix {prefix:?} must be non-empty and contain no '/'");
        }
        let mount_point = cgroup2_root()?;
        let path = mount_point.join(format!("meshlane-test-{prefix}-{}", crate::unique_suffix()));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup { path, mount_point })
    }

    /// The cgroup directory (open it to attach BPF programs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the whole current process (all threads) into this cgroup, so
    /// sockets it creates from now on are seen by programs attached here. The
    /// guard moves the process back where it was. Process-wide: do not use it
    /// from two tests of one process at the same time.
    pub fn enter(&self) -> Result<CgroupGuard> {
        let previous = current_cgroup_dir(&cgroup2_mount()?)?;
        write_pid(&self.path, &std::process::id().to_string())
            .with_context(|| format!("moving this process into {}", self.path.display()))?;
        Ok(CgroupGuard { previous })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A cgroup with live members cannot be removed: hand them back to the
        // root first (EBUSY/ESRCH for exiting ones is fine; the retries cover it).
        for attempt in 0..20 {
            if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
                for pid in procs.split_whitespace() {
                    let _ = write_pid(&self.mount_point, pid);
                }
            }
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if attempt == 19 => {
                    eprintln!("minimesh: rmdir {}: {e}", self.path.display());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Moves the process back to the cgroup it was in before [`Cgroup::enter`].
#[derive(Debug)]
pub struct CgroupGuard {
    previous: PathBuf,
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(e) = write_pid(&self.previous, &std::process::id().to_string()) {
            eprintln!(
                "minimesh: moving back to {}: {e:#}",
                self.previous.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_pure_v2_mounts() {
        let hybrid = "\
30 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 30 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_mountinfo(hybrid),
            Some(Cgroup2Mount {
                mount_point: PathBuf::from("/sys/fs/cgroup/unified"),
                root: "/".into()
            })
        );
        let pure =
            "35 24 0:30 /sub /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate";
        let m = parse_mountinfo(pure).expect("cgroup2 mount");
        assert_eq!(m.mount_point, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(m.root, "/sub");
        assert_eq!(parse_mountinfo("1 2 0:1 / / rw - ext4 /dev/vda rw"), None);
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/a\\b"), r"/a\\b");
        assert_eq!(unescape_mountinfo(r"/tail\04"), r"/tail\04");
    }
}
