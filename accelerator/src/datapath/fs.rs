//! bpffs and cgroup v2 discovery on the node: detected at run time, never assumed.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::Error;

const BPF_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::BPF_FS_MAGIC;

/// Mounts a bpffs at `/sys/fs/bpf` when `dir` lives under it and nothing is mounted there yet.
pub fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) {
        return Err(Error::NoBpffs(dir.to_path_buf()));
    }
    fs::create_dir_all(root).map_err(|e| Error::Io(format!("create {}", root.display()), e))?;
    if !is_bpffs(root) {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::MountBpffs(e.to_string()))?;
        tracing::info!(path = %root.display(), "mounted bpffs");
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// The root of the cgroup v2 (unified) hierarchy: `/sys/fs/cgroup` on pure v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones, wherever /proc/self/mountinfo says it is.
pub fn cgroup2_root() -> Result<PathBuf, Error> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::Io("read /proc/self/mountinfo".into(), e))?;
    parse_cgroup2_root(&info).ok_or(Error::NoCgroup2)
}

fn parse_cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <src> <opts>"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let fields: Vec<&str> = left.split_whitespace().collect();
        (fstype == "cgroup2" && fields.get(3) == Some(&"/")).then(|| PathBuf::from(fields[4]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_pure_v2_roots() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_root(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "35 24 0:30 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_root(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_root("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
