//! Upgrades in place: a daemon that adopts pins made by another build replaces every program
//! whose instructions differ from its own, on the same maps, without detaching anything.
//!
//! Adopting the old programs as they are (what a restart of the same build does) would leave an
//! upgraded node running the previous datapath until `meshlane detach`: new flags in the policy
//! map ignored, fixes not applied. Detaching would move every live connection to TCP. Instead,
//! each program is compared by the kernel's tag (a hash of its instructions with map references
//! zeroed, so equal builds compare equal) and, where it differs, swapped:
//!
//! - sock_ops and the connect hooks run through bpf_links: `BPF_LINK_UPDATE` swaps the program
//!   atomically, so no connection is ever seen by neither or both.
//! - sk_msg is attached to the sockhash: attaching the new one replaces it for sockets inserted
//!   from then on; sockets already paired keep the program they were inserted with (the kernel
//!   copies it into their psock) until they close, so a live pair never changes program mid-way.
//! - The read tracer's link cannot be updated: the new one is attached first, then the old one
//!   detached, so for a moment a read may be counted twice (the unread budget errs towards
//!   redirecting, never towards a false fallback).
//!
//! Order as at load: sk_msg, read tracer, connect hooks, then sock_ops; a connect hook the new
//! build no longer needs comes off last. Program pins are replaced by pinning under a staged
//! name and renaming over the old pin, so the pin directory is complete at every instant.
//!
//! Maps are shared between old and new programs, which is sound because their layouts are
//! checked equal first (`check_layout`); a build that changes what a map means must change its
//! layout too, so that it is refused instead of adopted.

use std::{
    fs as stdfs,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, FExit, RawTracePoint, SkMsg, SockOps},
    Btf, Ebpf,
};
use meshlane_common::{maps, programs};

use super::{
    chain, fd_link, load_object, program, sys, typed, Error, Options, PIN_LINK_CONNECT,
    PIN_LINK_CONNECT6, PIN_LINK_RECV, PIN_LINK_RECV_EXIT, PIN_LINK_SOCK_OPS, PIN_PROG_SK_MSG,
    PIN_PROG_SOCK_OPS,
};

/// Suffix of a pin being put in place by rename; `remove_pins` also removes strays of these
/// (bpffs refuses names with a dot).
pub(super) const STAGED: &str = "_staged";

/// One program the upgrade replaced (or attached or detached), for the log and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replaced {
    /// The program's name in the object (`meshlane_sockops`, ...).
    pub program: &'static str,
    /// The running program's tag before, hex; empty when there was none.
    pub old_tag: String,
    /// This build's program's tag, hex; empty when it was taken off.
    pub new_tag: String,
}

