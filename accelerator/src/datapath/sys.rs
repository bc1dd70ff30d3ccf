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

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `enum bpf_stats_type`: BPF_STATS_RUN_TIME.
const BPF_STATS_RUN_TIME: u32 = 0;

/// The prefix of `union bpf_attr` for BPF_PROG_GET_NEXT_ID and BPF_PROG_GET_FD_BY_ID.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The prefix of `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The prefix of `struct bpf_prog_info` up to `run_cnt`; the kernel fills what it has of it.
#[repr(C)]
struct RawProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    _jited_len_to_map_ids: [u8; 48],
    name: [u8; 16],
    _ifindex_to_prog_tags: [u8; 112],
    run_time_ns: u64,
    run_cnt: u64,
}

const _: () = {
    assert!(std::mem::offset_of!(RawProgInfo, name) == 64);
    assert!(std::mem::offset_of!(RawProgInfo, run_time_ns) == 192);
    assert!(std::mem::offset_of!(RawProgInfo, run_cnt) == 200);
};

/// The prefix of `struct bpf_link_info` every link type shares.
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _rest: [u32; 13],
}

/// One loaded program's identity and run statistics (`run_cnt`/`run_time_ns` only move while
/// statistics are enabled: `kernel.bpf_stats_enabled=1` or a [`enable_stats`] descriptor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    pub prog_type: u32,
    pub id: u32,
    /// The kernel's hash of the program's instructions (map references zeroed), so two loads of
    /// the same build's program have the same tag and a changed program another.
    pub tag: [u8; 8],
    /// The kernel's name, truncated to 15 bytes.
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// The program's info, from a program descriptor.
pub fn prog_info(prog: &impl AsRawFd) -> io::Result<ProgInfo> {
    // SAFETY: plain integers and byte arrays, for which all zeroes is valid; zeroed pointer and
    // count fields ask the kernel for no arrays.
    let mut info: RawProgInfo = unsafe { std::mem::zeroed() };
    // attr.info points at `info`, which outlives the call and is as long as info_len says.
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: std::mem::size_of::<RawProgInfo>() as u32,
        info: &mut info as *mut RawProgInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // The kernel writes back how much of the struct it knows; run_cnt came with Linux 5.1.
    if (attr.info_len as usize) < std::mem::size_of::<RawProgInfo>() {
        return Err(io::Error::other(format!(
            "the kernel's bpf_prog_info has no run_cnt ({} bytes)",
            attr.info_len
        )));
    }
    let name_len = info.name.iter().position(|&b| b == 0).unwrap_or(16);
    Ok(ProgInfo {
        prog_type: info.prog_type,
        id: info.id,
        tag: info.tag,
        name: String::from_utf8_lossy(&info.name[..name_len]).into_owned(),
        run_cnt: info.run_cnt,
        run_time_ns: info.run_time_ns,
    })
}

/// The id of the program a link runs, from a link descriptor.
pub fn link_prog_id(link: &impl AsRawFd) -> io::Result<u32> {
    let mut info = RawLinkInfo::default();
    // attr.info points at `info`, which outlives the call and is as long as info_len says.
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<RawLinkInfo>() as u32,
        info: &mut info as *mut RawLinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.prog_id)
}

/// A descriptor of program `id`, or None if it is no longer loaded.
pub fn prog_fd_by_id(id: u32) -> io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    let mut attr = IdAttr {
        id,
        ..Default::default()
    };
    match bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) {
        // SAFETY: on success the kernel returned a fresh descriptor that nothing else owns.
        Ok(fd) => Ok(Some(unsafe {
            std::os::fd::OwnedFd::from_raw_fd(fd as i32)
        })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The id of the first program after `id`, or None after the last.
pub fn prog_next_id(id: u32) -> io::Result<Option<u32>> {
    const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
    let mut attr = IdAttr {
        id,
        ..Default::default()
    };
    match bpf(BPF_PROG_GET_NEXT_ID, &mut attr) {
        Ok(_) => Ok(Some(attr.next_id)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Turns run statistics on for every program until the returned descriptor closes (Linux 5.8+);
/// the kernel counts holders, so this never turns off statistics someone else wanted.
pub fn enable_stats() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    #[repr(C)]
    #[derive(Default)]
    struct EnableStatsAttr {
        stats_type: u32,
        _pad: [u32; 3],
    }
    let mut attr = EnableStatsAttr {
        stats_type: BPF_STATS_RUN_TIME,
        ..Default::default()
    };
    let fd = bpf(BPF_ENABLE_STATS, &mut attr)?;
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_F_REPLACE`: the update only happens while the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 1 << 2;

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
    _pad: [u32; 12],
}

/// Makes `link` run `new` instead of `old`, atomically for its hook (the kernel swaps the
/// program pointer; nothing is detached in between); fails (EPERM) if the link no longer runs
/// `old`.
pub fn link_update(link: &impl AsRawFd, old: &impl AsRawFd, new: &impl AsRawFd) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}
