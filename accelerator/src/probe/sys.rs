//! The few raw system calls the probe needs that nix does not wrap: bringing `lo` up, per-thread
//! credentials, FIONREAD.
#![allow(unsafe_code)]

use std::{io, os::fd::AsRawFd};

/// `ip link set lo up` for the calling thread's network namespace.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: fd is a socket, ifr a valid ifreq naming an interface.
    let r = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) };
    let r = if r == 0 {
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: as above.
        unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) }
    } else {
        r
    };
    let err = io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if r == 0 {
        Ok(())
    } else {
        Err(err)
    }
}

/// Gives the calling thread (only) the proxy's credentials, as a sidecar would have: the
/// raw syscalls change one thread, where glibc's setuid() would change every thread.
pub fn become_proxy(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: raw setresgid/setresuid on the calling thread; the saved id stays 0.
    let r = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let r = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes the kernel reports as readable (FIONREAD / SIOCINQ).
pub fn fionread(s: &impl AsRawFd) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r == 0 {
        Ok(n)
    } else {
        Err(io::Error::last_os_error())
    }
}