/// Replaces every attached program of the datapath pinned under `opts.pin_dir` whose tag differs
/// from this build's. Returns what it replaced (empty: the pins already run this build).
pub(super) fn replace_changed(opts: &Options) -> Result<Vec<Replaced>, Error> {
    let dir = &opts.pin_dir;
    remove_staged(dir);
    let (mut ebpf, owner_in_sockops) = load_object(Some(dir), opts.max_sockets)?;
    let mut done = Vec::new();

    // sk_msg: compared with the pinned program, which is the one on the sockhash.
    {
        let old = open_pin(dir, PIN_PROG_SK_MSG)?;
        // load_object loaded it.
        let sk_msg: &mut SkMsg = program(&mut ebpf, programs::SK_MSG)?;
        let new_tag = tag(sk_msg.fd().map_err(Error::from_load)?)?;
        let old_tag = tag(&old)?;
        if new_tag != old_tag {
            let socks: SockHash<MapData, u64> = typed(dir, maps::SOCKS)?;
            let socks_fd = socks
                .fd()
                .try_clone()
                .map_err(|e| Error::Map(maps::SOCKS, e.to_string()))?;
            let link = sk_msg.attach(&socks_fd).map_err(Error::from_load)?;
            // The attachment belongs to the map; see load_and_attach.
            std::mem::forget(sk_msg.take_link(link).map_err(Error::from_load)?);
            repin(dir, PIN_PROG_SK_MSG, |p| {
                sk_msg.pin(p).map_err(|e| e.to_string())
            })?;
            done.push(replaced(programs::SK_MSG, old_tag, new_tag));
        }
    }

    done.extend(replace_read_tracer(&mut ebpf, dir)?);

    let hooks = [
        (programs::CONNECT4, PIN_LINK_CONNECT),
        (programs::CONNECT6, PIN_LINK_CONNECT6),
    ];
    if !owner_in_sockops {
        let cgroup =
            stdfs::File::open(&opts.cgroup).map_err(|_| Error::NoCgroup(opts.cgroup.clone()))?;
        for (name, pin) in hooks {
            let connect: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            connect.load().map_err(Error::from_load)?;
            let new_tag = tag(connect.fd().map_err(Error::from_load)?)?;
            if dir.join(pin).exists() {
                let link = open_pin(dir, pin)?;
                let (old_prog, old_tag) = link_prog(&link)?;
                if old_tag != new_tag {
                    let fd = connect.fd().map_err(Error::from_load)?;
                    sys::link_update(&link, &old_prog, &fd.as_fd())
                        .map_err(|e| Error::Kernel(format!("update the {name} link: {e}")))?;
                    done.push(replaced(name, old_tag, new_tag));
                }
            } else {
                // The old build asked for the caller in sock_ops; this one needs the hook, and
                // it must be in place before the new sock_ops looks for what it records.
                let link = connect
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(Error::from_load)?;
                let link = fd_link(connect.take_link(link), "connect hook")?;
                repin(dir, pin, |p| {
                    link.pin(p).map(drop).map_err(|e| e.to_string())
                })?;
                done.push(replaced(name, [0; 8], new_tag));
            }
        }
    }

    // sock_ops last: from here new connections are handled by this build.
    {
        let link = open_pin(dir, PIN_LINK_SOCK_OPS)?;
        let (old_prog, old_tag) = link_prog(&link)?;
        let sock_ops: &mut SockOps = program(&mut ebpf, programs::SOCK_OPS)?;
        let fd = sock_ops.fd().map_err(Error::from_load)?;
        let new_tag = tag(fd)?;
        if new_tag != old_tag {
            sys::link_update(&link, &old_prog, &fd.as_fd())
                .map_err(|e| Error::Kernel(format!("update the sock_ops link: {e}")))?;
            repin(dir, PIN_PROG_SOCK_OPS, |p| {
                sock_ops.pin(p).map_err(|e| e.to_string())
            })?;
            done.push(replaced(programs::SOCK_OPS, old_tag, new_tag));
        }
    }

    if owner_in_sockops {
        // The new sock_ops asks for the caller itself: a connect hook of the old build only
        // costs every connect() now.
        for (name, pin) in hooks {
            if dir.join(pin).exists() {
                let link = open_pin(dir, pin)?;
                let (_, old_tag) = link_prog(&link)?;
                sys::link_detach(&link)
                    .map_err(|e| Error::Kernel(format!("detach the old {name} link: {e}")))?;
                remove(dir, pin)?;
                done.push(replaced(name, old_tag, [0; 8]));
            }
        }
    }
    Ok(done)
}

