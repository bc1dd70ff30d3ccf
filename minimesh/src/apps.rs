//! Workloads for the pods: an echo server, the simplest app whose replies
//! prove bytes went through intact and whose half-close handling shows FINs
//! travel end to end.

use crate::netns::Netns;
use crate::sock;
use anyhow::{Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A TCP echo server listening inside a pod. Stops listening on drop;
/// connections in flight finish on their own threads.
#[derive(Debug)]
pub struct EchoServer {
    listener: Arc<TcpListener>,
    addr: SocketAddrV4,
    accepted: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `addr` inside `ns` (the socket is created there, so it
    /// stays there whichever thread accepts on it) and echoes every
    /// connection on its own thread.
    pub fn spawn(ns: &Netns, addr: SocketAddrV4) -> Result<EchoServer> {
        let listener = Arc::new(
            ns.run(|| sock::listen_reuseaddr(addr))?
                .with_context(|| format!("echo server on {addr} in {}", ns.name()))?,
        );
        let accepted = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, accepted, stopping) = (
                Arc::clone(&listener),
                Arc::clone(&accepted),
                Arc::clone(&stopping),
            );
            std::thread::Builder::new()
                .name(format!("echo-{}", addr.port()))
                .spawn(move || accept_loop(&listener, &accepted, &stopping))
                .context("spawning the echo accept thread")?
        };
        Ok(EchoServer {
            listener,
            addr,
            accepted,
            stopping,
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept() (EINVAL), see Relay's Drop.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, accepted: &AtomicU64, stopping: &AtomicBool) {
    loop {
        let result = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match result {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = std::thread::Builder::new()
                    .name("echo-conn".into())
                    .spawn(move || echo(stream))
                {
                    eprintln!("minimesh echo: spawning a connection thread: {e}");
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
                Some(libc::EINVAL) => return,
                _ => {
                    eprintln!("minimesh echo: accept: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            },
        }
    }
}

/// Echoes until the client half-closes, then half-closes back (after
/// everything read was written). A reset from the client is passed on as a
/// reset, an abortive close.
fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                sock::set_linger_zero(&stream);
                return;
            }
        }
    }
}
