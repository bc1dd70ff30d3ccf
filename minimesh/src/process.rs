//! Child processes of the mini-mesh (Envoy, nginx): their private directories, entering a pod's
//! namespace between fork and exec, stopping them, and reading their logs.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A private directory under the system temp dir, removed with its contents on drop.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `<tmp>/minimesh-<what>-<pid>-<n>`, mode 0755. A leftover of an earlier process that had
    /// the same pid is replaced.
    pub(crate) fn new(what: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("minimesh-{what}-{}", crate::unique_suffix()));
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o755);
        if builder.create(&path).is_err() {
            let _ = std::fs::remove_dir_all(&path);
            builder
                .create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(TempDir { path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `<dir>/<name>` (mode 0644) and returns its path.
    pub(crate) fn write(&self, name: &str, contents: &[u8]) -> Result<PathBuf> {
        let path = self.path.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .and_then(|mut f| f.write_all(contents))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("minimesh: removing {}: {e}", self.path.display());
            }
        }
    }
}

/// Makes `cmd` enter the network namespace `netns` (an fd opened before the fork) and, with
/// `creds`, drop to that uid/gid with no supplementary groups, between fork and exec.
///
/// Not `Command::uid`/`gid`: std switches credentials before it runs `pre_exec` closures, and
/// `setns` needs CAP_SYS_ADMIN, which the uid change takes away. The raw syscalls change only
/// the calling thread, which in the forked child is the whole process.
pub(crate) fn enter_netns_on_exec(cmd: &mut Command, netns: &File, creds: Option<(u32, u32)>) {
    let ns_fd: RawFd = netns.as_raw_fd();
    let check = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the closure only makes async-signal-safe raw syscalls; `ns_fd` stays open in the
    // parent (and so in the child) until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            check(libc::c_long::from(libc::setns(ns_fd, libc::CLONE_NEWNET)))?;
            if let Some((uid, gid)) = creds {
                check(libc::syscall(
                    libc::SYS_setgroups,
                    0 as libc::c_long,
                    std::ptr::null::<libc::gid_t>(),
                ))?;
                let gid = libc::c_long::from(gid);
                check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
                let uid = libc::c_long::from(uid);
                check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
            }
            Ok(())
        })
    };
}

/// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last `max` bytes of a file, lossily decoded, or a note why there are none.
pub(crate) fn tail(path: &Path, max: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(s) if s.trim().is_empty() => format!("({} is empty)", path.display()),
        Ok(s) => s,
        Err(e) => format!("({}: {e})", path.display()),
    }
}
