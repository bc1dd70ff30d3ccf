//! A sidecar whose memory cgroup has (almost) no room, behind a reader that stopped reading.
//! (The whole test process joins the limited group, the app's writer too: the relays run as its
//! threads.) Plain TCP holds the writer back (a blocking write waits, a non-blocking one gets
//! EAGAIN). A redirect charges the bytes to the receiving socket's memory cgroup from the
//! writer's call, and a charge that fails there is the writer's error (ENOMEM) or a short write
//! (`bpf_tcp_ingress`; docs/DESIGN.md, "Memory"). The daemon's memory guard reads each pod's
//! groups and marks a pod with too little room (`POLICY_MEMORY_TIGHT`): sk_msg then moves the
//! pod's redirected directions to TCP, which holds the writer back the normal way.
//!
//! Needs cgroup v1's TCP memory limit (`memory.kmem.tcp.limit_in_bytes`, as on this project's
//! machines); cgroup v2 charges socket memory to `memory.max`, where the same failure needs a
//! group with nothing left to reclaim.

mod support;

use std::{
    net::{SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use meshlane::{
    datapath,
    node::memory::{group_of, room, Mounts},
};
use meshlane_common::{POLICY_INBOUND, POLICY_MEMORY_TIGHT, POLICY_OUTBOUND};
use minimesh::{CaptureConfig, TwoPods};
use support::*;

/// One test at a time: the first moves this whole process into a limited group.
static SERIAL: Mutex<()> = Mutex::new(());
/// The daemon's default `--memory-headroom`.
const HEADROOM: u64 = 16 << 20;

const V1_MEMORY: &str = "/sys/fs/cgroup/memory";

/// A cgroup-v1 memory group with a TCP memory limit. Entered, it holds this whole process while
/// it lives (sockets created or accepted meanwhile are charged to it).
struct TcpLimitedMemcg {
    path: PathBuf,
    /// The group this process was in, to go back to.
    was: PathBuf,
}

impl TcpLimitedMemcg {
    fn enter(name: &str, tcp_limit: u64) -> Option<TcpLimitedMemcg> {
        let g = TcpLimitedMemcg::create(name, tcp_limit)?;
        std::fs::write(g.path.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        Some(g)
    }

    fn create(name: &str, tcp_limit: u64) -> Option<TcpLimitedMemcg> {
        let root = PathBuf::from(V1_MEMORY);
        if !root.join("memory.kmem.tcp.limit_in_bytes").exists() {
            eprintln!("{name}: no cgroup-v1 TCP memory limit on this machine");
            return None;
        }
        let path = root.join(format!("meshlane-test-{name}-{}", std::process::id()));
        let was = std::fs::read_to_string("/proc/self/cgroup")
            .unwrap()
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, controllers, p) = (f.next()?, f.next()?, f.next()?);
                controllers
                    .split(',')
                    .any(|c| c == "memory")
                    .then(|| root.join(p.trim_start_matches('/')))
            })
            .unwrap_or_else(|| root.clone());
        std::fs::create_dir(&path).unwrap();
        let g = TcpLimitedMemcg { path, was };
        std::fs::write(
            g.path.join("memory.kmem.tcp.limit_in_bytes"),
            tcp_limit.to_string(),
        )
        .unwrap();
        Some(g)
    }

    fn set_limit(&self, bytes: u64) {
        std::fs::write(
            self.path.join("memory.kmem.tcp.limit_in_bytes"),
            bytes.to_string(),
        )
        .unwrap();
    }

    fn usage(&self) -> u64 {
        self.number("memory.kmem.tcp.usage_in_bytes")
    }

    fn failcnt(&self) -> u64 {
        self.number("memory.kmem.tcp.failcnt")
    }

    fn number(&self, file: &str) -> u64 {
        std::fs::read_to_string(self.path.join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for TcpLimitedMemcg {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.was.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        // The group goes once its sockets' charges are gone; retry briefly.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("test cleanup: {} still in use", self.path.display());
    }
}

/// What one writer saw writing into a stalled reader: bytes accepted, short writes, errors.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    accepted: u64,
    short: u64,
    errors: Vec<String>,
    still_blocked: bool,
}

/// Writes 64 KiB blocks with blocking `write()` for up to `how_long`; a write still waiting at
/// the end is what plain TCP does once the buffers are full.
fn write_into_stall(s: &TcpStream, how_long: Duration) -> Seen {
    let block = vec![7u8; 64 * 1024];
    let block = &block;
    let fd = s.as_raw_fd();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let started = Instant::now();
            while started.elapsed() < how_long {
                // SAFETY: fd is the live socket `s`, borrowed for this scope; block outlives the call.
                let n = unsafe { libc::write(fd, block.as_ptr().cast(), block.len()) };
                let r = if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                };
                let end = r.is_err();
                if tx.send(r).is_err() || end {
                    return;
                }
            }
        });
        let mut seen = Seen::default();
        let deadline = Instant::now() + how_long;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ok(n)) => {
                    seen.accepted += n as u64;
                    if n < block.len() {
                        seen.short += 1;
                    }
                }
                Ok(Err(e)) => {
                    seen.errors.push(e.to_string());
                    break;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    seen.still_blocked = true;
                    // Wakes the blocked writer so the scope can end.
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    break;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        seen
    })
}

