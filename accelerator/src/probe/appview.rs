//! App-visible behaviours: small experiments an app could run on its TCP socket, each reduced to
//! an observation string.
//!
//! A socket in meshlane's sockhash receives through the kernel's `tcp_bpf` code, not plain TCP,
//! and the two differ for some receive APIs (FIONREAD, splice, SO_RCVLOWAT, SO_PEEK_OFF, MSG_OOB,
//! close with unread data, ...). Acceleration is only exact if an app cannot tell, so each
//! experiment here is written to give the same string on plain TCP whatever the timing: run it on
//! a plain pair and on an accelerated pair, and any difference is something an app could notice.
//!
//! The peer may be the far end of a chain of userspace relays, so nothing here assumes a write
//! arrives whole or at once: the app waits (bounded) until everything it needs is there, and
//! results are counts and bytes, never timings. Everything runs inside the daemon, so nothing
//! panics and nothing blocks for more than a few seconds.
#![allow(unsafe_code)]

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{mpsc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

pub type Pair = (TcpStream, TcpStream); // (app, peer)
/// Makes a fresh connected pair; called once per behaviour (some behaviours need two).
pub type MakePair<'a> = &'a (dyn Fn() -> io::Result<Pair> + Sync);

pub struct Behaviour {
    /// short stable name, snake_case, used in reports and metrics labels
    pub name: &'static str,
    /// one line for humans: what the app does
    pub what: &'static str,
    pub run: fn(MakePair) -> String,
}

/// Every behaviour, in a fixed order.
pub const ALL: &[Behaviour] = &[
    Behaviour {
        name: "fionread_tcp",
        what: "asks ioctl(FIONREAD) how many bytes are waiting",
        run: fionread_tcp,
    },
    Behaviour {
        name: "splice_to_pipe",
        what: "splices everything the peer sent into a pipe, up to EOF",
        run: splice_to_pipe,
    },
    Behaviour {
        name: "recv_waitall",
        what: "recv(MSG_WAITALL) across two peer writes",
        run: recv_waitall,
    },
    Behaviour {
        name: "rcvlowat_poll",
        what: "polls for POLLIN under SO_RCVLOWAT=100, below and at the mark",
        run: rcvlowat_poll,
    },
    Behaviour {
        name: "rcvlowat_recv",
        what: "a blocking recv under SO_RCVLOWAT=100 across two peer writes",
        run: rcvlowat_recv,
    },
    Behaviour {
        name: "peek_off",
        what: "peeks twice with SO_PEEK_OFF, then reads",
        run: peek_off,
    },
    Behaviour {
        name: "recv_oob_none",
        what: "recv(MSG_OOB) when no urgent data was sent, then reads normally",
        run: recv_oob_none,
    },
    Behaviour {
        name: "recv_trunc_null",
        what: "discards data with recv(NULL, MSG_TRUNC)",
        run: recv_trunc_null,
    },
    Behaviour {
        name: "half_close_then_read",
        what: "half-closes, then reads the peer's reply and EOF (20 times)",
        run: half_close_then_read,
    },
    Behaviour {
        name: "tcp_inq_cmsg",
        what: "reads with TCP_INQ on and looks for the TCP_CM_INQ cmsg",
        run: tcp_inq_cmsg,
    },
    Behaviour {
        name: "signal_restart",
        what: "a blocking read interrupted by a SA_RESTART signal",
        run: signal_restart,
    },
    Behaviour {
        name: "signal_no_restart",
        what: "a blocking read interrupted by a signal without SA_RESTART",
        run: signal_no_restart,
    },
    Behaviour {
        name: "epoll_et_bursts",
        what: "edge-triggered epoll over 20 small peer writes",
        run: epoll_et_bursts,
    },
    Behaviour {
        name: "poll_rdhup",
        what: "polls for POLLIN|POLLRDHUP after the peer half-closes",
        run: poll_rdhup,
    },
    Behaviour {
        name: "peer_reset",
        what: "a blocking read when the peer aborts with RST",
        run: peer_reset,
    },
    Behaviour {
        name: "reset_while_blocked",
        what: "a blocking read already waiting when the peer aborts with RST",
        run: reset_while_blocked,
    },
    Behaviour {
        name: "close_with_unread",
        what: "closes with unread data; what the peer then reads",
        run: close_with_unread,
    },
    Behaviour {
        name: "readv_scatter",
        what: "readv into three 10-byte buffers",
        run: readv_scatter,
    },
    Behaviour {
        name: "sendfile_from_app",
        what: "sends a 64 KiB file with sendfile",
        run: sendfile_from_app,
    },
    Behaviour {
        name: "splice_into_app_socket",
        what: "sends 8 KiB by splicing from a pipe into the socket",
        run: splice_into_app_socket,
    },
    Behaviour {
        name: "zerocopy_send",
        what: "sends 32 KiB with MSG_ZEROCOPY and waits for the completion",
        run: zerocopy_send,
    },
    Behaviour {
        name: "oob_send",
        what: "sends one urgent byte with MSG_OOB after normal data",
        run: oob_send,
    },
    Behaviour {
        name: "tcp_ulp_tls",
        what: "attaches the kernel TLS upper-layer protocol (TCP_ULP \"tls\")",
        run: tcp_ulp_tls,
    },
    Behaviour {
        name: "write_then_read_echo",
        what: "writes 1000 bytes and reads the peer's echo",
        run: write_then_read_echo,
    },
];

/// Runs every behaviour (each on its own fresh pair(s)); returns (name, observation).
/// An io error while setting up a pair becomes the observation "setup error: ..." (never panic).
pub fn observe_all(make: MakePair) -> Vec<(&'static str, String)> {
    run_together(ALL.iter().collect(), make)
}

/// Same, only the named behaviours (in the order of [`ALL`]; unknown names are ignored).
pub fn observe(make: MakePair, names: &[&str]) -> Vec<(&'static str, String)> {
    run_together(
        ALL.iter().filter(|b| names.contains(&b.name)).collect(),
        make,
    )
}

/// One thread per behaviour: a behaviour spends its time waiting (the peer's pauses, poll
/// timeouts), so together they take as long as the slowest one, and the daemon's start-up probe
/// stays short. Observations do not depend on timing, so running them side by side changes none.
/// Pairs are still made one at a time: a maker that connects and then accepts on a shared
/// listener must not hand one behaviour's accepted socket to another.
fn run_together(behaviours: Vec<&Behaviour>, make: MakePair) -> Vec<(&'static str, String)> {
    let one_at_a_time = Mutex::new(());
    let serial = || {
        let _g = one_at_a_time.lock().unwrap_or_else(PoisonError::into_inner);
        make()
    };
    std::thread::scope(|s| {
        let running: Vec<_> = behaviours
            .iter()
            .map(|b| {
                let serial = &serial;
                let h = std::thread::Builder::new()
                    .name(format!("appview-{}", b.name))
                    .spawn_scoped(s, move || run_one(b, serial));
                (b.name, h)
            })
            .collect();
        running
            .into_iter()
            .map(|(name, h)| {
                let obs = match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| "panic: behaviour thread".to_string()),
                    Err(e) => format!("setup error: spawn a thread: {e}"),
                };
                (name, obs)
            })
            .collect()
    })
}

