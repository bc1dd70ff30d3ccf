//! nginx as the app in a pod, serving fixed bodies over keep-alive HTTP/1.1 (the tests' client
//! is the workspace's `httpc`; the benchmark's measured loop has its own).
//!
//! [`Nginx::spawn`] runs the distro's `nginx` binary (installed by `scripts/setup.sh`) with a
//! generated configuration, as a child process inside the pod's network namespace. Everything it
//! writes (pid file, error log, temp paths, the bodies it serves) lives in a private directory
//! that is removed on drop. It serves:
//!
//! | path   | body                |
//! |--------|---------------------|
//! | `/1k`  | [`body("1k")`](body), 1024 bytes |
//! | `/64k` | [`body("64k")`](body), 65536 bytes |
//! | `/16m` | [`body("16m")`](body), 16 MiB |

use crate::netns::in_netns;
use crate::process::{enter_netns_on_exec, stop_child, tail, TempDir};
use crate::Netns;
use anyhow::{bail, ensure, Context, Result};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bodies nginx serves: name (also the path without `/`) and length.
pub const BODIES: &[(&str, usize)] = &[("1k", 1024), ("64k", 64 * 1024), ("16m", 16 << 20)];

/// How long [`Nginx::spawn`] waits for the listener.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The exact body served at `/<name>` (`name` with or without the leading `/`): printable
/// ASCII, 63 characters and a newline per line, where the character at offset `i` depends on
/// `i` in a way that does not repeat with any small period, so a lost, duplicated or reordered
/// chunk shows up in a comparison.
///
/// Panics for a name not in [`BODIES`].
pub fn body(name: &str) -> Vec<u8> {
    let name = name.trim_start_matches('/');
    let len = BODIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, len)| *len)
        .unwrap_or_else(|| panic!("nginx serves no /{name}; bodies: {BODIES:?}"));
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..len)
        .map(|i| {
            if i % 64 == 63 {
                b'\n'
            } else {
                ALPHABET[(i * 7 + i / 1021) % ALPHABET.len()]
            }
        })
        .collect()
}

/// nginx listening on one address in a pod. Killed and its directory removed on drop.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    addr: SocketAddrV4,
    dir: TempDir,
}

impl Nginx {
    /// The nginx binary: `$MESHLANE_NGINX` if set, else `/usr/sbin/nginx`.
    pub fn binary() -> Result<PathBuf> {
        let path = std::env::var_os("MESHLANE_NGINX")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"));
        ensure!(
            path.is_file(),
            "nginx not found at {}; run scripts/setup.sh (it installs Debian's nginx) \
             or point MESHLANE_NGINX at an nginx binary",
            path.display()
        );
        Ok(path)
    }

    /// Starts nginx (as root, one process, no master) listening on `addr` inside `ns` and
    /// returns once it accepts connections.
    pub fn spawn(ns: &Netns, addr: SocketAddrV4) -> Result<Nginx> {
        let bin = Self::binary()?;
        let dir = TempDir::new("nginx")?;
        let root = dir.path().join("html");
        std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        for (name, _) in BODIES {
            dir.write(&format!("html/{name}"), &body(name))?;
        }
        let d = dir.path().display();
        let conf = format!(
            "# minimesh nginx app\n\
             daemon off;\n\
             master_process off;\n\
             worker_processes 1;\n\
             worker_rlimit_nofile 65536;\n\
             user root;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   server_tokens off;\n\
             \x20   default_type application/octet-stream;\n\
             \x20   sendfile on;\n\
             \x20   tcp_nopush on;\n\
             \x20   tcp_nodelay on;\n\
             \x20   keepalive_timeout 60s;\n\
             \x20   keepalive_requests 1000000;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   server {{\n\
             \x20       listen {addr} backlog=4096;\n\
             \x20       root {d}/html;\n\
             \x20       location / {{ }}\n\
             \x20   }}\n\
             }}\n"
        );
        let conf_path = dir.write("nginx.conf", conf.as_bytes())?;
        let error_log = dir.path().join("error.log");
        let stdio_path = dir.path().join("nginx.stdio");
        let stdio = File::create(&stdio_path)
            .with_context(|| format!("creating {}", stdio_path.display()))?;
        let netns =
            File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&conf_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdio.try_clone()?)
            .stderr(stdio);
        enter_netns_on_exec(&mut cmd, &netns, None);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} in {}", bin.display(), ns.name()))?;
        let mut nginx = Nginx { child, addr, dir };
        nginx.wait_ready(&netns).map_err(|e| {
            e.context(format!(
                "nginx on {addr} in {} did not start; {}:\n{}\n{}:\n{}",
                ns.name(),
                error_log.display(),
                tail(&error_log, 4096),
                stdio_path.display(),
                tail(&stdio_path, 2048)
            ))
        })?;
        Ok(nginx)
    }

    fn wait_ready(&mut self, netns: &File) -> Result<()> {
        let target = if self.addr.ip().is_unspecified() {
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.addr.port())
        } else {
            self.addr
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("nginx exited during start-up ({status})");
            }
            let r = in_netns(netns, || {
                TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_millis(500))
            })?;
            match r {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!("{target} still refuses connections after {READY_TIMEOUT:?}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The nginx process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its private directory (`nginx.conf`, `error.log`, `html/`).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM is nginx's fast shutdown.
        stop_child(&mut self.child, Duration::from_secs(2));
    }
}