/// Room in this process's memory group as the daemon's guard reads it.
fn own_room() -> u64 {
    let mounts = Mounts::read().unwrap();
    let g = group_of(
        &std::fs::read_to_string("/proc/self/cgroup").unwrap(),
        &mounts,
    )
    .expect("a memory group");
    room(&g).unwrap().expect("a limit").bytes
}

#[test]
fn a_memory_tight_sidecar_holds_the_writer_back_as_tcp_does() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut accel) = Accel::new("memcg_stall") else {
        return;
    };
    let Some(memcg) = TcpLimitedMemcg::enter("memcg_stall", 64 << 20) else {
        return;
    };
    let mesh = TwoPods::new(139, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    let dst = SocketAddrV4::new(mesh.server.ip, 8080);
    // The server app accepts and never reads.
    let listener: TcpListener = mesh
        .server
        .ns
        .run(|| TcpListener::bind(dst))
        .unwrap()
        .unwrap();
    let held = std::sync::Mutex::new(Vec::new());
    let open = || -> TcpStream {
        let s = connect(&mesh.client.ns, dst).unwrap();
        held.lock().unwrap().push(listener.accept().unwrap().0);
        s
    };
    accel.add_pod(&mesh.client.ns, &mesh.client.capture);
    accel.add_pod(&mesh.server.ns, &mesh.server.capture);
    let client = mesh.client.ns.cookie().unwrap();

    // A redirected connection into a sidecar that has room: 1 MiB goes over the fast lane.
    let s = open();
    let mut w = &s;
    std::io::Write::write_all(&mut w, &vec![7u8; 1 << 20]).unwrap();
    let c = accel.counters();
    assert!(
        c.get("bytes_redirected_outbound_app_to_sidecar") >= 512 << 10,
        "the app -> sidecar direction was redirected: {c:?}"
    );

    // The group fills (its limit drops to what is used plus 256 KiB), the guard reads a room
    // under its headroom and marks the pod, as the daemon does.
    memcg.set_limit(memcg.usage() + (256 << 10));
    let left = own_room();
    assert!(left < HEADROOM, "room {left} under the headroom");
    assert_eq!(accel.dp().set_memory_tight(&[client]).unwrap(), 1);

    // The app keeps writing into the stalled reader: held back, as plain TCP holds it.
    let before = memcg.failcnt();
    let seen = write_into_stall(&s, Duration::from_secs(3));
    let c = accel.counters();
    eprintln!(
        "marked tight: {seen:?}, TCP charges refused meanwhile: {}",
        memcg.failcnt() - before
    );
    assert!(
        seen.errors.is_empty() && seen.still_blocked,
        "the app's writer must see what plain TCP gives it: {seen:?}"
    );
    assert!(
        c.get("pass_memory_tight") >= 1,
        "the redirected direction moved to TCP because of the mark: {c:?}"
    );
    let flags = datapath::pinned_pods(&accel.pin_dir).unwrap()[&client].flags;
    assert_eq!(
        flags & (POLICY_OUTBOUND | POLICY_INBOUND),
        0,
        "no new pairs"
    );

    // The control: unmarked (the pod listed again as before), a new pair's redirect into the
    // same full group is what the mark prevents. Reported, not asserted: whether the charge
    // fails as ENOMEM, a short write or not at all is the kernel's matter.
    accel.dp().set_memory_tight(&[]).unwrap();
    accel.add_pod(&mesh.client.ns, &mesh.client.capture);
    let control = write_into_stall(&open(), Duration::from_secs(3));
    eprintln!(
        "unmarked, the same group: {control:?}, counters: {:?}",
        accel.counters()
    );
}

