//! The command line as an operator meets it: help that explains, one clear sentence for each
//! missing prerequisite with nothing left behind, and a bad pod list that is refused by field
//! while the daemon keeps serving.

mod support;

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use meshlane::datapath;
use support::*;

fn meshlane() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshlane"))
}

fn run_err(cmd: &mut Command) -> String {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshlane");
    // A refused start must end by itself; never let a test hang on a daemon that stayed up.
    let mut daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.0.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "meshlane kept running instead of refusing to start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = std::mem::replace(&mut daemon.0, Command::new("true").spawn().expect("true"))
        .wait_with_output()
        .expect("output");
    assert!(
        !out.status.success(),
        "expected failure, got success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_explains_every_command() {
    let out = meshlane().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "detach", "status"] {
        assert!(text.contains(cmd), "--help lacks {cmd}:\n{text}");
    }
    let out = meshlane().args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--pin-dir",
        "--cgroup",
        "--config",
        "adopted",
        "--detach-on-exit",
    ] {
        assert!(text.contains(word), "run --help lacks {word}:\n{text}");
    }
    // Every flag of `run` can also come from the environment (a DaemonSet's `env`), and
    // --help says from which variable.
    let mut flag: Option<&str> = None;
    let mut missing = Vec::new();
    for line in text.lines().chain(["      --end"]) {
        if let Some(f) = line.trim_start().strip_prefix("--") {
            if let Some(prev) = flag.take() {
                missing.push(prev);
            }
            let name = f.split([' ', '=']).next().unwrap_or_default();
            flag = (!matches!(name, "help" | "version" | "end")).then_some(name);
        } else if line.contains("[env: ") {
            flag = None;
        }
    }
    assert!(
        missing.is_empty(),
        "run flags without an environment variable: {missing:?}"
    );
    // Enumerated values are listed, each with what it does.
    for value in ["local:", "kubernetes:", "none:", "two-way:", "json:"] {
        assert!(text.contains(value), "run --help lacks {value}:\n{text}");
    }
    let out = meshlane().args(["detach", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Live connections keep working"));
    // The exit statuses are documented where scripts' authors look.
    for args in [&["--help"][..], &["probe", "--help"]] {
        let out = meshlane().args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for code in ["Exit status:", "1  error", "2  usage", "3  probe"] {
            assert!(text.contains(code), "{args:?} lacks {code:?}:\n{text}");
        }
    }
}

#[test]
fn completions_cover_the_commands_for_each_shell() {
    let out = meshlane().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let bash = String::from_utf8_lossy(&out.stdout);
    for word in [
        "complete ",
        "run",
        "detach",
        "probe",
        "status",
        "completions",
        "--resync",
        "--output",
        "table json yaml",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word:?}");
    }
    for (shell, marker) in [
        ("zsh", "#compdef meshlane"),
        ("fish", "complete -c meshlane"),
    ] {
        let out = meshlane().args(["completions", shell]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(marker),
            "{shell}: {text}"
        );
        assert!(text.contains("status"), "{shell}");
    }
    let out = meshlane().args(["completions", "cmd"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// Usage errors (exit 2, clap's) name the flag and what it takes; they are told apart from a
/// command that failed (exit 1).
#[test]
fn usage_errors_exit_2_and_name_the_flag() {
    for (args, says) in [
        (&["run", "--discovery", "bogus"][..], "--discovery"),
        (&["run", "--sidecar-hop", "maybe"], "--sidecar-hop"),
        (&["--log-format", "xml", "detach"], "--log-format"),
        (&["status", "--output", "csv"], "--output"),
        (&["status", "--json", "--output", "yaml"], "--output"),
        (&["run", "--resync", "1h30m"], "--resync"),
        (&["run", "--sweep", "5 parsecs"], "--sweep"),
    ] {
        let out = meshlane().args(args).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let out = meshlane()
        .args(["run", "--discovery", "bogus"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[possible values: local, kubernetes, none]"),
        "{err}"
    );
    // A command that cannot do its job is an error, 1: no daemon on the socket.
    let out = meshlane()
        .args([
            "status",
            "--api-socket",
            "/run/meshlane-no-such-dir/api.sock",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the meshlane daemon"));
}

#[test]
fn missing_prerequisites_are_named_and_leave_nothing() {
    let Some(accel) = Accel::cgroup_only("missing_prerequisites") else {
        return;
    };
    let pin_dir = accel.pin_dir.clone();

    // Not a cgroup v2 directory.
    let plain_dir =
        std::env::temp_dir().join(format!("meshlane-not-a-cgroup-{}", std::process::id()));
    std::fs::create_dir_all(&plain_dir).unwrap();
    let err = run_err(
        meshlane()
            .args(["run", "--pin-dir"])
            .arg(&pin_dir)
            .arg("--cgroup")
            .arg(&plain_dir),
    );
    assert!(err.contains("is not a cgroup v2 directory"), "{err}");
    assert!(
        !pin_dir.exists(),
        "nothing may be pinned after a refused start"
    );

    // A pin directory that is not on a bpffs.
    let err = run_err(
        meshlane()
            .args(["run", "--pin-dir"])
            .arg(plain_dir.join("pins"))
            .arg("--cgroup")
            .arg(accel.cgroup.path()),
    );
    assert!(err.contains("not on a bpffs"), "{err}");
    assert_eq!(datapath::sock_ops_attached(accel.cgroup.path()).unwrap(), 0);

    // No privilege: run from a copy any user may execute, as nobody.
    let exe_dir = std::env::temp_dir().join(format!("meshlane-cli-{}", std::process::id()));
    std::fs::create_dir_all(&exe_dir).unwrap();
    let exe = exe_dir.join("meshlane");
    std::fs::copy(env!("CARGO_BIN_EXE_meshlane"), &exe).unwrap();
    std::fs::set_permissions(
        &exe_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let err = run_err(
        Command::new(&exe)
            .args(["run", "--pin-dir"])
            .arg(&pin_dir)
            .arg("--cgroup")
            .arg(accel.cgroup.path())
            .uid(65534)
            .gid(65534),
    );
    assert!(err.contains("must run as root"), "{err}");
    assert!(!pin_dir.exists());
    assert_eq!(datapath::sock_ops_attached(accel.cgroup.path()).unwrap(), 0);
    let _ = std::fs::remove_dir_all(&exe_dir);
    let _ = std::fs::remove_dir_all(&plain_dir);
}

#[test]
fn a_bad_pod_list_is_refused_by_field_and_the_last_good_state_kept() {
    let Some(accel) = Accel::cgroup_only("bad_pod_list") else {
        return;
    };
    let ns = minimesh::Netns::new("cfg").unwrap();
    let dir = std::env::temp_dir().join(format!("meshlane-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config: PathBuf = dir.join("pods.toml");
    let good = format!(
        "[[pod]]\nname = \"demo/a\"\nnetns = \"{}\"\n",
        ns.path().display()
    );
    std::fs::write(&config, &good).unwrap();
    let log = dir.join("log");
    let mut daemon = Daemon(
        accel
            .run_command()
            // Durations in any unit, combined too.
            .args(["--resync", "100ms", "--sweep", "1m 30s"])
            .arg("--config")
            .arg(&config)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let pods = || {
        datapath::pinned_pods(&accel.pin_dir)
            .map(|p| p.len())
            .unwrap_or(usize::MAX)
    };
    wait("the pod to be listed", &|| pods() == 1);
    // status --pins as a YAML document, read with no daemon in the loop.
    let out = meshlane()
        .args(["status", "--pins", "--output", "yaml", "--pin-dir"])
        .arg(&accel.pin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_norway::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not YAML ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(doc["pods"].as_array().map(Vec::len), Some(1), "{doc:#}");
    assert_eq!(doc["pods"][0]["proxy_uid"], 1337, "{doc:#}");
    assert!(doc["counters"]["pairs_outbound"].is_u64(), "{doc:#}");

    std::fs::write(
        &config,
        format!("{good}exclude_outbound_cidrs = [\"10.0.0.0/99\"]\n"),
    )
    .unwrap();
    wait("the rejection to be logged", &|| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("field `exclude_outbound_cidrs`")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon must keep running"
    );
    assert_eq!(pods(), 1, "the last good state stays in the map");

    std::fs::write(&config, "").unwrap();
    wait("the pod to be removed", &|| pods() == 0);
    assert!(daemon.terminate().success(), "SIGTERM is a clean stop");
    // Log lines name the pod, not only its namespace cookie.
    let said = std::fs::read_to_string(&log).unwrap();
    let removed = said
        .lines()
        .find(|l| l.contains("pod removed"))
        .unwrap_or_else(|| panic!("no removal logged:\n{said}"));
    assert!(removed.contains("demo/a"), "{removed}");
    assert!(
        accel.pin_dir.exists(),
        "without --detach-on-exit the datapath stays pinned"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad flags end the daemon with the flag named before anything is loaded, and never destroy
/// what is already on disk.
#[test]
fn bad_flags_are_refused_without_side_effects() {
    let Some(accel) = Accel::cgroup_only("bad_flags") else {
        return;
    };
    for resync in [
        "99999999999999999999m",
        "18446744073709551615m",
        "61m",
        "0ms",
        "2h",
        "1h30m",
        "5 parsecs",
    ] {
        let err = run_err(accel.run_command().args(["--resync", resync]));
        assert!(
            err.contains("--resync")
                && (err.contains("between") || err.contains("expected") || err.contains("unit")),
            "{resync}: {err}"
        );
    }
    for n in ["8", "0", "2000000", "lots", "4294967296"] {
        let err = run_err(accel.run_command().args(["--max-sockets", n]));
        assert!(
            err.contains("--max-sockets") && err.contains("from 16 to 1048576"),
            "{n}: {err}"
        );
    }
    for size in ["lots", "16 furlongs", "-1MiB", "99999999999GiB"] {
        let err = run_err(accel.run_command().arg(format!("--memory-headroom={size}")));
        assert!(
            err.contains("--memory-headroom")
                && (err.contains("expected") || err.contains("unit") || err.contains("too large")),
            "{size}: {err}"
        );
    }
    // The environment is checked as strictly as the flags.
    let err = run_err(accel.run_command().env("MESHLANE_RESYNC", "2h"));
    assert!(err.contains("--resync") && err.contains("2h"), "{err}");
    let err = run_err(accel.run_command().env("MESHLANE_SWEEP", "1y"));
    assert!(err.contains("--sweep") && err.contains("between"), "{err}");
    // A log filter that does not parse is refused, naming the flag, not run at another level.
    for filter in ["meshlane=nonsense", "[unclosed", "meshlane=debug,,=x"] {
        let err = run_err(accel.run_command().args(["--log-level", filter]));
        assert!(
            err.contains("--log-level") && err.contains("not a log filter"),
            "{filter}: {err}"
        );
    }
    // --api-socket naming an ordinary file: refused, and the file is left as it was.
    let file = std::env::temp_dir().join(format!("meshlane-not-a-socket-{}", std::process::id()));
    std::fs::write(&file, b"keep me").unwrap();
    let err = run_err(
        meshlane()
            .args([
                "run",
                "--discovery",
                "none",
                "--metrics-addr",
                "off",
                "--pin-dir",
            ])
            .arg(&accel.pin_dir)
            .arg("--cgroup")
            .arg(accel.cgroup.path())
            .arg("--api-socket")
            .arg(&file),
    );
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(
        !accel.pin_dir.exists(),
        "nothing loaded after a refused start"
    );
    let _ = std::fs::remove_file(&file);
}