/// A panic would take the daemon's probe down with it; it becomes an observation instead.
fn run_one(b: &Behaviour, make: MakePair) -> String {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (b.run)(make))).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("panic: {msg}")
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// How long the app waits for bytes the peer has written (relays may be slow, never this slow).
const WAIT: Duration = Duration::from_secs(2);
/// Read/write timeout on every socket, so no blocking call can hang the probe.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

// asm-generic values (x86_64, aarch64, riscv64); libc does not export them for Linux.
const SO_PEEK_OFF: libc::c_int = 42;
const SO_ZEROCOPY: libc::c_int = 60;
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;

/// A behaviour's body: `Err` is already the final observation (setup or unexpected error).
type Obs = Result<String, String>;

fn finish(body: impl FnOnce() -> Obs) -> String {
    body().unwrap_or_else(|e| e)
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EAGAIN => "EAGAIN",
        libc::EINTR => "EINTR",
        libc::EINVAL => "EINVAL",
        libc::EFAULT => "EFAULT",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOTCONN => "ENOTCONN",
        libc::EPIPE => "EPIPE",
        libc::ENOENT => "ENOENT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EEXIST => "EEXIST",
        libc::EBUSY => "EBUSY",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::ENOBUFS => "ENOBUFS",
        libc::EPERM => "EPERM",
        libc::EBADF => "EBADF",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// An io error as an app would name it: the errno when there is one.
fn err_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => errno_name(n),
        None => e.to_string(),
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// An unexpected failure of one step, ending the behaviour.
fn ctx(what: &'static str) -> impl Fn(io::Error) -> String {
    move |e| format!("error: {what}: {e}")
}

/// A syscall's return as a count or the errno.
fn ret(r: isize) -> Result<usize, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as usize)
    }
}

/// A return value as an observation: the count, or the errno's name.
fn show(r: Result<usize, i32>) -> String {
    match r {
        Ok(n) => n.to_string(),
        Err(e) => errno_name(e),
    }
}

fn fd(s: &TcpStream) -> RawFd {
    s.as_raw_fd()
}

/// A fresh pair with timeouts on both ends.
fn fresh(make: MakePair) -> Result<Pair, String> {
    let (app, peer) = make().map_err(|e| format!("setup error: {e}"))?;
    for s in [&app, &peer] {
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("setup error: timeouts: {e}"))?;
    }
    Ok((app, peer))
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is one int that lives across the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// poll(2) on one fd; returns revents (0 on timeout). Retries EINTR within the same deadline.
fn poll1(fd: RawFd, events: libc::c_short, within: Duration) -> io::Result<libc::c_short> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r >= 0 {
            return Ok(if r == 0 { 0 } else { p.revents });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// recv(2) into `buf` with `flags`; the count or the errno.
fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> Result<usize, i32> {
    // SAFETY: buf is valid for buf.len() bytes.
    ret(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) })
}

