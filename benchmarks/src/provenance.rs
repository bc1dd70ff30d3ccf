//! Where a result came from, recorded with it: the kernel, the CPU, the Envoy build, meshlane's
//! git revision and the exact command, so a number in a README can be traced to its run.

use std::process::Command;

/// The machine and build a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Provenance {
    /// `uname -r`.
    pub kernel: String,
    /// The first `model name` of /proc/cpuinfo, and how many CPUs it lists.
    pub cpu_model: String,
    pub cpus: usize,
    /// `envoy --version` (the sidecars' build), or why it is unknown.
    pub envoy: String,
    /// `git rev-parse HEAD` of the working directory, "+dirty" with uncommitted changes.
    pub meshlane_rev: String,
    /// The command line, as run.
    pub command: String,
    /// When the run started, seconds since the Unix epoch.
    pub started_unix: u64,
}

impl Provenance {
    pub fn collect() -> Provenance {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map_or_else(|| "unknown".to_string(), |(_, m)| m.trim().to_string());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let envoy = minimesh::envoy::envoy_binary()
            .map_err(|e| format!("{e:#}"))
            .and_then(|bin| output(Command::new(bin).arg("--version")))
            .map(|v| {
                // "envoy  version: <sha>/<version>/Clean/RELEASE/BoringSSL"
                v.split("version:").nth(1).unwrap_or(&v).trim().to_string()
            })
            .unwrap_or_else(|e| format!("unknown ({e})"));
        let rev = output(Command::new("git").args(["rev-parse", "HEAD"]));
        let dirty =
            output(Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]))
                .is_ok_and(|s| !s.is_empty());
        let meshlane_rev = match rev {
            Ok(r) if dirty => format!("{r}+dirty"),
            Ok(r) => r,
            Err(e) => format!("unknown ({e})"),
        };
        Provenance {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |s| s.trim().to_string()),
            cpu_model,
            cpus,
            envoy,
            meshlane_rev,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// One line for the head of results.md.
    pub fn line(&self) -> String {
        format!(
            "Run on kernel {}, {} x {}, Envoy {}, meshlane {}: `{}`",
            self.kernel, self.cpus, self.cpu_model, self.envoy, self.meshlane_rev, self.command
        )
    }
}

/// A command's trimmed stdout, or why there is none.
fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("exit {}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
