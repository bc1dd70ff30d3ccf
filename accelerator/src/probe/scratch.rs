//! A throw-away network namespace for the probe, and sockets made inside it.
//!
//! The namespace is created by `unshare` on a short-lived thread and kept alive only by a file
//! descriptor: it vanishes by itself when the probe drops that descriptor and its sockets, even
//! if the process dies half-way, so the probe can never leave a namespace behind.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::Duration,
};

use nix::sched::{unshare, CloneFlags};

use super::sys;

pub const PROXY_UID: u32 = 1337;
pub const PROXY_GID: u32 = 1337;
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub struct ScratchNs {
    fd: File,
}

impl ScratchNs {
    pub fn new() -> io::Result<ScratchNs> {
        std::thread::spawn(|| -> io::Result<ScratchNs> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            sys::loopback_up()?;
            Ok(ScratchNs {
                fd: File::open("/proc/thread-self/ns/net")?,
            })
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("scratch namespace thread panicked")))
    }

    /// A path other processes (`ip ... netns PATH`) can open the namespace by while it lives.
    pub fn path(&self) -> String {
        format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&self.fd)
        )
    }

    /// The namespace's cookie, the key of the probe's policy entry.
    pub fn cookie(&self) -> io::Result<u64> {
        crate::node::netns_cookie(std::path::Path::new(&format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&self.fd)
        )))
    }

    /// Runs `f` on a new thread inside the namespace, optionally with the sidecar's uid/gid.
    pub fn spawn<T: Send + 'static>(
        &self,
        proxy: bool,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<std::thread::JoinHandle<io::Result<T>>> {
        let fd = self.fd.try_clone()?;
        Ok(std::thread::spawn(move || {
            crate::node::enter_netns(&fd)?;
            if proxy {
                sys::become_proxy(PROXY_UID, PROXY_GID)?;
            }
            f()
        }))
    }

    /// Runs `f` inside the namespace and waits for it.
    pub fn run<T: Send + 'static>(
        &self,
        proxy: bool,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        join(self.spawn(proxy, f)?)
    }

    /// Runs `program args` inside the namespace, feeding it `stdin`.
    pub fn command(&self, program: &str, args: &[&str], stdin: &str) -> io::Result<()> {
        let fd = self.fd.try_clone()?;
        let mut child = unsafe_pre_exec_setns(Command::new(program).args(args), fd)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

#[allow(unsafe_code)]
fn unsafe_pre_exec_setns(cmd: &mut Command, fd: File) -> &mut Command {
    // SAFETY: setns is async-signal-safe; the closure allocates nothing.
    unsafe { cmd.pre_exec(move || crate::node::enter_netns(&fd)) }
}

pub fn join<T>(h: std::thread::JoinHandle<io::Result<T>>) -> io::Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(io::Error::other("probe thread panicked")))
}

pub fn accept(l: &TcpListener) -> io::Result<TcpStream> {
    let (s, _) = l.accept()?;
    prepare(&s)?;
    Ok(s)
}

pub fn prepare(s: &TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok(())
}

/// A connection from `src` (port 0: any) to `dst`, made by the calling thread.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    let s = TcpStream::from(fd);
    prepare(&s)?;
    Ok(s)
}

/// What a blocking reader saw until end of stream.
pub struct Drained {
    pub bytes: Vec<u8>,
    pub spurious_eagain: u32,
}

/// Reads to end of stream, counting EAGAINs on this blocking socket (retrying them).
pub fn drain(mut s: &TcpStream) -> io::Result<Drained> {
    let mut out = Drained {
        bytes: Vec::new(),
        spurious_eagain: 0,
    };
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && out.spurious_eagain < 100 => {
                out.spurious_eagain += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Echoes until end of stream, then half-closes; for the sidecar side of a hop.
pub fn echo(mut s: TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return s.shutdown(Shutdown::Write),
            Ok(n) => s.write_all(&buf[..n])?,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Deterministic bytes, different per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