/// recv(2) retried on EINTR (a blocking call the experiment does not mean to interrupt).
fn recv_retry(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> Result<usize, i32> {
    loop {
        match recv(fd, buf, flags) {
            Err(libc::EINTR) => continue,
            r => return r,
        }
    }
}

/// Bytes peekable right now, from the start of the queue (0 on EOF, error or nothing).
fn peek_len(fd: RawFd, n: usize) -> usize {
    let mut buf = vec![0u8; n];
    recv(fd, &mut buf, libc::MSG_PEEK | libc::MSG_DONTWAIT).unwrap_or(0)
}

/// Waits until `ready` holds, for at most `within`; whether it did.
fn wait_for(within: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `n` bytes can be peeked on the app's socket (up to [`WAIT`]); the count seen.
fn wait_peekable(s: &TcpStream, n: usize) -> usize {
    let mut seen = 0;
    wait_for(WAIT, || {
        seen = peek_len(fd(s), n);
        seen >= n
    });
    seen
}

/// " peeked=K" when the wait came up short, so a stalled delivery shows in the observation.
fn short(seen: usize, n: usize) -> String {
    if seen < n {
        format!(" peeked={seen}")
    } else {
        String::new()
    }
}

/// Reads until `n` bytes, EOF or an error (timeouts come from the socket); what arrived, and
/// the error that stopped it, if any.
fn read_n(mut s: &TcpStream, n: usize) -> (Vec<u8>, Option<io::Error>) {
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 16384];
    while out.len() < n {
        let want = (n - out.len()).min(buf.len());
        match s.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

/// Reads to EOF (or an error, or `limit` bytes).
fn read_to_eof(s: &TcpStream, limit: usize) -> (Vec<u8>, Option<io::Error>) {
    read_n(s, limit)
}

/// Reads whatever is there right now, without waiting.
fn drain_now(fd: RawFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(k @ 1..) = recv(fd, &mut buf, libc::MSG_DONTWAIT) {
        out.extend_from_slice(&buf[..k]);
    }
    out
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A pipe, (read end, write end), both close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A peer's write, as a suffix naming its failure (empty when it worked).
fn peer_note(r: thread::Result<io::Result<()>>) -> String {
    match r {
        Ok(Ok(())) => String::new(),
        Ok(Err(e)) => format!(" peer_error={}", err_name(&e)),
        Err(_) => " peer_error=panic".to_string(),
    }
}

/// (level, type, data) of every control message `recvmsg` filled in.
fn cmsgs(msg: &libc::msghdr) -> Vec<(libc::c_int, libc::c_int, Vec<u8>)> {
    let mut out = Vec::new();
    // SAFETY: msg describes a control buffer the kernel filled; the CMSG_* macros stay within
    // msg_controllen, and each header's cmsg_len bounds its data.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let hdr = std::ptr::read_unaligned(c);
            let data_len = (hdr.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
            let data = std::slice::from_raw_parts(libc::CMSG_DATA(c), data_len).to_vec();
            out.push((hdr.cmsg_level, hdr.cmsg_type, data));
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The behaviours.

fn fionread_tcp(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        (&peer).write_all(&[b'f'; 100]).map_err(ctx("peer write"))?;
        let seen = wait_peekable(&app, 100);
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        let r = unsafe { libc::ioctl(fd(&app), libc::FIONREAD, &mut n) };
        let v = if r == 0 {
            n.to_string()
        } else {
            errno_name(errno())
        };
        Ok(format!("fionread={v}{}", short(seen, 100)))
    })
}

fn splice_to_pipe(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        (&peer)
            .write_all(&pattern(3000))
            .map_err(ctx("peer write"))?;
        peer.shutdown(Shutdown::Write)
            .map_err(ctx("peer shutdown"))?;
        let (pr, pw) = pipe().map_err(ctx("pipe"))?;
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut spliced = 0usize;
        let mut buf = vec![0u8; 65536];
        let end = loop {
            // SAFETY: splice between two fds we own; null offsets (both are streams).
            let r = unsafe {
                libc::splice(
                    fd(&app),
                    std::ptr::null_mut(),
                    pw.as_raw_fd(),
                    std::ptr::null_mut(),
                    65536,
                    libc::SPLICE_F_MOVE,
                )
            };
            match ret(r) {
                Ok(0) => break "eof".to_string(),
                Ok(n) => {
                    spliced += n;
                    // The pipe holds exactly n bytes now; empty it so the next splice fits.
                    let mut left = n;
                    while left > 0 {
                        let want = left.min(buf.len());
                        // SAFETY: buf is valid for `want` bytes.
                        let k =
                            unsafe { libc::read(pr.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
                        match ret(k) {
                            Ok(0) => return Ok(format!("spliced={spliced} end=pipe eof")),
                            Ok(k) => left -= k,
                            Err(libc::EINTR) => {}
                            Err(e) => {
                                return Ok(format!("spliced={spliced} end=pipe {}", errno_name(e)))
                            }
                        }
                    }
                }
                Err(libc::EINTR) => {}
                Err(libc::EAGAIN) => {
                    if Instant::now() >= deadline {
                        break "EAGAIN".to_string();
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => break errno_name(e),
            }
        };
        Ok(format!("spliced={spliced} end={end}"))
    })
}

fn recv_waitall(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        thread::scope(|s| {
            let w = s.spawn(|| -> io::Result<()> {
                (&peer).write_all(&[1u8; 100])?;
                thread::sleep(Duration::from_millis(50));
                (&peer).write_all(&[2u8; 100])
            });
            let mut buf = [0u8; 200];
            let got = recv_retry(fd(&app), &mut buf, libc::MSG_WAITALL);
            Ok(format!("got={}{}", show(got), peer_note(w.join())))
        })
    })
}

fn rcvlowat_poll(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        setsockopt_int(fd(&app), libc::SOL_SOCKET, libc::SO_RCVLOWAT, 100)
            .map_err(ctx("SO_RCVLOWAT"))?;
        (&peer).write_all(&[b'l'; 50]).map_err(ctx("peer write"))?;
        let seen = wait_peekable(&app, 50);
        // Let anything still in flight inside the kernel settle before asking.
        thread::sleep(Duration::from_millis(100));
        let r50 = poll1(fd(&app), libc::POLLIN, Duration::ZERO).map_err(ctx("poll"))?;
        (&peer).write_all(&[b'l'; 50]).map_err(ctx("peer write"))?;
        let r100 = poll1(fd(&app), libc::POLLIN, WAIT).map_err(ctx("poll"))?;
        let bit = |r: libc::c_short| u8::from(r & libc::POLLIN != 0);
        Ok(format!(
            "after50={} after100={}{}",
            bit(r50),
            bit(r100),
            short(seen, 50)
        ))
    })
}

fn rcvlowat_recv(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        setsockopt_int(fd(&app), libc::SOL_SOCKET, libc::SO_RCVLOWAT, 100)
            .map_err(ctx("SO_RCVLOWAT"))?;
        thread::scope(|s| {
            let w = s.spawn(|| -> io::Result<()> {
                (&peer).write_all(&[1u8; 50])?;
                thread::sleep(Duration::from_millis(100));
                (&peer).write_all(&[2u8; 50])
            });
            let mut buf = [0u8; 200];
            let got = recv_retry(fd(&app), &mut buf, 0);
            Ok(format!("got={}{}", show(got), peer_note(w.join())))
        })
    })
}

