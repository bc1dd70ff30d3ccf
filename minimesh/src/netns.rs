//! Pods as named network namespaces.
//!
//! Named (`ip netns add`) rather than anonymous so that tools like `nsenter`,
//! `iptables-restore` and a human with `ip netns exec` can reach them, and so
//! that a leak is visible in `ip netns list`.

use crate::exec;
use anyhow::{bail, Context, Result};
use nix::sched::CloneFlags;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `ip netns` bind-mounts named namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";

/// `SO_NETNS_COOKIE` (Linux 5.14+), not in every libc release we may build with.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// A named network namespace with `lo` up. Deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates `ml-<prefix>-<pid>-<n>` and brings its loopback up (Istio's
    /// inbound path connects from 127.0.0.6, so `lo` must work).
    pub fn new(prefix: &str) -> Result<Netns> {
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("netns prefix {prefix:?} must be non-empty [A-Za-z0-9_-]");
        }
        let name = format!("ml-{prefix}-{}", crate::unique_suffix());
        exec::run(exec::command("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        // From here on Drop deletes the namespace, even if the next step fails.
        let ns = Netns {
            path: Path::new(NETNS_RUN_DIR).join(&name),
            name,
        };
        exec::run(exec::command("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))
            .with_context(|| format!("bringing lo up in {}", ns.name))?;
        Ok(ns)
    }

    /// The name shown by `ip netns list`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: the bind mount that `setns(2)` and `nsenter` open.
    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// The kernel's netns cookie, read with `SO_NETNS_COOKIE` from a socket
    /// created inside; BPF programs see the same value via
    /// `bpf_get_netns_cookie`, so tests can match maps to pods.
    pub fn cookie(&self) -> Result<u64> {
        self.run(|| -> Result<u64> {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .context("socket(AF_INET, SOCK_DGRAM) for SO_NETNS_COOKIE")?;
            let mut cookie: u64 = 0;
            let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
            // SAFETY: valid fd, and a pointer/length pair describing `cookie`.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_NETNS_COOKIE,
                    (&mut cookie as *mut u64).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("getsockopt(SOL_SOCKET, SO_NETNS_COOKIE)");
            }
            Ok(cookie)
        })?
        .with_context(|| format!("reading the netns cookie of {}", self.name))
    }

    /// Runs `f` on a scoped thread that first entered this namespace, so the
    /// sockets `f` creates, and the threads it spawns, live here; the calling
    /// thread stays where it is. A panic in `f` is re-raised in the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(s, move || -> Result<T> {
                    enter_netns_current_thread(&path)?;
                    Ok(f())
                })
                .with_context(|| format!("spawning a thread for netns {}", self.name))?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// `nsenter --net=<path> <program>`. Not `ip netns exec`: that also
    /// unshares the mount namespace and remounts /sys, which hides bpffs and
    /// the cgroup mounts from the program.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = exec::command("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg(exec::program_path(program));
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Sockets or threads still inside keep the namespace alive anonymously,
        // but the name (what could collide or leak) goes now.
        if let Err(e) = exec::run(exec::command("ip").args(["netns", "del", &self.name])) {
            eprintln!("minimesh: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// Moves the calling thread (only) into the network namespace at `path`.
/// Network namespaces, unlike mount or user namespaces, can be entered by one
/// thread of a multi-threaded process.
pub fn enter_netns_current_thread(path: &Path) -> Result<()> {
    let file =
        std::fs::File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    enter(&file).with_context(|| format!("into {}", path.display()))
}

/// The one `setns` of this crate outside a forked child ([`crate::process`] has that one).
fn enter(netns: &std::fs::File) -> Result<()> {
    nix::sched::setns(netns, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")
}

/// Runs `f` on a thread that entered the network namespace `netns` first.
pub(crate) fn in_netns<T: Send>(netns: &std::fs::File, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        let handle = s.spawn(|| -> Result<T> {
            enter(netns)?;
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
