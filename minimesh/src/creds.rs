//! Per-thread credentials, so the sidecar stand-in can run as the proxy uid
//! (1337) inside the test process while the test itself stays root.
//!
//! Linux credentials are per thread; it is glibc's `setuid()`/`setresuid()`
//! that broadcasts the change to every thread of the process (POSIX
//! semantics, via a signal). Calling the raw syscalls changes only the
//! calling thread, and threads it spawns afterwards inherit its credentials.
//! iptables' `-m owner --uid-owner` matches the fsuid/fsgid the socket's file
//! was opened with, which setresuid/setresgid set too, so sockets created by
//! such a thread are matched as the proxy's.

use anyhow::Result;

/// `setresgid(gid, gid, 0)` then `setresuid(uid, uid, 0)` for the calling
/// thread only. The saved ids stay 0 so the thread keeps its permitted
/// capabilities (though not the effective ones, which the kernel clears when
/// the euid leaves 0) and could switch back; the gid goes first because
/// changing it needs CAP_SETGID, which the uid change takes away.
pub fn become_thread_uid_gid(uid: u32, gid: u32) -> Result<()> {
    // SAFETY: plain syscalls with integer arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setresgid,
            libc::c_long::from(gid),
            libc::c_long::from(gid),
            0 as libc::c_long,
        )
    };
    if rc != 0 {
        return Err(anyhow::Error::new(std::io::Error::last_os_error())
            .context(format!("setresgid({gid}, {gid}, 0) on this thread")));
    }
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setresuid,
            libc::c_long::from(uid),
            libc::c_long::from(uid),
            0 as libc::c_long,
        )
    };
    if rc != 0 {
        return Err(anyhow::Error::new(std::io::Error::last_os_error())
            .context(format!("setresuid({uid}, {uid}, 0) on this thread")));
    }
    Ok(())
}