/// A process in the pod's network namespace and in `memcg`, killed when dropped.
struct PodProcess(std::process::Child);

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_daemon_marks_a_pod_whose_memory_group_has_no_room() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(accel) = Accel::cgroup_only("memcg_daemon") else {
        return;
    };
    let Some(memcg) = TcpLimitedMemcg::create("memcg_daemon", 1 << 20) else {
        return;
    };
    let mesh = TwoPods::new(142, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    // The server pod's "sidecar": a process in its namespace whose group has 1 MiB of room.
    let sidecar = PodProcess(
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", mesh.server.ns.path().display()))
            .args(["sleep", "300"])
            .spawn()
            .expect("nsenter sleep"),
    );
    std::fs::write(memcg.path.join("cgroup.procs"), sidecar.0.id().to_string()).unwrap();
    let dir = std::env::temp_dir().join(format!("meshlane-memcg-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (config, log) = (dir.join("pods.toml"), dir.join("daemon.log"));
    let mut list = String::new();
    for (name, pod) in [("client", &mesh.client), ("server", &mesh.server)] {
        list.push_str(&format!(
            "[[pod]]\nname = \"memcg/{name}\"\nnetns = \"{}\"\n\n",
            pod.ns.path().display()
        ));
    }
    std::fs::write(&config, list).unwrap();
    let mut daemon = start_forced_daemon(&accel, &config, &log);
    let (client, server) = (
        mesh.client.ns.cookie().unwrap(),
        mesh.server.ns.cookie().unwrap(),
    );
    let flags = |cookie: u64| {
        datapath::pinned_pods(&accel.pin_dir)
            .ok()
            .and_then(|p| p.get(&cookie).map(|p| p.flags))
    };
    wait_until("the daemon to mark the server pod memory-tight", || {
        flags(server).is_some_and(|f| f & POLICY_MEMORY_TIGHT != 0)
    });
    let f = flags(server).unwrap();
    assert_eq!(
        f & (POLICY_OUTBOUND | POLICY_INBOUND),
        0,
        "no new pairs: {f:#x}"
    );
    let c = flags(client).unwrap();
    assert!(
        c & POLICY_MEMORY_TIGHT == 0 && c & POLICY_OUTBOUND != 0,
        "the client pod has no limited group and stays as it was: {c:#x}"
    );
    let st = status_json(&accel);
    let pods = status_pods(&st, &[server]);
    let notes = pods[0]["notes"].to_string();
    assert!(
        notes.contains("memory tight") && notes.contains(&memcg.path.display().to_string()),
        "status names the group: {notes}"
    );
    let (_, metrics) = accel.http_get("/metrics").unwrap();
    assert_eq!(sample(&metrics, "meshlane_memory_tight_pods"), Some(1.0));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("memory tight"), "{logged}");

    // Room comes back (over twice the headroom): the pod pairs again, as before.
    memcg.set_limit(1 << 30);
    wait_until("the daemon to release the server pod", || {
        flags(server).is_some_and(|f| f & POLICY_MEMORY_TIGHT == 0 && f & POLICY_OUTBOUND != 0)
    });
    let (_, metrics) = accel.http_get("/metrics").unwrap();
    assert_eq!(sample(&metrics, "meshlane_memory_tight_pods"), Some(0.0));
    assert!(daemon.terminate().success());
    drop(sidecar);
    std::fs::remove_dir_all(&dir).ok();
}