fn peek_off(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        let f = fd(&app);
        let set = || setsockopt_int(f, libc::SOL_SOCKET, SO_PEEK_OFF, 0);
        let mut out = match set() {
            Ok(()) => String::new(),
            Err(e) => format!("set={} ", err_name(&e)),
        };
        (&peer).write_all(b"abcdef").map_err(ctx("peer write"))?;
        // Every probing peek moves the peek offset, so rewind it before each one and after.
        let mut seen = 0;
        wait_for(WAIT, || {
            let _ = set();
            seen = peek_len(f, 6);
            seen >= 6
        });
        let _ = set();
        let peek = || {
            let mut b = [0u8; 3];
            match recv_retry(f, &mut b, libc::MSG_PEEK) {
                Ok(n) => text(&b[..n]),
                Err(e) => errno_name(e),
            }
        };
        let p1 = peek();
        let p2 = peek();
        let mut b = [0u8; 6];
        let read = match recv_retry(f, &mut b, 0) {
            Ok(n) => text(&b[..n]),
            Err(e) => errno_name(e),
        };
        out.push_str(&format!(
            "peek1={p1} peek2={p2} read={read}{}",
            short(seen, 6)
        ));
        Ok(out)
    })
}

fn recv_oob_none(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        (&peer).write_all(&[b'n'; 10]).map_err(ctx("peer write"))?;
        let seen = wait_peekable(&app, 10);
        let mut b = [0u8; 1];
        let oob = show(recv(fd(&app), &mut b, libc::MSG_OOB));
        let (rest, err) = read_n(&app, 10);
        let err = err.map(|e| format!(" then_error={}", err_name(&e)));
        Ok(format!(
            "oob={oob} then={}{}{}",
            rest.len(),
            err.unwrap_or_default(),
            short(seen, 10)
        ))
    })
}

fn recv_trunc_null(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        (&peer).write_all(&[b't'; 10]).map_err(ctx("peer write"))?;
        let seen = wait_peekable(&app, 10);
        // SAFETY: with MSG_TRUNC TCP discards instead of copying; a stack that copies anyway
        // gets EFAULT from the kernel, never a write to our memory.
        let r = ret(unsafe { libc::recv(fd(&app), std::ptr::null_mut(), 10, libc::MSG_TRUNC) });
        let left = drain_now(fd(&app)).len();
        Ok(format!("ret={} left={left}{}", show(r), short(seen, 10)))
    })
}

fn half_close_then_read(make: MakePair) -> String {
    finish(|| {
        const ROUNDS: usize = 20;
        // Bounds the whole loop: a stack that never delivers the reply must not cost 20 timeouts.
        // How many rounds fit is timing, so the observation never names it: only what a round
        // that ran saw (an EAGAIN that came early, before the read timeout, is the kernel's; one
        // that came at the timeout means the reply never came).
        let budget = Instant::now() + 2 * IO_TIMEOUT;
        let (mut reply, mut eagain, mut timeouts, mut other, mut eof) = (0, 0, 0, 0, 0);
        let mut first_other = String::new();
        let mut done = 0;
        for _ in 0..ROUNDS {
            let left = budget.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let (app, peer) = fresh(make)?;
            app.set_read_timeout(Some(IO_TIMEOUT))
                .map_err(ctx("read timeout"))?;
            app.shutdown(Shutdown::Write).map_err(ctx("shutdown"))?;
            let started = Instant::now();
            let outcome = thread::scope(|s| {
                let p = s.spawn(|| -> io::Result<()> {
                    let (_, err) = read_to_eof(&peer, 1 << 20);
                    if let Some(e) = err {
                        return Err(e);
                    }
                    thread::sleep(Duration::from_millis(20));
                    (&peer).write_all(b"reply")?;
                    peer.shutdown(Shutdown::Both)
                });
                let mut buf = [0u8; 64];
                let first = loop {
                    match (&app).read(&mut buf) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        r => break r,
                    }
                };
                let outcome = match first {
                    Ok(0) => Err("first read eof".to_string()),
                    Ok(n) => {
                        // The reply may come in pieces through relays.
                        let mut got = buf[..n].to_vec();
                        let (more, _) = read_n(&app, 5usize.saturating_sub(got.len()));
                        got.extend(more);
                        if got == b"reply" {
                            let (after, err) = read_n(&app, 1);
                            Ok((after.is_empty() && err.is_none(), err))
                        } else {
                            Err(format!("got {:?}", text(&got)))
                        }
                    }
                    Err(e) => Err(err_name(&e)),
                };
                let _ = p.join();
                (outcome, started.elapsed())
            });
            let (outcome, waited) = outcome;
            done += 1;
            match outcome {
                Ok((is_eof, _)) => {
                    reply += 1;
                    eof += usize::from(is_eof);
                }
                Err(e) if e == "EAGAIN" && waited + Duration::from_millis(500) >= IO_TIMEOUT => {
                    timeouts += 1
                }
                Err(e) if e == "EAGAIN" => eagain += 1,
                Err(e) => {
                    other += 1;
                    if first_other.is_empty() {
                        first_other = e;
                    }
                }
            }
        }
        let all = |n: usize| {
            if n == done {
                "all"
            } else if n == 0 {
                "none"
            } else {
                "some"
            }
        };
        let mut out = format!(
            "reply={} eagain={eagain} timeout={timeouts} other={other} eof_after_reply={}",
            all(reply),
            all(eof)
        );
        if !first_other.is_empty() {
            out.push_str(&format!(" first_other={first_other}"));
        }
        Ok(out)
    })
}

