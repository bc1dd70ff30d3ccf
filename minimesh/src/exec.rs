//! Running the external tools (`ip`, `nsenter`, `iptables-restore`) with
//! errors that name the command line and its stderr, because "exit status 2"
//! alone is useless when a privileged test fails on CI.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the tools we run live on Debian; `PATH` of a non-login root shell or
/// of CI may lack the sbin directories, so they are searched as well.
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Resolves `program` to an absolute path (PATH first, then the sbin
/// directories); falls back to the bare name so the spawn error names it.
pub(crate) fn program_path(program: &str) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let from_path = std::env::split_paths(&path_var).collect::<Vec<_>>();
    from_path
        .iter()
        .map(PathBuf::as_path)
        .chain(EXTRA_DIRS.iter().map(Path::new))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// A `Command` for `program`, resolved with [`program_path`].
pub(crate) fn command(program: &str) -> Command {
    Command::new(program_path(program))
}

/// The command line as a human would type it, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion; fails unless it exits 0. Returns stdout.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    run_with_stdin(cmd, None)
}

/// Runs `cmd`, feeding it `stdin` when given; fails unless it exits 0.
pub(crate) fn run_with_stdin(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    let line = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    if let Some(input) = stdin {
        let mut pipe = child
            .stdin
            .take()
            .with_context(|| format!("no stdin pipe for `{line}`"))?;
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of `{line}`"))?;
        // Dropping the pipe sends EOF, which iptables-restore needs to commit.
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
