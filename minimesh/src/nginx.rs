//! nginx as the app in a pod, serving fixed bodies over keep-alive HTTP/1.1, plus the small
//! HTTP/1.1 client the tests and the Envoy admin calls use.
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

use crate::envoy::{enter_netns_on_exec, in_netns, stop_child, tail, TempDir};
use crate::Netns;
use anyhow::{bail, ensure, Context, Result};
use std::fs::File;
use std::io::{BufRead, Write};
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

/// A parsed HTTP/1.x response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    let n = r.read_line(&mut line).context("reading a response line")?;
    ensure!(n > 0, "connection closed before the response was complete");
    ensure!(
        line.ends_with('\n'),
        "connection closed inside a line: {line:?}"
    );
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// Reads one response to a request that was not `HEAD`: body by `Content-Length`, chunked
/// transfer coding, or until the peer closes. Leaves `r` at the next response, so one
/// `BufReader` serves a whole keep-alive connection.
pub fn read_response(r: &mut impl BufRead) -> Result<Response> {
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    ensure!(
        version.starts_with("HTTP/1."),
        "not an HTTP/1.x status line: {status_line:?}"
    );
    let status: u16 = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .with_context(|| format!("bad header line {line:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(resp);
    }
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let size_line = read_line(r)?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size line {size_line:?}"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(r)?.is_empty() {}
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + size, 0);
            r.read_exact(&mut resp.body[start..])
                .context("reading a chunk")?;
            ensure!(read_line(r)?.is_empty(), "chunk not followed by CRLF");
        }
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .parse()
            .with_context(|| format!("bad content-length {len:?}"))?;
        resp.body.resize(len, 0);
        r.read_exact(&mut resp.body)
            .with_context(|| format!("reading a {len}-byte body"))?;
    } else {
        r.read_to_end(&mut resp.body)
            .context("reading a body delimited by close")?;
    }
    Ok(resp)
}

/// Sends `GET path` for a keep-alive connection and reads the response. `conn` wraps the
/// stream so bytes read ahead stay buffered for the next response.
pub fn get(conn: &mut std::io::BufReader<TcpStream>, host: &str, path: &str) -> Result<Response> {
    // One write: a request split over several segments meets Nagle and the peer's delayed ACK.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    conn.get_mut()
        .write_all(request.as_bytes())
        .with_context(|| format!("sending GET {path}"))?;
    read_response(conn).with_context(|| format!("GET {path}"))
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