fn tcp_inq_cmsg(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        let mut out = match setsockopt_int(fd(&app), libc::SOL_TCP, libc::TCP_INQ, 1) {
            Ok(()) => String::new(),
            Err(e) => format!("set={} ", err_name(&e)),
        };
        (&peer).write_all(&[b'q'; 10]).map_err(ctx("peer write"))?;
        let seen = wait_peekable(&app, 10);
        let mut buf = [0u8; 64];
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let r = loop {
            // SAFETY: msg points at live buffers described by their lengths.
            match ret(unsafe { libc::recvmsg(fd(&app), &mut msg, 0) }) {
                Err(libc::EINTR) => continue,
                r => break r,
            }
        };
        let present = r.is_ok()
            && cmsgs(&msg)
                .iter()
                .any(|(l, t, _)| *l == libc::SOL_TCP && *t == libc::TCP_CM_INQ);
        out.push_str(&format!(
            "cmsg={} read={}{}",
            if present { "present" } else { "absent" },
            show(r),
            short(seen, 10)
        ));
        Ok(out)
    })
}

/// Process-wide SIGUSR1 disposition is shared: one signal experiment at a time.
static SIGNAL_LOCK: Mutex<()> = Mutex::new(());

extern "C" fn on_sigusr1(_: libc::c_int) {}

fn signal_restart(make: MakePair) -> String {
    signal_read(make, true)
}

fn signal_no_restart(make: MakePair) -> String {
    signal_read(make, false)
}

fn signal_read(make: MakePair, restart: bool) -> String {
    finish(|| {
        let _one = SIGNAL_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let (app, peer) = fresh(make)?;
        // With SO_RCVTIMEO set the kernel answers EINTR even under SA_RESTART (signal(7)), which
        // would hide the difference under test; a watchdog bounds this read instead.
        app.set_read_timeout(None).map_err(ctx("read timeout"))?;
        // SAFETY: sigaction is plain data; all-zero is a valid value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = if restart { libc::SA_RESTART } else { 0 };
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: sa_mask is a valid sigset_t; the handler is async-signal-safe (it does
        // nothing); old receives the previous action, restored below.
        let r = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGUSR1, &sa, &mut old)
        };
        if r != 0 {
            return Err(ctx("sigaction")(io::Error::last_os_error()));
        }
        let out = interrupted_read(&app, &peer);
        // SAFETY: restores the action saved above.
        unsafe { libc::sigaction(libc::SIGUSR1, &old, std::ptr::null_mut()) };
        out
    })
}

/// Whether thread `tid` of this process is asleep in read(2), per /proc.
fn blocked_in_read(tid: libc::c_long) -> bool {
    let base = format!("/proc/self/task/{tid}");
    let sleeping = std::fs::read_to_string(format!("{base}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('S'))
        })
        .unwrap_or(false);
    // /proc/<tid>/syscall may be unreadable (no ptrace access); then sleeping has to do.
    let in_read = std::fs::read_to_string(format!("{base}/syscall"))
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .map(|n| n.parse::<libc::c_long>())
        })
        .map(|n| n == Ok(libc::SYS_read))
        .unwrap_or(true);
    sleeping && in_read
}

/// A reading thread, a SIGUSR1 to it while it is blocked, then one byte from the peer.
fn interrupted_read(app: &TcpStream, peer: &TcpStream) -> Obs {
    let reader = app.try_clone().map_err(ctx("dup"))?;
    let (id_tx, id_rx) = mpsc::channel::<(libc::pthread_t, libc::c_long)>();
    let (res_tx, res_rx) = mpsc::channel::<Result<usize, i32>>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    // Not scoped: if the read never returns, the probe must still go on without it.
    let handle = thread::Builder::new()
        .name("appview-signal".into())
        .spawn(move || {
            // SAFETY: an all-empty set plus SIGUSR1, applied to this thread only.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR1);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            }
            // SAFETY: both calls only identify the calling thread.
            let ids = unsafe { (libc::pthread_self(), libc::syscall(libc::SYS_gettid)) };
            let _ = id_tx.send(ids);
            let mut b = [0u8; 16];
            // SAFETY: b is valid for 16 bytes; the fd is our own dup.
            let r = ret(unsafe { libc::read(reader.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) });
            let _ = res_tx.send(r);
            // pthread_kill on an exited thread is undefined: live until the sender is done.
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        })
        .map_err(ctx("spawn"))?;
    let Ok((pt, tid)) = id_rx.recv_timeout(WAIT) else {
        return Err("error: reader thread did not start".to_string());
    };
    thread::sleep(Duration::from_millis(100));
    wait_for(Duration::from_secs(1), || blocked_in_read(tid));
    let mut res = res_rx.try_recv().ok();
    if res.is_none() {
        // SAFETY: the thread is alive (it waits on done_rx before exiting).
        unsafe { libc::pthread_kill(pt, libc::SIGUSR1) };
    }
    thread::sleep(Duration::from_millis(300));
    let mut w = peer;
    let peer_err = w.write_all(b"x").err();
    if res.is_none() {
        res = res_rx.recv_timeout(WAIT).ok();
    }
    let mut note = String::new();
    if res.is_none() {
        let _ = app.shutdown(Shutdown::Both);
        res = res_rx.recv_timeout(Duration::from_secs(1)).ok();
        note.push_str(" (watchdog)");
    }
    let _ = done_tx.send(());
    let out = match res {
        Some(r) => {
            let _ = handle.join();
            format!("read={}{note}", show(r))
        }
        // Still stuck: leave the thread behind rather than hang the probe.
        None => "read=stuck".to_string(),
    };
    Ok(match peer_err {
        Some(e) => format!("{out} peer_error={}", err_name(&e)),
        None => out,
    })
}

