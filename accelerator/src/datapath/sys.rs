//! The two bpf(2) commands aya 0.14 has no public call for: detaching a program it did not attach
//! in this process, and forcing a pinned link off its cgroup.
#![allow(unsafe_code)]

use std::{io, os::fd::AsRawFd};

const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `enum bpf_attach_type`: BPF_SK_MSG_VERDICT.
pub const BPF_SK_MSG_VERDICT: u32 = 7;

#[repr(C)]
#[derive(Default)]
struct ProgDetachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _pad: [u32; 11],
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
    _pad: [u32; 15],
}

/// bpf(2) with `attr` as the attribute prefix for `cmd` (a `#[repr(C)]`, zero-padded prefix of
/// `union bpf_attr`); any pointer inside it must be valid for the call. Returns the kernel's
/// non-negative result (an fd, or 0).
pub fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a properly sized, zero-padded bpf_attr prefix for `cmd`; the pointers it
    // carries are the caller's to keep valid (see the doc comment).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Detaches `prog` from `target` (a map or cgroup) for `attach_type`.
pub fn prog_detach(target: &impl AsRawFd, prog: &impl AsRawFd, attach_type: u32) -> io::Result<()> {
    let mut attr = ProgDetachAttr {
        target_fd: target.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    bpf(BPF_PROG_DETACH, &mut attr).map(drop)
}

/// Detaches a link from its hook even while other references to it remain.
pub fn link_detach(link: &impl AsRawFd) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

const BPF_OBJ_GET: libc::c_long = 7;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    _pad: [u32; 12],
}

/// Opens a pinned BPF object (map, program or link) by path.
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr points at a NUL-terminated path that outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut ObjGetAttr as *mut libc::c_void,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh descriptor we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret as i32) })
}

const BPF_PROG_QUERY: libc::c_long = 16;
/// `enum bpf_attach_type`: BPF_CGROUP_SOCK_OPS.
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;

#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad0: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// How many programs of `attach_type` are attached directly to the cgroup `target`.
pub fn prog_count(target: &impl AsRawFd, attach_type: u32) -> io::Result<u32> {
    let mut attr = ProgQueryAttr {
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(attr.prog_cnt)
}
