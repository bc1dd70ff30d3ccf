//! The datapath outlives the daemon: SIGKILL and restart adopt the pins without reloading, and
//! `meshlane detach` removes every pin and attachment. A stream running across all of that must
//! arrive whole and in order, and must have been accelerated before, between and after.

mod support;

use std::{
    io::Write,
    net::{Shutdown, SocketAddrV4},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use meshlane::datapath;
use minimesh::{CaptureConfig, EchoServer, TwoPods};
use support::*;

// This test is about the datapath outliving its daemon, on every kernel of the matrix,
// including those whose probe refuses acceleration (probe.rs tests that gate): --force.
fn start_daemon(accel: &Accel, config: &Path, log: &Path) -> Daemon {
    start_forced_daemon(accel, config, log)
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the daemon with SIGKILL (no cleanup of any kind runs) and reaps it.
fn kill9(daemon: &mut Daemon) {
    nix::sys::signal::kill(daemon.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
    daemon.0.wait().unwrap();
}

/// Two pods with an echo server in the server pod, and a pod list naming both for the daemon.
struct Scene {
    mesh: TwoPods,
    dst: SocketAddrV4,
    /// Holds the pod list and the daemon's log; removed by the test when it passed.
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    _echo: EchoServer,
}

impl Scene {
    fn new(name: &str, subnet: u8) -> Scene {
        let mesh =
            TwoPods::new(subnet, CaptureConfig::default(), CaptureConfig::default()).unwrap();
        let dst = SocketAddrV4::new(mesh.server.ip, 8080);
        let _echo = EchoServer::spawn(&mesh.server.ns, dst).unwrap();
        let dir = std::env::temp_dir().join(format!("meshlane-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("pods.toml");
        std::fs::write(
            &config,
            format!(
                "[[pod]]\nname = \"test/client\"\nnetns = \"{}\"\n\n[[pod]]\nname = \"test/server\"\nnetns = \"{}\"\n",
                mesh.client.ns.path().display(),
                mesh.server.ns.path().display()
            ),
        )
        .unwrap();
        Scene {
            log: dir.join("daemon.log"),
            mesh,
            dst,
            dir,
            config,
            _echo,
        }
    }
}

fn wait_listed(accel: &Accel) {
    wait_for("the daemon to list both pods", || {
        datapath::pinned_pods(&accel.pin_dir)
            .map(|p| p.len() == 2)
            .unwrap_or(false)
    });
}

#[test]
fn streams_survive_daemon_sigkill_restart_and_detach() {
    let Some(accel) = Accel::cgroup_only("daemon_lifecycle") else {
        return;
    };
    let Scene {
        mesh,
        dst,
        dir,
        config,
        log,
        _echo,
    } = Scene::new("lifecycle", 91);
    let mut daemon = start_daemon(&accel, &config, &log);
    wait_listed(&accel);

    // One long stream, written in paced chunks while the daemon is killed, restarted and detached.
    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 60;
    let data = pattern(42, CHUNK * CHUNKS);
    let s = connect(&mesh.client.ns, dst).unwrap();
    let redirected = || {
        datapath::pinned_counters(&accel.pin_dir)
            .unwrap()
            .get("bytes_redirected_outbound_app_to_sidecar")
    };
    let out = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_to_end(&s));
        let mut w = &s;
        let mut marks = Vec::new();
        for (i, c) in data.chunks(CHUNK).enumerate() {
            w.write_all(c).unwrap();
            std::thread::sleep(Duration::from_millis(10));
            match i {
                15 => {
                    marks.push(redirected());
                    kill9(&mut daemon);
                }
                25 => {
                    assert!(accel.pin_dir.exists(), "SIGKILL leaves the pins in place");
                    marks.push(redirected());
                    daemon = start_daemon(&accel, &config, &log);
                }
                35 => {
                    marks.push(redirected());
                    wait_for("the restarted daemon to adopt the pins", || {
                        std::fs::read_to_string(&log)
                            .unwrap_or_default()
                            .contains("origin=Adopted")
                    });
                    // A connection made after the restart is paired by the adopted programs.
                    let before = datapath::pinned_counters(&accel.pin_dir)
                        .unwrap()
                        .get("pairs_outbound");
                    let fresh = pattern(7, 4096);
                    let got = echo_exchange(connect(&mesh.client.ns, dst).unwrap(), &fresh, 4096)
                        .unwrap();
                    assert_same("connection after restart", &got.bytes, &fresh);
                    assert_eq!(
                        datapath::pinned_counters(&accel.pin_dir)
                            .unwrap()
                            .get("pairs_outbound"),
                        before + 1
                    );
                }
                45 => {
                    marks.push(redirected());
                    let st = Command::new(env!("CARGO_BIN_EXE_meshlane"))
                        .args(["detach", "--pin-dir"])
                        .arg(&accel.pin_dir)
                        .status()
                        .unwrap();
                    assert!(st.success(), "meshlane detach");
                    assert!(!accel.pin_dir.exists(), "detach removed every pin");
                    assert_eq!(
                        datapath::sock_ops_attached(accel.cgroup.path()).unwrap(),
                        0,
                        "sock_ops left on the cgroup"
                    );
                }
                _ => {}
            }
        }
        s.shutdown(Shutdown::Write).unwrap();
        let out = reader.join().unwrap().unwrap();
        (out, marks)
    });
    let (out, marks) = out;
    assert_same("stream across kill, restart and detach", &out.bytes, &data);
    eprintln!("bytes redirected app->sidecar at kill, restart, adopt, detach: {marks:?}");
    assert!(marks[0] > 0, "accelerated before the kill");
    assert!(marks[1] > marks[0], "still accelerated while no daemon ran");
    assert!(marks[3] > marks[2], "accelerated after the restart");
    drop(daemon);
    // The daemon (stopped by now) must not have logged an error.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("ERROR"), "daemon log:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);

    // After detach, new connections still work (unaccelerated).
    let fresh = pattern(8, 1 << 20);
    let got = echo_exchange(connect(&mesh.client.ns, dst).unwrap(), &fresh, 64 * 1024).unwrap();
    assert_same("connection after detach", &got.bytes, &fresh);
}

/// A two-instruction program of `prog_type` (`r0 = 1; exit`): sock_ops that touches nothing,
/// sk_msg that passes every message to TCP, a connect hook that allows the connect and records
/// nothing. It stands in for "another build's program".
fn trivial_program(prog_type: u32, expected_attach_type: u32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    const BPF_PROG_LOAD: libc::c_long = 5;
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
        _rest: [u32; 14],
    }
    // BPF_MOV64_IMM(r0, 1); BPF_EXIT.
    let insns: [u64; 2] = [0xb7 | (1u64 << 32), 0x95];
    let license = c"GPL";
    let mut attr = Attr {
        prog_type,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type,
        ..Default::default()
    };
    let fd = datapath::bpf(BPF_PROG_LOAD, &mut attr).expect("load a trivial program");
    // SAFETY: a fresh descriptor from the kernel that nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// Makes the link pinned at `path` run `new` (BPF_LINK_UPDATE).
fn swap_link_program(path: &Path, new: &std::os::fd::OwnedFd) {
    let link = datapath::obj_get(path).unwrap();
    let old = datapath::prog_fd_by_id(datapath::link_prog_id(&link).unwrap())
        .unwrap()
        .unwrap();
    datapath::link_update(&link, &old, new).expect("BPF_LINK_UPDATE");
}

/// Pins `fd` at `path`, replacing what is there.
fn pin_at(fd: &std::os::fd::OwnedFd, path: &Path) {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_PIN: libc::c_long = 6;
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    datapath::bpf(BPF_OBJ_PIN, &mut attr).expect("pin");
}

/// The tag of the program the link pinned at `path` runs.
fn link_prog_tag(path: &Path) -> [u8; 8] {
    let link = datapath::obj_get(path).unwrap();
    let id = datapath::link_prog_id(&link).unwrap();
    let prog = datapath::prog_fd_by_id(id).unwrap().unwrap();
    datapath::prog_info(&prog).unwrap().tag
}

/// An upgrade under traffic: the daemon finds pins whose sock_ops and sk_msg are another build's
/// (here trivial programs that pair nothing and redirect nothing, put on the live pins while no
/// daemon runs) and replaces both in place. A stream paired before the swap flows through all of
/// it, whole and still redirected; a connection made under the other build is not paired, one
/// made after the upgrade is; a restart of the same build replaces nothing.
#[test]
fn an_upgrade_replaces_changed_programs_in_place_under_traffic() {
    const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
    const BPF_PROG_TYPE_SK_MSG: u32 = 16;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_SK_MSG_VERDICT: u32 = 7;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    const BPF_CGROUP_INET6_CONNECT: u32 = 11;
    let Some(accel) = Accel::cgroup_only("daemon_upgrade") else {
        return;
    };
    let Scene {
        mesh,
        dst,
        dir,
        config,
        log,
        _echo,
    } = Scene::new("upgrade", 93);
    let sock_ops_link = accel.pin_dir.join("link_sockops");
    let counter = |name: &str| datapath::pinned_counters(&accel.pin_dir).unwrap().get(name);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // One fresh connection's exchange; returns whether the datapath paired it.
    let fresh_pairs = |seed: u64| {
        let before = counter("pairs_outbound");
        let data = pattern(seed, 64 * 1024);
        let got = echo_exchange(connect(&mesh.client.ns, dst).unwrap(), &data, 4096).unwrap();
        assert_same(&format!("connection {seed}"), &got.bytes, &data);
        counter("pairs_outbound") > before
    };

    let mut daemon = start_daemon(&accel, &config, &log);
    wait_listed(&accel);
    let build_tag = link_prog_tag(&sock_ops_link);

    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 50;
    let data = pattern(43, CHUNK * CHUNKS);
    let s = connect(&mesh.client.ns, dst).unwrap();
    let redirected = || counter("bytes_redirected_outbound_app_to_sidecar");
    let trivial_sock_ops = trivial_program(BPF_PROG_TYPE_SOCK_OPS, 0);
    // The connect hooks exist where sock_ops may not ask for the caller itself (6.1, 6.12).
    let trivial_connect: Vec<(&str, std::os::fd::OwnedFd)> = [
        ("link_connect4", BPF_CGROUP_INET4_CONNECT),
        ("link_connect6", BPF_CGROUP_INET6_CONNECT),
    ]
    .into_iter()
    .filter(|(pin, _)| accel.pin_dir.join(pin).exists())
    .map(|(pin, attach)| (pin, trivial_program(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, attach)))
    .collect();
    let mut expect_replaced = vec!["meshlane_sockops", "meshlane_sk_msg"];
    if !trivial_connect.is_empty() {
        expect_replaced.extend(["meshlane_connect4", "meshlane_connect6"]);
    }
    let (out, marks) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_to_end(&s));
        let mut w = &s;
        let mut marks = Vec::new();
        for (i, c) in data.chunks(CHUNK).enumerate() {
            w.write_all(c).unwrap();
            std::thread::sleep(Duration::from_millis(10));
            match i {
                10 => {
                    marks.push(redirected());
                    kill9(&mut daemon);
                    // The pins become another build's: its sock_ops (and connect hooks, where
                    // this kernel has them) on the live links, its sk_msg on the sockhash, each
                    // pinned where the datapath pins its own.
                    swap_link_program(&sock_ops_link, &trivial_sock_ops);
                    pin_at(&trivial_sock_ops, &accel.pin_dir.join("prog_sockops"));
                    for (pin, prog) in &trivial_connect {
                        swap_link_program(&accel.pin_dir.join(pin), prog);
                    }
                    let trivial_sk_msg = trivial_program(BPF_PROG_TYPE_SK_MSG, 0);
                    let socks = datapath::obj_get(&accel.pin_dir.join("ML_SOCKS")).unwrap();
                    #[repr(C)]
                    #[derive(Default)]
                    struct Attach {
                        target_fd: u32,
                        attach_bpf_fd: u32,
                        attach_type: u32,
                        attach_flags: u32,
                        replace_bpf_fd: u32,
                    }
                    use std::os::fd::AsRawFd;
                    let mut a = Attach {
                        target_fd: socks.as_raw_fd() as u32,
                        attach_bpf_fd: trivial_sk_msg.as_raw_fd() as u32,
                        attach_type: BPF_SK_MSG_VERDICT,
                        ..Default::default()
                    };
                    datapath::bpf(BPF_PROG_ATTACH, &mut a).expect("attach sk_msg");
                    pin_at(&trivial_sk_msg, &accel.pin_dir.join("prog_sk_msg"));
                    assert_ne!(link_prog_tag(&sock_ops_link), build_tag);
                }
                20 => {
                    marks.push(redirected());
                    assert!(
                        !fresh_pairs(1),
                        "the other build's sock_ops paired a connection"
                    );
                    daemon = start_daemon(&accel, &config, &log);
                    wait_for("the daemon to upgrade the pins", || {
                        log_text().contains("origin=Upgraded")
                    });
                }
                30 => {
                    marks.push(redirected());
                    let text = log_text();
                    for program in &expect_replaced {
                        assert!(
                            text.lines()
                                .any(|l| l.contains("replaced in place") && l.contains(program)),
                            "{program} was not replaced:\n{text}"
                        );
                    }
                    for l in text.lines().filter(|l| l.contains("replaced in place")) {
                        eprintln!("{l}");
                    }
                    assert_eq!(link_prog_tag(&sock_ops_link), build_tag);
                    let hints = datapath::pinned_read_hints(&accel.pin_dir).unwrap();
                    assert!(
                        hints.enabled && hints.uncovered == 0,
                        "after the upgrade the read hints cover every unread entry: {hints:?}"
                    );
                    assert!(
                        fresh_pairs(2),
                        "a connection after the upgrade was not paired"
                    );
                    // Another restart of this build finds its own programs: nothing replaced.
                    kill9(&mut daemon);
                    std::fs::write(&log, "").unwrap();
                    daemon = start_daemon(&accel, &config, &log);
                    wait_for("the restarted daemon to adopt the pins", || {
                        log_text().contains("origin=Adopted")
                    });
                    assert!(!log_text().contains("replaced in place"), "{}", log_text());
                    let hints = datapath::pinned_read_hints(&accel.pin_dir).unwrap();
                    assert!(
                        hints.enabled && hints.uncovered == 0,
                        "a restart keeps the read hints on: {hints:?}"
                    );
                    assert!(
                        fresh_pairs(3),
                        "a connection after the restart was not paired"
                    );
                }
                _ => {}
            }
        }
        s.shutdown(Shutdown::Write).unwrap();
        (reader.join().unwrap().unwrap(), marks)
    });
    assert_same("stream across the upgrade", &out.bytes, &data);
    let end = redirected();
    eprintln!("bytes redirected app->sidecar at swap, upgrade, after, end: {marks:?} {end}");
    assert!(marks[0] > 0, "accelerated before the swap");
    assert!(
        marks[1] > marks[0],
        "the paired stream kept its program under the other build"
    );
    assert!(
        end > marks[2],
        "the paired stream still redirected after the upgrade"
    );
    drop(daemon);
    let text = log_text();
    assert!(!text.contains("ERROR"), "daemon log:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