fn epoll_et_bursts(make: MakePair) -> String {
    finish(|| {
        const ROUNDS: usize = 20;
        let (app, peer) = fresh(make)?;
        app.set_nonblocking(true).map_err(ctx("nonblocking"))?;
        // SAFETY: plain epoll_create1; the fd is owned right away.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(ctx("epoll_create1")(io::Error::last_os_error()));
        }
        // SAFETY: ep was just created and is owned by nobody else.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: both fds are live; ev is a valid event.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd(&app), &mut ev) } != 0 {
            return Err(ctx("epoll_ctl")(io::Error::last_os_error()));
        }
        let (mut events, mut bytes) = (0, 0);
        let mut stopped = None;
        for round in 0..ROUNDS {
            (&peer)
                .write_all(&[round as u8; 10])
                .map_err(ctx("peer write"))?;
            let deadline = Instant::now() + WAIT;
            let (mut evented, mut got) = (false, 0);
            // Through relays one write may arrive in pieces, each its own edge.
            while got < 10 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
                // SAFETY: evs has room for 4 events.
                let n = unsafe {
                    libc::epoll_wait(ep.as_raw_fd(), evs.as_mut_ptr(), 4, left.as_millis() as i32)
                };
                if n < 0 {
                    if errno() == libc::EINTR {
                        continue;
                    }
                    return Err(ctx("epoll_wait")(io::Error::last_os_error()));
                }
                if n == 0 {
                    break;
                }
                evented = true;
                got += drain_now(fd(&app)).len();
            }
            events += usize::from(evented);
            bytes += got;
            if got < 10 {
                // A missed edge: count what was there anyway, and stop so time stays bounded.
                bytes += drain_now(fd(&app)).len();
                stopped = Some(round + 1);
                break;
            }
        }
        let mut out = format!("events={events} bytes={bytes}");
        if let Some(r) = stopped {
            out.push_str(&format!(" stopped_at={r}"));
        }
        Ok(out)
    })
}

fn poll_names(r: libc::c_short) -> String {
    const NAMES: &[(libc::c_short, &str)] = &[
        (libc::POLLIN, "POLLIN"),
        (libc::POLLPRI, "POLLPRI"),
        (libc::POLLOUT, "POLLOUT"),
        (libc::POLLRDHUP, "POLLRDHUP"),
        (libc::POLLERR, "POLLERR"),
        (libc::POLLHUP, "POLLHUP"),
        (libc::POLLNVAL, "POLLNVAL"),
    ];
    let set: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| r & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if set.is_empty() {
        "none".to_string()
    } else {
        set.join("|")
    }
}

fn poll_rdhup(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        peer.shutdown(Shutdown::Write)
            .map_err(ctx("peer shutdown"))?;
        let r = poll1(fd(&app), libc::POLLIN | libc::POLLRDHUP, WAIT).map_err(ctx("poll"))?;
        Ok(format!("revents={}", poll_names(r)))
    })
}

/// SO_LINGER {on, 0}: the socket's close sends RST instead of FIN.
fn abort_on_close(s: &TcpStream) -> Result<(), String> {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value is one linger struct that lives across the call.
    let r = unsafe {
        libc::setsockopt(
            fd(s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lg as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(ctx("SO_LINGER")(io::Error::last_os_error()));
    }
    Ok(())
}

fn peer_reset(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        abort_on_close(&peer)?;
        drop(peer);
        app.set_read_timeout(Some(WAIT))
            .map_err(ctx("read timeout"))?;
        let mut b = [0u8; 16];
        Ok(format!("read={}", show(recv_retry(fd(&app), &mut b, 0))))
    })
}

/// Unlike `peer_reset`, the read is already asleep when the RST comes, so what wakes it is the
/// reset itself (tcp_bpf's wait returns "no data" there instead of the error).
fn reset_while_blocked(make: MakePair) -> String {
    const TIMEOUT: Duration = Duration::from_secs(5);
    finish(|| {
        let (app, peer) = fresh(make)?;
        abort_on_close(&peer)?;
        app.set_read_timeout(Some(TIMEOUT))
            .map_err(ctx("read timeout"))?;
        let resetter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            drop(peer);
        });
        let started = Instant::now();
        let mut b = [0u8; 16];
        let r = recv_retry(fd(&app), &mut b, 0);
        let waited = started.elapsed();
        let _ = resetter.join();
        Ok(match r {
            // The read timeout ran out: the reset never reached the app (a relay that drops
            // RSTs); an early EAGAIN is a wake-up that returned no error.
            Err(libc::EAGAIN) if waited >= TIMEOUT - Duration::from_secs(1) => {
                "read=timeout".into()
            }
            r => format!("read={}", show(r)),
        })
    })
}