/// The read tracer, of the kind already attached (the kernel decided it at load; it has not
/// changed its mind since). None attached: the kernel offered neither, nothing to replace.
fn replace_read_tracer(ebpf: &mut Ebpf, dir: &Path) -> Result<Option<Replaced>, Error> {
    let (pin, name) = if dir.join(PIN_LINK_RECV_EXIT).exists() {
        (PIN_LINK_RECV_EXIT, programs::RECV_EXIT)
    } else if dir.join(PIN_LINK_RECV).exists() {
        (PIN_LINK_RECV, programs::RECV)
    } else {
        return Ok(None);
    };
    let old_link = open_pin(dir, pin)?;
    let (_, old_tag) = link_prog(&old_link)?;
    let (new_link, new_tag): (aya::programs::links::FdLink, _) = if pin == PIN_LINK_RECV_EXIT {
        let btf =
            Btf::from_sys_fs().map_err(|e| Error::Kernel(format!("kernel BTF: {}", chain(&e))))?;
        let prog: &mut FExit = program(ebpf, name)?;
        prog.load(programs::RECV_FUNCTION, &btf)
            .map_err(Error::from_load)?;
        let new_tag = tag(prog.fd().map_err(Error::from_load)?)?;
        if new_tag == old_tag {
            return Ok(None);
        }
        let link = prog.attach().map_err(Error::from_load)?;
        (
            prog.take_link(link).map_err(Error::from_load)?.into(),
            new_tag,
        )
    } else {
        let prog: &mut RawTracePoint = program(ebpf, name)?;
        prog.load().map_err(Error::from_load)?;
        let new_tag = tag(prog.fd().map_err(Error::from_load)?)?;
        if new_tag == old_tag {
            return Ok(None);
        }
        let link = prog
            .attach(programs::RECV_TRACEPOINT)
            .map_err(Error::from_load)?;
        (
            prog.take_link(link).map_err(Error::from_load)?.into(),
            new_tag,
        )
    };
    // New first, then old: see the module comment.
    repin(dir, pin, |p| {
        new_link.pin(p).map(drop).map_err(|e| e.to_string())
    })?;
    sys::link_detach(&old_link)
        .map_err(|e| Error::Kernel(format!("detach the old read tracer: {e}")))?;
    Ok(Some(replaced(name, old_tag, new_tag)))
}

fn replaced(program: &'static str, old: [u8; 8], new: [u8; 8]) -> Replaced {
    let hex = |t: [u8; 8]| {
        if t == [0; 8] {
            String::new()
        } else {
            t.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    Replaced {
        program,
        old_tag: hex(old),
        new_tag: hex(new),
    }
}

fn tag(prog: impl AsFd) -> Result<[u8; 8], Error> {
    let prog: BorrowedFd<'_> = prog.as_fd();
    sys::prog_info(&prog)
        .map(|i| i.tag)
        .map_err(|e| Error::Kernel(format!("program info: {e}")))
}

/// The program a pinned link runs, and its tag.
fn link_prog(link: &impl AsRawFd) -> Result<(OwnedFd, [u8; 8]), Error> {
    let id = sys::link_prog_id(link).map_err(|e| Error::Kernel(format!("link info: {e}")))?;
    let prog = sys::prog_fd_by_id(id)
        .map_err(|e| Error::Kernel(format!("program {id}: {e}")))?
        .ok_or_else(|| Error::Kernel(format!("program {id} of a pinned link is gone")))?;
    let t = tag(&prog)?;
    Ok((prog, t))
}

fn open_pin(dir: &Path, name: &str) -> Result<OwnedFd, Error> {
    let p = dir.join(name);
    sys::obj_get(&p).map_err(|e| Error::Io(format!("open pin {}", p.display()), e))
}

/// Pins with `pin` under a staged name, then renames it over `name`: the directory holds the old
/// pin or the new one at every instant, never neither.
fn repin(
    dir: &Path,
    name: &str,
    pin: impl FnOnce(PathBuf) -> Result<(), String>,
) -> Result<(), Error> {
    let staged = dir.join(format!("{name}{STAGED}"));
    let _ = stdfs::remove_file(&staged);
    pin(staged.clone()).map_err(|e| Error::Kernel(format!("pin {}: {e}", staged.display())))?;
    stdfs::rename(&staged, dir.join(name)).map_err(|e| {
        let _ = stdfs::remove_file(&staged);
        Error::Io(format!("rename {} over {name}", staged.display()), e)
    })
}

fn remove(dir: &Path, name: &str) -> Result<(), Error> {
    let p = dir.join(name);
    stdfs::remove_file(&p).map_err(|e| Error::Io(format!("remove {}", p.display()), e))
}

/// Staged pins left by an upgrade that died between pin and rename.
pub(super) fn remove_staged(dir: &Path) {
    if let Ok(entries) = stdfs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(STAGED) {
                let _ = stdfs::remove_file(e.path());
            }
        }
    }
}
