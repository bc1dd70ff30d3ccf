//! The datapath outlives the daemon: SIGKILL and restart adopt the pins without reloading, and
//! `meshlane detach` removes every pin and attachment. A stream running across all of that must
//! arrive whole and in order, and must have been accelerated before, between and after.

mod support;

use std::{
    io::Write,
    net::{Shutdown, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use meshlane::datapath;
use minimesh::{CaptureConfig, EchoServer, TwoPods};
use support::*;

fn start_daemon(accel: &Accel, config: &Path, log: &Path) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = accel
        .run_command()
        // This test is about the datapath outliving its daemon, on every kernel of the matrix,
        // including those whose probe refuses acceleration (probe.rs tests that gate).
        .arg("--force")
        .args(["--resync", "200ms"])
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start meshlane run");
    Daemon(child)
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

#[test]
fn streams_survive_daemon_sigkill_restart_and_detach() {
    let Some(accel) = Accel::cgroup_only("daemon_lifecycle") else {
        return;
    };
    let mesh = TwoPods::new(91, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    let dst = SocketAddrV4::new(mesh.server.ip, 8080);
    let _echo = EchoServer::spawn(&mesh.server.ns, dst).unwrap();
    let dir = std::env::temp_dir().join(format!("meshlane-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("pods.toml");
    let log = dir.join("daemon.log");
    std::fs::write(
        &config,
        format!(
            "[[pod]]\nname = \"test/client\"\nnetns = \"{}\"\n\n[[pod]]\nname = \"test/server\"\nnetns = \"{}\"\n",
            mesh.client.ns.path().display(),
            mesh.server.ns.path().display()
        ),
    )
    .unwrap();

    let mut daemon = start_daemon(&accel, &config, &log);
    wait_for("the daemon to list both pods", || {
        datapath::pinned_pods(&accel.pin_dir)
            .map(|p| p.len() == 2)
            .unwrap_or(false)
    });

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