fn close_with_unread(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        (&peer).write_all(&[b'u'; 10]).map_err(ctx("peer write"))?;
        let seen = wait_peekable(&app, 10);
        drop(app);
        peer.set_read_timeout(Some(WAIT))
            .map_err(ctx("read timeout"))?;
        let mut b = [0u8; 16];
        let seen_by_peer = match recv_retry(fd(&peer), &mut b, 0) {
            Ok(0) => "eof".to_string(),
            Ok(n) => format!("read {n}"),
            Err(e) => errno_name(e),
        };
        Ok(format!("peer={seen_by_peer}{}", short(seen, 10)))
    })
}

fn readv_scatter(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        let sent = b"0123456789abcdefghijklmnopqrst";
        (&peer).write_all(sent).map_err(ctx("peer write"))?;
        let seen = wait_peekable(&app, sent.len());
        let mut bufs = [[0u8; 10]; 3];
        let iov = bufs.each_mut().map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        });
        let r = loop {
            // SAFETY: each iovec points at a live 10-byte buffer.
            match ret(unsafe { libc::readv(fd(&app), iov.as_ptr(), iov.len() as libc::c_int) }) {
                Err(libc::EINTR) => continue,
                r => break r,
            }
        };
        let n = r.unwrap_or(0);
        let parts: Vec<String> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| text(&b[..n.saturating_sub(i * 10).min(10)]))
            .collect();
        Ok(format!(
            "ret={} iov={}{}",
            show(r),
            parts.join("|"),
            short(seen, sent.len())
        ))
    })
}

/// A unique path for a scratch file (pid, a counter and the clock: never reused).
fn temp_path() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("meshlane-appview-{}-{n}-{t}", std::process::id()))
}

fn sendfile_from_app(make: MakePair) -> String {
    finish(|| {
        let data = pattern(64 * 1024);
        let path = temp_path();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(ctx("temp file"))?;
        // Unlinked at once: the open fd is all sendfile needs, and nothing can be left behind.
        let _ = std::fs::remove_file(&path);
        file.write_all(&data).map_err(ctx("temp file write"))?;
        let (app, peer) = fresh(make)?;
        thread::scope(|s| {
            let p = s.spawn(|| read_to_eof(&peer, 1 << 20));
            let mut off: libc::off_t = 0;
            let mut err = None;
            while (off as usize) < data.len() {
                let want = data.len() - off as usize;
                // SAFETY: both fds are live; off is a valid offset we own.
                let r = unsafe { libc::sendfile(fd(&app), file.as_raw_fd(), &mut off, want) };
                match ret(r) {
                    Ok(0) => break,
                    Ok(_) | Err(libc::EINTR) => {}
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            let _ = app.shutdown(Shutdown::Write);
            let (got, _) = p.join().unwrap_or_default();
            let mut out = match err {
                Some(e) => format!("sendfile={} ", errno_name(e)),
                None => String::new(),
            };
            out.push_str(&format!("peer_got={} same={}", got.len(), got == data));
            Ok(out)
        })
    })
}

fn splice_into_app_socket(make: MakePair) -> String {
    finish(|| {
        let data = pattern(8 * 1024);
        let (pr, pw) = pipe().map_err(ctx("pipe"))?;
        // 8 KiB fits in a pipe's default 64 KiB, so this write does not block.
        std::fs::File::from(pw)
            .write_all(&data)
            .map_err(ctx("pipe write"))?;
        let (app, peer) = fresh(make)?;
        thread::scope(|s| {
            let p = s.spawn(|| read_to_eof(&peer, 1 << 20));
            let mut moved = 0;
            let mut err = None;
            while moved < data.len() {
                // SAFETY: splice between two fds we own; null offsets (both are streams).
                let r = unsafe {
                    libc::splice(
                        pr.as_raw_fd(),
                        std::ptr::null_mut(),
                        fd(&app),
                        std::ptr::null_mut(),
                        data.len() - moved,
                        libc::SPLICE_F_MOVE,
                    )
                };
                match ret(r) {
                    Ok(0) => break,
                    Ok(n) => moved += n,
                    Err(libc::EINTR) => {}
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            let _ = app.shutdown(Shutdown::Write);
            let (got, _) = p.join().unwrap_or_default();
            let mut out = match err {
                Some(e) => format!("splice={} ", errno_name(e)),
                None => String::new(),
            };
            out.push_str(&format!("peer_got={} same={}", got.len(), got == data));
            Ok(out)
        })
    })
}

/// Waits for a MSG_ZEROCOPY completion on the error queue.
fn zerocopy_completion(f: RawFd) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // POLLERR is always reported; asking for nothing else waits for the error queue only.
        if poll1(f, 0, left).unwrap_or(0) & libc::POLLERR == 0 {
            return false;
        }
        let mut control = [0u64; 16];
        // SAFETY: msghdr is plain data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: msg points at a live control buffer and no data buffers.
        let r = unsafe { libc::recvmsg(f, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if r >= 0 {
            let found = cmsgs(&msg).iter().any(|(level, ty, data)| {
                let recverr = (*level == libc::SOL_IP && *ty == libc::IP_RECVERR)
                    || (*level == libc::SOL_IPV6 && *ty == libc::IPV6_RECVERR);
                recverr
                    && data.len() >= std::mem::size_of::<libc::sock_extended_err>()
                    // SAFETY: data holds at least one sock_extended_err (checked above).
                    && unsafe {
                        let ee = std::ptr::read_unaligned(
                            data.as_ptr().cast::<libc::sock_extended_err>(),
                        );
                        ee.ee_errno == 0 && ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY
                    }
            });
            if found {
                return true;
            }
        } else if !matches!(errno(), libc::EAGAIN | libc::EINTR) {
            return false;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn zerocopy_send(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        let mut out = match setsockopt_int(fd(&app), libc::SOL_SOCKET, SO_ZEROCOPY, 1) {
            Ok(()) => String::new(),
            Err(e) => format!("so_zerocopy={} ", err_name(&e)),
        };
        // Lives until after the completion wait: the kernel may still reference these pages.
        let data = pattern(32 * 1024);
        thread::scope(|s| {
            let p = s.spawn(|| read_n(&peer, data.len()));
            let mut sent = 0;
            let mut err = None;
            while sent < data.len() {
                let rest = &data[sent..];
                // SAFETY: rest is valid for rest.len() bytes and outlives the completion wait.
                let r = unsafe {
                    libc::send(
                        fd(&app),
                        rest.as_ptr().cast(),
                        rest.len(),
                        libc::MSG_ZEROCOPY,
                    )
                };
                match ret(r) {
                    Ok(n) => sent += n,
                    Err(libc::EINTR) => {}
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            let completion = sent > 0 && zerocopy_completion(fd(&app));
            let (got, _) = p.join().unwrap_or_default();
            out.push_str(&format!(
                "send={} completion={} peer_got={}",
                err.map_or("ok".to_string(), errno_name),
                if completion { "yes" } else { "no" },
                got.len()
            ));
            Ok(out)
        })
    })
}

fn oob_send(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        (&app).write_all(b"abc").map_err(ctx("write"))?;
        // SAFETY: one byte from a static buffer.
        let r = ret(unsafe { libc::send(fd(&app), b"U".as_ptr().cast(), 1, libc::MSG_OOB) });
        let mut out = match r {
            Ok(_) => String::new(),
            Err(e) => format!("send_oob={} ", errno_name(e)),
        };
        let seen = wait_peekable(&peer, 3);
        // The urgent byte travels after "abc"; on plain TCP POLLPRI says it is there.
        let _ = poll1(fd(&peer), libc::POLLPRI, Duration::from_millis(800));
        // MSG_OOB first: on plain TCP a normal read past the urgent mark discards the urgent
        // byte (tcp_recvmsg clears urg_data), which would hide where it went.
        let mut b = [0u8; 1];
        let oob = match recv(fd(&peer), &mut b, libc::MSG_OOB | libc::MSG_DONTWAIT) {
            Ok(0) => "none".to_string(),
            Ok(_) => text(&b),
            Err(e) => errno_name(e),
        };
        let normal = drain_now(fd(&peer));
        let normal = if normal.is_empty() {
            "none".to_string()
        } else {
            text(&normal)
        };
        out.push_str(&format!(
            "peer_normal={normal} peer_oob={oob}{}",
            short(seen, 3)
        ));
        Ok(out)
    })
}

fn tcp_ulp_tls(make: MakePair) -> String {
    finish(|| {
        let (app, _peer) = fresh(make)?;
        let name = b"tls";
        // SAFETY: the option value is a 3-byte string that lives across the call.
        let r = unsafe {
            libc::setsockopt(
                fd(&app),
                libc::SOL_TCP,
                libc::TCP_ULP,
                name.as_ptr().cast(),
                name.len() as libc::socklen_t,
            )
        };
        Ok(if r == 0 {
            "ulp=ok".to_string()
        } else {
            format!("ulp={}", errno_name(errno()))
        })
    })
}

fn write_then_read_echo(make: MakePair) -> String {
    finish(|| {
        let (app, peer) = fresh(make)?;
        let data = pattern(1000);
        thread::scope(|s| {
            let p = s.spawn(|| -> io::Result<()> {
                let (got, err) = read_n(&peer, 1000);
                if let Some(e) = err {
                    return Err(e);
                }
                (&peer).write_all(&got)
            });
            (&app).write_all(&data).map_err(ctx("write"))?;
            let (back, err) = read_n(&app, 1000);
            let note = peer_note(p.join());
            Ok(match err {
                Some(e) => format!("echo={} got={}{note}", err_name(&e), back.len()),
                None if back == data => format!("echo=ok{note}"),
                None => format!("echo=mismatch got={}{note}", back.len()),
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn loopback_pair() -> io::Result<Pair> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let app = TcpStream::connect(l.local_addr()?)?;
        let (peer, _) = l.accept()?;
        Ok((app, peer))
    }

    #[test]
    fn appview_plain_tcp_is_stable() {
        let first = observe_all(&loopback_pair);
        for (name, obs) in &first {
            println!("{name:<24} {obs}");
        }
        assert_eq!(first.len(), ALL.len());
        let get = |n: &str| {
            first
                .iter()
                .find(|(name, _)| *name == n)
                .map(|(_, o)| o.clone())
                .unwrap()
        };
        assert_eq!(get("fionread_tcp"), "fionread=100");
        assert_eq!(get("splice_to_pipe"), "spliced=3000 end=eof");
        assert_eq!(get("recv_waitall"), "got=200");
        assert_eq!(
            get("half_close_then_read"),
            "reply=all eagain=0 timeout=0 other=0 eof_after_reply=all"
        );
        assert_eq!(get("signal_restart"), "read=1");
        assert_eq!(get("signal_no_restart"), "read=EINTR");
        assert_eq!(get("epoll_et_bursts"), "events=20 bytes=200");
        assert_eq!(get("write_then_read_echo"), "echo=ok");
        assert_eq!(get("peer_reset"), "read=ECONNRESET");
        assert_eq!(get("reset_while_blocked"), "read=ECONNRESET");

        let second = observe_all(&loopback_pair);
        assert_eq!(first, second, "plain TCP observations depend on timing");

        let some = observe(&loopback_pair, &["readv_scatter", "fionread_tcp"]);
        let names: Vec<_> = some.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["fionread_tcp", "readv_scatter"]);
    }
}
